"""Augmentation ops for tf.data, each a pure function of the image and a per-example seed.

The ops are Keras preprocessing layers (RandomRotation, RandomShear, ..., RandomErasing, MixUp,
CutMix) driven through their public `get_random_transformation(..., seed=)` /
`transform_images` interface with a `SeedStream`: every random number is then derived from the
example's seed, so an epoch's augmentation depends only on (run seed, epoch, position). That
keeps parallel `map` deterministic and makes a resumed run see exactly the data an uninterrupted
run would. Only what Keras lacks is written here: the bicubic random-resized crop, the
RandAugment policy of timm (Keras' `RandAugment` applies every op and keeps some, with op
magnitudes far from timm's), and timm's per-pixel noise fill for random erasing.
"""

import keras
import tensorflow as tf

from keras_coat._keras_internals import SeedStream
from keras_coat.imagenet import IMAGENET_MEAN, IMAGENET_STD

PIXEL_RANGE = (0.0, 255.0)
FILL_GRAY = 128.0  # timm fills geometric ops with (128, 128, 128)


def fold_in(seed, *data):
    """A new [2] seed from `seed` and integers `data` (tensors or Python ints)."""
    for value in data:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64))
    return seed


def apply_layer(layer, image, seed):
    """Applies a Keras image-preprocessing layer to one HxWxC image with randomness from `seed`."""
    batch = image[None]
    transformation = layer.get_random_transformation(batch, training=True, seed=SeedStream(seed))
    return layer.transform_images(batch, transformation, training=True)[0]


def random_resized_crop(image, seed, size, scale, ratio):
    """A crop of random area fraction `scale` and aspect `ratio`, resized bicubically to `size`.

    As torchvision's RandomResizedCrop: 10 attempts, else the whole image. Output float32 in
    [0, 255].
    """
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, crop_size)
    return tf.ensure_shape(resize(crop, (size, size)), (size, size, 3))


def resize(image, size):
    """Bicubic resize (antialiased when shrinking, as PIL) to float32 pixels clipped to [0, 255]."""
    image = tf.image.resize(tf.cast(image, tf.float32), size, method="bicubic", antialias=True)
    return tf.clip_by_value(image, *PIXEL_RANGE)


def horizontal_flip(image, seed):
    return tf.image.stateless_random_flip_left_right(image, seed)


class RandAugment:
    """timm's RandAugment "rand-m{M}-inc1" built from Keras layers.

    `num_ops` times: pick one of the 14 ops below uniformly, apply it with probability 0.5. Each op
    samples its magnitude uniformly up to `M / 10` of its maximum (the Keras layers sample from a
    range; timm's "mstd0.5" draws it from N(M, 0.5) instead). timm's SolarizeAdd has no Keras
    counterpart and is left out. Works on float32 [0, 255] images.
    """

    def __init__(self, magnitude=9.0, num_ops=2, apply_prob=0.5):
        level = magnitude / 10.0
        self.num_ops = num_ops
        self.apply_prob = apply_prob
        value_range = PIXEL_RANGE
        geometric = dict(fill_mode="constant", fill_value=FILL_GRAY, interpolation="bilinear")
        # Enhancement ops: timm's factor 1 +- 0.9 * level around identity.
        enhance = 0.9 * level
        self.ops = {
            "auto_contrast": keras.layers.AutoContrast(value_range=value_range),
            "equalize": keras.layers.Equalization(value_range=value_range),
            "invert": keras.layers.RandomInvert(factor=(1.0, 1.0), value_range=value_range),
            "rotate": keras.layers.RandomRotation(30.0 * level / 360.0, **geometric),
            "posterize": keras.layers.RandomPosterization(
                factor=max(1, int(4 - 4 * level)), value_range=value_range
            ),
            "solarize": keras.layers.Solarization(
                threshold_factor=(1.0 - level, 1.0), value_range=value_range
            ),
            # RandomSaturation's factor f scales saturation by f / (1 - f); 0.5 is identity.
            "color": keras.layers.RandomSaturation(
                factor=((1 - enhance) / (2 - enhance), (1 + enhance) / (2 + enhance)),
                value_range=value_range,
            ),
            "contrast": keras.layers.RandomContrast(factor=enhance, value_range=value_range),
            # Additive in Keras; half the multiplicative range matches timm's at mid-gray.
            "brightness": keras.layers.RandomBrightness(
                factor=enhance / 2, value_range=value_range
            ),
            # RandomSharpness: 0 blurs, 0.5 is identity, 1 sharpens.
            "sharpness": keras.layers.RandomSharpness(
                factor=(0.5 - enhance / 2, 0.5 + enhance / 2), value_range=value_range
            ),
            "shear_x": keras.layers.RandomShear(
                x_factor=0.3 * level, y_factor=0.0, interpolation="bilinear", fill_value=FILL_GRAY
            ),
            "shear_y": keras.layers.RandomShear(
                x_factor=0.0, y_factor=0.3 * level, interpolation="bilinear", fill_value=FILL_GRAY
            ),
            "translate_x": keras.layers.RandomTranslation(0.0, 0.45 * level, **geometric),
            "translate_y": keras.layers.RandomTranslation(0.45 * level, 0.0, **geometric),
        }

    def __call__(self, image, seed):
        ops = list(self.ops.values())
        shape = image.shape
        for i in range(self.num_ops):
            op_seed = fold_in(seed, i)
            index = tf.random.stateless_uniform(
                [], fold_in(op_seed, 0), 0, len(ops), dtype=tf.int32
            )
            apply = tf.random.stateless_uniform([], fold_in(op_seed, 1)) < self.apply_prob
            branches = [
                lambda op=op, image=image, seed=fold_in(op_seed, 2): tf.clip_by_value(
                    apply_layer(op, image, seed), *PIXEL_RANGE
                )
                for op in ops
            ]
            image = tf.cond(apply, lambda: tf.switch_case(index, branches), lambda: image)
            image = tf.ensure_shape(image, shape)
        return image


