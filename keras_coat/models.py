"""The CoaT family: the variant table, the builder and the seven factories.

Reference: Xu, Xu, Chang, Tu, "Co-Scale Conv-Attentional Image Transformers", ICCV 2021.
"""

import os

import keras
from keras import layers

from keras_coat.blocks import BLOCK_NORM_EPSILON, ParallelBlock, SerialBlock
from keras_coat.imagenet import IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES
from keras_coat.layers import (
    ClassToken,
    ConvPositionEncoding,
    ConvRelativePositionEncoding,
    PatchEmbedding,
    ScaleAggregation,
    TokenLayerNormalization,
    TokenPooling,
    TokensToFeatureMap,
    _TRUNC_NORMAL,
)

# Paper Table 1; parameter counts are timm's (1000-class head), GFLOPs and top-1 from Table 2.
MODEL_CONFIGS = {
    "coat_lite_tiny": {
        "embed_dims": (64, 128, 256, 320),
        "serial_depths": (2, 2, 2, 2),
        "mlp_ratios": (8, 8, 4, 4),
        "parallel_depth": 0,
        "params": 5_721_960,
        "gflops": 1.6,
        "top1": 77.5,
    },
    "coat_lite_mini": {
        "embed_dims": (64, 128, 320, 512),
        "serial_depths": (2, 2, 2, 2),
        "mlp_ratios": (8, 8, 4, 4),
        "parallel_depth": 0,
        "params": 11_011_560,
        "gflops": 2.0,
        "top1": 79.1,
    },
    "coat_lite_small": {
        "embed_dims": (64, 128, 320, 512),
        "serial_depths": (3, 4, 6, 3),
        "mlp_ratios": (8, 8, 4, 4),
        "parallel_depth": 0,
        "params": 19_838_504,
        "gflops": 4.0,
        "top1": 81.9,
    },
    "coat_lite_medium": {
        "embed_dims": (128, 256, 320, 512),
        "serial_depths": (3, 6, 10, 8),
        "mlp_ratios": (4, 4, 4, 4),
        "parallel_depth": 0,
        "params": 44_571_048,
        "gflops": 9.8,
        "top1": 83.6,
    },
    "coat_tiny": {
        "embed_dims": (152, 152, 152, 152),
        "serial_depths": (2, 2, 2, 2),
        "mlp_ratios": (4, 4, 4, 4),
        "parallel_depth": 6,
        "params": 5_498_540,
        "gflops": 4.4,
        "top1": 78.3,
    },
    "coat_mini": {
        "embed_dims": (152, 216, 216, 216),
        "serial_depths": (2, 2, 2, 2),
        "mlp_ratios": (4, 4, 4, 4),
        "parallel_depth": 6,
        "params": 10_337_004,
        "gflops": 6.8,
        "top1": 81.0,
    },
    "coat_small": {
        "embed_dims": (152, 320, 320, 320),
        "serial_depths": (2, 2, 2, 2),
        "mlp_ratios": (4, 4, 4, 4),
        "parallel_depth": 6,
        "params": 21_693_908,
        "gflops": 12.6,
        "top1": 82.1,
    },
}
ARCHITECTURE_KEYS = ("embed_dims", "serial_depths", "mlp_ratios", "parallel_depth")

POOLING_MODES = (None, "avg", "max", "token")
WEIGHT_FILE_SUFFIXES = (".weights.h5", ".pth", ".pt", ".safetensors")
STAGE_STRIDES = (4, 8, 16, 32)
PYRAMID_LEVELS = ("P2", "P3", "P4", "P5")

