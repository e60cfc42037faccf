"""The tf.data pipelines are plain TensorFlow: they run under every Keras backend (the pipeline
test marked for it runs on JAX as well), give on TensorFlow exactly what the Keras
implementations they replace give, and split every global batch between processes. (The
evaluation transform they use is checked against Pillow and timm in test_eval_transform.py.)"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import augment, data, recipes


def _demo_recipe(**changes):
    return recipes.override(recipes.get_recipe("demo"), {"batch_size": 8, **changes})


@pytest.fixture(scope="module")
def digits():
    return data.load_source("digits", 32)


class _FoldInSeeds(keras.random.SeedGenerator):
    """Draw k (from 1) of a Keras random op is `stateless_fold_in(seed, k)`: the seeds the
    pipeline gave Keras' preprocessing layers when it ran them."""

    def __init__(self, seed):  # no state variable
        self._seed, self._draws = seed, 0

    def next(self, ordered=True):
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._draws)


@pytest.mark.parametrize("strength", [0.1, 0.4, 0.9])
def test_color_jitter_is_keras_preprocessing_layers_bit_for_bit(strength):
    s = strength
    layers = [
        keras.layers.RandomBrightness(factor=s / 2, value_range=(0, 255)),
        keras.layers.RandomContrast(factor=s, value_range=(0, 255)),
        keras.layers.RandomSaturation(
            factor=((1 - s) / (2 - s), (1 + s) / (2 + s)), value_range=(0, 255)
        ),
    ]

    def with_layers(image, seed):
        for index, layer in enumerate(layers):
            batch = image[None]
            seeds = _FoldInSeeds(augment.fold_in(seed, index))
            transformation = layer.get_random_transformation(batch, training=True, seed=seeds)
            image = layer.transform_images(batch, transformation, training=True)[0]
            image = tf.clip_by_value(image, 0.0, 255.0)
        return image

    jitter = augment.ColorJitter(strength)
    rng = np.random.default_rng(0)
    for k in range(8):
        image = tf.constant(rng.integers(0, 256, (17, 23, 3)).astype(np.float32))
        seed = tf.constant([k, 7], tf.int64)
        np.testing.assert_array_equal(
            tf.function(jitter)(image, seed).numpy(), tf.function(with_layers)(image, seed).numpy()
        )


@pytest.mark.backends("tensorflow", "jax")
def test_pipelines_with_color_jitter_run_under_this_backend(digits):
    recipe = _demo_recipe(color_jitter=0.4)
    images, labels = next(iter(data.train_dataset(recipe, digits, seed=0, max_steps=1)))
    assert images.shape == (8, 32, 32, 3) and labels.shape == (8, 10)
    images, labels, weights = next(iter(data.eval_dataset(recipe, digits)))
    assert images.shape == (8, 32, 32, 3) and float(tf.reduce_min(weights)) > 0


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_share_out_every_global_batch(digits, processes):
    recipe = _demo_recipe(mixup=0.0, cutmix=0.0)

    def batches(dataset):
        return [[np.asarray(t) for t in batch] for batch in dataset]

    whole = batches(data.train_dataset(recipe, digits, seed=1, max_steps=3))
    slices = [
        batches(data.train_dataset(recipe, digits, 1, 0, 3, index, processes))
        for index in range(processes)
    ]
    assert all(len(s) == len(whole) == 3 * recipe.epochs for s in slices)
    for step, batch in enumerate(whole):
        for part in range(2):
            joined = np.concatenate([s[step][part] for s in slices])
            np.testing.assert_array_equal(joined, batch[part])

    held_out = batches(data.eval_dataset(recipe, digits, batch_size=16))
    held_out_slices = [
        batches(data.eval_dataset(recipe, digits, 16, index, processes))
        for index in range(processes)
    ]
    assert all(len(s) == len(held_out) for s in held_out_slices)
    for step, batch in enumerate(held_out):
        for part in range(3):
            joined = np.concatenate([s[step][part] for s in held_out_slices])
            np.testing.assert_array_equal(joined, batch[part])


def test_a_global_batch_that_processes_cannot_share_is_refused(digits):
    with pytest.raises(ValueError, match="global batch size 8 must be a multiple of .* \\(3\\)"):
        data.train_dataset(_demo_recipe(), digits, 0, 0, 1, 0, 3)
