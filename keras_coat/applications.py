"""The keras.applications front door: `keras_coat.CoaTLiteSmall(...)`, `create_model`, `CoaT`.

Each factory checks the arguments that only the factories take (`weights`, `input_tensor`,
`include_top` with `pooling`), builds a `CoaTBackbone` and a `CoaTImageClassifier` around it
(headless with ``include_top=False``), which check their own, and loads the requested weights:
``"imagenet"`` is the built-in preset that `keras_coat.presets` names for the variant at that
input size; any other preset reference loads through `CoaTImageClassifier.from_preset` once its
architecture and head are found to fit.
"""

import os

import keras

from keras_coat import imagenet, loader, presets
from keras_coat.backbone import (
    DEFAULT_CRPE_WINDOWS,
    VARIANTS,
    CoaTBackbone,
    validate_architecture,
    validate_image_shape,
    variant_config,
)
from keras_coat.image_classifier import CoaTImageClassifier
from keras_coat.loader import WEIGHT_FILE_SUFFIXES
from keras_coat.presets import PresetError

BASE_DOCSTRING = """Instantiates the {title} architecture.

Reference: [Co-Scale Conv-Attentional Image Transformers](https://arxiv.org/abs/2104.06399)
(ICCV 2021). {description}

Args:
    include_top: whether to include the classifier (final LayerNorm(s), class-token pooling and
        the linear head). Defaults to `True`.
    weights: `None` (random initialization), `"imagenet"` (the authors' ImageNet-1k weights),
        the path to a weights file: a Keras `.weights.h5`, or a PyTorch checkpoint (`.pth`,
        the authors' or timm's layout) or `.safetensors` file, converted on load; or any
        preset reference of this architecture (a built-in name, a preset directory, a `.keras`
        file, `hf://owner/repo`): its weights, preprocessing and, with its head, class names.
    input_tensor: optional Keras tensor (output of `keras.Input()`) to use as image input.
    input_shape: optional `(height, width, channels)`; height and width must be multiples of
        32 (224, 384, 256x320, ...). Defaults to `(224, 224, 3)`.
    pooling: only with `include_top=False`. `None` returns the final feature map
        `[batch, H/32, W/32, C]`; `"token"` the class token (as the classifier sees it),
        `"avg"`/`"max"` the mean/max over the final image tokens.
    classes: number of classes to classify images into, only with `include_top=True`; must be
        1000 with `weights="imagenet"`, the preset's number with a preset reference.
    classifier_activation: activation of the top layer, or `None` to return logits.
    include_preprocessing: if `True`, the model takes RGB pixels in [0, 255] and applies the
        ImageNet normalization itself; if `False`, it takes normalized inputs (the reference's
        convention, see `keras_coat.preprocess_input`).
    drop_path_rate: stochastic depth rate, one constant rate for every block as in the
        authors' code. Only active in training.
    name: the model's name. Defaults to `"{variant}"`.

The returned model's `pyramid_outputs` property holds the multi-scale features (strides 4, 8, 16,
32) as a dict keyed `"P2"`..`"P5"` of channels-last maps, as KerasHub backbones do: build a
feature extractor with `keras.Model(model.input, model.pyramid_outputs)`. `model.backbone` is
the `CoaTBackbone` it holds; `model.preprocessing` the evaluation transform of the checkpoint
and `model.class_names` its classes.

Returns:
    A `keras_coat.CoaTImageClassifier`: with `include_top=False` a headless one (the pooled
    features, or the feature map); it saves as a `.keras` file or a preset and loads back as
    itself. With an `input_tensor`, a `keras.Model` from that tensor calling it.
"""


def _validate_weights(weights):
    """`weights` as None, "imagenet", a weights file path or a preset reference."""
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if weights is not None and not isinstance(weights, (str, loader.ResolvedPreset)):
        raise ValueError(
            "The `weights` argument should be None, 'imagenet', the path to a weights file or a "
            f"preset reference; received weights={weights!r}."
        )
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
    return input_shape


def _validate_factory_arguments(weights, include_top, pooling, classes, channels, variant):
    """The checks only the factories need; the model classes check the rest."""
    if include_top and pooling is not None:
        raise ValueError(
            f"`pooling={pooling!r}` only applies with include_top=False; with include_top=True "
            "the classifier pools the class token. Pass include_top=False to get pooled features."
        )
    if weights == "imagenet" and include_top and classes != 1000:
        raise ValueError(
            f"With weights='imagenet' and include_top=True, `classes` must be 1000 (the "
            f"ImageNet head); received classes={classes}. Use include_top=False and add your own "
            "head."
        )
    if weights is not None and channels != 3:
        raise ValueError(
            f"Pretrained weights expect 3 input channels (RGB); received input_shape with "
            f"{channels} channels. Use weights=None to train from scratch on other inputs."
        )
    if weights == "imagenet" and variant is None:
        raise ValueError(
            "weights='imagenet' needs one of the published variants (CoaTLiteTiny, ..., "
            "CoaTSmall); the custom CoaT(...) configuration has no ImageNet weights."
        )