BASE_DOCSTRING = """Instantiates the {title} architecture.

Reference: [Co-Scale Conv-Attentional Image Transformers](https://arxiv.org/abs/2104.06399)
(ICCV 2021). {description}

Args:
    include_top: whether to include the classifier (final LayerNorm(s), class-token pooling and
        the linear head). Defaults to `True`.
    weights: `None` (random initialization), `"imagenet"` (the authors' ImageNet-1k weights),
        or the path to a weights file: a Keras `.weights.h5`, or a PyTorch checkpoint (`.pth`,
        the authors' or timm's layout) or `.safetensors` file, converted on load.
    input_tensor: optional Keras tensor (output of `keras.Input()`) to use as image input.
    input_shape: optional `(height, width, channels)`; height and width must be multiples of
        32 (224, 384, 256x320, ...). Defaults to `(224, 224, 3)`.
    pooling: only with `include_top=False`. `None` returns the final feature map
        `[batch, H/32, W/32, C]`; `"token"` the class token (as the classifier sees it),
        `"avg"`/`"max"` the mean/max over the final image tokens.
    classes: number of classes to classify images into, only with `include_top=True`; must be
        1000 with `weights="imagenet"`.
    classifier_activation: activation of the top layer, or `None` to return logits.
    include_preprocessing: if `True`, the model takes RGB pixels in [0, 255] and applies the
        ImageNet normalization itself; if `False`, it takes normalized inputs (the reference's
        convention, see `keras_coat.preprocess_input`).
    drop_path_rate: stochastic depth rate, one constant rate for every block as in the
        authors' code. Only active in training.
    name: the model's name. Defaults to `"{variant}"`.

The returned model's `pyramid_outputs` attribute holds the multi-scale features (strides 4, 8, 16,
32) as a dict keyed `"P2"`..`"P5"` of channels-last maps, as KerasHub backbones do: build a
feature extractor with `keras.Model(model.inputs, model.pyramid_outputs)`.

Returns:
    A `keras.Model` instance.
"""


def _validate_weights(weights):
    if weights is None or weights == "imagenet":
        return weights
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if not isinstance(weights, str):
        raise ValueError(
            "The `weights` argument should be None, 'imagenet', or the path to a weights file; "
            f"received weights={weights!r}."
        )
    if not weights.endswith(WEIGHT_FILE_SUFFIXES):
        raise ValueError(
            f"Cannot load weights from {weights!r}: the file name must end with one of "
            f"{', '.join(WEIGHT_FILE_SUFFIXES)} (or pass weights='imagenet' or None)."
        )
    if not os.path.isfile(weights):
        raise ValueError(f"The weights file {weights!r} does not exist.")
    return weights


def _resolve_input_shape(input_shape, input_tensor):
    tensor_shape = None
    if input_tensor is not None:
        if not keras.utils.is_keras_tensor(input_tensor):
            raise ValueError(
                "`input_tensor` must be a Keras tensor (from keras.Input or a layer); "
                f"received {type(input_tensor).__name__}."
            )
        tensor_shape = tuple(input_tensor.shape[1:])
    if input_shape is None:
        input_shape = tensor_shape or (224, 224, 3)
    input_shape = tuple(input_shape)
    if tensor_shape is not None and tuple(tensor_shape) != input_shape:
        raise ValueError(
            f"`input_shape`={input_shape} contradicts the shape of `input_tensor`, "
            f"{tensor_shape} (batch dimension excluded)."
        )
    if len(input_shape) != 3 or any(d is None for d in input_shape):
        raise ValueError(
            "`input_shape` must be a fully defined (height, width, channels) tuple, e.g. "
            f"(224, 224, 3); received {input_shape}."
        )
    height, width, channels = (int(d) for d in input_shape)
    if height < 32 or width < 32 or height % 32 or width % 32:
        raise ValueError(
            "CoaT needs input height and width that are positive multiples of 32 (its four "
            f"stages downsample by 4, 2, 2, 2); received {height}x{width}. Allowed sizes "
            "include 224x224, 384x384 and 256x320."
        )
    if channels < 1:
        raise ValueError(f"The number of input channels must be positive; received {channels}.")
    return height, width, channels


