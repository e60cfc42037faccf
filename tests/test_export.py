"""SavedModel export for TF Serving (keras_coat.export).

The central check exports small CoaT models, then loads them in a fresh Python process that
imports only TensorFlow, calls both signatures and compares with the Keras models here.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_coat
from keras_coat import imagenet
from keras_coat.export import export_saved_model, serving
from keras_coat.utils.files import publish_directory
from tests.conftest import TINY_LITE, subprocess_env

CROP_PCT = 224 / 256
PY_FUNC_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}

# Runs in a fresh interpreter: TensorFlow and NumPy only, never Keras or keras_coat.
CLIENT_SCRIPT = r'''
import json
import sys

import numpy as np
import tensorflow as tf

job = json.load(open(sys.argv[1]))
arrays, report = {}, {}
for name, spec in job.items():
    loaded = tf.saved_model.load(spec["dir"])
    default = loaded.signatures["serving_default"]
    from_bytes = loaded.signatures["serving_bytes"]
    images = np.load(spec["images"])
    encoded = [open(path, "rb").read() for path in spec["encoded"]]
    outputs = {
        "batch3": default(images=tf.constant(images)),
        "batch1": default(images=tf.constant(images[:1])),
        "bytes": from_bytes(image_bytes=tf.constant(encoded)),
    }
    for key, result in outputs.items():
        for output, value in result.items():
            value = value.numpy()
            if value.dtype == object:
                value = np.vectorize(lambda b: b.decode("utf-8"), otypes=[str])(value)
            arrays[f"{name}/{key}/{output}"] = value
    errors = {}
    for label, bad in (("junk", b"definitely not an image"), ("empty", b""),
                       ("truncated_png", encoded[0][: len(encoded[0]) // 2])):
        try:
            from_bytes(image_bytes=tf.constant([encoded[1], bad]))
            errors[label] = None
        except tf.errors.InvalidArgumentError as error:
            errors[label] = error.message
    after = from_bytes(image_bytes=tf.constant(encoded[:1]))["probabilities"].numpy()
    arrays[f"{name}/after_errors/probabilities"] = after
    report[name] = {
        "errors": errors,
        "signatures": {
            key: {
                "inputs": {
                    k: [s.dtype.name, s.shape.as_list()]
                    for k, s in fn.structured_input_signature[1].items()
                },
                "outputs": {
                    k: [s.dtype.name, s.shape.as_list()] for k, s in fn.structured_outputs.items()
                },
            }
            for key, fn in loaded.signatures.items()
        },
    }
report["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "keras_coat"))
np.savez(sys.argv[2], **arrays)
json.dump(report, open(sys.argv[3], "w"))
'''


def _tiny_coat(**kwargs):
    """A small CoaT with parallel blocks; its head is scaled so that probabilities are far from
    uniform and every parity check below is sensitive to small input changes."""
    model = keras_coat.CoaT(
        embed_dims=(16, 32, 32, 32),
        serial_depths=(1, 1, 1, 1),
        mlp_ratios=(2, 2, 2, 2),
        parallel_depth=1,
        **kwargs,
    )
    head = model.get_layer("head")
    head.kernel.assign(head.kernel * 25.0)
    return model


def _lite_tiny(**kwargs):
    """A CoaT-Lite of the tests' tiny configuration: the output checks below read only the
    model's last layers, built in a fraction of CoaT-Lite Tiny's time."""
    return keras_coat.CoaT(**TINY_LITE, **kwargs)


def _encode(array, fmt, mode=None):
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _test_images(rng):
    """Encoded images whose resize and crop offsets hit the .5 rounding cases and upscaling."""
    def pixels(h, w):
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)

    return [
        _encode(pixels(97, 150), "PNG"),
        _encode(pixels(120, 83), "JPEG"),
        _encode(pixels(40, 40), "PNG", mode="L"),
        _encode(pixels(81, 130), "PNG", mode="RGBA"),
    ]


def _reference_eval_transform(data, height, width, crop_pct=CROP_PCT):
    """The evaluation transform computed eagerly: the sizes in Python (independent of export),
    the resize Pillow's (timm's)."""
    from PIL import Image

    image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    h, w = image.shape[:2]
    scale_h, scale_w = int(height / crop_pct), int(width / crop_pct)
    if scale_h != scale_w:
        ratio = min(h / scale_h, w / scale_w)
        new_h, new_w = round(h / ratio), round(w / ratio)
    elif w <= h:
        new_h, new_w = int(scale_h * h / w), scale_w
    else:
        new_h, new_w = scale_h, int(scale_w * w / h)
    top, left = int(round((new_h - height) / 2)), int(round((new_w - width) / 2))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    return resized[top : top + height, left : left + width].astype(np.float32)


def _graph_op_types(saved_model_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    ops = set()
    for meta_graph in saved_model.meta_graphs:
        ops.update(node.op for node in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    return ops


class Case:
    def __init__(self, model, class_names, normalize, softmax):
        self.model, self.class_names = model, class_names
        self.normalize, self.softmax = normalize, softmax
        self.height, self.width = model.inputs[0].shape[1:3]

    def keras_probabilities(self, images):
        x = imagenet.preprocess_input(images) if self.normalize else images
        out = self.model(x, training=False)
        return keras.ops.convert_to_numpy(keras.ops.softmax(out) if self.softmax else out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two exports and the results of one fresh TensorFlow-only process using them.

    "imagenet": 1000 classes (default ImageNet names), normalization and softmax in the model.
    "custom": 10 classes with their own names, a 64x96 input, built with
    include_preprocessing=False and classifier_activation=None, so the signatures normalize
    and apply softmax.
    """
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(1)
    keras.utils.set_random_seed(1)
    custom_names = [f"flower {i}" for i in range(10)]
    cases = {
        "imagenet": Case(_tiny_coat(input_shape=(64, 64, 3)), imagenet.class_names(), False, False),
        "custom": Case(
            _tiny_coat(
                input_shape=(64, 96, 3),
                classes=10,
                include_preprocessing=False,
                classifier_activation=None,
            ),
            custom_names,
            True,
            True,
        ),
    }
    job, timings = {}, {}
    for name, case in cases.items():
        start = time.perf_counter()
        path = export_saved_model(
            case.model,
            root / name,
            class_names=custom_names if name == "custom" else None,
        )
        timings[name] = time.perf_counter() - start
        assert path == str(root / name / "1")
        case.images = rng.uniform(0, 255, size=(3, case.height, case.width, 3)).astype("float32")
        case.encoded = _test_images(rng)
        np.save(root / f"{name}_images.npy", case.images)
        files = []
        for i, data in enumerate(case.encoded):
            files.append(str(root / f"{name}_image{i}"))
            with open(files[-1], "wb") as f:
                f.write(data)
        job[name] = {"dir": path, "images": str(root / f"{name}_images.npy"), "encoded": files}

    (root / "job.json").write_text(json.dumps(job))
    (root / "client.py").write_text(CLIENT_SCRIPT)
    env = subprocess_env(PYTHONPATH=None, KERAS_BACKEND=None)  # TensorFlow alone
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(root / "client.py"), str(root / "job.json"),
         str(root / "out.npz"), str(root / "report.json")],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    timings["client"] = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-4000:]
    print("export timings (s):", {k: round(v, 1) for k, v in timings.items()})
    with np.load(root / "out.npz") as data:
        arrays = dict(data)
    report = json.loads((root / "report.json").read_text())
    return {"cases": cases, "arrays": arrays, "report": report, "dirs": job}


