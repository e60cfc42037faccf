"""Inference throughput and peak memory: keras_coat against timm, on this machine, in one run.

    python benchmarks/throughput.py                       # CoaT-Lite Small, batch 1 and 8
    python benchmarks/throughput.py --models coat_lite_tiny coat_tiny --batch-sizes 8

Each (framework, model, batch) runs in its own subprocess, so the peak resident memory reported
is that of one framework with one model, and neither framework's threads compete with the
other's. fp32, 224x224, random weights (throughput does not depend on their values): the median
of `--repeats` timed forward passes after `--warmup` untimed ones, in `--rounds` alternating
keras_coat/timm process pairs whose medians are reported. keras_coat runs as a
TensorFlow graph (`tf.function`, no XLA: on CPUs graph mode is the faster one), or jit-compiled
on the JAX backend with `--keras-backend jax`; timm runs in `torch.inference_mode()`.
The table is printed and written between markers into benchmarks/RESULTS.md.
"""

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
BEGIN, END = "<!-- inference-throughput:begin -->", "<!-- inference-throughput:end -->"


def _peak_rss_mib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measure_keras(model_name, batch, size, warmup, repeats, backend):
    import numpy as np

    import keras_coat

    # Normalized inputs, like timm: both sides do the same work.
    model = keras_coat.create_model(
        model_name, input_shape=(size, size, 3), include_preprocessing=False
    )
    images = (np.random.RandomState(0).rand(batch, size, size, 3) * 255).astype("float32")
    if backend == "tensorflow":
        import tensorflow as tf

        forward = tf.function(lambda x: model(x, training=False), jit_compile=False)
        images = tf.constant(images)

        def run():
            return forward(images).numpy()
    else:
        import jax

        forward = jax.jit(
            lambda trainable, non_trainable, x: model.stateless_call(
                trainable, non_trainable, x, training=False
            )[0]
        )
        # Non-trainable state (the stochastic-depth seed generators) is passed too.
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        images = jax.device_put(images)

        def run():
            return np.asarray(forward(trainable, non_trainable, images))

    return _time(run, warmup, repeats)


def _measure_timm(model_name, batch, size, warmup, repeats):
    import timm
    import torch

    model = timm.create_model(model_name, pretrained=False, img_size=size).eval()
    images = torch.rand(batch, 3, size, size)

    def run():
        with torch.inference_mode():
            return model(images)

    return _time(run, warmup, repeats)


def _time(run, warmup, repeats):
    import time

    import numpy as np

    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds)), float(np.min(seconds))


def worker(args):
    """Runs one measurement and prints it as JSON (called in a subprocess)."""
    if args.framework == "timm":
        import timm  # noqa: F401  (timm before TensorFlow: they clash in the other order)

        median, best = _measure_timm(args.model, args.batch, args.size, args.warmup, args.repeats)
        threads = __import__("torch").get_num_threads()
    else:
        median, best = _measure_keras(
            args.model, args.batch, args.size, args.warmup, args.repeats, args.keras_backend
        )
        threads = os.cpu_count()
    print(json.dumps({
        "framework": args.framework, "model": args.model, "batch": args.batch,
        "median_s": median, "best_s": best, "images_per_s": args.batch / median,
        "peak_rss_mib": _peak_rss_mib(), "threads": threads,
    }))


def _run_worker(framework, model, batch, args):
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", "--framework", framework,
        "--model", model, "--batch", str(batch), "--size", str(args.size),
        "--warmup", str(args.warmup), "--repeats", str(args.repeats),
        "--keras-backend", args.keras_backend,
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND=args.keras_backend)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{framework} {model} batch {batch} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _table(rows, args):
    keras_label = "keras_coat (TF graph)" if args.keras_backend == "tensorflow" else \
        "keras_coat (JAX jit)"
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {_cpu_name()}, {os.cpu_count()} cores, "
        f"fp32, {args.size}x{args.size}. Each cell: the median over {args.rounds} rounds, a round "
        f"being one keras_coat process then one timm process, each timing {args.repeats} runs "
        f"after {args.warmup} warm-up runs (median). The speed-up is the ratio of those medians; "
        "the range beside it is the lowest and highest ratio of a single round.",
        "",
        f"| model | batch | {keras_label} img/s | timm img/s | speed-up (round range) | "
        "keras_coat peak RSS MiB | timm peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, batch, keras_runs, timm_runs in rows:
        keras_rate = statistics.median(run["images_per_s"] for run in keras_runs)
        timm_rate = statistics.median(run["images_per_s"] for run in timm_runs)
        ratios = [k["images_per_s"] / t["images_per_s"] for k, t in zip(keras_runs, timm_runs)]
        lines.append(
            f"| {model} | {batch} | {keras_rate:.2f} | {timm_rate:.2f} | "
            f"{keras_rate / timm_rate:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{max(run['peak_rss_mib'] for run in keras_runs):.0f} | "
            f"{max(run['peak_rss_mib'] for run in timm_runs):.0f} |"
        )
    return "\n".join(lines)


def write_results_section(begin, end, title, table):
    """Replaces (or appends) the section between `begin` and `end` in RESULTS.md, atomically;
    other sections of the file are left as they are."""
    section = f"{begin}\n## {title}\n\n{table}\n{end}"
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    if begin in text and end in text:
        pattern = re.escape(begin) + ".*?" + re.escape(end)
        text = re.sub(pattern, lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    temporary = f"{RESULTS}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, RESULTS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["coat_lite_small"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating keras_coat/timm process pairs per cell (median taken)")
    parser.add_argument("--keras-backend", choices=["tensorflow", "jax"], default="tensorflow")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework", choices=["keras_coat", "timm"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    rows = []
    for model in args.models:
        for batch in args.batch_sizes:
            # Alternating rounds: on a shared machine the speed drifts by several percent over
            # minutes, and a single pair of runs can land on either side of a drift.
            keras_runs, timm_runs = [], []
            for round_index in range(args.rounds):
                keras_runs.append(_run_worker("keras_coat", model, batch, args))
                timm_runs.append(_run_worker("timm", model, batch, args))
                print(f"{model} batch {batch} round {round_index + 1}: keras_coat "
                      f"{keras_runs[-1]['images_per_s']:.2f} img/s "
                      f"({keras_runs[-1]['peak_rss_mib']:.0f} MiB), timm "
                      f"{timm_runs[-1]['images_per_s']:.2f} img/s "
                      f"({timm_runs[-1]['peak_rss_mib']:.0f} MiB)", flush=True)
            rows.append((model, batch, keras_runs, timm_runs))
    table = _table(rows, args)
    print("\n" + table)
    if not args.no_write:
        write_results_section(BEGIN, END, "Inference throughput (CPU)", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
