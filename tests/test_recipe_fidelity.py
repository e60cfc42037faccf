"""The ImageNet recipe's augmentation against timm's own implementation, on the same inputs.

Random draws are compared as distributions over many seeded draws (two-sample Kolmogorov-Smirnov
tests and frequency tables); the pixel work of every op is compared on the same image with the
same argument. Seeds are fixed, so every test is deterministic; the tolerances are a few times
the sampling noise, far below what a wrong mapping, a missing sign flip or a wrong mode gives.
"""

import random

import numpy as np
import pytest
import tensorflow as tf

timm_data = pytest.importorskip("timm.data")
scipy_stats = pytest.importorskip("scipy.stats")
torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402
from timm.data import auto_augment as timm_aa  # noqa: E402
from timm.data import mixup as timm_mixup  # noqa: E402

from keras_coat.imagenet import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from training import augment, batch_augment  # noqa: E402

KS_P_VALUE = 1e-3  # two-sample KS: same distribution unless p is below this


def _same_distribution(ours, theirs, what):
    result = scipy_stats.ks_2samp(np.asarray(ours, float), np.asarray(theirs, float))
    assert result.pvalue > KS_P_VALUE, (what, result.statistic, result.pvalue)


def _same_frequencies(ours, theirs, what, tolerance=0.04):
    values = sorted(set(ours) | set(theirs))
    ours_freq = np.array([np.mean(np.asarray(ours) == v) for v in values])
    theirs_freq = np.array([np.mean(np.asarray(theirs) == v) for v in values])
    assert np.abs(ours_freq - theirs_freq).max() < tolerance, (what, values, ours_freq, theirs_freq)


def _seed(value):
    return tf.constant([value, 7], tf.int64)


def _seeds(count):
    return tf.stack([tf.range(count, dtype=tf.int64), tf.fill([count], tf.constant(7, tf.int64))],
                    axis=1)


def _natural_image(height, width, seed=0):
    """A smooth, asymmetric uint8 test image (gradients and blobs), so that a mirrored, rotated
    the wrong way or shifted result differs clearly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([255 * x / width, 255 * y / height, 128 + 60 * np.sin(x / 5 + y / 9)], -1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(3, height / 3)
        image[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------- RandAugment

TIMM_HPARAMS = dict(
    translate_const=int(224 * 0.45),
    img_mean=batch_augment.FILL,
    interpolation=Image.BICUBIC,
)


def _timm_rand_augment_draws(count):
    """(op name, argument) of every op timm's rand-m9-mstd0.5-inc1 applies in `count` calls."""
    policy = timm_aa.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(TIMM_HPARAMS))
    applied = []
    for op in policy.ops:
        def record(image, *args, name=op.name, **kwargs):
            applied.append((name, args[0] if args else 0.0))
            return image

        op.aug_fn = record
    random.seed(0)
    np.random.seed(0)
    image = Image.new("RGB", (4, 4))
    for _ in range(count):
        policy(image)
    return policy, applied


def test_rand_augment_op_set_rates_and_parameters_match_timm():
    count = 20_000  # calls of 2 layers: ~1,300 applications of each op
    policy, theirs = _timm_rand_augment_draws(count)
    assert [op.name for op in policy.ops] == list(batch_augment.OPS)  # SolarizeAdd included
    assert policy.num_layers == 2 and all(op.prob == 0.5 for op in policy.ops)
    assert all((op.magnitude, op.magnitude_std) == (9, 0.5) for op in policy.ops)

    draws = batch_augment.sample_rand_augment(count, _seed(1), magnitude=9.0, magnitude_std=0.5)
    op = draws["op"].numpy().ravel()
    applied = draws["apply"].numpy().ravel()
    parameter = draws["parameter"].numpy().ravel()
    ours = [(batch_augment.OPS[o], p) for o, a, p in zip(op, applied, parameter) if a]

    # Each op is applied in 0.5 / 15 of the layer draws.
    layer_draws = 2 * count
    for name in batch_augment.OPS:
        ours_rate = sum(n == name for n, _ in ours) / layer_draws
        theirs_rate = sum(n == name for n, _ in theirs) / layer_draws
        assert abs(ours_rate - 0.5 / 15) < 0.004 and abs(theirs_rate - 0.5 / 15) < 0.004, name

    discrete = {"PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"}
    for name in batch_augment.OPS:
        ours_values = [p for n, p in ours if n == name]
        theirs_values = [p for n, p in theirs if n == name]
        if name in ("AutoContrast", "Equalize", "Invert"):
            continue  # no argument
        if name in discrete:
            _same_frequencies(ours_values, theirs_values, name)
        else:
            _same_distribution(ours_values, theirs_values, name)


