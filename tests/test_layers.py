"""Focused tests of each CoaT layer: shapes and the math against NumPy; each layer also goes
through the harness's `check_layer` (serialization, registration, docstring)."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_coat import layers as coat_layers
from tests.conftest import to_numpy
from tests.harness import check_layer

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

RNG = np.random.RandomState(0)


def _tokens(batch, height, width, channels):
    return RNG.randn(batch, 1 + height * width, channels).astype("float32")


def test_class_token_prepends_the_same_learned_vector():
    layer = coat_layers.ClassToken()
    x = RNG.randn(3, 5, 8).astype("float32")
    y = to_numpy(layer(x))
    assert y.shape == (3, 6, 8)
    np.testing.assert_array_equal(y[:, 1:], x)
    cls = to_numpy(layer.cls_token)[0, 0]
    assert np.abs(cls).max() > 0  # truncated-normal initialised, as in the reference
    for row in y[:, 0]:
        np.testing.assert_array_equal(row, cls)
    check_layer(layer)


def _layer_norm_pair(channels, **kwargs):
    """A TokenLayerNormalization and a keras LayerNormalization with the same random weights."""
    ours = coat_layers.TokenLayerNormalization(**kwargs)
    reference = keras.layers.LayerNormalization(**kwargs)
    for layer in (ours, reference):
        layer.build((None, None, channels))
    for variable, other in zip(ours.weights, reference.weights):
        value = RNG.randn(*variable.shape).astype("float32")
        variable.assign(value)
        other.assign(value)
    return ours, reference


def test_token_layer_normalization_equals_keras_layer_normalization():
    ours, reference = _layer_norm_pair(48, epsilon=1e-6)
    # Far-from-zero means: the variance must be taken around the mean (two passes).
    x = (RNG.randn(3, 17, 48) * 4 + 30).astype("float32")
    y = to_numpy(ours(x))
    np.testing.assert_allclose(y, to_numpy(reference(x)), atol=2e-5)
    normalized = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    expected = normalized * to_numpy(ours.gamma) + to_numpy(ours.beta)
    np.testing.assert_allclose(y, expected, atol=2e-5)
    clone = check_layer(ours)
    assert clone.epsilon == 1e-6
    assert isinstance(ours, keras.layers.LayerNormalization)  # the converter relies on it


def test_token_layer_normalization_keeps_half_precision_dtype_and_falls_back():
    ours, reference = _layer_norm_pair(32, epsilon=1e-6)
    x = RNG.randn(2, 9, 32).astype("float32")
    half = ops.cast(x, "float16")
    y = ours(half)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    np.testing.assert_allclose(to_numpy(ops.cast(y, "float32")), to_numpy(reference(x)), atol=2e-2)
    # A configuration the fast path does not cover (no centring) gives the parent's result.
    ours, reference = _layer_norm_pair(32, epsilon=1e-3, center=False)
    np.testing.assert_allclose(to_numpy(ours(x)), to_numpy(reference(x)), atol=1e-6)


def test_patch_embedding_shapes_and_layer_norm():
    layer = coat_layers.PatchEmbedding(16, 4)
    images = RNG.rand(2, 32, 64, 3).astype("float32")
    y = to_numpy(layer(images))
    assert y.shape == (2, 8 * 16, 16)
    # LayerNorm with unit scale and eps 1e-5: every token has mean 0 and variance v / (v + eps),
    # v its variance before the norm (the patches' projection; random weights, so v varies).
    assert layer.norm.epsilon == 1e-5
    before = to_numpy(layer.proj(images)).reshape(2, 8 * 16, 16).astype("float64").var(-1)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), before / (before + 1e-5), atol=2e-5)
    clone = check_layer(layer)
    assert (clone.embed_dim, clone.patch_size) == (16, 4)


def test_conv_position_encoding_is_residual_depthwise_conv_and_keeps_cls():
    layer = coat_layers.ConvPositionEncoding(3)
    tokens = _tokens(2, 4, 6, 8)
    y = to_numpy(layer(tokens, size=(4, 6)))
    np.testing.assert_array_equal(y[:, 0], tokens[:, 0])
    image = tokens[:, 1:].reshape(2, 4, 6, 8)
    expected = to_numpy(layer.proj(image)) + image
    np.testing.assert_allclose(y[:, 1:], expected.reshape(2, 24, 8), atol=1e-6)
    # With a zero kernel and bias it is the identity (the encoding is added, not substituted).
    layer.proj.kernel.assign(np.zeros(layer.proj.kernel.shape, "float32"))
    layer.proj.bias.assign(np.zeros(layer.proj.bias.shape, "float32"))
    np.testing.assert_allclose(to_numpy(layer(tokens, size=(4, 6))), tokens, atol=1e-6)
    assert check_layer(layer).kernel_size == 3


def _naive_crpe(query, value, size, heads, windows, layer):
    """Eq. 10-11 with explicit loops over heads and window offsets (zero padding)."""
    batch, length, channels = query.shape
    head_dim = channels // heads
    height, width = size
    q = query[:, 1:].reshape(batch, height, width, channels)
    v = value[:, 1:].reshape(batch, height, width, channels)
    out = np.zeros_like(q)
    channel = 0
    for conv, (window, group_heads) in zip(layer.convs, windows):
        kernel = to_numpy(conv.kernel)[..., 0]  # [window, window, group channels]
        bias = to_numpy(conv.bias)
        r = window // 2
        padded = np.pad(v, ((0, 0), (r, r), (r, r), (0, 0)))
        for c in range(group_heads * head_dim):
            acc = np.full((batch, height, width), bias[c], "float64")
            for dy in range(window):
                for dx in range(window):
                    acc += kernel[dy, dx, c] * padded[:, dy : dy + height, dx : dx + width, channel]
            out[..., channel] = q[..., channel] * acc
            channel += 1
    return np.concatenate([np.zeros((batch, 1, channels)), out.reshape(batch, -1, channels)], 1)


def test_conv_relative_position_encoding_matches_loops():
    windows = ((3, 2), (5, 3), (7, 3))
    layer = coat_layers.ConvRelativePositionEncoding(8, windows)
    query, value = (RNG.randn(2, 1 + 5 * 7, 16).astype("float32") for _ in range(2))
    y = to_numpy(layer([query, value], size=(5, 7)))
    assert y.shape == (2, 36, 16)
    np.testing.assert_array_equal(y[:, 0], 0)  # the class token gets no relative encoding
    expected = _naive_crpe(query, value, (5, 7), 8, windows, layer)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    assert [c.kernel.shape[0] for c in layer.convs] == [3, 5, 7]
    assert check_layer(layer).windows == windows


def _depthwise_gradients_by_scattering(x, kernel, output_gradient):
    """The gradients of a "same" depthwise convolution plus bias, in float64, by spreading each
    output's gradient back over the inputs and taps that made it."""
    x, kernel, output_gradient = (np.asarray(a, "float64") for a in (x, kernel, output_gradient))
    kernel_height, kernel_width = kernel.shape[:2]
    height, width = x.shape[1:3]
    pads = ((0, 0), (kernel_height // 2,) * 2, (kernel_width // 2,) * 2, (0, 0))
    padded = np.pad(x, pads)
    padded_gradient = np.zeros_like(padded)
    kernel_gradient = np.zeros_like(kernel)
    for i in range(kernel_height):
        for j in range(kernel_width):
            padded_gradient[:, i : i + height, j : j + width] += output_gradient * kernel[i, j, :, 0]
            taps = padded[:, i : i + height, j : j + width] * output_gradient
            kernel_gradient[i, j, :, 0] = taps.sum((0, 1, 2))
    map_gradient = padded_gradient[:, pads[1][0] : pads[1][0] + height,
                                   pads[2][0] : pads[2][0] + width]  # fmt: skip
    return map_gradient, kernel_gradient, output_gradient.sum((0, 1, 2))


@pytest.mark.backends("jax")
@pytest.mark.parametrize("window", [3, 5, 7])
@pytest.mark.parametrize("dtype, tolerance", [("float32", 2e-5), ("bfloat16", 0.05)])
def test_depthwise_convolution_on_jax_has_the_gradients_of_a_convolution(window, dtype, tolerance):
    # On JAX the CPE's and CRPE's convolution is a sum of shifted taps with gradients of its own
    # (keras_coat.layers._shifted_taps_gradients); they must be a convolution's.
    import jax

    x, output_gradient = RNG.randn(2, 9, 11, 6), RNG.randn(2, 9, 11, 6)
    kernel, bias = RNG.randn(window, window, 6, 1), RNG.randn(6)
    inputs = [ops.convert_to_tensor(a, dtype) for a in (x, kernel, bias)]

    def loss(feature_map, kernel, bias):
        outputs = coat_layers.depthwise_conv_same(feature_map, kernel, bias)
        return ops.sum(ops.cast(outputs, "float32") * output_gradient.astype("float32"))

    gradients = jax.grad(loss, argnums=(0, 1, 2))(*inputs)
    expected = _depthwise_gradients_by_scattering(x, kernel, output_gradient)
    for name, got, want in zip(("map", "kernel", "bias"), gradients, expected):
        assert keras.backend.standardize_dtype(got.dtype) == dtype, name
        got = to_numpy(ops.cast(got, "float32"))
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, atol=tolerance * scale, rtol=0, err_msg=name)


def test_conv_relative_position_encoding_rejects_bad_head_splits():
    with pytest.raises(ValueError, match="num_heads"):
        coat_layers.ConvRelativePositionEncoding(8, ((3, 2), (5, 3)))
    with pytest.raises(ValueError, match="odd sizes"):
        coat_layers.ConvRelativePositionEncoding(8, ((3, 2), (4, 3), (7, 3)))


def _naive_factorized_attention(query, key, value, relative, heads):
    """Eq. 12 per head: Q / sqrt(d) (softmax_N(K)^T V) + EV, in float64."""
    batch, length, channels = query.shape
    d = channels // heads
    out = np.zeros((batch, length, channels))
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        q, k, v = (t.astype("float64")[:, :, sl] for t in (query, key, value))
        k = np.exp(k - k.max(1, keepdims=True))
        k = k / k.sum(1, keepdims=True)
        out[:, :, sl] = q @ (np.swapaxes(k, 1, 2) @ v) / math.sqrt(d)
    return out + relative


@pytest.mark.parametrize("channels", [64, 256])  # both code paths: masked context and per head
def test_factorized_attention_matches_equation_12(channels):
    layer = coat_layers.FactorizedConvAttention(8)
    query, key, value, relative = (
        RNG.randn(2, 1 + 7 * 7, channels).astype("float32") for _ in range(4)
    )
    y = to_numpy(layer([query, key, value, relative]))
    expected = _naive_factorized_attention(query, key, value, relative, 8)
    np.testing.assert_allclose(y, expected, atol=2e-5)
    assert check_layer(layer).num_heads == 8


def test_factorized_attention_is_linear_in_tokens_per_query():
    """Identical queries get identical outputs without position encoding (paper Eq. 4)."""
    layer = coat_layers.FactorizedConvAttention(8)
    query, key, value = (RNG.randn(1, 10, 16).astype("float32") for _ in range(3))
    query[0, 3] = query[0, 7]
    y = to_numpy(layer([query, key, value, np.zeros((1, 10, 16), "float32")]))
    np.testing.assert_allclose(y[0, 3], y[0, 7], atol=1e-6)


def test_mlp_uses_exact_gelu():
    layer = coat_layers.MLP(12, 5)
    x = RNG.randn(2, 3, 4).astype("float32")
    y = to_numpy(layer(x))
    assert y.shape == (2, 3, 5)
    h = x @ to_numpy(layer.fc1.kernel) + to_numpy(layer.fc1.bias)
    erf = np.vectorize(math.erf)
    h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
    expected = h @ to_numpy(layer.fc2.kernel) + to_numpy(layer.fc2.bias)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    assert check_layer(layer).output_dim == 5


def _input_gradient(function, x):
    """d sum(function(x)) / dx with the backend's own autodiff."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(function(x))
        return tape.gradient(total, x).numpy()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: function(v).sum())(x))
    import torch

    x = torch.tensor(x, requires_grad=True)
    function(x).sum().backward()
    return x.grad.numpy()


def test_mlp_in_training_has_the_gradient_of_exact_gelu():
    # Training uses a GELU whose backward pass keeps only its input; its gradient must be the one
    # autodiff gives for the plain exact GELU of inference.
    layer = coat_layers.MLP(64, 3)
    x = RNG.randn(4, 5, 6).astype("float32")
    layer.build(x.shape)
    # Unit-scale weights (not the 0.02 initialisation): hidden values reach both tails of GELU.
    layer.fc1.kernel.assign(RNG.randn(6, 64).astype("float32"))
    layer.fc2.kernel.assign(RNG.randn(64, 3).astype("float32"))
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), to_numpy(layer(x)), atol=1e-6)
    trained = _input_gradient(lambda v: layer(v, training=True), x)
    plain = _input_gradient(lambda v: layer(v, training=False), x)
    scale = np.abs(plain).max()
    assert scale > 1.0  # a real gradient, not zeros on both sides
    # float32 rounding of sums of 64 terms: relative to the largest gradient.
    np.testing.assert_allclose(trained, plain, rtol=1e-5, atol=1e-6 * scale)


def test_query_key_value_is_one_fused_projection_split_in_three():
    layer = coat_layers.QueryKeyValue()
    x = RNG.randn(2, 5, 8).astype("float32")
    layer.build(x.shape)
    layer.bias.assign(RNG.randn(24).astype("float32"))
    outputs = [to_numpy(t) for t in layer(x)]
    fused = x @ to_numpy(layer.kernel) + to_numpy(layer.bias)
    np.testing.assert_allclose(np.concatenate(outputs, -1), fused, atol=1e-5)
    assert layer.kernel.shape == (8, 24)
    check_layer(layer)


def test_tokenwise_dense_equals_dense_on_3d_inputs():
    layer = coat_layers.TokenwiseDense(6)
    x = RNG.randn(2, 5, 4).astype("float32")
    np.testing.assert_allclose(
        to_numpy(layer(x)), x @ to_numpy(layer.kernel) + to_numpy(layer.bias), atol=1e-6
    )
    check_layer(layer)


def test_stochastic_depth_drops_whole_samples_only_in_training():
    layer = coat_layers.StochasticDepth(0.5, seed=1)
    shortcut = np.zeros((256, 4, 3), "float32")
    branch = np.ones((256, 4, 3), "float32")
    np.testing.assert_array_equal(to_numpy(layer([shortcut, branch])), branch)
    y = to_numpy(layer([shortcut, branch], training=True))
    per_sample = y.reshape(256, -1)
    # Each sample is all-dropped (0) or all-kept (scaled by 1 / keep = 2).
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(1) == per_sample.max(1))
    assert 0.3 < (per_sample[:, 0] > 0).mean() < 0.7
    with pytest.raises(ValueError, match="rate"):
        coat_layers.StochasticDepth(1.0)
    assert check_layer(layer).rate == 0.5


def test_feature_interpolation_keeps_source_cls_and_resizes_bilinearly():
    layer = coat_layers.FeatureInterpolation()
    tokens = _tokens(2, 4, 6, 3)
    down = to_numpy(layer(tokens, size=(4, 6), target_size=(2, 3)))
    assert down.shape == (2, 7, 3)
    np.testing.assert_array_equal(down[:, 0], tokens[:, 0])
    # Halving with half-pixel centres and no antialiasing is the mean of each 2x2 block.
    image = tokens[:, 1:].reshape(2, 2, 2, 3, 2, 3)
    np.testing.assert_allclose(down[:, 1:], image.mean((2, 4)).reshape(2, 6, 3), atol=1e-6)
    up = to_numpy(layer(tokens, size=(4, 6), target_size=(8, 12)))
    assert up.shape == (2, 97, 3)
    np.testing.assert_array_equal(up[:, 0], tokens[:, 0])
    # The corner output pixel sits beyond the first input centre: it equals the corner input.
    np.testing.assert_allclose(up[:, 1], tokens[:, 1], atol=1e-6)
    check_layer(layer)


def test_tokens_to_feature_map_and_pooling():
    tokens = _tokens(2, 3, 5, 4)
    to_map = check_layer(coat_layers.TokensToFeatureMap())
    fmap = to_numpy(to_map(tokens, size=(3, 5)))
    np.testing.assert_array_equal(fmap, tokens[:, 1:].reshape(2, 3, 5, 4))
    pools = {
        m: to_numpy(coat_layers.TokenPooling(m)(tokens)) for m in coat_layers.TokenPooling.MODES
    }
    np.testing.assert_array_equal(pools["token"], tokens[:, 0])
    np.testing.assert_allclose(pools["avg"], tokens[:, 1:].mean(1), atol=1e-6)
    np.testing.assert_array_equal(pools["max"], tokens[:, 1:].max(1))
    with pytest.raises(ValueError, match="mode"):
        coat_layers.TokenPooling("sum")
    assert check_layer(coat_layers.TokenPooling("avg")).mode == "avg"


def test_scale_aggregation_is_a_weighted_sum_of_scales():
    layer = coat_layers.ScaleAggregation()
    xs = [RNG.randn(2, 6).astype("float32") for _ in range(3)]
    y = to_numpy(layer(xs))
    w, b = to_numpy(layer.kernel), to_numpy(layer.bias)
    np.testing.assert_allclose(y, sum(wi * xi for wi, xi in zip(w, xs)) + b, atol=1e-6)
    check_layer(layer)


def test_sublayers_have_names_every_backend_accepts():
    """Variable paths become PyTorch parameter names, which may not hold "."."""
    crpe = coat_layers.ConvRelativePositionEncoding(8, name="crpe2")
    crpe.build([(None, 17, 16), (None, 17, 16)])
    assert [conv.name for conv in crpe.convs] == ["conv_list_0", "conv_list_1", "conv_list_2"]
    built = [crpe]
    for layer, shape in (
        (coat_layers.PatchEmbedding(16, 2, name="patch_embed2"), (None, 8, 8, 3)),
        (coat_layers.ConvPositionEncoding(3, name="cpe2"), (None, 17, 16)),
        (coat_layers.MLP(32, 16, name="serial_blocks2_0_mlp"), (None, 17, 16)),
    ):
        layer.build(shape)
        built.append(layer)
    for layer in built:
        paths = [w.path for w in layer.weights]
        assert paths and not [p for p in paths if "." in p]
        assert all(p.startswith(f"{layer.name}/") for p in paths)
        check_layer(layer)
