"""Training package, in process: recipes, schedule, weight-decay exclusions, input pipelines
(digits, ImageNet through TFDS mock data) and the XLA train step."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import data, optim, recipes, train

TINY = dict(embed_dims=(16, 16, 16, 16), serial_depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2))


# ------------------------------------------------------------------------------------ recipes


def test_imagenet_recipe_is_the_official_one():
    r = recipes.get_recipe("imagenet", "coat_lite_small")
    assert (r.epochs, r.batch_size, r.lr, r.lr_reference_batch) == (300, 2048, 5e-4, 512)
    assert r.peak_lr == pytest.approx(5e-4 * 2048 / 512)
    assert (r.warmup_epochs, r.warmup_lr, r.min_lr) == (5, 1e-6, 1e-5)
    assert (r.weight_decay, r.adam_epsilon, r.label_smoothing) == (0.05, 1e-8, 0.1)
    assert (r.mixup, r.cutmix, r.mixup_switch_prob) == (0.8, 1.0, 0.5)
    assert (r.rand_augment_magnitude, r.random_erasing, r.color_jitter) == (9, 0.25, 0.4)
    assert (r.ema_momentum, r.clip_norm, r.drop_path) == (0.99996, None, 0.1)
    assert r.repeated_augmentations == 3 and r.mixed_precision == "bfloat16"


@pytest.mark.parametrize("model, drop_path", [("coat_small", 0.2), ("coat_lite_medium", 0.3)])
def test_large_variants_get_the_readme_overrides(model, drop_path):
    r = recipes.get_recipe("imagenet", model)
    assert (r.model, r.batch_size, r.drop_path) == (model, 1024, drop_path)
    assert (r.ema_momentum, r.warmup_epochs, r.clip_norm) == (None, 20, 5.0)
    assert r.peak_lr == pytest.approx(5e-4 * 1024 / 512)


def test_finetune_and_demo_recipes():
    f = recipes.get_recipe("finetune")
    assert (f.model, f.image_size, f.epochs, f.batch_size) == ("coat_lite_medium", 384, 6, 256)
    assert f.peak_lr == f.min_lr == 5e-6 and f.warmup_epochs == 0
    assert (f.weight_decay, f.drop_path, f.init_weights) == (1e-8, 0.2, "imagenet")
    d = recipes.get_recipe("demo")
    assert (d.dataset, d.model, d.image_size) == ("digits", "coat_lite_tiny", 32)
    assert not d.horizontal_flip


def test_recipe_validation_and_overrides():
    r = recipes.get_recipe("demo")
    assert recipes.override(r, {"epochs": 3, "ema_momentum": None}).epochs == 3
    with pytest.raises(ValueError, match="image_size must be a multiple of 32"):
        recipes.override(r, {"image_size": 40})
    with pytest.raises(ValueError, match="warmup_epochs"):
        recipes.override(r, {"epochs": 2, "warmup_epochs": 5.0})
    with pytest.raises(ValueError, match="Unknown recipe fields: bogus"):
        recipes.override(r, {"bogus": 1})
    with pytest.raises(ValueError, match="Unknown recipe 'nope'"):
        recipes.get_recipe("nope")


def test_command_line_overrides_and_off_switches():
    args = train.parse_args(
        ["--recipe", "imagenet", "--model", "coat_small", "--output-dir", "x", "--lr", "1e-3",
         "--ema", "0", "--clip-norm", "0", "--rand-augment", "-1", "--batch-size", "256"]
    )
    r = train.resolve_recipe(args)
    assert (r.lr, r.batch_size, r.ema_momentum, r.clip_norm) == (1e-3, 256, None, None)
    assert r.rand_augment_magnitude is None and r.drop_path == 0.2  # variant override kept


# ----------------------------------------------------------------------------------- schedule


def test_schedule_warms_up_then_follows_the_cosine_to_min_lr():
    s = optim.WarmupCosineDecay(
        peak_lr=1e-3, total_steps=100, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-5
    )
    lr = lambda step: float(s(step))  # noqa: E731
    assert lr(0) == pytest.approx(1e-6)
    assert lr(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    def cosine(step):
        return 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * step / 100))

    for step in (10, 50, 99):
        assert lr(step) == pytest.approx(cosine(step), rel=1e-5)
    assert lr(100) == pytest.approx(1e-5) and lr(1000) == pytest.approx(1e-5)


def test_schedule_serializes_and_drives_the_optimizer():
    r = recipes.override(recipes.get_recipe("imagenet"), {"batch_size": 512})
    schedule = optim.learning_rate_schedule(r, steps_per_epoch=10)
    assert (schedule.total_steps, schedule.warmup_steps, schedule.peak_lr) == (3000, 50, 5e-4)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(restored, optim.WarmupCosineDecay)
    assert restored.get_config() == schedule.get_config()
    opt = optim.build_optimizer(r, steps_per_epoch=10)
    assert (opt.weight_decay, opt.epsilon) == (0.05, 1e-8)
    assert (opt.use_ema, opt.ema_momentum) == (True, 0.99996)
    clipped = optim.build_optimizer(recipes.get_recipe("imagenet", "coat_small"), 10)
    assert clipped.global_clipnorm == 5.0 and not clipped.use_ema


@pytest.mark.parametrize("parallel_depth", [0, 1])
def test_weight_decay_skips_cls_tokens_norms_and_biases_only(parallel_depth):
    recipe = recipes.get_recipe("demo")
    model = train.build_model(
        recipe, 10, dict(TINY, parallel_depth=parallel_depth)
    )
    opt = optim.build_optimizer(recipe, steps_per_epoch=10)
    excluded = {v.path for v in model.trainable_variables if not opt._use_weight_decay(v)}
    norms = {
        w.path
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.LayerNormalization)
        for w in layer.weights
    }
    expected = norms | {
        v.path for v in model.trainable_variables if "cls_token" in v.name or v.name == "bias"
    }
    assert excluded == expected
    assert any("cls_token" in p for p in excluded) and norms <= excluded
    kernels = [v for v in model.trainable_variables if v.name in ("kernel", "depthwise_kernel")]
    assert kernels and all(opt._use_weight_decay(v) for v in kernels)


@pytest.mark.parametrize("options", [{}, {"use_ema": True, "global_clipnorm": 0.5}])
def test_adamw_updates_as_keras_adamw_with_one_fused_kernel_per_variable(options):
    """training.optim.AdamW (on TensorFlow one ResourceApplyAdam per variable, its weight decay
    folded in) gives Keras' AdamW's weights, moments and moving averages, exclusions included."""

    def trained(optimizer_class, weight_decay=0.3):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([
            keras.Input((6,)), keras.layers.Dense(8, activation="gelu"),
            keras.layers.LayerNormalization(), keras.layers.Dense(3),
        ])  # fmt: skip
        optimizer = optimizer_class(
            learning_rate=optim.WarmupCosineDecay(0.05, total_steps=6, warmup_steps=2),
            weight_decay=weight_decay, epsilon=1e-8, **options,
        )  # fmt: skip
        optimizer.exclude_from_weight_decay(var_names=list(optim.NO_WEIGHT_DECAY))
        model.compile(optimizer=optimizer, loss="mse")
        x = np.random.RandomState(0).normal(size=(24, 6)).astype("float32")
        model.fit(x, x[:, :3] * 2.0, batch_size=4, epochs=1, shuffle=False, verbose=0)
        return [v.numpy() for v in model.weights + optimizer.variables]

    ours, expected = trained(optim.AdamW), trained(keras.optimizers.AdamW)
    assert len(ours) == len(expected)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours, expected)) < 1e-6
    undecayed = trained(optim.AdamW, weight_decay=0.0)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours, undecayed)) > 1e-4

    optimizer = optim.AdamW(learning_rate=1e-3, weight_decay=0.1)
    variables = [keras.Variable(np.ones((2, 2)), name="kernel"), keras.Variable(np.ones(2))]
    optimizer.build(variables)
    step = tf.function(lambda: optimizer.apply([tf.ones((2, 2)), tf.ones(2)], variables))
    kernels = [op.type for op in step.get_concrete_function().graph.get_operations()]
    assert kernels.count("ResourceApplyAdam") == 2


# ---------------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def digits():
    return data.load_source("digits", 32)


def test_digits_source_is_a_fixed_stratified_held_out_split(digits):
    assert (digits.train.num_examples, digits.validation.num_examples) == (1437, 360)
    assert digits.class_names == [str(d) for d in range(10)]
    image = next(iter(digits.validation.records))["image"]
    assert image.shape == (32, 32, 3) and image.dtype == tf.uint8
    assert np.array_equal(image[..., 0], image[..., 2])  # grayscale as RGB
    labels = [int(r["label"]) for r in digits.validation.records]
    assert np.bincount(labels).min() >= 35  # stratified: ~36 of each digit


def _batches(recipe, source, start_epoch, count, seed=0):
    ds = data.train_dataset(recipe, source, seed, start_epoch, max_steps=2)
    return [tuple(t.numpy() for t in batch) for batch in ds.take(count)]


def test_training_pipeline_is_static_and_a_function_of_seed_and_epoch(digits):
    recipe = recipes.override(recipes.get_recipe("demo"), {"epochs": 3, "batch_size": 8})
    ds = data.train_dataset(recipe, digits, seed=0, max_steps=2)
    assert ds.element_spec[0].shape == (8, 32, 32, 3) and ds.element_spec[1].shape == (8, 10)
    full = _batches(recipe, digits, 0, 6)
    assert len(full) == 6 == len(list(ds))  # epochs x capped steps
    resumed = _batches(recipe, digits, 1, 4)  # a run resumed at epoch 1 sees the same batches
    for a, b in zip(full[2:], resumed):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(full[0][0], full[2][0])  # epochs differ
    assert not np.array_equal(full[0][0], _batches(recipe, digits, 0, 1, seed=1)[0][0])


def test_a_run_resumed_within_an_epoch_sees_the_rest_of_its_batches(digits):
    recipe = recipes.override(recipes.get_recipe("demo"), {"epochs": 3, "batch_size": 8})
    full = _batches(recipe, digits, 0, 6)
    ds = data.train_dataset(recipe, digits, 0, 1, max_steps=2, start_step=1, end_epoch=2)
    rest_of_epoch = [tuple(t.numpy() for t in batch) for batch in ds]
    assert len(rest_of_epoch) == 1 == ds.cardinality()
    np.testing.assert_array_equal(rest_of_epoch[0][0], full[3][0])
    np.testing.assert_array_equal(rest_of_epoch[0][1], full[3][1])
    with pytest.raises(ValueError, match=r"start_step 2 of 2 steps per epoch"):
        data.train_dataset(recipe, digits, 0, 1, max_steps=2, start_step=2)


def test_imagenet_augmentation_stack_on_digits(digits):
    recipe = recipes.override(
        recipes.get_recipe("imagenet"),
        {"image_size": 32, "batch_size": 8, "epochs": 1, "warmup_epochs": 0},
    )
    transform = data.TrainTransform(recipe, 10)
    assert transform.step_names == [
        "random_resized_crop", "horizontal_flip", "one_hot", "batch", "rand_augment",
        "random_erasing", "mixup_cutmix",
    ]  # colour jitter is off under RandAugment, as in timm
    images, labels = _batches(recipe, digits, 0, 1)[0]
    # Erased boxes hold N(0, 1) noise after normalization, so pixels may leave [0, 255].
    assert images.shape == (8, 32, 32, 3) and np.isfinite(images).all()
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-5)  # mixed, still distributions
    assert (labels.max(axis=1) < 1).any()  # Mixup/CutMix mixed some labels
    jitter = recipes.override(recipe, {"rand_augment_magnitude": None})
    assert "color_jitter" in data.TrainTransform(jitter, 10).step_names
    assert _batches(jitter, digits, 0, 1)[0][0].shape == (8, 32, 32, 3)


def test_validation_is_padded_and_weighted_to_exact_means(digits):
    recipe = recipes.override(recipes.get_recipe("demo"), {"batch_size": 64})
    batches = list(data.eval_dataset(recipe, digits))
    assert len(batches) == 6  # 360 examples -> 384
    weights = np.concatenate([w.numpy() for _, _, w in batches])
    assert (weights > 0).sum() == 360 and weights[360:].sum() == 0
    # Keras averages batch losses (sum(w * l) / batch) weighted by batch size.
    losses = np.random.RandomState(0).uniform(size=384)
    weighted = (weights * losses).reshape(6, 64)
    keras_mean = np.mean(weighted.sum(axis=1) / 64)
    assert keras_mean == pytest.approx(losses[:360].mean())


def test_imagenet2012_pipeline_on_tfds_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    recipe = recipes.override(
        recipes.get_recipe("imagenet"),
        {"image_size": 32, "batch_size": 4, "epochs": 1, "warmup_epochs": 0},
    )
    with tfds.testing.mock_data(num_examples=10):
        source = data.load_source("imagenet2012", 32, manual_dir="/nonexistent")
        assert source.num_classes == 1000 and source.class_names[0] == "n01440764"
        assert source.train.num_examples == 10
        images, labels = next(iter(data.train_dataset(recipe, source, seed=0)))
        evaluated = list(data.eval_dataset(recipe, source))
    assert images.shape == (4, 32, 32, 3) and labels.shape == (4, 1000)
    assert len(evaluated) == 3  # 10 examples padded to 12, real ones weigh 12 / 10
    assert evaluated[-1][2].numpy().tolist() == pytest.approx([1.2, 1.2, 0.0, 0.0])


# --------------------------------------------------------------------------------- train step


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["none", "bfloat16"])
@pytest.mark.timeout(900)  # measured up to 156 s on a busy machine (pyproject: 300 s)
def test_train_step_compiles_with_xla(precision):
    recipe = recipes.override(
        recipes.get_recipe("demo"),
        {"batch_size": 4, "mixed_precision": precision, "drop_path": 0.1},
    )
    keras.utils.set_random_seed(0)
    previous = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy(recipes.MIXED_PRECISION_POLICIES[precision])
        # Under a strategy, as training.train builds and compiles (OneDeviceStrategy on one
        # device): Keras then creates the optimizer's and metrics' variables before the first
        # step, which is traced and compiled once instead of twice (about half this test).
        with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
            model = train.build_model(recipe, 10, TINY)
            train.compile_model(model, recipe, steps_per_epoch=10, jit_compile=True)
        images = np.random.RandomState(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
        labels = np.eye(10, dtype="float32")[[0, 1, 2, 3]]
        before = [w.numpy().copy() for w in model.trainable_weights]
        losses = [model.train_on_batch(images, labels, return_dict=True)["loss"] for _ in range(2)]
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert model.jit_compile is True
    assert all(np.isfinite(losses))
    if precision == "bfloat16":
        assert model.layers[-2].compute_dtype == "bfloat16"
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))


def test_folder_source_reads_an_image_tree(tmp_path):
    from PIL import Image

    for split, count in (("train", 3), ("val", 1)):
        for name, value in (("cat", 40), ("dog", 200)):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.full((20 + i, 30, 3), value, np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    source = data.load_source(f"folder:{tmp_path}", 32)
    assert source.class_names == ["cat", "dog"]
    assert (source.train.num_examples, source.validation.num_examples) == (6, 2)
    recipe = recipes.override(recipes.get_recipe("demo"), {"batch_size": 2})
    images, labels = next(iter(data.train_dataset(recipe, source, seed=0)))
    assert images.shape == (2, 32, 32, 3)
    for image, label in zip(images.numpy(), labels.numpy()):
        assert image.mean() == pytest.approx((40, 200)[label.argmax()], abs=1)
    (val_images, val_labels, _), = list(data.eval_dataset(recipe, source))
    assert val_labels.numpy().argmax(axis=1).tolist() == [0, 1]


def test_dataset_error_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data.load_source(f"folder:{tmp_path / 'missing'}", 32)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.load_source(f"folder:{tmp_path}", 32)
    recipe = recipes.override(recipes.get_recipe("demo"), {"batch_size": 4096})
    with pytest.raises(ValueError, match="larger than the training split"):
        data.steps_per_epoch(recipe, data.load_source("digits", 32))


@pytest.mark.slow
@pytest.mark.timeout(900)  # measured up to 177 s on a busy machine (pyproject: 300 s)
def test_validation_checkpoints_and_export_use_the_ema_weights(tmp_path):
    import csv
    import json

    out = tmp_path / "run"
    metrics = train.main([
        "--recipe", "demo", "--model-config", json.dumps(TINY), "--output-dir", str(out),
        "--batch-size", "8", "--steps-per-epoch", "2", "--epochs", "2", "--lr", "0.05",
        "--ema", "0.5", "--verbose", "0", "--seed", "1",
    ])  # fmt: skip
    model = keras.saving.load_model(out / "last.keras", compile=False)
    # After fit the model holds the EMA weights; the last epoch's validation (logged during fit)
    # must have seen exactly those, not the raw weights of the last step.
    with open(out / "training_log.csv") as f:
        logged = list(csv.DictReader(f))[-1]
    assert float(logged["val_loss"]) == pytest.approx(metrics["val_loss"], rel=1e-5)
    assert float(logged["val_accuracy"]) == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    # The SavedModel serves the same (EMA) model.
    images = np.random.RandomState(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    served = tf.saved_model.load(str(out / "export" / "1")).signatures["serving_default"]
    np.testing.assert_allclose(
        served(images=tf.constant(images))["probabilities"].numpy(),
        model.predict(images, verbose=0),
        atol=1e-5,
    )
