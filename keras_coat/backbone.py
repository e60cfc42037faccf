"""`CoaTBackbone`: images in, CoaT's features and its multi-scale `pyramid_outputs` out.

Reference: Xu, Xu, Chang, Tu, "Co-Scale Conv-Attentional Image Transformers", ICCV 2021.
"""

import numbers

import keras

from keras_coat import legacy, loader, preset_io, presets
from keras_coat.blocks import BLOCK_NORM_EPSILON, ParallelBlock, SerialBlock
from keras_coat.layers import (
    ClassToken,
    ConvPositionEncoding,
    ConvRelativePositionEncoding,
    PatchEmbedding,
    TokenLayerNormalization,
    TokensToFeatureMap,
    quantize_model,
)
from keras_coat.presets import VARIANTS

STAGE_STRIDES = (4, 8, 16, 32)
PYRAMID_LEVELS = ("P2", "P3", "P4", "P5")
DEFAULT_CRPE_WINDOWS = ((3, 2), (5, 3), (7, 3))
# The scales whose final normed tokens the classifier reads: the last one for CoaT-Lite, the
# three of the parallel group for CoaT.
LITE_FEATURE_SCALES = (4,)
PARALLEL_FEATURE_SCALES = (2, 3, 4)
_PACKAGE = "keras_coat"


def variant_config(variant):
    """The architecture arguments of a published variant, e.g. `variant_config("coat_tiny")`."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown CoaT variant {variant!r}. Available: {', '.join(VARIANTS)}.")
    return dict(VARIANTS[variant])


def feature_scales(parallel_depth):
    """The scales (2-4) whose class tokens the classifier reads, in the backbone's output order."""
    return PARALLEL_FEATURE_SCALES if parallel_depth else LITE_FEATURE_SCALES


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
    if not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"`num_heads` must be a positive int; received {num_heads!r}.")
    if any(d < 1 for d in embed_dims):
        raise ValueError(f"`embed_dims` must be positive; received {tuple(embed_dims)}.")
    for dim in embed_dims:
        if dim % num_heads:
            raise ValueError(
                f"Every embedding dim must be divisible by num_heads={num_heads}; received "
                f"embed_dims={tuple(embed_dims)}."
            )
    if any(d < 1 for d in serial_depths):
        raise ValueError(f"`serial_depths` must be positive; received {tuple(serial_depths)}.")
    if any(not r > 0 for r in mlp_ratios):
        raise ValueError(f"`mlp_ratios` must be positive; received {tuple(mlp_ratios)}.")
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


