"""Data sources and the tf.data input pipelines, built from small named steps.

Sources (`load_source`):
  * `digits`: scikit-learn's 1,797 real 8x8 handwritten digit scans (bundled, no download),
    upscaled to the image size, grayscale to RGB, [0, 255]; a stratified 80/20 split with a fixed
    seed gives 1,437 training and 360 held-out images.
  * `folder:PATH`: an image-folder tree, `PATH/train/<class>/*` and `PATH/val/<class>/*` (or
    `validation/`); with no such split, `PATH/<class>/*` and a fixed-seed 10% held out.
  * any TFDS image classification dataset by name (`imagenet2012`, `cifar10`, ...): `train` and
    `validation` (or `test`). Manual datasets read their archives from `--manual-dir` (TFDS'
    `manual_dir`, by default `<data_dir>/downloads/manual`).

Pipelines have static shapes and `drop_remainder=True` everywhere (TPU-ready). The training
pipeline is a function of (seed, epoch, position) only: each epoch is shuffled with its own seed
and every example gets its own augmentation seed, so a resumed run sees the same batches as an
uninterrupted one. The validation pipeline pads the last batch with weight-0 examples and scales
the real examples' weights so that Keras' batch-averaged loss and weighted accuracy are exact
means over the real examples.
"""

import dataclasses
import math
import os

import numpy as np
import tensorflow as tf

from training import augment, batch_augment
from training.tf_eval_transform import eval_transform

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DIGITS_SPLIT_SEED = 0
DIGITS_HELD_OUT = 0.2
FOLDER_HELD_OUT = 0.1
SHUFFLE_BUFFER = 16_384


@dataclasses.dataclass
class Split:
    """Records of one split and how to turn a record into {"image": uint8 HxWx3, "label"};
    `encoded` gives a record's encoded image bytes where records hold files (else None)."""

    records: tf.data.Dataset
    num_examples: int
    decode: callable
    encoded: callable = None


@dataclasses.dataclass
class Source:
    name: str
    train: Split
    validation: Split
    class_names: list

    @property
    def num_classes(self):
        return len(self.class_names)


def load_source(name, image_size, data_dir=None, manual_dir=None):
    """The dataset called `name` (see the module docstring)."""
    if name == "digits":
        return _digits_source(image_size)
    if name.startswith("folder:"):
        return _folder_source(name[len("folder:") :])
    return _tfds_source(name, data_dir, manual_dir)


def load_evaluation_split(spec, image_size, data_dir=None, manual_dir=None):
    """The images `training.evaluate` measures: ``(split, class names, name)``.

    `spec`: ``digits`` (the held-out scans), ``folder:PATH`` (``PATH/val`` or
    ``PATH/validation`` when there is one, else every image of PATH's class folders, as timm's
    ImageFolder reads ImageNet's ``val/<wnid>/*.JPEG``) or ``tfds:NAME[:SPLIT]`` (default split:
    validation, else test).
    """
    if spec == "digits":
        source = _digits_source(image_size)
        return source.validation, source.class_names, "digits (held-out scans)"
    if spec.startswith("folder:") and spec != "folder:":
        path = spec[len("folder:") :]
        if not os.path.isdir(path):
            raise FileNotFoundError(f"folder dataset: {path!r} is not a directory.")
        root = next(
            (os.path.join(path, d) for d in ("val", "validation")
             if os.path.isdir(os.path.join(path, d))),
            path,
        )  # fmt: skip
        class_names = _class_names(root)
        files, labels = _list_images(root, class_names)
        return _file_split(files, labels), class_names, f"folder:{root}"
    if spec.startswith("tfds:") and spec.strip(":") != "tfds":
        name, _, split_name = spec[len("tfds:") :].partition(":")
        builder = _prepared_tfds_builder(name, data_dir, manual_dir)
        splits = builder.info.splits or {"validation": None}
        split_name = split_name or next((s for s in ("validation", "test") if s in splits), "")
        if not split_name:
            raise ValueError(
                f"TFDS dataset {name!r} has no 'validation' or 'test' split ({sorted(splits)}); "
                f"name one: tfds:{name}:SPLIT."
            )
        if builder.info.splits and split_name.split("[")[0] not in splits:
            raise ValueError(
                f"TFDS dataset {name!r} has no split {split_name!r}; it has {sorted(splits)}."
            )
        split, class_names = _tfds_split(builder, split_name)
        return split, class_names, f"tfds:{name}:{split_name}"
    raise ValueError(
        f"Unknown data {spec!r}; use folder:PATH, tfds:NAME[:SPLIT] or digits."
    )


