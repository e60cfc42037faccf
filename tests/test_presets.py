"""Presets: the table of published checkpoints, preset directories (KerasHub's layout) written
atomically and read strictly, and a built-in name end to end (every kind of reference on every
backend: tests/test_resolve.py)."""

import dataclasses
import json
import os
import shutil

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_coat
from keras_coat import preset_io, presets, weights
from keras_coat.backbone import VARIANTS
from keras_coat.presets import ImagePreprocessing, PresetError
from keras_coat.utils.files import sha256
from tests.conftest import pixels, to_numpy

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPAT = os.path.join(REPO_ROOT, "tests", "data", "compat_0_1")
TINY = {"embed_dims": (16, 32, 32, 32), "serial_depths": (1, 1, 1, 1), "mlp_ratios": (2, 2, 2, 2)}
SIZE = 64


def _classifier(parallel_depth=0, num_classes=3):
    backbone = keras_coat.CoaTBackbone(
        **TINY, parallel_depth=parallel_depth, image_shape=(SIZE, SIZE, 3)
    )
    return keras_coat.CoaTImageClassifier(
        backbone,
        num_classes=num_classes,
        class_names=[f"class{i}" for i in range(num_classes)],
        preprocessing=ImagePreprocessing(image_size=(SIZE, SIZE), crop_pct=0.9,
                                         interpolation="bilinear"),
    )


@pytest.fixture(scope="module", params=[0, 2], ids=["lite", "coat"])
def saved_preset(request, tmp_path_factory):
    model = _classifier(request.param)
    folder = str(tmp_path_factory.mktemp("preset") / "tiny")
    model.save_to_preset(folder)
    return model, folder


# ------------------------------------------------------------------------------- the table


def test_one_preset_per_published_checkpoint_with_the_authors_evaluation():
    assert len(presets.PRESETS) == 8
    assert set(keras_coat.CoaTImageClassifier.presets) == set(presets.PRESETS)
    assert keras_coat.CoaTBackbone.presets is presets.PRESETS
    for name, preset in presets.PRESETS.items():
        assert preset.variant in VARIANTS and preset.url.endswith(".pth")
        assert len(preset.sha256) >= 8 and preset.sha256 in preset.url
        # The authors' rule at every size: resize the shorter side to size * 256 / 224.
        assert preset.preprocessing.crop_pct == 224 / 256
        assert preset.preprocessing.interpolation == "bicubic"
        assert weights.CHECKPOINTS[name].url == preset.url
    assert presets.PRESETS["coat_lite_medium_384"].preprocessing.image_size == (384, 384)
    assert presets.checkpoint_for("coat_lite_medium", (384, 384)).name == "coat_lite_medium_384"
    assert presets.checkpoint_for("coat_lite_medium", (256, 320)).name == "coat_lite_medium"
    assert presets.PRESETS["coat_lite_tiny"].max_download_bytes == 16 * 5_721_960 + 64 * 2**20


@pytest.mark.parametrize(
    "config, message",
    [
        ({"image_size": (0, 224)}, "image_size"),
        ({"crop_pct": 1.5}, "crop_pct"),
        ({"interpolation": "lanczos9"}, "interpolation"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"std": (0.2, float("nan"), 0.2)}, "finite"),
    ],
)
def test_image_preprocessing_is_validated(config, message):
    with pytest.raises(ValueError, match=message):
        ImagePreprocessing(**config)


def test_unknown_names_list_the_built_in_presets():
    with pytest.raises(PresetError, match="coat_lite_tiny"):
        keras_coat.CoaTImageClassifier.from_preset("coat_huge")


# ------------------------------------------------------------------------ directories


def test_preset_directory_has_keras_hub_file_names(saved_preset):
    _, folder = saved_preset
    files = set(os.listdir(folder))
    assert {"config.json", "model.weights.h5", "task.json", "image_converter.json",
            "metadata.json"} <= files
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["registered_name"] == "keras_coat>CoaTBackbone"
    with open(os.path.join(folder, "image_converter.json")) as f:
        assert json.load(f)["crop_pct"] == 0.9
    with open(os.path.join(folder, "metadata.json")) as f:
        metadata = json.load(f)
    # The release that wrote it (also when run from a source tree), and every file's digest.
    assert metadata["keras_coat_version"] == keras_coat.__version__ == "0.2.0"
    assert set(metadata["files"]) == files - {"metadata.json"}
    for name, digest in metadata["files"].items():
        assert sha256(os.path.join(folder, name)) == digest
    assert not [name for name in os.listdir(os.path.dirname(folder)) if name.startswith(".")]


