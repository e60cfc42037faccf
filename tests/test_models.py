"""The public model API: factories, argument validation, outputs, pooling, training.

What every model must do (build, call, names, configs, pyramid, saving, mixed precision,
quantization) is checked for every variant by tests/test_harness.py; parity with the reference
is in test_parity.py. These tests need no PyTorch.
"""

import inspect

import keras
import numpy as np
import pytest

import keras_coat
from keras_coat.imagenet import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import TINY_COAT, TINY_LITE, pixels, to_numpy

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

FACTORIES = [
    keras_coat.CoaTLiteTiny, keras_coat.CoaTLiteMini, keras_coat.CoaTLiteSmall,
    keras_coat.CoaTLiteMedium, keras_coat.CoaTTiny, keras_coat.CoaTMini, keras_coat.CoaTSmall,
]


def test_factories_share_the_keras_applications_signature():
    expected = [
        "include_top", "weights", "input_tensor", "input_shape", "pooling", "classes",
        "classifier_activation", "include_preprocessing", "drop_path_rate", "name",
    ]
    for factory in FACTORIES:
        assert list(inspect.signature(factory).parameters) == expected
        assert "include_preprocessing" in factory.__doc__ and "pyramid_outputs" in factory.__doc__


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 64)])
def test_any_multiple_of_32_works_with_the_head(tiny_config, size):
    model = keras_coat.CoaT(**tiny_config, input_shape=(*size, 3), classes=7)
    probs = to_numpy(model(pixels(2, *size)))
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
    images = pixels(2, 64, 64)
    normalized = (images / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(
        to_numpy(with_pre(images)), to_numpy(without(normalized.astype("float32"))), atol=1e-5
    )
    np.testing.assert_allclose(
        to_numpy(keras.layers.Normalization(
            mean=[255 * m for m in IMAGENET_MEAN],
            variance=[(255 * s) ** 2 for s in IMAGENET_STD],
        )(images)),
        normalized,
        atol=1e-5,
    )


def test_classifier_activation_none_returns_logits():
    probs_model = keras_coat.CoaT(**TINY_LITE, input_shape=(64, 64, 3), classes=4)
    logits_model = keras_coat.CoaT(
        **TINY_LITE, input_shape=(64, 64, 3), classes=4, classifier_activation=None
    )
    logits_model.set_weights(probs_model.get_weights())
    x = pixels(3, 64, 64)
    logits = to_numpy(logits_model(x))
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(to_numpy(probs_model(x)), expected, atol=1e-6)


def test_predict_in_batches_gives_what_predict_gives_and_calls_few_batches_eagerly():
    from keras_coat.image_classifier import EAGER_BATCHES, predict_in_batches

    # Batches of 2 throughout: on JAX every batch shape is one more compilation.
    model = keras_coat.CoaT(**TINY_LITE, input_shape=(64, 64, 3), classes=4)
    few, many = pixels(4, 64, 64), pixels(2 * (EAGER_BATCHES + 1), 64, 64, seed=1)
    few_batches = list(predict_in_batches(model, list(few), batch_size=2))
    assert [len(b) for b in few_batches] == [2, 2]
    # A few batches on TensorFlow: eagerly, with no `predict` function traced.
    assert (model.predict_function is None) == (keras.config.backend() == "tensorflow")
    many_batches = list(predict_in_batches(model, list(many), batch_size=2))
    assert [len(b) for b in many_batches] == [2] * (EAGER_BATCHES + 1)
    assert model.predict_function is not None  # more batches: through `predict`
    for batches, images in ((few_batches, few), (many_batches, many)):
        np.testing.assert_allclose(np.concatenate(batches),
                                   model.predict(images, batch_size=2, verbose=0), atol=1e-5)


def test_headless_outputs_and_pooling(tiny_config):
    size = (64, 96)
    final_dim = tiny_config["embed_dims"][-1]
    expected = {None: (2, 2, 3, final_dim), "avg": (2, final_dim), "max": (2, final_dim),
                "token": (2, final_dim)}
    outputs, reference = {}, None
    for pooling, shape in expected.items():
        model = keras_coat.CoaT(**tiny_config, input_shape=(*size, 3), include_top=False,
                                pooling=pooling)
        if reference is None:
            reference = model
        elif not tiny_config.get("parallel_depth"):
            model.set_weights(reference.get_weights())
        outputs[pooling] = to_numpy(model(pixels(2, *size)))
        assert outputs[pooling].shape == shape
    if not tiny_config.get("parallel_depth"):
        # CoaT-Lite: pooled features are those of the final (normalized) feature map.
        np.testing.assert_allclose(outputs["avg"], outputs[None].mean((1, 2)), atol=1e-5)
        np.testing.assert_allclose(outputs["max"], outputs[None].max((1, 2)), atol=1e-5)


def test_fit_trains_from_the_first_layer_to_the_head_with_stochastic_depth(tiny_config):
    model = keras_coat.CoaT(**tiny_config, input_shape=(64, 64, 3), classes=3, drop_path_rate=0.2)
    # Momentum: slot variables, which Keras may create within the first trace.
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="sparse_categorical_crossentropy")
    # Gradients reach the first layer through every stage, and the last stage's position
    # encodings (CPE via the image tokens the class token attends to).
    watched = ("patch_embed1/proj/kernel", "cpe4/proj/kernel", "head/kernel")
    variables = {w.path: w for w in model.trainable_weights}
    before = {path: to_numpy(variables[path]).copy() for path in watched}
    labels = np.array([0, 1, 2, 1, 0, 2, 1, 0])
    # One step, whose function is traced once: on TensorFlow an optimizer built inside the
    # first trace made it trace twice (`CoaTImageClassifier.fit`).
    traces = []
    train_step = model.train_step
    model.train_step = lambda *args: traces.append(1) or train_step(*args)
    history = model.fit(pixels(8, 64, 64), labels, batch_size=8, verbose=0)
    assert len(traces) == 1, f"the training step ran in Python {len(traces)} times"
    assert np.isfinite(history.history["loss"][0])
    for path in watched:
        assert not np.array_equal(to_numpy(variables[path]), before[path]), path


def test_drop_path_is_stochastic_in_training_only():
    model = keras_coat.CoaT(**TINY_COAT, input_shape=(64, 64, 3), drop_path_rate=0.5,
                            classifier_activation=None)
    x = pixels(4, 64, 64)
    np.testing.assert_array_equal(to_numpy(model(x)), to_numpy(model(x)))
    assert not np.allclose(to_numpy(model(x, training=True)), to_numpy(model(x, training=True)))


def test_public_api():
    names = {
        "load_model", "ImagePreprocessing",
        "CoaT", "CoaTBackbone", "CoaTImageClassifier", "CoaTLiteTiny", "CoaTLiteMini", "CoaTLiteSmall", "CoaTLiteMedium", "CoaTTiny",
        "CoaTMini", "CoaTSmall", "create_model", "MODEL_CONFIGS", "preprocess_input",
        "decode_predictions", "export_saved_model",
    }
    assert names <= set(dir(keras_coat))
    assert "directory" in inspect.signature(keras_coat.export_saved_model).parameters
