"""Training with `model.fit`: images/s and peak memory on JAX and TensorFlow, beside timm.

    python benchmarks/train_memory.py                      # the demo recipe, then CoaT-Lite Small
    python benchmarks/train_memory.py --configs demo --rounds 5 --no-write

What runs is the demo recipe's training step as `python -m training.train` builds it
(`training.train.build_model` and `compile_model`: CoaT with its preprocessing and softmax head,
AdamW on the recipe's warm-up + cosine schedule with its weight-decay exclusions, categorical
cross-entropy with label smoothing, the accuracy metrics), driven by `model.fit` on in-memory
batches, once with `KERAS_BACKEND=tensorflow` (a TensorFlow graph, no XLA: Keras' choice on CPUs)
and once with `KERAS_BACKEND=jax` (XLA, Keras' choice on JAX). Beside them timm's training step
on the same architecture, batch, optimizer (AdamW, the same exclusions) and loss: the usual eager
loop. The input pipeline is left out (it has its own benchmark, `input_pipeline.py`), so the
figures are those of the step itself.

Configurations: `demo` is the demo recipe as it is (CoaT-Lite Tiny, 32x32, batch 64, 10 classes);
`coat_lite_small` is the same recipe with CoaT-Lite Small at 224x224, batch 16, 1000 classes.

Each measurement runs in a fresh subprocess, and rounds alternate between the three (on a shared
machine the speed drifts over minutes); reported are medians over rounds and their ratios. Each
process also records its resident memory after each phase (imports, model built, compiled,
first step, which traces or compiles the step, and the timed steps), so the table shows where the
memory goes. The tables are printed and written between markers into benchmarks/RESULTS.md.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # throughput.py's helpers; the training package
from throughput import _cpu_name, write_results_section  # noqa: E402

BEGIN, END = "<!-- training-memory:begin -->", "<!-- training-memory:end -->"
FRAMEWORKS = ("keras_jax", "keras_tensorflow", "timm")
LABELS = {
    "keras_jax": "keras_coat `fit`, JAX (XLA)",
    "keras_tensorflow": "keras_coat `fit`, TensorFlow (graph)",
    "timm": "timm (PyTorch eager loop)",
}
# Recipe fields each configuration changes in the demo recipe, its number of classes, and its
# default rounds and timed steps (CoaT-Lite Small's step takes seconds on 2 cores: one round, and
# its memory, the point of that configuration, hardly varies between rounds).
CONFIGS = {
    "demo": {"changes": {}, "classes": 10, "rounds": 3, "steps": 10},
    "coat_lite_small": {
        "changes": {"model": "coat_lite_small", "image_size": 224, "batch_size": 16},
        "classes": 1000, "rounds": 1, "steps": 3,
    },
}
PHASES = ("import", "build", "compile", "first_step", "steady")
PHASE_LABELS = {
    "import": "imports",
    "build": "model built",
    "compile": "optimizer, loss (compiled)",
    "first_step": "first step (trace / XLA compile)",
    "steady": "after the timed steps",
}


def _memory_mib():
    """(current, peak) resident memory of this process in MiB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024.0
    return values["VmRSS"], values["VmHWM"]


class _Phases:
    """Resident memory after each phase (and the process' peak so far), and the phase's time."""

    def __init__(self):
        self.rows = {}
        self.started = time.perf_counter()

    def mark(self, phase):
        now = time.perf_counter()
        rss, peak = _memory_mib()
        self.rows[phase] = {"rss_mib": rss, "peak_mib": peak, "seconds": now - self.started}
        self.started = now


def _recipe(config_name, model_config):
    from training import recipes

    config = CONFIGS[config_name]
    changes = dict(config["changes"])
    if model_config is not None:
        changes["model"] = "custom"
    return recipes.override(recipes.get_recipe("demo"), changes), config["classes"]


