"""Keras' weight initializers, drawn with NumPy on the host and handed to the backend once.

Keras' own initializers run the backend's random and fill ops. On JAX each of those runs eagerly
as a small XLA program compiled for its shape: building CoaT-Lite Small compiled about 100 of
them, 35-50 s on a 2-core CPU, most of the time from a new process to the first prediction.
These subclasses draw the same distributions (Keras' definitions and configs) with NumPy and
convert the finished array with its dtype given, which compiles nothing on any backend.

Seeds work as Keras': an int seed, or without one a seed drawn from Python's `random` when the
initializer is made (so `keras.utils.set_random_seed` makes a model's weights reproducible).
Each instance draws from its own seed, so every layer gets its own instance; the factories below
make a new one per call. With a `keras.random.SeedGenerator` as the seed, Keras' own ops draw
the values (a generator's state lives on the backend).
"""

import contextlib
import contextvars
import math

import keras
import numpy as np
from keras import ops

_PACKAGE = "keras_coat"
# Keras' truncated normals re-draw values more than two standard deviations from the mean.
_TRUNCATION = 2.0


def _host_dtype(dtype):
    dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
    return "float64" if dtype == "float64" else "float32"


def _to_tensor(values, dtype):
    dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
    return ops.convert_to_tensor(np.asarray(values, _host_dtype(dtype)), dtype=dtype)


def _truncated_standard_normal(generator, shape, dtype):
    values = generator.standard_normal(shape, dtype=dtype)
    outside = np.abs(values) > _TRUNCATION
    while outside.any():
        values[outside] = generator.standard_normal(int(outside.sum()), dtype=dtype)
        outside = np.abs(values) > _TRUNCATION
    return values


def _fans(shape, input_axes=None, output_axes=None):
    """`(fan_in, fan_out)` as `keras.initializers.VarianceScaling` computes them."""
    shape = tuple(shape)
    if input_axes is not None and output_axes is not None:
        return math.prod(shape[a] for a in input_axes), math.prod(shape[a] for a in output_axes)
    if not shape:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive_field = math.prod(shape[:-2])
    return shape[-2] * receptive_field, shape[-1] * receptive_field


_values_loaded_next = contextvars.ContextVar("keras_coat_values_loaded_next", default=False)


@contextlib.contextmanager
def values_loaded_next():
    """Within it, the random initializers below give zeros instead of drawing: for a model
    whose every randomly initialized variable is then loaded from a file (the preset loader's
    backbones), the draws would be thrown away (0.5 s of CoaT-Lite Small's 3.6 s from_preset on
    TensorFlow). `Zeros` and `Ones` are unaffected, so the layers that a legacy file lacks (its
    norms) keep their values. Seeds are still drawn when an initializer is made, so what is
    drawn after the model is built does not change."""
    token = _values_loaded_next.set(True)
    try:
        yield
    finally:
        _values_loaded_next.reset(token)


class _HostRandom:
    """Draws with `np.random.default_rng(self.seed)` when the seed is an int."""

    def __call__(self, shape, dtype=None):
        if _values_loaded_next.get():
            return _to_tensor(np.zeros(shape), dtype)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            return super().__call__(shape, dtype=dtype)
        generator = np.random.default_rng(self.seed)
        return _to_tensor(self._draw(generator, tuple(shape), _host_dtype(dtype)), dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TruncatedNormal(_HostRandom, keras.initializers.TruncatedNormal):
    """`keras.initializers.TruncatedNormal`, drawn on the host."""

    def _draw(self, generator, shape, dtype):
        values = _truncated_standard_normal(generator, shape, dtype)
        values *= np.asarray(self.stddev, dtype)
        values += np.asarray(self.mean, dtype)
        return values


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RandomUniform(_HostRandom, keras.initializers.RandomUniform):
    """`keras.initializers.RandomUniform`, drawn on the host."""

    def _draw(self, generator, shape, dtype):
        return generator.uniform(self.minval, self.maxval, shape)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GlorotUniform(_HostRandom, keras.initializers.GlorotUniform):
    """`keras.initializers.GlorotUniform` (Keras' default for kernels), drawn on the host."""

    def _draw(self, generator, shape, dtype):
        # Keras before 3.9 has no input_axes/output_axes (its fans then follow the shape).
        fan_in, fan_out = _fans(
            shape, getattr(self, "input_axes", None), getattr(self, "output_axes", None)
        )
        scale = self.scale / max(1.0, (fan_in + fan_out) / 2.0)
        limit = math.sqrt(3.0 * scale)
        return generator.uniform(-limit, limit, shape)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Zeros(keras.initializers.Zeros):
    """`keras.initializers.Zeros`, made on the host."""

    def __call__(self, shape, dtype=None):
        return _to_tensor(np.zeros(shape), dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Ones(keras.initializers.Ones):
    """`keras.initializers.Ones`, made on the host."""

    def __call__(self, shape, dtype=None):
        return _to_tensor(np.ones(shape), dtype)


def trunc_normal():
    """timm's and the authors' initialization of Linear layers and class tokens (std 0.02)."""
    return TruncatedNormal(stddev=0.02)


def glorot_uniform():
    """Keras' default for kernels (convolutions)."""
    return GlorotUniform()


def zeros():
    return Zeros()


def ones():
    return Ones()


def dense_initializers():
    """The keyword arguments of a `Dense` layer initialized as the reference's Linear layers."""
    return {"kernel_initializer": trunc_normal(), "bias_initializer": zeros()}


def conv_initializers(depthwise=False):
    """The keyword arguments of a `Conv2D` (or `DepthwiseConv2D`) with Keras' default
    distributions."""
    kernel = "depthwise_initializer" if depthwise else "kernel_initializer"
    return {kernel: glorot_uniform(), "bias_initializer": zeros()}


def norm_initializers():
    """The keyword arguments of a `LayerNormalization` with Keras' default values."""
    return {"gamma_initializer": ones(), "beta_initializer": zeros()}
