"""keras_coat beside timm on this CPU: cold start, steady inference, training and input pipeline.

    python benchmarks/compare.py                       # the default run; writes RESULTS.md
    python benchmarks/compare.py --sections inference --rounds 5 --no-write
    python benchmarks/compare.py --isa native avx2     # also with oneDNN, MKL, ATen, XLA at AVX2
    python benchmarks/compare.py --profile tensorflow  # where one runner's step goes, op by op
    python benchmarks/compare.py --quick --no-write    # a tiny model: checks that all of it runs
    python benchmarks/compare.py --threads 1           # every runner pinned to one core

Runners: timm (PyTorch eager: the reference) and keras_coat on the TensorFlow, JAX and PyTorch
backends. Every measurement runs in a fresh process, so each figure includes nothing another
runner left behind; a round runs every runner once, in an order rotated from round to round
(a shared machine drifts over minutes), and a cell is the median over rounds with the lowest
and highest ratio to timm of a single round beside it. fp32, random weights. Sections:

- inference: one process per runner and round. Cold start, phase by phase, as a user's first
  prediction goes: new process to imports, build the model, load weights (keras_coat: its
  command line's path, `CoaTImageClassifier.from_preset` of a local preset directory; timm:
  `create_model` and `load_checkpoint` of a local safetensors file), preprocess one JPEG photo
  (keras_coat's `load_image`, timm's `create_transform`), the first prediction and its top-5
  class names (`predict_in_batches`, as the command line; timm's forward pass and softmax).
  Then steady inference in the same process: `predict_on_batch` (timm: the forward pass in
  `inference_mode`) at each batch size, the median of timed calls after warm-up calls.
- training: one process per runner and round; `fit` of the classifier (stochastic depth 0.1,
  AdamW with weight-decay exclusions, label-smoothed cross-entropy) on in-memory batches, timm's
  usual eager loop beside it: images/s of the median step after warm-up steps, the first step's
  time (trace or compile) and the process' peak resident memory (VmHWM), with the resident
  memory after each phase.
- input: the `imagenet` recipe's training pipeline (`training.data.train_dataset`: decode the crop
  window, random-resized crop, flip, RandAugment, random erasing, Mixup/CutMix) against timm's
  `create_transform` + `Mixup` in one DataLoader worker, on generated ImageNet-like JPEGs; each
  side pinned to the same single core; images per CPU-second of its processes.

`--isa avx2` emulates an AVX2-only CPU (AMD Zen 2/3, many laptops and cloud VMs) on an AVX-512
one: `ONEDNN_MAX_CPU_ISA` (TensorFlow's and PyTorch's oneDNN), `MKL_ENABLE_INSTRUCTIONS`
(PyTorch's matmuls), `ATEN_CPU_CAPABILITY` (PyTorch's own kernels) and XLA's
`--xla_cpu_max_isa`; a check process reports what oneDNN, MKL and ATen then use.

`--profile RUNNER` prints where one runner's steady batch goes instead: TensorFlow's op profile
grouped by CoaT's parts (and the dense layers' rate against a large matmul), `torch.profiler`'s
op table for timm and the PyTorch backend, and for JAX the time of each phase of the first call
(trace, lower, compile, run) and XLA's costliest ops of the compiled step.

The tables are printed and written between markers into benchmarks/RESULTS.md, a section per
benchmark section measured (other sections of the file are kept).
"""

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "RESULTS.md")

RUNNERS = ("timm", "tensorflow", "jax", "torch")
LABELS = {
    "timm": "timm",
    "tensorflow": "keras_coat TensorFlow",
    "jax": "keras_coat JAX",
    "torch": "keras_coat PyTorch",
}
SECTIONS = ("inference", "training", "input")
ISAS = {
    "native": {},
    "avx2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
    },
}
COLD_PHASES = ("import", "build", "load", "preprocess", "first")
COLD_LABELS = {
    "import": "new process to imports done",
    "build": "build the model",
    "load": "load weights (local files)",
    "preprocess": "preprocess one photo",
    "first": "first prediction, top-5 names",
}
TRAIN_PHASES = ("import", "build", "first_step", "steady")
TRAIN_LABELS = {
    "import": "imports",
    "build": "model, optimizer",
    "first_step": "first step (trace / compile)",
    "steady": "after the timed steps",
}
# A tiny CoaT-Lite for --quick: the script's every path in seconds per process.
QUICK_CONFIG = {"embed_dims": [16, 32, 32, 32], "serial_depths": [1, 1, 1, 1],
                "mlp_ratios": [2, 2, 2, 2]}  # fmt: skip
PHOTO_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (400, 500), (640, 480))
INPUT_CLASSES = 10
WORKER_TIMEOUT_S = 1800
RESULT_PREFIX = "compare.py result: "


