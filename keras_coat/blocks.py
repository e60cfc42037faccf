"""CoaT's serial and parallel blocks (Section 5.1, Figures 4 and 5).

Blocks are functions that return ``apply`` closures over the functional graph, as in
``keras.applications``: the shared per-scale position encodings (one ``ConvPositionEncoding`` and
one ``ConvRelativePositionEncoding`` per scale) are passed in and *called* at every block, so the
weight sharing of the paper is the sharing of one Keras layer between graph nodes, which
serialization keeps.

Layer names are the reference's module paths with every ``.`` replaced by ``_``
(``serial_blocks2_1_norm1`` for ``serial_blocks2.1.norm1``,
``parallel_blocks_0_factoratt_crpe3_qkv`` for ``parallel_blocks.0.factoratt_crpe3.qkv``): valid
on every backend (PyTorch refuses dots in parameter names), and what `keras_coat.convert` maps
the reference's keys onto.
"""

from keras import layers

from keras_coat import initializers
from keras_coat.layers import (
    MLP,
    FactorizedConvAttention,
    FeatureInterpolation,
    QueryKeyValue,
    StochasticDepth,
    TokenLayerNormalization,
    TokenwiseDense,
)

BLOCK_NORM_EPSILON = 1e-6


def ConvAttention(dim, num_heads, crpe, name):
    """``LayerNorm -> qkv -> factorized attention + CRPE -> output projection``.

    Returns ``apply(tokens, size)`` mapping ``[batch, 1 + H * W, dim]`` to the same shape.
    ``name`` is the attention's prefix, e.g. ``serial_blocks1_0_factoratt_crpe``.
    """
    qkv_proj = QueryKeyValue(name=f"{name}_qkv")
    attention = FactorizedConvAttention(num_heads, name=name)
    out_proj = TokenwiseDense(dim, name=f"{name}_proj", **initializers.dense_initializers())

    def apply(tokens, size):
        query, key, value = qkv_proj(tokens)
        relative = crpe([query, value], size=size)
        return out_proj(attention([query, key, value, relative]))

    return apply


def SerialBlock(dim, num_heads, mlp_ratio, cpe, crpe, drop_path_rate, name):
    """One serial block: ``x = cpe(x); x += attn(norm1(x)); x += mlp(norm2(x))``.

    Returns ``apply(tokens, size)``; tokens ``[batch, 1 + H * W, dim]`` in and out.
    """
    norm1 = TokenLayerNormalization(epsilon=BLOCK_NORM_EPSILON, name=f"{name}_norm1")
    attention = ConvAttention(dim, num_heads, crpe, name=f"{name}_factoratt_crpe")
    residual1 = StochasticDepth(drop_path_rate, name=f"{name}_drop_path1")
    norm2 = TokenLayerNormalization(epsilon=BLOCK_NORM_EPSILON, name=f"{name}_norm2")
    mlp = MLP(int(dim * mlp_ratio), dim, name=f"{name}_mlp")
    residual2 = StochasticDepth(drop_path_rate, name=f"{name}_drop_path2")

    def apply(tokens, size):
        tokens = cpe(tokens, size=size)
        tokens = residual1([tokens, attention(norm1(tokens), size)])
        return residual2([tokens, mlp(norm2(tokens))])

    return apply


def ParallelBlock(dim, num_heads, mlp_ratio, crpes, drop_path_rate, name, scales=(2, 3, 4)):
    """One parallel block over scales 2-4 with co-scale feature interpolation.

    Each scale runs its own LayerNorm and factorized conv-attention (with that scale's shared
    CRPE); every scale's attention output is then resized bilinearly to every other scale's grid
    and summed (class tokens included), added back as a residual, and followed by one MLP whose
    weights all scales share.

    Returns ``apply(token_list, sizes)`` over three ``[batch, 1 + H_i * W_i, dim]`` sequences.
    The parallel blocks need one width for all three scales (the reference asserts it too).
    """
    attentions, norms1, norms2, residuals1, residuals2 = [], [], [], [], []
    for scale, crpe in zip(scales, crpes):
        norms1.append(
            TokenLayerNormalization(epsilon=BLOCK_NORM_EPSILON, name=f"{name}_norm1{scale}")
        )
        attentions.append(
            ConvAttention(dim, num_heads, crpe, name=f"{name}_factoratt_crpe{scale}")
        )
        residuals1.append(StochasticDepth(drop_path_rate, name=f"{name}_drop_path1{scale}"))
        norms2.append(
            TokenLayerNormalization(epsilon=BLOCK_NORM_EPSILON, name=f"{name}_norm2{scale}")
        )
        residuals2.append(StochasticDepth(drop_path_rate, name=f"{name}_drop_path2{scale}"))
    interpolations = {
        (source, target): FeatureInterpolation(name=f"{name}_interpolate{source}to{target}")
        for source in scales
        for target in scales
        if source != target
    }
    sums = [layers.Add(name=f"{name}_coscale_sum{scale}") for scale in scales]
    mlp = MLP(int(dim * mlp_ratio), dim, name=f"{name}_mlp")

    def apply(token_list, sizes):
        attended = [
            attention(norm(tokens), size)
            for attention, norm, tokens, size in zip(attentions, norms1, token_list, sizes)
        ]
        outputs = []
        for i, target in enumerate(scales):
            terms = [attended[i]] + [
                interpolations[(source, target)](
                    attended[j], size=sizes[j], target_size=sizes[i]
                )
                for j, source in enumerate(scales)
                if source != target
            ]
            tokens = residuals1[i]([token_list[i], sums[i](terms)])
            outputs.append(residuals2[i]([tokens, mlp(norms2[i](tokens))]))
        return outputs

    return apply
