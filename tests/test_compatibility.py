"""Files written by keras-coat 0.1.0 load into today's models with the outputs 0.1.0 computed.

The fixtures in tests/data/compat_0_1/ were written by 0.1.0 (see make_fixtures.py there): a
classifier and a backbone of each kind as `.keras` and `.weights.h5`, and a weights-cache entry.
"""

import http.server
import os
import shutil
import threading

import keras
import numpy as np
import pytest
from keras import ops

import keras_coat
from keras_coat import weights

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "compat_0_1")
SMALL = {"embed_dims": (16, 32, 32, 32), "serial_depths": (1, 1, 1, 1), "mlp_ratios": (2, 2, 2, 2)}
KINDS = {"lite": 0, "parallel": 2}
OUTPUTS = np.load(os.path.join(HERE, "outputs.npz"))
IMAGES = OUTPUTS["images"]


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("role", ["classifier", "backbone"])
def test_keras_files_load_with_the_outputs_of_0_1(kind, role):
    model = keras_coat.load_model(os.path.join(HERE, f"{kind}_{role}.keras"))
    assert isinstance(model, keras_coat.CoaTImageClassifier)
    assert (model.num_classes is None) == (role == "backbone")
    np.testing.assert_allclose(_np(model(IMAGES)), OUTPUTS[f"{kind}_{role}"], atol=1e-6, rtol=0)


def test_keras_load_model_names_the_way_for_0_1_files():
    with pytest.raises(Exception, match="keras_coat.load_model"):
        keras.models.load_model(os.path.join(HERE, "lite_classifier.keras"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("role", ["classifier", "backbone"])
def test_weights_files_load_with_the_outputs_of_0_1(kind, role):
    model = keras_coat.CoaT(
        **SMALL, parallel_depth=KINDS[kind], input_shape=(64, 64, 3), classes=10,
        include_top=role == "classifier",
        weights=os.path.join(HERE, f"{kind}_{role}.weights.h5"),
    )
    np.testing.assert_allclose(_np(model(IMAGES)), OUTPUTS[f"{kind}_{role}"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_0_1_classifier_file_fills_a_bare_backbone(kind):
    classifier = keras_coat.CoaT(
        **SMALL, parallel_depth=KINDS[kind], input_shape=(64, 64, 3), classes=10,
        weights=os.path.join(HERE, f"{kind}_classifier.weights.h5"),
    )
    backbone = keras_coat.CoaTBackbone(**SMALL, parallel_depth=KINDS[kind], image_shape=(64, 64, 3))
    keras_coat.loading.load_keras_weights(
        backbone, os.path.join(HERE, f"{kind}_classifier.weights.h5")
    )
    for got, expected in zip(backbone.weights, classifier.backbone.weights):
        np.testing.assert_array_equal(_np(got), _np(expected))


class _RefusingHandler(http.server.BaseHTTPRequestHandler):
    contacted = []

    def do_GET(self):  # noqa: N802
        self.contacted.append(self.path)
        self.send_error(500)

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_server():
    _RefusingHandler.contacted = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, _RefusingHandler.contacted
    server.shutdown()


@pytest.mark.parametrize(
    "kwargs, key",
    [({}, "cache_coat_lite_tiny_64"),
     ({"include_top": False, "pooling": "avg"}, "cache_coat_lite_tiny_64_avg")],
    ids=["classifier", "headless-avg"],
)
def test_a_0_1_weights_cache_entry_is_used_without_network(
    kwargs, key, tmp_path, monkeypatch, refusing_server
):
    server, contacted = refusing_server
    cache = tmp_path / "models" / "keras_coat"
    cache.mkdir(parents=True)
    for name in os.listdir(os.path.join(HERE, "cache")):
        shutil.copy(os.path.join(HERE, "cache", name), cache / name)
    entry = weights.CHECKPOINTS["coat_lite_tiny"]
    manifest = tmp_path / "manifest.json"
    # The same digest as the entry, served by a loopback server that fails if contacted.
    manifest.write_text(
        '{"coat_lite_tiny": {"url": "http://127.0.0.1:%d/coat_lite_tiny.pth", "sha256": "%s"}}'
        % (server.server_address[1], entry.sha256)
    )
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setenv(weights.MANIFEST_ENV, str(manifest))
    model = keras_coat.CoaTLiteTiny(input_shape=(64, 64, 3), weights="imagenet", **kwargs)
    assert contacted == []
    np.testing.assert_allclose(_np(model(IMAGES)), OUTPUTS[key], atol=1e-6, rtol=0)
    # Converted once into today's cache format; the next load reads that.
    assert os.path.isfile(weights.cached_weights_path("coat_lite_tiny"))
    again = keras_coat.CoaTLiteTiny(input_shape=(64, 64, 3), weights="imagenet", **kwargs)
    np.testing.assert_allclose(_np(again(IMAGES)), OUTPUTS[key], atol=1e-6, rtol=0)
    assert contacted == []