def test_preset_round_trip_keeps_outputs_preprocessing_and_class_names(saved_preset):
    model, folder = saved_preset
    restored = keras_coat.CoaTImageClassifier.from_preset(folder)
    np.testing.assert_array_equal(to_numpy(restored(pixels(2, SIZE))), to_numpy(model(pixels(2, SIZE))))
    assert restored.preprocessing == model.preprocessing
    assert restored.class_names == model.class_names
    backbone = keras_coat.CoaTBackbone.from_preset(folder)
    for got, expected in zip(backbone.weights, model.backbone.weights):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(expected))


def test_a_new_head_or_none_on_pretrained_features_without_a_second_model(saved_preset):
    model, folder = saved_preset
    headless = keras_coat.CoaTImageClassifier.from_preset(folder, num_classes=None, pooling="avg")
    assert headless(pixels(2, SIZE)).shape == (2, 32)
    fresh = keras_coat.CoaTImageClassifier.from_preset(folder, num_classes=5)
    assert fresh(pixels(2, SIZE)).shape == (2, 5) and fresh.class_names is None
    for got, expected in zip(fresh.backbone.weights, model.backbone.weights):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(expected))
    # The backbone is built without drawing (its values come from the preset); the new head is
    # drawn as timm draws it (truncated normal, std 0.02).
    assert 0.015 < to_numpy(fresh.get_layer("head").kernel).std() < 0.025
    swapped = model.with_new_head(4)
    assert swapped.backbone is model.backbone and swapped(pixels(2, SIZE)).shape == (2, 4)
    # A headless model reads a classifier's .weights.h5 as it is.
    path = os.path.join(os.path.dirname(folder), "classifier.weights.h5")
    model.save_weights(path)
    keras_coat.loading.load_keras_weights(headless, path)


def test_saving_over_a_preset_replaces_it_and_other_folders_are_refused(tmp_path):
    model = _classifier()
    folder = tmp_path / "preset"
    model.save_to_preset(folder)
    model.save_to_preset(folder)
    assert sorted(os.listdir(tmp_path)) == ["preset"]
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(PresetError, match="not a preset directory"):
        model.save_to_preset(other)
    assert os.listdir(other) == ["cat.jpg"]


def test_a_failed_write_leaves_the_old_preset_and_no_temporary(tmp_path, monkeypatch):
    model = _classifier()
    folder = tmp_path / "preset"
    model.save_to_preset(folder)
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(preset_io, "publish_directory", crash)
    with pytest.raises(OSError, match="disk full"):
        model.with_new_head(2).save_to_preset(folder)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert sorted(os.listdir(tmp_path)) == ["preset"]


# ------------------------------------------------------------------- hostile directories


@pytest.fixture
def copy_of(saved_preset, tmp_path):
    def copy():
        target = tmp_path / "copy"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(saved_preset[1], target)
        return target

    return copy


def _edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _edit_backbone(folder, **changes):
    """The same change to config.json and to the backbone inside task.json."""
    _edit_json(folder / "config.json", lambda c: c["config"].update(changes))
    _edit_json(folder / "task.json", lambda c: c["config"]["backbone"]["config"].update(changes))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: os.remove(d / "config.json"), "has no config.json"),
        (lambda d: os.remove(d / "model.weights.h5"), "has no model.weights.h5"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text("[1, 2]"), "JSON object"),
        (lambda d: (d / "config.json").write_text('{"a": NaN}'), "non-finite"),
        (lambda d: (d / "config.json").write_bytes(b" " * (5 * 2**20)), "more than"),
        (lambda d: _edit_json(d / "config.json", lambda c: c.update(
            registered_name="keras.layers>Lambda", class_name="Lambda")), "Only keras_coat"),
        (lambda d: _edit_json(d / "config.json", lambda c: c["config"].update(
            function="os.system")), "unknown config fields"),
        (lambda d: _edit_backbone(d, embed_dims=[16, 32, 32]), "one entry per stage"),
        (lambda d: _edit_backbone(d, embed_dims=[16, 64, 64, 64]), "does not fit"),
        (lambda d: _edit_json(d / "task.json", lambda c: c["config"].update(
            num_classes=7, class_names=None)), "does not fit"),
        (lambda d: _edit_json(d / "task.json", lambda c: c["config"]["backbone"][
            "config"].update(num_heads=4)), "differs from config.json"),
        (lambda d: _edit_json(d / "image_converter.json", lambda c: c.update(
            crop_pct=3)), "crop_pct"),
        (lambda d: _edit_json(d / "image_converter.json", lambda c: c.update(
            extra=1)), "exactly the fields"),
        (lambda d: (d / "model.weights.h5").write_bytes(
            (d / "model.weights.h5").read_bytes()[:5000]), "unreadable"),
        (lambda d: (d / "model.weights.h5").write_bytes(b"not hdf5"), "unreadable"),
    ],
    ids=[
        "no-config", "no-weights", "bad-json", "json-list", "nan", "oversized", "foreign-class",
        "unknown-field", "bad-architecture", "wrong-shapes", "wrong-head", "task-mismatch",
        "bad-converter", "converter-extra", "truncated-weights", "not-hdf5",
    ],
)
def test_a_damaged_or_hostile_preset_is_refused_with_the_reason(copy_of, damage, message):
    folder = copy_of()
    damage(folder)
    with pytest.raises(PresetError, match=message):
        keras_coat.CoaTImageClassifier.from_preset(str(folder))


