"""Exports from JAX and PyTorch processes (keras_coat.export.any_backend): the TensorFlow child
writes the same verified files, errors come back as the same exceptions, nothing is left behind.

Each backend runs in a subprocess (Keras picks its backend once per process) that builds a
small CoaT-Lite, records its probabilities in its own runtime and exports it; this process, on
TensorFlow, runs every file in its runtime and compares.
"""

import json
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_coat
from keras_coat.export import any_backend, litert, onnx, openvino
from tests.test_models import TINY_LITE

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
NAMES = ["cat", "dog", "bird"]
TIMEOUT = 900

# argv: output folder, then the formats to write. Writes <folder>/results.json.
EXPORT_SCRIPT = f"""
import json, os, sys
import keras, numpy as np
import keras_coat
from keras_coat.export import export_model, export_saved_model

folder, formats = sys.argv[1], sys.argv[2:]
keras.utils.set_random_seed(0)
backbone = keras_coat.CoaTBackbone(**{TINY_LITE!r}, image_shape=({SIZE}, {SIZE}, 3))
model = keras_coat.CoaTImageClassifier(backbone, num_classes=3, class_names={NAMES!r})
head = model.get_layer("head")
head.kernel.assign(head.kernel * 25.0)  # confident probabilities: parity sees small changes
images = np.random.default_rng(1).uniform(0, 255, (4, {SIZE}, {SIZE}, 3)).astype("float32")
np.save(os.path.join(folder, "images.npy"), images)
np.save(os.path.join(folder, "expected.npy"), model.predict(images, verbose=0))
results = {{"backend": keras.backend.backend()}}
for fmt in formats:
    if fmt == "saved_model":
        results[fmt] = export_saved_model(model, os.path.join(folder, "serving"), version=2)
    else:
        suffix = {{"litert": ".tflite", "onnx": ".onnx", "openvino": ".xml"}}[fmt]
        result = export_model(model, os.path.join(folder, "coat" + suffix), fmt)
        results[fmt] = {{"path": result.path, "files": result.files,
                         "max_abs_diff": result.max_abs_diff}}
# The same export again: the child's FileExistsError, raised here with its message.
try:
    export_saved_model(model, os.path.join(folder, "serving"), version=2)
except FileExistsError as error:
    results["exists"] = str(error)
# Logits declared as probabilities fail the child's verification after its files are staged.
logits = keras_coat.CoaTImageClassifier(backbone, num_classes=3, activation=None)
try:
    export_model(logits, os.path.join(folder, "logits.onnx"), "onnx",
                 model_output="probabilities")
except ValueError as error:
    results["failed"] = str(error)
# A plain Keras model carries its class names as an attribute: they reach the labels file.
inputs = keras.Input(({SIZE}, {SIZE}, 3))
plain = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(
    keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))))
plain.class_names = ["left", "right"]
plain.preprocessing = {{"crop_pct": 0.9}}
export_model(plain, os.path.join(folder, "plain.onnx"), "onnx")
with open(os.path.join(folder, "results.json"), "w") as f:
    json.dump(results, f)
"""

SESSIONS = {"litert": litert.session, "onnx": onnx.session, "openvino": openvino.session}