def test_rand_augment_parameter_of_each_op_at_fixed_magnitudes_is_timms(monkeypatch):
    levels = np.array([0.0, 2.5, 4.4, 7.7, 9.0, 10.0])
    for sign in (1.0, -1.0):
        for index, name in enumerate(batch_augment.OPS):
            level_fn = timm_aa.LEVEL_TO_ARG[name]
            if level_fn is None:
                continue
            ours = batch_augment.level_to_parameter(
                tf.fill([len(levels)], index),
                tf.constant(levels),
                tf.fill([len(levels)], tf.constant(sign, tf.float64)),
            ).numpy()
            # timm negates when random.random() > 0.5: pin its coin to our sign.
            coin = {1.0: 0.0, -1.0: 1.0}[sign]
            monkeypatch.setattr(timm_aa.random, "random", lambda: coin)
            theirs = [level_fn(level, dict(TIMM_HPARAMS))[0] for level in levels]
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9, err_msg=name)


# Largest mean / max absolute difference (of 255) from timm's PIL op on the same image and
# argument. Geometric ops interpolate bilinearly (TensorFlow has no bicubic affine warp).
OP_TOLERANCE = {
    "Rotate": (2.0, 255), "ShearX": (2.0, 255), "ShearY": (2.0, 255),
    "TranslateXRel": (2.0, 255), "TranslateYRel": (2.0, 255),
    "SharpnessIncreasing": (0.05, 2),
}
OP_ARGUMENTS = {
    "Rotate": [-27.0, 12.0], "PosterizeIncreasing": [1.0, 3.0], "SolarizeIncreasing": [26.0, 200.0],
    "SolarizeAdd": [99.0, 40.0], "ShearX": [0.27, -0.1], "ShearY": [-0.27, 0.1],
    "TranslateXRel": [0.405, -0.2], "TranslateYRel": [-0.405, 0.13],
}


@pytest.mark.parametrize("name", batch_augment.OPS)
def test_rand_augment_op_pixels_match_timms_pil_ops(name):
    image = _natural_image(48, 64)
    low_contrast = (image // 2 + 40).astype(np.uint8)  # AutoContrast and Equalize have work
    arguments = OP_ARGUMENTS.get(name, [0.1, 1.9] if "Increasing" in name else [0.0, 0.0])
    images = np.stack([image, low_contrast])
    ours = batch_augment.apply_op(name, tf.constant(images, tf.float32), arguments).numpy()
    assert ours.dtype == np.float32 and (ours == np.round(ours)).all()
    mean_tolerance, max_tolerance = OP_TOLERANCE.get(name, (0.02, 1))
    for ours_image, source, argument in zip(ours, images, arguments):
        args = () if timm_aa.LEVEL_TO_ARG[name] is None else (argument,)
        if name == "PosterizeIncreasing":
            args = (int(argument),)
        theirs = timm_aa.NAME_TO_OP[name](
            Image.fromarray(source), *args, fillcolor=batch_augment.FILL, resample=Image.BICUBIC
        )
        difference = np.abs(ours_image - np.asarray(theirs, np.float32))
        assert difference.mean() <= mean_tolerance and difference.max() <= max_tolerance, (
            name, argument, difference.mean(), difference.max()
        )


def test_rand_augment_keeps_shape_dtype_and_is_a_function_of_the_seed():
    images = tf.constant(np.stack([_natural_image(32, 32, s) for s in range(16)]))
    policy = batch_augment.RandAugment(magnitude=9)
    out = policy(images, _seed(3)).numpy()
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, policy(images, _seed(3)))
    assert not np.array_equal(out, policy(images, _seed(4)))
    assert (out != images.numpy()).any(axis=(1, 2, 3)).sum() >= 8  # most examples changed


