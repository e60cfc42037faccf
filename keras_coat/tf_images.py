"""Images in TensorFlow graphs: tf.data pipelines and the SavedModel's ``serving_bytes``.

- `decode_image`: JPEG, PNG or BMP bytes to uint8 RGB, the size read from the header and
  checked (`keras_coat.imagenet.MAX_IMAGE_SIDE`, `MAX_IMAGE_PIXELS`) before anything is
  decoded: a few hundred bytes can declare gigapixels.
- `eval_transform`: the evaluation transform, timm's, equal bit for bit to
  `keras_coat.imagenet.load_image` (Pillow): the geometry is `keras_coat.imagenet.eval_geometry`
  itself, and the resize is Pillow's bicubic resampling computed as Pillow computes it (its
  coefficients in float64, normalized to 22-bit fixed point, each pass summed in integers and
  rounded to 8 bits, the two passes in Pillow's order). Only the crop window is computed, so
  memory stays that of the crop plus the image whatever the aspect ratio.

This module imports TensorFlow; keras_coat imports it only from the exports and the data readers
(`keras_coat.datasets`), so JAX and PyTorch users who read files with `load_image` do without.
"""

import tensorflow as tf

from keras_coat.imagenet import (
    CROP_MODES,
    DEFAULT_CROP_PCT,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    eval_geometry,
)

__all__ = ["DECODED_FORMATS", "decode_image", "eval_transform", "header_image_size"]

# Formats decoded: those whose size is read from the header before decoding. GIF and WebP are
# refused: an animated file makes the decoder hold every frame, and the frame count is in no
# header.
DECODED_FORMATS = "JPEG, PNG or BMP"

# The graph functions below are used inside `tf.data` maps, which run the functions they are
# given through AutoGraph: these branch with tf.cond and assert with tf.debugging, so they need
# no conversion, and converting them (reading and rewriting their source and that of every
# function they call) was most of a pipeline's set-up: training.data's validation pipeline took
# 4.6 s to build with it and 0.6-1.1 s without (2-core Xeon).
graph_function = tf.autograph.experimental.do_not_convert
# Pillow's fixed point (Resample.c): 32 bits less 8 for the pixel and 2 for the overshoot.
PRECISION_BITS = 22
BICUBIC_SUPPORT = 2.0  # Pillow's bicubic filter (Keys, a = -0.5) spans [-2, 2]


@graph_function
def header_image_size(image_bytes, what="the image"):
    """``(height, width)`` (int64) read from the header of a JPEG, PNG or BMP, before decoding.

    Raises InvalidArgument (when run) for another format, an empty input, or a size over
    `MAX_IMAGE_SIDE` or `MAX_IMAGE_PIXELS`. `what` names the image in the messages (a string or
    a string tensor, e.g. the file's path).
    """
    # 32 header bytes, zero-padded so that short inputs index safely.
    head = tf.strings.substr(
        tf.strings.join([tf.strings.substr(image_bytes, 0, 32), tf.constant(b"\0" * 32)]), 0, 32
    )
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)

    def big_endian(i):
        return b[i] * 2**24 + b[i + 1] * 2**16 + b[i + 2] * 2**8 + b[i + 3]

    def little_endian_signed(i):
        value = b[i] + b[i + 1] * 2**8 + b[i + 2] * 2**16 + b[i + 3] * 2**24
        return tf.where(value >= 2**31, value - 2**32, value)

    not_empty = tf.debugging.Assert(
        tf.strings.length(image_bytes) > 0, [what, "is empty (0 bytes)"]
    )
    with tf.control_dependencies([not_empty]):
        is_jpeg = tf.io.is_jpeg(image_bytes)
    is_png = tf.strings.substr(head, 0, 8) == b"\x89PNG\r\n\x1a\n"
    is_bmp = tf.strings.substr(head, 0, 2) == b"BM"
    known = tf.debugging.Assert(
        is_jpeg | is_png | is_bmp,
        [f"only {DECODED_FORMATS} images are read;", what, "(bytes:",
         tf.strings.length(image_bytes), ") is in another format or not an image"],
    )  # fmt: skip
    with tf.control_dependencies([known]):
        size = tf.cond(
            is_jpeg,
            lambda: tf.cast(tf.image.extract_jpeg_shape(image_bytes)[:2], tf.int64),
            lambda: tf.where(
                is_png,
                tf.stack([big_endian(20), big_endian(16)]),
                # BMP: signed 32-bit width and height (negative height: rows top-down).
                tf.abs(tf.stack([little_endian_signed(22), little_endian_signed(18)])),
            ),
        )
    height, width = size[0], size[1]
    in_bounds = tf.debugging.Assert(
        (tf.minimum(height, width) >= 1)
        & (tf.maximum(height, width) <= MAX_IMAGE_SIDE)
        & (height * width <= MAX_IMAGE_PIXELS),
        [what, "declares a size (height, width) outside the limits (each side 1 to "
         f"{MAX_IMAGE_SIDE} pixels, at most {MAX_IMAGE_PIXELS} pixels):", height, width],
    )  # fmt: skip
    with tf.control_dependencies([in_bounds]):
        return tf.identity(height), tf.identity(width)


