"""The CoaT family as Keras models: the variant table, `CoaTBackbone` and `CoaTImageClassifier`.

Reference: Xu, Xu, Chang, Tu, "Co-Scale Conv-Attentional Image Transformers", ICCV 2021.
"""

import numbers

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
STAGE_STRIDES = (4, 8, 16, 32)
PYRAMID_LEVELS = ("P2", "P3", "P4", "P5")
DEFAULT_CRPE_WINDOWS = ((3, 2), (5, 3), (7, 3))
_PACKAGE = "keras_coat"


def variant_config(variant):
    """The architecture arguments of a published variant, e.g. `variant_config("coat_tiny")`."""
    if variant not in MODEL_CONFIGS:
        raise ValueError(
            f"Unknown CoaT variant {variant!r}. Available: {', '.join(MODEL_CONFIGS)}."
        )
    return {key: MODEL_CONFIGS[variant][key] for key in ARCHITECTURE_KEYS}


def validate_architecture(embed_dims, serial_depths, mlp_ratios, parallel_depth, num_heads):
    """Raises a ValueError naming the problem if the configuration is no CoaT."""
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


def validate_image_shape(image_shape):
    """`(height, width, channels)` as ints, or a ValueError saying what CoaT accepts."""
    if not isinstance(image_shape, (tuple, list)):
        raise ValueError(
            "`input_shape` must be a (height, width, channels) tuple, e.g. (224, 224, 3); "
            f"received {image_shape!r} of type {type(image_shape).__name__}."
        )
    image_shape = tuple(image_shape)
    if len(image_shape) != 3 or any(d is None for d in image_shape):
        raise ValueError(
            "`input_shape` must be a fully defined (height, width, channels) tuple, e.g. "
            f"(224, 224, 3); received {image_shape}."
        )
    # Integers only: int(64.5) would silently build a 64-pixel model, and True is 1.
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in image_shape):
        raise ValueError(
            f"`input_shape` must hold ints; received {image_shape!r} (types "
            f"{', '.join(type(d).__name__ for d in image_shape)})."
        )
    height, width, channels = (int(d) for d in image_shape)
    if height < 32 or width < 32 or height % 32 or width % 32:
        raise ValueError(
            "CoaT needs input height and width that are positive multiples of 32 (its four "
            f"stages downsample by 4, 2, 2, 2); received {height}x{width}. Allowed sizes "
            "include 224x224, 384x384 and 256x320."
        )
    if channels < 1:
        raise ValueError(f"The number of input channels must be positive; received {channels}.")
    return height, width, channels