# ------------------------------------------------------------------------------ random erasing


def _timm_erasing_boxes(count, height, width):
    erasing = timm_data.random_erasing.RandomErasing(
        probability=0.25, mode="pixel", max_count=1, device="cpu"
    )
    random.seed(0)
    torch.manual_seed(0)
    boxes = []
    for _ in range(count):
        image = torch.zeros(3, height, width)
        erasing(image)
        rows, cols = np.nonzero(image.abs().sum(0).numpy())
        if len(rows):
            boxes.append((rows.min(), cols.min(), rows.max() + 1 - rows.min(),
                          cols.max() + 1 - cols.min()))
        else:
            boxes.append((0, 0, 0, 0))
    return np.array(boxes)


def test_random_erasing_boxes_follow_timms_distribution():
    # 24 x 64: many boxes of up to a third of the area do not fit, so the 10 attempts and their
    # failure matter (as they do at 224 x 224 for extreme aspect ratios).
    count, height, width = 6000, 24, 64
    theirs = _timm_erasing_boxes(count, height, width)
    boxes = batch_augment.sample_erasing_boxes(count, _seed(5), height, width, prob=0.25)
    ours = np.stack([boxes[k].numpy() for k in ("top", "left", "height", "width")], axis=1)
    ours_erased, theirs_erased = ours[ours[:, 2] > 0], theirs[theirs[:, 2] > 0]
    assert abs(len(ours_erased) / count - 0.25) < 0.02
    assert abs(len(theirs_erased) / count - 0.25) < 0.02
    for column, what in enumerate(("top", "left", "height", "width")):
        _same_distribution(ours_erased[:, column], theirs_erased[:, column], what)
    area = lambda b: b[:, 2] * b[:, 3]  # noqa: E731
    _same_distribution(area(ours_erased), area(theirs_erased), "area")
    _same_distribution(ours_erased[:, 2] / ours_erased[:, 3],
                       theirs_erased[:, 2] / theirs_erased[:, 3], "aspect ratio")
    assert (ours_erased[:, 0] + ours_erased[:, 2] <= height).all()
    assert (ours_erased[:, 1] + ours_erased[:, 3] <= width).all()


def test_random_erasing_fills_boxes_with_normal_noise_after_normalization():
    images = tf.fill([64, 32, 48, 3], 100.0)
    boxes = batch_augment.sample_erasing_boxes(64, _seed(6), 32, 48, prob=1.0)
    out = batch_augment.apply_erasing(images, boxes, _seed(6)).numpy()
    mask = np.zeros(out.shape[:3], bool)
    for i in range(64):
        t, l, h, w = (int(boxes[k][i]) for k in ("top", "left", "height", "width"))
        mask[i, t : t + h, l : l + w] = True
    assert mask.sum() > 1000
    np.testing.assert_array_equal(out[~mask], 100.0)  # nothing outside the boxes changes
    normalized = (out[mask] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.abs(normalized.mean(axis=0)).max() < 0.05
    assert np.abs(normalized.std(axis=0) - 1.0).max() < 0.05
    assert normalized.min() < -3 and normalized.max() > 3  # not clipped to [0, 255]


# ------------------------------------------------------------------------------ Mixup / CutMix

MIXUP_ARGS = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode="batch",
                  label_smoothing=0.1)