def _is_model_input(tensor):
    sources = keras.utils.get_source_inputs(tensor)
    return len(sources) == 1 and sources[0] is tensor


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
    classes=1000,
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
    the published variant the configuration is (it selects `weights="imagenet"`).

    Returns a `CoaTImageClassifier`, headless (`num_classes=None`) with `include_top=False`.
    With an `input_tensor` computed by other layers, the CoaT model is called on it and the
    returned `keras.Model` runs from that tensor's inputs (its last layer is the CoaT model).
    """
    validate_architecture(
        tuple(embed_dims), tuple(serial_depths), tuple(mlp_ratios), parallel_depth, num_heads
    )
    weights = _validate_weights(weights)
    height, width, channels = _resolve_input_shape(input_shape, input_tensor)
    _validate_factory_arguments(weights, include_top, pooling, classes, channels, architecture)
    if patch_size != 4:
        raise ValueError(f"CoaT's first patch embedding uses patch_size=4; received {patch_size}.")

    backbone_config = dict(
        embed_dims=embed_dims,
        serial_depths=serial_depths,
        mlp_ratios=mlp_ratios,
        parallel_depth=parallel_depth,
        num_heads=num_heads,
        crpe_windows=crpe_windows,
        image_shape=(height, width, channels),
        drop_path_rate=drop_path_rate,
        name=f"{name}_backbone",
    )
    head = {"num_classes": classes} if include_top else {"num_classes": None, "pooling": pooling}
    head.update(activation=classifier_activation, include_preprocessing=include_preprocessing,
                name=name)
    if weights == "imagenet":
        checkpoint = presets.checkpoint_for(architecture, (height, width)).name
        model = CoaTImageClassifier.from_preset(
            checkpoint, image_shape=(height, width, channels), drop_path_rate=drop_path_rate,
            **head,
        )
    elif weights is not None and not str(weights).endswith(WEIGHT_FILE_SUFFIXES):
        model = _from_reference(weights, backbone_config, head)
    else:
        extra = {}
        if architecture is not None:  # a published variant: its checkpoint's conventions
            checkpoint = presets.checkpoint_for(architecture, (height, width))
            extra["preprocessing"] = checkpoint.preprocessing.resized((height, width))
            if classes == checkpoint.num_classes and include_top:
                extra["class_names"] = imagenet.class_names()
        model = CoaTImageClassifier(
            CoaTBackbone(**backbone_config), **{"pooling": "token", **head}, **extra
        )
        if weights is not None:
            loader.load_weights_file(model, weights)
    if input_tensor is not None:
        if _is_model_input(input_tensor):
            return keras.Model(input_tensor, model(input_tensor), name=name)
        sources = keras.utils.get_source_inputs(input_tensor)
        return keras.Model(sources, model(input_tensor), name=name)
    return model


def _describe_architecture(config):
    variant = presets.variant_of(config)
    if variant is not None:
        return f"a {variant}"
    fields = zip(presets.ARCHITECTURE_FIELDS, presets.architecture(config))
    return "a custom CoaT (" + ", ".join(f"{k}={v}" for k, v in fields) + ")"


def _from_reference(reference, backbone_config, head):
    """The factory's model with the weights of a preset reference, once the preset is found to
    have this architecture (and, with a head, this number of classes)."""
    resolved, saved_backbone, saved = loader.preset_configs(reference)
    if presets.architecture(saved_backbone) != presets.architecture(backbone_config):
        raise PresetError(
            f"weights={reference!r} holds {_describe_architecture(saved_backbone)}; this model "
            f"is {_describe_architecture(backbone_config)}. Build the preset's variant, or load "
            "it with CoaTImageClassifier.from_preset."
        )
    if head["num_classes"] is not None and head["num_classes"] != saved["num_classes"]:
        raise PresetError(
            f"weights={reference!r} has a head of {saved['num_classes']} classes; the model "
            f"asks for classes={head['num_classes']}. Pass classes={saved['num_classes']}, or "
            "include_top=False (and add your own head)."
        )
    image_shape, drop_path_rate = backbone_config["image_shape"], backbone_config["drop_path_rate"]
    return CoaTImageClassifier.from_preset(
        resolved, image_shape=image_shape, drop_path_rate=drop_path_rate, **head
    )


def load_model(reference, compile=True):
    """The model a preset reference holds, as saved (see `keras_coat.loader.load_model`): a
    `.keras` file (keras-coat 0.1's too), a preset directory, a built-in name or a hub handle."""
    return loader.load_model(reference, compile=compile)


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
        classes=1000,
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
    config, preset = VARIANTS[variant], presets.PRESETS[variant]
    kind = "parallel blocks over stages 2-4" if config["parallel_depth"] else "serial blocks only"
    text = (
        f"Embedding dims {config['embed_dims']}, serial depths {config['serial_depths']}, "
        f"{kind}; {preset.params:,} parameters, {preset.gflops} GFLOPs at 224x224, "
        f"{preset.top1}% ImageNet top-1 (paper)."
    )
    for other in presets.PRESETS.values():
        if other.variant == variant and other is not preset:
            size = other.preprocessing.image_size
            text += (
                f" With input_shape=({size[0]}, {size[1]}, 3) and weights='imagenet' it loads "
                f"the checkpoint {other.description} ({other.top1}% top-1)."
            )
    return text


CoaTLiteTiny = _make_factory("coat_lite_tiny", "CoaT-Lite Tiny", _describe("coat_lite_tiny"))
CoaTLiteMini = _make_factory("coat_lite_mini", "CoaT-Lite Mini", _describe("coat_lite_mini"))
CoaTLiteSmall = _make_factory("coat_lite_small", "CoaT-Lite Small", _describe("coat_lite_small"))
CoaTLiteMedium = _make_factory(
    "coat_lite_medium", "CoaT-Lite Medium", _describe("coat_lite_medium")
)
CoaTTiny = _make_factory("coat_tiny", "CoaT Tiny", _describe("coat_tiny"))
CoaTMini = _make_factory("coat_mini", "CoaT Mini", _describe("coat_mini"))
CoaTSmall = _make_factory("coat_small", "CoaT Small", _describe("coat_small"))
