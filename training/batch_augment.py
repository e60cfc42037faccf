"""The ImageNet recipe's batch-level augmentation, as timm implements it, vectorised for tf.data.

The authors trained with timm's transforms: RandAugment `rand-m9-mstd0.5-inc1`, random erasing
(probability 0.25, mode "pixel", one box) and `timm.data.Mixup` in batch mode (one lambda and one
CutMix box per batch, CutMix with probability `switch_prob`). Here every one of them runs on a
whole batch of float32 [0, 255] images:

  * every example still gets its own random parameters (op, magnitude, sign, box), drawn from the
    batch's seed, so the pipeline stays a function of (seed, epoch, position);
  * RandAugment sends each example to the op it drew (`tf.dynamic_partition`), runs every op
    once on all the examples that drew it and puts the batch back together
    (`tf.dynamic_stitch`): one pass over the pixels per layer instead of a graph per example.

The `sample_*` functions draw the parameters and nothing else, so tests can compare their
distributions with timm's own code; the `apply_*` functions do the pixel work. Images are rounded
to integers and clipped to [0, 255] after every RandAugment op, as PIL's uint8 images are.
"""

import math

import tensorflow as tf

from keras_coat.imagenet import IMAGENET_MEAN, IMAGENET_STD
from training.augment import fold_in

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes are out of 10
# timm's create_transform fills geometric ops with the ImageNet mean, as uint8.
FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)
# timm's "inc1" op set (_RAND_INCREASING_TRANSFORMS), in timm's order.
OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _uniform(shape, seed, low=0.0, high=1.0, dtype=tf.float64):
    return tf.random.stateless_uniform(shape, seed, low, high, dtype=dtype)


# ---------------------------------------------------------------------------------- RandAugment


def level_to_parameter(op_index, level, sign):
    """timm's level_fn of each op in `OPS`, vectorised: the op's argument for a magnitude `level`
    in [0, 10] and a random sign (+1 or -1, used by the ops timm negates at random).

    Ops without argument (AutoContrast, Equalize, Invert) get 0.
    """
    fraction = level / MAX_LEVEL
    enhance = tf.maximum(1.0 + sign * fraction * 0.9, 0.1)
    by_op = {
        "Rotate": sign * fraction * 30.0,
        "PosterizeIncreasing": 4.0 - tf.floor(fraction * 4.0),
        "SolarizeIncreasing": 256.0 - tf.minimum(tf.floor(fraction * 256.0), 256.0),
        "SolarizeAdd": tf.minimum(tf.floor(fraction * 110.0), 128.0),
        "ColorIncreasing": enhance,
        "ContrastIncreasing": enhance,
        "BrightnessIncreasing": enhance,
        "SharpnessIncreasing": enhance,
        "ShearX": sign * fraction * 0.3,
        "ShearY": sign * fraction * 0.3,
        "TranslateXRel": sign * fraction * 0.45,
        "TranslateYRel": sign * fraction * 0.45,
    }
    table = tf.stack([by_op.get(name, tf.zeros_like(level)) for name in OPS], axis=-1)
    return tf.gather(table, op_index, batch_dims=len(op_index.shape))


def sample_rand_augment(batch_size, seed, magnitude=9.0, magnitude_std=0.5, num_layers=2,
                        apply_prob=0.5):
    """Per-example RandAugment draws, as timm's `RandAugment` / `AugmentOp`.

    Each of `num_layers` layers picks one of `OPS` uniformly (with replacement across layers),
    applies it with probability `apply_prob`, at a magnitude drawn from
    N(`magnitude`, `magnitude_std`) clipped to [0, 10] (exactly `magnitude` when the std is 0).
    Returns a dict of [num_layers, batch_size] tensors: `op` (int32 index into `OPS`), `apply`
    (bool) and `parameter` (float64, the op's argument, see `level_to_parameter`).
    """
    shape = [num_layers, batch_size]
    op = tf.random.stateless_uniform(shape, fold_in(seed, 0), 0, len(OPS), dtype=tf.int32)
    apply = _uniform(shape, fold_in(seed, 1)) < apply_prob
    level = tf.fill(shape, tf.constant(magnitude, tf.float64))
    if magnitude_std > 0:
        noise = tf.random.stateless_normal(shape, fold_in(seed, 2), dtype=tf.float64)
        level += magnitude_std * noise
    level = tf.clip_by_value(level, 0.0, MAX_LEVEL)
    sign = tf.where(_uniform(shape, fold_in(seed, 3)) < 0.5, 1.0, -1.0)
    sign = tf.cast(sign, tf.float64)
    return {"op": op, "apply": apply, "parameter": level_to_parameter(op, level, sign)}