# ------------------------------------------------------------------------------ shared helpers


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def vector_extensions():
    """The CPU's AVX flags (`avx2`, `avx512f`, ...) from /proc/cpuinfo, in order."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return [flag for flag in flags if flag.startswith("avx")]
    except OSError:
        pass
    return []


def machine_line():
    flags = vector_extensions()
    described = "AVX2" if "avx2" in flags else "no AVX2"
    described += " and AVX-512" if "avx512f" in flags else ", no AVX-512"
    return f"{cpu_name()} ({described}), {os.cpu_count()} cores"


def versions():
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("keras", "tensorflow", "jax", "torch", "timm"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def time_calls(run, warmup, repeats, max_seconds=None):
    """`(median, best)` seconds of `repeats` calls of `run` after `warmup` untimed ones; with
    `max_seconds`, stops early once that much was timed (at least 3 calls)."""
    for _ in range(warmup):
        run()
    seconds = []
    while len(seconds) < repeats:
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
        if max_seconds and len(seconds) >= 3 and sum(seconds) > max_seconds:
            break
    return statistics.median(seconds), min(seconds)


def memory_mib():
    """(resident, peak resident) memory of this process in MiB, from /proc/self/status."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0]) / 1024.0
    except OSError:
        import resource

        values["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return values["VmRSS"], values["VmHWM"]


def write_results_section(begin, end, title, table, path=None):
    """Replaces (or appends) the section between `begin` and `end` in RESULTS.md, atomically;
    other sections of the file are left as they are."""
    path = path or RESULTS
    section = f"{begin}\n## {title}\n\n{table}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if begin in text and end in text:
        pattern = re.escape(begin) + ".*?" + re.escape(end)
        text = re.sub(pattern, lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


class Phases:
    """Seconds, resident and peak memory at the end of each phase of a worker."""

    def __init__(self, started=None):
        self.started = started if started is not None else time.time()
        self.rows = {}

    def mark(self, phase, at=None):
        now = time.time() if at is None else at
        rss, peak = memory_mib()
        self.rows[phase] = {"seconds": now - self.started, "rss_mib": rss, "peak_mib": peak}
        self.started = now


# ------------------------------------------------------------------------- models and files


def make_images(root, count, seed=0, split_folders=True):
    """`count` ImageNet-like JPEGs (500x375 and similar; smooth multi-scale noise and shapes, so
    that they compress like photographs) in root/train/<class>/, and two per class in
    root/val/<class>/."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count + 2 * INPUT_CLASSES):
        split, label = ("train" if index < count else "val"), index % INPUT_CLASSES
        width, height = PHOTO_SIZES[index % len(PHOTO_SIZES)]
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
        grain = rng.normal(0, 10, (height, width, 3))
        image = Image.fromarray((np.asarray(image) + grain).clip(0, 255).astype(np.uint8))
        folder = os.path.join(root, split, f"class_{label:02d}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{index:05d}.jpg")
        image.save(path, quality=90)
        paths.append(path)
    return paths


def _timm_model(spec, **kwargs):
    import timm

    if spec.get("config"):
        # keras_coat.CoaTBackbone's patch size (timm's CoaT class defaults to 16).
        return timm.models.coat.CoaT(patch_size=4, img_size=spec["size"], **spec["config"],
                                     **kwargs)  # fmt: skip
    return timm.create_model(spec["variant"], pretrained=False, img_size=spec["size"], **kwargs)


def _keras_backbone(spec, **kwargs):
    from keras_coat import CoaTBackbone

    shape = (spec["size"], spec["size"], 3)
    if spec.get("config"):
        return CoaTBackbone(**spec["config"], image_shape=shape, **kwargs)
    return CoaTBackbone.from_variant(spec["variant"], image_shape=shape, **kwargs)


def _timm_transform(model, spec):
    import timm

    config = timm.data.resolve_data_config({}, model=model)
    config["input_size"] = (3, spec["size"], spec["size"])
    return timm.data.create_transform(**config, is_training=False)


def _setup_worker(args):
    """Writes the files the inference workers load: timm's weights as a safetensors file, the
    same weights as a keras_coat preset directory, and one photo."""
    import timm  # noqa: F401  (timm before TensorFlow: the other order segfaults)
    import safetensors.torch
    import torch

    torch.manual_seed(0)
    reference = _timm_model(args.spec).eval()
    state = {k: v.detach().clone().contiguous() for k, v in reference.state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(args.folder, "timm.safetensors"))

    from keras_coat import CoaTImageClassifier, ImagePreprocessing, convert

    classifier = CoaTImageClassifier(
        _keras_backbone(args.spec),
        num_classes=1000,
        preprocessing=ImagePreprocessing(image_size=(args.spec["size"],) * 2),
    )
    convert.assign_state_dict(classifier, {k: v.numpy() for k, v in state.items()})
    classifier.save_to_preset(os.path.join(args.folder, "preset"))
    with tempfile.TemporaryDirectory() as scratch:
        photo = make_images(scratch, 1)[0]
        os.replace(photo, os.path.join(args.folder, "photo.jpg"))
    print(RESULT_PREFIX + json.dumps({"ok": True}))


# ---------------------------------------------------------------------------- inference worker


def _inference_timm(args, phases):
    import timm
    import torch
    from PIL import Image

    phases.mark("import")
    model = _timm_model(args.spec).eval()
    phases.mark("build")
    timm.models.load_checkpoint(model, os.path.join(args.folder, "timm.safetensors"))
    phases.mark("load")
    transform = _timm_transform(model, args.spec)
    with Image.open(os.path.join(args.folder, "photo.jpg")) as image:
        batch = transform(image.convert("RGB")).unsqueeze(0)
    phases.mark("preprocess")
    with torch.inference_mode():
        probabilities = model(batch).softmax(-1)
    top = probabilities.topk(5)
    info = timm.data.ImageNetInfo()
    names = [info.index_to_description(int(i)) for i in top.indices[0]]
    phases.mark("first")

    def forward(size):
        images = torch.randn(size, 3, args.spec["size"], args.spec["size"])

        def run():
            with torch.inference_mode():
                return model(images)

        return run

    return int(top.indices[0, 0]), names, forward


def _inference_keras(args, phases):
    from keras_coat import CoaTImageClassifier

    phases.mark("import")
    # Build ends when the classifier's constructor returns; the rest of from_preset is loading.
    built = []
    constructor = CoaTImageClassifier.__init__

    def timed_constructor(self, *a, **k):
        constructor(self, *a, **k)
        built.append(time.time())

    CoaTImageClassifier.__init__ = timed_constructor
    try:
        model = CoaTImageClassifier.from_preset(os.path.join(args.folder, "preset"))
    finally:
        CoaTImageClassifier.__init__ = constructor
    phases.mark("build", at=built[-1])
    phases.mark("load")
    from keras_coat.image_classifier import predict_in_batches
    from keras_coat.imagenet import decode_predictions, load_image

    preprocessing = model.preprocessing
    image = load_image(os.path.join(args.folder, "photo.jpg"),
                       image_size=preprocessing.image_size, crop_pct=preprocessing.crop_pct)
    phases.mark("preprocess")
    (probabilities,) = predict_in_batches(model, [image])  # as the command line's predict
    names = [name for _, name, _ in decode_predictions(probabilities, top=5)[0]]
    phases.mark("first")

    def forward(size):
        import numpy as np

        rng = np.random.default_rng(0)
        images = rng.uniform(0, 255, (size, args.spec["size"], args.spec["size"], 3))
        images = images.astype("float32")
        return lambda: model.predict_on_batch(images)

    return int(probabilities[0].argmax()), names, forward


def _inference_worker(args):
    phases = Phases(started=args.spawned_at)
    run = _inference_timm if args.runner == "timm" else _inference_keras
    top1, names, forward = run(args, phases)
    steady = {}
    for size in args.batches:
        call = forward(size)
        cpu_started, calls = time.process_time(), []

        def counted(call=call):
            calls.append(call())

        median, best = time_calls(counted, args.warmup, args.repeats, args.max_seconds)
        cpu = (time.process_time() - cpu_started) / len(calls)  # warm-up calls included
        steady[str(size)] = {"images_per_s": size / median, "best_images_per_s": size / best,
                             "images_per_cpu_s": size / cpu}  # fmt: skip
    _, peak = memory_mib()
    return {"phases": phases.rows, "top1": top1, "top5_names": names, "steady": steady,
            "peak_rss_mib": peak}  # fmt: skip


# ----------------------------------------------------------------------------- training worker

LEARNING_RATE, WEIGHT_DECAY, LABEL_SMOOTHING, DROP_PATH, CLASSES = 1e-3, 0.05, 0.1, 0.1, 1000


def _training_keras(args, phases):
    from keras_coat import CoaTImageClassifier  # first: it sets TensorFlow's defaults

    import keras
    import numpy as np

    phases.mark("import")
    keras.utils.set_random_seed(0)
    model = CoaTImageClassifier(
        _keras_backbone(args.spec, drop_path_rate=DROP_PATH), num_classes=CLASSES,
        activation=None,
    )  # fmt: skip
    optimizer = keras.optimizers.AdamW(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    optimizer.exclude_from_weight_decay(var_names=["cls_token", "gamma", "beta", "bias"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                  label_smoothing=LABEL_SMOOTHING),
    )  # fmt: skip
    phases.mark("build")
    steps = args.warmup + args.steps
    rng = np.random.default_rng(0)
    size = args.spec["size"]
    # Pixels in [0, 255] (the model normalizes them) and one-hot labels, as the trainer feeds.
    images = rng.uniform(0, 255, (steps * args.batch, size, size, 3)).astype("float32")
    labels = np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, len(images))]
    ends = []

    class StepClock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # waits for the step (JAX dispatches asynchronously)
            ends.append(time.perf_counter())
            if batch == 0:
                phases.mark("first_step")

    started = time.perf_counter()
    model.fit(images, labels, batch_size=args.batch, epochs=1, shuffle=False, verbose=0,
              callbacks=[StepClock()])  # fmt: skip
    phases.mark("steady")
    return [b - a for a, b in zip([started] + ends, ends)]


def _training_timm(args, phases):
    import timm  # noqa: F401
    import torch

    phases.mark("import")
    torch.manual_seed(0)
    model = _timm_model(args.spec, num_classes=CLASSES, drop_path_rate=DROP_PATH).train()
    # No weight decay on class tokens, norms and biases (timm's own rule).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "cls_token" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
    )  # fmt: skip
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    phases.mark("build")
    generator = torch.Generator().manual_seed(0)
    size, seconds = args.spec["size"], []
    for step in range(args.warmup + args.steps):
        images = torch.randn(args.batch, 3, size, size, generator=generator)
        labels = torch.randint(0, CLASSES, (args.batch,), generator=generator)
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
    return seconds


def _training_worker(args):
    phases = Phases(started=args.spawned_at)
    run = _training_timm if args.runner == "timm" else _training_keras
    seconds = run(args, phases)
    timed = seconds[args.warmup:]
    median = statistics.median(timed)
    return {"phases": phases.rows, "step_seconds": timed, "images_per_s": args.batch / median,
            "first_step_s": seconds[0], "peak_rss_mib": phases.rows["steady"]["peak_mib"]}


# -------------------------------------------------------------------------------- input worker


def _cpu_seconds(processes):
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def _measure_batches(batches, batch_size, warmup, count, processes):
    """Images per wall second and per CPU-second of `processes` over `count` batches."""
    for _ in range(warmup):
        next(batches)
    cpu_start, wall_start = _cpu_seconds(processes()), time.perf_counter()
    for _ in range(count):
        next(batches)
    cpu, wall = _cpu_seconds(processes()) - cpu_start, time.perf_counter() - wall_start
    images = batch_size * count
    return {"images_per_s": images / wall, "images_per_cpu_s": images / cpu}


def _keras_train_batches(root, recipe_changes):
    from training import data, recipes

    recipe = recipes.override(recipes.get_recipe("imagenet"), recipe_changes)
    source = data.load_source(f"folder:{root}", recipe.image_size)
    dataset = data.train_dataset(recipe, source, seed=0)
    return (tuple(t.numpy() for t in batch) for batch in dataset)


def _input_keras(args):
    import psutil

    batches = _keras_train_batches(args.folder, {"batch_size": args.batch, "warmup_epochs": 0})
    return _measure_batches(batches, args.batch, args.warmup, args.steps,
                            lambda: [psutil.Process()])  # fmt: skip


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


def _input_timm(args):
    import psutil
    import timm  # noqa: F401
    import torch
    import torchvision
    from timm.data import Mixup, create_transform

    torch.set_num_threads(1)
    _posterize_zero_bits_as_black()
    transform = create_transform(
        224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
        interpolation="bicubic",
    )  # fmt: skip
    dataset = torchvision.datasets.ImageFolder(os.path.join(args.folder, "train"), transform)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode="batch",
                  label_smoothing=0.1, num_classes=INPUT_CLASSES)  # fmt: skip

    def collate(samples):
        return mixup(*torch.utils.data.default_collate(samples))

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=1,
        collate_fn=collate, persistent_workers=True,
    )  # fmt: skip

    def forever():
        while True:
            yield from loader

    me = psutil.Process()
    return _measure_batches(forever(), args.batch, args.warmup, args.steps,
                            lambda: [me] + me.children(recursive=True))  # fmt: skip


def _input_worker(args):
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    result = (_input_timm if args.runner == "timm" else _input_keras)(args)
    return dict(result, core=core)


# ------------------------------------------------------------------------------ ISA check


def _isa_worker(args):
    """What the libraries report they use under this process' environment (run with
    ONEDNN_VERBOSE=1 and MKL_VERBOSE=1: their first call prints the ISA)."""
    import timm  # noqa: F401
    import torch

    result = {"aten": torch.backends.cpu.get_cpu_capability()}
    a = torch.randn(64, 64)
    torch.mm(a, a)  # MKL
    torch.nn.functional.conv2d(torch.randn(1, 8, 16, 16), torch.randn(8, 8, 3, 3))  # oneDNN
    import keras_coat  # noqa: F401 (TensorFlow's defaults as the keras_coat runners get them)
    import tensorflow as tf

    b = tf.random.normal((64, 64))
    tf.matmul(b, b).numpy()  # TensorFlow's oneDNN
    import jax
    import jax.numpy as jnp

    jax.jit(lambda x: jnp.tanh(x) @ x)(jnp.ones((64, 64))).block_until_ready()
    return result


def check_isa(isa):
    """`{"aten", "onednn", "mkl", "xla"}` as each library reports it under `isa`'s settings."""
    env = dict(_environment(isa, "torch"), ONEDNN_VERBOSE="1", MKL_VERBOSE="1")
    command = [sys.executable, os.path.abspath(__file__), "--worker", "isa"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)  # fmt: skip
    output = done.stdout + done.stderr
    result = {"aten": "?", "onednn": [], "mkl": "?"}
    for line in output.splitlines():
        if line.startswith(RESULT_PREFIX):
            result.update(json.loads(line[len(RESULT_PREFIX):]))
        match = re.search(r"onednn_verbose,.*info,cpu,isa:(.*)$", line)
        if match and match.group(1).strip() not in result["onednn"]:
            result["onednn"].append(match.group(1).strip())
        match = re.search(r"MKL_VERBOSE .*architecture .*?\((Intel\(R\) )?(AVX[^)]*)\)", line)
        if match:
            result["mkl"] = match.group(2)
    result["xla"] = "refused" if "Unknown CPU ISA" in output else ISAS[isa].get(
        "XLA_FLAGS", "host ISA")
    return result


# -------------------------------------------------------------------------------- profiling


def _profile_worker(args):
    if args.runner == "tensorflow":
        return _profile_tensorflow(args)
    if args.runner == "jax":
        return _profile_jax(args)
    return _profile_torch(args)


# TensorFlow runtime op types (after its oneDNN rewrites) of the dense layers.
_DENSE_OPS = {"MatMul", "_MklMatMul", "_MklNativeFusedMatMul", "_FusedMatMul"}
_DENSE_GELU = "dense: MLP first layers (fused bias + exact GELU)"
_DENSE_PLAIN = "dense: Q/K/V, output projections, MLP second layers, head (fused bias)"
_LAYOUT_OPS = {"StridedSlice", "ConcatV2", "SplitV", "Split", "Pad", "Transpose", "_MklTranspose",
               "Reshape", "Squeeze", "ExpandDims"}


def group_op(node_name, op_type):
    """Which part of CoaT a TensorFlow runtime op belongs to, from its layer name and type."""
    parts = node_name.split("/")
    # The classifier holds its backbone, so a layer's ops sit under `<model>/<backbone>/<layer>/`:
    # the layer is the first path part below the models.
    inner = [p for p in parts[1:-1] if "_backbone" not in p] or parts[1:] or parts
    layer = inner[0]
    if op_type in _DENSE_OPS:
        if "_mlp" in layer and ("Gelu" in node_name or "fc1" in node_name):
            return _DENSE_GELU
        return _DENSE_PLAIN
    if "patch_embed" in layer:
        return "patch embeddings (strided conv + LayerNorm)"
    if "_norm" in layer or layer.startswith("norm"):
        return "LayerNorm"
    if "crpe" in layer and "factoratt" not in layer:
        return "CRPE (depthwise convs, split/concat, product with Q)"
    if "cpe" in layer:
        return "CPE (depthwise conv, class-token slice/concat)"
    if "factoratt" in layer:
        return "attention context (softmax, K^T V, Q context)"
    if "drop_path" in layer or "coscale" in layer or "interpolate" in layer:
        return "residual adds and co-scale sums"
    if op_type in _LAYOUT_OPS:
        return "other layout ops"
    return "other"


def dense_flops(graph):
    """2 * M * K * N over a TensorFlow graph's MatMul ops (static shapes)."""
    flops = 0
    for op in graph.get_operations():
        if op.type in ("MatMul", "BatchMatMulV2"):
            a, b = (tensor.shape.as_list() for tensor in op.inputs[:2])
            if op.type == "BatchMatMulV2" or len(a) != 2:
                continue
            m = a[1] if op.get_attr("transpose_a") else a[0]
            k = a[0] if op.get_attr("transpose_a") else a[1]
            n = b[0] if op.get_attr("transpose_b") else b[1]
            flops += 2 * m * k * n
    return flops


def _classifier_for_profile(spec):
    from keras_coat import CoaTImageClassifier

    return CoaTImageClassifier(_keras_backbone(spec), num_classes=1000, activation=None,
                               include_preprocessing=False)  # fmt: skip


def _profile_tensorflow(args):
    """The op profile of one TensorFlow graph step, grouped by CoaT's parts: the graph runs one
    op at a time (each op still on every core), so that op times add up to the step."""
    import collections

    import keras_coat  # noqa: F401 (first: it sets TensorFlow's defaults)
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    model = _classifier_for_profile(args.spec)
    # Non-zero biases: a zero bias constant would be folded away and change what gets fused.
    rng = np.random.RandomState(0)
    for variable in model.weights:
        if variable.path.endswith("bias"):
            variable.assign(rng.randn(*variable.shape).astype("float32") * 0.01)
    size = args.spec["size"]
    forward = tf.function(lambda x: model(x, training=False))
    concrete = forward.get_concrete_function(tf.TensorSpec((args.batch, size, size, 3)))
    frozen = convert_variables_to_constants_v2(concrete)
    flops = dense_flops(frozen.graph)
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(frozen.graph.as_graph_def(), name="")
    images = rng.rand(args.batch, size, size, 3).astype("float32")
    feed, fetch = {frozen.inputs[0].name: images}, frozen.outputs[0].name
    config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=1)
    traces = []
    with tf.compat.v1.Session(graph=graph, config=config) as session:
        step_s, _ = time_calls(lambda: session.run(fetch, feed), 3, 5)
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        for _ in range(3):
            metadata = tf.compat.v1.RunMetadata()
            session.run(fetch, feed, options=options, run_metadata=metadata)
            groups, ops, mlp_second_ms = collections.Counter(), collections.Counter(), 0.0
            for device in metadata.step_stats.dev_stats:
                for node in device.node_stats:
                    label = node.timeline_label
                    op_type = label.split(" = ")[1].split("(")[0] if " = " in label else ""
                    milliseconds = node.all_end_rel_micros / 1e3
                    groups[group_op(node.node_name, op_type)] += milliseconds
                    ops[op_type or node.node_name] += milliseconds
                    if op_type in _DENSE_OPS and "_mlp" in node.node_name and (
                        "fc2" in node.node_name
                    ):
                        mlp_second_ms += milliseconds
            traces.append((groups, ops, mlp_second_ms))
    groups, ops, mlp_second_ms = min(traces, key=lambda trace: sum(trace[0].values()))
    square = tf.constant(rng.rand(2048, 2048).astype("float32"))
    matmul = tf.function(lambda x: tf.matmul(x, x))
    _, best = time_calls(lambda: matmul(square).numpy(), 3, 10)
    return {
        "groups": dict(groups), "ops": dict(ops.most_common(15)),
        "gelu_ms": groups[_DENSE_GELU] - mlp_second_ms, "step_ms": 1e3 * step_s,
        "dense_gflop": flops / 1e9, "peak_gflops": 2 * 2048**3 / best / 1e9,
    }  # fmt: skip


