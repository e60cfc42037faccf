"""CoaT's own layers, in the order of the paper (Sections 4 and 5).

Token sequences are ``[batch, 1 + H * W, channels]``: a class (CLS) token followed by the image
tokens of an ``H x W`` grid in row-major order. Layers that need the grid take ``size=(H, W)``
as a call argument, because the same shared layer is called at every block of its scale.

Everything here is written with ``keras.ops`` only, so it runs on the TensorFlow and JAX backends.
"""

import functools
import inspect
import re
import warnings

import keras
import numpy as np
from keras import layers, ops

from keras_coat import initializers

_PACKAGE = "keras_coat"


# Widths up to which FactorizedConvAttention uses one masked [C, C] context for all heads.
_FULL_CONTEXT_MAX_CHANNELS = 128
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _grid(size):
    """`size` arrives as a tuple when building and as a list after deserialization."""
    height, width = (int(s) for s in size)
    return height, width


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ClassToken(layers.Layer):
    """Prepends a learned class token to a token sequence.

    Input: ``[batch, N, C]``. Output: ``[batch, 1 + N, C]``. Weight ``cls_token``: ``[1, 1, C]``.
    """

    def build(self, input_shape):
        self.cls_token = self.add_weight(
            shape=(1, 1, input_shape[-1]), initializer=initializers.trunc_normal(), name="cls_token"
        )

    def call(self, tokens):
        batch = ops.shape(tokens)[0]
        cls = ops.cast(self.cls_token, tokens.dtype)
        cls = ops.broadcast_to(cls, (batch, 1, ops.shape(cls)[-1]))
        return ops.concatenate([cls, tokens], axis=1)

    def compute_output_shape(self, input_shape):
        length = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], length, input_shape[2])


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TokenLayerNormalization(layers.LayerNormalization):
    """LayerNorm over the channels of each token: ``keras.layers.LayerNormalization`` with a
    cheaper ``call`` for the default configuration (last axis, ``center`` and ``scale``).

    Computes ``beta + (x - mean) * (rsqrt(var + epsilon) * gamma)`` with the two-pass variance.
    Keras' own formulation materialises ``gamma * rsqrt(var + eps)`` and ``-mean * inv`` at the
    input's full size; on TensorFlow's CPU runtime, where element-wise ops are not fused, this one
    makes three fewer full-size passes (LayerNorm is about 7% of CoaT's inference time there).
    Same weights (``gamma``, ``beta``), config and results to float32 rounding; other
    configurations fall back to the parent's ``call``.

    Input: ``[..., C]``. Output: same shape.
    """

    def __init__(self, **kwargs):
        for name, initializer in initializers.norm_initializers().items():
            kwargs.setdefault(name, initializer)
        super().__init__(**kwargs)

    def call(self, inputs):
        last_axis = list(self.axis) in ([-1], [len(inputs.shape) - 1])
        if not (last_axis and self.center and self.scale) or getattr(self, "rms_scaling", False):
            return super().call(inputs)
        # Statistics in float32 at least, as Keras does for half-precision inputs.
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, compute_dtype)
        mean = ops.mean(x, axis=-1, keepdims=True)
        centered = ops.subtract(x, mean)
        variance = ops.mean(ops.square(centered), axis=-1, keepdims=True)
        scale = ops.multiply(
            ops.rsqrt(ops.add(variance, self.epsilon)), ops.cast(self.gamma, compute_dtype)
        )
        outputs = ops.add(ops.cast(self.beta, compute_dtype), ops.multiply(centered, scale))
        return ops.cast(outputs, inputs.dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PatchEmbedding(layers.Layer):
    """Non-overlapping patch embedding: a strided convolution, flatten, then LayerNorm (eps 1e-5).

    Input: feature map ``[batch, H, W, C_in]``. Output: tokens ``[batch, (H / p) * (W / p), C]``.
    """

    def __init__(self, embed_dim, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.proj = layers.Conv2D(
            self.embed_dim, self.patch_size, strides=self.patch_size, name="proj",
            **initializers.conv_initializers(),
        )  # fmt: skip
        self.norm = TokenLayerNormalization(epsilon=1e-5, name="norm")

    def build(self, input_shape):
        self.proj.build(input_shape)
        self.norm.build((None, None, self.embed_dim))

    def call(self, images):
        x = self.proj(images)
        x = ops.reshape(x, (-1, x.shape[1] * x.shape[2], self.embed_dim))
        return self.norm(x)

    def compute_output_shape(self, input_shape):
        p = self.patch_size
        return (input_shape[0], (input_shape[1] // p) * (input_shape[2] // p), self.embed_dim)

    def get_config(self):
        return {**super().get_config(), "embed_dim": self.embed_dim, "patch_size": self.patch_size}


def _spec(layer, shape):
    return keras.KerasTensor(shape, dtype=layer.compute_dtype)


def _image_tokens_to_map(tokens, size):
    height, width = _grid(size)
    return ops.reshape(tokens, (-1, height, width, tokens.shape[-1]))


def depthwise_conv_same(feature_map, kernel, bias):
    """Depthwise convolution, stride 1, "same" zero padding, plus a bias: the CPE's and CRPE's
    convolution. `feature_map` ``[batch, H, W, C]`` (static H, W), `kernel` ``[kh, kw, C, 1]``
    (odd sizes), `bias` ``[C]``.

    On JAX the kernel's taps are summed as shifted slices of the padded map, which XLA fuses
    into one loop: its grouped convolution on CPUs ran 20-50 times slower (a 7x7 window over
    8x56x56x24: 79 ms against 1.8 ms on one core), about 60% of CoaT-Lite Small's inference
    time. TensorFlow and PyTorch run one op per tap, so they keep their convolution kernels.
    """
    kernel = ops.cast(kernel, feature_map.dtype)
    bias = ops.cast(bias, feature_map.dtype)
    if keras.backend.backend() != "jax":
        return ops.add(ops.depthwise_conv(feature_map, kernel, strides=1, padding="same"), bias)
    return _shifted_taps_on_jax()(feature_map, kernel, bias)


def _padded_for(feature_map, kernel):
    """`feature_map` ``[batch, H, W, C]`` zero-padded for a "same" convolution by `kernel`."""
    kernel_height, kernel_width = kernel.shape[:2]
    margins = ((0, 0), (kernel_height // 2,) * 2, (kernel_width // 2,) * 2, (0, 0))
    return ops.pad(feature_map, margins)


def _sum_of_shifted_taps(feature_map, kernel, bias):
    kernel_height, kernel_width = kernel.shape[:2]
    height, width = feature_map.shape[1:3]
    padded = _padded_for(feature_map, kernel)
    total = bias
    for i in range(kernel_height):
        row = None
        for j in range(kernel_width):
            tap = padded[:, i : i + height, j : j + width, :] * kernel[i, j, :, 0]
            row = tap if row is None else row + tap
        total = total + row
    return total


def _shifted_taps_gradients(residuals, output_gradient):
    """The gradients of `_sum_of_shifted_taps` with respect to its three inputs, written as
    compactly as its forward pass: JAX's automatic derivative of the 9-49 slices of each kernel
    has a slice, a pad and a reduction per tap, which doubled the XLA compilation of a
    training step (tiny CoaT: 28.5 s, against 13.4 s with a convolution)."""
    feature_map, kernel = residuals
    kernel_height, kernel_width = kernel.shape[:2]
    height, width = feature_map.shape[1:3]
    # The map's gradient: the same taps over the output's gradient, with the kernel turned
    # by 180 degrees ("same" padding of an odd kernel is symmetric).
    zero_bias = ops.zeros(feature_map.shape[-1:], output_gradient.dtype)
    map_gradient = _sum_of_shifted_taps(
        output_gradient, ops.flip(ops.flip(kernel, 0), 1), zero_bias
    )
    # The kernel's gradient: each tap's input times the output's gradient, summed over batch
    # and positions, in float32. A loop over the taps (`ops.map`) compiles one reduction; the
    # taps written out compiled one each, and ran 3 times slower (a 7x7 window over 16x56x56x24
    # on one core: 24 ms against 79 ms).
    padded = _padded_for(ops.cast(feature_map, "float32"), kernel)
    gradient = ops.cast(output_gradient, "float32")
    window = (gradient.shape[0], height, width, gradient.shape[-1])

    def tap_gradient(tap):
        start = (0, tap // kernel_width, tap % kernel_width, 0)
        return ops.sum(ops.slice(padded, start, window) * gradient, axis=(0, 1, 2))

    kernel_gradient = ops.map(tap_gradient, ops.arange(kernel_height * kernel_width))
    kernel_gradient = ops.reshape(kernel_gradient, kernel.shape)
    bias_gradient = ops.sum(gradient, axis=(0, 1, 2))
    return (
        map_gradient,
        ops.cast(kernel_gradient, kernel.dtype),
        ops.cast(bias_gradient, output_gradient.dtype),
    )


@functools.cache
def _shifted_taps_on_jax():
    """`_sum_of_shifted_taps` for JAX: jitted, with the gradients above.

    Jitted: outside a traced function (an eager call), JAX runs and compiles every op by
    itself, and a slice at each of a kernel's 9-49 offsets is a new op to compile and dispatch:
    jitted, the taps of one map shape compile once, as one fused loop. CoaT-Lite Medium's eager
    calls at 64x64, batch 2 (2-core Xeon, AVX-512): first 16.9-18.8 s -> 14.3-15.1 s, then
    1.2-1.5 s -> 0.4-0.5 s. Inside a traced function the jitted call is inlined.
    """
    import jax

    taps = jax.custom_vjp(_sum_of_shifted_taps)
    taps.defvjp(
        lambda feature_map, kernel, bias: (
            _sum_of_shifted_taps(feature_map, kernel, bias), (feature_map, kernel)
        ),
        _shifted_taps_gradients,
    )
    return jax.jit(taps)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ConvPositionEncoding(layers.Layer):
    """Convolutional position encoding (CPE, Section 4.2): ``img + DepthwiseConv(img)``.

    The class token passes unchanged. Input and output: ``[batch, 1 + H * W, C]``;
    call with ``size=(H, W)``. One instance is shared by every block of its scale.
    """

    def __init__(self, kernel_size=3, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = int(kernel_size)
        self.proj = layers.DepthwiseConv2D(
            self.kernel_size, padding="same", name="proj",
            **initializers.conv_initializers(depthwise=True),
        )  # fmt: skip

    def build(self, input_shape):
        self.proj.build((None, None, None, input_shape[-1]))

    def call(self, tokens, size):
        cls, image = tokens[:, :1], tokens[:, 1:]
        feature_map = _image_tokens_to_map(image, size)
        # The residual is folded into the kernel (+1 at the centre tap): one pass over the map
        # instead of two, and TensorFlow's remapper breaks on DepthwiseConv + BiasAdd + Add.
        identity = np.zeros((self.kernel_size, self.kernel_size, 1, 1), "float32")
        identity[self.kernel_size // 2, self.kernel_size // 2] = 1.0
        kernel = ops.cast(self.proj.kernel, feature_map.dtype) + ops.cast(identity, feature_map.dtype)
        encoded = depthwise_conv_same(feature_map, kernel, self.proj.bias)
        encoded = ops.reshape(encoded, ops.shape(image))
        return ops.concatenate([cls, encoded], axis=1)

    # Layers called with a grid `size` give their output spec directly: tracing `call` would
    # turn the Python ints of `size` into tracers on JAX.
    def compute_output_spec(self, tokens, size):
        return _spec(self, tokens.shape)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ConvRelativePositionEncoding(layers.Layer):
    """Convolutional relative position encoding (CRPE, Eqs. 10-11).

    ``EV_img = Q_img * DepthwiseConv2D(V_img)`` with the channels split by heads into groups with
    their own window (by default 2 heads of 3x3, 3 of 5x5, 3 of 7x7); the class token's row is 0.

    Inputs: ``[query, value]``, each ``[batch, 1 + H * W, C]`` with heads outermost in the
    channels, as the reference lays them out. Call with ``size=(H, W)``.
    Output: ``[batch, 1 + H * W, C]``. One instance is shared by every attention of its scale.
    """

    def __init__(self, num_heads=8, windows=((3, 2), (5, 3), (7, 3)), **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.windows = tuple((int(w), int(h)) for w, h in windows)
        if sum(h for _, h in self.windows) != self.num_heads:
            raise ValueError(
                f"The CRPE windows {self.windows} assign {sum(h for _, h in self.windows)} heads, "
                f"but num_heads={self.num_heads}. The head counts must add up to num_heads."
            )
        if any(window < 1 or window % 2 == 0 for window, _ in self.windows):
            raise ValueError(
                f"The CRPE windows {self.windows} must be odd sizes (a window centred on each "
                "token, as the reference's padding assumes), e.g. ((3, 2), (5, 3), (7, 3))."
            )
        self.convs = [
            layers.DepthwiseConv2D(
                window, padding="same", name=f"conv_list_{i}",
                **initializers.conv_initializers(depthwise=True),
            )  # fmt: skip
            for i, (window, _) in enumerate(self.windows)
        ]

    def build(self, input_shape):
        channels = input_shape[0][-1]
        if channels % self.num_heads:
            raise ValueError(
                f"CRPE got {channels} channels, which {self.num_heads} heads do not divide."
            )
        head_dim = channels // self.num_heads
        for conv, (_, heads) in zip(self.convs, self.windows):
            conv.build((None, None, None, heads * head_dim))

    def call(self, inputs, size):
        query, value = inputs
        value = _image_tokens_to_map(value[:, 1:], size)
        # One convolution of all the channels, each group's kernel centred in the largest
        # window with zeros around it, instead of one per group, a split and a concatenation:
        # fewer ops to trace and compile for the same outputs. CoaT-Lite Small at 224 (2-core
        # Xeon, 2026-12-07): JAX compiles its prediction in 4.4 s instead of 5.2 s and a
        # training step in 23.4 s instead of 27.4 s; batch 8 runs as fast on TensorFlow and
        # JAX, and faster on PyTorch (0.65-0.72 s against 0.76-0.88 s).
        window = max(w for w, _ in self.windows)
        kernels = []
        for conv, (group_window, _) in zip(self.convs, self.windows):
            margin = (window - group_window) // 2
            margins = ((margin, margin), (margin, margin), (0, 0), (0, 0))
            kernels.append(ops.pad(conv.kernel, margins))
        kernel = ops.concatenate(kernels, axis=2)
        bias = ops.concatenate([conv.bias for conv in self.convs], axis=0)
        encoded = depthwise_conv_same(value, kernel, bias)
        encoded = ops.reshape(encoded, (-1, query.shape[1] - 1, query.shape[2]))
        # Zero row for the class token, then the Hadamard product with all of Q.
        return query * ops.pad(encoded, ((0, 0), (1, 0), (0, 0)))

    def compute_output_spec(self, inputs, size):
        return _spec(self, inputs[0].shape)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "windows": [list(w) for w in self.windows],
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QueryKeyValue(layers.Layer):
    """The fused Q, K, V projection of the reference (one ``[C, 3 * C]`` kernel and bias),
    returning the three projections as separate tensors.

    Input: ``[batch, N, C]``. Outputs: ``[query, key, value]``, each ``[batch, N, C]``.
    Weights: ``kernel`` ``[C, 3 * C]`` (Q, K, V along the output axis), ``bias`` ``[3 * C]``.
    """

    def build(self, input_shape):
        channels = input_shape[-1]
        self.kernel = self.add_weight(
            shape=(channels, 3 * channels), initializer=initializers.trunc_normal(), name="kernel"
        )
        self.bias = self.add_weight(
            shape=(3 * channels,), initializer=initializers.zeros(), name="bias"
        )

    def call(self, tokens):
        channels = tokens.shape[-1]
        flat = ops.reshape(tokens, (-1, channels))
        kernel = ops.cast(self.kernel, flat.dtype)
        bias = ops.cast(self.bias, flat.dtype)
        # Three matmuls on slices of the (small) kernel rather than slices of the (large)
        # fused output: no copies of activations, and each matmul fuses with its bias.
        outputs = []
        for i in range(3):
            part = slice(i * channels, (i + 1) * channels)
            projected = ops.add(ops.matmul(flat, kernel[:, part]), bias[part])
            outputs.append(ops.reshape(projected, ops.shape(tokens)))
        return outputs

    def compute_output_shape(self, input_shape):
        return [tuple(input_shape)] * 3


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FactorizedConvAttention(layers.Layer):
    """Factorized attention with the CRPE term, Eq. 12 (before the output projection).

    ``ConvAtt = Q / sqrt(d) (softmax(K)^T V) + EV``, per head, softmax over the tokens (class
    token included), ``d`` the head dimension. The cost is linear in the number of tokens.

    Inputs: ``[query, key, value, relative]``, each ``[batch, N, C]`` (``relative`` is the CRPE
    term). Output: ``[batch, N, C]``.
    """

    def __init__(self, num_heads=8, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)

    def call(self, inputs):
        query, key, value, relative = inputs
        channels = query.shape[-1]
        head_dim = channels // self.num_heads
        # softmax over the tokens is a softmax over the last axis of K^T, which the context
        # matmul wants anyway: one transpose instead of the two a softmax over axis 1 costs.
        key = ops.softmax(ops.transpose(key, (0, 2, 1)), axis=-1)
        if channels <= _FULL_CONTEXT_MAX_CHANNELS:
            # One [C, C] context for all heads, masked to its block diagonal (which also carries
            # the scale): at these widths two plain batched matmuls beat per-head ones, whose
            # layout changes cost more than the extra multiply-adds.
            context = ops.matmul(key, value)
            context = context * ops.cast(self._head_mask(channels, head_dim), context.dtype)
            return ops.matmul(query, context) + relative
        length = query.shape[1]
        key = ops.reshape(key, (-1, self.num_heads, head_dim, length))
        value = ops.reshape(value, (-1, length, self.num_heads, head_dim))
        query = ops.reshape(query, (-1, length, self.num_heads, head_dim))
        context = ops.einsum("bhkn,bnhv->bhkv", key, value)
        attended = ops.einsum("bnhk,bhkv->bnhv", query, context)
        attended = ops.reshape(attended, (-1, length, channels))
        return attended * ops.cast(head_dim**-0.5, attended.dtype) + relative

    def _head_mask(self, channels, head_dim):
        blocks = np.kron(np.eye(self.num_heads), np.ones((head_dim, head_dim)))
        return (blocks * head_dim**-0.5).astype("float32")

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads}


@ops.custom_gradient
def _gelu_keeping_only_its_input(x):
    """Exact GELU whose gradient is computed from ``x`` alone: ``Phi(x) + x * phi(x)``.

    Differentiating ``ops.gelu`` keeps the intermediates of its erf formula for the backward pass,
    each as large as the MLP's hidden layer, the largest activations of the model: on TensorFlow
    about 0.8 GB of CoaT-Lite Small's 5.7 GB training peak at batch 16 (224x224), and a step
    that is slower, not faster, for having them (benchmarks/RESULTS.md).
    """

    def grad(*args, upstream=None):
        if upstream is None:  # TensorFlow and JAX pass it positionally, PyTorch by name
            (upstream,) = args
        cdf = 0.5 * (1.0 + ops.erf(x * _SQRT_HALF))
        pdf = ops.exp(-0.5 * ops.square(x)) * _INV_SQRT_2PI
        return upstream * (cdf + x * pdf)

    return ops.gelu(x, approximate=False), grad


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MLP(layers.Layer):
    """The feed-forward network: ``Dense(hidden_dim) -> GELU (exact, erf) -> Dense(output_dim)``.

    Input: ``[..., C]``. Output: ``[..., output_dim]``.
    """

    def __init__(self, hidden_dim, output_dim, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.output_dim = int(output_dim)
        self.fc1 = layers.Dense(self.hidden_dim, name="fc1", **initializers.dense_initializers())
        self.fc2 = layers.Dense(self.output_dim, name="fc2", **initializers.dense_initializers())

    def build(self, input_shape):
        self.fc1.build(input_shape)
        self.fc2.build((*input_shape[:-1], self.hidden_dim))

    def call(self, x, training=None):
        # Token-wise on a 2-D [tokens, C] view: plain matmuls fuse with their bias and GELU,
        # batched 3-D ones do not.
        flat = ops.reshape(x, (-1, x.shape[-1]))
        hidden = self.fc1(flat)
        # In training, the GELU whose backward pass keeps only its input (PyTorch's own GELU
        # already does). Inference keeps the plain op, which oneDNN fuses into fc1's matmul.
        if training and keras.backend.backend() != "torch":
            hidden = _gelu_keeping_only_its_input(hidden)
        else:
            hidden = ops.gelu(hidden, approximate=False)
        flat = self.fc2(hidden)
        return ops.reshape(flat, (*ops.shape(x)[:-1], self.output_dim))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.output_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "output_dim": self.output_dim,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TokenwiseDense(layers.Dense):
    """A ``Dense`` layer applied to every token: ``[..., C_in] -> [..., units]``.

    Computes on a 2-D ``[tokens, C_in]`` view, where the matmul fuses with its bias.
    """

    def call(self, inputs, training=None):
        flat = ops.reshape(inputs, (-1, inputs.shape[-1]))
        flat = super().call(flat, training=training)
        return ops.reshape(flat, (*ops.shape(inputs)[:-1], self.units))

    def quantize(self, mode=None, type_check=True, **kwargs):
        # Keras' Dense quantizes only Dense itself unless told that a subclass computes as it
        # does (this one only adds the 2-D view, kept by `quantized_call`).
        super().quantize(mode, type_check=False, **kwargs)

    def quantized_call(self, inputs, training=None):
        flat = ops.reshape(inputs, (-1, inputs.shape[-1]))
        flat = super().quantized_call(flat, training=training)
        return ops.reshape(flat, (*ops.shape(inputs)[:-1], self.units))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StochasticDepth(layers.Layer):
    """Residual connection with stochastic depth: ``shortcut + drop_path(branch)``.

    In training, each sample's branch is dropped with probability ``rate`` and the kept ones are
    scaled by ``1 / (1 - rate)``; at inference it is a plain sum. Inputs: ``[shortcut, branch]``,
    both ``[batch, ...]``. Output: same shape.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"Stochastic depth rate must be in [0, 1), got {rate}.")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        shortcut, branch = inputs
        if training and self.rate > 0.0:
            keep = 1.0 - self.rate
            shape = (ops.shape(branch)[0],) + (1,) * (len(branch.shape) - 1)
            mask = keras.random.uniform(shape, seed=self.seed_generator, dtype=branch.dtype)
            mask = ops.cast(mask < keep, branch.dtype) / ops.cast(keep, branch.dtype)
            branch = branch * mask
        return shortcut + branch

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FeatureInterpolation(layers.Layer):
    """Co-scale feature interpolation (Section 5.1): resizes the image tokens of one scale to the
    grid of another with bilinear interpolation (half-pixel centres, no antialiasing); the class
    token of the *source* is kept, so class tokens are mixed across scales too.

    Input: ``[batch, 1 + h * w, C]``; call with ``size=(h, w)`` and ``target_size=(H, W)``.
    Output: ``[batch, 1 + H * W, C]``.
    """

    def call(self, tokens, size, target_size):
        height, width = _grid(target_size)
        feature_map = _image_tokens_to_map(tokens[:, 1:], size)
        resized = ops.image.resize(
            feature_map, (height, width), interpolation="bilinear", antialias=False
        )
        resized = ops.reshape(resized, (-1, height * width, tokens.shape[-1]))
        return ops.concatenate([tokens[:, :1], resized], axis=1)

    def compute_output_spec(self, tokens, size, target_size):
        height, width = _grid(target_size)
        return _spec(self, (tokens.shape[0], 1 + height * width, tokens.shape[-1]))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TokensToFeatureMap(layers.Layer):
    """Drops the class token and folds the image tokens back into a channels-last map.

    Input: ``[batch, 1 + H * W, C]``; call with ``size=(H, W)``. Output: ``[batch, H, W, C]``.
    """

    def call(self, tokens, size):
        return _image_tokens_to_map(tokens[:, 1:], size)

    def compute_output_spec(self, tokens, size):
        height, width = _grid(size)
        return _spec(self, (tokens.shape[0], height, width, tokens.shape[-1]))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TokenPooling(layers.Layer):
    """Pools a token sequence to one vector: ``"token"`` takes the class token (the reference's
    classifier input), ``"avg"``/``"max"`` pool the image tokens.

    Input: ``[batch, 1 + N, C]``. Output: ``[batch, C]``.
    """

    MODES = ("token", "avg", "max")

    def __init__(self, mode="token", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"TokenPooling mode must be one of {self.MODES}, got {mode!r}.")
        self.mode = mode

    def call(self, tokens):
        if self.mode == "token":
            return tokens[:, 0]
        if self.mode == "avg":
            return ops.mean(tokens[:, 1:], axis=1)
        return ops.max(tokens[:, 1:], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ScaleAggregation(layers.Layer):
    """CoaT's classifier input: a learned weighted sum of the pooled features of the three
    parallel scales (the reference's ``Conv1d(3, 1, kernel_size=1)`` "aggregate").

    Inputs: a list of 3 tensors ``[batch, C]``. Output: ``[batch, C]``.
    Weights: ``kernel`` ``[3]`` and ``bias`` ``[1]``.
    """

    def build(self, input_shape):
        count = len(input_shape)
        bound = count**-0.5  # PyTorch's default Conv1d initialisation range for fan-in `count`.
        self.kernel = self.add_weight(
            shape=(count,), initializer=initializers.RandomUniform(-bound, bound), name="kernel"
        )
        self.bias = self.add_weight(
            shape=(1,), initializer=initializers.RandomUniform(-bound, bound), name="bias"
        )

    def call(self, inputs):
        stacked = ops.stack(inputs, axis=-1)
        return ops.matmul(stacked, ops.cast(self.kernel, stacked.dtype)) + ops.cast(
            self.bias, stacked.dtype
        )

    def compute_output_shape(self, input_shape):
        return input_shape[0]


def can_be_quantized(layer):
    """Whether Keras' `Model.quantize` can quantize `layer`: it defines `quantize` (Keras' Dense,
    EinsumDense and Embedding, CoaT's TokenwiseDense). Keras has no quantized form of the others
    (convolutions, norms, CoaT's fused QKV projection, layers without weights): they keep their
    float weights."""
    return type(layer).quantize is not layers.Layer.quantize


def quantize_model(quantize, mode=None, filters=None, **kwargs):
    """Keras' `Model.quantize` (the bound `quantize` of a CoaT model's parent class) over the
    layers that `can_be_quantized`, and among them those `filters` selects (Keras' meaning: a
    regular expression or a list of them searched in the layer name, or a callable of the
    layer). Keras otherwise warns once for every other layer of the model."""

    def chosen(layer):
        if not can_be_quantized(layer):
            return False
        if filters is None:
            return True
        if isinstance(filters, str):
            return re.search(filters, layer.name) is not None
        if isinstance(filters, (list, tuple)):
            return any(re.search(pattern, layer.name) for pattern in filters)
        return bool(filters(layer))

    if "filters" in inspect.signature(keras.Model.quantize).parameters:
        return quantize(mode, filters=chosen, **kwargs)
    if filters is not None:
        raise ValueError(f"`filters` needs a newer Keras than {keras.version()}.")
    # Keras before `filters`: it tries every layer; its warnings for those it cannot quantize
    # say nothing about this model.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Layer \w+ does not have a `quantize` method implemented"
        )
        return quantize(mode, **kwargs)
