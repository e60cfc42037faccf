"""ImageNet-1k input and output conventions of the CoaT checkpoints.

- `load_image`: the reference evaluation transform (bicubic resize of the
  shorter side to ``size / crop_pct``, center crop to ``size``), giving float32
  RGB in [0, 255], the input a model built with ``include_preprocessing=True``
  expects.
- `preprocess_input`: ImageNet mean/std normalization, for models built with
  ``include_preprocessing=False``.
- `decode_predictions`, `class_names`, `class_wnids`: the 1000 classes in the
  order of the checkpoints' classifier.
"""

import functools
import json
import math
from importlib import resources

import numpy as np

__all__ = [
    "DEFAULT_CROP_PCT",
    "IMAGENET_MEAN",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "IMAGENET_STD",
    "NUM_CLASSES",
    "class_names",
    "class_wnids",
    "decode_predictions",
    "load_image",
    "preprocess_input",
]

NUM_CLASSES = 1000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The authors' evaluation resizes to 256 before a 224 crop.
DEFAULT_CROP_PCT = 224 / 256
# Largest image `load_image` and the exported serving_bytes signature decode, checked against the
# image's header before decoding: a few hundred bytes of PNG or JPEG can declare gigapixels.
# 64 megapixels (e.g. 8000 x 8000, 192 MB as 8-bit RGB) covers camera photos; the side limit
# bounds the working memory of extreme aspect ratios.
MAX_IMAGE_PIXELS = 64_000_000
MAX_IMAGE_SIDE = 16384


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


def _check_channels(shape):
    if not shape or shape[-1] not in (3, None):
        raise ValueError(
            "preprocess_input expects RGB images with 3 channels last; " f"received shape {shape}."
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
    """Loads an image with the reference evaluation transform.

    The image is converted to RGB, resized with bicubic interpolation so its
    shorter side is ``floor(image_size / crop_pct)`` (256 for 224), then
    center-cropped to `image_size`, as the authors' and timm's evaluation do.
    For a non-square ``(height, width)`` size the image keeps its aspect
    ratio and is resized to just cover ``floor(side / crop_pct)`` on both
    sides before the crop (timm's rule).

    Args:
        path: image file path (or a file object) readable by Pillow.
        image_size: an int, or a ``(height, width)`` pair.
        crop_pct: the crop's share of the resized image, in (0, 1].

    Returns:
        A float32 array of shape ``(height, width, 3)`` with values in
        [0, 255].
    """
    from PIL import Image

    height, width = _image_size(image_size)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1]; received {crop_pct}.")
    scale_h, scale_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
    with Image.open(path) as image:
        image = image.convert("RGB")
        if scale_h == scale_w:
            image = _resize_shorter_side(image, scale_h)
        else:
            image = _resize_to_cover(image, scale_h, scale_w)
    array = np.asarray(image, dtype=np.float32)
    return _center_crop(array, height, width)


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


def _resize_shorter_side(image, size):
    from PIL import Image

    width, height = image.size
    # torchvision.transforms.Resize(int): the long side is truncated.
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    if new_size == (width, height):
        return image
    return image.resize(new_size, Image.BICUBIC)


def _resize_to_cover(image, height, width):
    from PIL import Image

    # timm's ResizeKeepRatio: keep the aspect ratio, just cover height x width.
    ratio = min(image.height / height, image.width / width)
    new_size = (round(image.width / ratio), round(image.height / ratio))
    return image.resize(new_size, Image.BICUBIC)


def _center_crop(array, height, width):
    rows, cols = array.shape[:2]
    if rows < height or cols < width:
        pad_h, pad_w = max(height - rows, 0), max(width - cols, 0)
        # torchvision pads with zeros, the extra pixel going bottom/right.
        array = np.pad(
            array,
            ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)),
        )
        rows, cols = array.shape[:2]
    top = int(round((rows - height) / 2.0))
    left = int(round((cols - width) / 2.0))
    return np.ascontiguousarray(array[top : top + height, left : left + width])