def _profile_jax(args):
    """The first call's phases (trace, lower, compile, run) and the steady step of the JAX
    backend's jitted forward pass, and XLA's costliest ops by its own cost model."""
    import jax
    import numpy as np

    started = time.perf_counter()
    model = _classifier_for_profile(args.spec)
    build_s = time.perf_counter() - started
    size = args.spec["size"]

    def forward(trainable, non_trainable, x):
        return model.stateless_call(trainable, non_trainable, x, training=False)[0]

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    images = jax.device_put(np.random.default_rng(0).standard_normal(
        (args.batch, size, size, 3)).astype("float32"))  # fmt: skip
    times = {"build": build_s}
    start = time.perf_counter()
    traced = jax.jit(forward).trace(trainable, non_trainable, images)
    times["trace"] = time.perf_counter() - start
    start = time.perf_counter()
    lowered = traced.lower()
    times["lower"] = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    times["compile"] = time.perf_counter() - start
    start = time.perf_counter()
    compiled(trainable, non_trainable, images).block_until_ready()
    times["first run"] = time.perf_counter() - start
    step_s, _ = time_calls(
        lambda: compiled(trainable, non_trainable, images).block_until_ready(), 2, 10, 20)
    hlo = compiled.as_text()
    op_counts = {}
    for match in re.finditer(r"= \S+ (\w[\w-]*)\(", hlo):
        op_counts[match.group(1)] = op_counts.get(match.group(1), 0) + 1
    top = dict(sorted(op_counts.items(), key=lambda item: -item[1])[:15])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"phases_s": times, "step_ms": 1e3 * step_s, "hlo_ops": top,
            "flops": float((cost or {}).get("flops", 0.0))}


