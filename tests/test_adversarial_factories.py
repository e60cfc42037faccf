"""Bad factory arguments and bad weights files given to the factories (keras_coat.applications).

Every case is a ValueError (or the package's subclass of it) naming the argument or the file,
before anything half-built escapes; the next good call works.
"""

import os

import h5py
import numpy as np
import pytest

import keras_coat
from keras_coat.checkpoint import CheckpointError, UnsafeCheckpointError
from keras_coat.convert import ConversionError
from tests._weights_fixtures import Hostile

pytestmark = pytest.mark.adversarial

BAD_INPUT_SHAPES = {
    "float_side": ((64.5, 64, 3), "must hold ints"),
    "float_channels": ((64, 64, 3.0), "must hold ints"),
    "bool_side": ((True, 64, 3), "must hold ints"),
    "bool_channels": ((64, 64, True), "must hold ints"),
    "an_int": (64, "must be a (height, width, channels) tuple"),
    "a_string": ("64", "must be a (height, width, channels) tuple"),
    "a_dict": ({"h": 64}, "must be a (height, width, channels) tuple"),
    "two_dims": ((64, 64), "fully defined"),
    "unknown_side": ((None, 64, 3), "fully defined"),
    "negative_side": ((-64, 64, 3), "positive multiples of 32"),
    "zero_side": ((0, 64, 3), "positive multiples of 32"),
    "not_multiple_of_32": ((100, 64, 3), "positive multiples of 32"),
    "zero_channels": ((64, 64, 0), "channels"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT_SHAPES))
def test_bad_input_shape_is_a_clear_value_error(name):
    shape, message = BAD_INPUT_SHAPES[name]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        keras_coat.create_model("coat_lite_tiny", input_shape=shape)


CLASSES_MESSAGE = r"`classes` in the factories\) must be a positive integer"
BAD_OTHER_ARGUMENTS = {
    "float_classes": (dict(classes=10.5), CLASSES_MESSAGE),
    "bool_classes": (dict(classes=True), CLASSES_MESSAGE),
    "zero_classes": (dict(classes=0), CLASSES_MESSAGE),
    "nan_drop_path": (dict(drop_path_rate=float("nan")), "drop_path_rate"),
    "unknown_pooling": (dict(include_top=False, pooling="median"), "pooling"),
}


@pytest.mark.parametrize("name", sorted(BAD_OTHER_ARGUMENTS))
def test_bad_arguments_are_clear_value_errors(name):
    kwargs, message = BAD_OTHER_ARGUMENTS[name]
    with pytest.raises(ValueError, match=message):
        keras_coat.create_model("coat_lite_tiny", input_shape=(32, 32, 3), **kwargs)


def _garbage(path, good):
    path.write_bytes(b"\x00garbage" * 100)


def _empty(path, good):
    path.write_bytes(b"")


def _truncated_hdf5(path, good):
    path.write_bytes(good.read_bytes()[:2000])


def _hdf5_of_other_arrays(path, good):
    with h5py.File(path, "w") as f:
        f["layers/dense/vars/0"] = np.zeros((7, 7), np.float32)


def _hdf5_of_another_variant(path, good):
    # coat_tiny's arrays: other shapes and counts than coat_lite_tiny's.
    with h5py.File(good.parent / "coat_tiny.weights.h5", "r") as source, h5py.File(path, "w") as f:
        for key in source:
            source.copy(source[key], f, name=key)


def _a_folder(path, good):
    path.mkdir()


BAD_WEIGHTS = {
    # name: (writer, expected error type, fragment)
    "garbage": (_garbage, OSError, "Cannot read the weights file"),
    "empty": (_empty, OSError, "Cannot read the weights file"),
    "truncated_hdf5": (_truncated_hdf5, OSError, "Cannot read the weights file"),
    "hdf5_of_other_arrays": (_hdf5_of_other_arrays, ConversionError, "does not fit"),
    "hdf5_of_another_variant": (_hdf5_of_another_variant, ConversionError, "does not fit"),
    "a_folder": (_a_folder, (OSError, ValueError), ""),
}


@pytest.fixture(scope="module")
def good_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    keras_coat.create_model("coat_tiny", input_shape=(32, 32, 3)).save_weights(
        str(folder / "coat_tiny.weights.h5")
    )
    model = keras_coat.create_model("coat_lite_tiny", input_shape=(32, 32, 3))
    path = folder / "good.weights.h5"
    model.save_weights(str(path))
    return model, path


@pytest.mark.parametrize("name", sorted(BAD_WEIGHTS))
def test_bad_weights_file_names_the_file_and_leaves_the_model_as_it_was(
    name, good_weights, tmp_path
):
    """What the factories run after building the model (`weights=` a path)."""
    from keras_coat.loader import load_weights_file as load_weights

    model, good = good_weights
    before = model.get_weights()
    writer, error, fragment = BAD_WEIGHTS[name]
    path = tmp_path / "bad.weights.h5"
    writer(path, good)
    with pytest.raises(error) as info:
        load_weights(model, str(path))
    assert str(path) in str(info.value) and fragment in str(info.value), str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["bad.weights.h5"]  # nothing written beside it
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_factory_names_a_garbage_file_then_loads_a_good_one(good_weights, tmp_path):
    model, good = good_weights
    path = tmp_path / "bad.weights.h5"
    _garbage(path, good)
    with pytest.raises(OSError, match=f"Cannot read the weights file '{path}'"):
        keras_coat.create_model("coat_lite_tiny", input_shape=(32, 32, 3), weights=str(path))
    loaded = keras_coat.create_model("coat_lite_tiny", input_shape=(32, 32, 3), weights=str(good))
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_malicious_pth_runs_nothing(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "x": Hostile(f"touch {marker}")}, evil)
    with pytest.raises(UnsafeCheckpointError) as info:
        keras_coat.create_model("coat_lite_tiny", input_shape=(32, 32, 3), weights=str(evil))
    assert isinstance(info.value, CheckpointError) and str(evil) in str(info.value)
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["evil.pth"]