def test_mixing_draws_follow_timms_batch_mode():
    count, height, width = 3000, 40, 56
    mixer = timm_mixup.Mixup(**MIXUP_ARGS, num_classes=10)
    np.random.seed(0)
    theirs = []
    for _ in range(count):
        lam, use_cutmix = mixer._params_per_batch()
        if use_cutmix:
            box, lam = timm_mixup.cutmix_bbox_and_lam((1, 3, height, width), lam, correct_lam=True)
            theirs.append((1, lam, *box))
        else:
            theirs.append((0, lam, 0, 0, 0, 0))
    theirs = np.array(theirs)
    keys = ("cutmix", "lam", "top", "bottom", "left", "right")

    @tf.function
    def sample(seeds):
        def one(seed):
            draw = batch_augment.sample_mixing(seed, height, width)
            return tf.stack([tf.cast(draw[k], tf.float64) for k in keys])

        return tf.map_fn(one, seeds, fn_output_signature=tf.float64)

    ours = sample(_seeds(count)).numpy()
    assert abs(ours[:, 0].mean() - 0.5) < 0.03 and abs(theirs[:, 0].mean() - 0.5) < 0.03
    for use_cutmix, what in ((0, "mixup"), (1, "cutmix")):
        o, t = ours[ours[:, 0] == use_cutmix], theirs[theirs[:, 0] == use_cutmix]
        _same_distribution(o[:, 1], t[:, 1], f"{what} lambda")
    # Mixup's lambda ~ Beta(0.8, 0.8): variance 1 / (4 (2 alpha + 1)) = 0.0962 (Beta(1, 1): 0.083).
    for draws in (ours, theirs):
        assert abs(draws[draws[:, 0] == 0, 1].var() - 1 / (4 * 2.6)) < 0.006
    o, t = ours[ours[:, 0] == 1], theirs[theirs[:, 0] == 1]
    for column, what in zip(range(2, 6), ("top", "bottom", "left", "right")):
        _same_distribution(o[:, column], t[:, column], f"cutmix box {what}")


@pytest.mark.parametrize("use_cutmix", [False, True])
def test_mixing_one_lambda_and_box_per_batch_as_timm_applies_them(use_cutmix, monkeypatch):
    rng = np.random.default_rng(0)
    batch, height, width, classes = 6, 24, 40, 10
    images = rng.uniform(0, 255, (batch, height, width, 3)).astype(np.float32)
    labels = np.array([3, 1, 4, 1, 5, 9])
    mixer = timm_mixup.Mixup(**MIXUP_ARGS, num_classes=classes)
    monkeypatch.setattr(mixer, "_params_per_batch", lambda: (0.7, use_cutmix))
    np.random.seed(3)
    box, lam = timm_mixup.cutmix_bbox_and_lam((1, 3, height, width), 0.7, correct_lam=True)
    if not use_cutmix:
        box, lam = (0, 0, 0, 0), 0.7
    np.random.seed(3)  # timm draws the same box again inside its call
    theirs_x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    theirs_x, theirs_y = mixer(theirs_x, torch.from_numpy(labels))
    draw = {"cutmix": tf.constant(use_cutmix), "lam": tf.constant(lam, tf.float64),
            **dict(zip(("top", "bottom", "left", "right"), (tf.constant(int(b)) for b in box)))}
    ours_x, ours_y = batch_augment.apply_mixing(
        tf.constant(images), tf.one_hot(labels, classes), draw
    )
    np.testing.assert_allclose(ours_x.numpy(), theirs_x.numpy().transpose(0, 2, 3, 1), atol=1e-3)
    # timm smooths the targets itself; Keras' CategoricalCrossentropy(label_smoothing=0.1) does
    # the same to the mixed one-hot labels.
    smoothed = ours_y.numpy() * (1 - 0.1) + 0.1 / classes
    np.testing.assert_allclose(smoothed, theirs_y.numpy(), atol=1e-6)


# ----------------------------------------------------------------------- random resized crop


def test_crop_window_follows_torchvisions_random_resized_crop():
    count, height, width = 3000, 375, 500
    crop = timm_data.transforms.RandomResizedCropAndInterpolation(224)
    image = Image.new("RGB", (width, height))
    random.seed(0)
    theirs = np.array([crop.get_params(image, crop.scale, crop.ratio) for _ in range(count)])
    windows = tf.function(
        lambda seeds: tf.map_fn(
            lambda s: augment.crop_window([height, width, 3], s, (0.08, 1.0), (3 / 4, 4 / 3)),
            seeds,
            fn_output_signature=tf.int32,
        )
    )
    ours = windows(_seeds(count)).numpy()
    for column, what in enumerate(("top", "left", "height", "width")):
        _same_distribution(ours[:, column], theirs[:, column], what)
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