def _profile_torch(args):
    """`torch.profiler`'s op table (self CPU time) of one steady batch: timm, or the PyTorch
    backend's `predict_on_batch`."""
    import numpy as np

    if args.runner == "timm":
        import timm  # noqa: F401
        import torch

        model = _timm_model(args.spec).eval()
        images = torch.randn(args.batch, 3, args.spec["size"], args.spec["size"])

        def run():
            with torch.inference_mode():
                return model(images)
    else:
        import torch

        model = _classifier_for_profile(args.spec)
        images = np.random.default_rng(0).standard_normal(
            (args.batch, args.spec["size"], args.spec["size"], 3)).astype("float32")

        def run():
            return model.predict_on_batch(images)

    step_s, _ = time_calls(run, 2, 5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run()
    rows = []
    for event in profiler.key_averages():
        rows.append((event.key, event.self_cpu_time_total / 1e3, event.count))
    rows.sort(key=lambda row: -row[1])
    return {"step_ms": 1e3 * step_s, "ops": rows[:25]}


def render_profile(runner, result, args):
    spec = _spec_name(args.spec)
    lines = [f"{LABELS[runner]}: {spec}, batch {args.batch}, fp32, ISA {args.isa[0]}; steady "
             f"step {result['step_ms']:.0f} ms ({args.batch / result['step_ms'] * 1e3:.2f} "
             "img/s).", ""]  # fmt: skip
    if runner == "tensorflow":
        groups = result["groups"]
        total = sum(groups.values())
        lines += ["| part of the graph | op time ms | share |", "|---|---|---|"]
        for key, value in sorted(groups.items(), key=lambda item: -item[1]):
            lines.append(f"| {key} | {value:.1f} | {value / total:.0%} |")
        dense = groups.get(_DENSE_GELU, 0.0) + groups.get(_DENSE_PLAIN, 0.0)
        floor = result["dense_gflop"] / result["peak_gflops"] * 1e3
        lines += [
            f"| **total** (one op at a time) | **{total:.1f}** | |", "",
            "| runtime op type | op time ms |", "|---|---|",
        ] + [f"| {op} | {ms:.1f} |" for op, ms in result["ops"].items()] + [
            "",
            f"- Dense layers: {result['dense_gflop']:.1f} GFLOP in {dense:.0f} ms, "
            f"{result['dense_gflop'] / max(dense, 1e-9) * 1e3:.0f} GFLOP/s; the MLPs' GELU about "
            f"{result['gelu_ms']:.0f} ms (first layers minus second layers).",
            f"- A 2048^3 matmul in the same process: {result['peak_gflops']:.0f} GFLOP/s; at "
            f"that rate the dense layers need {floor:.0f} ms.",
        ]  # fmt: skip
    elif runner == "jax":
        lines += ["| phase | seconds |", "|---|---|"] + [
            f"| {name} | {seconds:.2f} |" for name, seconds in result["phases_s"].items()
        ] + ["", f"XLA's count of {result['flops'] / 1e9:.1f} GFLOP; most frequent HLO ops "
             "after optimization: " + ", ".join(f"{k} {v}" for k, v in result["hlo_ops"].items())]
    else:
        lines += ["| op | self CPU ms | calls |", "|---|---|---|"] + [
            f"| {name} | {ms:.1f} | {count} |" for name, ms, count in result["ops"]
        ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ orchestration


def _thread_settings(threads):
    """Environment variables that size every runtime's thread pools to `threads`."""
    count = str(threads)
    return {
        "OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count,  # PyTorch
        "TF_NUM_INTRAOP_THREADS": count, "TF_NUM_INTEROP_THREADS": count,
        # XLA sizes its pool to the process' affinity, which the worker sets.
        "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}",
    }  # fmt: skip


def _environment(isa, runner, threads=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    if runner in ("tensorflow", "jax", "torch"):
        env["KERAS_BACKEND"] = runner
    settings = dict(ISAS[isa])
    if threads:
        for key, value in _thread_settings(threads).items():
            settings[key] = f"{settings[key]} {value}" if key in settings else value
        settings["COMPARE_THREADS"] = str(threads)
    for key, value in settings.items():
        env[key] = f"{env[key]} {value}" if key == "XLA_FLAGS" and env.get(key) else value
    return env


def run_worker(kind, runner, args, isa="native", **extra):
    """Runs one worker process; its JSON result, or `{"error": ...}` if it failed."""
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", kind, "--runner", runner,
        "--spec", json.dumps(args.spec), "--folder", extra.pop("folder", args.folder or ""),
        "--spawned-at", repr(time.time()),
    ]  # fmt: skip
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}"] + [str(v) for v in (
            value if isinstance(value, (list, tuple)) else [value])]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                              env=_environment(isa, runner, getattr(args, "threads", None)),
                              timeout=args.timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    lines = [line[len(RESULT_PREFIX):] for line in done.stdout.splitlines()
             if line.startswith(RESULT_PREFIX)]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
        print(f"  {kind} {runner} ({isa}) failed:\n    " + "\n    ".join(tail), flush=True)
        last = tail[-1] if tail else f"exit status {done.returncode}"
        return {"error": last[:200]}
    return json.loads(lines[-1])


