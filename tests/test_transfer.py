"""The small-folder fine-tuning recipe (`--recipe transfer`), end to end: a preset in, a preset
out that carries the folder's class names and preprocessing, which evaluate, predict and the
export read.

The starting preset is a tiny CoaT-Lite (32x32) pretrained for a minute on generated images of
six kinds of pattern (stripes of four orientations, checkers, rings); the folder holds four of the
kinds, 100 training and 25 held-out images each, drawn anew. Every image has random colours, so
only what the backbone learnt of shape and orientation tells the classes apart: from a random
backbone, a tiny CoaT-Lite learns the training images' colours and stays near chance on the
held-out ones.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

import keras_coat
from keras_coat import imagenet
from keras_coat import __main__ as keras_coat_cli
from keras_coat.__main__ import print_top_classes
from keras_coat.presets import ImagePreprocessing
from tests.test_models import TINY_LITE
from training import evaluate, recipes, train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATTERNS = ("checkers", "horizontal_stripes", "rings", "vertical_stripes", "diagonal_stripes",
            "antidiagonal_stripes")  # fmt: skip
FOLDER_CLASSES = list(PATTERNS[:4])
SIZE = 32
# Stated: the held-out accuracy the recipe reaches on the folder (measured: 1.0 on the 100
# held-out images of two draws of the folder).
HELD_OUT_ACCURACY = 0.9
TRAIN_IMAGES, HELD_OUT_IMAGES = 100, 25  # per class
TIMEOUT = 1200
# The shared run (pretraining, then the recipe in a subprocess) takes 2-5 minutes on 2 busy cores;
# the first test to use it pays for it (pyproject's per-test limit is 300 s).
pytestmark = pytest.mark.timeout(900)
PRETRAIN_EPOCHS = 20


def pattern(kind, rng, size=48):
    """One image of `kind`: two random colours in a pattern of random period and phase, noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) * (48 / size)
    period, phase = rng.uniform(6, 12), rng.uniform(0, 2 * np.pi)
    coordinate = {
        "horizontal_stripes": lambda: y,
        "vertical_stripes": lambda: x,
        "diagonal_stripes": lambda: (x + y) / 1.4,
        "antidiagonal_stripes": lambda: (x - y) / 1.4,
        "rings": lambda: np.hypot(y - rng.uniform(14, 34), x - rng.uniform(14, 34)),
    }
    if kind == "checkers":
        wave = np.sin(2 * np.pi * x / period + phase) * np.sin(2 * np.pi * y / period + phase)
    else:
        wave = np.sin(2 * np.pi * coordinate[kind]() / period + phase)
    foreground, background = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = np.where((wave > 0)[..., None], foreground, background)
    return np.clip(image + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)


def _pretrained_preset(path):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, len(PATTERNS), 1800)
    images = np.stack([pattern(PATTERNS[i], rng, SIZE) for i in labels]).astype("float32")
    labels = keras.utils.to_categorical(labels)
    keras.utils.set_random_seed(0)
    backbone = keras_coat.CoaTBackbone(**TINY_LITE, image_shape=(SIZE, SIZE, 3))
    model = keras_coat.CoaTImageClassifier(
        backbone, num_classes=len(PATTERNS), class_names=list(PATTERNS),
        preprocessing=ImagePreprocessing(image_size=SIZE, crop_pct=1.0),
    )  # fmt: skip
    model.compile(keras.optimizers.AdamW(2e-3), "categorical_crossentropy", metrics=["accuracy"])
    model.fit(images[:1500], labels[:1500], batch_size=32, epochs=PRETRAIN_EPOCHS, verbose=0)
    # Features worth transferring (measured: 0.95 of 300 new images).
    assert model.evaluate(images[1500:], labels[1500:], verbose=0)[1] > 0.85
    model.save_to_preset(path)


def _write_folder(root):
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_IMAGES), ("val", HELD_OUT_IMAGES)):
        for kind in FOLDER_CLASSES:
            os.makedirs(root / split / kind)
            for i in range(count):
                Image.fromarray(pattern(kind, rng)).save(root / split / kind / f"{i}.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(the folder, the run's output folder, its output) of the transfer recipe's command."""
    root = tmp_path_factory.mktemp("transfer")
    _pretrained_preset(root / "start")
    _write_folder(root / "shapes")
    output = root / "run"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3",
               KERAS_BACKEND="tensorflow")  # fmt: skip
    command = [
        sys.executable, "-m", "training.train", "--recipe", "transfer",
        "--dataset", f"folder:{root / 'shapes'}", "--init-weights", str(root / "start"),
        "--image-size", str(SIZE), "--output-dir", str(output), "--verbose", "2",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root,
                            timeout=TIMEOUT)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "shapes", output, result.stdout


@pytest.mark.slow
def test_the_recipe_reaches_the_stated_accuracy_and_writes_a_preset(run):
    folder, output, printed = run
    assert "Recipe transfer: the preset" in printed and "with a new head at 32px" in printed
    assert "random_resized_crop -> horizontal_flip -> color_jitter -> one_hot -> batch" in printed
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs_completed"] == 10
    assert metrics["val_accuracy"] >= HELD_OUT_ACCURACY

    model = keras_coat.CoaTImageClassifier.from_preset(str(output / "preset"))
    assert model.class_names == FOLDER_CLASSES and model.num_classes == 4
    assert model.preprocessing.image_size == (SIZE, SIZE)
    assert model.preprocessing.crop_pct == recipes.TRANSFER.eval_crop_pct
    metadata = json.loads((output / "preset" / "metadata.json").read_text())
    assert metadata["metrics"]["val_accuracy"] == metrics["val_accuracy"]
    assert metadata["metrics"]["held_out_images"] == 4 * HELD_OUT_IMAGES
    # Local paths by their last part only: a preset may be published.
    assert metadata["training"] == {"recipe": "transfer", "dataset": "folder:shapes",
                                    "init_weights": "start", "epochs": 10}
    # The run's other models carry the names too.
    best = keras.saving.load_model(output / "best.keras", compile=False)
    assert best.class_names == FOLDER_CLASSES


