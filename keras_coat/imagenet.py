"""ImageNet-1k input and output conventions of the CoaT checkpoints.

- `load_image`, `eval_transform`, `eval_geometry`: the evaluation transform
  (bicubic resize of the shorter side to ``size / crop_pct``, center crop to
  ``size``), giving float32 RGB in [0, 255], the input a model built with
  ``include_preprocessing=True`` expects. The SavedModel export and training's
  validation use the same functions.
- `preprocess_input`: ImageNet mean/std normalization, for models built with
  ``include_preprocessing=False``.
- `decode_predictions`, `class_names`, `class_wnids`: the 1000 classes in the
  order of the checkpoints' classifier.
"""

import functools
import json
import math
import warnings
from importlib import resources

import numpy as np

from keras_coat import presets as _presets

__all__ = [
    "DEFAULT_CROP_PCT",
    "IMAGENET_MEAN",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "MAX_RESIZED_PIXELS",
    "IMAGENET_STD",
    "NUM_CLASSES",
    "class_names",
    "class_wnids",
    "decode_predictions",
    "eval_geometry",
    "eval_transform",
    "load_image",
    "preprocess_input",
]

NUM_CLASSES = 1000
# The published checkpoints' normalization and evaluation crop (`keras_coat.presets`).
IMAGENET_MEAN, IMAGENET_STD = _presets.IMAGENET_MEAN, _presets.IMAGENET_STD
DEFAULT_CROP_PCT = _presets.AUTHORS_CROP_PCT
# Largest image `load_image` and the exported serving_bytes signature decode, checked against the
# image's header before decoding: a few hundred bytes of PNG or JPEG can declare gigapixels.
# 64 megapixels (e.g. 8000 x 8000, 192 MB as 8-bit RGB) covers camera photos; the side limit
# bounds the working memory of extreme aspect ratios.
MAX_IMAGE_PIXELS = 64_000_000
MAX_IMAGE_SIDE = 16384
# Largest resized image `load_image` accepts before its center crop (an extreme aspect ratio
# resized so that its shorter side covers the crop would be enormous; on backends other than
# TensorFlow the resize is not limited to the crop window).
MAX_RESIZED_PIXELS = 16_000_000


def preprocess_input(x):
    """Normalizes RGB values in [0, 255] with the ImageNet mean and std.

    Args:
        x: float RGB images (channels last), a NumPy array (or anything
            `numpy.asarray` takes) or a Keras/backend tensor.

    Returns:
        ``(x / 255 - mean) / std``: a float32 NumPy array for NumPy-like
        input, otherwise a tensor computed with `keras.ops`.
    """
    if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
        x = np.asarray(x, dtype=np.float32)
        _check_channels(x.shape)
        mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
        std = np.asarray(IMAGENET_STD, dtype=np.float32)
        return (x / np.float32(255.0) - mean) / std

    from keras import ops

    _check_channels(tuple(x.shape))
    dtype = x.dtype if "float" in str(x.dtype) else "float32"
    x = ops.cast(x, dtype)
    mean = ops.convert_to_tensor(IMAGENET_MEAN, dtype=dtype)
    std = ops.convert_to_tensor(IMAGENET_STD, dtype=dtype)
    return (x / 255.0 - mean) / std


def _check_channels(shape, caller="preprocess_input"):
    if not shape or shape[-1] not in (3, None):
        raise ValueError(
            f"{caller} expects RGB images with 3 channels last; received shape {shape}."
        )


@functools.lru_cache(maxsize=1)
def _classes():
    text = (
        resources.files("keras_coat")
        .joinpath("data", "imagenet_class_names.json")
        .read_text(encoding="utf-8")
    )
    rows = json.loads(text)["classes"]
    if len(rows) != NUM_CLASSES:
        raise RuntimeError(f"The packaged class list has {len(rows)} rows, not 1000.")
    return tuple((wnid, lemmas.split(",")[0].strip()) for wnid, lemmas in rows)


def class_names():
    """The 1000 ImageNet class names (first WordNet lemma), in label order."""
    return [name for _, name in _classes()]


def class_wnids():
    """The 1000 ImageNet WordNet ids (e.g. ``"n01440764"``), in label order."""
    return [wnid for wnid, _ in _classes()]


def decode_predictions(preds, top=5):
    """Turns ImageNet scores into the best classes, like `keras.applications`.

    Args:
        preds: scores (probabilities or logits) of shape ``(batch, 1000)``,
            a NumPy array or tensor.
        top: how many classes to return per image (1 to 1000).

    Returns:
        One list per image of ``(wnid, class_name, score)`` tuples, best
        first; `score` is a Python float.
    """
    preds = _to_numpy(preds)
    if preds.ndim != 2 or preds.shape[1] != NUM_CLASSES:
        raise ValueError(
            "decode_predictions expects a batch of ImageNet scores of shape "
            f"(batch, {NUM_CLASSES}); received shape {preds.shape}."
        )
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= NUM_CLASSES:
        raise ValueError(f"top must be an integer in [1, {NUM_CLASSES}]; received {top!r}.")
    classes = _classes()
    results = []
    for row in preds:
        # A stable sort keeps the lower class index first among ties.
        best = np.argsort(-row, kind="stable")[:top]
        results.append([(*classes[i], float(row[i])) for i in best])
    return results


