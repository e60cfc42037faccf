"""ImageNet-1k input and output conventions of the CoaT checkpoints.

- `load_image`, `eval_transform`, `eval_geometry`: the evaluation transform
  (timm's: PIL's bicubic resize of the shorter side to ``size / crop_pct``, or of
  both sides with ``crop_mode="squash"``, then a center crop to ``size``), giving
  float32 RGB in [0, 255], the input a model built with
  ``include_preprocessing=True`` expects. Graphs (tf.data pipelines, the
  SavedModel's ``serving_bytes``) compute the same pixels with
  `keras_coat.tf_images.eval_transform`.
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
    "CROP_MODES",
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
CROP_MODES = _presets.CROP_MODES
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


def load_image(path, image_size=224, crop_pct=DEFAULT_CROP_PCT, crop_mode="center"):
    """Loads an image file with the evaluation transform, as timm does.

    Pillow decodes the file and converts it to RGB, then resizes it (bicubic) and crops its
    center (`eval_geometry`): the pixels of timm's evaluation transform, and of the SavedModel's
    ``serving_bytes`` signature and training's validation pipeline (which compute them with
    TensorFlow ops, `keras_coat.tf_images.eval_transform`). TensorFlow is not needed.

    Args:
        path: image file path (or a file object) readable by Pillow.
        image_size: an int, or a ``(height, width)`` pair.
        crop_pct: the crop's share of the resized image, in (0, 1].
        crop_mode: "center" (keep the aspect ratio) or "squash" (resize both sides), as timm's.

    Returns:
        A float32 NumPy array of shape ``(height, width, 3)`` with integer values in [0, 255].

    Raises:
        ValueError: the image's header declares more than `MAX_IMAGE_PIXELS` pixels or
            `MAX_IMAGE_SIDE` per side (checked before decoding), or its aspect ratio is so
            extreme that the resized image would exceed `MAX_RESIZED_PIXELS`.
        OSError: the file is missing or not an image Pillow reads.
    """
    from PIL import Image

    _check_transform_arguments(image_size, crop_pct, crop_mode)
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
        return _resize_and_crop(image.convert("RGB"), name, image_size, crop_pct, crop_mode)


def eval_transform(image, image_size=224, crop_pct=DEFAULT_CROP_PCT, crop_mode="center"):
    """The evaluation transform of one RGB image array, as `load_image` applies it to a file.

    Args:
        image: ``(rows, cols, 3)`` RGB values in [0, 255]: a NumPy array or anything
            `numpy.asarray` takes (a JAX array, a CPU PyTorch tensor, an eager tf.Tensor). Float
            values are rounded to 8 bits first, as an image file holds them. In a TensorFlow
            graph (tf.data) use `keras_coat.tf_images.eval_transform`, which gives the same
            pixels.
        image_size, crop_pct, crop_mode: as for `load_image`.

    Returns:
        A float32 NumPy array ``(height, width, 3)`` with integer values in [0, 255].
    """
    from PIL import Image

    _check_transform_arguments(image_size, crop_pct, crop_mode)
    shape = tuple(getattr(image, "shape", np.shape(image)))
    _check_channels(shape, "eval_transform")
    if len(shape) != 3:
        raise ValueError(
            f"eval_transform expects one image of shape (rows, cols, 3); received shape {shape}."
        )
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        pixels = np.clip(np.round(pixels.astype(np.float64)), 0, 255).astype(np.uint8)
    _check_decoded_size("eval_transform's image", shape[1], shape[0])
    picture = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    return _resize_and_crop(picture, "eval_transform's image", image_size, crop_pct, crop_mode)


def _resize_and_crop(image, name, image_size, crop_pct, crop_mode):
    """A PIL RGB image resized (PIL's bicubic) and center-cropped, as timm's transform."""
    from PIL import Image

    height, width = _image_size(image_size)
    new_rows, new_cols, top, left = (
        int(n) for n in eval_geometry(image.height, image.width, image_size, crop_pct, crop_mode)
    )
    if new_rows * new_cols > MAX_RESIZED_PIXELS:
        raise ValueError(
            f"{name}: resizing this {image.width}x{image.height} image for a "
            f"{height}x{width} center crop would make it {new_cols}x{new_rows} pixels (at "
            f"most {MAX_RESIZED_PIXELS} are allowed); crop it to a less extreme aspect "
            "ratio first."
        )
    resized = image.resize((new_cols, new_rows), Image.Resampling.BICUBIC)
    pixels = np.asarray(resized)[top : top + height, left : left + width]
    return pixels.astype(np.float32)


def _check_decoded_size(name, width, height):
    if min(width, height) < 1 or max(width, height) > MAX_IMAGE_SIDE or (
        width * height > MAX_IMAGE_PIXELS
    ):
        raise ValueError(
            f"{name}: the image declares {width}x{height} pixels; images must be 1 to "
            f"{MAX_IMAGE_SIDE} pixels per side and at most {MAX_IMAGE_PIXELS} pixels in all."
        )


def eval_geometry(rows, cols, image_size=224, crop_pct=DEFAULT_CROP_PCT, crop_mode="center"):
    """Where the evaluation transform resizes a ``rows`` x ``cols`` image to and crops from.

    timm's evaluation transform (``transforms_imagenet_eval``): with
    ``scale = floor(side / crop_pct)`` for each side of `image_size`,

    - ``crop_mode="center"``, one scale (square sizes): torchvision's ``Resize(scale)``, the
      shorter side becomes `scale` and the longer ``floor(scale * longer / shorter)``;
    - ``"center"``, two scales: timm's ``ResizeKeepRatio``, the aspect ratio is kept and the
      image just covers ``scale_h x scale_w``, the other side rounded half to even;
    - ``"squash"``: torchvision's ``Resize((scale_h, scale_w))``, whatever the aspect ratio;

    then torchvision's ``CenterCrop``, offsets ``round((resized - crop) / 2)`` half to even.
    Everything is computed exactly in integers, so every caller gets the same sizes. timm's
    float64 arithmetic agrees except on exact ``.5`` ties of the two-scale case, which its
    rounding errors send either way.

    The one definition of the geometry: `load_image` calls it on Python ints, and
    `keras_coat.tf_images.eval_transform` on TensorFlow tensors inside graphs.

    Args:
        rows, cols: the image's size: Python ints, NumPy integer arrays (elementwise) or
            integer tf.Tensors (e.g. from ``tf.shape`` inside a graph).
        image_size, crop_pct, crop_mode: as for `load_image`.

    Returns:
        ``(resized_rows, resized_cols, top, left)``: NumPy integers (arrays for array input),
        or int64 tf.Tensors for tensor input.
    """
    _check_transform_arguments(image_size, crop_pct, crop_mode)
    height, width = _image_size(image_size)
    xp = _integer_math(rows, cols)
    rows, cols = xp.integers(rows), xp.integers(cols)
    scale_h, scale_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
    if crop_mode == "squash":
        new_rows, new_cols = rows * 0 + scale_h, cols * 0 + scale_w
    elif scale_h == scale_w:
        shorter = xp.minimum(rows, cols)
        new_rows, new_cols = scale_h * rows // shorter, scale_w * cols // shorter
    else:
        # rows / scale_h <= cols / scale_w: the rows set the ratio.
        rows_limit = rows * scale_w <= cols * scale_h
        fitted_rows = _round_half_even(rows * scale_w, cols, xp)
        fitted_cols = _round_half_even(cols * scale_h, rows, xp)
        new_rows = xp.where(rows_limit, rows * 0 + scale_h, fitted_rows)
        new_cols = xp.where(rows_limit, fitted_cols, cols * 0 + scale_w)
    top = _round_half_even(new_rows - height, 2, xp)
    left = _round_half_even(new_cols - width, 2, xp)
    return new_rows, new_cols, top, left


class _NumPyIntegers:
    """The integer operations of `eval_geometry` on Python ints and NumPy arrays."""

    integers = staticmethod(lambda x: np.asarray(x, np.int64))
    minimum = staticmethod(np.minimum)
    where = staticmethod(np.where)


class _TensorFlowIntegers:
    """The same operations on tf.Tensors (int64: products of sizes stay exact)."""

    def __init__(self):
        import tensorflow as tf

        self.integers = lambda x: tf.cast(x, tf.int64)
        self.minimum, self.where = tf.minimum, tf.where


def _integer_math(*values):
    if any(type(v).__module__.startswith("tensorflow") for v in values):
        return _TensorFlowIntegers()
    return _NumPyIntegers


def _round_half_even(numerator, denominator, xp):
    """``numerator / denominator`` rounded half to even, for non-negative integers."""
    quotient = numerator // denominator
    twice_remainder = 2 * (numerator - quotient * denominator)
    up = (twice_remainder > denominator) | (
        (twice_remainder == denominator) & (quotient % 2 == 1)
    )
    return xp.where(up, quotient + 1, quotient)


def _check_transform_arguments(image_size, crop_pct, crop_mode):
    height, width = _image_size(image_size)
    if max(height, width) > MAX_IMAGE_SIDE:
        raise ValueError(
            f"image_size must be at most {MAX_IMAGE_SIDE} per side; received {image_size!r}."
        )
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not (
        0 < crop_pct <= 1
    ):
        raise ValueError(f"crop_pct must be a number in (0, 1]; received {crop_pct!r}.")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {CROP_MODES}; received {crop_mode!r}.")


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