@pytest.mark.slow
def test_evaluate_measures_the_runs_validation_accuracy(run):
    folder, output, _ = run
    metrics = json.loads((output / "metrics.json").read_text())
    results = evaluate.evaluate(str(output / "preset"), f"folder:{folder}", verbose=0)
    assert results["images"] == 4 * HELD_OUT_IMAGES and results["classes_matched_by"] == "name"
    assert results["top1"] == pytest.approx(100 * metrics["val_accuracy"])


@pytest.mark.slow
def test_predict_and_the_export_name_the_folder_classes(run, capsys):
    import tensorflow as tf

    folder, output, _ = run
    model = keras_coat.CoaTImageClassifier.from_preset(str(output / "preset"))
    paths = [str(folder / "val" / kind / "0.png") for kind in FOLDER_CLASSES]
    crop = model.preprocessing.crop_pct
    images = [imagenet.load_image(path, SIZE, crop) for path in paths]
    print_top_classes(model, images, paths, top=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0::3] == paths
    predicted = [line.split()[-1] for line in lines[1::3]]
    assert set(predicted) <= set(FOLDER_CLASSES) and "(" not in lines[1]
    assert sum(p == kind for p, kind in zip(predicted, FOLDER_CLASSES)) >= 3

    served = tf.saved_model.load(str(output / "export" / "1")).signatures["serving_bytes"]
    answer = served(image_bytes=tf.constant([open(p, "rb").read() for p in paths]))
    names = [n.decode() for n in answer["class_names"].numpy()[:, 0]]
    assert names == predicted
    expected = model.predict(np.stack(images), verbose=0)
    np.testing.assert_allclose(answer["probabilities"].numpy(), expected, atol=1e-4)


@pytest.mark.slow
def test_the_command_line_predicts_and_exports_the_output_preset(run, tmp_path, capsys):
    """The README's walk on the command line: predict prints the folder's class names, and
    export writes a LiteRT file (verified in its runtime) with them beside it. Both commands'
    `main` run in this process, with their exit statuses checked, as `python -m keras_coat` calls
    it: a fresh process each would only import TensorFlow twice more (that entry point's own
    process is tested in tests/test_cli.py and tests/test_export.py)."""
    folder, output, _ = run
    image = str(folder / "val" / "rings" / "0.png")
    predict = ["predict", image, "--model", str(output / "preset"), "--top", "4"]
    capsys.readouterr()
    assert keras_coat_cli.main(predict) == 0, capsys.readouterr().err[-3000:]
    printed = capsys.readouterr().out
    assert sorted(line.split()[-1] for line in printed.splitlines()[1:]) == FOLDER_CLASSES
    exported = tmp_path / "folder.tflite"
    export = ["export", "--model", str(output / "preset"), "--format", "litert", "--output",
              str(exported)]  # fmt: skip
    assert keras_coat_cli.main(export) == 0, capsys.readouterr().err[-3000:]
    labels = (tmp_path / "folder.labels.txt").read_text().split()
    assert exported.stat().st_size > 0 and sorted(labels) == FOLDER_CLASSES


# ---------------------------------------------------------------------------------------------
# Fast checks


def test_the_recipe_is_sized_for_a_small_folder():
    r = recipes.get_recipe("transfer")
    assert (r.model, r.epochs, r.batch_size, r.ema_momentum) == ("preset", 10, 32, None)
    assert (r.mixup, r.cutmix, r.random_erasing, r.repeated_augmentations) == (0, 0, 0, 1)
    assert r.rand_augment_magnitude is None and r.color_jitter == 0.2
    assert r.crop_scale == (0.5, 1.0) and r.horizontal_flip and r.warmup_epochs == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--init-weights", "coat_lite_tiny"], "Recipe 'transfer' needs --dataset"),
        (["--dataset", "folder:x"], "fine-tunes a preset: pass --init-weights"),
        (["--dataset", "folder:x", "--init-weights", "imagenet"], "'imagenet' names none"),
    ],
)
def test_the_recipe_needs_a_folder_and_a_preset(argv, message):
    args = train.parse_args(["--recipe", "transfer", "--output-dir", "out", *argv])
    with pytest.raises(ValueError, match=message):
        train.resolve_recipe(args)


def test_predict_prints_the_models_own_class_names(capsys):
    keras.utils.set_random_seed(0)
    backbone = keras_coat.CoaTBackbone(**TINY_LITE, image_shape=(SIZE, SIZE, 3))
    model = keras_coat.CoaTImageClassifier(backbone, num_classes=3, class_names=["a", "b", "c"])
    images = [np.full((SIZE, SIZE, 3), 100.0, "float32")]
    print_top_classes(model, images, ["x.png"], top=5, as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert sorted(p["class"] for p in printed["predictions"]) == ["a", "b", "c"]
    assert "wnid" not in printed["predictions"][0]
    print_top_classes(model.with_new_head(1000), images, ["x.png"], top=1)
    line = capsys.readouterr().out.splitlines()[1]
    assert line.endswith(")") and "(n" in line  # ImageNet names with their WordNet ids
