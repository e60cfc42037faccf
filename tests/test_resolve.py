"""Every kind of preset reference through every entry point (`keras_coat.loader`).

References: a built-in name served from a loopback server through KERAS_COAT_WEIGHTS_MANIFEST (a
perturbed timm coat_lite_tiny in the authors' checkpoint layout), a preset directory, a `.keras`
file and a hub handle (through the loader's seam to `keras_coat.hub`, which returns a snapshot
directory; keras_coat.hub's own tests serve real hub repos). Entry points: `from_preset` of both
classes, the factories' `weights=`, `keras_coat.load_model`, `python -m keras_coat predict`,
`export` and `info --model`, and `training.train --init-weights`; on TensorFlow in this
process, on JAX and PyTorch in a subprocess each. Then bad references: one clear error each, and
nothing left in the weights cache.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import keras_coat
from keras_coat import loader, weights
from keras_coat.__main__ import main as cli
from keras_coat.presets import ImagePreprocessing, PresetError
from tests._weights_fixtures import (
    REPO_ROOT,
    FileServer,
    save_authors_checkpoint,
    sha256_of,
    write_manifest,
)
from tests.conftest import to_numpy
from tests.reference import timm_model

torch = pytest.importorskip("torch")

TINY = {"embed_dims": (16, 32, 32, 32), "serial_depths": (1, 1, 1, 1), "mlp_ratios": (2, 2, 2, 2),
        "parallel_depth": 2}
NAMES = ["daisy", "rose", "tulip"]
HANDLE = "hf://keras-coat-tests/flowers@main"
KINDS = ["builtin", "directory", "keras", "hub"]


@dataclasses.dataclass
class Reference:
    reference: str
    size: int
    classes: int
    names: list
    images: np.ndarray  # pixels in [0, 255]
    expected: np.ndarray  # the source model's probabilities on `images`
    tolerance: float


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The four references, the manifest and KERAS_HOME in force, the hub seam patched."""
    root = tmp_path_factory.mktemp("references")
    rng = np.random.default_rng(0)
    small = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    model = keras_coat.CoaTImageClassifier(
        keras_coat.CoaTBackbone(**TINY, image_shape=(64, 64, 3)), num_classes=3,
        class_names=NAMES, preprocessing=ImagePreprocessing((64, 64), crop_pct=0.9),
    )
    model.get_layer("aggregate").set_weights([np.array([0.2, 0.3, 0.5], "float32"),
                                              np.array([0.1], "float32")])
    model.save_to_preset(root / "preset")
    model.save(root / "model.keras")
    shutil.copytree(root / "preset", root / "hub_snapshot")
    tiny = dict(size=64, classes=3, names=NAMES, images=small, expected=to_numpy(model(small)),
                tolerance=1e-6)

    reference = timm_model("coat_lite_tiny", seed=2)
    checkpoint = save_authors_checkpoint(reference, root / "coat_lite_tiny.pth")
    large = rng.uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    with torch.no_grad():
        normalized = keras_coat.preprocess_input(large).transpose(0, 3, 1, 2)
        expected = reference(torch.from_numpy(normalized)).softmax(-1).numpy()
    from keras_coat.imagenet import class_names

    hub_calls = []

    def hub_download(handle):
        hub_calls.append(handle)
        if handle != HANDLE:
            raise PresetError(f"{handle!r}: no such repo (the test hub knows only {HANDLE}).")
        return str(root / "hub_snapshot")

    with FileServer() as server, pytest.MonkeyPatch.context() as patch:
        url = server.serve("/pretrained/coat_lite_tiny.pth", checkpoint)
        manifest = write_manifest(root / "manifest.json", {
            "coat_lite_tiny": {"url": url, "sha256": sha256_of(checkpoint)}})
        patch.setenv(weights.MANIFEST_ENV, manifest)
        patch.setenv("KERAS_HOME", str(root / "keras_home"))
        patch.setattr(loader, "_hub_download", hub_download)
        yield {
            "root": root, "server": server, "hub_calls": hub_calls, "manifest": manifest,
            "checkpoint": checkpoint,
            "builtin": Reference("coat_lite_tiny", 224, 1000, class_names(), large, expected,
                                 1e-5),
            "directory": Reference(str(root / "preset"), **tiny),
            "keras": Reference(str(root / "model.keras"), **tiny),
            "hub": Reference(HANDLE, **tiny),
        }


def _factory(ref, weights_argument):
    if ref.size == 224:
        return keras_coat.CoaTLiteTiny(weights=weights_argument)
    return keras_coat.CoaT(**TINY, input_shape=(64, 64, 3), classes=3, weights=weights_argument)