def digits_split():
    """scikit-learn's digit scans as (train images, held-out images, train labels, held-out
    labels): [N, 8, 8] float32 in [0, 255] and int64 labels, the fixed stratified split every
    digits-based data set uses (the held-out scans are never trained on)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) * (255.0 / 16.0)  # 0..16 -> 0..255
    return train_test_split(
        images,
        digits.target.astype(np.int64),
        test_size=DIGITS_HELD_OUT,
        random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )


def _digits_source(image_size):
    def rgb_at_image_size(images):
        images = np.repeat(images[..., None], 3, axis=-1)
        images = augment.resize(images, (image_size, image_size)).numpy()
        return np.round(images).astype(np.uint8)

    x_train, x_val, y_train, y_val = digits_split()
    x_train, x_val = rgb_at_image_size(x_train), rgb_at_image_size(x_val)

    def split(x, y):
        records = tf.data.Dataset.from_tensor_slices({"image": x, "label": y})
        return Split(records, len(y), decode=lambda record: record)

    return Source(
        "digits", split(x_train, y_train), split(x_val, y_val), [str(d) for d in range(10)]
    )


def _folder_source(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"folder dataset: {path!r} is not a directory.")
    subdirs = {d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))}
    validation_dir = next((d for d in ("val", "validation") if d in subdirs), None)
    if "train" in subdirs and validation_dir:
        class_names = _class_names(os.path.join(path, "train"))
        train = _list_images(os.path.join(path, "train"), class_names)
        validation = _list_images(os.path.join(path, validation_dir), class_names)
    else:
        class_names = _class_names(path)
        files, labels = _list_images(path, class_names)
        order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(files))
        held_out = max(1, int(round(len(files) * FOLDER_HELD_OUT)))
        if held_out >= len(files):
            raise ValueError(f"folder dataset {path!r}: too few images to hold some out.")
        val_idx, train_idx = order[:held_out], order[held_out:]
        train = ([files[i] for i in train_idx], [labels[i] for i in train_idx])
        validation = ([files[i] for i in val_idx], [labels[i] for i in val_idx])

    return Source(f"folder:{path}", _file_split(*train), _file_split(*validation), class_names)


def _file_split(files, labels):
    records = tf.data.Dataset.from_tensor_slices(
        {"path": np.array(files), "label": np.array(labels, np.int64)}
    )
    return Split(
        records,
        len(files),
        decode=_read_image_file,
        encoded=lambda record: tf.io.read_file(record["path"]),
    )


def _class_names(root):
    names = sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d not in ("train",)
    )
    if not names:
        raise ValueError(f"folder dataset: no class directories in {root!r}.")
    return names


def _list_images(root, class_names):
    files, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(root, name)
        if not os.path.isdir(class_dir):
            continue
        for file in sorted(os.listdir(class_dir)):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(class_dir, file))
                labels.append(label)
    if not files:
        raise ValueError(
            f"folder dataset: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}."
        )
    return files, labels


def _read_image_file(record):
    return {"image": _decode_image(tf.io.read_file(record["path"])), "label": record["label"]}


def _decode_image(encoded):
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.ensure_shape(image, (None, None, 3))


def _tfds_source(name, data_dir, manual_dir):
    builder = _prepared_tfds_builder(name, data_dir, manual_dir)
    # Without generation metadata (e.g. under tfds.testing.mock_data) TFDS knows no splits and
    # accepts any name: take the usual ones and count their examples.
    splits = builder.info.splits or {"train": None, "validation": None}
    validation_split = next((s for s in ("validation", "test") if s in splits), None)
    if "train" not in splits or validation_split is None:
        raise ValueError(
            f"TFDS dataset {name!r} needs a 'train' and a 'validation' or 'test' split; it has "
            f"{sorted(splits)}."
        )
    train, class_names = _tfds_split(builder, "train")
    return Source(name, train, _tfds_split(builder, validation_split)[0], class_names)


def _prepared_tfds_builder(name, data_dir, manual_dir):
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    except Exception as error:  # TFDS raises many types (network, manual data missing, ...)
        raise RuntimeError(
            f"Could not prepare the TFDS dataset {name!r} in {builder.data_dir}: {error}\n"
            "Datasets that need a download must be prepared beforehand on a machine with network "
            "access (`tfds build`); manual datasets such as imagenet2012 read their archives from "
            "--manual-dir."
        ) from error
    return builder


def _tfds_split(builder, split_name):
    """(Split, class names) of the split `split_name` of a prepared TFDS builder."""
    import tensorflow_datasets as tfds

    info = builder.info
    image_key, label_key = info.supervised_keys or ("image", "label")
    records = builder.as_dataset(
        split=split_name,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=0),
        shuffle_files=split_name == "train",
    ).map(lambda ex: {"image": ex[image_key], "label": ex[label_key]})

    def decode(record):
        return {"image": _decode_image(record["image"]), "label": record["label"]}

    if info.splits:
        count = info.splits[split_name].num_examples
    else:
        count = int(records.reduce(0, lambda n, _: n + 1))
    split = Split(records, count, decode, encoded=lambda record: record["image"])
    return split, info.features[label_key].names


# ----------------------------------------------------------------------------------------------
# Pipelines


def steps_per_epoch(recipe, source, max_steps=None):
    """Full batches per epoch (the remainder is dropped), optionally capped at `max_steps`."""
    steps = source.train.num_examples // recipe.batch_size
    if steps == 0:
        raise ValueError(
            f"The global batch size {recipe.batch_size} is larger than the training split "
            f"({source.train.num_examples} examples) of {source.name}."
        )
    return min(steps, max_steps) if max_steps else steps


class TrainTransform:
    """Named steps of the training pipeline, in order.

    Per example: random_resized_crop (bicubic; JPEGs decode only the crop window) ->
    horizontal_flip -> color_jitter (only without RandAugment, as in timm) -> one_hot, images
    rounded to uint8 as PIL's. Then per batch: rand_augment (uint8) -> float32 ->
    random_erasing -> mixup_cutmix (`training.batch_augment`, timm's ops with per-example
    parameters). Images stay in [0, 255] (the model normalizes) except for the erased boxes,
    whose noise is N(0, 1) after normalization.
    """

    def __init__(self, recipe, num_classes):
        self.recipe = recipe
        self.num_classes = num_classes
        self.rand_augment = (
            batch_augment.RandAugment(recipe.rand_augment_magnitude, recipe.rand_augment_ops)
            if recipe.rand_augment_magnitude is not None
            else None
        )
        # timm ignores the colour jitter when RandAugment is on; so do we.
        self.color_jitter = (
            augment.ColorJitter(recipe.color_jitter)
            if recipe.color_jitter and self.rand_augment is None
            else None
        )
        self.random_erasing = (
            batch_augment.RandomErasing(recipe.random_erasing) if recipe.random_erasing else None
        )
        self.mixing = (
            batch_augment.BatchMixing(recipe.mixup, recipe.cutmix, recipe.mixup_switch_prob)
            if recipe.mixup or recipe.cutmix
            else None
        )

    @property
    def step_names(self):
        names = ["random_resized_crop"]
        names += ["horizontal_flip"] if self.recipe.horizontal_flip else []
        names += ["color_jitter"] if self.color_jitter else []
        names += ["one_hot", "batch"]
        names += ["rand_augment"] if self.rand_augment else []
        names += ["random_erasing"] if self.random_erasing else []
        return names + (["mixup_cutmix"] if self.mixing else [])

    def example(self, split, record, seed):
        """One training example (image, one-hot label) from a record of `split`."""
        r = self.recipe
        crop_seed = augment.fold_in(seed, 0)
        if split.encoded is not None:
            image = augment.decode_random_resized_crop(
                split.encoded(record), crop_seed, r.image_size, r.crop_scale, r.crop_ratio
            )
        else:
            image = augment.random_resized_crop(
                split.decode(record)["image"], crop_seed, r.image_size, r.crop_scale, r.crop_ratio
            )
        if r.horizontal_flip:
            image = augment.horizontal_flip(image, augment.fold_in(seed, 1))
        if self.color_jitter:
            image = self.color_jitter(image, augment.fold_in(seed, 3))
        # uint8, as PIL's images: a batch then moves with a quarter of float32's memory traffic.
        image = tf.cast(tf.round(image), tf.uint8)
        image = tf.ensure_shape(image, (r.image_size, r.image_size, 3))
        return image, tf.one_hot(record["label"], self.num_classes)

    def batch(self, images, labels, seed):
        """The batch-level steps on a batch of `example` outputs."""
        if self.rand_augment:
            images = self.rand_augment(images, augment.fold_in(seed, 2))
        images = tf.cast(images, tf.float32)
        if self.random_erasing:
            images = self.random_erasing(images, augment.fold_in(seed, 4))
        if self.mixing:
            images, labels = self.mixing(images, labels, augment.fold_in(seed, 5))
        return images, labels


def pipeline_options():
    """tf.data options of the training pipeline: deterministic order, autotuned parallelism on
    a private thread pool over this process's cores, one thread per op (parallelism comes from
    working on several examples and batches at once)."""
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count())
    options.threading.private_threadpool_size = len(cores)
    options.threading.max_intra_op_parallelism = 1
    return options


def process_slice(batch_size, process_index, num_processes):
    """(slice size, keep) for the process `process_index` of `num_processes`, which feeds
    examples [index * size, (index + 1) * size) of every global batch of `batch_size`;
    `keep(position)` tells whether an example at `position` in the stream is this process's."""
    if batch_size % num_processes:
        raise ValueError(
            f"The global batch size {batch_size} must be a multiple of the number of processes "
            f"({num_processes})."
        )
    size = batch_size // num_processes
    if num_processes == 1:
        return size, None
    return size, lambda position: (position % batch_size) // size == process_index


