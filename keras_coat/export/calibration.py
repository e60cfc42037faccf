"""Images to calibrate a full-integer export and to measure its agreement with the float model.

`load_calibration_images(source, image_size, count)` reads ``(calibration, held_out)`` float32
pixel arrays ``[N, H, W, 3]`` in [0, 255] from a source the command line names:

``digits``
    scikit-learn's 8x8 digit scans (the ``train`` extra), enlarged to the model's size; the
    fixed stratified split of training's ``digits`` data set (its held-out scans measure).
``folder:PATH``
    the image files under PATH (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, any depth), with the
    evaluation transform; ``PATH/train`` calibrates and ``PATH/val`` (or ``validation``)
    measures when both exist, otherwise a fixed tenth of the files measures.
``tfds:NAME``
    a TensorFlow Datasets data set (``tensorflow-datasets``, prepared in its data folder), its
    ``train`` split calibrating and its ``validation`` (or ``test``) split measuring.
"""

import os

import numpy as np
import tensorflow as tf

from keras_coat.imagenet import DEFAULT_CROP_PCT, eval_transform, load_image

SOURCES = "digits, folder:PATH or tfds:NAME"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# The held-out share of a folder without train/val subfolders, and of the digits.
FOLDER_HELD_OUT = 0.1
DIGITS_HELD_OUT = 0.2
# Held-out images read at most.
HELD_OUT_IMAGES = 360
SEED = 0


def load_calibration_images(source, image_size, count=200, crop_pct=DEFAULT_CROP_PCT):
    """``(calibration, held_out)``: `count` images of `source`'s training part (a fixed
    shuffle) and up to ``HELD_OUT_IMAGES`` of its held-out part, float32 ``[N, H, W, 3]``.

    Args:
        source: ``"digits"``, ``"folder:PATH"`` or ``"tfds:NAME"``.
        image_size: an int or ``(height, width)``: the model's input size.
        count: how many calibration images.
        crop_pct: the evaluation crop of folder and TFDS images.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if not isinstance(source, str) or not (
        source == "digits" or source.startswith(("folder:", "tfds:"))
    ) or source in ("folder:", "tfds:"):
        raise ValueError(f"Unknown calibration source {source!r}; use {SOURCES}.")
    if source == "digits":
        return _digits(height, width, count)
    if source.startswith("folder:"):
        return _folder(source[len("folder:") :], (height, width), count, crop_pct)
    return _tfds(source[len("tfds:") :], (height, width), count, crop_pct)


def _digits(height, width, count):
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ValueError(
            "The calibration source 'digits' needs scikit-learn: pip install scikit-learn"
        ) from error
    digits = load_digits()
    images = digits.images.astype(np.float32) * (255.0 / 16.0)  # 0..16 -> 0..255
    train, held_out = train_test_split(
        images, test_size=DIGITS_HELD_OUT, random_state=SEED, stratify=digits.target
    )

    def rgb(scans):
        enlarged = tf.image.resize(np.repeat(scans[..., None], 3, axis=-1), (height, width),
                                   method="bicubic")
        return np.round(np.clip(enlarged.numpy(), 0.0, 255.0)).astype(np.float32)

    order = np.random.default_rng(SEED).permutation(len(train))[:count]
    return rgb(train[order]), rgb(held_out[:HELD_OUT_IMAGES])


def _image_files(root):
    files = []
    for folder, _, names in sorted(os.walk(root)):
        files.extend(
            os.path.join(folder, name) for name in sorted(names)
            if name.lower().endswith(IMAGE_EXTENSIONS)
        )
    return files


def _folder(path, size, count, crop_pct):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"The calibration folder {path!r} is not a directory.")
    validation = next(
        (os.path.join(path, d) for d in ("val", "validation")
         if os.path.isdir(os.path.join(path, d))),
        None,
    )
    if os.path.isdir(os.path.join(path, "train")) and validation:
        train, held_out = _image_files(os.path.join(path, "train")), _image_files(validation)
    else:
        files = _image_files(path)
        order = np.random.default_rng(SEED).permutation(len(files))
        split = int(round(len(files) * FOLDER_HELD_OUT))
        held_out = [files[i] for i in order[:split]]
        train = [files[i] for i in order[split:]]
    if not train:
        raise ValueError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) to calibrate with under {path!r}."
        )
    train = [train[i] for i in np.random.default_rng(SEED).permutation(len(train))[:count]]

    def read(files):
        images = [load_image(file, size, crop_pct) for file in files]
        return np.stack(images).astype(np.float32) if images else None

    return read(train), read(held_out[:HELD_OUT_IMAGES])


def _tfds(name, size, count, crop_pct):
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ValueError(
            "The calibration source 'tfds:...' needs tensorflow-datasets: "
            "pip install tensorflow-datasets"
        ) from error
    builder = tfds.builder(name)
    try:
        builder.download_and_prepare()
    except Exception as error:  # TFDS raises many types (network, manual data missing, ...)
        raise ValueError(
            f"Could not prepare the TFDS data set {name!r} in {builder.data_dir}: {error}"
        ) from error
    splits = builder.info.splits or {"train": None, "validation": None}
    validation = next((s for s in ("validation", "test") if s in splits), None)
    if "train" not in splits or validation is None:
        raise ValueError(
            f"TFDS data set {name!r} needs a 'train' and a 'validation' or 'test' split; it has "
            f"{sorted(splits)}."
        )
    image_key = (builder.info.supervised_keys or ("image",))[0]

    def read(split, take, shuffle):
        records = builder.as_dataset(split=split, shuffle_files=False)
        if shuffle:
            records = records.shuffle(10_000, seed=SEED)
        records = records.take(take).map(
            lambda example: eval_transform(
                tf.ensure_shape(example[image_key], (None, None, 3)), size, crop_pct
            )
        )
        return np.stack(list(records.as_numpy_iterator())).astype(np.float32)

    return read("train", count, shuffle=True), read(validation, HELD_OUT_IMAGES, shuffle=False)
