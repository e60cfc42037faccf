"""Training input pipeline throughput per CPU core: keras_coat's tf.data pipeline against timm's
transforms in a PyTorch DataLoader worker, on the same JPEG files, in one run.

    python benchmarks/input_pipeline.py            # 3 alternating rounds, writes RESULTS.md
    python benchmarks/input_pipeline.py --rounds 1 --no-write

Both sides run the `imagenet` recipe's training augmentation at 224x224 on a folder of generated
ImageNet-like JPEGs (500x375 and similar sizes; smooth multi-scale noise and random shapes, so
that they compress like photographs):

  * keras_coat: `training.data.train_dataset` (JPEG decode of the crop window, bicubic
    random-resized crop, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, batching,
    Mixup 0.8 / CutMix 1.0 in batch mode);
  * timm: `create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
    re_prob=0.25, interpolation="bicubic")` on a torchvision ImageFolder, batches collated and
    mixed by `timm.data.Mixup` in one DataLoader worker.

Each side runs in its own process pinned to the same single CPU core, and its rate is images per
CPU-second of its processes (the DataLoader's worker included): that is the rate per core, and
it does not depend on how busy the other cores are. Rounds alternate keras_coat and timm
processes; the table reports medians. The last line reads
`input pipeline: keras_coat A img/s/core, timm B img/s/core, ratio R`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # throughput.py's helpers; the training package
from throughput import _cpu_name, write_results_section  # noqa: E402

BEGIN, END = "<!-- input-pipeline:begin -->", "<!-- input-pipeline:end -->"
SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (400, 500), (640, 480))
CLASSES = 10
ACCELERATORS = 8
# keras_coat's CoaT-Lite Small bf16 training step on one H200 at batch 128 (RESULTS.md, GPU
# throughput section): what each accelerator of the node consumes.
IMAGES_PER_ACCELERATOR = 2664
ACCELERATOR_NOTE = "CoaT-Lite Small's bf16 training step on an H200, see the GPU section"


def make_images(root, count, seed=0):
    """`count` JPEGs in root/train/<class>/ and two per class in root/val/<class>/."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    for index in range(count + 2 * CLASSES):
        split, label = ("train", index % CLASSES) if index < count else ("val", index % CLASSES)
        width, height = SIZES[index % len(SIZES)]
        # Smooth noise at several scales with amplitude ~ 1/frequency, like natural images.
        pixels = np.zeros((height, width, 3), np.float32)
        for octave in range(1, 9):
            cells = 2**octave
            coarse = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
            layer = Image.fromarray(((coarse + 4) * 32).clip(0, 255).astype(np.uint8))
            layer = np.asarray(layer.resize((width, height), Image.BICUBIC), np.float32) - 128
            pixels += layer * (1.2 / octave)
        pixels += rng.uniform(60, 190, 3)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(3, 9)):
            x0, y0 = rng.integers(0, width), rng.integers(0, height)
            x1, y1 = x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            else:
                draw.polygon([(x0, y0), (x1, y0 + 10), (x0 + 15, y1)], fill=colour)
        image = image.filter(ImageFilter.GaussianBlur(0.8))
        # Sensor-like grain, then JPEG at a typical ImageNet quality.
        grain = rng.normal(0, 10, (height, width, 3))
        image = Image.fromarray((np.asarray(image) + grain).clip(0, 255).astype(np.uint8))
        folder = os.path.join(root, split, f"class_{label:02d}")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{index:05d}.jpg"), quality=90)


def _pin_to_one_core():
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def _cpu_seconds(processes):
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def _measure(batches, batch_size, warmup, count, processes):
    """Images per wall second and per CPU-second of `processes` over `count` batches."""
    for _ in range(warmup):
        next(batches)
    cpu_start, wall_start = _cpu_seconds(processes()), time.perf_counter()
    for _ in range(count):
        next(batches)
    cpu, wall = _cpu_seconds(processes()) - cpu_start, time.perf_counter() - wall_start
    images = batch_size * count
    return {"images_per_s": images / wall, "images_per_cpu_s": images / cpu, "cpu_s": cpu}


