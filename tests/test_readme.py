"""The README's Python examples run, and print no warning.

Each ```python block of README.md runs as written, with a few textual changes (each applied to
every occurrence) that keep it offline and fast: random weights instead of
``weights="imagenet"``, small input sizes, one epoch; the data it assumes (``images``, ``model``,
...) is provided. A warning is a failure unless pytest's configuration filters it (upstream
libraries only, each with its reason, in pyproject.toml). A new block must be added to `BLOCKS`.
"""

import pathlib
import re
import warnings

import keras
import numpy as np
import pytest

from tests.conftest import pixels

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
OFFLINE = [('weights="imagenet"', "weights=None")]


def _tiny_classifier():
    import keras_coat

    return keras_coat.CoaTLiteTiny(input_shape=(64, 64, 3), classes=10)


def _detection_data():
    rng = np.random.default_rng(0)
    boxes = np.full((8, 2, 4), -1.0, "float32")
    boxes[:, 0] = [10.0, 20.0, 60.0, 80.0]
    labels = np.full((8, 2), -1, "int32")
    labels[:, 0] = rng.integers(0, 20, 8)
    return {"images": pixels(8, 128), "boxes": boxes, "labels": labels,
            "new_images": pixels(8, 128, seed=1)}


# A distinctive line of each block -> (changes to its text, the names it assumes, slow).
BLOCKS = {
    "probabilities = model.predict(images)": (
        OFFLINE, lambda: {"images": pixels(1, 224)}, True,
    ),
    'name="coat_lite_small",': ([], dict, True),
    "features = keras.Model(backbone.input, backbone.pyramid_outputs)": (
        OFFLINE + [("(512, 640, 3)", "(64, 96, 3)")],
        lambda: {"images": pixels(2, 64, 96)},
        True,
    ),
    "segmenter = keras_hub.models.DeepLabV3ImageSegmenter(": (
        OFFLINE + [("(512, 512, 3)", "(128, 128, 3)")],
        dict,
        True,
    ),
    "model384 = keras_coat.CoaTLiteMedium(": (
        OFFLINE + [("(384, 384, 3)", "(64, 64, 3)"), ('include_top=False)', 'include_top=False, '
                                                       'input_shape=(64, 64, 3))'),
                   ('CoaTLiteSmall(weights=None)', 'CoaTLiteSmall(weights=None, '
                                                   'input_shape=(64, 64, 3))')],
        dict,
        True,
    ),
    'export_saved_model(model, "models/coat_lite_small", version=1)': (
        [], lambda: {"model": _tiny_classifier()}, True,
    ),
    'result = export_model(model, "model.tflite", "litert", precision="int8",': (
        [('"folder:photos", 224', '"digits", 64, count=32')],
        lambda: {"model": _tiny_classifier()},
        True,
    ),
    'model = keras_coat.CoaTImageClassifier.from_preset("coat_lite_small")': ([], dict, True),
    "detector.fit(train.shuffle(1000).batch(8, drop_remainder=True), epochs=20)": (
        OFFLINE + [("(256, 256, 3)", "(128, 128, 3)"), ("epochs=20", "epochs=1")],
        _detection_data,
        True,
    ),
}


# Blocks that need the network (a built-in preset downloads its checkpoint): run elsewhere.
NEEDS_NETWORK = {
    'model = keras_coat.CoaTImageClassifier.from_preset("coat_lite_small")': (
        "downloads the published coat_lite_small and coat_small checkpoints; the preset tests "
        "cover the same calls with local files"
    ),
}

# Blocks that still warn, and why; strict: the test fails once they no longer do, so that the
# entry goes.
KNOWN_WARNINGS = {
    "detector.fit(train.shuffle(1000).batch(8, drop_remainder=True), epochs=20)": (
        "fit warns three times: Keras notes that fit's default shuffle=True does not apply to a "
        "tf.data.Dataset, and the optimizer finds no gradients for the backbone's final "
        "LayerNorm (norm4), which the RetinaNet does not read (the backbone's, to fix there)"
    ),
}


def readme_blocks():
    """``[(line, code)]`` of every ```python block of README.md."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return [
        (text[: m.start()].count("\n") + 2, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    ]


def _key(code):
    keys = [key for key in BLOCKS if key in code]
    assert len(keys) == 1, f"the README block\n{code}\nmatches {keys} in BLOCKS"
    return keys[0]


def test_every_readme_block_is_run():
    found = sorted(_key(code) for _, code in readme_blocks())
    assert found == sorted(BLOCKS)


def _cases():
    for line, code in readme_blocks():
        key = _key(code)
        marks = [pytest.mark.slow] if BLOCKS[key][2] else []
        if key in NEEDS_NETWORK:
            marks.append(pytest.mark.skip(reason=NEEDS_NETWORK[key]))
        if key in KNOWN_WARNINGS:
            marks.append(pytest.mark.xfail(reason=KNOWN_WARNINGS[key], strict=True))
        yield pytest.param(line, code, key, id=f"README.md:{line}", marks=marks)


@pytest.mark.parametrize("line, code, key", list(_cases()))
def test_readme_example_runs_without_warnings(line, code, key, tmp_path, monkeypatch):
    import keras_coat

    changes, names, _ = BLOCKS[key]
    for old, new in changes:
        assert old in code, f"README.md:{line} no longer contains {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # files the example writes land here
    keras.utils.set_random_seed(0)
    namespace = {"keras": keras, "keras_coat": keras_coat, **names()}
    with warnings.catch_warnings(record=True) as caught:
        # pytest's filters stay in force; everything else is recorded, every time.
        warnings.filterwarnings("always", append=True)
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    assert [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught] == []
