"""Labelled image data sets as tf.data records: the one reader behind training
(`training.data`), evaluation and the calibration of full-integer exports (`keras_coat.export`).

`load_source(spec, image_size)` reads a `Source`, a training and a held-out `Split` of records,
from one of:

``digits``
    scikit-learn's 1,797 real 8x8 handwritten digit scans (bundled, no download; the ``train``
    extra), upscaled (bicubic) to `image_size`, grayscale to RGB, uint8; a stratified 80/20
    split with a fixed seed gives 1,437 training and 360 held-out images.
``folder:PATH``
    image files in class folders, as Keras' ``image_dataset_from_directory`` reads them: each
    folder under PATH is a class (its images at any depth), with ``PATH/train/`` and
    ``PATH/val/`` (or ``validation/``) as the two splits when both exist, else a fixed-seed 10%
    of PATH's images held out. Images directly in a folder that has no class folders form one
    unnamed class. Only regular files with an `IMAGE_EXTENSIONS` ending of at most
    `MAX_IMAGE_FILE_BYTES` are read; hidden files and folders are skipped.
``tfds:NAME[:SPLIT]`` (or a bare ``NAME``)
    a TensorFlow Datasets image classification data set (``tensorflow-datasets``): its
    ``train`` split and, held out, SPLIT (default ``validation``, else ``test``). Data sets that
    need a download must be prepared beforehand; manual ones (imagenet2012) read their archives
    from `manual_dir`.

Encoded images are decoded by `keras_coat.tf_images.decode_image`: JPEG, PNG or BMP, their size
checked from the header before decoding, errors naming the file. This module imports
TensorFlow: only the exports and training use it.
"""

import dataclasses
import os
import stat

import numpy as np
import tensorflow as tf

from keras_coat.tf_images import decode_image

__all__ = [
    "IMAGE_EXTENSIONS", "SOURCES", "Source", "Split", "digits_split", "load_held_out",
    "load_source",
]

SOURCES = "digits, folder:PATH or tfds:NAME[:SPLIT]"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# Largest image file listed (a 64-megapixel PNG is under 200 MB); larger ones are refused before
# anything reads them.
MAX_IMAGE_FILE_BYTES = 256 * 2**20
SPLIT_SEED = 0
DIGITS_HELD_OUT = 0.2
FOLDER_HELD_OUT = 0.1
VALIDATION_FOLDERS = ("val", "validation")


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


def load_source(spec, image_size=None, data_dir=None, manual_dir=None):
    """The data set `spec` names (see the module docstring).

    Args:
        spec: ``"digits"``, ``"folder:PATH"``, ``"tfds:NAME[:SPLIT]"`` or a TFDS name.
        image_size: an int or ``(height, width)``: the size the digits are made at (other
            sources keep their images' own sizes).
        data_dir, manual_dir: TFDS's data and manual folders.
    """
    if not isinstance(spec, str) or spec in ("", "folder:", "tfds:"):
        raise ValueError(f"Unknown data set {spec!r}; use {SOURCES}.")
    if spec == "digits":
        if image_size is None:
            raise ValueError("The digits data set needs the image size to make its images at.")
        return _digits_source(image_size)
    if spec.startswith("folder:"):
        return _folder_source(spec[len("folder:") :])
    name, _, split = spec[len("tfds:") :].partition(":") if spec.startswith("tfds:") else (
        spec, "", ""
    )
    return _tfds_source(name, split or None, data_dir, manual_dir)


