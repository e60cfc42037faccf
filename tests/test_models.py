"""The public model API: factories, argument validation, outputs, features, serialization.

These tests need no PyTorch; parity with the reference is in test_parity.py.
"""

import inspect
import re

import keras
import numpy as np
import pytest
from keras import ops

import keras_coat
from keras_coat.imagenet import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

FACTORIES = {
    "coat_lite_tiny": keras_coat.CoaTLiteTiny,
    "coat_lite_mini": keras_coat.CoaTLiteMini,
    "coat_lite_small": keras_coat.CoaTLiteSmall,
    "coat_lite_medium": keras_coat.CoaTLiteMedium,
    "coat_tiny": keras_coat.CoaTTiny,
    "coat_mini": keras_coat.CoaTMini,
    "coat_small": keras_coat.CoaTSmall,
}
# A tiny configuration of each kind, for fast behavioural tests.
TINY_LITE = dict(embed_dims=(16, 16, 24, 32), serial_depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2))
TINY_COAT = dict(
    embed_dims=(16, 24, 24, 24), serial_depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2),
    parallel_depth=2,
)


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _images(batch, height, width, seed=0):
    return (np.random.RandomState(seed).rand(batch, height, width, 3) * 255).astype("float32")


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factory_parameter_counts_equal_the_reference_and_names_suit_every_backend(name):
    model = FACTORIES[name]()
    assert model.count_params() == keras_coat.MODEL_CONFIGS[name]["params"]
    assert model.name == name
    assert model.output_shape == (None, 1000)
    # PyTorch refuses "." in parameter names, which Keras builds from the variable paths.
    dotted = [w.path for w in model.weights if "." in w.path]
    assert dotted == []
    assert all(re.fullmatch(r"[a-z0-9_]+", layer.name) for layer in model.backbone.layers)


def test_factories_share_the_keras_applications_signature():
    expected = [
        "include_top", "weights", "input_tensor", "input_shape", "pooling", "classes",
        "classifier_activation", "include_preprocessing", "drop_path_rate", "name",
    ]
    for factory in FACTORIES.values():
        assert list(inspect.signature(factory).parameters) == expected
        assert "include_preprocessing" in factory.__doc__ and "pyramid_outputs" in factory.__doc__


@pytest.mark.parametrize("config", [TINY_LITE, TINY_COAT], ids=["lite", "coat"])
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 64)])
def test_any_multiple_of_32_works_with_the_head(config, size):
    model = keras_coat.CoaT(**config, input_shape=(*size, 3), classes=7)
    probs = _np(model(_images(2, *size)))
    assert probs.shape == (2, 7)
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_shape=(225, 224, 3)), "multiples of 32"),
        (dict(input_shape=(224, 200, 3)), "received 224x200"),
        (dict(input_shape=(None, None, 3)), "fully defined"),
        (dict(input_shape=(224, 224)), "fully defined"),
        (dict(pooling="avg"), "include_top=False"),
        (dict(include_top=False, pooling="sum"), "pooling"),
        (dict(classes=0), "classes"),
        (dict(weights="imagenet", classes=10), "must be 1000"),
        (dict(weights="imagenet", input_shape=(224, 224, 1)), "3 input channels"),
        (dict(weights="model.ckpt"), "must end with"),
        (dict(weights="missing.weights.h5"), "does not exist"),
        (dict(weights=3), "weights"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(classifier_activation="nonsense"), "nonsense"),
        (dict(input_shape=(1, 224, 224, 3)), "fully defined"),
    ],
)
def test_bad_arguments_raise_value_errors_that_say_what_was_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_coat.CoaTLiteTiny(**kwargs)


def test_contradictory_input_tensor_and_shape():
    with pytest.raises(ValueError, match="contradicts"):
        keras_coat.CoaTLiteTiny(input_tensor=keras.Input((64, 64, 3)), input_shape=(96, 96, 3))
    with pytest.raises(ValueError, match="Keras tensor"):
        keras_coat.CoaTLiteTiny(input_tensor=np.zeros((1, 64, 64, 3)))