def _train_model(ref, num_classes):
    from training import recipes, train

    # A run's model carries the evaluation transform its validation uses, the recipe's: here the
    # preset's own crop, as `--eval-crop-pct` would give it.
    recipe = dataclasses.replace(recipes.get_recipe("demo"), image_size=ref.size,
                                 init_weights=ref.reference, drop_path=0.1,
                                 eval_crop_pct=0.9 if ref.size == 64 else 224 / 256)
    return train.build_model(recipe, num_classes)


ENTRY_POINTS = {
    "CoaTImageClassifier.from_preset":
        lambda ref: keras_coat.CoaTImageClassifier.from_preset(ref.reference),
    "factory weights=": lambda ref: _factory(ref, ref.reference),
    "load_model": lambda ref: keras_coat.load_model(ref.reference),
    "train --init-weights": lambda ref: _train_model(ref, ref.classes),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("kind", KINDS)
def test_every_reference_through_every_model_entry_point(world, kind, entry):
    ref = world[kind]
    model = ENTRY_POINTS[entry](ref)
    assert isinstance(model, keras_coat.CoaTImageClassifier)
    np.testing.assert_allclose(to_numpy(model(ref.images)), ref.expected, atol=ref.tolerance, rtol=0)
    assert model.class_names == ref.names
    assert model.preprocessing.crop_pct == (0.9 if ref.size == 64 else 224 / 256)


@pytest.mark.parametrize("kind", KINDS)
def test_the_backbone_and_a_new_head_come_from_every_reference(world, kind):
    ref = world[kind]
    classifier = keras_coat.CoaTImageClassifier.from_preset(ref.reference)
    backbone = keras_coat.CoaTBackbone.from_preset(ref.reference)
    retrained = _train_model(ref, 5)  # another label set: a fresh head on the same features
    assert retrained.output_shape == (None, 5) and retrained.class_names is None
    assert retrained.backbone.drop_path_rate == 0.1
    for got, again, expected in zip(backbone.weights, retrained.backbone.weights,
                                    classifier.backbone.weights):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(expected))
        np.testing.assert_array_equal(to_numpy(again), to_numpy(expected))


def test_a_built_in_name_is_fetched_once_then_read_from_the_cache(world):
    for _ in range(2):
        resolved = loader.resolve("coat_lite_tiny")
    assert world["server"].requests == ["/pretrained/coat_lite_tiny.pth"]
    assert resolved.path == weights.cached_preset_path("coat_lite_tiny")
    assert resolved.metadata()["source"]["sha256"] == sha256_of(world["checkpoint"])
    assert resolved.source.startswith(world["server"].url("/pretrained/coat_lite_tiny.pth"))


# ------------------------------------------------------------------------- the command line