def _rotated(runners, round_index):
    shift = round_index % len(runners)
    return list(runners[shift:]) + list(runners[:shift])


def measure_inference(args, isa):
    runs = {runner: [] for runner in args.runners}
    for round_index in range(args.rounds):
        for runner in _rotated(args.runners, round_index):
            result = run_worker("inference", runner, args, isa, batches=args.batches,
                                warmup=args.warmup, repeats=args.repeats,
                                max_seconds=args.max_seconds)  # fmt: skip
            runs[runner].append(result)
            if "error" not in result:
                total = sum(p["seconds"] for p in result["phases"].values())
                rates = ", ".join(f"batch {b} {r['images_per_s']:.2f} img/s"
                                  for b, r in result["steady"].items())  # fmt: skip
                print(f"inference {isa} round {round_index + 1} {runner}: first prediction "
                      f"{total:.1f} s, {rates}", flush=True)  # fmt: skip
    return runs


def measure_training(args):
    runs = {runner: [] for runner in args.train_runners}
    for round_index in range(args.train_rounds):
        for runner in _rotated(args.train_runners, round_index):
            result = run_worker("training", runner, args, batch=args.train_batch,
                                warmup=args.train_warmup, steps=args.train_steps)  # fmt: skip
            runs[runner].append(result)
            if "error" not in result:
                print(f"training round {round_index + 1} {runner}: "
                      f"{result['images_per_s']:.2f} img/s, first step "
                      f"{result['first_step_s']:.1f} s, peak {result['peak_rss_mib']:.0f} MiB",
                      flush=True)  # fmt: skip
    return runs


