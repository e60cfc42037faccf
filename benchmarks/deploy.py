"""CPU inference throughput of the deployment runtimes: keras_coat's exports against timm's paths.

    python benchmarks/deploy.py                 # CoaT-Lite Tiny and Small, batch 1 and 8, 224
    python benchmarks/deploy.py --quick         # smoke test: Tiny, 64x64, one short round

Runtimes (fp32 unless named), each measured in its own process:

    timm eager          timm in torch.inference_mode()
    timm compile        torch.compile(model, dynamic=False) (inductor), compiled during warm-up
    timm -> ORT         torch.onnx.export of the timm model, run in ONNX Runtime
    keras_coat TF       the Keras model as a TensorFlow graph (`tf.function`, no XLA)
    keras_coat -> ORT   keras_coat.export_model(..., "onnx") in ONNX Runtime
    keras_coat -> OV    keras_coat.export_model(..., "openvino") in OpenVINO, f32 hint
    keras_coat -> LiteRT, LiteRT int8
                        keras_coat.export_model(..., "litert"), float32 and full-integer int8,
                        in the LiteRT interpreter (XNNPACK) with one thread per core

The exported files are written once per model (random weights: speed does not depend on their
values), each export verified in its runtime by export_model. Every timed process then loads one
file (or builds one model), and times `--repeats` calls per batch size after `--warmup` calls;
the cell is the median of those. A round runs every runtime once per model, in an order rotated
from round to round; the table reports the median over `--rounds` rounds and is written between
markers into benchmarks/RESULTS.md. The keras_coat files take pixels and include the ImageNet
normalization and softmax; timm and the TF graph get normalized inputs (a 1-pass difference).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
# This checkout's keras_coat (not an installed copy), and compare.py beside this file.
sys.path[:0] = [os.path.dirname(BENCHMARKS), BENCHMARKS]
import compare  # noqa: E402  (the timing helpers and the RESULTS.md writer)

BEGIN, END = "<!-- deploy-throughput:begin -->", "<!-- deploy-throughput:end -->"
RUNTIMES = {
    "timm_eager": "timm eager",
    "timm_compile": "timm + torch.compile",
    "timm_onnxruntime": "timm -> ONNX Runtime",
    "keras_tf": "keras_coat TF graph",
    "keras_onnxruntime": "keras_coat -> ONNX Runtime",
    "keras_openvino": "keras_coat -> OpenVINO f32",
    "keras_litert": "keras_coat -> LiteRT",
    "keras_litert_int8": "keras_coat -> LiteRT int8",
}
PEERS = ("timm_eager", "timm_compile", "timm_onnxruntime")
# The export each keras_coat runtime loads: (format, precision, file name).
KERAS_FILES = {
    "keras_onnxruntime": ("onnx", "float32", "keras.onnx"),
    "keras_openvino": ("openvino", "float32", "keras.xml"),
    "keras_litert": ("litert", "float32", "keras.tflite"),
    "keras_litert_int8": ("litert", "int8", "keras_int8.tflite"),
}
CALIBRATION_IMAGES = 16
THREADS = os.cpu_count()


# ---------------------------------------------------------------------------------------------
# Preparation (one subprocess per framework and model)


def prepare_keras(model_name, size, folder, runtimes):
    import numpy as np

    import keras_coat

    model = keras_coat.create_model(model_name, input_shape=(size, size, 3))
    rng = np.random.default_rng(0)
    calibration = rng.uniform(0, 255, (CALIBRATION_IMAGES, size, size, 3)).astype("float32")
    for runtime in runtimes:
        if runtime not in KERAS_FILES:
            continue
        format, precision, name = KERAS_FILES[runtime]
        keras_coat.export_model(
            model,
            os.path.join(folder, name),
            format,
            precision=precision,
            calibration_data=calibration if precision == "int8" else None,
            overwrite=True,
        )


def prepare_timm(model_name, size, folder):
    import numpy as np
    import onnxruntime
    import timm
    import torch

    model = timm.create_model(model_name, pretrained=False, img_size=size).eval()
    images = torch.rand(2, 3, size, size)
    path = os.path.join(folder, "timm.onnx")
    torch.onnx.export(
        model, (images,), path, input_names=["images"], output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
        dynamo=False,
    )
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = model(images).numpy()
    error = float(np.max(np.abs(session.run(None, {"images": images.numpy()})[0] - expected)))
    if error > 1e-3:
        raise RuntimeError(f"timm's ONNX export differs from timm by {error:.3g}")


# ---------------------------------------------------------------------------------------------
# Timed workers


def _runner(runtime, model_name, size, folder):
    """A function of the batch size returning a zero-argument function that runs one batch."""
    import numpy as np

    pixels = lambda batch: (  # noqa: E731
        np.random.RandomState(0).rand(batch, size, size, 3) * 255
    ).astype("float32")
    if runtime == "timm_eager" or runtime == "timm_compile":
        import torch

        import timm

        model = timm.create_model(model_name, pretrained=False, img_size=size).eval()

        def timm_batch(batch):
            forward = torch.compile(model, dynamic=False) if runtime == "timm_compile" else model
            images = torch.rand(batch, 3, size, size)

            def run():
                with torch.inference_mode():
                    return forward(images)

            return run

        return timm_batch
    if runtime == "keras_tf":
        import tensorflow as tf

        import keras_coat

        model = keras_coat.create_model(
            model_name, input_shape=(size, size, 3), include_preprocessing=False
        )
        forward = tf.function(lambda x: model(x, training=False), jit_compile=False)

        def keras_batch(batch):
            images = tf.constant(pixels(batch))
            return lambda: forward(images).numpy()

        return keras_batch
    if runtime in ("timm_onnxruntime", "keras_onnxruntime"):
        import onnxruntime

        name = "timm.onnx" if runtime == "timm_onnxruntime" else KERAS_FILES[runtime][2]
        session = onnxruntime.InferenceSession(
            os.path.join(folder, name), providers=["CPUExecutionProvider"]
        )
        input_name = session.get_inputs()[0].name

        def ort_batch(batch):
            images = pixels(batch)
            if runtime == "timm_onnxruntime":
                images = np.ascontiguousarray(images.transpose(0, 3, 1, 2) / 255.0, "float32")
            return lambda: session.run(None, {input_name: images})

        return ort_batch
    if runtime == "keras_openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(
            os.path.join(folder, KERAS_FILES[runtime][2]), "CPU",
            {"INFERENCE_PRECISION_HINT": "f32"},
        )
        request = compiled.create_infer_request()

        def openvino_batch(batch):
            images = pixels(batch)
            return lambda: request.infer({"images": images})

        return openvino_batch
    if runtime.startswith("keras_litert"):
        from ai_edge_litert.interpreter import Interpreter

        path = os.path.join(folder, KERAS_FILES[runtime][2])

        def litert_batch(batch):
            interpreter = Interpreter(model_path=path, num_threads=THREADS)
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, (batch, size, size, 3))
            interpreter.allocate_tensors()
            interpreter.set_tensor(index, pixels(batch))
            return interpreter.invoke

        return litert_batch
    raise ValueError(f"unknown runtime {runtime!r}")


def worker(args):
    """Times one runtime on one model at every batch size; prints one JSON line."""
    if args.runtime.startswith("timm"):
        import timm  # noqa: F401  (timm before TensorFlow: they clash in the other order)
    make = _runner(args.runtime, args.model, args.size, args.folder)
    rates = {}
    for batch in args.batch_sizes:
        median, _ = compare.time_calls(make(batch), args.warmup, args.repeats)
        rates[str(batch)] = batch / median
    print(json.dumps({
        "runtime": args.runtime, "model": args.model, "images_per_s": rates,
        "peak_rss_mib": compare.memory_mib()[1],
    }))


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def profile(runtime, model_name, size, folder, batch, repeats):
    """Per-op-type time of one batch in the runtime's own profiler (OpenVINO's performance
    counters, ONNX Runtime's profiling trace): ``[(op type, ms per batch)]``, largest first."""
    import collections

    import numpy as np

    images = (np.random.RandomState(0).rand(batch, size, size, 3) * 255).astype("float32")
    totals = collections.Counter()
    if runtime == "keras_openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(
            os.path.join(folder, KERAS_FILES[runtime][2]), "CPU",
            {"INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True},
        )
        request = compiled.create_infer_request()
        request.infer({"images": images})
        for _ in range(repeats):
            request.infer({"images": images})
            for info in request.profiling_info:
                totals[info.node_type] += info.real_time.total_seconds() * 1e3 / repeats
    elif runtime in ("keras_onnxruntime", "timm_onnxruntime"):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, f"profile-{runtime}")
        name = "timm.onnx" if runtime == "timm_onnxruntime" else KERAS_FILES[runtime][2]
        session = onnxruntime.InferenceSession(
            os.path.join(folder, name), options, providers=["CPUExecutionProvider"]
        )
        if runtime == "timm_onnxruntime":
            images = np.ascontiguousarray(images.transpose(0, 3, 1, 2) / 255.0, "float32")
        feed = {session.get_inputs()[0].name: images}
        session.run(None, feed)
        for _ in range(repeats):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
        kernels = [
            e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
        ]
        for event in kernels[len(kernels) // (repeats + 1):]:  # drop the warm-up run
            totals[event["args"]["op_name"]] += event["dur"] / 1e3 / repeats
    else:
        raise ValueError(f"no per-op profiler for {runtime!r}; use keras_openvino, "
                         "keras_onnxruntime or timm_onnxruntime")
    return totals.most_common()


def _subprocess(arguments):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *arguments],
        capture_output=True, text=True, env=env,
    )
    if result.returncode:
        raise RuntimeError(f"{' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


# ---------------------------------------------------------------------------------------------
# The table


def _table(results, args):
    """``results[model][runtime]``: the worker outputs of every round."""
    runtimes = [r for r in RUNTIMES if r in args.runtimes]
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {compare.cpu_name()}, "
        f"{os.cpu_count()} cores, fp32 (int8 where named), {args.size}x{args.size}, random "
        f"weights. Each cell: images per second, the median over {args.rounds} rounds; in a round "
        f"every runtime runs in its own process (order rotated between rounds) and times "
        f"{args.repeats} calls per batch size after {args.warmup} warm-up calls (median). "
        "Best of each side in bold; the last column is the fastest keras_coat path over the "
        "fastest timm path (timm eager, torch.compile, ONNX Runtime).",
        "",
        "| model | batch | " + " | ".join(RUNTIMES[r] for r in runtimes)
        + " | best keras_coat / best timm |",
        "|---|---|" + "---|" * len(runtimes) + "---|",
    ]
    for model, by_runtime in results.items():
        for batch in args.batch_sizes:
            rates = {
                runtime: statistics.median(run["images_per_s"][str(batch)] for run in runs)
                for runtime, runs in by_runtime.items()
            }
            peers = [r for r in rates if r in PEERS]
            ours = [r for r in rates if r not in PEERS]
            best_peer = max(peers, key=rates.get) if peers else None
            best_ours = max(ours, key=rates.get) if ours else None
            cells = [
                f"**{rates[r]:.2f}**" if r in (best_peer, best_ours) else f"{rates[r]:.2f}"
                for r in runtimes
            ]
            ratio = (
                f"{rates[best_ours] / rates[best_peer]:.2f}x ({RUNTIMES[best_ours]} / "
                f"{RUNTIMES[best_peer]})" if best_peer and best_ours else "-"
            )
            lines.append(f"| {model} | {batch} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["coat_lite_tiny", "coat_lite_small"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: coat_lite_tiny at 64x64, batch 1 and 2, one short "
                        "round, RESULTS.md untouched")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--folder", help="where the exported files go (default: a temp folder)")
    parser.add_argument("--reuse-exports", action="store_true",
                        help="keep the files a previous run exported to --folder for the same "
                        "model, size and runtimes")
    parser.add_argument("--profile", choices=["keras_openvino", "keras_onnxruntime",
                                              "timm_onnxruntime"],
                        help="instead of timing: the per-op profile of one runtime on the first "
                        "model and batch size, from the files of a run with --folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", choices=["keras", "timm"], help=argparse.SUPPRESS)
    parser.add_argument("--runtime", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.size = ["coat_lite_tiny"], [1, 2], 64
        args.warmup, args.repeats, args.rounds, args.no_write = 1, 2, 1, True
    if args.worker:
        return worker(args)
    if args.profile:
        folder = os.path.join(args.folder, args.models[0])
        rows = profile(args.profile, args.models[0], args.size, folder, args.batch_sizes[0],
                       args.repeats)
        total = sum(ms for _, ms in rows)
        print(f"{RUNTIMES[args.profile]}, {args.models[0]}, batch {args.batch_sizes[0]}: "
              f"{total:.1f} ms of op time per batch")
        print("| op type | ms per batch | share |\n|---|---|---|")
        for op, ms in rows[:12]:
            print(f"| {op} | {ms:.1f} | {100 * ms / total:.0f}% |")
        return 0
    if args.prepare == "keras":
        return prepare_keras(args.model, args.size, args.folder, args.runtimes)
    if args.prepare == "timm":
        return prepare_timm(args.model, args.size, args.folder)

    common = ["--size", str(args.size), "--runtimes", *args.runtimes]
    results = {}
    with tempfile.TemporaryDirectory(prefix="coat-deploy-") as scratch:
        for model in args.models:
            folder = os.path.join(args.folder or scratch, model)
            os.makedirs(folder, exist_ok=True)
            manifest = os.path.join(folder, "exports.json")
            wanted = {"model": model, "size": args.size, "runtimes": sorted(args.runtimes)}
            if args.reuse_exports and _read_json(manifest) == wanted:
                print(f"{model}: reusing the exports in {folder}", flush=True)
            else:
                print(f"{model}: exporting (each export verified in its runtime)", flush=True)
                _subprocess(["--prepare", "keras", "--model", model, "--folder", folder, *common])
                if "timm_onnxruntime" in args.runtimes:
                    _subprocess(
                        ["--prepare", "timm", "--model", model, "--folder", folder, *common]
                    )
                with open(manifest, "w") as f:
                    json.dump(wanted, f)
            results[model] = {runtime: [] for runtime in args.runtimes}
            for round_index in range(args.rounds):
                shift = round_index % len(args.runtimes)
                order = args.runtimes[shift:] + args.runtimes[:shift]
                for runtime in order:
                    output = _subprocess([
                        "--worker", "--runtime", runtime, "--model", model, "--folder", folder,
                        "--batch-sizes", *map(str, args.batch_sizes), "--warmup",
                        str(args.warmup), "--repeats", str(args.repeats), *common,
                    ])
                    run = json.loads(output.strip().splitlines()[-1])
                    results[model][runtime].append(run)
                    rates = ", ".join(
                        f"batch {b} {r:.2f}" for b, r in run["images_per_s"].items()
                    )
                    print(f"{model} round {round_index + 1} {RUNTIMES[runtime]}: {rates} img/s "
                          f"({run['peak_rss_mib']:.0f} MiB)", flush=True)
    if not args.rounds:
        print("Exports written; no rounds timed (--rounds 0).")
        return 0
    table = _table(results, args)
    print("\n" + table)
    if not args.no_write:
        compare.write_results_section(BEGIN, END, "Deployment runtimes (CPU)", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