def _validate_arguments(
    weights, include_top, pooling, classes, channels, architecture, classifier_activation
):
    if pooling not in POOLING_MODES:
        raise ValueError(
            f"`pooling` must be one of {POOLING_MODES}; received pooling={pooling!r}."
        )
    if include_top and pooling is not None:
        raise ValueError(
            f"`pooling={pooling!r}` only applies with include_top=False; with include_top=True "
            "the classifier pools the class token. Pass include_top=False to get pooled features."
        )
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise ValueError(f"`classes` must be a positive integer; received classes={classes!r}.")
    if weights == "imagenet" and include_top and classes != NUM_CLASSES:
        raise ValueError(
            f"With weights='imagenet' and include_top=True, `classes` must be {NUM_CLASSES} (the "
            f"ImageNet head); received classes={classes}. Use include_top=False and add your own head."
        )
    if weights is not None and channels != 3:
        raise ValueError(
            f"Pretrained weights expect 3 input channels (RGB); received input_shape with "
            f"{channels} channels. Use weights=None to train from scratch on other inputs."
        )
    if weights == "imagenet" and architecture is None:
        raise ValueError(
            "weights='imagenet' needs one of the published variants (CoaTLiteTiny, ..., "
            "CoaTSmall); the custom CoaT(...) configuration has no ImageNet weights."
        )
    if include_top and classifier_activation is not None:
        keras.activations.get(classifier_activation)  # raises a ValueError for unknown names


def _validate_architecture(embed_dims, serial_depths, mlp_ratios, parallel_depth, num_heads):
    for arg_name, value in (
        ("embed_dims", embed_dims),
        ("serial_depths", serial_depths),
        ("mlp_ratios", mlp_ratios),
    ):
        if len(value) != 4:
            raise ValueError(
                f"`{arg_name}` needs one entry per stage (4); received {arg_name}={value!r}."
            )
    for dim in embed_dims:
        if dim % num_heads:
            raise ValueError(
                f"Every embedding dim must be divisible by num_heads={num_heads}; received "
                f"embed_dims={tuple(embed_dims)}."
            )
    if any(d < 1 for d in serial_depths):
        raise ValueError(f"`serial_depths` must be positive; received {tuple(serial_depths)}.")
    if parallel_depth < 0:
        raise ValueError(f"`parallel_depth` must be >= 0; received {parallel_depth}.")
    if parallel_depth and not (
        embed_dims[1] == embed_dims[2] == embed_dims[3]
        and mlp_ratios[1] == mlp_ratios[2] == mlp_ratios[3]
    ):
        raise ValueError(
            "Parallel blocks share one MLP across scales 2-4, so those scales need equal "
            f"embed_dims and mlp_ratios; received embed_dims={tuple(embed_dims)}, "
            f"mlp_ratios={tuple(mlp_ratios)}."
        )