def validate_image_shape(image_shape, arg_name="input_shape"):
    """`(height, width, channels)` as ints, or a ValueError saying what CoaT accepts."""
    if not isinstance(image_shape, (tuple, list)):
        raise ValueError(
            f"`{arg_name}` must be a (height, width, channels) tuple, e.g. (224, 224, 3); "
            f"received {image_shape!r} of type {type(image_shape).__name__}."
        )
    image_shape = tuple(image_shape)
    if len(image_shape) != 3 or any(d is None for d in image_shape):
        raise ValueError(
            f"`{arg_name}` must be a fully defined (height, width, channels) tuple, e.g. "
            f"(224, 224, 3); received {image_shape}."
        )
    # Integers only: int(64.5) would silently build a 64-pixel model, and True is 1.
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in image_shape):
        raise ValueError(
            f"`{arg_name}` must hold ints; received {image_shape!r} (types "
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


def validate_drop_path_rate(drop_path_rate):
    if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, numbers.Real) or not (
        0.0 <= float(drop_path_rate) < 1.0
    ):
        raise ValueError(f"`drop_path_rate` must be in [0, 1); received {drop_path_rate!r}.")
    return float(drop_path_rate)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CoaTBackbone(keras.Model):
    """The CoaT image encoder: normalized images in, CoaT's features and `pyramid_outputs` out.

    A functional `keras.Model` in the KerasHub backbone pattern: it maps images to features and
    nothing else. Normalization, pooling and the head belong to the task
    (`keras_coat.CoaTImageClassifier`), which holds a backbone. It saves and loads as itself, and
    feeds KerasHub's `RetinaNetBackbone` and `DeepLabV3Backbone` as their `image_encoder`.

    Output, as timm's `forward_features` (what the classifier pools): a dict with

    - `"P2"`..`"P5"`: the channels-last feature maps at strides 4, 8, 16, 32 (for CoaT, P3..P5
      after the parallel blocks), also the `pyramid_outputs` attribute;
    - `"tokens4"` (CoaT-Lite), or `"tokens2"`, `"tokens3"`, `"tokens4"` (CoaT): the final
      LayerNorm'd token sequences `[batch, 1 + H_i * W_i, C]`, class token first.

    All of CoaT's final norms (`norm2`..`norm4`) live here, and the classifier's pooling and its
    scale aggregation (`aggregate`) in the task, as timm splits `forward_features` and
    `forward_head`. So a backbone always has the same layers whatever the task does with it, and
    a headless model is the backbone itself: it reads a classifier's weights without a second
    "twin" model. The pyramid is part of the output so that a task, which calls the backbone as
    one nested layer, has the feature maps as tensors of its own graph.

    Args:
        embed_dims, serial_depths, mlp_ratios: one entry per stage (strides 4, 8, 16, 32).
        parallel_depth: number of parallel blocks over stages 2-4 (CoaT); 0 for CoaT-Lite.
        num_heads: attention heads in every block.
        crpe_windows: `(window, heads)` pairs of the convolutional relative position encoding.
        image_shape: `(height, width, channels)`, height and width multiples of 32.
        drop_path_rate: stochastic depth rate of every block (training only).
        name: the model's name.

    `CoaTBackbone.from_preset(reference)` builds one from a preset reference (a built-in name of
    `CoaTBackbone.presets`, a preset directory, a `.keras` file or a hub handle) with its weights.
    """

    presets = presets.PRESETS

    def __init__(
        self,
        embed_dims,
        serial_depths,
        mlp_ratios,
        parallel_depth=0,
        num_heads=8,
        crpe_windows=DEFAULT_CRPE_WINDOWS,
        image_shape=(224, 224, 3),
        drop_path_rate=0.0,
        name=None,
        **kwargs,
    ):
        embed_dims = tuple(int(d) for d in embed_dims)
        serial_depths = tuple(int(d) for d in serial_depths)
        mlp_ratios = tuple(mlp_ratios)
        parallel_depth = int(parallel_depth)
        crpe_windows = tuple((int(w), int(h)) for w, h in crpe_windows)
        validate_architecture(embed_dims, serial_depths, mlp_ratios, parallel_depth, num_heads)
        height, width, channels = validate_image_shape(image_shape, "image_shape")
        drop_path_rate = validate_drop_path_rate(drop_path_rate)

        inputs = keras.Input(shape=(height, width, channels), name="images")
        # Serial stages: patch embedding, class token, then blocks sharing one CPE and one CRPE.
        feature_map, size = inputs, (height, width)
        stage_tokens, sizes, cpes, crpes = [], [], [], []
        pyramid = {}
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
                    dim, num_heads, mlp_ratio, cpe, crpe, drop_path_rate,
                    name=f"serial_blocks{index}_{block}",
                )(tokens, size)
            feature_map = TokensToFeatureMap(name=f"stage{index}_feature_map")(tokens, size=size)
            stage_tokens.append(tokens)
            sizes.append(size)
            cpes.append(cpe)
            crpes.append(crpe)
            if stage == 0 or not parallel_depth:
                pyramid[PYRAMID_LEVELS[stage]] = feature_map

        # Parallel group (CoaT): stages 2-4 exchange information at every block.
        final_tokens = stage_tokens[1:]
        for block in range(parallel_depth):
            final_tokens = [
                cpe(t, size=s) for cpe, t, s in zip(cpes[1:], final_tokens, sizes[1:])
            ]
            final_tokens = ParallelBlock(
                embed_dims[1], num_heads, mlp_ratios[1], crpes[1:], drop_path_rate,
                name=f"parallel_blocks_{block}",
            )(final_tokens, sizes[1:])
        if parallel_depth:
            for level, tokens, size in zip(PYRAMID_LEVELS[1:], final_tokens, sizes[1:]):
                pyramid[level] = TokensToFeatureMap(name=f"parallel_{level.lower()}_feature_map")(
                    tokens, size=size
                )

        # Final norms: CoaT-Lite's head reads the last stage; CoaT's the three parallel scales.
        scale_tokens = dict(zip((2, 3, 4), final_tokens if parallel_depth else stage_tokens[1:]))
        outputs = dict(pyramid)
        for scale in feature_scales(parallel_depth):
            outputs[f"tokens{scale}"] = TokenLayerNormalization(
                epsilon=BLOCK_NORM_EPSILON, name=f"norm{scale}"
            )(scale_tokens[scale])

        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

        self.embed_dims = embed_dims
        self.serial_depths = serial_depths
        self.mlp_ratios = mlp_ratios
        self.parallel_depth = parallel_depth
        self.num_heads = int(num_heads)
        self.crpe_windows = crpe_windows
        self.image_shape = (height, width, channels)
        self.drop_path_rate = drop_path_rate
        # A plain dict, set past Keras' attribute tracking: a tracked dict is no longer a dict
        # that JAX accepts as the outputs of `keras.Model(model.input, model.pyramid_outputs)`.
        object.__setattr__(self, "_pyramid_outputs", pyramid)

    def quantize(self, mode=None, **kwargs):
        """Keras' `Model.quantize` (e.g. `"int8"`) of the layers Keras can quantize: the dense
        projections (MLPs, attention outputs, head); the rest keeps float weights, silently."""
        return quantize_model(super().quantize, mode, **kwargs)

    @property
    def pyramid_outputs(self):
        """`{"P2": ..., "P5": ...}`: the feature maps at strides 4, 8, 16 and 32."""
        return dict(self._pyramid_outputs)

    @property
    def feature_names(self):
        """The output keys of the token sequences the classifier pools, e.g. `("tokens4",)`."""
        return tuple(f"tokens{scale}" for scale in feature_scales(self.parallel_depth))

    @property
    def final_grid(self):
        """`(rows, cols)` of the last stage's feature map (stride 32)."""
        return self.image_shape[0] // 32, self.image_shape[1] // 32

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
            "drop_path_rate": self.drop_path_rate,
        }

    @classmethod
    def from_config(cls, config):
        if legacy.is_legacy_backbone({"config": config}):
            raise legacy.legacy_error("CoaTBackbone")
        return cls(**config)

    @classmethod
    def from_variant(cls, variant, **kwargs):
        """A backbone of a published variant's architecture (`VARIANTS`), random weights."""
        return cls(**variant_config(variant), **kwargs)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """A backbone from a preset reference (see `keras_coat.loader`): a built-in name
        (`CoaTBackbone.presets`), a preset directory, a `.keras` file or a hub handle.

        `kwargs` override the saved configuration: `image_shape` (any multiple of 32; the
        weights fit every size) and `drop_path_rate`.
        """
        return loader.load_backbone(cls, preset, load_weights=load_weights, **kwargs)

    def save_to_preset(self, preset_dir):
        """Writes `config.json`, `model.weights.h5` and `metadata.json` (atomically)."""
        preset_io.save_to_preset(self, preset_dir)
