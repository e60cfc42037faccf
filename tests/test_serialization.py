"""`.weights.h5` files between classifiers, headless models and backbones: what loads, what is
refused (naming the file, silently otherwise, the model unchanged), and the package without
KerasHub. The `.keras`, `.weights.h5` and preset round trips of every kind of model are the
harness's (tests/test_harness.py).
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_coat
from keras_coat.convert import ConversionError
from keras_coat.loading import load_keras_weights
from tests._weights_fixtures import import_blocker
from tests.conftest import REPO_ROOT, TINY_COAT, TINY_LITE, pixels, subprocess_env, to_numpy
from tests.harness import Silence

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")
SIZE = 32


@pytest.fixture(scope="module", params=[TINY_LITE, TINY_COAT], ids=["lite", "coat"])
def saved_classifier(request, tmp_path_factory):
    config = request.param
    model = keras_coat.CoaT(**config, input_shape=(SIZE, SIZE, 3), classes=6)
    path = str(tmp_path_factory.mktemp("weights") / "classifier.weights.h5")
    model.save_weights(path)
    return config, model, path


@pytest.mark.parametrize("pooling", [None, "token", "avg"])  # "max" builds as "avg" does
def test_backbones_load_their_classifiers_weights_file(saved_classifier, pooling):
    config, classifier, path = saved_classifier
    with Silence() as quiet:
        backbone = keras_coat.CoaT(**config, input_shape=(SIZE, SIZE, 3), include_top=False,
                                   pooling=pooling, weights=path)
    quiet.assert_silent("loading the weights")
    # The headless model is the classifier's own backbone (and pooling): the same weights.
    _assert_same_weights(backbone.backbone, classifier.backbone)
    if pooling is not None and config.get("parallel_depth"):
        _assert_same_weights(backbone.get_layer("aggregate"), classifier.get_layer("aggregate"))
    expected = to_numpy(backbone(pixels(2, SIZE)))

    # And a headless model's own file loads into a headless model of the same pooling, and the
    # bare backbone reads both.
    own = os.path.join(os.path.dirname(path), f"backbone-{pooling}.weights.h5")
    backbone.save_weights(own)
    again = keras_coat.CoaT(**config, input_shape=(SIZE, SIZE, 3), include_top=False,
                            pooling=pooling, weights=own)
    np.testing.assert_array_equal(to_numpy(again(pixels(2, SIZE))), expected)
    for source in (path, own):
        bare = keras_coat.CoaTBackbone(**config, image_shape=(SIZE, SIZE, 3))
        load_keras_weights(bare, source)
        _assert_same_weights(bare, classifier.backbone)


def _assert_same_weights(model, reference):
    assert len(model.weights) == len(reference.weights)
    for got, expected in zip(model.weights, reference.weights):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(expected))


@pytest.mark.parametrize(
    "changes",
    [
        dict(embed_dims=(32, 32, 32, 32)),  # wider: shapes the file lacks
        dict(serial_depths=(2, 1, 1, 1)),  # deeper: more arrays than the file has
        dict(serial_depths=(1, 1, 1, 1), classes=7),  # another head
        dict(include_top=False, pooling=None, serial_depths=(1, 2, 1, 1)),
    ],
    ids=["wider", "deeper", "classes", "headless-deeper"],
)
def test_weights_file_of_another_model_is_refused_before_keras_warns(
    saved_classifier, changes
):
    config, _, path = saved_classifier
    kwargs = {"input_shape": (SIZE, SIZE, 3), "classes": 6, **config, **changes}
    with Silence() as quiet:
        with pytest.raises(ConversionError, match="another variant") as info:
            keras_coat.CoaT(**kwargs, weights=path)
    quiet.assert_silent("loading the weights")
    assert path in str(info.value)


def test_a_shallower_model_is_refused_and_keeps_its_weights(tmp_path):
    deep = keras_coat.CoaT(**dict(TINY_COAT, serial_depths=(2, 1, 1, 1)),
                           input_shape=(SIZE, SIZE, 3), classes=6)
    path = str(tmp_path / "deep.weights.h5")
    deep.save_weights(path)
    from keras_coat.loader import load_weights_file

    shallow = keras_coat.CoaT(**TINY_COAT, input_shape=(SIZE, SIZE, 3), classes=6)
    before = [w.copy() for w in shallow.get_weights()]
    with Silence() as quiet:
        with pytest.raises(ConversionError, match="another variant"):
            load_weights_file(shallow, path)
    quiet.assert_silent("loading the weights")
    for old, new in zip(before, shallow.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_a_backbone_file_does_not_fill_a_classifier(tmp_path):
    backbone = keras_coat.CoaT(**TINY_LITE, input_shape=(SIZE, SIZE, 3), include_top=False)
    path = str(tmp_path / "backbone.weights.h5")
    backbone.save_weights(path)
    with pytest.raises(ConversionError, match=r"lacks .*\(32, 6\)"):
        keras_coat.CoaT(**TINY_LITE, input_shape=(SIZE, SIZE, 3), classes=6, weights=path)


def test_classifier_holds_a_backbone_and_checks_its_head():
    backbone = keras_coat.CoaTBackbone(**TINY_LITE, image_shape=(SIZE, SIZE, 3))
    with pytest.raises(ValueError, match="headless"):
        keras_coat.CoaTImageClassifier(backbone, num_classes=3, pooling=None)
    with pytest.raises(ValueError, match="pooling"):
        keras_coat.CoaTImageClassifier(backbone, num_classes=3, pooling="sum")
    with pytest.raises(ValueError, match="2 names for num_classes=3"):
        keras_coat.CoaTImageClassifier(backbone, num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="CoaTBackbone"):
        keras_coat.CoaTImageClassifier(keras.Sequential([keras.Input((4,))]), num_classes=3)


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_the_package_works_without_keras_hub(tmp_path):
    program = import_blocker("keras_hub") + textwrap.dedent(f"""
        import keras
        import numpy as np
        import keras_coat

        model = keras_coat.CoaTLiteTiny(input_shape=(32, 32, 3), include_top=False)
        model.save({str(tmp_path / "backbone.keras")!r})
        restored = keras.models.load_model({str(tmp_path / "backbone.keras")!r})
        x = np.zeros((1, 32, 32, 3), "float32")
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(restored(x)), keras.ops.convert_to_numpy(model(x))
        )
        assert sorted(restored.pyramid_outputs) == ["P2", "P3", "P4", "P5"]
        assert not any(name.startswith("keras_hub") for name in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            env=subprocess_env(), cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
