"""`CoaTImageClassifier`: a `CoaTBackbone` with its pooling and linear head (KerasHub's task)."""

import numbers

import keras
from keras import layers

from keras_coat import initializers, legacy, loader, preset_io, presets
from keras_coat.backbone import _PACKAGE, CoaTBackbone
from keras_coat.layers import ScaleAggregation, TokenPooling, TokensToFeatureMap, quantize_model
from keras_coat.presets import ImagePreprocessing

POOLING_MODES = ("token", "avg", "max", None)


def validate_head(num_classes, pooling, activation):
    """Raises a ValueError naming the problem for a bad head configuration."""
    if num_classes is not None and (
        not isinstance(num_classes, numbers.Integral)
        or isinstance(num_classes, bool)
        or num_classes < 1
    ):
        raise ValueError(
            f"`num_classes` (`classes` in the factories) must be a positive integer; received "
            f"{num_classes!r}."
        )
    if pooling not in POOLING_MODES:
        raise ValueError(f"`pooling` must be one of {POOLING_MODES}; received pooling={pooling!r}.")
    if pooling is None and num_classes is not None:
        raise ValueError(
            "pooling=None (the final feature map) only applies to a headless model "
            "(num_classes=None); a head needs pooled features."
        )
    if activation is not None and num_classes is not None:
        keras.activations.get(activation)  # a ValueError for unknown names


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CoaTImageClassifier(keras.Model):
    """A `CoaTBackbone` with the reference's pooling and linear classifier.

    The classifier holds its backbone (`classifier.backbone`), called as one nested layer, and
    adds what timm's `forward_head` does: the pooling of the backbone's final tokens (for CoaT,
    per scale, then the learned `aggregate` of the three scales) and the linear layer `head`
    (the reference's name, which the weight converter maps), followed by the activation layer
    `predictions`. With ``include_preprocessing=True`` it takes RGB pixels in [0, 255] and
    normalizes them with `preprocessing.mean` / `std` first.

    `num_classes=None` makes a headless model: the pooled features, or with `pooling=None` the
    final feature map `[batch, H/32, W/32, C]` (the factories' ``include_top=False``). Weights
    of a classifier load into it as they are (the head is left out), and
    `CoaTImageClassifier.from_preset(..., num_classes=10)` or `with_new_head(10)` put a fresh
    head on pretrained features: no second model is ever built.

    Args:
        backbone: a `CoaTBackbone`.
        num_classes: number of classes, or None for a headless model.
        pooling: "token" (the class token, as the reference), "avg" or "max" (over the final
            image tokens), or None (the feature map; headless only).
        activation: activation of the output (e.g. "softmax"), or None for logits.
        include_preprocessing: take RGB pixels in [0, 255] and normalize inside the model;
            False takes normalized images.
        preprocessing: a `keras_coat.presets.ImagePreprocessing` (or its config dict): the
            evaluation transform and normalization the model expects; it travels with the model
            (`.keras` files and presets). Defaults to the authors' ImageNet one at the
            backbone's input size.
        class_names: optional list of `num_classes` names, in label order.
        name: the model's name.

    `pyramid_outputs`: the backbone's feature maps `"P2"`..`"P5"` as tensors of this model's
    graph, so `keras.Model(model.input, model.pyramid_outputs)` extracts them from the model's
    own inputs.
    """

    presets = presets.PRESETS
    backbone_cls = CoaTBackbone

    def __init__(
        self,
        backbone,
        num_classes=1000,
        pooling="token",
        activation="softmax",
        include_preprocessing=True,
        preprocessing=None,
        class_names=None,
        name=None,
        **kwargs,
    ):
        if not isinstance(backbone, CoaTBackbone):
            raise ValueError(
                "`backbone` must be a keras_coat CoaTBackbone; received "
                f"{type(backbone).__name__}."
            )
        validate_head(num_classes, pooling, activation)
        if preprocessing is None:
            preprocessing = ImagePreprocessing(image_size=backbone.image_shape[:2])
        elif isinstance(preprocessing, dict):
            preprocessing = ImagePreprocessing.from_config(preprocessing)
        elif not isinstance(preprocessing, ImagePreprocessing):
            raise ValueError(
                "`preprocessing` must be a keras_coat.presets.ImagePreprocessing or its config; "
                f"received {type(preprocessing).__name__}."
            )
        channels = backbone.image_shape[-1]
        if include_preprocessing and channels != 3:
            raise ValueError(
                "include_preprocessing=True applies an RGB normalization and needs 3 "
                f"channels; received {channels}. Pass include_preprocessing=False."
            )
        if class_names is not None:
            if not isinstance(class_names, (list, tuple)) or not all(
                isinstance(c, str) for c in class_names
            ):
                raise ValueError("`class_names` must be a list of strings.")
            if len(class_names) != num_classes:
                raise ValueError(
                    f"`class_names` has {len(class_names)} names for num_classes={num_classes}."
                )
            class_names = list(class_names)

        inputs = keras.Input(shape=backbone.image_shape, name="images")
        x = inputs
        if include_preprocessing:
            x = layers.Normalization(
                mean=[255.0 * m for m in preprocessing.mean],
                variance=[(255.0 * s) ** 2 for s in preprocessing.std],
                # The name the export code looks for (ImageNet's for every published checkpoint).
                name="imagenet_normalization",
            )(x)
        features = backbone(x)
        pyramid = {level: features[level] for level in backbone.pyramid_outputs}
        tokens = [features[key] for key in backbone.feature_names]
        if pooling is None:
            x = TokensToFeatureMap(name="final_feature_map")(tokens[-1], size=backbone.final_grid)
        else:
            vectors = [
                TokenPooling(pooling, name=f"{pooling}_pool{i}")(t) for i, t in enumerate(tokens)
            ]
            x = vectors[0] if len(vectors) == 1 else ScaleAggregation(name="aggregate")(vectors)
        if num_classes is not None:
            x = layers.Dense(num_classes, name="head", **initializers.dense_initializers())(x)
            if activation is not None:
                x = layers.Activation(activation, dtype="float32", name="predictions")(x)
        super().__init__(inputs=inputs, outputs=x, name=name, **kwargs)

        self.backbone = backbone
        self.num_classes = num_classes
        self.pooling = pooling
        self.activation = activation if num_classes is not None else None
        self.include_preprocessing = bool(include_preprocessing)
        self.preprocessing = preprocessing
        self.class_names = class_names
        object.__setattr__(self, "_pyramid_outputs", pyramid)

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`, with the optimizer's variables made first (`_build_optimizer`)."""
        _build_optimizer(self)
        return super().fit(*args, **kwargs)

    def quantize(self, mode=None, **kwargs):
        """Keras' `Model.quantize` (e.g. `"int8"`) of the layers Keras can quantize: the dense
        projections (MLPs, attention outputs, head); the rest keeps float weights, silently."""
        return quantize_model(super().quantize, mode, **kwargs)

    @property
    def pyramid_outputs(self):
        """The backbone's `{"P2": ..., "P5": ...}` feature maps, tensors of this model's graph."""
        return dict(self._pyramid_outputs)

    def with_new_head(self, num_classes, class_names=None, activation="same", pooling="same"):
        """A classifier on this model's backbone (the same layers and weights) with a fresh head
        of `num_classes` (None: headless). Pooling weights (CoaT's `aggregate`) are kept."""
        model = type(self)(
            self.backbone,
            num_classes=num_classes,
            pooling=self.pooling if pooling == "same" else pooling,
            activation=self.activation if activation == "same" else activation,
            include_preprocessing=self.include_preprocessing,
            preprocessing=self.preprocessing,
            class_names=class_names,
            name=self.name,
        )
        if model.pooling is not None and self.pooling is not None and self.backbone.parallel_depth:
            model.get_layer("aggregate").set_weights(self.get_layer("aggregate").get_weights())
        return model

    def get_config(self):
        activation = self.activation
        if activation is not None and not isinstance(activation, str):
            activation = keras.activations.serialize(activation)
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.layers.serialize(self.backbone),
            "num_classes": self.num_classes,
            "pooling": self.pooling,
            "activation": activation,
            "include_preprocessing": self.include_preprocessing,
            "preprocessing": self.preprocessing.get_config(),
            "class_names": self.class_names,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("backbone"), dict):
            backbone_config = config["backbone"]
            if legacy.is_legacy_backbone(backbone_config):
                raise legacy.legacy_error("CoaTImageClassifier")
            config["backbone"] = keras.layers.deserialize(backbone_config)
        return cls(**config)

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """A classifier from a preset reference (see `keras_coat.loader`): a built-in name
        (`CoaTImageClassifier.presets`), a preset directory, a `.keras` file or a hub handle
        (``hf://owner/repo``, ``kaggle://...``), with its preprocessing and class names.

        `kwargs` override the saved configuration: `image_shape` and `drop_path_rate` (the
        backbone's), `num_classes` (another number gives a fresh head on the pretrained
        features; None a headless model), `pooling`, `activation`, `include_preprocessing`,
        `class_names`, `name`.
        """
        return loader.load_classifier(cls, preset, load_weights=load_weights, **kwargs)

    def save_to_preset(self, preset_dir):
        """Writes the KerasHub preset layout (atomically): `config.json` and `model.weights.h5`
        (the backbone), `task.json` and `task.weights.h5` (this classifier), the preprocessing
        in `image_converter.json`, and `metadata.json`."""
        preset_io.save_to_preset(self, preset_dir)


def _build_optimizer(model):
    """Creates the variables of a compiled, built model's optimizer if it has none yet (under
    the model's distribution strategy), so that `fit` traces its training step once.

    On TensorFlow without a distribution strategy, Keras creates them inside the first trace
    of the training step, and TensorFlow then traces the step a second time (a `tf.function`
    that made variables is traced again without): for CoaT-Lite Small at 64x64 on 2 cores
    (2026-12-07) the first `fit` step took 34.9 s, and 21.3 s with the optimizer built first;
    the tiny test CoaT 25.4 s and 13.1 s. Keras does this itself under a strategy, and on JAX
    and PyTorch, so elsewhere it changes nothing.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or optimizer.built or not model.built:
        return
    if keras.backend.backend() == "tensorflow":
        with model.distribute_strategy.scope():
            optimizer.build(model.trainable_variables)


# On TensorFlow `predict` traces the model before its first batch, and an eager call does not:
# for CoaT-Lite Small at batch 1 on 2 cores (2026-12-07) the first `predict` took 3.6-5.0 s and
# the first eager call 0.9-1.3 s; each later batch 0.3 s against 0.8 s. A few batches, as one
# command classifies, are answered sooner eagerly.
EAGER_BATCHES = 4


def predict_in_batches(model, images, batch_size=8):
    """Yields `model`'s outputs for `images` (a sequence of ``[height, width, 3]`` arrays) as
    NumPy arrays of at most `batch_size` rows, in order: what `model.predict` computes, answered
    as soon as a new process can. On TensorFlow up to `EAGER_BATCHES` batches are called eagerly
    (`predict` would trace the model first); otherwise, and on JAX (whose eager calls compile
    every op, slower than `predict`'s one compilation) and PyTorch, through `predict`."""
    import numpy as np

    eager = keras.backend.backend() == "tensorflow" and len(images) <= EAGER_BATCHES * batch_size
    for start in range(0, len(images), batch_size):
        batch = np.stack(images[start : start + batch_size])
        outputs = model(batch, training=False) if eager else model.predict(batch, verbose=0)
        yield np.asarray(keras.ops.convert_to_numpy(outputs))
