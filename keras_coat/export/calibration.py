"""Images to calibrate a full-integer export and to measure its agreement with the float model.

`load_calibration_images(source, image_size, count)` reads ``(calibration, held_out)`` float32
pixel arrays ``[N, H, W, 3]`` in [0, 255] from a data set of `keras_coat.datasets` (``digits``,
``folder:PATH``, ``tfds:NAME[:SPLIT]``): `count` images of its training split (a fixed shuffle)
calibrate, up to `HELD_OUT_IMAGES` of its held-out split measure. Each image goes through the
evaluation transform the model is served with (`keras_coat.tf_images.eval_transform`).
"""

import numpy as np

from keras_coat import datasets
from keras_coat.imagenet import DEFAULT_CROP_PCT
from keras_coat.tf_images import eval_transform

SOURCES = datasets.SOURCES
# Held-out images read at most.
HELD_OUT_IMAGES = 360
# Training images the fixed shuffle draws the calibration images from.
SHUFFLE_BUFFER = 10_000
SEED = 0


def load_calibration_images(
    source, image_size, count=200, crop_pct=DEFAULT_CROP_PCT, crop_mode="center"
):
    """``(calibration, held_out)``: `count` images of `source`'s training split (a fixed
    shuffle) and up to ``HELD_OUT_IMAGES`` of its held-out split, float32 ``[N, H, W, 3]``
    (``held_out`` None when the held-out split is empty).

    Args:
        source: ``"digits"``, ``"folder:PATH"`` or ``"tfds:NAME[:SPLIT]"``.
        image_size: an int or ``(height, width)``: the model's input size.
        count: how many calibration images.
        crop_pct, crop_mode: the model's evaluation crop.
    """
    if not isinstance(source, str) or not (
        source == "digits" or source.startswith(("folder:", "tfds:"))
    ) or source in ("folder:", "tfds:"):
        raise ValueError(f"Unknown calibration source {source!r}; use {SOURCES}.")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    data = datasets.load_source(source, size)

    def read(split, take, shuffle):
        records = split.records
        if shuffle:
            records = records.shuffle(min(split.num_examples, SHUFFLE_BUFFER), seed=SEED)
        images = records.take(take).map(
            lambda record: eval_transform(split.decode(record)["image"], size, crop_pct, crop_mode)
        )
        images = list(images.as_numpy_iterator())
        return np.stack(images).astype(np.float32) if images else None

    calibration = read(data.train, count, shuffle=True)
    if calibration is None:
        raise ValueError(f"No images to calibrate with in {source!r}.")
    return calibration, read(data.validation, HELD_OUT_IMAGES, shuffle=False)