def load_held_out(spec, image_size=None, data_dir=None, manual_dir=None):
    """The images an evaluation measures, as ``(split, class names, name)``.

    ``digits``: the 360 held-out scans. ``folder:PATH``: ``PATH/val`` (or ``validation``) when
    there is one, else every image of PATH's class folders (as timm's ImageFolder reads
    ImageNet's ``val/<wnid>/*.JPEG``): nothing is held back. ``tfds:NAME[:SPLIT]``: SPLIT
    (default ``validation``, else ``test``).
    """
    if isinstance(spec, str) and spec.startswith("folder:") and spec != "folder:":
        path = spec[len("folder:") :]
        if not os.path.isdir(path):
            raise FileNotFoundError(f"folder data set: {path!r} is not a directory.")
        root = next((os.path.join(path, d) for d in VALIDATION_FOLDERS
                     if os.path.isdir(os.path.join(path, d))), path)  # fmt: skip
        class_names, files = _list_classes(root)
        split = _file_split([f for f, _ in files], [label for _, label in files])
        return split, class_names, f"folder:{root}"
    if not (isinstance(spec, str) and (spec == "digits" or spec.startswith("tfds:"))):
        raise ValueError(f"Unknown data {spec!r}; use folder:PATH, tfds:NAME[:SPLIT] or digits.")
    source = load_source(spec, image_size, data_dir, manual_dir)
    return source.validation, source.class_names, (
        "digits (held-out scans)" if spec == "digits" else spec
    )


# ----------------------------------------------------------------------------------- digits


def digits_split():
    """scikit-learn's digit scans as (train images, held-out images, train labels, held-out
    labels): [N, 8, 8] float32 in [0, 255] and int64 labels, the fixed stratified split every
    digits-based data set uses (the held-out scans are never trained on)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ValueError(
            "The digits data set needs scikit-learn (pip install scikit-learn)."
        ) from error

    digits = load_digits()
    images = digits.images.astype(np.float32) * (255.0 / 16.0)  # 0..16 -> 0..255
    return train_test_split(
        images,
        digits.target.astype(np.int64),
        test_size=DIGITS_HELD_OUT,
        random_state=SPLIT_SEED,
        stratify=digits.target,
    )


def _digits_source(image_size):
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)

    def rgb_at_image_size(scans):
        enlarged = tf.image.resize(np.repeat(scans[..., None], 3, axis=-1), size, "bicubic")
        return np.round(np.clip(enlarged.numpy(), 0.0, 255.0)).astype(np.uint8)

    x_train, x_val, y_train, y_val = digits_split()

    def split(x, y):
        records = tf.data.Dataset.from_tensor_slices({"image": rgb_at_image_size(x), "label": y})
        return Split(records, len(y), decode=lambda record: record)

    return Source("digits", split(x_train, y_train), split(x_val, y_val),
                  [str(d) for d in range(10)])  # fmt: skip


# ----------------------------------------------------------------------------------- folders


def _folder_source(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"folder data set: {path!r} is not a directory.")
    validation_dir = next(
        (d for d in VALIDATION_FOLDERS if os.path.isdir(os.path.join(path, d))), None
    )
    if os.path.isdir(os.path.join(path, "train")) and validation_dir:
        class_names, train = _list_classes(os.path.join(path, "train"))
        held_out_names, validation = _list_classes(os.path.join(path, validation_dir))
        unknown = sorted(set(held_out_names) - set(class_names))
        if unknown:
            raise ValueError(
                f"folder data set {path!r}: {validation_dir}/ has classes that train/ lacks: "
                f"{unknown}."
            )
        index = {name: i for i, name in enumerate(class_names)}
        validation = ([f for f, _ in validation], [index[held_out_names[label]]
                                                    for _, label in validation])  # fmt: skip
        train = ([f for f, _ in train], [label for _, label in train])
    else:
        class_names, files = _list_classes(path)
        order = np.random.RandomState(SPLIT_SEED).permutation(len(files))
        held_out = max(1, int(round(len(files) * FOLDER_HELD_OUT)))
        if held_out >= len(files):
            raise ValueError(
                f"folder data set {path!r}: {len(files)} image(s), too few to hold some out."
            )
        validation = ([files[i][0] for i in order[:held_out]],
                      [files[i][1] for i in order[:held_out]])  # fmt: skip
        train = ([files[i][0] for i in order[held_out:]], [files[i][1] for i in order[held_out:]])

    return Source(f"folder:{path}", _file_split(*train), _file_split(*validation), class_names)


def _file_split(files, labels):
    records = tf.data.Dataset.from_tensor_slices(
        {"path": np.array(files), "label": np.array(labels, np.int64)}
    )
    return Split(records, len(files), decode=_read_image_file,
                 encoded=lambda record: tf.io.read_file(record["path"]))  # fmt: skip


def _list_classes(root):
    """(class names, [(file, label)]) of a folder of class folders, or of one unnamed class."""
    folders = sorted(
        name for name in os.listdir(root)
        if not name.startswith(".") and os.path.isdir(os.path.join(root, name))
    )  # fmt: skip
    classes = [(name, _image_files(os.path.join(root, name))) for name in folders]
    classes = [(name, files) for name, files in classes if files]
    if not classes:
        loose = _image_files(root, depth=0)
        if not loose:
            raise ValueError(
                f"folder data set: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}."
            )
        classes = [("", loose)]
    names = [name for name, _ in classes]
    return names, [(file, label) for label, (_, files) in enumerate(classes) for file in files]


def _image_files(root, depth=None):
    """The image files under `root` (at any depth; `depth=0`: directly in it), sorted."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [] if depth == 0 else sorted(d for d in subfolders if d[0] != ".")
        for name in sorted(names):
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            file = os.path.join(folder, name)
            try:
                status = os.stat(file)  # follows links: what would be read
            except OSError as error:
                raise ValueError(f"folder data set: cannot read {file!r}: {error}") from None
            if not stat.S_ISREG(status.st_mode):
                raise ValueError(f"folder data set: {file!r} is not a regular file.")
            if status.st_size > MAX_IMAGE_FILE_BYTES:
                raise ValueError(
                    f"folder data set: {file!r} has {status.st_size} bytes, more than the "
                    f"{MAX_IMAGE_FILE_BYTES} an image file may have."
                )
            found.append(file)
    return found