def measure_input(args):
    runs = {"keras_coat": [], "timm": []}
    with tempfile.TemporaryDirectory(prefix="compare-input-") as root:
        make_images(root, args.input_images)
        for round_index in range(args.input_rounds):
            for runner in _rotated(("keras_coat", "timm"), round_index):
                result = run_worker("input", runner, args, folder=root,
                                    batch=args.input_batch, warmup=args.input_warmup,
                                    steps=args.input_batches)  # fmt: skip
                runs[runner].append(result)
                if "error" not in result:
                    print(f"input round {round_index + 1} {runner}: "
                          f"{result['images_per_cpu_s']:.1f} img/s per core", flush=True)
    return runs


# ----------------------------------------------------------------------------------- tables


def _ok(runs):
    return [run for run in runs if "error" not in run]


def _median(values):
    values = list(values)
    return statistics.median(values) if values else None


def _ratio_cell(value, reference, ratios, fmt="{:.2f}", higher_is_better=True):
    """`value (ratio to timm, single rounds' range)`."""
    if value is None:
        return "failed"
    if reference is None or not ratios:
        return fmt.format(value)
    ratio = value / reference
    spread = f", {min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else ""
    return f"{fmt.format(value)} ({ratio:.2f}x{spread})"


def _paired_ratios(runs, reference_runs, get):
    ratios = []
    for run, reference in zip(runs, reference_runs):
        if "error" not in run and "error" not in reference:
            value, base = get(run), get(reference)
            if value is not None and base:
                ratios.append(value / base)
    return ratios


def _failures(runs_by_runner):
    lines = []
    for runner, runs in runs_by_runner.items():
        for index, run in enumerate(runs):
            if "error" in run:
                lines.append(f"- {LABELS.get(runner, runner)}, round {index + 1}: failed "
                             f"({run['error']}).")
    return lines


def _spec_name(spec):
    name = spec.get("variant") or "CoaT " + json.dumps(spec["config"])
    return f"{name}, {spec['size']}x{spec['size']}"


def _header(args):
    return (f"Measured {datetime.date.today().isoformat()} on {machine_line()} "
            f"({versions()}). {_spec_name(args.spec)}, fp32, random weights.")


def _total(run):
    return sum(run["phases"][phase]["seconds"] for phase in COLD_PHASES)


