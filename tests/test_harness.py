"""Every CoaT model through the shared checks of tests/harness.py on every backend, and each
check failing on a planted defect (so that a check that passes means something)."""

import keras
import numpy as np
import pytest

import keras_coat
from tests import harness
from tests.conftest import TINY_CONFIGS

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

CASES = {case.name: case for case in harness.model_cases()}


@pytest.fixture(scope="module")
def built():
    """`built(case name)`: the case's model, built once; only the latest one is kept, since the
    tests below run case after case."""
    cache = {}

    def model_of(name):
        if name not in cache:
            cache.clear()
            cache[name] = CASES[name].build()
        return cache[name]

    yield model_of
    cache.clear()


@pytest.mark.parametrize("case, check", [(case, check) for case in CASES for check in
                                         harness.CHECKS])
def test_model(case, check, built, tmp_path):
    harness.CHECKS[check](CASES[case], built(case), str(tmp_path))


@pytest.mark.parametrize("variant, size", harness.published_variants(),
                         ids=[f"{v}-{s}" for v, s in harness.published_variants()])
def test_published_variant(variant, size):
    harness.check_published_variant(variant, size)


def test_every_variant_goes_through_the_cheap_checks_and_both_families_the_expensive_ones():
    assert {v for v, _ in harness.published_variants()} == set(keras_coat.MODEL_CONFIGS)
    assert set(CASES) == {"tiny_lite", "tiny_coat", harness.EXPENSIVE_VARIANT}
    assert TINY_CONFIGS["coat"]["parallel_depth"] and not TINY_CONFIGS["lite"].get("parallel_depth")
    assert keras_coat.MODEL_CONFIGS[harness.EXPENSIVE_VARIANT]["parallel_depth"]


# ---------------------------------------------------------------------------------------------
# Each check fails on a planted defect


class _Lookup(keras.layers.Layer):
    """Adds a fixed table: its constructor takes an array, which Keras cannot record, and it has
    no `get_config`."""

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.table = np.asarray(table, "float32")

    def call(self, x):
        return x + self.table


def test_a_layer_without_get_config_fails():
    with pytest.raises(AssertionError, match="_Lookup 'lookup' has no get_config"):
        harness.check_layer(_Lookup(np.zeros(3), name="lookup"))
    inputs = keras.Input((3,))
    model = keras.Model(inputs, _Lookup(np.zeros(3), name="lookup")(inputs))
    with pytest.raises(AssertionError, match="has no get_config"):
        harness.check_layers_serializable(model)


def test_a_layer_whose_config_does_not_rebuild_it_fails():
    class Scaled(keras.layers.Layer):
        """Multiplies by a factor it stores doubled, and reports the stored value."""

        def __init__(self, factor=1.0, **kwargs):
            super().__init__(**kwargs)
            self.factor = 2 * factor

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}

    with pytest.raises(AssertionError, match=r"from_config\(get_config\(\)\) has another config"):
        harness.check_layer(Scaled(3.0))


def test_a_dotted_layer_name_fails():
    model = CASES["tiny_lite"].build()
    harness.check_layer_names(model)
    model.backbone.get_layer("cpe2").name = "cpe.2"
    with pytest.raises(AssertionError, match=r"layer names not of the form .*\['cpe\.2'\]"):
        harness.check_layer_names(model)


@keras.saving.register_keras_serializable(package="planted")
class _ForgetfulClassifier(keras_coat.CoaTImageClassifier):
    """A classifier whose config leaves out its class names."""

    def get_config(self):
        config = super().get_config()
        config.pop("class_names")
        return config


def _forgetful():
    model = CASES["tiny_lite"].build()
    return _ForgetfulClassifier(
        model.backbone, num_classes=model.num_classes, class_names=model.class_names,
        preprocessing=model.preprocessing,
    )


def test_a_head_that_loses_its_class_names_fails(tmp_path):
    model = _forgetful()
    images = CASES["tiny_lite"].images()
    with pytest.raises(AssertionError, match=r"class_names None != \['class 0'"):
        harness.check_config_round_trip(model, images)
    with pytest.raises(AssertionError, match=r"class_names None != \['class 0'"):
        harness.check_keras_file_round_trip(model, images, str(tmp_path))


def test_a_pyramid_at_the_wrong_stride_fails():
    case = CASES["tiny_lite"]
    model = case.build()
    harness.check_pyramid(model, case.images(), case.embed_dims)
    # P3 taken from the stride-16 stage.
    wrong = {**model.backbone.pyramid_outputs, "P3": model.backbone.pyramid_outputs["P4"]}
    object.__setattr__(model.backbone, "_pyramid_outputs", wrong)
    with pytest.raises(AssertionError, match=r"pyramid .*'P3': \(4, 6, 24\).* expected .*'P3': "
                                             r"\(8, 12, 16\)"):
        harness.check_pyramid(model, case.images(), case.embed_dims)


class _KerasQuantize(keras_coat.CoaTImageClassifier):
    """A classifier quantized by Keras' own `Model.quantize`, which tries every layer."""

    quantize = keras.Model.quantize


def test_quantization_that_warns_fails():
    model = CASES["tiny_lite"].build()
    planted = _KerasQuantize(model.backbone, num_classes=model.num_classes)
    with pytest.raises(AssertionError, match=r"quantize\(\"int8\"\) warned: .*does not have a "
                                             r"`quantize` method"):
        harness.check_int8_quantization(planted, CASES["tiny_lite"].images())


def test_a_wrong_parameter_count_fails():
    model = CASES["tiny_lite"].build()
    with pytest.raises(AssertionError, match="the reference has 1$"):
        harness.check_parameter_count(model, 1)