def _keras_worker(args, phases):
    import keras
    import numpy as np

    from training import train

    phases.mark("import")
    recipe, classes = _recipe(args.config, args.model_config)
    keras.utils.set_random_seed(0)
    model = train.build_model(recipe, classes, args.model_config)
    phases.mark("build")
    steps = args.warmup + args.steps
    train.compile_model(model, recipe, steps)
    phases.mark("compile")

    rng = np.random.RandomState(0)
    size = recipe.image_size
    # Pixels in [0, 255] (the model normalizes them) and one-hot labels, as the trainer feeds.
    images = (rng.rand(steps * recipe.batch_size, size, size, 3) * 255).astype("float32")
    labels = np.eye(classes, dtype="float32")[rng.randint(0, classes, len(images))]
    ends = []

    class StepClock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # waits for the step (JAX dispatches asynchronously)
            ends.append(time.perf_counter())
            if batch == 0:
                phases.mark("first_step")

    started = time.perf_counter()
    model.fit(
        images, labels, batch_size=recipe.batch_size, epochs=1, shuffle=False, verbose=0,
        callbacks=[StepClock()],
    )  # fmt: skip
    phases.mark("steady")
    seconds = [b - a for a, b in zip([started] + ends, ends)]
    return seconds[args.warmup :]


def _timm_worker(args, phases):
    import timm
    import torch

    phases.mark("import")
    torch.manual_seed(0)
    recipe, classes = _recipe(args.config, args.model_config)
    kwargs = {"img_size": recipe.image_size, "num_classes": classes}
    kwargs["drop_path_rate"] = recipe.drop_path
    if args.model_config is not None:
        # keras_coat.CoaT's default patch size (timm's class defaults to 16).
        model = timm.models.coat.CoaT(**{"patch_size": 4, **args.model_config}, **kwargs)
    else:
        model = timm.create_model(recipe.model, pretrained=False, **kwargs)
    model.train()
    phases.mark("build")
    # The recipe's AdamW: no weight decay on class tokens, norms and biases (timm's own rule).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "cls_token" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.peak_lr, eps=recipe.adam_epsilon,
    )  # fmt: skip
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    phases.mark("compile")

    rng = torch.Generator().manual_seed(0)
    size, batch = recipe.image_size, recipe.batch_size
    seconds = []
    for step in range(args.warmup + args.steps):
        # timm's loop receives normalized images; drawing them is outside the timed step.
        images = torch.randn(batch, 3, size, size, generator=rng)
        labels = torch.randint(0, classes, (batch,), generator=rng)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        loss.item()
        seconds.append(time.perf_counter() - start)
        if step == 0:
            phases.mark("first_step")
    phases.mark("steady")
    return seconds[args.warmup :]


def worker(args):
    """One framework, one configuration: prints its figures as JSON (runs in a subprocess)."""
    phases = _Phases()
    if args.framework == "timm":
        step_seconds = _timm_worker(args, phases)
    else:
        step_seconds = _keras_worker(args, phases)
    recipe, _ = _recipe(args.config, args.model_config)
    median = statistics.median(step_seconds)
    print(json.dumps({
        "framework": args.framework, "config": args.config, "median_s": median,
        "images_per_s": recipe.batch_size / median, "step_seconds": step_seconds,
        "phases": phases.rows,
        "peak_rss_mib": phases.rows["steady"]["peak_mib"],
    }))  # fmt: skip
    return 0


