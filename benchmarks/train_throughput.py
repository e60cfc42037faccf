"""Training throughput: one optimizer step of keras_coat against timm's, on this machine.

    python benchmarks/train_throughput.py                 # CoaT-Lite Tiny, 224x224, batch 16
    python benchmarks/train_throughput.py --model coat_lite_small --batch-size 32

The step is what `training.train` runs, minus the input pipeline: forward, cross-entropy,
backward and an AdamW update (weight decay 0.05, stochastic depth 0.1), on one fixed in-memory
batch of normalized fp32 images. keras_coat runs `train_on_batch` as a TensorFlow graph without
XLA (Keras' default on CPUs); timm runs the same step in PyTorch (`model.train()`,
`torch.optim.AdamW`). Reported: images per second of the median of `--repeats` timed steps after
`--warmup` untimed ones, each framework in its own process. The table is printed and written
between markers into benchmarks/RESULTS.md (the "Training throughput" section only).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

from throughput import _cpu_name, _time, write_results_section

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
BEGIN, END = "<!-- training-throughput:begin -->", "<!-- training-throughput:end -->"
CLASSES = 1000
DROP_PATH = 0.1
LR, WEIGHT_DECAY = 5e-4, 0.05


def _keras_step(model_name, batch, size):
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_coat

    keras.utils.set_random_seed(0)
    model = keras_coat.create_model(
        model_name, input_shape=(size, size, 3), include_preprocessing=False,
        classifier_activation=None, drop_path_rate=DROP_PATH,
    )  # fmt: skip
    optimizer = keras.optimizers.AdamW(LR, weight_decay=WEIGHT_DECAY, epsilon=1e-8)
    optimizer.exclude_from_weight_decay(var_names=["cls_token", "gamma", "beta", "bias"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    rng = np.random.RandomState(0)
    images = tf.constant(rng.standard_normal((batch, size, size, 3)).astype("float32"))
    labels = tf.constant(rng.randint(0, CLASSES, batch))
    return lambda: model.train_on_batch(images, labels)


def _timm_step(model_name, batch, size):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=size, drop_path_rate=DROP_PATH)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "cls_token" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0}],
        lr=LR, eps=1e-8,
    )  # fmt: skip
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, CLASSES, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def worker(args):
    """Times one framework's step and prints the result as JSON (runs in a subprocess)."""
    if args.framework == "timm":
        import timm  # noqa: F401  (timm before TensorFlow: they clash in the other order)

        step = _timm_step(args.model, args.batch_size, args.size)
        threads = __import__("torch").get_num_threads()
    else:
        step = _keras_step(args.model, args.batch_size, args.size)
        threads = os.cpu_count()
    median, best = _time(step, args.warmup, args.repeats)
    print(json.dumps({
        "framework": args.framework, "median_s": median, "best_s": best,
        "images_per_s": args.batch_size / median, "threads": threads,
    }))  # fmt: skip


def _run_worker(framework, args):
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", "--framework", framework,
        "--model", args.model, "--batch-size", str(args.batch_size), "--size", str(args.size),
        "--warmup", str(args.warmup), "--repeats", str(args.repeats),
    ]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{framework} training step failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(keras_row, timm_row, args):
    ratio = keras_row["images_per_s"] / timm_row["images_per_s"]
    return "\n".join([
        f"Measured {datetime.date.today().isoformat()} on {_cpu_name()}, {os.cpu_count()} cores: "
        f"{args.model}, {args.size}x{args.size}, batch {args.batch_size}, fp32, one AdamW step "
        f"(forward, cross-entropy, backward, update; drop path {DROP_PATH}) on a fixed in-memory "
        f"batch, median of {args.repeats} steps after {args.warmup} warm-up steps, each "
        "framework in its own process.",
        "",
        "| framework | step time (median) | img/s | relative |",
        "|---|---|---|---|",
        f"| keras_coat (TF graph, no XLA) | {keras_row['median_s']:.3f} s | "
        f"{keras_row['images_per_s']:.2f} | {ratio:.2f}x |",
        f"| timm (PyTorch eager) | {timm_row['median_s']:.3f} s | "
        f"{timm_row['images_per_s']:.2f} | 1.00x |",
    ])  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="coat_lite_tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework", choices=["keras_coat", "timm"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    keras_row = _run_worker("keras_coat", args)
    timm_row = _run_worker("timm", args)
    table = _table(keras_row, timm_row, args)
    print(table)
    if not args.no_write:
        write_results_section(BEGIN, END, "Training throughput (CPU)", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
