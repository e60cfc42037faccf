"""Per-example augmentation ops for tf.data, each a pure function of the image and a seed.

Every random number is derived from the example's seed, so an epoch's augmentation depends only
on (run seed, epoch, position): parallel `map` stays deterministic and a resumed run sees exactly
the data an uninterrupted run would. The random-resized crop is torchvision's (timm's) and, for
JPEGs, decodes only the crop window. Everything is plain TensorFlow, so the pipeline runs the
same under every Keras backend. The recipe's batch-level augmentation (RandAugment, random
erasing, Mixup/CutMix) is in `training.batch_augment`.
"""

import math

import tensorflow as tf

from keras_coat.tf_images import decode_image, header_image_size

PIXEL_RANGE = (0.0, 255.0)


def fold_in(seed, *data):
    """A new [2] seed from `seed` and integers `data` (tensors or Python ints)."""
    for value in data:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64))
    return seed


def crop_window(shape, seed, scale, ratio, attempts=10):
    """torchvision's RandomResizedCrop.get_params (timm's, too) for an image of `shape`.

    Up to `attempts` tries, all drawn at once: an area fraction uniform in `scale`, an aspect
    ratio (width / height) log-uniform in `ratio`, sides rounded to pixels; the first that fits
    is placed uniformly. Otherwise a centre crop of the whole image clamped to `ratio`.
    Returns int32 [top, left, height, width].
    """
    height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    uniform = tf.random.stateless_uniform([3, attempts], seed, dtype=tf.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * uniform[0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_low + (log_high - log_low) * uniform[1])
    crop_w = tf.round(tf.sqrt(area * aspect))
    crop_h = tf.round(tf.sqrt(area / aspect))
    fits = (crop_w <= width) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    # Fallback: the whole image, cropped to the nearest allowed aspect ratio.
    image_ratio = width / height
    fallback_w = tf.where(image_ratio > ratio[1], tf.round(height * ratio[1]), width)
    fallback_h = tf.where(image_ratio < ratio[0], tf.round(width / ratio[0]), height)
    found = tf.reduce_any(fits)
    crop_h = tf.where(found, crop_h[first], fallback_h)
    crop_w = tf.where(found, crop_w[first], fallback_w)
    position = tf.random.stateless_uniform([2], fold_in(seed, 1), dtype=tf.float64)
    top = tf.where(found, tf.floor(position[0] * (height - crop_h + 1)), (height - crop_h) // 2)
    left = tf.where(found, tf.floor(position[1] * (width - crop_w + 1)), (width - crop_w) // 2)
    return tf.cast(tf.stack([top, left, crop_h, crop_w]), tf.int32)


def random_resized_crop(image, seed, size, scale, ratio):
    """A `crop_window` of a decoded HxWxC image, resized bicubically to `size` x `size`."""
    top, left, height, width = tf.unstack(crop_window(tf.shape(image), seed, scale, ratio))
    crop = tf.slice(image, [top, left, 0], [height, width, 3])
    return tf.ensure_shape(resize(crop, (size, size)), (size, size, 3))


def decode_random_resized_crop(encoded, seed, size, scale, ratio):
    """`random_resized_crop` of an encoded JPEG, PNG or BMP image (its size checked from the
    header first, `keras_coat.tf_images`); JPEGs decode only the crop window."""
    shape = header_image_size(encoded)

    def jpeg():
        window = crop_window(shape, seed, scale, ratio)
        crop = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
        return resize(crop, (size, size))

    def other():
        return random_resized_crop(decode_image(encoded), seed, size, scale, ratio)

    with tf.control_dependencies(shape):
        image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    return tf.ensure_shape(image, (size, size, 3))


def resize(image, size):
    """Bicubic resize (antialiased when shrinking, as PIL) to float32 pixels clipped to [0, 255].

    Enlarging needs no antialiasing, and TensorFlow's plain bicubic kernel does it about three
    times faster than its antialiasing one (the same Keys cubic, a = -0.5, on pixel centres).
    """
    image = tf.cast(image, tf.float32)
    enlarging = tf.reduce_all(tf.shape(image)[-3:-1] <= tf.convert_to_tensor(size, tf.int32))
    image = tf.cond(
        enlarging,
        lambda: tf.image.resize(image, size, method="bicubic"),
        lambda: tf.image.resize(image, size, method="bicubic", antialias=True),
    )
    return tf.clip_by_value(image, *PIXEL_RANGE)


def horizontal_flip(image, seed):
    return tf.image.stateless_random_flip_left_right(image, seed)


class ColorJitter:
    """Brightness, contrast and saturation jitter of strength `strength` (timm's ColorJitter),
    one after the other, each clipped to [0, 255].

    The draws and arithmetic of Keras' RandomBrightness(s / 2), RandomContrast(s) and
    RandomSaturation(((1 - s) / (2 - s), (1 + s) / (2 + s))) layers on the TensorFlow backend,
    bit for bit (tests/test_tf_pipeline.py), in TensorFlow ops so that tf.data runs them under
    any Keras backend. Keras' brightness is additive (half the range matches torchvision's
    factor at mid-gray), its contrast factor is drawn from [1, 1 + s] (its factor bounds clip
    the lower end at 0), and its saturation factor f scales by f / (1 - f).
    """

    def __init__(self, strength):
        s = float(strength)
        self.brightness = (-s / 2, s / 2)
        self.contrast = (1.0, 1.0 + s)
        self.saturation = ((1 - s) / (2 - s), (1 + s) / (2 + s))

    def __call__(self, image, seed):
        image = image[None]
        delta = _layer_uniform((1, 1, 1, 1), fold_in(seed, 0), *self.brightness) * 255.0
        image = _clip(image + delta)
        factor = _layer_uniform((1, 1, 1, 1), fold_in(seed, 1), *self.contrast)
        mean = tf.reduce_mean(tf.reduce_mean(image, axis=-3, keepdims=True), axis=-2, keepdims=True)
        image = _clip((image - mean) * factor + mean)
        factor = _layer_uniform((1,), fold_in(seed, 2), *self.saturation)
        factor = tf.reshape(factor / (1 - factor + 1e-7), (1, 1, 1))
        hsv = tf.image.rgb_to_hsv(image)
        saturation = _clip(hsv[..., 1] * factor)
        image = tf.image.hsv_to_rgb(tf.stack([hsv[..., 0], saturation, hsv[..., 2]], axis=-1))
        return _clip(image)[0]


def _layer_uniform(shape, seed, low, high):
    """The first draw of a Keras preprocessing layer given a SeedGenerator seeded with `seed`:
    float32 uniform in [low, high) under the seed `stateless_fold_in(seed, 1)`."""
    draw = tf.random.experimental.stateless_fold_in(seed, 1)
    if draw.dtype != tf.int32:  # as Keras' TensorFlow backend casts a seed
        draw = tf.cast(tf.math.floormod(draw, tf.int32.max - 1), tf.int32)
    return tf.random.stateless_uniform(shape, draw, minval=low, maxval=high, dtype=tf.float32)


def _clip(image):
    return tf.clip_by_value(image, *PIXEL_RANGE)