def _to_numpy(x):
    if isinstance(x, np.ndarray):
        return x
    try:
        from keras import ops

        return np.asarray(ops.convert_to_numpy(x))
    except (TypeError, ValueError, AttributeError):
        return np.asarray(x)


def load_image(path, image_size=224, crop_pct=DEFAULT_CROP_PCT):
    """Loads an image file with the evaluation transform (`eval_transform`).

    Pillow decodes the file and converts it to RGB; `eval_transform` then resizes and
    center-crops it, exactly as the SavedModel's ``serving_bytes`` signature and training's
    validation pipeline do.

    Args:
        path: image file path (or a file object) readable by Pillow.
        image_size: an int, or a ``(height, width)`` pair.
        crop_pct: the crop's share of the resized image, in (0, 1].

    Returns:
        A float32 NumPy array of shape ``(height, width, 3)`` with integer values in [0, 255].

    Raises:
        ValueError: the image's header declares more than `MAX_IMAGE_PIXELS` pixels or
            `MAX_IMAGE_SIDE` per side (checked before decoding), or its aspect ratio is so
            extreme that the resized image would exceed `MAX_RESIZED_PIXELS`.
        OSError: the file is missing or not an image Pillow reads.
    """
    from keras import ops
    from PIL import Image

    height, width = _image_size(image_size)
    _check_crop_pct(crop_pct)
    if max(height, width) > MAX_IMAGE_SIDE:
        raise ValueError(
            f"image_size must be at most {MAX_IMAGE_SIDE} per side; received {image_size!r}."
        )
    name = getattr(path, "name", path)
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check: a warning over ~89 Mpx, an error over ~179 Mpx.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: {e}") from None
    with image:
        # Image.open reads only the header: check the size before decoding anything.
        _check_decoded_size(name, image.width, image.height)
        new_rows, new_cols, _, _ = (
            int(n) for n in eval_geometry(image.height, image.width, image_size, crop_pct)
        )
        if new_rows * new_cols > MAX_RESIZED_PIXELS:
            raise ValueError(
                f"{name}: resizing this {image.width}x{image.height} image for a "
                f"{height}x{width} center crop would make it {new_cols}x{new_rows} pixels (at "
                f"most {MAX_RESIZED_PIXELS} are allowed); crop it to a less extreme aspect "
                "ratio first."
            )
        pixels = np.asarray(image.convert("RGB"))
    return np.asarray(ops.convert_to_numpy(eval_transform(pixels, image_size, crop_pct)))


def _check_decoded_size(name, width, height):
    if min(width, height) < 1 or max(width, height) > MAX_IMAGE_SIDE or (
        width * height > MAX_IMAGE_PIXELS
    ):
        raise ValueError(
            f"{name}: the image declares {width}x{height} pixels; images must be 1 to "
            f"{MAX_IMAGE_SIDE} pixels per side and at most {MAX_IMAGE_PIXELS} pixels in all."
        )


def eval_transform(image, image_size=224, crop_pct=DEFAULT_CROP_PCT):
    """The evaluation transform: bicubic resize (`eval_geometry`), center crop.

    The one implementation behind `load_image`, the SavedModel's ``serving_bytes`` signature and
    training's validation pipeline.

    The resampling is Keras' antialiased bicubic (`keras.ops.image.resize`; on the TensorFlow
    backend `tf.image.resize`'s kernel, computing only the crop window, so memory is bounded for
    any aspect ratio and sizes known only when a graph runs work), applied as PIL applies its
    own: width, then height, each rounded to 8 bits. The pixels are timm's (PIL's) but for
    under 1% of them one, rarely two, levels off.

    Args:
        image: one RGB image ``(rows, cols, 3)``, uint8 or float in [0, 255]: a NumPy array or a
            backend tensor (on the TensorFlow backend also a symbolic one of unknown size).
        image_size: an int, or a ``(height, width)`` pair.
        crop_pct: the crop's share of the resized image, in (0, 1].

    Returns:
        A float32 tensor ``(height, width, 3)`` with integer values in [0, 255].
    """
    from keras import ops

    height, width = _image_size(image_size)
    _check_crop_pct(crop_pct)
    _check_channels(tuple(image.shape), "eval_transform")
    if len(image.shape) != 3:
        raise ValueError(
            f"eval_transform expects one image of shape (rows, cols, 3); received shape "
            f"{tuple(image.shape)}."
        )
    rows, cols = ops.shape(image)[0], ops.shape(image)[1]
    new_rows, new_cols, top, left = eval_geometry(rows, cols, (height, width), crop_pct)
    # PIL's order: the width first, into 8 bits, then the height; rounding in between as PIL does
    # keeps within a level of it where one float pass is up to 20 levels off on sharp edges (the
    # bicubic overshoot clipped twice). Each pass computes only the crop's columns (rows).
    columns = _resize_window(ops.cast(image, "float32"), 1, new_cols, left, width)
    cropped = _resize_window(columns, 0, new_rows, top, height)
    # The reshape states the static shape, which a graph does not know.
    return ops.reshape(cropped, (height, width, 3))