def _export_from(backend, folder, formats):
    tmp = folder / "tmp"
    tmp.mkdir()
    env = dict(
        os.environ, KERAS_BACKEND=backend, PYTHONPATH=REPO_ROOT, TMPDIR=str(tmp),
        TF_CPP_MIN_LOG_LEVEL="3",
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", EXPORT_SCRIPT, str(folder), *formats],
        capture_output=True, text=True, env=env, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    # The private folders of every export, failed ones included, are gone.
    assert [name for name in os.listdir(tmp) if name.startswith("keras-coat-export-")] == []
    with open(folder / "results.json") as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend, formats",
    [("jax", ["saved_model", "litert", "onnx", "openvino"]), ("torch", ["saved_model", "onnx"])],
)
def test_exports_from_another_backend_match_the_model_in_its_runtime(backend, formats, tmp_path):
    results = _export_from(backend, tmp_path, formats)
    assert results["backend"] == backend
    images = np.load(tmp_path / "images.npy")
    expected = np.load(tmp_path / "expected.npy")  # the Keras model on `backend`
    assert expected.max() - expected.min() > 0.3  # far from uniform, so a wrong graph shows

    served = tf.saved_model.load(results["saved_model"]).signatures["serving_default"]
    outputs = served(images=tf.constant(images))
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-4, rtol=0)
    best = outputs["class_names"].numpy()[:, 0]
    assert [n.decode() for n in best] == [NAMES[i] for i in expected.argmax(-1)]
    for fmt in formats[1:]:
        run = SESSIONS[fmt](results[fmt]["path"])
        np.testing.assert_allclose(run(images), expected, atol=1e-4, rtol=0)
        assert results[fmt]["max_abs_diff"] <= 1e-4
        with open(tmp_path / "coat.labels.txt") as f:
            assert f.read().split() == NAMES

    assert "serving/2 already exists; pass overwrite=True" in results["exists"]
    assert "are not probabilities" in results["failed"]
    with open(tmp_path / "plain.labels.txt") as f:
        assert f.read().split() == ["left", "right"]
    written = {"images.npy", "expected.npy", "results.json", "tmp", "serving", "plain.onnx",
               "plain.labels.txt", "coat.labels.txt"}  # fmt: skip
    written |= {os.path.basename(f) for fmt in formats[1:] for f in results[fmt]["files"]}
    assert set(os.listdir(tmp_path)) == written  # nothing of the failed export, nothing staged
    assert os.listdir(tmp_path / "serving") == ["2"]


def _model():
    keras.utils.set_random_seed(0)
    backbone = keras_coat.CoaTBackbone(**TINY_LITE, image_shape=(SIZE, SIZE, 3))
    return keras_coat.CoaTImageClassifier(backbone, num_classes=3, class_names=NAMES)


def test_a_child_that_dies_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    died = [sys.executable, "-c", "import os; print('segfault, say'); os._exit(3)"]
    monkeypatch.setattr(any_backend, "child_command", lambda folder: died)
    with pytest.raises(RuntimeError, match=r"stopped \(exit status 3\) without an answer"):
        any_backend.run_in_tensorflow("export_model", _model(), tmp_path / "m.onnx", {})
    assert os.listdir(tmp_path) == []


def test_options_that_cannot_reach_the_child_are_refused_before_anything_runs(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(any_backend, "child_command", lambda folder: pytest.fail("ran"))
    with pytest.raises(TypeError, match="`crop_pct`=.*cannot be passed to the TensorFlow"):
        any_backend.run_in_tensorflow("export_saved_model", _model(), tmp_path / "sm",
                                      {"crop_pct": object()})
    with pytest.raises(ValueError, match="`model` must be a keras.Model; received str"):
        any_backend.run_in_tensorflow("export_model", "model.keras", tmp_path / "m.onnx", {})
    assert os.listdir(tmp_path) == []


def test_the_child_answers_with_the_exception_and_its_message(tmp_path):
    """The request and answer files, as the child reads and writes them (on TensorFlow here)."""
    _model().save(tmp_path / any_backend.MODEL_FILE)
    request = {"function": "export_model", "target": str(tmp_path / "m.onnx"),
               "options": {"format": "onnx", "precision": "int8"}, "images": {},
               "attributes": {}}  # fmt: skip
    (tmp_path / any_backend.REQUEST_FILE).write_text(json.dumps(request))
    any_backend.serve_request(str(tmp_path / any_backend.REQUEST_FILE))
    answer = json.loads((tmp_path / any_backend.RESPONSE_FILE).read_text())
    assert answer["error"]["types"][:2] == ["ValueError", "Exception"]
    assert "precision 'int8' is not available for format 'onnx'" in answer["error"]["message"]


@pytest.mark.slow
def test_the_command_line_exports_on_jax(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "keras_coat", "export", "--model", "coat_lite_tiny",
               "--weights", "none", "--image-size", "32", "--output", str(tmp_path / "cli")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=TIMEOUT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "signature_def['serving_bytes']" in result.stdout
    assert os.listdir(tmp_path / "cli") == ["1"]