def _measure_keras(root, batch_size, warmup, count):
    import psutil

    from training import data, recipes

    recipe = recipes.override(
        recipes.get_recipe("imagenet"), {"batch_size": batch_size, "warmup_epochs": 0}
    )
    source = data.load_source(f"folder:{root}", recipe.image_size)
    dataset = data.train_dataset(recipe, source, seed=0)
    batches = (tuple(t.numpy() for t in batch) for batch in dataset)
    result = _measure(batches, batch_size, warmup, count, lambda: [psutil.Process()])
    return result


def _posterize_zero_bits_as_black():
    """timm's PosterizeIncreasing at magnitude 10 (N(9, 0.5) clipped: 2% of its draws) keeps 0
    bits, which Pillow >= 11 rejects with a ValueError; older Pillow, which the reference ran,
    returned a black image. Restore that in timm's op table."""
    from PIL import Image
    from timm.data import auto_augment

    posterize = auto_augment.NAME_TO_OP["PosterizeIncreasing"]

    def posterize_any_bits(image, bits_to_keep, **kwargs):
        if bits_to_keep < 1:
            return Image.new(image.mode, image.size)
        return posterize(image, bits_to_keep, **kwargs)

    auto_augment.NAME_TO_OP["PosterizeIncreasing"] = posterize_any_bits


def _measure_timm(root, batch_size, warmup, count):
    import psutil
    import timm  # noqa: F401  (timm before anything else that imports TensorFlow)
    import torch
    import torchvision
    from timm.data import Mixup, create_transform

    torch.set_num_threads(1)
    _posterize_zero_bits_as_black()
    transform = create_transform(
        224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
        interpolation="bicubic",
    )
    dataset = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=transform)
    mixup = Mixup(
        mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode="batch", label_smoothing=0.1,
        num_classes=CLASSES,
    )

    def collate(samples):
        return mixup(*torch.utils.data.default_collate(samples))

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=1,
        collate_fn=collate, persistent_workers=True,
    )

    def forever():
        while True:
            yield from loader

    me = psutil.Process()
    return _measure(forever(), batch_size, warmup, count,
                    lambda: [me] + me.children(recursive=True))


# Where keras_coat's time goes: the pipeline with its steps switched on one after the other.
PROFILE_STAGES = (
    ("decode crop window, resize, flip, batch", dict(
        rand_augment_magnitude=None, color_jitter=None, random_erasing=0.0, mixup=0.0, cutmix=0.0
    )),
    ("+ RandAugment", dict(random_erasing=0.0, mixup=0.0, cutmix=0.0)),
    ("+ random erasing", dict(mixup=0.0, cutmix=0.0)),
    ("+ Mixup/CutMix (the full pipeline)", {}),
)


def _profile_keras(root, batch_size, warmup, count):
    """CPU milliseconds per image of each stage of keras_coat's pipeline (best of 3 spans)."""
    import psutil

    from training import data, recipes

    source = data.load_source(f"folder:{root}", 224)
    rows, previous = [], 0.0
    for name, changes in PROFILE_STAGES:
        recipe = recipes.override(
            recipes.get_recipe("imagenet"),
            {"batch_size": batch_size, "warmup_epochs": 0, **changes},
        )
        batches = iter(data.train_dataset(recipe, source, seed=0))
        this = lambda: [psutil.Process()]  # noqa: E731
        spans = [_measure(batches, batch_size, warmup * (i == 0), count, this) for i in range(3)]
        total = 1e3 / max(span["images_per_cpu_s"] for span in spans)
        rows.append({"stage": name, "ms_per_image": total, "added_ms": total - previous})
        previous = total
    return {"stages": rows}


def worker(args):
    core = _pin_to_one_core()
    if args.framework == "keras_coat_profile":
        result = _profile_keras(args.root, args.batch, args.warmup, args.batches)
    else:
        measure = _measure_timm if args.framework == "timm" else _measure_keras
        result = measure(args.root, args.batch, args.warmup, args.batches)
    print(json.dumps(dict(result, framework=args.framework, core=core)))