def inference_table(results, args, isa_checks=None):
    """Markdown: cold start by phase, then steady img/s per ISA and batch size."""
    runners = [r for r in RUNNERS if r in next(iter(results.values()))]
    rounds = max(len(runs) for by_runner in results.values() for runs in by_runner.values())
    header = _header(args) + (
        f" Each cell: the median over {rounds} rounds; in a round every runner runs in its own "
        "new process, in an order rotated between rounds. In brackets: the ratio to timm of the "
        "medians, then the lowest and highest ratio of a single round."
    )
    lines = textwrap.wrap(header, 100) + [""]
    for isa, by_runner in results.items():
        timm_runs = by_runner.get("timm", [])
        lines += [f"**Cold start, {isa} ISA**: seconds from a new process to the first "
                  "prediction on one photo (lower is better).", "",
                  "| phase | " + " | ".join(LABELS[r] for r in runners) + " |",
                  "|---|" + "---|" * len(runners)]  # fmt: skip
        for phase in COLD_PHASES + ("total",):
            def get(run, phase=phase):
                if phase == "total":
                    return _total(run)
                return run["phases"][phase]["seconds"]

            cells = []
            for runner in runners:
                value = _median(get(run) for run in _ok(by_runner[runner]))
                if phase == "total" and runner != "timm":
                    reference = _median(get(run) for run in _ok(timm_runs))
                    ratios = _paired_ratios(by_runner[runner], timm_runs, get)
                    cell = _ratio_cell(value, reference, ratios)
                else:
                    cell = "failed" if value is None else f"{value:.2f}"
                cells.append(f"**{cell}**" if phase == "total" else cell)
            label = "**total**" if phase == "total" else COLD_LABELS[phase]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", f"**Steady inference, {isa} ISA**: images/s (higher is better).", "",
                  "| batch | " + " | ".join(LABELS[r] for r in runners) + " |",
                  "|---|" + "---|" * len(runners)]  # fmt: skip
        for batch in args.batches:
            def rate(run, batch=batch):
                return run["steady"][str(batch)]["images_per_s"]

            reference = _median(rate(run) for run in _ok(timm_runs))
            cells = []
            for runner in runners:
                value = _median(rate(run) for run in _ok(by_runner[runner]))
                ratios = [] if runner == "timm" else _paired_ratios(
                    by_runner[runner], timm_runs, rate)
                cells.append(_ratio_cell(value, reference, ratios))
            lines.append(f"| {batch} | " + " | ".join(cells) + " |")
        peaks = [_median(r["peak_rss_mib"] for r in _ok(by_runner[runner])) for runner in runners]
        lines.append("| peak memory MiB | " + " | ".join(
            "failed" if p is None else f"{p:.0f}" for p in peaks) + " |")
        agree = []
        for runner in runners:
            if runner != "timm":
                for run, reference in zip(by_runner[runner], timm_runs):
                    if "error" not in run and "error" not in reference:
                        agree.append(run["top1"] == reference["top1"])
        if agree:
            lines += ["", f"- Top-1 class of the photo equal to timm's in {sum(agree)} of "
                      f"{len(agree)} keras_coat processes (the same random weights)."]
        if isa_checks and isa in isa_checks:
            check = isa_checks[isa]
            lines += [f"- Libraries' own report under this ISA: oneDNN "
                      f"{', '.join(check['onednn']) or '?'}; MKL {check['mkl']}; ATen "
                      f"{check['aten']}; XLA {check['xla']}."]
        lines += _failures(by_runner)
        lines.append("")
    lines += textwrap.wrap(
        f"Steady: the median of up to {args.repeats} timed calls (at most {args.max_seconds:g} s "
        f"of them) after {args.warmup} warm-up calls per batch size, in the cold-start process; "
        "keras_coat calls `predict_on_batch` (a TensorFlow graph without XLA, a jitted XLA "
        "program on JAX, eager on PyTorch), timm its forward pass in `torch.inference_mode()`.",
        100,
    )
    return "\n".join(lines)