@graph_function
def decode_image(image_bytes, what="the image"):
    """One encoded JPEG, PNG or BMP image -> uint8 ``[height, width, 3]`` RGB.

    The header's size is checked first (`header_image_size`), and the decoded image must have
    that size. Errors are InvalidArgument, naming `what`.
    """
    height, width = header_image_size(image_bytes, what)
    with tf.control_dependencies([height, width]):
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    decoded = tf.shape(image, out_type=tf.int64)
    agrees = tf.debugging.Assert(
        tf.reduce_all(decoded[:2] == tf.stack([height, width])),
        [what, "decodes to another size than its header's:", decoded[:2], height, width],
    )
    with tf.control_dependencies([agrees]):
        return tf.ensure_shape(tf.identity(image), (None, None, 3))


@graph_function
def eval_transform(image, image_size=224, crop_pct=DEFAULT_CROP_PCT, crop_mode="center"):
    """The evaluation transform of one image in a graph: `keras_coat.imagenet.eval_transform`'s
    pixels (Pillow's), with sizes known only when the graph runs.

    Args:
        image: ``[rows, cols, 3]`` RGB, uint8 (or float in [0, 255], rounded to 8 bits first).
        image_size: an int or ``(height, width)``.
        crop_pct: the crop's share of the resized image, in (0, 1].
        crop_mode: "center" or "squash" (`keras_coat.imagenet.CROP_MODES`).

    Returns:
        float32 ``[height, width, 3]`` with integer values in [0, 255].
    """
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {CROP_MODES}; received {crop_mode!r}.")
    image = tf.convert_to_tensor(image)
    if image.shape.rank not in (None, 3) or image.shape[-1] not in (None, 3):
        raise ValueError(
            f"eval_transform expects one RGB image [rows, cols, 3]; received shape {image.shape}."
        )
    if image.dtype != tf.uint8:
        image = tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float64)), 0, 255), tf.uint8)
    # uint8 until each pass multiplies: the image is sliced and transposed at a quarter of the
    # memory traffic of int32.
    shape = tf.shape(image, out_type=tf.int64)
    new_rows, new_cols, top, left = eval_geometry(
        shape[0], shape[1], image_size, crop_pct, crop_mode
    )
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    rows = _ResizeWeights(shape[0], new_rows, top, height)
    columns = _ResizeWeights(shape[1], new_cols, left, width)

    # Two passes, each rounded to 8 bits, the first only over the pixels the second one reads.
    def width_first():
        used = image[rows.first_input : rows.end_input]
        across = columns.apply(tf.transpose(used, [1, 0, 2]))  # [width, used rows, 3]
        return rows.apply(tf.transpose(across, [1, 0, 2]), offset=rows.first_input)

    def height_first():
        used = image[:, columns.first_input : columns.end_input]
        down = rows.apply(used)  # [height, used columns, 3]
        return tf.transpose(
            columns.apply(tf.transpose(down, [1, 0, 2]), offset=columns.first_input), [1, 0, 2]
        )

    # Pillow's order (13 and later): the height first when it shrinks by more than twice as
    # many pixels as the width, else the width first (always, before Pillow 13).
    shrinks_height_more = (new_rows < shape[0]) & (
        shape[0] - new_rows > 2 * (shape[1] - new_cols)
    )
    resized = tf.cond(shrinks_height_more, height_first, width_first)
    return tf.cast(tf.reshape(resized, (height, width, 3)), tf.float32)