def _run_worker(framework, root, args):
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", "--framework", framework,
        "--root", root, "--batch", str(args.batch), "--warmup", str(args.warmup),
        "--batches", str(args.batches),
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{framework} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(keras_runs, timm_runs, args, profile=None):
    keras_rate = statistics.median(r["images_per_cpu_s"] for r in keras_runs)
    timm_rate = statistics.median(r["images_per_cpu_s"] for r in timm_runs)
    ratios = [k["images_per_cpu_s"] / t["images_per_cpu_s"] for k, t in zip(keras_runs, timm_runs)]
    node = ACCELERATORS * IMAGES_PER_ACCELERATOR
    intro = (
        f"Measured {time.strftime('%Y-%m-%d')} on {_cpu_name()}, each side pinned to one core of "
        f"{os.cpu_count()} (the machine shared with other jobs), on {args.images} generated "
        f"ImageNet-like JPEGs (500x375 and similar, quality 90), batch {args.batch}, output "
        f"224x224. Rate: images per CPU-second of the pipeline's processes, median of "
        f"{args.rounds} alternating rounds of {args.batches} batches after {args.warmup} "
        "warm-up batches; the range is the ratio of single rounds."
    )
    lines = textwrap.wrap(intro, 100) + [
        "",
        "| pipeline | img/s per core | wall img/s (one shared core) |",
        "|---|---|---|",
        f"| keras_coat `training.data.train_dataset` (tf.data) | {keras_rate:.1f} | "
        f"{statistics.median(r['images_per_s'] for r in keras_runs):.1f} |",
        f"| timm `create_transform` + `Mixup`, 1 DataLoader worker | {timm_rate:.1f} | "
        f"{statistics.median(r['images_per_s'] for r in timm_runs):.1f} |",
        f"| ratio | {keras_rate / timm_rate:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | |",
        "",
    ] + textwrap.wrap(
        f"An {ACCELERATORS}-accelerator node training at {IMAGES_PER_ACCELERATOR:,} img/s per "
        f"accelerator ({ACCELERATOR_NOTE}) needs {node:,} augmented images per second: "
        f"{node / keras_rate:.0f} cores of this CPU with keras_coat's pipeline, "
        f"{node / timm_rate:.0f} with timm's.",
        100,
    )
    if profile:
        lines += [""] + textwrap.wrap(
            "Where keras_coat's CPU time goes (the pipeline with its steps switched on one after "
            "the other, one process, best of three spans):",
            100,
        ) + [
            "",
            "| steps | CPU ms per image | added by the step |",
            "|---|---|---|",
        ] + [
            f"| {row['stage']} | {row['ms_per_image']:.2f} | {row['added_ms']:+.2f} |"
            for row in profile["stages"]
        ]
    return "\n".join(lines), keras_rate, timm_rate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=320, help="generated training JPEGs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches per process")
    parser.add_argument("--batches", type=int, default=16, help="timed batches per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the per-stage CPU time of keras_coat's pipeline")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework", choices=["keras_coat", "timm", "keras_coat_profile"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory(prefix="input-pipeline-") as root:
        make_images(root, args.images)
        keras_runs, timm_runs = [], []
        for round_index in range(args.rounds):
            keras_runs.append(_run_worker("keras_coat", root, args))
            timm_runs.append(_run_worker("timm", root, args))
            print(f"round {round_index + 1}: keras_coat "
                  f"{keras_runs[-1]['images_per_cpu_s']:.1f} img/s/core, timm "
                  f"{timm_runs[-1]['images_per_cpu_s']:.1f} img/s/core", flush=True)
        profile = None if args.no_profile else _run_worker("keras_coat_profile", root, args)
    table, keras_rate, timm_rate = _table(keras_runs, timm_runs, args, profile)
    print("\n" + table + "\n")
    if not args.no_write:
        write_results_section(BEGIN, END, "Training input pipeline (CPU)", table)
    print(f"input pipeline: keras_coat {keras_rate:.1f} img/s/core, timm {timm_rate:.1f} "
          f"img/s/core, ratio {keras_rate / timm_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
