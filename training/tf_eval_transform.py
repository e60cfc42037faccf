"""The evaluation transform in plain TensorFlow, for tf.data under any Keras backend.

`keras_coat.imagenet.eval_transform` is written in `keras.ops`, which run on the active Keras
backend; inside a tf.data graph on the JAX backend they receive symbolic tf.Tensors they cannot
convert. This is the same computation in TensorFlow ops (on the TensorFlow backend the two are
bit-identical, tests/test_tf_pipeline.py): timm's integer resize geometry, then the antialiased
Keys bicubic of `tf.image.resize` applied as PIL applies its own (width, then height, each pass
computing only the crop window and rounding to 8 bits).
"""

import math

import tensorflow as tf


def eval_transform(image, image_size, crop_pct):
    """One HxWx3 image (uint8 or float in [0, 255], any size) -> float32 `image_size` x
    `image_size` x 3 with integer values: resize so the crop is `crop_pct` of it, centre crop."""
    height = width = int(image_size)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1]; received {crop_pct!r}.")
    shape = tf.shape(image, out_type=tf.int32)
    new_rows, new_cols, top, left = eval_geometry(shape[0], shape[1], height, width, crop_pct)
    columns = _resize_window(tf.cast(image, tf.float32), 1, new_cols, left, width)
    cropped = _resize_window(columns, 0, new_rows, top, height)
    return tf.reshape(cropped, (height, width, 3))


def eval_geometry(rows, cols, height, width, crop_pct):
    """(resized rows, resized cols, top, left) as int32 tensors: timm's centre-crop evaluation
    geometry, exactly as `keras_coat.imagenet.eval_geometry` computes it."""
    scale_h, scale_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
    if scale_h == scale_w:
        shorter = tf.minimum(rows, cols)
        new_rows, new_cols = scale_h * rows // shorter, scale_w * cols // shorter
    else:
        rows_limit = rows * scale_w <= cols * scale_h
        new_rows = tf.where(rows_limit, scale_h, _round_half_even(rows * scale_w, cols))
        new_cols = tf.where(rows_limit, _round_half_even(cols * scale_h, rows), scale_w)
    top = _round_half_even(new_rows - height, 2)
    left = _round_half_even(new_cols - width, 2)
    return new_rows, new_cols, top, left


def _round_half_even(numerator, denominator):
    quotient = numerator // denominator
    twice_remainder = 2 * (numerator - quotient * denominator)
    tie = (twice_remainder == denominator) & (quotient % 2 == 1)
    return quotient + tf.cast((twice_remainder > denominator) | tie, quotient.dtype)


def _resize_window(image, axis, new_size, start, length):
    """`image` resized along `axis` to `new_size`, keeping pixels [start, start + length) along
    it; antialiased Keys bicubic, rounded and clipped to 8 bits."""
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
    return tf.clip_by_value(tf.round(resized), 0.0, 255.0)