def test_a_symlink_out_of_the_preset_is_refused(copy_of, tmp_path):
    folder = copy_of()
    outside = tmp_path / "outside.h5"
    shutil.copy(folder / "model.weights.h5", outside)
    os.remove(folder / "model.weights.h5")
    os.symlink(outside, folder / "model.weights.h5")
    with pytest.raises(PresetError, match="outside the preset directory"):
        keras_coat.CoaTBackbone.from_preset(str(folder))


def test_weights_arrays_of_another_shape_are_named(copy_of):
    folder = copy_of()
    with h5py.File(folder / "model.weights.h5", "r+") as f:
        name = "layers/class_token/vars/0"
        del f[name]
        f[name] = np.zeros((1, 1, 8), "float32")
    with pytest.raises(PresetError, match="class_token"):
        keras_coat.CoaTBackbone.from_preset(str(folder))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
_FIELDS = sorted(preset_io.BACKBONE_FIELDS - {"dtype", "name", "trainable"})


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(field=st.sampled_from(_FIELDS), value=_JSON)
def test_fuzzed_config_json_fails_only_with_preset_errors(copy_of, field, value):
    folder = copy_of()
    _edit_json(folder / "config.json", lambda c: c["config"].update({field: value}))
    try:
        keras_coat.CoaTBackbone.from_preset(str(folder), load_weights=False)
    except PresetError:
        pass


# ----------------------------------------------------------------------- a built-in name


@pytest.fixture
def offline_coat_lite_tiny(tmp_path, monkeypatch):
    """KERAS_HOME holding keras-coat 0.1's cache entry of coat_lite_tiny; no network."""
    cache = tmp_path / "models" / "keras_coat"
    cache.mkdir(parents=True)
    for name in os.listdir(os.path.join(COMPAT, "cache")):
        shutil.copy(os.path.join(COMPAT, "cache", name), cache / name)
    manifest = tmp_path / "manifest.json"
    entry = weights.CHECKPOINTS["coat_lite_tiny"]
    manifest.write_text(json.dumps({"coat_lite_tiny": {
        "url": "http://127.0.0.1:9/coat_lite_tiny.pth", "sha256": entry.sha256}}))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setenv(weights.MANIFEST_ENV, str(manifest))


def test_a_built_in_name_loads_from_the_cache_with_its_preprocessing(
    offline_coat_lite_tiny, tmp_path
):
    model = keras_coat.CoaTImageClassifier.from_preset("coat_lite_tiny", image_shape=(64, 64, 3))
    expected = np.load(os.path.join(COMPAT, "outputs.npz"))
    np.testing.assert_allclose(
        to_numpy(model(expected["images"])), expected["cache_coat_lite_tiny_64"], atol=1e-6, rtol=0
    )
    assert len(model.class_names) == 1000 and model.class_names[0] == "tench"
    assert model.preprocessing.image_size == (64, 64)
    assert model.preprocessing.crop_pct == 224 / 256
    out = tmp_path / "published"
    model.save_to_preset(out)
    again = keras_coat.CoaTImageClassifier.from_preset(str(out))
    np.testing.assert_array_equal(to_numpy(again(expected["images"])), to_numpy(model(expected["images"])))


def test_training_starts_a_new_label_set_from_the_preset_features(offline_coat_lite_tiny):
    from training import recipes, train

    recipe = dataclasses.replace(
        recipes.get_recipe("demo"), model="coat_lite_tiny", image_size=64,
        init_weights="imagenet", drop_path=0.1,
    )
    model = train.build_model(recipe, 10)
    pretrained = keras_coat.CoaTBackbone.from_preset("coat_lite_tiny", image_shape=(64, 64, 3))
    for got, expected in zip(model.backbone.weights, pretrained.weights):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(expected))
    assert model.output_shape == (None, 10) and model.backbone.drop_path_rate == 0.1


def test_the_version_has_one_source():
    import tomllib

    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "keras_coat.version.__version__"}
    assert keras_coat.__version__ == keras_coat.version.__version__ == "0.2.0"