def _blend(degenerate, images, factor):
    """PIL's Image.blend(degenerate, images, factor) on uint8 images: truncates, then clips."""
    blended = tf.floor(degenerate + factor[:, None, None, None] * (images - degenerate))
    return tf.clip_by_value(blended, 0.0, 255.0)


def _grayscale(images):
    """PIL's RGB -> L conversion (ITU-R 601-2 luma, in 16-bit fixed point), as float [n,H,W,1]."""
    rgb = tf.cast(images, tf.int32)
    luma = tf.bitwise.right_shift(
        rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000, 16
    )
    return tf.cast(luma, tf.float32)[..., None]


def _auto_contrast(images, _):
    # PIL: per channel, lut[i] = int(i * 255 / (hi - lo) - lo * 255 / (hi - lo)); no-op if flat.
    x = tf.cast(images, tf.float64)
    low = tf.reduce_min(x, axis=(1, 2), keepdims=True)
    high = tf.reduce_max(x, axis=(1, 2), keepdims=True)
    scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1.0), 1.0)
    offset = tf.where(high > low, -low * scale, 0.0)
    return tf.cast(tf.floor(x * scale + offset), tf.float32)


def _equalize(images, _):
    # PIL's ImageOps.equalize, per image and channel: step = (count - count of the highest value)
    # // 255; lut[i] = (step // 2 + pixels below i) // step; no-op where step is 0.
    count = tf.shape(images)[0]
    values = tf.cast(images, tf.int32)
    channel = tf.reshape(tf.range(count), (-1, 1, 1, 1)) * 3 + tf.range(3)
    bins = channel * 256 + values
    histogram = tf.math.bincount(
        tf.reshape(bins, [-1]), minlength=count * 768, maxlength=count * 768
    )
    histogram = tf.reshape(histogram, (count * 3, 256))
    highest = 255 - tf.argmax(tf.reverse(tf.cast(histogram > 0, tf.int32), [1]), axis=1,
                              output_type=tf.int32)
    last = tf.gather(histogram, highest, batch_dims=1)
    step = (tf.reduce_sum(histogram, axis=1) - last) // 255
    below = tf.cumsum(histogram, axis=1, exclusive=True)
    lut = tf.minimum(255, (step[:, None] // 2 + below) // tf.maximum(step[:, None], 1))
    lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None])
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), bins), tf.float32)


def _invert(images, _):
    return 255.0 - images


def _posterize(images, bits):
    step = tf.pow(2.0, 8.0 - bits)[:, None, None, None]
    return tf.floor(images / step) * step


def _solarize(images, threshold):
    return tf.where(images >= threshold[:, None, None, None], 255.0 - images, images)


def _solarize_add(images, added):
    return tf.where(images < 128.0, tf.minimum(images + added[:, None, None, None], 255.0), images)


def _color(images, factor):
    return _blend(_grayscale(images), images, factor)


def _contrast(images, factor):
    mean = tf.floor(tf.reduce_mean(_grayscale(images), axis=(1, 2, 3), keepdims=True) + 0.5)
    return _blend(mean, images, factor)


def _brightness(images, factor):
    return _blend(tf.zeros_like(images), images, factor)


