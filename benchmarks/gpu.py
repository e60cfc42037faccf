"""GPU throughput: keras_coat on JAX against timm (eager and torch.compile) on one card.

    python benchmarks/gpu.py --out gpu.json            # measure on this machine's GPU
    python benchmarks/gpu.py --report gpu.json --write # print the table, write RESULTS.md
    python benchmarks/gpu.py --quick --out quick.json  # tiny smoke run (CPU is fine)

Measured per model, task (inference; training step), precision and batch size:

- keras_coat on JAX: `model.stateless_call` under `jax.jit`; the training step (forward,
  cross-entropy, gradients, AdamW update) is one jitted function with donated state.
- timm eager and timm under `torch.compile` (default mode, fixed shapes, one compile per
  configuration; a compile that fails is reported as such and the run goes on).
- fp32 (float32 with TF32 matmuls, set on both sides: `jax_default_matmul_precision` and
  `torch.set_float32_matmul_precision("high")`) and bf16 (Keras "mixed_bfloat16",
  `torch.autocast(dtype=torch.bfloat16)`: fp32 weights, bf16 compute, on both sides).

Random weights and one fixed in-memory batch of normalized 224x224 images (throughput does not
depend on their values). Each figure: after the first call (reported as the compile time) and
warm-up calls, `--rounds` rounds of about `--round-s` seconds each, the device synchronized at the
end of each round (`block_until_ready`, `torch.cuda.synchronize`); the median round is reported.
JAX and PyTorch run in separate processes, one after the other, so they never share the card.
The run keeps to `--budget-s`: configurations are measured in priority order (first model,
largest batch, bf16 first), and those the time does not reach are listed as not measured.
Results stream into a JSON-lines file as they come, so a run cut short keeps what it measured.
Compiles dominate the time: on an H200, XLA took about 30 s per inference and 130 s per training
configuration of CoaT-Lite Small, inductor about 35 s and 75 s; the defaults (two models, two
batch sizes each) should take roughly 40 minutes, by those compile times.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time

CLASSES = 1000
DROP_PATH = 0.1
LR, WEIGHT_DECAY = 5e-4, 0.05
FRAMEWORKS = ("keras_jax", "timm_eager", "timm_compile")
BEGIN, END = "<!-- gpu-throughput:begin -->", "<!-- gpu-throughput:end -->"


def configurations(models, inference_batches, training_batches):
    """Every (model, task, precision, batch), most wanted first: the first model's largest
    batches in bf16 then fp32, then the smaller batches, then the next model."""
    configs = []
    for model in models:
        for rank in range(max(len(inference_batches), len(training_batches))):
            for precision in ("bf16", "fp32"):
                for task, batches in (("inference", inference_batches),
                                      ("training", training_batches)):
                    ordered = sorted(batches, reverse=True)
                    if rank < len(ordered):
                        configs.append({"model": model, "task": task, "precision": precision,
                                        "batch": ordered[rank]})
    return configs


def _measure(run, sync, rounds, round_s, warmup):
    """(median, best) seconds per call and the first call's seconds (compile included)."""
    start = time.perf_counter()
    sync(run())
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(warmup):
        sync(run())
    per_call = (time.perf_counter() - start) / max(warmup, 1)
    calls = max(3, min(200, math.ceil(round_s / max(per_call, 1e-6))))
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            out = run()
        sync(out)
        seconds.append((time.perf_counter() - start) / calls)
    return statistics.median(seconds), min(seconds), first_s, calls


# --- keras_coat on JAX ---------------------------------------------------------------------------


def _jax_meta():
    import jax
    import keras

    device = jax.devices()[0]
    return {"jax": jax.__version__, "keras": keras.__version__,
            "jax_device": f"{device.platform}: {device.device_kind}"}