class ColorJitter:
    """Brightness, contrast and saturation jitter of strength `strength` (timm's ColorJitter).

    torchvision scales each by a factor in [1 - s, 1 + s]; Keras' brightness is additive (half the
    range matches at mid-gray) and its saturation factor f scales by f / (1 - f).
    """

    def __init__(self, strength):
        s = strength
        self.layers = [
            keras.layers.RandomBrightness(factor=s / 2, value_range=PIXEL_RANGE),
            keras.layers.RandomContrast(factor=s, value_range=PIXEL_RANGE),
            keras.layers.RandomSaturation(
                factor=((1 - s) / (2 - s), (1 + s) / (2 + s)), value_range=PIXEL_RANGE
            ),
        ]

    def __call__(self, image, seed):
        for i, layer in enumerate(self.layers):
            image = tf.clip_by_value(apply_layer(layer, image, fold_in(seed, i)), *PIXEL_RANGE)
        return image


class RandomErasing:
    """timm's random erasing in "pixel" mode: with probability `prob`, one box is replaced by
    per-pixel noise that is N(0, 1) after ImageNet normalization.

    Keras' RandomErasing draws the box (area 2%-33%); its own fill (N(0, 1) x 255, clipped) is
    replaced by timm's.
    """

    def __init__(self, prob):
        self.layer = keras.layers.RandomErasing(
            factor=(prob, prob), scale=(0.02, 1 / 3), value_range=PIXEL_RANGE
        )
        self.mean = tf.constant([255.0 * m for m in IMAGENET_MEAN])
        self.std = tf.constant([255.0 * s for s in IMAGENET_STD])

    def __call__(self, image, seed):
        batch = image[None]
        transformation = self.layer.get_random_transformation(
            batch, training=True, seed=SeedStream(fold_in(seed, 0))
        )
        noise = tf.random.stateless_normal(tf.shape(batch), fold_in(seed, 1))
        transformation["fill_value"] = tf.clip_by_value(
            self.mean + self.std * noise, *PIXEL_RANGE
        )
        return self.layer.transform_images(batch, transformation, training=True)[0]


class BatchMixing:
    """Mixup and/or CutMix on a batch of images and one-hot labels (timm's Mixup, "elem" mode).

    With both on, a batch gets CutMix with probability `switch_prob`, Mixup otherwise. Mixup's
    weight is Beta(mixup, mixup) and CutMix's box area Beta(cutmix, cutmix), per example; labels
    mix in proportion (CutMix: to the pasted area).
    """

    def __init__(self, mixup=0.8, cutmix=1.0, switch_prob=0.5):
        if not (mixup or cutmix):
            raise ValueError("BatchMixing needs mixup > 0 or cutmix > 0.")
        self.mixup = keras.layers.MixUp(alpha=mixup) if mixup else None
        self.cutmix = keras.layers.CutMix(factor=(cutmix, cutmix)) if cutmix else None
        self.switch_prob = switch_prob

    @staticmethod
    def _apply(layer, images, labels, seed):
        data = {"images": images, "labels": labels}
        transformation = layer.get_random_transformation(data, training=True, seed=SeedStream(seed))
        return (
            layer.transform_images(images, transformation, training=True),
            layer.transform_labels(labels, transformation, training=True),
        )

    def __call__(self, images, labels, seed):
        if self.cutmix is None:
            return self._apply(self.mixup, images, labels, fold_in(seed, 1))
        if self.mixup is None:
            return self._apply(self.cutmix, images, labels, fold_in(seed, 2))
        use_cutmix = tf.random.stateless_uniform([], fold_in(seed, 0)) < self.switch_prob
        return tf.cond(
            use_cutmix,
            lambda: self._apply(self.cutmix, images, labels, fold_in(seed, 2)),
            lambda: self._apply(self.mixup, images, labels, fold_in(seed, 1)),
        )