def CoaT(
    embed_dims,
    serial_depths,
    mlp_ratios,
    parallel_depth=0,
    num_heads=8,
    patch_size=4,
    crpe_windows=((3, 2), (5, 3), (7, 3)),
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=NUM_CLASSES,
    classifier_activation="softmax",
    include_preprocessing=True,
    drop_path_rate=0.0,
    name="coat",
    architecture=None,
):
    """Builds a CoaT or CoaT-Lite model from a configuration.

    `embed_dims`, `serial_depths` and `mlp_ratios` give one entry per stage (strides 4, 8, 16,
    32); `parallel_depth > 0` makes a CoaT (with parallel blocks over stages 2-4), 0 a CoaT-Lite.
    `crpe_windows` lists `(window, heads)` pairs for the relative position encoding. The other
    arguments are those of the factories, e.g. `keras_coat.CoaTLiteSmall`. `architecture` names
    the published variant the configuration is (used to pick pretrained weights).
    """
    embed_dims = tuple(int(d) for d in embed_dims)
    serial_depths = tuple(int(d) for d in serial_depths)
    mlp_ratios = tuple(mlp_ratios)
    _validate_architecture(embed_dims, serial_depths, mlp_ratios, parallel_depth, num_heads)
    weights = _validate_weights(weights)
    height, width, channels = _resolve_input_shape(input_shape, input_tensor)
    _validate_arguments(
        weights, include_top, pooling, classes, channels, architecture, classifier_activation
    )
    if patch_size != 4:
        raise ValueError(f"CoaT's first patch embedding uses patch_size=4; received {patch_size}.")
    if not 0.0 <= float(drop_path_rate) < 1.0:
        raise ValueError(f"`drop_path_rate` must be in [0, 1); received {drop_path_rate}.")

    if input_tensor is None:
        inputs = keras.Input(shape=(height, width, channels), name="images")
    else:
        inputs = input_tensor

    x = inputs
    if include_preprocessing:
        if channels != 3:
            raise ValueError(
                "include_preprocessing=True applies the RGB ImageNet normalization and needs 3 "
                f"channels; received {channels}. Pass include_preprocessing=False."
            )
        x = layers.Normalization(
            mean=[255.0 * m for m in IMAGENET_MEAN],
            variance=[(255.0 * s) ** 2 for s in IMAGENET_STD],
            name="imagenet_normalization",
        )(x)

    # Serial stages: patch embedding, class token, then blocks sharing one CPE and one CRPE.
    feature_map, size = x, (height, width)
    stage_tokens, sizes, cpes, crpes = [], [], [], []
    for stage, (dim, depth, mlp_ratio) in enumerate(zip(embed_dims, serial_depths, mlp_ratios)):
        index = stage + 1
        stage_patch = patch_size if stage == 0 else 2
        size = (size[0] // stage_patch, size[1] // stage_patch)
        tokens = PatchEmbedding(dim, stage_patch, name=f"patch_embed{index}")(feature_map)
        tokens = ClassToken(name=f"cls_token{index}")(tokens)
        cpe = ConvPositionEncoding(3, name=f"cpe{index}")
        crpe = ConvRelativePositionEncoding(num_heads, crpe_windows, name=f"crpe{index}")
        for block in range(depth):
            tokens = SerialBlock(
                dim,
                num_heads,
                mlp_ratio,
                cpe,
                crpe,
                drop_path_rate,
                name=f"serial_blocks{index}.{block}",
            )(tokens, size)
        feature_map = TokensToFeatureMap(name=f"stage{index}_feature_map")(tokens, size=size)
        stage_tokens.append(tokens)
        sizes.append(size)
        cpes.append(cpe)
        crpes.append(crpe)
        if stage == 0:
            pyramid = {"P2": feature_map}
        elif not parallel_depth:
            pyramid[PYRAMID_LEVELS[stage]] = feature_map

    # Parallel group (CoaT): stages 2-4 exchange information at every block.
    final_tokens = stage_tokens[1:]
    for block in range(parallel_depth):
        final_tokens = [cpe(t, size=s) for cpe, t, s in zip(cpes[1:], final_tokens, sizes[1:])]
        final_tokens = ParallelBlock(
            embed_dims[1],
            num_heads,
            mlp_ratios[1],
            crpes[1:],
            drop_path_rate,
            name=f"parallel_blocks.{block}",
        )(final_tokens, sizes[1:])
    if parallel_depth:
        for level, tokens, size in zip(PYRAMID_LEVELS[1:], final_tokens, sizes[1:]):
            pyramid[level] = TokensToFeatureMap(name=f"parallel_{level}_feature_map")(
                tokens, size=size
            )

    # Heads: CoaT-Lite classifies the last stage's class token; CoaT aggregates the three
    # class tokens of the parallel scales.
    if parallel_depth:
        normed = [
            TokenLayerNormalization(epsilon=BLOCK_NORM_EPSILON, name=f"norm{stage}")(tokens)
            for stage, tokens in zip((2, 3, 4), final_tokens)
        ]
    else:
        normed = [
            TokenLayerNormalization(epsilon=BLOCK_NORM_EPSILON, name="norm4")(stage_tokens[-1])
        ]

    def pooled(mode):
        vectors = [TokenPooling(mode, name=f"{mode}_pool{i}") for i in range(len(normed))]
        vectors = [pool(tokens) for pool, tokens in zip(vectors, normed)]
        if len(vectors) == 1:
            return vectors[0]
        return ScaleAggregation(name="aggregate")(vectors)

    if include_top:
        x = pooled("token")
        x = layers.Dense(classes, kernel_initializer=_TRUNC_NORMAL, name="head")(x)
        if classifier_activation is not None:
            x = layers.Activation(classifier_activation, dtype="float32", name="predictions")(x)
    elif pooling is None:
        x = TokensToFeatureMap(name="final_feature_map")(normed[-1], size=sizes[-1])
    else:
        x = pooled(pooling)

    model_inputs = keras.utils.get_source_inputs(input_tensor) if input_tensor is not None else inputs
    model = keras.Model(model_inputs, x, name=name)
    # Plain attributes, set past Keras' attribute tracking: a tracked dict is no longer a dict
    # that JAX accepts as the outputs of `keras.Model(model.inputs, model.pyramid_outputs)`.
    object.__setattr__(model, "pyramid_outputs", pyramid)
    # Kept so that a model without its head can load the weights file of the full model.
    build_kwargs = dict(
        embed_dims=embed_dims,
        serial_depths=serial_depths,
        mlp_ratios=mlp_ratios,
        parallel_depth=parallel_depth,
        num_heads=num_heads,
        patch_size=patch_size,
        crpe_windows=crpe_windows,
        input_shape=(height, width, channels),
        include_preprocessing=include_preprocessing,
        name=name,
        architecture=architecture,
    )
    object.__setattr__(model, "_coat_build_kwargs", build_kwargs)

    if weights == "imagenet":
        from keras_coat import weights as weights_lib

        checkpoint = architecture
        if architecture == "coat_lite_medium" and (height, width) == (384, 384):
            checkpoint = "coat_lite_medium_384"
        weights_lib.load_imagenet_weights(model, checkpoint)
    elif weights is not None:
        load_weights_file(model, weights)
    return model


def load_weights_file(model, path):
    """Loads a `.weights.h5`, `.pth`/`.pt` or `.safetensors` file into a CoaT model.

    PyTorch checkpoints are read without executing anything from the file and converted with
    `keras_coat.convert.assign_state_dict` (strict: every weight accounted for).
    """
    from keras_coat import convert

    path = os.fspath(path)
    if path.endswith(".weights.h5"):
        convert.load_weights_h5(model, path)
        return
    from keras_coat.checkpoint import read_state_dict

    convert.assign_state_dict(model, read_state_dict(path))


def create_model(variant, **kwargs):
    """Builds a published variant by its reference name, e.g. `create_model("coat_lite_small")`."""
    if variant not in MODEL_CONFIGS:
        raise ValueError(
            f"Unknown CoaT variant {variant!r}. Available: {', '.join(MODEL_CONFIGS)}."
        )
    config = {k: MODEL_CONFIGS[variant][k] for k in ARCHITECTURE_KEYS}
    kwargs.setdefault("name", variant)
    return CoaT(**config, architecture=variant, **kwargs)


def _make_factory(variant, title, description):
    def factory(
        include_top=True,
        weights=None,
        input_tensor=None,
        input_shape=None,
        pooling=None,
        classes=NUM_CLASSES,
        classifier_activation="softmax",
        include_preprocessing=True,
        drop_path_rate=0.0,
        name=variant,
    ):
        return create_model(
            variant,
            include_top=include_top,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            include_preprocessing=include_preprocessing,
            drop_path_rate=drop_path_rate,
            name=name,
        )

    factory.__name__ = factory.__qualname__ = title.replace(" ", "").replace("-", "")
    factory.__doc__ = BASE_DOCSTRING.format(title=title, description=description, variant=variant)
    return factory


def _describe(variant):
    config = MODEL_CONFIGS[variant]
    kind = "parallel blocks over stages 2-4" if config["parallel_depth"] else "serial blocks only"
    return (
        f"Embedding dims {config['embed_dims']}, serial depths {config['serial_depths']}, "
        f"{kind}; {config['params']:,} parameters, {config['gflops']} GFLOPs at 224x224, "
        f"{config['top1']}% ImageNet top-1 (paper)."
    )


CoaTLiteTiny = _make_factory("coat_lite_tiny", "CoaT-Lite Tiny", _describe("coat_lite_tiny"))
CoaTLiteMini = _make_factory("coat_lite_mini", "CoaT-Lite Mini", _describe("coat_lite_mini"))
CoaTLiteSmall = _make_factory("coat_lite_small", "CoaT-Lite Small", _describe("coat_lite_small"))
CoaTLiteMedium = _make_factory(
    "coat_lite_medium",
    "CoaT-Lite Medium",
    _describe("coat_lite_medium") + " With input_shape=(384, 384, 3) and weights='imagenet' it "
    "loads the checkpoint fine-tuned at 384 (84.5% top-1).",
)
CoaTTiny = _make_factory("coat_tiny", "CoaT Tiny", _describe("coat_tiny"))
CoaTMini = _make_factory("coat_mini", "CoaT Mini", _describe("coat_mini"))
CoaTSmall = _make_factory("coat_small", "CoaT Small", _describe("coat_small"))