def _image(world, size):
    from PIL import Image

    path = world["root"] / f"photo{size}.png"
    if not path.exists():
        rng = np.random.default_rng(size)
        Image.fromarray(rng.integers(0, 255, (size + 30, size + 10, 3), np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("kind", KINDS)
def test_predict_prints_the_presets_own_class_names(world, kind, capsys):
    from keras_coat.imagenet import load_image

    ref = world[kind]
    image = _image(world, ref.size)
    capsys.readouterr()
    assert cli(["predict", image, "--model", ref.reference, "--top", "2", "--json"]) == 0
    (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = keras_coat.CoaTImageClassifier.from_preset(ref.reference)
    pixels = load_image(image, image_size=ref.size, crop_pct=model.preprocessing.crop_pct)
    probabilities = to_numpy(model(pixels[None]))[0]
    best = np.argsort(-probabilities, kind="stable")[:2]
    assert [p["class"] for p in line["predictions"]] == [ref.names[i] for i in best]
    np.testing.assert_allclose([p["probability"] for p in line["predictions"]],
                               probabilities[best], atol=1e-5)
    assert ("wnid" in line["predictions"][0]) == (kind == "builtin")


@pytest.mark.parametrize("kind", KINDS)
def test_info_describes_one_preset(world, kind, capsys):
    ref = world[kind]
    capsys.readouterr()
    assert cli(["info", "--model", ref.reference]) == 0
    rows = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    rows = {key: value.strip() for key, value in rows.items()}
    if kind == "builtin":
        assert rows["variant"] == "coat_lite_tiny" and rows["classes"].startswith("1000: tench")
        assert "top-1 77.5%" in rows["metrics"] and "/pretrained/coat_lite_tiny.pth" in rows[
            "source"]
    else:
        assert rows["variant"] == "custom" and rows["classes"] == "3: daisy, rose, tulip"
        assert "image_size=(64, 64), crop_pct=0.9" in rows["preprocessing"]
        assert rows["source"] == (HANDLE if kind == "hub" else os.path.abspath(ref.reference))
        if kind != "keras":
            assert rows["written by"].startswith(f"keras-coat {keras_coat.__version__}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_export_writes_the_presets_model(world, kind, tmp_path, capsys):
    import tensorflow as tf

    ref = world[kind]
    output = tmp_path / "serving"
    assert cli(["export", "--model", ref.reference, "--output", str(output)]) == 0, \
        capsys.readouterr().err
    loaded = tf.saved_model.load(str(output / "1"))
    result = loaded.signatures["serving_default"](images=tf.constant(ref.images))
    np.testing.assert_allclose(result["probabilities"].numpy(), ref.expected,
                               atol=max(ref.tolerance, 1e-5), rtol=0)
    names = [n.decode() for n in result["class_names"].numpy()[0]]
    assert set(names) <= set(ref.names)


# ------------------------------------------------------------------------ the other backends

BACKEND_CHECK = r"""
import dataclasses, json, sys
import numpy as np
import keras, keras_coat
from keras_coat import loader
from keras_coat.__main__ import main as cli
from training import recipes, train

args = json.loads(sys.argv[1])
loader._hub_download = lambda handle: args["hub_snapshot"]
expected = np.load(args["expected"])
tiny = dict(embed_dims=(16, 32, 32, 32), serial_depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2),
            parallel_depth=2)
small = (64, 64, 3)  # the built-in at 64x64 too: its weights fit every size, and it is faster
for kind, reference in args["references"].items():
    builtin = kind == "builtin"
    classes = 1000 if builtin else 3
    factory = (keras_coat.CoaTLiteTiny(weights=reference, input_shape=small) if builtin else
               keras_coat.CoaT(**tiny, input_shape=small, classes=3, weights=reference))
    recipe = dataclasses.replace(recipes.get_recipe("demo"), image_size=64, init_weights=reference)
    models = {
        "from_preset": keras_coat.CoaTImageClassifier.from_preset(reference, image_shape=small),
        "factory": factory,
        "train": train.build_model(recipe, classes),
    }
    as_saved = keras_coat.load_model(reference)  # at the preset's own size
    for model in (as_saved, models["from_preset"], factory):
        assert model.class_names == args["names"][kind], (kind, model.class_names[:3])
        assert model.preprocessing.crop_pct == (224 / 256 if builtin else 0.9)
    checks = [(model, expected[kind + "_64"], name) for name, model in models.items()]
    checks.append((as_saved, expected[kind], "load_model"))
    for model, want, entry in checks:
        size = model.input_shape[1]
        images = expected[kind + "_images"] if size != 64 else expected["images_64"]
        got = np.asarray(keras.ops.convert_to_numpy(model(images)))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{kind} {entry}")
    backbone = keras_coat.CoaTBackbone.from_preset(reference)
    for a, b in zip(backbone.weights, as_saved.backbone.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert cli(["predict", args["image"], "--model", reference, "--image-size", "64",
                "--json"]) == 0
    print("checked", kind, keras.backend.backend())
"""


@pytest.fixture(scope="module")
def other_backend_args(world, tmp_path_factory):
    """BACKEND_CHECK's argument: the references, and what TensorFlow computed for them (written
    once for both other backends)."""
    folder = tmp_path_factory.mktemp("other_backends")
    arrays = {"images_64": world["directory"].images}
    for kind in KINDS:
        arrays[kind], arrays[kind + "_images"] = world[kind].expected, world[kind].images
        # TensorFlow's outputs at 64x64 (the built-in's are checked against timm at 224 above).
        model = keras_coat.CoaTImageClassifier.from_preset(world[kind].reference,
                                                           image_shape=(64, 64, 3))
        arrays[kind + "_64"] = to_numpy(model(arrays["images_64"]))
    np.savez(folder / "expected.npz", **arrays)
    return {
        "references": {kind: world[kind].reference for kind in KINDS},
        "names": {kind: world[kind].names for kind in KINDS},
        "hub_snapshot": str(world["root"] / "hub_snapshot"),
        "expected": str(folder / "expected.npz"),
        "image": _image(world, 64),
    }


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_every_reference_on_another_backend(world, other_backend_args, backend, tmp_path):
    # A cache of its own: the built-in is downloaded and converted on this backend too.
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3",
               KERAS_HOME=str(tmp_path / "keras_home"))
    result = subprocess.run([sys.executable, "-c", BACKEND_CHECK, json.dumps(other_backend_args)],
                            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert [line.split() for line in result.stdout.splitlines() if line.startswith("checked")] \
        == [["checked", kind, backend] for kind in KINDS]
    cached = os.listdir(tmp_path / "keras_home" / "models" / "keras_coat")
    assert sorted(cached) == ["coat_lite_tiny-" + sha256_of(world["checkpoint"])[:8],
                              "coat_lite_tiny-" + sha256_of(world["checkpoint"])[:8] + ".lock"]


# ---------------------------------------------------------------------------- bad references


def _damaged_copy(world, tmp_path, damage):
    folder = tmp_path / "damaged"
    shutil.copytree(world["root"] / "preset", folder)
    damage(folder)
    return str(folder)


def _keras_file(tmp_path, config=None, weights_bytes=None, source=None):
    """A `.keras` archive: `source`'s files with `config.json` (a dict) and the weights replaced."""
    import zipfile

    path = tmp_path / "bad.keras"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w") as archive:
        for info in original.infolist():
            data = original.read(info)
            if info.filename == "config.json" and config is not None:
                data = json.dumps(config(json.loads(data))).encode()
            if info.filename == "model.weights.h5" and weights_bytes is not None:
                data = weights_bytes(data)
            archive.writestr(info.filename, data)
    return str(path)


def _foreign_class(config):
    config["registered_name"] = "keras.layers>Lambda"
    return config


def _hostile_nested_backbone(config):
    config["config"]["backbone"]["registered_name"] = "builtins>exec"
    return config


BAD = {
    # name: (reference maker (world, tmp_path) -> reference, error fragment)
    "unknown_scheme": (lambda w, t: "s3://bucket/coat", "Unknown scheme 's3://'"),
    "http_url": (lambda w, t: "https://example.com/coat.keras", "Unknown scheme 'https://'"),
    "unknown_name": (lambda w, t: "coat_lite_huge", "Unknown CoaT preset 'coat_lite_huge'"),
    "missing_directory": (lambda w, t: str(t / "nowhere"), "does not exist"),
    "missing_keras_file": (lambda w, t: str(t / "gone.keras"), "does not exist"),
    "missing_hub_repo": (lambda w, t: "hf://keras-coat-tests/absent", "no such repo"),
    "a_weights_file": (lambda w, t: _weights_file(w, t), "pass it as `weights=`"),
    "a_text_file": (lambda w, t: _text_file(t), "neither a preset directory nor a .keras file"),
    "an_empty_string": (lambda w, t: "", "Not a preset reference"),
    "missing_weights_in_directory": (
        lambda w, t: _damaged_copy(w, t, lambda d: os.remove(d / "model.weights.h5")),
        "has no model.weights.h5"),
    "damaged_weights_in_directory": (
        lambda w, t: _damaged_copy(w, t, lambda d: (d / "model.weights.h5").write_bytes(b"x")),
        "model.weights.h5 in the preset"),
    "damaged_task_weights_in_directory": (
        lambda w, t: _damaged_copy(w, t, lambda d: (d / "task.weights.h5").write_bytes(b"x")),
        "task.weights.h5 in the preset"),
    "oversized_config_in_directory": (
        lambda w, t: _damaged_copy(w, t, lambda d: (d / "config.json").write_bytes(
            b" " * (5 * 2**20))), "more than the 4194304 allowed"),
    "truncated_keras_file": (
        lambda w, t: _truncated(w["root"] / "model.keras", t), "not a readable .keras file"),
    "keras_file_of_another_class": (
        lambda w, t: _keras_file(t, _foreign_class, source=w["root"] / "model.keras"),
        "Only keras_coat's own classes"),
    "keras_file_with_a_hostile_backbone": (
        lambda w, t: _keras_file(t, _hostile_nested_backbone, source=w["root"] / "model.keras"),
        "the backbone in config.json"),
    "keras_file_with_damaged_weights": (
        lambda w, t: _keras_file(t, weights_bytes=lambda b: b[: len(b) // 2],
                                 source=w["root"] / "model.keras"), "is unreadable"),
    "oversized_keras_config": (
        lambda w, t: _keras_file(t, lambda c: {**c, "pad": " " * (5 * 2**20)},
                                 source=w["root"] / "model.keras"), "more than the 4194304"),
}


def _weights_file(world, tmp_path):
    path = tmp_path / "tiny.weights.h5"
    keras_coat.CoaTImageClassifier.from_preset(world["directory"].reference).save_weights(path)
    return str(path)


def _text_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    return str(tmp_path / "notes.txt")


def _truncated(path, tmp_path):
    target = tmp_path / "truncated.keras"
    target.write_bytes(path.read_bytes()[:3000])
    return str(target)


def _cache(world):
    folder = world["root"] / "keras_home" / "models" / "keras_coat"
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_reference_gets_one_clear_error_and_leaves_nothing(world, name, tmp_path, capsys):
    make, fragment = BAD[name]
    reference = make(world, tmp_path)
    before, files_before = _cache(world), sorted(os.listdir(tmp_path))
    loads = [keras_coat.CoaTImageClassifier.from_preset, keras_coat.load_model]
    if "task" not in name:  # a backbone reads no task weights
        loads.append(keras_coat.CoaTBackbone.from_preset)
    for load in loads:
        with pytest.raises(PresetError) as info:
            load(reference)
        assert fragment in str(info.value), str(info.value)
        assert repr(reference) in str(info.value) or reference in str(info.value)
    # The command line: exit status 1 and one error line.
    capsys.readouterr()
    assert cli(["predict", _image(world, 64), "--model", reference]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert _cache(world) == before and sorted(os.listdir(tmp_path)) == files_before


def test_a_preset_of_another_architecture_is_refused_by_the_factories_and_training(
    world, tmp_path
):
    directory = world["directory"].reference
    with pytest.raises(PresetError, match="holds a custom CoaT .*parallel_depth=2.*this model "
                                          "is a coat_lite_tiny"):
        keras_coat.CoaTLiteTiny(weights=directory, input_shape=(64, 64, 3), classes=3)
    with pytest.raises(PresetError, match="holds a coat_lite_tiny; this model is a coat_mini"):
        keras_coat.CoaTMini(weights="coat_lite_tiny")
    with pytest.raises(PresetError, match="head of 3 classes; the model asks for classes=1000"):
        keras_coat.CoaT(**TINY, input_shape=(64, 64, 3), weights=directory)
    headless = keras_coat.CoaT(**TINY, input_shape=(64, 64, 3), include_top=False,
                               pooling="avg", weights=directory)
    assert headless.output_shape == (None, 32)

    from training import train

    argv = ["--recipe", "demo", "--model", "coat_lite_tiny", "--init-weights", directory,
            "--image-size", "64", "--batch-size", "8", "--steps-per-epoch", "1", "--epochs", "1",
            "--no-export", "--verbose", "0", "--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match="holds a custom CoaT, not the --model coat_lite_tiny"):
        train.main(argv)
    assert not (tmp_path / "run").exists()


def test_a_built_in_checkpoint_of_another_variant_leaves_nothing_in_the_cache(
    world, tmp_path, monkeypatch
):
    """A manifest pointing coat_lite_mini at coat_lite_tiny's checkpoint: the converter's error
    names the URL, and the cache holds no entry for it afterwards."""
    url = world["server"].serve("/mini.pth", world["checkpoint"])
    monkeypatch.setenv(weights.MANIFEST_ENV, write_manifest(tmp_path / "m.json", {
        "coat_lite_mini": {"url": url, "sha256": sha256_of(world["checkpoint"])}}))
    before = _cache(world)
    for load in (keras_coat.CoaTImageClassifier.from_preset, keras_coat.load_model):
        with pytest.raises(PresetError, match="given for 'coat_lite_mini' does not fit") as info:
            load("coat_lite_mini")
        assert url in str(info.value)
    assert [n for n in _cache(world) if not n.endswith(".lock")] == \
        [n for n in before if not n.endswith(".lock")]


def test_an_oversized_built_in_download_is_refused_before_reading_it(world, tmp_path, monkeypatch):
    def declares_4_gib(handler, server):
        handler.send_response(200)
        handler.send_header("Content-Length", str(4 * 2**30))
        handler.end_headers()
        server.send(handler, bytes(1 << 16))

    world["server"].behaviours["/huge.pth"] = declares_4_gib
    monkeypatch.setenv(weights.MANIFEST_ENV, write_manifest(tmp_path / "m.json", {
        "coat_lite_mini": {"url": world["server"].url("/huge.pth"), "sha256": "0" * 64}}))
    before = _cache(world)
    with pytest.raises(weights.WeightsDownloadError, match="declares 4294967296 bytes, more than "
                                                           "the .* checkpoint can take; refused "
                                                           "before reading it"):
        keras_coat.CoaTImageClassifier.from_preset("coat_lite_mini")
    assert [n for n in _cache(world) if not n.endswith(".lock")] == \
        [n for n in before if not n.endswith(".lock")]