def training_table(runs, args):
    runners = [r for r in RUNNERS if r in runs]
    timm_runs = runs.get("timm", [])
    rounds = max(len(r) for r in runs.values())
    header = _header(args) + (
        f" `fit` at batch {args.train_batch}, {CLASSES} classes, stochastic depth {DROP_PATH}, "
        f"AdamW, label smoothing {LABEL_SMOOTHING}; timm's eager loop with the same. Each "
        f"figure: the median over {rounds} round(s) of {args.train_steps} timed steps after "
        f"{args.train_warmup} warm-up step(s), every runner in its own new process; in "
        "brackets the ratio to timm (and its range over rounds). Peak memory: the process' "
        "peak resident set (VmHWM)."
    )
    lines = textwrap.wrap(header, 100) + [
        "", "| | " + " | ".join(LABELS[r] for r in runners) + " |",
        "|---|" + "---|" * len(runners)]  # fmt: skip
    rows = (
        ("images/s (higher is better)", lambda run: run["images_per_s"], "{:.2f}"),
        ("first step s (trace / compile)", lambda run: run["first_step_s"], "{:.1f}"),
        ("peak memory MiB (lower is better)", lambda run: run["peak_rss_mib"], "{:.0f}"),
    )
    for label, get, fmt in rows:
        reference = _median(get(run) for run in _ok(timm_runs))
        cells = []
        for runner in runners:
            value = _median(get(run) for run in _ok(runs[runner]))
            ratios = [] if runner == "timm" else _paired_ratios(runs[runner], timm_runs, get)
            cells.append(_ratio_cell(value, reference, ratios, fmt))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Resident memory MiB after each phase, peak so far in brackets (the round of "
              "median speed):", "",
              "| phase | " + " | ".join(LABELS[r] for r in runners) + " |",
              "|---|" + "---|" * len(runners)]  # fmt: skip
    shown = {}
    for runner in runners:
        ok = sorted(_ok(runs[runner]), key=lambda run: run["images_per_s"])
        shown[runner] = ok[(len(ok) - 1) // 2]["phases"] if ok else None
    for phase in TRAIN_PHASES:
        cells = []
        for runner in runners:
            row = (shown[runner] or {}).get(phase)
            cells.append("failed" if row is None else
                         f"{row['rss_mib']:.0f} ({row['peak_mib']:.0f})")  # fmt: skip
        lines.append(f"| {TRAIN_LABELS[phase]} | " + " | ".join(cells) + " |")
    lines += [""] + _failures(runs)
    return "\n".join(lines).rstrip()


def input_table(runs, args):
    keras_rate = _median(r["images_per_cpu_s"] for r in _ok(runs["keras_coat"]))
    timm_rate = _median(r["images_per_cpu_s"] for r in _ok(runs["timm"]))
    ratios = _paired_ratios(runs["keras_coat"], runs["timm"], lambda r: r["images_per_cpu_s"])
    header = (
        f"Measured {datetime.date.today().isoformat()} on {machine_line()} ({versions()}). "
        f"The `imagenet` recipe's training augmentation at 224x224, batch {args.input_batch}, "
        f"on {args.input_images} generated ImageNet-like JPEGs (500x375 and similar, quality "
        "90); each side pinned to the same single core. Rate: images per CPU-second of the "
        f"pipeline's processes, the median of {len(runs['timm'])} alternating rounds of "
        f"{args.input_batches} batches after {args.input_warmup} warm-up batches."
    )
    cell = "failed" if keras_rate is None or timm_rate is None else (
        f"{keras_rate / timm_rate:.2f}x" + (f" ({min(ratios):.2f}-{max(ratios):.2f})"
                                            if len(ratios) > 1 else ""))  # fmt: skip
    lines = textwrap.wrap(header, 100) + [
        "",
        "| pipeline | img/s per core |",
        "|---|---|",
        "| keras_coat `training.data.train_dataset` (tf.data) | "
        f"{'failed' if keras_rate is None else f'{keras_rate:.1f}'} |",
        "| timm `create_transform` + `Mixup`, 1 DataLoader worker | "
        f"{'failed' if timm_rate is None else f'{timm_rate:.1f}'} |",
        f"| keras_coat / timm (rounds' range) | {cell} |",
    ]
    lines += [""] + _failures({"tensorflow" if k == "keras_coat" else k: v
                               for k, v in runs.items()})  # fmt: skip
    return "\n".join(lines).rstrip()


def parse_table(text):
    """`[[cell, ...], ...]` of every markdown table row in `text` (separator rows left out)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and line.endswith("|") and not set(line) <= set("|-: "):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


MARKERS = {section: (f"<!-- compare-{section}:begin -->", f"<!-- compare-{section}:end -->")
           for section in SECTIONS}  # fmt: skip
TITLES = {
    "inference": "Cold start and steady inference (CPU)",
    "training": "Training with `fit` (CPU)",
    "input": "Training input pipeline (CPU)",
}


# ---------------------------------------------------------------------------------------- CLI


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--runners", nargs="+", choices=RUNNERS, default=list(RUNNERS),
                        help="inference runners (timm is always kept: the ratios need it)")
    parser.add_argument("--train-runners", nargs="+", choices=RUNNERS,
                        default=["timm", "tensorflow", "jax", "torch"])
    parser.add_argument("--isa", nargs="+", choices=sorted(ISAS), default=["native", "avx2"],
                        help="instruction sets the inference section runs under")
    parser.add_argument("--model", default="coat_lite_small")
    parser.add_argument("--model-config", type=json.loads,
                        help="JSON arguments of keras_coat.CoaTBackbone and timm's CoaT "
                        "replacing --model (e.g. a tiny model for quick checks)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3, help="inference rounds")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=8.0,
                        help="timed seconds per batch size at most (3 calls at least)")
    parser.add_argument("--train-rounds", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-warmup", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--input-rounds", type=int, default=3)
    parser.add_argument("--input-images", type=int, default=320)
    parser.add_argument("--input-batch", type=int, default=32)
    parser.add_argument("--input-warmup", type=int, default=4)
    parser.add_argument("--input-batches", type=int, default=12)
    parser.add_argument("--profile", choices=RUNNERS,
                        help="print where this runner's steady batch goes, and nothing else")
    parser.add_argument("--batch", type=int, default=8, help="the profiled batch size")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny CoaT-Lite at 64x64, one short round of every section")
    parser.add_argument("--threads", type=int,
                        help="pin every runner to this many cores and size its thread pools to "
                        "them (default: each runtime's own choice, every core)")
    parser.add_argument("--timeout", type=float, default=WORKER_TIMEOUT_S,
                        help="seconds after which a worker process is stopped")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    parser.add_argument("--results", default=RESULTS, help="the markdown file written")
    parser.add_argument("--no-write", action="store_true", help="print only")
    worker = parser.add_argument_group("worker (internal)")
    worker.add_argument("--worker", choices=("setup", "inference", "training", "input", "isa",
                                             "profile"), help=argparse.SUPPRESS)  # fmt: skip
    worker.add_argument("--runner", help=argparse.SUPPRESS)
    worker.add_argument("--spec", type=json.loads, help=argparse.SUPPRESS)
    worker.add_argument("--folder", help=argparse.SUPPRESS)
    worker.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)
    worker.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    return parser


def _apply_quick(args):
    args.model_config = args.model_config or QUICK_CONFIG
    args.size = 64
    args.rounds = args.train_rounds = args.input_rounds = 1
    args.warmup, args.repeats, args.max_seconds = 1, 2, 2.0
    args.train_batch, args.train_warmup, args.train_steps = 4, 1, 1
    args.input_images, args.input_batch, args.input_warmup, args.input_batches = 24, 8, 1, 2


def _check(parser, args):
    for name in ("rounds", "repeats", "train_rounds", "train_batch", "train_steps",
                 "input_rounds", "input_images", "input_batch", "input_batches", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup", "train_warmup", "input_warmup"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0")
    if any(b < 1 for b in args.batches):
        parser.error("--batches must be positive")
    if args.size < 32 or args.size % 32:
        parser.error("--size must be a positive multiple of 32")


def _worker_main(args):
    """Runs in the worker process: one measurement, printed as one JSON line."""
    threads = int(os.environ.get("COMPARE_THREADS", 0))
    if threads and args.worker != "input":
        # The last `threads` cores, before any runtime sizes its thread pools.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[-threads:])
    kinds = {"setup": _setup_worker, "inference": _inference_worker,
             "training": _training_worker, "input": _input_worker, "isa": _isa_worker,
             "profile": _profile_worker}  # fmt: skip
    if args.worker == "setup":
        return kinds["setup"](args) or 0
    result = kinds[args.worker](args)
    print(RESULT_PREFIX + json.dumps(result))
    return 0


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker:
        return _worker_main(args)
    if args.quick:
        _apply_quick(args)
    _check(parser, args)
    args.spec = ({"config": args.model_config, "size": args.size} if args.model_config else
                 {"variant": args.model, "size": args.size})  # fmt: skip
    if "timm" not in args.runners:
        args.runners = ["timm"] + list(args.runners)
    if "timm" not in args.train_runners:
        args.train_runners = ["timm"] + list(args.train_runners)

    if args.profile:
        args.folder = ""
        result = run_worker("profile", args.profile, args, args.isa[0], batch=args.batch)
        if "error" in result:
            return 1
        print(render_profile(args.profile, result, args))
        return 0

    started = time.perf_counter()
    record = {"machine": machine_line(), "versions": versions(), "spec": args.spec}
    tables = {}
    with tempfile.TemporaryDirectory(prefix="compare-") as folder:
        args.folder = folder
        if "inference" in args.sections:
            setup = run_worker("setup", "tensorflow", args)
            if "error" in setup:
                print("setup failed: the inference section needs its files", file=sys.stderr)
                return 1
            record["isa_checks"] = {isa: check_isa(isa) for isa in args.isa}
            record["inference"] = {isa: measure_inference(args, isa) for isa in args.isa}
            tables["inference"] = inference_table(record["inference"], args,
                                                  record["isa_checks"])  # fmt: skip
        if "training" in args.sections:
            record["training"] = measure_training(args)
            tables["training"] = training_table(record["training"], args)
        if "input" in args.sections:
            record["input"] = measure_input(args)
            tables["input"] = input_table(record["input"], args)
    elapsed = time.perf_counter() - started
    for section, table in tables.items():
        print(f"\n## {TITLES[section]}\n\n{table}")
        if not args.no_write:
            write_results_section(*MARKERS[section], TITLES[section], table, args.results)
    print(f"\n(measured in {elapsed / 60:.1f} minutes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
