"""keras_coat's host-drawn initializers: Keras' distributions and seeds, made without a backend
program (what kept a CoaT build on JAX compiling for most of a minute)."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

from keras_coat import initializers
from tests.conftest import to_numpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "ours, theirs, shape",
    [
        (initializers.TruncatedNormal(stddev=0.02, seed=1),
         keras.initializers.TruncatedNormal(stddev=0.02, seed=1), (256, 512)),
        (initializers.TruncatedNormal(mean=1.0, stddev=3.0, seed=1),
         keras.initializers.TruncatedNormal(mean=1.0, stddev=3.0, seed=1), (300, 400)),
        (initializers.GlorotUniform(seed=2), keras.initializers.GlorotUniform(seed=2),
         (7, 7, 96, 1)),
        (initializers.GlorotUniform(seed=2), keras.initializers.GlorotUniform(seed=2),
         (4, 4, 3, 64)),
        (initializers.RandomUniform(-0.5, 0.25, seed=3),
         keras.initializers.RandomUniform(-0.5, 0.25, seed=3), (500, 300)),
    ],
    ids=["trunc_normal", "trunc_normal_shifted", "glorot_depthwise", "glorot_conv", "uniform"],
)  # fmt: skip
def test_values_follow_the_distribution_of_keras_own_initializer(ours, theirs, shape):
    values, reference = to_numpy(ours(shape)), to_numpy(theirs(shape))
    assert values.shape == reference.shape == shape and values.dtype == np.float32
    # Same support (truncation at two standard deviations, Glorot's limit from the fans) ...
    assert values.min() >= reference.min() - 0.02 * abs(reference.min()) - 1e-6
    assert values.max() <= reference.max() + 0.02 * abs(reference.max()) + 1e-6
    assert values.min() < 0.9 * reference.min() + 0.1 * reference.mean()
    # ... and the same moments, within the sampling error of 10^4-10^5 draws.
    spread = reference.std()
    assert abs(values.mean() - reference.mean()) < 0.05 * spread
    assert values.std() == pytest.approx(spread, rel=0.05)
    assert ours.get_config() == theirs.get_config()


def test_zeros_and_ones_are_exact_in_the_requested_dtype():
    for initializer, value in ((initializers.Zeros(), 0.0), (initializers.Ones(), 1.0)):
        for dtype in ("float32", "float16", "bfloat16"):
            tensor = initializer((3, 5), dtype=dtype)
            assert keras.backend.standardize_dtype(tensor.dtype) == dtype
            np.testing.assert_array_equal(to_numpy(ops.cast(tensor, "float32")), np.full((3, 5), value))


def test_seeds_work_as_in_keras():
    # An int seed: the same values at every call (Keras' rule for seeded initializers).
    seeded = initializers.TruncatedNormal(stddev=0.02, seed=7)
    np.testing.assert_array_equal(to_numpy(seeded((4, 4))), to_numpy(seeded((4, 4))))
    # No seed: every instance its own, drawn from Python's random, which set_random_seed seeds.
    keras.utils.set_random_seed(123)
    first = [to_numpy(initializers.trunc_normal()((8, 8))) for _ in range(2)]
    keras.utils.set_random_seed(123)
    again = [to_numpy(initializers.trunc_normal()((8, 8))) for _ in range(2)]
    assert not np.array_equal(first[0], first[1])
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # A SeedGenerator draws through Keras' own ops (its state lives on the backend).
    generator = initializers.GlorotUniform(seed=keras.random.SeedGenerator(5))
    values = to_numpy(generator((6, 6)))
    assert values.shape == (6, 6) and np.abs(values).max() <= np.sqrt(6 / 12) + 1e-6


@pytest.mark.parametrize("name", ["trunc_normal", "glorot_uniform", "zeros", "ones"])
def test_initializers_serialize_as_themselves(name):
    initializer = getattr(initializers, name)()
    restored = keras.initializers.deserialize(keras.initializers.serialize(initializer))
    assert type(restored) is type(initializer)
    assert restored.get_config() == initializer.get_config()


def test_values_loaded_next_skips_the_random_draws_only_while_it_lasts():
    """What the preset loader builds a backbone in: its random initializers give zeros (the
    preset's values replace them), Zeros and Ones their values, and drawing resumes after it,
    also after an error inside it."""
    drawn = initializers.TruncatedNormal(stddev=0.02, seed=3)
    with initializers.values_loaded_next():
        for initializer in (drawn, initializers.GlorotUniform(seed=1),
                            initializers.RandomUniform(seed=2)):  # fmt: skip
            tensor = initializer((4, 6), dtype="bfloat16")
            assert keras.backend.standardize_dtype(tensor.dtype) == "bfloat16"
            np.testing.assert_array_equal(to_numpy(ops.cast(tensor, "float32")), np.zeros((4, 6)))
        np.testing.assert_array_equal(to_numpy(initializers.Ones()((2, 2))), np.ones((2, 2)))
    with pytest.raises(RuntimeError, match="inside"):
        with initializers.values_loaded_next():
            raise RuntimeError("inside")
    assert 0.01 < to_numpy(drawn((64, 64))).std() < 0.03


def test_half_precision_variables_get_their_dtype():
    tensor = initializers.trunc_normal()((16, 16), dtype="bfloat16")
    assert keras.backend.standardize_dtype(tensor.dtype) == "bfloat16"
    assert np.abs(to_numpy(ops.cast(tensor, "float32"))).max() <= 0.04 + 1e-3


def test_building_a_coat_on_jax_compiles_no_program_per_weight():
    """Every Keras initializer ran as its own XLA program on JAX (about 100 compilations and
    35-50 s for CoaT-Lite Small on 2 cores). Now building compiles only a few scalar
    conversions, however many weights the model has."""
    script = textwrap.dedent(
        """
        import jax
        compiles = []
        jax.monitoring.register_event_duration_secs_listener(
            lambda name, seconds, **kw: compiles.append(name)
            if name.endswith("backend_compile_duration") else None)
        from keras_coat import CoaTBackbone, CoaTImageClassifier
        backbone = CoaTBackbone([32, 32, 32, 32], [1, 1, 1, 1], [2, 2, 2, 2], parallel_depth=1,
                                image_shape=(64, 64, 3))
        model = CoaTImageClassifier(backbone, num_classes=10)
        print(len(model.weights), len(compiles))
        """
    )
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    weights, compiles = map(int, done.stdout.split()[-2:])
    assert weights > 100 and compiles <= 5