def test_custom_builder_validates_configuration():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        keras_coat.CoaT(embed_dims=(12, 16, 16, 16), serial_depths=(1,) * 4, mlp_ratios=(2,) * 4)
    with pytest.raises(ValueError, match="one entry per stage"):
        keras_coat.CoaT(embed_dims=(16, 16, 16), serial_depths=(1,) * 4, mlp_ratios=(2,) * 4)
    with pytest.raises(ValueError, match="equal"):
        keras_coat.CoaT(
            embed_dims=(16, 16, 24, 32), serial_depths=(1,) * 4, mlp_ratios=(2,) * 4,
            parallel_depth=1,
        )
    with pytest.raises(ValueError, match="published variants"):
        keras_coat.CoaT(**TINY_LITE, weights="imagenet")
    with pytest.raises(ValueError, match="Unknown CoaT variant"):
        keras_coat.create_model("coat_huge")


def test_input_tensor_is_used_as_the_input():
    inputs = keras.Input((64, 96, 3))
    model = keras_coat.CoaT(**TINY_LITE, input_tensor=inputs, classes=3)
    assert model.inputs[0] is inputs


def test_factories_return_the_model_classes():
    headless = keras_coat.CoaT(**TINY_LITE, input_shape=(64, 64, 3), include_top=False)
    assert type(headless) is keras_coat.CoaTImageClassifier
    assert headless.num_classes is None and headless.pooling is None
    assert type(headless.backbone) is keras_coat.CoaTBackbone
    classifier = keras_coat.CoaT(**TINY_LITE, input_shape=(64, 64, 3), classes=3)
    assert type(classifier) is keras_coat.CoaTImageClassifier
    assert classifier.pooling == "token" and type(classifier.backbone) is keras_coat.CoaTBackbone
    # The backbone maps images to features only: no normalization, pooling or head layers.
    backbone_layers = {layer.name for layer in classifier.backbone.layers}
    assert not {"imagenet_normalization", "head", "aggregate"} & backbone_layers
    # An input computed by other layers: the CoaT model is called on it.
    inputs = keras.Input((64, 64, 3))
    model = keras_coat.CoaT(**TINY_LITE, input_tensor=keras.layers.Rescaling(1.0)(inputs),
                            classes=3)
    assert model.inputs[0] is inputs
    assert isinstance(model.layers[-1], keras_coat.CoaTImageClassifier)
    assert model.output_shape == (None, 3)


