"""The README's examples run as written, and print no warning.

Each ```python block of README.md runs with only the textual changes listed in `BLOCKS` (each
applied to every occurrence), which keep it offline and fast: random weights instead of
``weights="imagenet"``, smaller input sizes. Nothing else is provided: a block that used a name
it never defines would fail. The files a block reads are made in its working folder first
(``photo.jpg``, a fine-tuned preset at ``runs/flowers/preset``); the block that publishes to the
Hugging Face Hub runs in a client process against the loopback Hub server (tests/hub_server.py).
A warning is a failure unless pytest's configuration filters it (upstream libraries only, each
with its reason, in pyproject.toml).

Every ``python -m`` command of a ```bash block is parsed by that module's own argument parser,
so a renamed command or option fails here; the walk those commands make (fine-tune a folder,
evaluate, predict, export) runs for real in tests/test_transfer.py.
"""

import pathlib
import re
import shlex
import textwrap
import warnings

import keras
import numpy as np
import pytest

from tests.conftest import TINY_LITE

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
OFFLINE = [('weights="imagenet"', "weights=None")]


def _photo():
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save("photo.jpg")


def _flowers_preset():
    """What `training.train --recipe transfer` leaves in runs/flowers/preset (a tiny model)."""
    import keras_coat
    from keras_coat.presets import ImagePreprocessing

    backbone = keras_coat.CoaTBackbone(**TINY_LITE, image_shape=(64, 64, 3))
    model = keras_coat.CoaTImageClassifier(
        backbone, num_classes=3, class_names=["daisy", "rose", "tulip"],
        preprocessing=ImagePreprocessing(image_size=(64, 64)),
    )
    model.save_to_preset("runs/flowers/preset")


# A distinctive line of each block -> (changes to its text, files to make first, how it runs).
BLOCKS = {
    "probabilities = model.predict(image[None], verbose=0)": (OFFLINE, _photo, "here"),
    'keras_coat.upload_preset("hf://me/coat-flowers", "runs/flowers/preset")': (
        [], _flowers_preset, "hub",
    ),
    "features = keras.Model(model.input, model.pyramid_outputs)": (
        OFFLINE + [("(512, 640, 3)", "(64, 96, 3)"), ("(2, 512, 640, 3)", "(2, 64, 96, 3)")],
        None,
        "here",
    ),
}


def readme_blocks(language="python"):
    """``[(line, code)]`` of every ```<language> block of README.md."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return [
        (text[: m.start()].count("\n") + 2, m.group(1))
        for m in re.finditer(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)
    ]


def _key(code):
    keys = [key for key in BLOCKS if key in code]
    assert len(keys) == 1, f"the README block\n{code}\nmatches {keys} in BLOCKS"
    return keys[0]


def test_every_readme_block_is_run():
    found = sorted(_key(code) for _, code in readme_blocks())
    assert found == sorted(BLOCKS)


def _prepared(line, code, key, tmp_path, monkeypatch):
    changes, make_files, _ = BLOCKS[key]
    for old, new in changes:
        assert old in code, f"README.md:{line} no longer contains {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # files the example reads and writes live here
    if make_files is not None:
        make_files()
    return code


@pytest.mark.slow
@pytest.mark.parametrize(
    "line, code", [(line, code) for line, code in readme_blocks() if BLOCKS[_key(code)][2] == "here"]
)
def test_readme_example_runs_without_warnings(line, code, tmp_path, monkeypatch):
    code = _prepared(line, code, _key(code), tmp_path, monkeypatch)
    keras.utils.set_random_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        # pytest's filters stay in force; everything else is recorded, every time.
        warnings.filterwarnings("always", append=True)
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})
    assert [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught] == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "line, code", [(line, code) for line, code in readme_blocks() if BLOCKS[_key(code)][2] == "hub"]
)
def test_readme_hub_example_publishes_and_loads_back(line, code, tmp_path, monkeypatch, hub_server):
    code = _prepared(line, code, _key(code), tmp_path, monkeypatch)
    script = f"""
import json, os, warnings
os.chdir({str(tmp_path)!r})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for action, message, category in {_pytest_filters()!r}:  # pyproject's, as pytest applies
        warnings.filterwarnings(action, message, getattr(__builtins__, category, Warning))
{textwrap.indent(code, "    ")}
print(json.dumps({{"tuned": list(tuned.class_names), "again": list(again.class_names),
                  "warnings": [f"{{w.category.__name__}}: {{w.message}}" for w in caught]}}))
"""
    result = hub_server.run_python(script, str(tmp_path / "home"))
    names = ["daisy", "rose", "tulip"]
    assert result == {"tuned": names, "again": names, "warnings": []}
    assert "README.md" in hub_server.files("me/coat-flowers")  # the model card


def _pytest_filters():
    """pyproject.toml's pytest warning filters as ``(action, message, category)``."""
    import tomllib

    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        entries = tomllib.load(f)["tool"]["pytest"]["ini_options"]["filterwarnings"]
    return [tuple(entry.split(":")[:3]) for entry in entries]


def _commands():
    """``[(line, module, argv)]`` of every ``python -m`` command in the README's bash blocks."""
    found = []
    for line, code in readme_blocks("bash"):
        for offset, command in enumerate(code.replace("\\\n", " ").splitlines()):
            words = shlex.split(command, comments=True)
            if words[:2] == ["python", "-m"]:
                found.append((line + offset, words[2], words[3:]))
    return found


def _parse(module, argv):
    if module == "keras_coat":
        from keras_coat.__main__ import build_parser

        return build_parser().parse_args(argv)
    if module == "training.train":
        from training.train import parse_args

        return parse_args(argv)
    if module == "training.evaluate":
        from training.evaluate import parse_args

        return parse_args(argv)
    raise AssertionError(f"the README runs python -m {module}: add its parser here")


def test_readme_commands_parse():
    commands = _commands()
    assert {module for _, module, _ in commands} == {
        "keras_coat", "training.train", "training.evaluate"}
    for line, module, argv in commands:
        try:
            _parse(module, argv)
        except SystemExit as e:
            raise AssertionError(f"README.md:{line}: python -m {module} {shlex.join(argv)}") from e