def _jax_run(config, size):
    import jax
    import keras
    import numpy as np

    import keras_coat

    # TF32 for float32 matmuls and convolutions, the same setting the timm side gets (bf16
    # operands are not affected).
    jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    keras.mixed_precision.set_dtype_policy(
        "mixed_bfloat16" if config["precision"] == "bf16" else "float32")
    keras.utils.set_random_seed(0)
    training = config["task"] == "training"
    model = keras_coat.create_model(
        config["model"], input_shape=(size, size, 3), include_preprocessing=False,
        classifier_activation=None, drop_path_rate=DROP_PATH if training else 0.0,
    )
    rng = np.random.RandomState(0)
    images = jax.device_put(rng.standard_normal((config["batch"], size, size, 3)).astype("float32"))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    if not training:
        forward = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
        return lambda: forward(trainable, non_trainable, images), jax.block_until_ready

    labels = jax.device_put(rng.randint(0, CLASSES, config["batch"]).astype("int32"))
    optimizer = keras.optimizers.AdamW(LR, weight_decay=WEIGHT_DECAY, epsilon=1e-8)
    optimizer.build(model.trainable_variables)

    def loss_fn(tv, ntv, x, y):
        logits, ntv = model.stateless_call(tv, ntv, x, training=True)
        losses = keras.losses.sparse_categorical_crossentropy(
            y, keras.ops.cast(logits, "float32"), from_logits=True)
        return keras.ops.mean(losses), ntv

    gradients = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(tv, ntv, ov, x, y):
        (loss, ntv), grads = gradients(tv, ntv, x, y)
        tv, ov = optimizer.stateless_apply(ov, grads, tv)
        return loss, tv, ntv, ov

    step = jax.jit(train_step, donate_argnums=(0, 1, 2))
    state = [trainable, non_trainable, [v.value for v in optimizer.variables]]

    def run():
        loss, *state[:] = step(*state, images, labels)  # donated buffers replaced by new ones
        return loss

    return run, jax.block_until_ready


# --- timm on PyTorch -----------------------------------------------------------------------------


def _torch_meta():
    import timm
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    return {"torch": torch.__version__, "timm": timm.__version__, "torch_device": gpu,
            "cuda": torch.version.cuda}


def _torch_run(config, size, compiled, compile_backend):
    import timm
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # TF32 for float32 matmuls, as on the JAX side (convolutions: default)
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    training = config["task"] == "training"
    model = timm.create_model(config["model"], pretrained=False, img_size=size,
                              drop_path_rate=DROP_PATH if training else 0.0).to(device)
    model.train(training)
    forward = torch.compile(model, backend=compile_backend) if compiled else model
    images = torch.randn(config["batch"], 3, size, size, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16,
                              enabled=config["precision"] == "bf16")

    def sync(_):
        if device == "cuda":
            torch.cuda.synchronize()

    if not training:
        def infer():
            with torch.no_grad(), autocast:
                return forward(images)

        return infer, sync

    labels = torch.randint(0, CLASSES, (config["batch"],), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                                  eps=1e-8, fused=device == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step, sync


# --- processes -----------------------------------------------------------------------------------


def _measure_one(framework, config, args):
    """One configuration's figures, or the error that stopped it, as a JSON-ready dict."""
    row = dict(config, framework=framework, size=args.size)
    if time.time() > args.deadline:
        return dict(row, error="not measured: time budget spent")
    try:
        if framework == "keras_jax":
            run, sync = _jax_run(config, args.size)
        else:
            run, sync = _torch_run(config, args.size, framework == "timm_compile",
                                   args.compile_backend)
        median, best, first, calls = _measure(run, sync, args.rounds, args.round_s, args.warmup)
    except Exception as error:  # reported, and the next configuration runs
        return dict(row, error=f"{type(error).__name__}: {str(error)[:400]}")
    finally:
        run = sync = None  # frees the model and its buffers before the next one
        if framework != "keras_jax":
            import torch

            torch._dynamo.reset()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return dict(row, median_s=median, best_s=best, first_call_s=first, calls_per_round=calls,
                images_per_s=config["batch"] / median)


def worker(args):
    """Measures `args.configs` for one runtime (jax or torch), appending JSON lines to
    `args.results`; starts no measurement once `args.deadline` (epoch seconds) has passed."""
    configs = json.loads(args.configs)
    if args.runtime == "torch":
        frameworks, meta = ("timm_eager", "timm_compile"), _torch_meta()
    else:
        frameworks, meta = ("keras_jax",), _jax_meta()
    models = list(dict.fromkeys(config["model"] for config in configs))
    # Per model: eager runs first (cheap), then the compiled ones, each in priority order.
    order = [(f, c) for m in models for f in frameworks for c in configs if c["model"] == m]
    with open(args.results, "a") as results:
        results.write(json.dumps({"meta": meta}) + "\n")
        results.flush()
        for framework, config in order:
            row = _measure_one(framework, config, args)
            results.write(json.dumps(row) + "\n")
            results.flush()
            status = (f"{row['images_per_s']:.1f} img/s (first call {row['first_call_s']:.1f} s)"
                      if "images_per_s" in row else row["error"])
            print(f"{framework} {config['model']} {config['task']} {config['precision']} "
                  f"batch {config['batch']}: {status}", flush=True)
    return 0


def _run_worker(runtime, configs, deadline, kill_at, results_path, args):
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", runtime,
        "--configs", json.dumps(configs), "--deadline", str(deadline), "--results", results_path,
        "--size", str(args.size), "--rounds", str(args.rounds), "--round-s", str(args.round_s),
        "--warmup", str(args.warmup), "--compile-backend", args.compile_backend,
    ]
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2")
    try:
        code = subprocess.run(command, env=env, timeout=max(1.0, kill_at - time.time())).returncode
    except subprocess.TimeoutExpired:
        code = "killed at the time limit"
    if code:
        print(f"{runtime} worker ended with {code}", flush=True)
    return code