class _ResizeWeights:
    """Pillow's bicubic resampling of one axis (`precompute_coeffs` and
    `normalize_coeffs_8bpc` in Resample.c) from `in_size` to `out_size` pixels, for the outputs
    ``[start, start + length)`` only: a sparse ``[length, in_size]`` matrix of 22-bit fixed-point
    weights. Pillow computes in double precision, and so does this, in its order of operations.
    """

    def __init__(self, in_size, out_size, start, length):
        in_size = tf.cast(in_size, tf.int64)
        scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
        filter_scale = tf.maximum(scale, 1.0)
        support = BICUBIC_SUPPORT * filter_scale
        taps = tf.cast(tf.math.ceil(support), tf.int64) * 2 + 1
        center = (tf.cast(tf.range(start, start + length), tf.float64) + 0.5) * scale
        first = tf.maximum(_truncated(center - support + 0.5), 0)
        count = tf.minimum(_truncated(center + support + 0.5), in_size) - first
        offsets = tf.range(taps)
        positions = first[:, None] + offsets[None, :]
        x = ((tf.cast(positions, tf.float64) - center[:, None]) + 0.5) * (1.0 / filter_scale)
        inside = offsets[None, :] < count[:, None]
        weights = tf.where(inside, _bicubic(x), 0.0)
        # Pillow sums the weights one after the other; a reduction could add them in another
        # order and round differently.
        total = tf.foldl(lambda sum_, w: sum_ + w, tf.transpose(weights),
                         initializer=tf.zeros_like(center))  # fmt: skip
        weights = tf.where(total[:, None] != 0.0, weights / total[:, None], weights)
        one = float(1 << PRECISION_BITS)
        fixed = tf.where(weights < 0, _truncated(-0.5 + weights * one),
                         _truncated(0.5 + weights * one))  # fmt: skip
        outputs = tf.broadcast_to(tf.range(length, dtype=tf.int64)[:, None], tf.shape(positions))
        self.indices = tf.stack([outputs[inside], positions[inside]], axis=1)
        self.values = tf.cast(fixed[inside], tf.int32)
        self.shape = tf.stack([tf.cast(length, tf.int64), in_size])
        self.first_input = first[0]
        self.end_input = first[-1] + count[-1]

    def apply(self, image, offset=0):
        """`image` ``[in, n, 3]`` uint8 (its first axis from input pixel `offset` on) resampled
        along its first axis: uint8 ``[length, n, 3]``."""
        indices = self.indices - tf.stack([tf.constant(0, tf.int64), tf.cast(offset, tf.int64)])
        in_size = tf.shape(image, out_type=tf.int64)[0]
        matrix = tf.sparse.SparseTensor(indices, self.values, tf.stack([self.shape[0], in_size]))
        flat = tf.cast(tf.reshape(image, tf.stack([in_size, -1])), tf.int32)
        sums = tf.sparse.sparse_dense_matmul(matrix, flat)
        # Pillow's rounding: start at half a unit, shift right (floor), clip to 8 bits.
        pixels = tf.clip_by_value((sums + (1 << (PRECISION_BITS - 1))) // (1 << PRECISION_BITS),
                                  0, 255)  # fmt: skip
        rest = tf.shape(image, out_type=tf.int64)[1:]
        return tf.reshape(tf.cast(pixels, tf.uint8), tf.concat([self.shape[:1], rest], axis=0))


def _truncated(x):
    """C's (int) of a double: toward zero."""
    return tf.cast(x, tf.int64)


def _bicubic(x):
    """Pillow's `bicubic_filter` (a = -0.5), term for term."""
    x = tf.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = ((((x - 5.0) * x) + 8.0) * x - 4.0) * -0.5
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, 0.0))