def test_include_preprocessing_is_imagenet_normalization_inside_the_model():
    with_pre = keras_coat.CoaT(**TINY_COAT, input_shape=(64, 64, 3), classes=5)
    without = keras_coat.CoaT(
        **TINY_COAT, input_shape=(64, 64, 3), classes=5, include_preprocessing=False
    )
    without.set_weights(with_pre.get_weights())
    pixels = _images(2, 64, 64)
    normalized = (pixels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(
        _np(with_pre(pixels)), _np(without(normalized.astype("float32"))), atol=1e-5
    )
    np.testing.assert_allclose(
        _np(keras.layers.Normalization(
            mean=[255 * m for m in IMAGENET_MEAN],
            variance=[(255 * s) ** 2 for s in IMAGENET_STD],
        )(pixels)),
        normalized,
        atol=1e-5,
    )


def test_classifier_activation_none_returns_logits():
    probs_model = keras_coat.CoaT(**TINY_LITE, input_shape=(64, 64, 3), classes=4)
    logits_model = keras_coat.CoaT(
        **TINY_LITE, input_shape=(64, 64, 3), classes=4, classifier_activation=None
    )
    logits_model.set_weights(probs_model.get_weights())
    x = _images(3, 64, 64)
    logits = _np(logits_model(x))
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(_np(probs_model(x)), expected, atol=1e-6)


@pytest.mark.parametrize("config", [TINY_LITE, TINY_COAT], ids=["lite", "coat"])
def test_headless_outputs_and_pooling(config):
    size = (64, 96)
    final_dim = config["embed_dims"][-1]
    expected = {None: (2, 2, 3, final_dim), "avg": (2, final_dim), "max": (2, final_dim),
                "token": (2, final_dim)}
    outputs, reference = {}, None
    for pooling, shape in expected.items():
        model = keras_coat.CoaT(**config, input_shape=(*size, 3), include_top=False,
                                pooling=pooling)
        if reference is None:
            reference = model
        elif not config.get("parallel_depth"):
            model.set_weights(reference.get_weights())
        outputs[pooling] = _np(model(_images(2, *size)))
        assert outputs[pooling].shape == shape
    if not config.get("parallel_depth"):
        # CoaT-Lite: pooled features are those of the final (normalized) feature map.
        np.testing.assert_allclose(outputs["avg"], outputs[None].mean((1, 2)), atol=1e-5)
        np.testing.assert_allclose(outputs["max"], outputs[None].max((1, 2)), atol=1e-5)


@pytest.mark.parametrize("config", [TINY_LITE, TINY_COAT], ids=["lite", "coat"])
def test_pyramid_outputs_are_channels_last_at_strides_4_to_32(config):
    model = keras_coat.CoaT(**config, input_shape=(64, 96, 3))
    assert list(model.pyramid_outputs) == ["P2", "P3", "P4", "P5"]
    extractor = keras.Model(model.input, model.pyramid_outputs)
    features = extractor(_images(2, 64, 96))
    for (level, stride), dim in zip(
        {"P2": 4, "P3": 8, "P4": 16, "P5": 32}.items(), config["embed_dims"]
    ):
        assert tuple(features[level].shape) == (2, 64 // stride, 96 // stride, dim)


@pytest.mark.parametrize("config", [TINY_LITE, TINY_COAT], ids=["lite", "coat"])
def test_fit_trains_from_the_first_layer_to_the_head_with_stochastic_depth(config):
    model = keras_coat.CoaT(**config, input_shape=(64, 64, 3), classes=3, drop_path_rate=0.2)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    # Gradients reach the first layer through every stage, and the last stage's position
    # encodings (CPE via the image tokens the class token attends to).
    watched = ("patch_embed1/proj/kernel", "cpe4/proj/kernel", "head/kernel")
    variables = {w.path: w for w in model.trainable_weights}
    before = {path: _np(variables[path]).copy() for path in watched}
    labels = np.array([0, 1, 2, 1, 0, 2, 1, 0])
    history = model.fit(_images(8, 64, 64), labels, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    for path in watched:
        assert not np.array_equal(_np(variables[path]), before[path]), path


@pytest.mark.parametrize("config", [TINY_LITE, TINY_COAT], ids=["lite", "coat"])
def test_mixed_bfloat16_computes_in_bfloat16_and_keeps_float32_weights(config, dtype_policy):
    full = keras_coat.CoaT(**config, input_shape=(64, 64, 3), classes=5)
    dtype_policy("mixed_bfloat16")
    mixed = keras_coat.CoaT(**config, input_shape=(64, 64, 3), classes=5)
    mixed.set_weights(full.get_weights())
    assert {w.dtype for w in mixed.weights} == {"float32"}
    assert keras.backend.standardize_dtype(mixed.get_layer("head").output.dtype) == "bfloat16"
    x = _images(2, 64, 64)
    probabilities = mixed(x)
    assert keras.backend.standardize_dtype(probabilities.dtype) == "float32"
    np.testing.assert_allclose(_np(probabilities), _np(full(x)), atol=0.05)


def test_drop_path_is_stochastic_in_training_only():
    model = keras_coat.CoaT(**TINY_COAT, input_shape=(64, 64, 3), drop_path_rate=0.5,
                            classifier_activation=None)
    x = _images(4, 64, 64)
    np.testing.assert_array_equal(_np(model(x)), _np(model(x)))
    assert not np.allclose(_np(model(x, training=True)), _np(model(x, training=True)))


@pytest.mark.parametrize("config", [TINY_LITE, TINY_COAT], ids=["lite", "coat"])
def test_keras_file_roundtrip_keeps_class_outputs_pyramid_and_weight_sharing(config, tmp_path):
    model = keras_coat.CoaT(**config, input_shape=(64, 96, 3), classes=6)
    x = _images(2, 64, 96)
    expected = _np(model(x))
    expected_pyramid = keras.Model(model.input, model.pyramid_outputs)(x)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert type(restored) is keras_coat.CoaTImageClassifier
    assert type(restored.backbone) is keras_coat.CoaTBackbone
    np.testing.assert_array_equal(_np(restored(x)), expected)
    pyramid = keras.Model(restored.input, restored.pyramid_outputs)(x)
    for level in ("P2", "P3", "P4", "P5"):
        np.testing.assert_array_equal(_np(pyramid[level]), _np(expected_pyramid[level]))
    assert restored.count_params() == model.count_params()
    # Shared layers stay shared: one CPE per scale, called by every block.
    assert sum(layer.name == "cpe2" for layer in restored.backbone.layers) == 1

    backbone_path = tmp_path / "backbone.keras"
    model.backbone.save(backbone_path)
    backbone = keras.models.load_model(backbone_path)
    assert type(backbone) is keras_coat.CoaTBackbone
    assert list(backbone.pyramid_outputs) == ["P2", "P3", "P4", "P5"]
    features, expected_features = backbone(x), model.backbone(x)
    assert set(features) == {"P2", "P3", "P4", "P5", *model.backbone.feature_names}
    for key in features:
        np.testing.assert_array_equal(_np(features[key]), _np(expected_features[key]))


def test_weights_h5_roundtrip_and_loading_into_a_headless_model(tmp_path):
    model = keras_coat.CoaT(**TINY_COAT, input_shape=(64, 64, 3), classes=6)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    x = _images(2, 64, 64)

    same = keras_coat.CoaT(**TINY_COAT, input_shape=(64, 64, 3), classes=6, weights=path)
    np.testing.assert_array_equal(_np(same(x)), _np(model(x)))

    backbone = keras_coat.CoaT(**TINY_COAT, input_shape=(64, 64, 3), include_top=False,
                               pooling="token", weights=path)
    full_features = keras.Model(model.input, model.get_layer("aggregate").output)
    np.testing.assert_allclose(_np(backbone(x)), _np(full_features(x)), atol=1e-6)

    other = dict(TINY_COAT, serial_depths=(2, 1, 1, 1))
    with pytest.raises(ValueError, match="another variant"):
        keras_coat.CoaT(**other, input_shape=(64, 64, 3), classes=6, weights=path)


def test_real_variant_roundtrip_through_keras_file(tmp_path):
    model = keras_coat.CoaTTiny(input_shape=(64, 64, 3))
    x = _images(1, 64, 64)
    path = tmp_path / "coat_tiny.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert type(restored) is keras_coat.CoaTImageClassifier
    np.testing.assert_array_equal(_np(restored(x)), _np(model(x)))


def test_public_api():
    names = {
        "load_model", "ImagePreprocessing",
        "CoaT", "CoaTBackbone", "CoaTImageClassifier", "CoaTLiteTiny", "CoaTLiteMini", "CoaTLiteSmall", "CoaTLiteMedium", "CoaTTiny",
        "CoaTMini", "CoaTSmall", "create_model", "MODEL_CONFIGS", "preprocess_input",
        "decode_predictions", "export_saved_model",
    }
    assert names <= set(dir(keras_coat))
    assert "directory" in inspect.signature(keras_coat.export_saved_model).parameters