def eval_geometry(rows, cols, image_size=224, crop_pct=DEFAULT_CROP_PCT):
    """Where the evaluation transform resizes a ``rows`` x ``cols`` image to and crops from.

    timm's evaluation transform (``transforms_imagenet_eval``, centre crop mode): with
    ``scale = floor(side / crop_pct)`` for each side of `image_size`,

    - one scale (square sizes): torchvision's ``Resize(scale)``, the shorter side becomes
      `scale` and the longer ``floor(scale * longer / shorter)``;
    - two scales: timm's ``ResizeKeepRatio``, the aspect ratio is kept and the image just covers
      ``scale_h x scale_w``, the other side rounded half to even;

    then torchvision's ``CenterCrop``, offsets ``round((resized - crop) / 2)`` half to even.
    Everything is computed exactly in integers, so every backend gives the same sizes. timm's
    float64 arithmetic agrees except on exact ``.5`` ties of the two-scale case, which its
    rounding errors send either way.

    Args:
        rows, cols: the image's size: Python ints or integer tensors (e.g. from ``tf.shape``
            inside a graph); arrays of sizes work elementwise.
        image_size, crop_pct: as for `eval_transform`.

    Returns:
        ``(resized_rows, resized_cols, top, left)``, backend integer tensors.
    """
    from keras import ops

    height, width = _image_size(image_size)
    _check_crop_pct(crop_pct)
    scale_h, scale_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
    if scale_h == scale_w:
        shorter = ops.minimum(rows, cols)
        new_rows, new_cols = scale_h * rows // shorter, scale_w * cols // shorter
    else:
        # rows / scale_h <= cols / scale_w: the rows set the ratio.
        rows_limit = rows * scale_w <= cols * scale_h
        new_rows = ops.where(rows_limit, scale_h, _round_half_even(rows * scale_w, cols))
        new_cols = ops.where(rows_limit, _round_half_even(cols * scale_h, rows), scale_w)
    top, left = _round_half_even(new_rows - height, 2), _round_half_even(new_cols - width, 2)
    return new_rows, new_cols, top, left


def _round_half_even(numerator, denominator):
    """``numerator / denominator`` rounded half to even, for non-negative integers or tensors."""
    from keras import ops

    quotient = numerator // denominator
    twice_remainder = 2 * (numerator - quotient * denominator)
    tie = ops.logical_and(twice_remainder == denominator, quotient % 2 == 1)
    # ops.add promotes (an int64 quotient plus the int32 step is int64; `+` would refuse it).
    return ops.add(quotient, ops.cast(ops.logical_or(twice_remainder > denominator, tie), "int32"))


def _resize_window(image, axis, new_size, start, length):
    """`image` resized along `axis` (0: rows, 1: columns) to `new_size`, keeping only pixels
    ``[start, start + length)`` along it; antialiased bicubic, rounded and clipped to 8 bits."""
    import keras
    from keras import ops

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # tf.image.resize's own kernel (what keras.ops.image.resize runs on this backend) with
        # its output window moved to the crop: memory stays that of the crop for any aspect
        # ratio, and sizes known only when a graph runs work (keras.ops.image.resize checks
        # them with Python comparisons).
        shape = tf.shape(image)[:2]
        along = tf.one_hot(axis, 2)
        scale = 1.0 + along * (tf.cast(new_size, tf.float32) / tf.cast(shape[axis], tf.float32) - 1)
        window = tf.tensor_scatter_nd_update(shape, [[axis]], tf.constant([length], tf.int32))
        resized = tf.raw_ops.ScaleAndTranslate(
            images=image[tf.newaxis],
            size=window,
            scale=scale,
            translation=-along * tf.cast(start, tf.float32),
            kernel_type="keyscubic",
            antialias=True,
        )[0]
    else:
        size = [int(s) for s in ops.shape(image)[:2]]
        size[axis] = int(new_size)
        resized = ops.image.resize(image, size, interpolation="bicubic", antialias=True)
        window = slice(int(start), int(start) + length)
        resized = resized[window] if axis == 0 else resized[:, window]
    return ops.clip(ops.round(resized), 0.0, 255.0)


def _check_crop_pct(crop_pct):
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not (
        0 < crop_pct <= 1
    ):
        raise ValueError(f"crop_pct must be a number in (0, 1]; received {crop_pct!r}.")


def _image_size(image_size):
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)):
        size = tuple(image_size)
    else:
        size = ()
    if len(size) != 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size
    ):
        raise ValueError(
            "image_size must be a positive int or a (height, width) pair of "
            f"positive ints; received {image_size!r}."
        )
    return size
