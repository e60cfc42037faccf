"""The tf.data input pipelines of training, built from small named steps, over the data sets
that `keras_coat.datasets` reads (`load_source`: ``digits``, ``folder:PATH``, ``tfds:NAME`` or a
bare TFDS name such as ``imagenet2012``, whose manual archives come from ``--manual-dir``).

Pipelines have static shapes and `drop_remainder=True` everywhere (TPU-ready). The training
pipeline is a function of (seed, epoch, position) only: each epoch is shuffled with its own seed
and every example gets its own augmentation seed, so a resumed run sees the same batches as an
uninterrupted one. The validation pipeline pads the last batch with weight-0 examples and scales
the real examples' weights so that Keras' batch-averaged loss and weighted accuracy are exact
means over the real examples.
"""

import math
import os

import tensorflow as tf

from keras_coat.datasets import Source, Split, load_source  # noqa: F401  (training's names)
from keras_coat.tf_images import eval_transform, graph_function
from training import augment, batch_augment

AUTOTUNE = tf.data.AUTOTUNE
# Every function the pipelines give tf.data goes through `graph_function`: none needs AutoGraph's
# conversion, which was most of a pipeline's set-up (keras_coat.tf_images says why).
SHUFFLE_BUFFER = 16_384


# ----------------------------------------------------------------------------------------------
# Pipelines


def steps_per_epoch(recipe, source, max_steps=None):
    """Full batches per epoch (the remainder is dropped), optionally capped at `max_steps`;
    ValueError if `source` cannot train a classifier with `recipe`."""
    if source.num_classes < 2:
        raise ValueError(
            f"{source.name} has {source.num_classes} class(es); a classifier needs at least two "
            "(folder data sets: one folder of images per class)."
        )
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
                graph_function(lambda r: tf.data.Dataset.from_tensors(r).repeat(repeats))
            )
        # Positions count from the epoch's first example, skipped or not: each example's
        # augmentation is a function of (seed, epoch, position).
        records = records.take(steps * recipe.batch_size).enumerate()
        if skipped_steps:
            records = records.skip(skipped_steps * recipe.batch_size)
        if keep is not None:
            records = records.filter(graph_function(lambda i, r: keep(i)))
        examples = records.map(
            graph_function(
                lambda i, r: transform.example(split, r, augment.fold_in(epoch_seed, 1, i))
            ),
            num_parallel_calls=AUTOTUNE,
            deterministic=True,
        )
        batches = examples.batch(local_batch, drop_remainder=True)
        batch_seed = epoch_seed if keep is None else augment.fold_in(epoch_seed, 3, process_index)
        return batches.enumerate(start=skipped_steps).map(
            graph_function(
                lambda i, batch: transform.batch(*batch, augment.fold_in(batch_seed, 2, i))
            ),
            num_parallel_calls=AUTOTUNE,
            deterministic=True,
        )

    whole_from = start_epoch + 1 if start_step else start_epoch
    whole_epochs = tf.data.Dataset.range(whole_from, max(whole_from, end_epoch))
    dataset = whole_epochs.flat_map(graph_function(lambda i: epoch(i, 0)))
    if start_step:
        rest_of_first = tf.data.Dataset.range(start_epoch, start_epoch + 1)
        rest = rest_of_first.flat_map(graph_function(lambda i: epoch(i, start_step)))
        dataset = rest.concatenate(dataset)
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
        image = eval_transform(
            example["image"], size, recipe.eval_crop_pct, recipe.eval_crop_mode
        )
        return image, tf.one_hot(example["label"], source.num_classes), tf.constant(weight)

    records, padding_count = split.records, padded - count
    if keep is not None:  # only this process's examples are decoded
        records = records.enumerate().filter(graph_function(lambda i, _: keep(i))).map(
            graph_function(lambda _, r: r)
        )
        padding_count = sum(1 for i in range(count, padded) if keep(i))
    examples = records.map(
        graph_function(transform), num_parallel_calls=AUTOTUNE, deterministic=True
    )
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