def _read_results(path):
    meta, rows = {}, []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "meta" in record:
                meta.update(record["meta"])
            else:
                rows.append(record)
    return meta, rows


def measure(args):
    if args.quick:
        args.models, args.inference_batches, args.training_batches = ["coat_lite_tiny"], [2], [2]
        args.size, args.rounds, args.round_s, args.warmup = 64, 2, 0.1, 1
        # Traces and differentiates the graph as inductor would, without its long CPU build.
        args.compile_backend = args.compile_backend or "aot_eager"
    args.compile_backend = args.compile_backend or "inductor"
    configs = configurations(args.models, args.inference_batches, args.training_batches)
    start = time.time()
    end = start + args.budget_s
    results_path = f"{args.out}.jsonl"
    if os.path.exists(results_path):
        os.remove(results_path)
    worker_codes = {}
    # JAX first with its share of the budget; timm then gets whatever is left.
    jax_deadline = start + args.jax_share * args.budget_s
    worker_codes["jax"] = _run_worker("jax", configs, jax_deadline, jax_deadline + args.grace_s,
                                      results_path, args)
    worker_codes["torch"] = _run_worker("torch", configs, end, end + args.grace_s,
                                        results_path, args)
    meta, rows = _read_results(results_path) if os.path.exists(results_path) else ({}, [])
    measured = {(r["framework"], r["model"], r["task"], r["precision"], r["batch"]) for r in rows}
    for config in configs:  # what a killed worker never reached
        for framework in FRAMEWORKS:
            if (framework, config["model"], config["task"], config["precision"],
                    config["batch"]) not in measured:
                rows.append(dict(config, framework=framework, size=args.size,
                                 error="not measured: worker stopped before it"))
    meta.update(
        date=datetime.date.today().isoformat(), host=platform.node(), size=args.size,
        rounds=args.rounds, round_s=args.round_s, warmup=args.warmup, wall_s=time.time() - start,
        budget_s=args.budget_s, worker_exit={k: str(v) for k, v in worker_codes.items()},
        compile_backend=args.compile_backend, quick=args.quick,
    )
    document = {"meta": meta, "results": rows}
    temporary = f"{args.out}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(document, f, indent=1)
    os.replace(temporary, args.out)
    print("\n" + render(merge_runs([document])), flush=True)
    return 0


# --- report --------------------------------------------------------------------------------------


def _rate(row):
    return f"{row['images_per_s']:.0f}" if row and "images_per_s" in row else "n/a"


def _ratio(keras_row, timm_row):
    if keras_row and timm_row and "images_per_s" in keras_row and "images_per_s" in timm_row:
        return f"{keras_row['images_per_s'] / timm_row['images_per_s']:.2f}x"
    return "n/a"


def _first_call(row):
    return f"{row['first_call_s']:.0f}" if row and "first_call_s" in row else "n/a"


def merge_runs(documents):
    """One document from several runs on the same machine (a run cut short, then one for what it
    missed): a measured figure replaces an unmeasured one, and a later run's an earlier's."""
    meta, rows = {}, {}
    for document in documents:
        for name, value in document["meta"].items():
            meta.setdefault(name, value)
        for row in document["results"]:
            key = (row["framework"], row["model"], row["task"], row["precision"], row["batch"])
            if key not in rows or "images_per_s" in row or "images_per_s" not in rows[key]:
                rows[key] = row
    meta["runs"] = len(documents)
    return {"meta": meta, "results": list(rows.values())}


