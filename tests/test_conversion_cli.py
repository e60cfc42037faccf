"""`python -m conversion.convert`: authors' .pth and timm's .safetensors into .weights.h5."""

import os
import subprocess
import sys

import numpy as np
import pytest

import keras_coat
from conversion import convert as cli
from tests.reference import random_images, timm_model, torch_forward


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import argparse

    import torch
    from safetensors.torch import save_model

    folder = tmp_path_factory.mktemp("checkpoints")
    reference = timm_model("coat_lite_tiny", img_size=64)
    authors = folder / "coat_lite_tiny.pth"
    state = dict(reference.state_dict())
    state["norm1.weight"], state["norm1.bias"] = torch.ones(64), torch.zeros(64)  # unused, kept
    torch.save({"model": state, "epoch": 7, "args": argparse.Namespace(lr=5e-4)}, authors)
    timm_file = folder / "coat_lite_tiny.safetensors"
    save_model(reference, str(timm_file))  # keeps one name of each shared tensor
    return reference, authors, timm_file


@pytest.mark.parametrize("source", ["authors", "timm"])
def test_converts_and_verifies(checkpoints, tmp_path, source, capsys):
    reference, authors, timm_file = checkpoints
    output = tmp_path / "out" / "coat_lite_tiny.weights.h5"
    path = authors if source == "authors" else timm_file
    assert cli.main([str(path), "--model", "coat_lite_tiny", "--output", str(output),
                     "--input-size", "64", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "largest absolute logit difference vs timm" in printed
    difference = float(printed.split("= ")[1].split()[0])
    assert difference <= 1e-4
    model = keras_coat.CoaTLiteTiny(input_shape=(64, 64, 3), include_preprocessing=False,
                                    classifier_activation=None, weights=str(output))
    images = random_images(2, 64, 64)
    assert np.abs(np.asarray(model(images)) - torch_forward(reference, images)).max() <= 1e-4
    assert [p.name for p in output.parent.iterdir()] == [output.name]  # no temporaries left
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_wrong_variant_fails_and_writes_nothing(checkpoints, tmp_path, capsys):
    _, authors, _ = checkpoints
    output = tmp_path / "small.weights.h5"
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(authors), "--model", "coat_lite_small", "--output", str(output)])
    assert "lacks" in str(exit_info.value.code) and "serial_blocks1.2" in str(exit_info.value.code)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output", "x.h5"], "must end with .weights.h5"),
        (["--output", "{existing}"], "exists; pass --overwrite"),
        (["--output", "y.weights.h5", "--source-missing"], "does not exist"),
    ],
)
def test_bad_arguments_are_explained(checkpoints, tmp_path, argv, message):
    _, authors, _ = checkpoints
    existing = tmp_path / "existing.weights.h5"
    existing.write_bytes(b"keep me")
    source = str(authors)
    if "--source-missing" in argv:
        argv = [a for a in argv if a != "--source-missing"]
        source = str(tmp_path / "missing.pth")
    argv = [a.format(existing=existing) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([source, "--model", "coat_lite_tiny", *argv])
    assert message in str(exit_info.value.code)
    assert existing.read_bytes() == b"keep me"


def test_input_size_must_be_a_multiple_of_32(checkpoints, capsys):
    _, authors, _ = checkpoints
    with pytest.raises(SystemExit):
        cli.main([str(authors), "--model", "coat_lite_tiny", "--output", "a.weights.h5",
                  "--input-size", "100"])
    assert "multiples of 32" in capsys.readouterr().err


def test_variant_choices_are_the_model_table(capsys):
    assert cli.VARIANTS == tuple(keras_coat.presets.VARIANTS)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["x.pth", "--model", "coat_huge", "--output", "a.weights.h5"])
    assert "invalid choice: 'coat_huge'" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_entry_point(checkpoints, tmp_path):
    # A fresh process, so that --verify meets TensorFlow and timm in the converter's own import
    # order (the test session imported timm first in conftest.py).
    _, _, timm_file = checkpoints
    output = tmp_path / "cli.weights.h5"
    result = subprocess.run(
        [sys.executable, "-m", "conversion.convert", str(timm_file), "--model", "coat_lite_tiny",
         "--output", str(output), "--input-size", "64x96", "--verify"],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout and output.is_file()
    assert "largest absolute logit difference vs timm" in result.stdout


def test_writes_a_preset_ready_to_publish(checkpoints, tmp_path, capsys):
    reference, authors, _ = checkpoints
    folder = tmp_path / "presets" / "coat_lite_tiny"
    assert cli.main([str(authors), "--model", "coat_lite_tiny", "--preset-dir", str(folder),
                     "--input-size", "64", "--verify"]) == 0
    assert "largest absolute logit difference vs timm" in capsys.readouterr().out
    model = keras_coat.CoaTImageClassifier.from_preset(str(folder))
    assert model.preprocessing.crop_pct == 224 / 256 and model.preprocessing.image_size == (64, 64)
    assert len(model.class_names) == 1000
    images = random_images(2, 64, 64)
    pixels = (images * np.array(model.preprocessing.std) + np.array(model.preprocessing.mean)) * 255
    logits = torch_forward(reference, images)
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(model(pixels.astype("float32"))), expected, atol=1e-4)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["coat_lite_tiny"]