def train_dataset(
    recipe,
    source,
    seed,
    start_epoch=0,
    max_steps=None,
    process_index=0,
    num_processes=1,
    start_step=0,
    end_epoch=None,
):
    """Batches of (images, one-hot labels) for epochs `start_epoch` .. `end_epoch - 1` (default:
    the recipe's last), the first of them from its batch `start_step` on.

    Exactly `steps_per_epoch` batches per epoch; epoch `e` is the same whatever `start_epoch` is,
    and its batches from `start_step` on are the same whatever `start_step` is (a run resumed
    within an epoch sees the batches an uninterrupted one would). The examples of the
    `start_step` batches skipped are neither decoded nor augmented.
    Of `num_processes`, process `process_index` gets its slice of every global batch, decoding
    and augmenting only its own examples; batch-level augmentation (RandAugment, random erasing,
    Mixup/CutMix) then works on that slice, with the slice's own seed, as timm's
    DistributedDataParallel runs do per process.
    """
    steps = steps_per_epoch(recipe, source, max_steps)
    local_batch, keep = process_slice(recipe.batch_size, process_index, num_processes)
    transform = TrainTransform(recipe, source.num_classes)
    split = source.train
    buffer = min(split.num_examples, SHUFFLE_BUFFER)
    repeats = recipe.repeated_augmentations
    run_seed = tf.constant([seed, 0], tf.int64)

    end_epoch = recipe.epochs if end_epoch is None else end_epoch
    if not 0 <= start_step < steps or not start_epoch + bool(start_step) <= end_epoch:
        raise ValueError(
            f"train_dataset: start_step {start_step} of {steps} steps per epoch, epochs "
            f"{start_epoch}..{end_epoch}; allowed: 0 <= start_step < steps per epoch, "
            "start_epoch <= end_epoch (< with a start_step)."
        )

    def epoch(index, skipped_steps):
        # Pin this function graph's seed: with a global seed of 0, TF's get_seed compares the
        # tensor op seed below with 0 as a Python bool and fails.
        tf.random.set_seed(1)
        epoch_seed = augment.fold_in(run_seed, index)
        records = split.records.shuffle(buffer, seed=augment.fold_in(epoch_seed, 0)[0])
        if repeats > 1:
            # Repeated augmentation (DeiT's RASampler): each image `repeats` times in a row, so
            # its copies land in one global batch; the epoch keeps its length.
            records = records.flat_map(
                lambda r: tf.data.Dataset.from_tensors(r).repeat(repeats)
            )
        # Positions count from the epoch's first example, skipped or not: each example's
        # augmentation is a function of (seed, epoch, position).
        records = records.take(steps * recipe.batch_size).enumerate()
        if skipped_steps:
            records = records.skip(skipped_steps * recipe.batch_size)
        if keep is not None:
            records = records.filter(lambda i, r: keep(i))
        examples = records.map(
            lambda i, r: transform.example(split, r, augment.fold_in(epoch_seed, 1, i)),
            num_parallel_calls=AUTOTUNE,
            deterministic=True,
        )
        batches = examples.batch(local_batch, drop_remainder=True)
        batch_seed = epoch_seed if keep is None else augment.fold_in(epoch_seed, 3, process_index)
        return batches.enumerate(start=skipped_steps).map(
            lambda i, batch: transform.batch(*batch, augment.fold_in(batch_seed, 2, i)),
            num_parallel_calls=AUTOTUNE,
            deterministic=True,
        )

    whole_from = start_epoch + 1 if start_step else start_epoch
    dataset = tf.data.Dataset.range(whole_from, max(whole_from, end_epoch)).flat_map(lambda i: epoch(i, 0))
    if start_step:
        rest_of_first = tf.data.Dataset.range(start_epoch, start_epoch + 1)
        dataset = rest_of_first.flat_map(lambda i: epoch(i, start_step)).concatenate(dataset)
    # Stated, so that Keras knows where the data ends (flat_map and filter hide it).
    dataset = dataset.apply(
        tf.data.experimental.assert_cardinality((end_epoch - start_epoch) * steps - start_step)
    )
    return dataset.prefetch(AUTOTUNE).with_options(pipeline_options())