def render(document):
    """A markdown table of the img/s figures, keras_coat's ratio to each timm mode and the first
    calls' seconds (compile included), with the failures and the unmeasured cells under it."""
    meta, rows = document["meta"], document["results"]
    by_key = {(r["framework"], r["model"], r["task"], r["precision"], r["batch"]): r for r in rows}
    all_cells = {(r["model"], r["task"], r["precision"], r["batch"]) for r in rows}
    measured = {c for c in all_cells
                if any("images_per_s" in by_key.get((f, *c), {}) for f in FRAMEWORKS)}
    lines = [
        f"Measured {meta.get('date', '?')} on {meta.get('torch_device', '?')} (JAX sees "
        f"{meta.get('jax_device', '?')}): jax {meta.get('jax', '?')}, keras "
        f"{meta.get('keras', '?')}, torch {meta.get('torch', '?')} (CUDA "
        f"{meta.get('cuda', '?')}), timm "
        f"{meta.get('timm', '?')}. {meta.get('size', '?')}x{meta.get('size', '?')} images, random "
        "weights, one fixed batch on the device. Inference: forward pass. Training: one AdamW "
        f"step (forward, cross-entropy, backward, update; drop path {DROP_PATH}). keras_coat: "
        "JAX backend, `jax.jit` of `stateless_call` (the whole training step jitted); timm: eager, "
        "and `torch.compile` (inductor, default mode) of the model with a fused AdamW. fp32: "
        "float32 with TF32 matmuls on both sides; bf16: float32 weights, bfloat16 compute (Keras "
        "`mixed_bfloat16`, `torch.autocast`). Each figure: median of "
        f"{meta.get('rounds', '?')} rounds of about {meta.get('round_s', '?')} s after "
        f"{meta.get('warmup', '?')} warm-up calls; first call = compile plus one call."
        + (f" Figures from {meta['runs']} runs on the same machine, one after the other."
           if meta.get("runs", 1) > 1 else ""),
        "",
        "| model | task | precision | batch | keras_coat JAX img/s | timm eager img/s | "
        "timm compile img/s | JAX / eager | JAX / compile | first call s (JAX / compile) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines[0] = textwrap.fill(lines[0], width=100, break_on_hyphens=False)
    for model, task, precision, batch in sorted(
            measured, key=lambda c: (c[0], c[1], c[2] != "bf16", -c[3])):
        keras_row, eager, compiled = (by_key.get((f, model, task, precision, batch))
                                      for f in FRAMEWORKS)
        lines.append(
            f"| {model} | {task} | {precision} | {batch} | {_rate(keras_row)} | {_rate(eager)} | "
            f"{_rate(compiled)} | {_ratio(keras_row, eager)} | {_ratio(keras_row, compiled)} | "
            f"{_first_call(keras_row)} / {_first_call(compiled)} |")
    lines.append("")
    for r in rows:
        if "error" in r and not r["error"].startswith("not measured"):
            lines.append(f"- Failed: {r['framework']} {r['model']} {r['task']} {r['precision']} "
                         f"batch {r['batch']}: {r['error']}")
    unmeasured = [r for r in rows if "images_per_s" not in r and "error" in r
                  and r["error"].startswith("not measured")]
    if unmeasured:
        lines.append("- n/a: not measured within the run's time budget.")
    unreached = sorted({c[0] for c in all_cells} - {c[0] for c in measured})
    if unreached:
        lines.append(f"- Not reached at all: {', '.join(unreached)}.")
    return "\n".join(lines).rstrip("\n")


def report(paths, write):
    """Prints the table of finished runs (merged); with `write`, puts it into RESULTS.md."""
    documents = []
    for path in paths:
        with open(path) as f:
            documents.append(json.load(f))
    document = merge_runs(documents)
    table = render(document)
    print(table)
    if write:
        from compare import write_results_section

        meta = document["meta"]
        title = f"GPU throughput ({meta.get('torch_device', 'GPU')})"
        write_results_section(BEGIN, END, title, table)
    return document


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file the results are written to (measure mode)")
    parser.add_argument("--report", metavar="JSON", nargs="+",
                        help="print the table of finished runs (several: merged, later wins)")
    parser.add_argument("--write", action="store_true",
                        help="with --report: also write them into benchmarks/RESULTS.md")
    parser.add_argument("--quick", action="store_true",
                        help="coat_lite_tiny, 64x64, batch 2, short rounds: a smoke run")
    parser.add_argument("--models", nargs="+", default=["coat_lite_small", "coat_tiny"])
    parser.add_argument("--inference-batches", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--training-batches", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-s", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=3000.0,
                        help="no measurement starts after this many seconds")
    parser.add_argument("--jax-share", type=float, default=0.55,
                        help="fraction of the budget JAX may use before timm starts")
    parser.add_argument("--grace-s", type=float, default=60.0,
                        help="a worker still running this long after its deadline is killed")
    parser.add_argument("--compile-backend",
                        help="torch.compile backend (default inductor; aot_eager with --quick)")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS,
                        dest="runtime")
    parser.add_argument("--configs", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runtime:
        return worker(args)
    if args.report:
        report(args.report, args.write)
        return 0
    if not args.out:
        parser.error("give --out FILE to measure, or --report FILE to print a finished run")
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
