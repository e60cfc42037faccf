"""`python -m training.evaluate`: the top-1 of Keras' own `evaluate`, classes matched by name or
by ImageNet WordNet id (timm's folder layout, TFDS' imagenet2012), one clear error per bad
input."""

import contextlib
import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_coat
from keras_coat import imagenet
from keras_coat.presets import ImagePreprocessing
from tests.test_models import TINY_LITE
from training import data, evaluate

SIZE = 32
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _classifier(class_names, crop_pct, seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_coat.CoaTBackbone(**TINY_LITE, image_shape=(SIZE, SIZE, 3))
    return keras_coat.CoaTImageClassifier(
        backbone,
        num_classes=len(class_names),
        class_names=list(class_names),
        preprocessing=ImagePreprocessing(image_size=SIZE, crop_pct=crop_pct),
    )


def _write_images(folder, count, seed, size=(37, 45)):
    """`count` random RGB PNGs of `size` (height, width) in `folder`; their paths."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"image{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _error_of(argv, capsys):
    with pytest.raises(SystemExit) as info:
        evaluate.main(argv)
    message = str(info.value.code)
    assert capsys.readouterr().out == ""
    assert message.startswith("error: ") and "\n" not in message
    return message


@pytest.fixture(scope="module")
def digits_preset(tmp_path_factory):
    """A tiny classifier trained for one epoch on the digits, and its preset directory."""
    source = data.load_source("digits", SIZE)
    train = list(source.train.records.as_numpy_iterator())
    images = np.stack([r["image"] for r in train]).astype("float32")
    labels = keras.utils.to_categorical([r["label"] for r in train], 10)
    model = _classifier(source.class_names, crop_pct=1.0)
    model.compile(keras.optimizers.Adam(2e-3), "categorical_crossentropy")
    model.fit(images, labels, batch_size=32, epochs=1, verbose=0)
    path = tmp_path_factory.mktemp("digits") / "preset"
    model.save_to_preset(path)
    return str(path), model


@pytest.fixture(scope="module")
def imagenet_preset(tmp_path_factory):
    """A tiny classifier of the 1000 ImageNet classes (random weights) and its preset."""
    model = _classifier(imagenet.class_names(), crop_pct=0.875, seed=1)
    path = tmp_path_factory.mktemp("imagenet") / "preset"
    model.save_to_preset(path)
    return str(path), model


@pytest.fixture(scope="module")
def digits_results(digits_preset, tmp_path_factory):
    """`python -m training.evaluate PRESET --data digits --output FILE` on TensorFlow, run once
    (in this process): its returned results, what it printed and the file it wrote. The other
    backends are measured against the same results."""
    path, _ = digits_preset
    output = tmp_path_factory.mktemp("digits_results") / "results.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = evaluate.main([path, "--data", "digits", "--output", str(output),
                                 "--verbose", "0"])
    return results, printed.getvalue(), json.loads(output.read_text())


@pytest.mark.slow
def test_digits_top1_equals_keras_evaluate(digits_preset, digits_results):
    _, model = digits_preset
    results, printed, written = digits_results
    assert json.loads(printed) == results == written

    # Keras' evaluate of the same model on the same 360 held-out scans, transformed by
    # keras_coat.imagenet (not by the tf.data pipeline evaluate uses).
    held_out = list(data.load_source("digits", SIZE).validation.records.as_numpy_iterator())
    images = np.stack(
        [keras.ops.convert_to_numpy(imagenet.eval_transform(r["image"], SIZE, 1.0))
         for r in held_out]
    )  # fmt: skip
    labels = keras.utils.to_categorical([r["label"] for r in held_out], 10)
    model.compile(
        loss="categorical_crossentropy",
        metrics=[
            keras.metrics.CategoricalAccuracy(name="top1"),
            keras.metrics.TopKCategoricalAccuracy(5, name="top5"),
        ],
    )
    reference = model.evaluate(images, labels, batch_size=50, verbose=0, return_dict=True)
    assert results["images"] == 360 and results["classes_matched_by"] == "name"
    assert round(results["top1"] * 3.6) == round(reference["top1"] * 360)
    assert round(results["top5"] * 3.6) == round(reference["top5"] * 360)
    assert results["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert results["top1"] > 20  # trained: better than chance (10%)
    assert results["preprocessing"]["crop_pct"] == 1.0 and results["images_per_second"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_backends_measure_the_same(digits_preset, digits_results, backend):
    path, _ = digits_preset
    on_tensorflow = digits_results[0]  # the same preset, data, batch size (64) and verbosity
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-m", "training.evaluate", path, "--data", "digits"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout)
    assert results["backend"] == backend and results["images"] == 360
    assert results["top1"] == on_tensorflow["top1"] and results["top5"] == on_tensorflow["top5"]
    assert results["loss"] == pytest.approx(on_tensorflow["loss"], rel=1e-4)
    assert on_tensorflow["backend"] == "tensorflow"


@pytest.mark.slow
def test_an_imagenet_validation_folder_is_matched_by_wordnet_id(imagenet_preset, tmp_path):
    """timm's layout (val/<wnid>/*), a subset of the classes, scored against the full head."""
    path, model = imagenet_preset
    staged = _write_images(tmp_path / "staged", 6, seed=0)
    pixels = np.stack([imagenet.load_image(p, SIZE, 0.875) for p in staged])
    predicted = model.predict(pixels, verbose=0).argmax(-1)
    wnids = imagenet.class_wnids()
    # Four images in the folder of the class the model predicts, two in another one's.
    labels = [*predicted[:4], *((predicted[4:] + 1) % 1000)]
    root = tmp_path / "imagenet"
    for i, (image, label) in enumerate(zip(staged, labels)):
        os.makedirs(root / "val" / wnids[label], exist_ok=True)
        os.rename(image, root / "val" / wnids[label] / f"{i}.png")
    _write_images(root / "train" / wnids[3], 1, seed=1)  # a train/val tree: val/ is measured

    results = evaluate.evaluate(path, f"folder:{root}", batch_size=4, verbose=0)
    assert results["images"] == 6 and results["classes"] == 1000
    assert results["data_classes"] == len(set(labels))
    assert results["classes_matched_by"] == "wordnet id"
    assert results["top1"] == pytest.approx(100 * 4 / 6)
    assert results["data"] == f"folder:{root / 'val'}"


@pytest.mark.slow
def test_tfds_imagenet2012_validation_split(imagenet_preset):
    tfds = pytest.importorskip("tensorflow_datasets")
    path, model = imagenet_preset
    with tfds.testing.mock_data(num_examples=6):
        results = evaluate.evaluate(
            path, "tfds:imagenet2012:validation", batch_size=4, verbose=0,
            manual_dir="/nonexistent",
        )  # fmt: skip
        examples = list(tfds.load(
            "imagenet2012", split="validation", decoders={"image": tfds.decode.SkipDecoding()}
        ).as_numpy_iterator())  # fmt: skip
    assert results["images"] == len(examples) == 6
    assert results["data"] == "tfds:imagenet2012:validation"
    # TFDS labels are indices into its wnid list, which is keras_coat's class order.
    images = np.stack([
        keras.ops.convert_to_numpy(imagenet.eval_transform(
            tf.io.decode_image(e["image"], channels=3).numpy(), SIZE, 0.875
        ))
        for e in examples
    ])  # fmt: skip
    labels = np.array([e["label"] for e in examples])
    probabilities = model.predict(images, verbose=0).astype(np.float64)
    expected_loss = -np.log(probabilities[np.arange(6), labels]).mean()
    assert results["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert results["top1"] == pytest.approx(100 * np.mean(probabilities.argmax(-1) == labels))


def test_bad_inputs_get_one_clear_error_each(imagenet_preset, tmp_path, capsys):
    path, _ = imagenet_preset
    output = tmp_path / "results.json"

    def error(data, preset=path):
        return _error_of([preset, "--data", data, "--output", str(output), "--verbose", "0"],
                         capsys)

    missing = tmp_path / "missing"
    assert f"{str(missing)!r} is not a directory" in error(f"folder:{missing}")
    unknown = tmp_path / "unknown"
    _write_images(unknown / imagenet.class_wnids()[0], 1, seed=0)
    _write_images(unknown / "sea_serpents", 1, seed=1)
    assert "1 class(es) the model does not know: 'sea_serpents'" in error(f"folder:{unknown}")
    ambiguous = tmp_path / "ambiguous"
    _write_images(ambiguous / "crane", 1, seed=0)  # two ImageNet classes are called crane
    assert "several classes named 'crane'; name the data's classes by WordNet id" in error(
        f"folder:{ambiguous}"
    )
    empty = tmp_path / "empty"
    os.makedirs(empty / "tench")
    assert "no images" in error(f"folder:{empty}")
    os.makedirs(tmp_path / "nothing")
    assert "no images" in error(f"folder:{tmp_path / 'nothing'}")
    broken = tmp_path / "broken"
    _write_images(broken / "tench", 2, seed=0)
    (broken / "tench" / "image1.png").write_bytes(b"\x89PNG\r\n\x1a\n half a file")
    message = error(f"folder:{broken}")
    assert "cannot be read" in message and str(broken / "tench" / "image1.png") in message
    assert "Unknown data 'imagenet2012'; use folder:PATH, tfds:NAME[:SPLIT] or digits" in error(
        "imagenet2012"
    )
    assert "does not exist" in error("digits", preset=str(tmp_path / "no_preset"))
    assert not output.exists()


def test_classes_by_position_and_a_headless_preset(tmp_path, capsys):
    model = _classifier(["a", "b", "c"], crop_pct=1.0)
    assert evaluate.match_classes(["b", "c"], model) == ([1, 2], "name")
    model.class_names = None
    assert evaluate.match_classes(["x", "y", "z"], model) == ([0, 1, 2], "position")
    with pytest.raises(ValueError, match="carries no class names, and its 3 classes cannot be"):
        evaluate.match_classes(["x", "y"], model)
    headless = tmp_path / "headless"
    model.with_new_head(None).save_to_preset(headless)
    message = _error_of([str(headless), "--data", "digits"], capsys)
    assert "is headless (no classes); nothing to evaluate" in message


def test_batch_results_count_as_keras_metrics_do():
    probabilities = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
    labels = np.array([1, 0, 0])
    top1, top2, loss = evaluate.batch_results(probabilities, labels, "softmax", 2)
    # A tie goes to the first class for top-1 and counts for top-k (in_top_k); 0 is clipped.
    assert (top1, top2) == (0, 2)
    assert loss == pytest.approx(-np.log(0.5) - np.log(0.2) - np.log(1e-7))
    logits = np.log(probabilities[1:2])
    assert evaluate.batch_results(logits, labels[1:2], None, 2)[2] == pytest.approx(-np.log(0.2))