def _sharpness(images, factor):
    # PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13), border pixels kept.
    height, width = images.shape[1], images.shape[2]
    total = 4.0 * images[:, 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total += images[:, dy : height - 2 + dy, dx : width - 2 + dx]
    smooth = tf.round(total / 13.0)
    degenerate = tf.pad(smooth - images[:, 1:-1, 1:-1], [[0, 0], [1, 1], [1, 1], [0, 0]]) + images
    return _blend(degenerate, images, factor)


def _affine(images, coefficients):
    """PIL's Image.transform(AFFINE, (a, b, c, d, e, f)) per image, filled with `FILL`.

    PIL maps output pixel centres (x + 0.5, y + 0.5) to input (ax + by + c, dx + ey + f);
    ImageProjectiveTransformV3 samples input pixel centres at integer coordinates. Bilinear:
    TensorFlow has no bicubic affine warp (timm uses PIL's bicubic).
    """
    a, b, c, d, e, f = [tf.cast(t, tf.float32) for t in tf.unstack(coefficients, axis=1)]
    transforms = tf.stack(
        [a, b, c + 0.5 * (a + b - 1.0), d, e, f + 0.5 * (d + e - 1.0)]
        + [tf.zeros_like(a)] * 2,
        axis=1,
    )
    fill = tf.constant(FILL, tf.float32)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=images - fill,
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return tf.round(warped + fill)


def _rotate(images, degrees):
    # PIL's Image.rotate(degrees): counter-clockwise about the centre (w / 2, h / 2).
    height, width = [tf.cast(s, tf.float64) for s in (tf.shape(images)[1], tf.shape(images)[2])]
    angle = -degrees * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = width / 2.0, height / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return _affine(images, tf.stack([cos, sin, c, -sin, cos, f], axis=1))


def _shear_x(images, factor):
    zero, one = tf.zeros_like(factor), tf.ones_like(factor)
    return _affine(images, tf.stack([one, factor, zero, zero, one, zero], axis=1))


def _shear_y(images, factor):
    zero, one = tf.zeros_like(factor), tf.ones_like(factor)
    return _affine(images, tf.stack([one, zero, zero, factor, one, zero], axis=1))


def _translate_x(images, fraction):
    zero, one = tf.zeros_like(fraction), tf.ones_like(fraction)
    pixels = fraction * tf.cast(tf.shape(images)[2], tf.float64)
    return _affine(images, tf.stack([one, zero, pixels, zero, one, zero], axis=1))


def _translate_y(images, fraction):
    zero, one = tf.zeros_like(fraction), tf.ones_like(fraction)
    pixels = fraction * tf.cast(tf.shape(images)[1], tf.float64)
    return _affine(images, tf.stack([one, zero, zero, zero, one, pixels], axis=1))


# Each op takes float32 images [n, H, W, 3] with integer values in [0, 255] and its argument,
# float64 [n] (float32 for the blends and thresholds), and returns integer values in [0, 255].
OP_FUNCTIONS = {
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _color,
    "ContrastIncreasing": _contrast,
    "BrightnessIncreasing": _brightness,
    "SharpnessIncreasing": _sharpness,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}


def apply_op(name, images, parameter):
    """The op `name` of `OPS` on a batch of integer pixels, each image with its own argument."""
    parameter = tf.convert_to_tensor(parameter, tf.float64)
    if name not in GEOMETRIC_OPS:
        parameter = tf.cast(parameter, tf.float32)
    return OP_FUNCTIONS[name](images, parameter)


def apply_rand_augment(images, draws):
    """Applies the draws of `sample_rand_augment` to uint8 images [B, H, W, 3].

    The batch moves as uint8 (a quarter of float32's memory traffic); each op works in float32
    on the examples that drew it.
    """
    identity = len(OPS)
    shape = images.shape
    positions = tf.range(tf.shape(images)[0])
    for op, apply, parameter in zip(
        tf.unstack(draws["op"]), tf.unstack(draws["apply"]), tf.unstack(draws["parameter"])
    ):
        partition = tf.where(apply, op, identity)
        groups = tf.dynamic_partition(images, partition, identity + 1)
        parameters = tf.dynamic_partition(parameter, partition, identity + 1)
        indices = tf.dynamic_partition(positions, partition, identity + 1)
        outputs = [
            tf.cast(apply_op(name, tf.cast(group, tf.float32), value), tf.uint8)
            for name, group, value in zip(OPS, groups, parameters)
        ]
        images = tf.ensure_shape(tf.dynamic_stitch(indices, outputs + [groups[identity]]), shape)
    return images


class RandAugment:
    """timm's `rand-m{magnitude}-mstd{magnitude_std}-inc1` on uint8 batches (`num_ops` layers)."""

    def __init__(self, magnitude=9.0, num_ops=2, magnitude_std=0.5, apply_prob=0.5):
        self.magnitude = magnitude
        self.num_ops = num_ops
        self.magnitude_std = magnitude_std
        self.apply_prob = apply_prob

    def __call__(self, images, seed):
        draws = sample_rand_augment(
            tf.shape(images)[0], seed, self.magnitude, self.magnitude_std, self.num_ops,
            self.apply_prob,
        )
        return apply_rand_augment(images, draws)


# ------------------------------------------------------------------------------ random erasing


def sample_erasing_boxes(batch_size, seed, height, width, prob, scale=(0.02, 1 / 3),
                         ratio=(0.3, 1 / 0.3), attempts=10):
    """timm's RandomErasing boxes (one per image, mode "pixel"), per example.

    With probability `prob`: up to `attempts` tries of an area fraction uniform in `scale` and an
    aspect ratio (height / width) log-uniform in `ratio`, rounded to pixels; the first box
    strictly smaller than the image is placed uniformly. Returns int32 [batch_size] `top`,
    `left`, `height`, `width` (0 x 0 where nothing is erased).
    """
    area = float(height * width)
    shape = [batch_size, attempts]
    target = _uniform(shape, fold_in(seed, 1), *scale) * area
    aspect = tf.exp(_uniform(shape, fold_in(seed, 2), math.log(ratio[0]), math.log(ratio[1])))
    box_h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
    box_w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
    fits = (box_w < width) & (box_h < height)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    erase = (_uniform([batch_size], fold_in(seed, 0)) < prob) & tf.reduce_any(fits, axis=1)
    box_h = tf.where(erase, tf.gather(box_h, first, batch_dims=1), 0)
    box_w = tf.where(erase, tf.gather(box_w, first, batch_dims=1), 0)
    position = _uniform([2, batch_size], fold_in(seed, 3))
    top = tf.cast(tf.floor(position[0] * tf.cast(height - box_h + 1, tf.float64)), tf.int32)
    left = tf.cast(tf.floor(position[1] * tf.cast(width - box_w + 1, tf.float64)), tf.int32)
    return {"top": top, "left": left, "height": box_h, "width": box_w}


def apply_erasing(images, boxes, seed):
    """Fills each box with per-pixel noise that is N(0, 1) after ImageNet normalisation (not
    clipped: the model normalises [0, 255] pixels, so it sees exactly timm's fill).

    Noise is drawn for the erased pixels only (about 4% of a batch at the recipe's settings).
    """
    areas = boxes["height"] * boxes["width"]
    pixel = tf.ragged.range(areas)  # row i: the pixels of example i's box, row-major
    example = tf.cast(pixel.value_rowids(), tf.int32)
    offset = pixel.flat_values
    box_w = tf.maximum(tf.gather(boxes["width"], example), 1)
    rows = tf.gather(boxes["top"], example) + offset // box_w
    cols = tf.gather(boxes["left"], example) + offset % box_w
    noise = tf.random.stateless_normal([tf.shape(offset)[0], 3], fold_in(seed, 4))
    fill = 255.0 * (tf.constant(IMAGENET_MEAN) + tf.constant(IMAGENET_STD) * noise)
    return tf.tensor_scatter_nd_update(
        images, tf.stack([example, rows, cols], axis=1), tf.cast(fill, images.dtype)
    )


class RandomErasing:
    """timm's RandomErasing(probability, mode="pixel", max_count=1) on batches."""

    def __init__(self, prob):
        self.prob = prob

    def __call__(self, images, seed):
        boxes = sample_erasing_boxes(
            tf.shape(images)[0], fold_in(seed, 0), images.shape[1], images.shape[2], self.prob
        )
        return apply_erasing(images, boxes, seed)


# ------------------------------------------------------------------------------ Mixup / CutMix


def _beta(alpha, seed):
    gammas = tf.random.stateless_gamma([2], seed, alpha=alpha, dtype=tf.float64)
    return gammas[0] / (gammas[0] + gammas[1])


def sample_mixing(seed, height, width, mixup=0.8, cutmix=1.0, switch_prob=0.5):
    """timm's Mixup in "batch" mode: one draw for the whole batch.

    With both on, CutMix with probability `switch_prob`, else Mixup; lambda ~ Beta(alpha, alpha)
    of the one chosen. CutMix's box has sides int(size * sqrt(1 - lambda)) around a uniform
    centre, clipped to the image, and lambda becomes the kept area fraction (timm's
    `correct_lam`). Returns scalars `cutmix` (bool), `lam` (float64) and the int32 box
    `top`, `bottom`, `left`, `right` (empty for Mixup).
    """
    if not (mixup or cutmix):
        raise ValueError("Mixing needs mixup > 0 or cutmix > 0, got both 0.")
    if mixup and cutmix:
        use_cutmix = _uniform([], fold_in(seed, 0)) < switch_prob
    else:
        use_cutmix = tf.constant(not mixup)
    lam = tf.where(
        use_cutmix,
        _beta(cutmix or 1.0, fold_in(seed, 2)),
        _beta(mixup or 1.0, fold_in(seed, 1)),
    )
    ratio = tf.sqrt(1.0 - lam)
    cut_h = tf.cast(tf.floor(height * ratio), tf.int32)
    cut_w = tf.cast(tf.floor(width * ratio), tf.int32)
    centre = _uniform([2], fold_in(seed, 3))
    cy = tf.cast(tf.floor(centre[0] * height), tf.int32)
    cx = tf.cast(tf.floor(centre[1] * width), tf.int32)
    top = tf.clip_by_value(cy - cut_h // 2, 0, height)
    bottom = tf.clip_by_value(cy + (cut_h + 1) // 2, 0, height)
    left = tf.clip_by_value(cx - cut_w // 2, 0, width)
    right = tf.clip_by_value(cx + (cut_w + 1) // 2, 0, width)
    cut_lam = 1.0 - tf.cast((bottom - top) * (right - left), tf.float64) / (height * width)
    empty = tf.zeros([], tf.int32)
    return {
        "cutmix": use_cutmix,
        "lam": tf.where(use_cutmix, cut_lam, lam),
        "top": tf.where(use_cutmix, top, empty),
        "bottom": tf.where(use_cutmix, bottom, empty),
        "left": tf.where(use_cutmix, left, empty),
        "right": tf.where(use_cutmix, right, empty),
    }


def apply_mixing(images, labels, draw):
    """Mixes every example with the one at the mirrored position of the batch (timm's
    `x.flip(0)`): Mixup blends, CutMix pastes the box; labels mix in proportion `lam`."""
    height, width = images.shape[1], images.shape[2]
    lam = tf.cast(draw["lam"], images.dtype)
    rows = tf.range(height)[:, None, None]
    cols = tf.range(width)[None, :, None]
    inside = (
        (rows >= draw["top"]) & (rows < draw["bottom"])
        & (cols >= draw["left"]) & (cols < draw["right"])
    )
    # Weight of the example itself: lam everywhere (Mixup), 0 in the box and 1 outside (CutMix).
    own = tf.where(draw["cutmix"], tf.cast(~inside, images.dtype), lam)
    partner = tf.reverse(images, [0])
    mixed = partner + own[None] * (images - partner)
    labels = tf.cast(labels, images.dtype)
    return mixed, lam * labels + (1.0 - lam) * tf.reverse(labels, [0])


class BatchMixing:
    """timm's Mixup(mixup_alpha, cutmix_alpha, switch_prob, mode="batch") on (images, labels)."""

    def __init__(self, mixup=0.8, cutmix=1.0, switch_prob=0.5):
        if not (mixup or cutmix):
            raise ValueError("BatchMixing needs mixup > 0 or cutmix > 0.")
        self.mixup, self.cutmix, self.switch_prob = mixup, cutmix, switch_prob

    def __call__(self, images, labels, seed):
        draw = sample_mixing(
            seed, images.shape[1], images.shape[2], self.mixup, self.cutmix, self.switch_prob
        )
        return apply_mixing(images, labels, draw)