def _run_worker(framework, config, args):
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", "--framework", framework,
        "--config", config, "--warmup", str(args.warmup), "--steps", str(args.steps),
    ]  # fmt: skip
    if args.model_config is not None:
        command += ["--model-config", json.dumps(args.model_config)]
    backend = "jax" if framework == "keras_jax" else "tensorflow"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND=backend)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{framework} {config} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _versions():
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("keras", "tensorflow", "jax", "torch", "timm"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def _median_run(runs):
    """The run whose step time is the median one (its phases are shown)."""
    ordered = sorted(runs, key=lambda run: run["median_s"])
    return ordered[(len(ordered) - 1) // 2]


def _table(results, args):
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {_cpu_name()}, {os.cpu_count()} cores "
        f"({_versions()}). fp32, random weights, in-memory batches. Each figure: the median over "
        "rounds; in a round each framework runs in its own fresh process (JAX, TensorFlow, timm, "
        f"one after the other) and times its steps after {args.warmup} warm-up step(s) (median). "
        "In brackets: the lowest and highest ratio of a single round. Peak memory: the process' "
        "peak resident set (VmHWM), largest over rounds.",
    ]
    for config, runs in results.items():
        recipe, classes = _recipe(config, args.model_config)
        steps = len(runs["timm"][0]["step_seconds"])
        lines += [
            "",
            f"**{config}**: {recipe.model}, {recipe.image_size}x{recipe.image_size}, batch "
            f"{recipe.batch_size}, {classes} classes; {len(runs['timm'])} round(s) of {steps} "
            "timed steps.",
            "",
            "| framework | img/s | vs timm | peak memory MiB | vs timm |",
            "|---|---|---|---|---|",
        ]
        timm_rate = statistics.median(run["images_per_s"] for run in runs["timm"])
        timm_peak = max(run["peak_rss_mib"] for run in runs["timm"])
        for framework in FRAMEWORKS:
            rate = statistics.median(run["images_per_s"] for run in runs[framework])
            peak = max(run["peak_rss_mib"] for run in runs[framework])
            ratios = [
                run["images_per_s"] / other["images_per_s"]
                for run, other in zip(runs[framework], runs["timm"])
            ]
            spread = "" if framework == "timm" else f" ({min(ratios):.2f}-{max(ratios):.2f})"
            lines.append(
                f"| {LABELS[framework]} | {rate:.2f} | {rate / timm_rate:.2f}x{spread} | "
                f"{peak:.0f} | {peak / timm_peak:.2f}x |"
            )
        lines += [
            "",
            "Resident memory MiB after each phase (peak so far in brackets; the round with the "
            "median step time):",
            "",
            "| phase | " + " | ".join(LABELS[f] for f in FRAMEWORKS) + " |",
            "|---|" + "---|" * len(FRAMEWORKS),
        ]
        shown = {framework: _median_run(runs[framework])["phases"] for framework in FRAMEWORKS}
        for phase in PHASES:
            cells = [
                f"{shown[f][phase]['rss_mib']:.0f} ({shown[f][phase]['peak_mib']:.0f}), "
                f"{shown[f][phase]['seconds']:.1f} s"
                for f in FRAMEWORKS
            ]
            lines.append(f"| {PHASE_LABELS[phase]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument(
        "--rounds", type=int, help="alternating rounds, medians taken (default: per configuration)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps, the first included")
    parser.add_argument("--steps", type=int, help="timed steps per process (default: per config)")
    parser.add_argument(
        "--model-config", type=json.loads,
        help="JSON keyword arguments of keras_coat.CoaT and timm's CoaT replacing the model "
        "(for quick checks, e.g. '{\"embed_dims\": [16, 32, 32, 32], \"serial_depths\": "
        "[1, 1, 1, 1], \"mlp_ratios\": [2, 2, 2, 2]}')",
    )  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    for name in ("rounds", "warmup", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    results = {}
    for config in args.configs:
        settings = argparse.Namespace(**vars(args))
        for name in ("rounds", "steps"):
            if getattr(settings, name) is None:
                setattr(settings, name, CONFIGS[config][name])
        results[config] = {framework: [] for framework in FRAMEWORKS}
        for round_index in range(settings.rounds):
            report = []
            for framework in FRAMEWORKS:
                run = _run_worker(framework, config, settings)
                results[config][framework].append(run)
                report.append(
                    f"{framework} {run['images_per_s']:.2f} img/s {run['peak_rss_mib']:.0f} MiB"
                )
            print(f"{config} round {round_index + 1}: " + ", ".join(report), flush=True)
    table = _table(results, args)
    print("\n" + table)
    if not args.no_write:
        write_results_section(BEGIN, END, "Training with `fit` (CPU)", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