def eval_dataset(recipe, source, batch_size=None, process_index=0, num_processes=1):
    """Batches of (images, one-hot labels, weights) over the whole validation split.

    The last batch is padded with zero images of weight 0; real examples weigh
    `padded_count / count`, which makes Keras' batch-size-weighted mean of the loss the exact
    mean over real examples (weighted metrics are unaffected by the constant factor). Of
    `num_processes`, process `process_index` gets its slice of every global batch.
    """
    batch_size = batch_size or recipe.batch_size
    local_batch, keep = process_slice(batch_size, process_index, num_processes)
    split = source.validation
    count = split.num_examples
    padded = math.ceil(count / batch_size) * batch_size
    weight = padded / count
    size = recipe.image_size

    def transform(record):
        example = split.decode(record)
        image = eval_transform(example["image"], size, recipe.eval_crop_pct)
        return image, tf.one_hot(example["label"], source.num_classes), tf.constant(weight)

    records, padding_count = split.records, padded - count
    if keep is not None:  # only this process's examples are decoded
        records = records.enumerate().filter(lambda i, _: keep(i)).map(lambda _, r: r)
        padding_count = sum(1 for i in range(count, padded) if keep(i))
    examples = records.map(transform, num_parallel_calls=AUTOTUNE, deterministic=True)
    padding = tf.data.Dataset.from_tensors(
        (
            tf.zeros((size, size, 3)),
            tf.zeros((source.num_classes,)),
            tf.constant(0.0),
        )
    ).repeat(padding_count)
    examples = examples.concatenate(padding)
    batches = examples.batch(local_batch, drop_remainder=True)
    batches = batches.apply(tf.data.experimental.assert_cardinality(padded // batch_size))
    return batches.prefetch(AUTOTUNE)