def _read_image_file(record):
    image = decode_image(tf.io.read_file(record["path"]), record["path"])
    return {"image": image, "label": record["label"]}


# -------------------------------------------------------------------------------------- TFDS


def _tfds_source(name, held_out_split, data_dir, manual_dir):
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ValueError(
            f"The data set {name!r} is read with tensorflow-datasets: pip install "
            "tensorflow-datasets"
        ) from error
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # TFDS raises its own types for unknown or malformed names
        raise ValueError(f"No TFDS data set {name!r}: {error}") from None
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    except Exception as error:  # TFDS raises many types (network, manual data missing, ...)
        raise RuntimeError(
            f"Could not prepare the TFDS data set {name!r} in {builder.data_dir}: {error}\n"
            "Data sets that need a download must be prepared beforehand on a machine with "
            "network access (`tfds build`); manual data sets such as imagenet2012 read their "
            "archives from the manual folder (--manual-dir)."
        ) from error
    info = builder.info
    image_key, label_key = info.supervised_keys or ("image", "label")
    # Without generation metadata (e.g. under tfds.testing.mock_data) TFDS knows no splits and
    # accepts any name: take the usual ones and count their examples.
    splits = info.splits or {"train": None, "validation": None}
    held_out_split = held_out_split or next((s for s in ("validation", "test") if s in splits),
                                            None)  # fmt: skip
    if "train" not in splits or held_out_split is None:
        raise ValueError(
            f"TFDS data set {name!r} needs a 'train' and a 'validation' or 'test' split; it has "
            f"{sorted(splits)}."
        )

    def split(split_name):
        try:
            records = builder.as_dataset(
                split=split_name,
                decoders={image_key: tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(shuffle_seed=SPLIT_SEED),
                shuffle_files=split_name == "train",
            )
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"TFDS data set {name!r} has no split {split_name!r}: {error}"
            ) from None
        records = records.map(lambda ex: {"image": ex[image_key], "label": ex[label_key]})

        def decode(record):
            return {"image": decode_image(record["image"], f"an image of {name}"),
                    "label": record["label"]}  # fmt: skip

        try:
            count = splits[split_name].num_examples
        except (KeyError, TypeError, AttributeError):  # a split expression, or no metadata
            count = int(records.reduce(0, lambda n, _: n + 1))
        return Split(records, count, decode, encoded=lambda record: record["image"])

    return Source(name, split("train"), split(held_out_split), info.features[label_key].names)