def is_model_input(tensor):
    """Whether `tensor` is a `keras.Input` (rather than the output of some layer)."""
    sources = keras.utils.get_source_inputs(tensor)
    return len(sources) == 1 and sources[0] is tensor


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CoaTBackbone(keras.Model):
    """The CoaT image encoder: images in, features out, and the multi-scale `pyramid_outputs`.

    A functional `keras.Model` (the KerasHub backbone pattern) that saves and loads as itself:
    `keras.models.load_model` returns a `CoaTBackbone` with its `pyramid_outputs`, so it can feed
    KerasHub's `RetinaNetBackbone` and `DeepLabV3Backbone` as their `image_encoder`. Layer names
    follow the reference's module paths (`serial_blocks2.1.norm1`, `cpe3`), which the weight
    converter maps onto.

    `keras_coat.CoaTLiteSmall(include_top=False, ...)` and the other factories build one (with
    pretrained weights if asked); build it directly for custom configurations.

    Args:
        embed_dims, serial_depths, mlp_ratios: one entry per stage (strides 4, 8, 16, 32).
        parallel_depth: number of parallel blocks over stages 2-4 (CoaT); 0 for CoaT-Lite.
        num_heads: attention heads in every block.
        crpe_windows: `(window, heads)` pairs of the convolutional relative position encoding.
        image_shape: `(height, width, channels)`, height and width multiples of 32.
        include_preprocessing: take RGB pixels in [0, 255] and apply the ImageNet
            normalization inside the model; `False` takes normalized images.
        pooling: the output. `None`: the final feature map `[batch, H/32, W/32, C]` (after the
            final LayerNorm); `"token"`: the class token the classifier sees, `[batch, C]`
            (for CoaT, the learned aggregate of the three scales' class tokens); `"avg"`/`"max"`:
            the mean/max of the final image tokens, `[batch, C]`.
        drop_path_rate: stochastic depth rate of every block (training only).
        architecture: the published variant this configuration is (`"coat_lite_small"`), or
            `None` for a custom one; it selects pretrained weights.
        input_tensor: optional `keras.Input` to use as the image input.
        name: the model's name.

    `pyramid_outputs`: dict `"P2"`..`"P5"` of channels-last feature maps at strides 4, 8, 16,
    32 (for CoaT, P3..P5 after the parallel blocks); `keras.Model(backbone.inputs,
    backbone.pyramid_outputs)` is a multi-scale feature extractor.
    """

    def __init__(
        self,
        embed_dims,
        serial_depths,
        mlp_ratios,
        parallel_depth=0,
        num_heads=8,
        crpe_windows=DEFAULT_CRPE_WINDOWS,
        image_shape=(224, 224, 3),
        include_preprocessing=True,
        pooling=None,
        drop_path_rate=0.0,
        architecture=None,
        input_tensor=None,
        name=None,
        **kwargs,
    ):
        embed_dims = tuple(int(d) for d in embed_dims)
        serial_depths = tuple(int(d) for d in serial_depths)
        mlp_ratios = tuple(mlp_ratios)
        parallel_depth = int(parallel_depth)
        crpe_windows = tuple((int(w), int(h)) for w, h in crpe_windows)
        validate_architecture(embed_dims, serial_depths, mlp_ratios, parallel_depth, num_heads)
        if input_tensor is not None:
            if not keras.utils.is_keras_tensor(input_tensor) or not is_model_input(input_tensor):
                raise ValueError(
                    "`input_tensor` of a CoaTBackbone must be a `keras.Input`; received "
                    f"{input_tensor!r}. To run CoaT on the output of other layers, call the "
                    "model on it."
                )
            image_shape = tuple(input_tensor.shape[1:])
        height, width, channels = validate_image_shape(image_shape)
        if pooling not in POOLING_MODES:
            raise ValueError(
                f"`pooling` must be one of {POOLING_MODES}; received pooling={pooling!r}."
            )
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ValueError(f"`drop_path_rate` must be in [0, 1); received {drop_path_rate}.")
        if include_preprocessing and channels != 3:
            raise ValueError(
                "include_preprocessing=True applies the RGB ImageNet normalization and needs 3 "
                f"channels; received {channels}. Pass include_preprocessing=False."
            )

        if input_tensor is None:
            inputs = keras.Input(shape=(height, width, channels), name="images")
        else:
            inputs = input_tensor
        x = inputs
        if include_preprocessing:
            x = layers.Normalization(
                mean=[255.0 * m for m in IMAGENET_MEAN],
                variance=[(255.0 * s) ** 2 for s in IMAGENET_STD],
                name="imagenet_normalization",
            )(x)

        # Serial stages: patch embedding, class token, then blocks sharing one CPE and one CRPE.
        feature_map, size = x, (height, width)
        stage_tokens, sizes, cpes, crpes = [], [], [], []
        for stage, (dim, depth, mlp_ratio) in enumerate(
            zip(embed_dims, serial_depths, mlp_ratios)
        ):
            index = stage + 1
            stage_patch = 4 if stage == 0 else 2
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
            final_tokens = [
                cpe(t, size=s) for cpe, t, s in zip(cpes[1:], final_tokens, sizes[1:])
            ]
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

        # Final norms: CoaT-Lite's classifier reads the last stage's class token; CoaT's
        # aggregates the class tokens of the three parallel scales.
        if parallel_depth:
            normed = [
                TokenLayerNormalization(epsilon=BLOCK_NORM_EPSILON, name=f"norm{stage}")(tokens)
                for stage, tokens in zip((2, 3, 4), final_tokens)
            ]
        else:
            normed = [
                TokenLayerNormalization(epsilon=BLOCK_NORM_EPSILON, name="norm4")(
                    stage_tokens[-1]
                )
            ]
        if pooling is None:
            x = TokensToFeatureMap(name="final_feature_map")(normed[-1], size=sizes[-1])
        else:
            vectors = [
                TokenPooling(pooling, name=f"{pooling}_pool{i}")(tokens)
                for i, tokens in enumerate(normed)
            ]
            x = vectors[0] if len(vectors) == 1 else ScaleAggregation(name="aggregate")(vectors)

        super().__init__(inputs=inputs, outputs=x, name=name, **kwargs)

        self.embed_dims = embed_dims
        self.serial_depths = serial_depths
        self.mlp_ratios = mlp_ratios
        self.parallel_depth = parallel_depth
        self.num_heads = int(num_heads)
        self.crpe_windows = crpe_windows
        self.image_shape = (height, width, channels)
        self.include_preprocessing = bool(include_preprocessing)
        self.pooling = pooling
        self.drop_path_rate = float(drop_path_rate)
        self.architecture = architecture
        self.pyramid_outputs = pyramid

    @property
    def pyramid_outputs(self):
        """`{"P2": ..., "P5": ...}`: the feature maps at strides 4, 8, 16 and 32."""
        return dict(self._pyramid_outputs)

    @pyramid_outputs.setter
    def pyramid_outputs(self, value):
        if not isinstance(value, dict) or tuple(value) != PYRAMID_LEVELS:
            raise ValueError(
                f"`pyramid_outputs` must be a dict with the keys {PYRAMID_LEVELS} in that "
                f"order; received {value!r}."
            )
        for level, tensor in value.items():
            if not keras.utils.is_keras_tensor(tensor) or len(tensor.shape) != 4:
                raise ValueError(
                    f"`pyramid_outputs[{level!r}]` must be a 4-D Keras tensor (a feature map "
                    f"[batch, H, W, C]); received {tensor!r}."
                )
        # A plain dict, set past Keras' attribute tracking: a tracked dict is no longer a dict
        # that JAX accepts as the outputs of `keras.Model(model.inputs, model.pyramid_outputs)`.
        object.__setattr__(self, "_pyramid_outputs", dict(value))

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "embed_dims": list(self.embed_dims),
            "serial_depths": list(self.serial_depths),
            "mlp_ratios": list(self.mlp_ratios),
            "parallel_depth": self.parallel_depth,
            "num_heads": self.num_heads,
            "crpe_windows": [list(w) for w in self.crpe_windows],
            "image_shape": list(self.image_shape),
            "include_preprocessing": self.include_preprocessing,
            "pooling": self.pooling,
            "drop_path_rate": self.drop_path_rate,
            "architecture": self.architecture,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CoaTImageClassifier(keras.Model):
    """A `CoaTBackbone` with the reference's linear classifier on its class-token feature.

    The classifier holds its backbone (`classifier.backbone`) and shares its layers, so the
    classifier's layers are the backbone's plus `head` (and `predictions`, the activation).
    `keras_coat.CoaTLiteSmall(...)` and the other factories build one with `include_top=True`.

    Args:
        backbone: a `CoaTBackbone` built with `pooling="token"`.
        num_classes: number of classes.
        classifier_activation: activation of the output (e.g. `"softmax"`), or `None` for
            logits.
        name: the model's name.

    Input: images as the backbone takes them. Output: `[batch, num_classes]`.
    """

    def __init__(
        self,
        backbone,
        num_classes=NUM_CLASSES,
        classifier_activation="softmax",
        name=None,
        **kwargs,
    ):
        if not isinstance(backbone, CoaTBackbone):
            raise ValueError(
                "`backbone` must be a keras_coat CoaTBackbone; received "
                f"{type(backbone).__name__}."
            )
        if backbone.pooling != "token":
            raise ValueError(
                "The classifier reads the class token: build its backbone with pooling='token'; "
                f"received a backbone with pooling={backbone.pooling!r}."
            )
        if (
            not isinstance(num_classes, int)
            or isinstance(num_classes, bool)
            or num_classes < 1
        ):
            raise ValueError(f"`classes` must be a positive integer; received {num_classes!r}.")
        if classifier_activation is not None:
            keras.activations.get(classifier_activation)  # a ValueError for unknown names
        x = layers.Dense(num_classes, kernel_initializer=_TRUNC_NORMAL, name="head")(
            backbone.output
        )
        if classifier_activation is not None:
            x = layers.Activation(classifier_activation, dtype="float32", name="predictions")(x)
        inputs = backbone.inputs[0] if len(backbone.inputs) == 1 else backbone.inputs
        super().__init__(inputs=inputs, outputs=x, name=name, **kwargs)
        self.backbone = backbone
        self.num_classes = num_classes
        self.classifier_activation = classifier_activation

    @property
    def pyramid_outputs(self):
        """The backbone's `pyramid_outputs`, tensors of this model's graph too."""
        return self.backbone.pyramid_outputs

    def get_config(self):
        activation = self.classifier_activation
        if activation is not None and not isinstance(activation, str):
            activation = keras.activations.serialize(activation)
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.layers.serialize(self.backbone),
            "num_classes": self.num_classes,
            "classifier_activation": activation,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["backbone"], dict):
            config["backbone"] = keras.layers.deserialize(config["backbone"])
        return cls(**config)
