"""The keras.applications front door: `keras_coat.CoaTLiteSmall(...)`, `create_model`, `CoaT`.

Each factory validates its arguments, builds a `CoaTImageClassifier` (or, with
`include_top=False`, a `CoaTBackbone`) and loads the requested weights through
`keras_coat.loading`.
"""

import os

import keras

from keras_coat import loading
from keras_coat.imagenet import NUM_CLASSES
from keras_coat.loading import WEIGHT_FILE_SUFFIXES
from keras_coat.models import (
    DEFAULT_CRPE_WINDOWS,
    MODEL_CONFIGS,
    POOLING_MODES,
    CoaTBackbone,
    CoaTImageClassifier,
    is_model_input,
    validate_architecture,
    validate_image_shape,
    variant_config,
)

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

The returned model's `pyramid_outputs` property holds the multi-scale features (strides 4, 8, 16,
32) as a dict keyed `"P2"`..`"P5"` of channels-last maps, as KerasHub backbones do: build a
feature extractor with `keras.Model(model.inputs, model.pyramid_outputs)`.

Returns:
    A `keras_coat.CoaTImageClassifier` (`include_top=True`) or `keras_coat.CoaTBackbone`
    (`include_top=False`); both save as `.keras` files and load back as themselves.
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
    input_shape = validate_image_shape(input_shape)
    if tensor_shape is not None and tuple(tensor_shape) != input_shape:
        raise ValueError(
            f"`input_shape`={input_shape} contradicts the shape of `input_tensor`, "
            f"{tensor_shape} (batch dimension excluded)."
        )
    return validate_image_shape(input_shape)


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
            f"ImageNet head); received classes={classes}. Use include_top=False and add your own "
            "head."
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


def CoaT(
    embed_dims,
    serial_depths,
    mlp_ratios,
    parallel_depth=0,
    num_heads=8,
    patch_size=4,
    crpe_windows=DEFAULT_CRPE_WINDOWS,
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

    Returns a `CoaTImageClassifier`, or with `include_top=False` a `CoaTBackbone`. With an
    `input_tensor` computed by other layers, the CoaT model is called on it and the returned
    `keras.Model` runs from that tensor's inputs (its last layer is the CoaT model).
    """
    validate_architecture(
        tuple(embed_dims), tuple(serial_depths), tuple(mlp_ratios), parallel_depth, num_heads
    )
    weights = _validate_weights(weights)
    height, width, channels = _resolve_input_shape(input_shape, input_tensor)
    _validate_arguments(
        weights, include_top, pooling, classes, channels, architecture, classifier_activation
    )
    if patch_size != 4:
        raise ValueError(f"CoaT's first patch embedding uses patch_size=4; received {patch_size}.")

    own_input = input_tensor is not None and is_model_input(input_tensor)
    backbone = CoaTBackbone(
        embed_dims,
        serial_depths,
        mlp_ratios,
        parallel_depth=parallel_depth,
        num_heads=num_heads,
        crpe_windows=crpe_windows,
        image_shape=(height, width, channels),
        include_preprocessing=include_preprocessing,
        pooling="token" if include_top else pooling,
        drop_path_rate=drop_path_rate,
        architecture=architecture,
        input_tensor=input_tensor if own_input else None,
        name=f"{name}_backbone" if include_top else name,
    )
    model = backbone
    if include_top:
        model = CoaTImageClassifier(
            backbone, num_classes=classes, classifier_activation=classifier_activation, name=name
        )
    loading.load_weights(model, weights)
    if input_tensor is not None and not own_input:
        sources = keras.utils.get_source_inputs(input_tensor)
        return keras.Model(sources, model(input_tensor), name=name)
    return model


def create_model(variant, **kwargs):
    """Builds a published variant by its reference name, e.g. `create_model("coat_lite_small")`."""
    config = variant_config(variant)
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