CASES = ["imagenet", "custom"]


@pytest.mark.slow
def test_client_process_never_imports_keras_coat(exported):
    modules = exported["report"]["modules"]
    assert not [m for m in modules if m.split(".")[0] == "keras_coat"], modules
    # The client itself never imports keras (TensorFlow may load parts of it on its own).
    assert not re.search(r"^\s*(import|from)\s+keras", CLIENT_SCRIPT, re.MULTILINE)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_serving_default_matches_keras(exported, name):
    case, arrays = exported["cases"][name], exported["arrays"]
    expected = case.keras_probabilities(case.images)
    served = arrays[f"{name}/batch3/probabilities"]
    assert served.dtype == np.float32 and served.shape == expected.shape
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(served.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_serving_default_has_dynamic_batch(exported, name):
    arrays = exported["arrays"]
    one, three = arrays[f"{name}/batch1/probabilities"], arrays[f"{name}/batch3/probabilities"]
    assert one.shape[0] == 1 and three.shape[0] == 3
    np.testing.assert_allclose(one[0], three[0], atol=1e-6, rtol=0)
    for key, spec in exported["report"][name]["signatures"].items():
        for dtype, shape in list(spec["inputs"].values()) + list(spec["outputs"].values()):
            assert shape[0] is None, (key, shape)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_serving_bytes_matches_eager_decode_and_crop(exported, name):
    case, arrays = exported["cases"][name], exported["arrays"]
    pixels = np.stack(
        [_reference_eval_transform(data, case.height, case.width) for data in case.encoded]
    )
    expected = case.keras_probabilities(pixels)
    served = arrays[f"{name}/bytes/probabilities"]
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)

    # The comparison can fail: a crop one pixel off changes the predictions far beyond 1e-5.
    shifted = np.stack(
        [
            _reference_eval_transform(data, case.height, case.width + 1)[:, 1:]
            for data in case.encoded
        ]
    )
    assert np.abs(case.keras_probabilities(shifted) - served).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_top_classes_and_names(exported, name):
    case, arrays = exported["cases"][name], exported["arrays"]
    for key in ("batch3", "bytes"):
        probabilities = arrays[f"{name}/{key}/probabilities"]
        classes = arrays[f"{name}/{key}/classes"]
        assert classes.shape == (len(probabilities), 5)
        assert np.issubdtype(classes.dtype, np.integer)
        np.testing.assert_array_equal(classes, np.argsort(-probabilities, axis=-1)[:, :5])
        np.testing.assert_allclose(
            arrays[f"{name}/{key}/scores"], np.take_along_axis(probabilities, classes, -1)
        )
        names = arrays[f"{name}/{key}/class_names"]
        np.testing.assert_array_equal(names, np.asarray(case.class_names)[classes])


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_signatures(exported, name):
    case = exported["cases"][name]
    signatures = exported["report"][name]["signatures"]
    assert set(signatures) == {"serving_default", "serving_bytes"}
    assert signatures["serving_default"]["inputs"] == {
        "images": ["float32", [None, case.height, case.width, 3]]
    }
    assert signatures["serving_bytes"]["inputs"] == {"image_bytes": ["string", [None]]}
    classes = len(case.class_names)
    for spec in signatures.values():
        assert spec["outputs"] == {
            "probabilities": ["float32", [None, classes]],
            "classes": ["int32", [None, 5]],
            "scores": ["float32", [None, 5]],
            "class_names": ["string", [None, 5]],
        }


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_invalid_bytes_raise_invalid_argument_and_model_survives(exported, name):
    errors = exported["report"][name]["errors"]
    assert "only JPEG, PNG or BMP images are read" in errors["junk"]
    assert "empty" in errors["empty"].lower()
    assert "PNG" in errors["truncated_png"]
    np.testing.assert_allclose(
        exported["arrays"][f"{name}/after_errors/probabilities"],
        exported["arrays"][f"{name}/bytes/probabilities"][:1],
        atol=1e-6,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_exported_graph_has_no_py_function(exported, name):
    ops = _graph_op_types(exported["dirs"][name]["dir"])
    # The scan reaches the nested functions (map_fn body, the shared classifier); the resize is
    # Pillow's bicubic as matrix products (keras_coat.tf_images), not ScaleAndTranslate.
    assert {"DecodeImage", "SparseTensorDenseMatMul", "TopKV2"} <= ops
    assert not ops & PY_FUNC_OPS


def test_py_function_scan_detects_py_function(tmp_path):
    module = tf.Module()
    module.f = tf.function(
        lambda x: tf.py_function(lambda v: v * 2, [x], tf.float32),
        input_signature=[tf.TensorSpec([None], tf.float32)],
    )
    tf.saved_model.save(module, str(tmp_path))
    assert _graph_op_types(str(tmp_path)) & PY_FUNC_OPS


# ---------------------------------------------------------------------------------------------
# Arguments, failures, atomic publication


@pytest.fixture(scope="module")
def small_model():
    """A 64x64, 10-class Keras classifier that exports in about a second. The argument,
    failure and overwrite checks below do not depend on the architecture (the CoaT exports are
    checked above and in test_published_variants_export); a CoaT here cost a full trace of the
    model, about 6 s, in every export that reaches the write."""
    return _toy(input_size=(64, 64), classes=10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"version": "1"}, "version"),
        ({"version": 1.0}, "version"),
        ({"version": True}, "version"),
        ({"version": -1}, "version"),
        ({"class_names": [f"c{i}" for i in range(9)]}, "9 names but the model has 10"),
        ({"class_names": list(range(10))}, "must all be str"),
        ({"class_names": "abcdefghij"}, "single string"),
        ({"image_size": 96}, "contradicts"),
        ({"image_size": (64, 64, 3)}, "image_size"),
        ({"crop_pct": 0}, "crop_pct"),
        ({"crop_pct": 1.5}, "crop_pct"),
        ({"crop_pct": "0.875"}, "crop_pct"),
        ({"top_k": 0}, "top_k"),
        ({"model_input": "raw"}, "model_input"),
        ({"model_output": "scores"}, "model_output"),
    ],
)
def test_bad_arguments_raise_value_error(small_model, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        export_saved_model(small_model, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_model_without_class_probabilities_is_refused(tmp_path):
    features = _lite_tiny(include_top=False, pooling="avg", input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match="probabilities or logits"):
        export_saved_model(features, tmp_path)
    feature_map = _lite_tiny(include_top=False, input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        export_saved_model(feature_map, tmp_path)
    sigmoid = _lite_tiny(
        input_shape=(64, 64, 3), classes=3, classifier_activation="sigmoid"
    )
    with pytest.raises(ValueError, match="probabilities or logits"):
        export_saved_model(sigmoid, tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_output_kind_is_read_from_the_model():
    probabilities = _lite_tiny(input_shape=(64, 64, 3), classes=3)
    logits = _lite_tiny(
        input_shape=(64, 64, 3), classes=3, classifier_activation=None,
        include_preprocessing=False,
    )
    assert serving.needs_softmax(probabilities, "auto") is False
    assert serving.needs_softmax(logits, "auto") is True
    assert serving.needs_normalization(probabilities, "auto") is False
    assert serving.needs_normalization(logits, "auto") is True


def test_default_class_names():
    assert serving.resolve_class_names(None, 1000) == imagenet.class_names()
    assert serving.resolve_class_names(None, 3) == ["class_0", "class_1", "class_2"]


@pytest.mark.slow
def test_logits_declared_as_probabilities_fail_verification(tmp_path):
    # The verification reads the reloaded SavedModel's outputs, whatever the model: a toy
    # classifier's logits (negative, rows not summing to 1) take a second to export.
    logits = _toy(input_size=(64, 64), classes=4, activation=None)
    with pytest.raises(ValueError, match="not probabilities"):
        export_saved_model(logits, tmp_path, model_output="probabilities")
    assert os.listdir(tmp_path) == []


class _CountedCalls(keras.layers.Layer):
    """The identity, counting the runs of its Python code (traces and eager calls alike) in
    `counter.calls`."""

    def __init__(self, counter, **kwargs):
        super().__init__(**kwargs)
        self.counter = counter

    def call(self, x):
        self.counter.calls += 1
        return x


def test_an_export_traces_the_model_once_and_keeps_its_variables(tmp_path):
    # Both signatures call one traced copy of the model, and the SavedModel keeps it: tracing
    # it again while saving (as saving the `tf.function`s does) was 40% of an export's time.
    from types import SimpleNamespace

    counter = SimpleNamespace(calls=0)
    inputs = keras.Input((64, 64, 3))
    x = keras.layers.GlobalAveragePooling2D()(_CountedCalls(counter)(inputs))
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    counter.calls = 0
    path = export_saved_model(model, tmp_path)
    assert counter.calls == 2, "one trace for both signatures and one eager call to verify against"
    loaded = tf.saved_model.load(path)
    for name in ("variables", "trainable_variables", "non_trainable_variables"):
        assert [v.shape for v in getattr(loaded, name)] == [v.shape for v in getattr(model, name)]
    images = tf.constant(np.full((1, 64, 64, 3), 7.0, "float32"))
    np.testing.assert_array_equal(loaded.serving_default(images)["probabilities"],
                                  loaded.signatures["serving_default"](images=images)[
                                      "probabilities"])
    assert counter.calls == 2


def _failing_save(calls):
    """A tf.saved_model.save that writes part of a SavedModel, then fails."""

    def save(obj, export_dir, *args, **kwargs):
        calls.append(export_dir)
        os.makedirs(os.path.join(export_dir, "variables"), exist_ok=True)
        with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
            f.write(b"partial")
        raise OSError("disk full (simulated)")

    return save


@pytest.mark.slow
@pytest.mark.parametrize("base_exists", [True, False])
def test_failed_export_leaves_nothing(small_model, tmp_path, monkeypatch, base_exists):
    base = tmp_path / "models"
    if base_exists:
        base.mkdir()
    calls = []
    monkeypatch.setattr(tf.saved_model, "save", _failing_save(calls))
    with pytest.raises(OSError, match="simulated"):
        export_saved_model(small_model, base, verify=False)
    assert calls, "the export did not reach tf.saved_model.save"
    assert os.path.dirname(os.path.abspath(calls[0])) == str(base)  # staged beside the version
    if base_exists:
        assert os.listdir(base) == []
    else:
        assert not base.exists()


@pytest.mark.slow
def test_existing_version_needs_overwrite_and_overwrite_is_atomic(
    exported, small_model, tmp_path, monkeypatch
):
    base = tmp_path / "models"
    shutil.copytree(os.path.dirname(exported["dirs"]["custom"]["dir"]), base)
    version = base / "1"
    before = (version / "saved_model.pb").read_bytes()

    with pytest.raises(FileExistsError, match="overwrite"):
        export_saved_model(small_model, base)

    with monkeypatch.context() as patch:
        patch.setattr(tf.saved_model, "save", _failing_save([]))
        with pytest.raises(OSError, match="simulated"):
            export_saved_model(small_model, base, overwrite=True, verify=False)
    assert sorted(os.listdir(base)) == ["1"]
    assert (version / "saved_model.pb").read_bytes() == before

    export_saved_model(small_model, base, overwrite=True)
    assert sorted(os.listdir(base)) == ["1"]
    assert (version / "saved_model.pb").read_bytes() != before
    loaded = tf.saved_model.load(str(version))
    out = loaded.signatures["serving_default"](images=tf.zeros((1, 64, 64, 3)))
    assert out["probabilities"].shape == (1, 10)


def test_publish_restores_the_old_version_when_the_swap_fails(tmp_path, monkeypatch):
    staging, target = tmp_path / ".1.partial-x", tmp_path / "1"
    staging.mkdir()
    (staging / "new").write_text("new")
    target.mkdir()
    (target / "old").write_text("old")
    real_rename, renames = os.rename, []

    def rename(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:  # moving the new version into place
            raise OSError("rename failed (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        publish_directory(str(staging), str(target), overwrite=True)
    assert (target / "old").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == [".1.partial-x", "1"]  # the caller removes staging


# ---------------------------------------------------------------------------------------------
# Every variant, and the command line


# Published variants through the whole export: one of each family, whose graphs hold every kind
# of layer and both code paths of the attention (more than 128 channels: per-head einsums),
# and the 384 input. The other variants are these layers at other widths and depths (each
# export traces the model four times: about 25 s for CoaT Tiny, whatever the input size); the
# harness builds and runs every variant (tests/test_harness.py).
VARIANTS = [("coat_lite_tiny", 224), ("coat_tiny", 224), ("coat_lite_tiny", 384)]


@pytest.mark.slow
@pytest.mark.parametrize("variant, size", VARIANTS)
@pytest.mark.timeout(900)  # measured up to 185 s on a busy machine (pyproject: 300 s)
def test_published_variants_export(variant, size, tmp_path):
    model = keras_coat.create_model(variant, input_shape=(size, size, 3))
    start = time.perf_counter()
    path = export_saved_model(model, tmp_path, verify=False)
    exported_in = time.perf_counter() - start
    loaded = tf.saved_model.load(path)
    images = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    probabilities = loaded.signatures["serving_default"](images=tf.constant(images))[
        "probabilities"
    ].numpy()
    assert probabilities.shape == (2, 1000)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        probabilities, keras.ops.convert_to_numpy(model(images)), atol=1e-5, rtol=0
    )
    data = _encode(images[0].astype(np.uint8), "JPEG")
    out = loaded.signatures["serving_bytes"](image_bytes=tf.constant([data]))
    assert out["probabilities"].shape == (1, 1000)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(), 1.0, atol=1e-5)
    names = imagenet.class_names()
    assert [n.decode() for n in out["class_names"].numpy()[0]] == [
        names[i] for i in out["classes"].numpy()[0]
    ]
    print(f"{variant}@{size}: export {exported_in:.1f}s, total {time.perf_counter() - start:.1f}s")


@pytest.mark.slow
@pytest.mark.timeout(900)  # measured up to 149 s on a busy machine (pyproject: 300 s)
def test_command_line_exports_and_explains(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n", encoding="utf-8")
    output = tmp_path / "serving" / "coat"
    env = subprocess_env()
    command = [
        sys.executable, "-m", "keras_coat", "export", "--model", "coat_lite_tiny",
        "--weights", "none", "--image-size", "64", "--class-names", str(names),
        "--version", "3", "--top", "2", "--output", str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(os.listdir(output)) == ["3"]
    out = result.stdout
    assert "signature_def['serving_default']" in out and "signature_def['serving_bytes']" in out
    assert "inputs['images'] tensor_info:" in out and "shape: (-1, 64, 64, 3)" in out
    assert "inputs['image_bytes'] tensor_info:" in out and "dtype: DT_STRING" in out
    assert "shape: (-1, 3)" in out and "shape: (-1, 2)" in out  # 3 classes, top 2
    assert f"source={output}," in out and "MODEL_NAME=coat_lite_tiny" in out
    request = re.search(r"printf '(.*)' \"\$\(base64 -w0 image.jpg\)\" > request.json", out)
    body = json.loads(request.group(1) % "AAAA")
    assert body["signature_name"] == "serving_bytes"
    assert body["instances"] == [{"image_bytes": {"b64": "AAAA"}}]
    assert "http://localhost:8501/v1/models/coat_lite_tiny:predict" in out

    loaded = tf.saved_model.load(str(output / "3"))
    data = _encode(np.zeros((50, 70, 3), np.uint8), "PNG")
    out = loaded.signatures["serving_bytes"](image_bytes=tf.constant([data]))
    assert out["probabilities"].shape == (1, 3)
    assert set(out["class_names"].numpy()[0]) <= {b"cat", b"dog", b"bird"}

    # A second export of the same version is refused with a message, not a traceback. main()
    # is what `python -m keras_coat` exits with (sys.exit(main())), and the first run above
    # went through that entry point: called here, it spares a second interpreter start and
    # TensorFlow import. An exception escaping main() would fail this test as a traceback would.
    from keras_coat.__main__ import main

    assert main(command[3:]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "overwrite" in err
    assert "Traceback" not in err


def test_command_line_needs_an_output_directory(capsys):
    from keras_coat.__main__ import build_parser, main

    assert main(["export", "--model", "coat_lite_tiny"]) == 2
    assert "--output" in capsys.readouterr().err
    parser = build_parser()
    assert parser.parse_args(["export", "--output", "a"]).output == "a"
    assert parser.parse_args(["export", "b"]).output == "b"


def _toy(input_size=(8, 8), classes=3, activation="softmax"):
    inputs = keras.Input((*input_size, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(classes, activation=activation)(x))


def test_the_contract_reads_the_models_preprocessing_and_class_names():
    from types import SimpleNamespace

    model = _toy()
    default = serving.serving_contract(model)
    assert default.class_names == ("class_0", "class_1", "class_2")
    assert default.crop_pct == imagenet.DEFAULT_CROP_PCT and default.mean == imagenet.IMAGENET_MEAN
    assert default.normalize and not default.softmax  # no normalization layer; softmax output

    model.class_names = ["cat", "dog", "bird"]
    model.preprocessing = SimpleNamespace(
        image_size=(8, 8), crop_pct=0.95, interpolation="bicubic", mean=(0.5, 0.5, 0.5),
        std=[0.25, 0.25, 0.25],
    )
    carried = serving.serving_contract(model)
    assert carried.class_names == ("cat", "dog", "bird") and carried.crop_pct == 0.95
    assert carried.mean == (0.5, 0.5, 0.5) and carried.std == (0.25, 0.25, 0.25)
    # The graph normalizes with the model's own mean and std.
    pixels = tf.fill((1, 8, 8, 3), 191.25)  # (191.25 - 127.5) / 63.75 == 1
    expected = model(tf.ones((1, 8, 8, 3))).numpy()
    np.testing.assert_allclose(carried.probabilities_fn(model)(pixels).numpy(), expected, atol=1e-6)
    # Explicit arguments win.
    explicit = serving.serving_contract(model, class_names=["a", "b", "c"], crop_pct=0.5)
    assert explicit.class_names == ("a", "b", "c") and explicit.crop_pct == 0.5
    # A dict works as well, and a wrong value is named.
    model.preprocessing = {"crop_fraction": 0.8, "mean": (0.1, 0.2)}
    with pytest.raises(ValueError, match=re.escape("`preprocessing.mean` must be three")):
        serving.serving_contract(model)
    model.preprocessing = {"crop_fraction": 0.8, "interpolation": "bilinear"}
    with pytest.raises(ValueError, match="'bilinear' interpolation"):
        serving.serving_contract(model)
    model.preprocessing = {"crop_fraction": 0.8}
    assert serving.serving_contract(model).crop_pct == 0.8
    model.class_names = ["only one"]
    with pytest.raises(ValueError, match="1 names but the model has 3"):
        serving.serving_contract(model)


def test_a_model_of_any_input_size_is_served_at_its_preprocessing_size():
    from types import SimpleNamespace

    model = _toy(input_size=(None, None))
    with pytest.raises(ValueError, match="pass `image_size`"):
        serving.serving_contract(model)
    model.preprocessing = SimpleNamespace(image_size=(32, 48))
    contract = serving.serving_contract(model)
    assert (contract.height, contract.width) == (32, 48)
    assert serving.serving_contract(model, image_size=16).height == 16
