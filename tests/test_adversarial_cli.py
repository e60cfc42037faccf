"""Ordinary mistakes and hostile files on the command lines: `python -m keras_coat predict`,
`python -m conversion.convert` and `python -m training.train`.

Every bad invocation must end with exit status 2 (usage) or 1, one `error:` line on stderr and no
traceback, run nothing from a hostile file (marker files), leave nothing behind, and the corrected
command must then work. Most cases call each command's `main` in this process (as `python -m`
does, a `SystemExit` message is printed and gives status 1); the image bombs run through
`python -m keras_coat predict`'s `main` in a fresh process under RLIMIT_AS.
"""

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conversion import convert as convert_cli
from keras_coat import __main__ as keras_coat_cli
from tests._weights_fixtures import REPO_ROOT, Hostile, write_manifest
from training import train as train_cli

pytestmark = pytest.mark.adversarial
torch = pytest.importorskip("torch")

TINY = '{"embed_dims": [16, 16, 16, 16], "serial_depths": [1, 1, 1, 1], "mlp_ratios": [2, 2, 2, 2]}'


def _png(width, height, idat):
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _real_png(width, height):
    rows = b"".join(b"\0" + bytes(3 * width) for _ in range(height))
    return _png(width, height, zlib.compress(rows, 9))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs shared by all cases; every case runs in its own empty folder besides."""
    root = tmp_path_factory.mktemp("inputs")
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(root / "ok.png")
    (root / "bomb.png").write_bytes(_png(30000, 30000, zlib.compress(b"\0" * 4096)))
    (root / "bomb_jpeg.jpg").write_bytes(_jpeg_declaring(root, 60000, 60000))
    (root / "bomb_81mpx.png").write_bytes(_png(9000, 9000, zlib.compress(b"\0" * 4096)))
    (root / "bomb_long.png").write_bytes(_png(20000, 1, zlib.compress(b"\0" * 4096)))
    (root / "wide.png").write_bytes(_real_png(16000, 1))
    write_manifest(
        root / "ftp_manifest.json", {"coat_lite_tiny": {"url": "ftp://x/a.pth", "sha256": "0" * 8}}
    )
    (root / "truncated.png").write_bytes((root / "ok.png").read_bytes()[:60])
    (root / "not_an_image.png").write_text("hello")
    (root / "garbage.weights.h5").write_bytes(b"\x00garbage" * 64)
    (root / "bad_manifest.json").write_text("{not json")
    (root / "afile").write_text("a file, not a folder")
    marker = root / "pwned"
    torch.save({"model": {"w": torch.ones(2)}, "x": Hostile(f"touch {marker}")}, root / "evil.pth")

    import keras_coat
    from tests.reference import timm_model

    good = keras_coat.create_model("coat_lite_tiny", input_shape=(32, 32, 3))
    good.save_weights(str(root / "good.weights.h5"))
    torch.save({"model": timm_model("coat_lite_tiny").state_dict()}, root / "coat_lite_tiny.pth")
    return root


def _jpeg_declaring(root, height, width):
    path = root / "small.jpg"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    path.unlink()
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _run(main, argv, capsys):
    """Runs a command's `main` as `python -m` would: returns (exit status, stderr)."""
    capsys.readouterr()
    try:
        result = main(argv)
        status = result if isinstance(result, int) else 0
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
            status = 1
        else:
            status = exit_.code or 0
    return status, capsys.readouterr().err


def _tree(folder):
    return sorted(
        os.path.relpath(os.path.join(d, n), folder)
        for d, dirs, names in os.walk(folder)
        for n in dirs + names
    )


def _assert_clean_failure(status, err, expected_status, fragment):
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == expected_status, err
    assert "Traceback" not in err, err
    if lines[0].startswith("usage:"):  # argparse: usage lines, then "<prog>: error: ..."
        assert expected_status == 2 and ": error: " in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[-1], err


# ------------------------------------------------------------------------------ predict

PREDICT = ["predict", "--model", "coat_lite_tiny"]
PREDICT_CASES = {
    # name: (arguments, expected status, stderr fragment, environment)
    "size_not_multiple_of_32": (
        ["{ok}", "--image-size", "100", "--weights", "{good}"], 1, "multiples of 32", {}),
    "size_huge": (["{ok}", "--image-size", "100000"], 2, "at most 2048", {}),
    "size_zero": (["{ok}", "--image-size", "0"], 2, "positive integer", {}),
    "size_text": (["{ok}", "--image-size", "big"], 2, "positive integer", {}),
    "top_too_large": (["{ok}", "--top", "1001"], 2, "at most 1000", {}),
    "no_image": ([], 2, "required", {}),
    "missing_weights": (
        ["{ok}", "--image-size", "32", "--weights", "{inputs}/absent.pth"], 1, "absent.pth", {}),
    "malicious_weights": (
        ["{ok}", "--image-size", "32", "--weights", "{inputs}/evil.pth"], 1, "evil.pth", {}),
    "garbage_weights_h5": (
        ["{ok}", "--image-size", "32", "--weights", "{inputs}/garbage.weights.h5"], 1, "", {}),
    "weights_is_a_folder": (
        ["{ok}", "--image-size", "32", "--weights", "{inputs}"], 1, "", {}),
    "weights_wrong_extension": (
        ["{ok}", "--image-size", "32", "--weights", "{inputs}/bad_manifest.json"],
        1, "must end with", {}),
    "manifest_not_json": (
        ["{ok}", "--image-size", "32"], 1, "not valid JSON",
        {"KERAS_COAT_WEIGHTS_MANIFEST": "{inputs}/bad_manifest.json"}),
    "manifest_missing": (
        ["{ok}", "--image-size", "32"], 1, "Cannot read",
        {"KERAS_COAT_WEIGHTS_MANIFEST": "{inputs}/absent.json"}),
    "manifest_hostile_url": (
        ["{ok}", "--image-size", "32"], 1, "must start with http",
        {"KERAS_COAT_WEIGHTS_MANIFEST": "{manifest_ftp}"}),
    "decompression_bomb_png": (
        ["{inputs}/bomb.png", "--image-size", "32"], 1, "(900000000 pixels)", {}),
    "png_over_the_pixel_cap": (
        ["{inputs}/bomb_81mpx.png", "--image-size", "32"], 1, "declares 9000x9000", {}),
    "png_over_the_side_cap": (
        ["{inputs}/bomb_long.png", "--image-size", "32"], 1, "declares 20000x1", {}),
    "decompression_bomb_jpeg": (
        ["{inputs}/bomb_jpeg.jpg", "--image-size", "32"], 1, "(3600000000 pixels)", {}),
    "extreme_aspect_ratio": (["{inputs}/wide.png", "--image-size", "32"], 1, "aspect ratio", {}),
    "truncated_image": (["{inputs}/truncated.png", "--image-size", "32"], 1, "truncated.png", {}),
    "not_an_image": (["{inputs}/not_an_image.png", "--image-size", "32"], 1, "cannot read image: cannot identify", {}),
    "missing_image": (["{inputs}/absent.png", "--image-size", "32"], 1, "absent.png", {}),
}


def _fill(values, files, tmp_path):
    names = {
        "inputs": str(files), "ok": str(files / "ok.png"),
        "good": str(files / "good.weights.h5"), "manifest_ftp": str(files / "ftp_manifest.json"),
        "work": str(tmp_path / "work"), "src": str(files / "coat_lite_tiny.pth"),
    }  # fmt: skip
    filled = []
    for value in values:
        for key, name in names.items():
            value = value.replace("{" + key + "}", name)
        filled.append(value)
    return filled


@pytest.mark.parametrize("name", sorted(PREDICT_CASES))
def test_predict_refuses_cleanly(name, files, tmp_path, monkeypatch, capsys):
    argv, status, fragment, env = PREDICT_CASES[name]
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.delenv("KERAS_COAT_WEIGHTS_MANIFEST", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, _fill([value], files, tmp_path)[0])
    inputs_before = _tree(files)
    result = _run(keras_coat_cli.main, PREDICT + _fill(argv, files, tmp_path), capsys)
    _assert_clean_failure(*result, status, fragment)
    assert not (files / "pwned").exists()
    assert _tree(files) == inputs_before
    assert not (tmp_path / "keras_home").exists() or _tree(tmp_path / "keras_home") == [
        "models", "models/keras_coat"
    ]


def test_predict_works_after_the_failures(files, capsys):
    argv = PREDICT + [str(files / "ok.png"), "--image-size", "32", "--top", "3", "--json"]
    capsys.readouterr()
    assert keras_coat_cli.main(argv + ["--weights", str(files / "good.weights.h5")]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert len(json.loads(line)["predictions"]) == 3


# Runs in a fresh process: after start-up, the address space may grow by only BOMB_MARGIN_MB,
# far less than the decoded 30000 x 30000 PNG (2.7 GB) or the resized 1 x 16000 one would take.
BOMB_DRIVER = r"""
import contextlib, io, json, resource, sys
from keras_coat.__main__ import main

def vm_size():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

limit = vm_size() + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
results = {}
for image in sys.argv[3:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["predict", image, "--model", "coat_lite_tiny", "--image-size", "32",
                       "--weights", sys.argv[2]])
    results[image] = [status, err.getvalue()]
print(json.dumps(results))
"""
BOMB_MARGIN_MB = 200


@pytest.mark.slow
def test_predict_image_bombs_under_a_memory_limit(files):
    images = [str(files / n) for n in ("bomb.png", "bomb_jpeg.jpg", "wide.png")]
    # The images are refused before any model is built: Keras' light NumPy backend suffices.
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="numpy")
    result = subprocess.run(
        [sys.executable, "-c", BOMB_DRIVER, str(BOMB_MARGIN_MB), str(files / "absent.pth"),
         *images],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    for image, (status, err) in outcomes.items():
        assert status == 1 and err.count("\n") == 1 and err.startswith("error: "), (image, err)
        assert "MemoryError" not in err, err


# ------------------------------------------------------------------------------ convert

CONVERT_CASES = {
    "output_under_a_file": (["{src}", "--output", "{inputs}/afile/x.weights.h5"], 1, "is a file"),
    "output_wrong_suffix": (["{src}", "--output", "{work}/x.h5"], 1, ".weights.h5"),
    "output_exists": (["{src}", "--output", "{inputs}/good.weights.h5"], 1, "--overwrite"),
    "output_in_proc": (["{src}", "--output", "/proc/keras_coat_x/x.weights.h5"], 1, "/proc"),
    "missing_source": (["{inputs}/absent.pth", "--output", "{work}/x.weights.h5"], 1, "absent"),
    "source_is_a_folder": (["{inputs}", "--output", "{work}/x.weights.h5"], 1, "not a file"),
    "malicious_source": (["{inputs}/evil.pth", "--output", "{work}/x.weights.h5"], 1, "evil.pth"),
    "garbage_source": (
        ["{inputs}/garbage.weights.h5", "--output", "{work}/x.weights.h5"], 1, "garbage"),
    "wrong_variant": (
        ["{src}", "--output", "{work}/x.weights.h5", "--model", "coat_mini"], 1, "coat_lite_tiny"),
    "bad_input_size": (["{src}", "--output", "{work}/x.weights.h5", "--input-size", "33"], 2,
                       "multiples of 32"),
    "zero_batch": (["{src}", "--output", "{work}/x.weights.h5", "--batch", "0"], 2, "--batch"),
    "nan_tolerance": (
        ["{src}", "--output", "{work}/x.weights.h5", "--tolerance", "nan"], 2, "--tolerance"),
    "unknown_model": (["{src}", "--output", "{work}/x.weights.h5", "--model", "coat_huge"], 2,
                      "coat_huge"),
}


@pytest.mark.parametrize("name", sorted(CONVERT_CASES))
def test_convert_refuses_cleanly(name, files, tmp_path, capsys):
    argv, status, fragment = CONVERT_CASES[name]
    argv = _fill(argv, files, tmp_path)
    if "--model" not in argv:
        argv += ["--model", "coat_lite_tiny"]
    inputs_before = _tree(files)
    _assert_clean_failure(*_run(convert_cli.main, argv, capsys), status, fragment)
    assert not (files / "pwned").exists()
    assert _tree(files) == inputs_before
    assert not (tmp_path / "work").exists()


def test_convert_works_after_the_failures(files, tmp_path, capsys):
    output = tmp_path / "work" / "coat_lite_tiny.weights.h5"
    argv = [str(files / "coat_lite_tiny.pth"), "--model", "coat_lite_tiny", "--output", str(output)]
    status, err = _run(convert_cli.main, argv, capsys)
    assert status == 0, err
    assert _tree(tmp_path / "work") == [output.name]


# ------------------------------------------------------------------------------ train

TRAIN = ["--recipe", "demo", "--image-size", "32", "--batch-size", "8", "--steps-per-epoch",
         "1", "--epochs", "1", "--no-export", "--verbose", "0"]  # fmt: skip
TINY_MODEL = ["--model-config", TINY]


def _corrupt(name, content):
    def prepare(out):
        out.mkdir()
        (out / name).write_bytes(content)

    return prepare


def _backup(out, weights_checksum=None):
    """A published backup (training.faults' layout) after epoch 1; its weights file is not read
    before the recipe is checked."""
    folder = out / "backup" / "000001"
    folder.mkdir(parents=True)
    files = {"model.weights.h5": b"weights", "training_metadata.json": b'{"epoch": 1, "steps": 0}'}
    sums = {name: hashlib.sha256(content).hexdigest() for name, content in files.items()}
    sums["model.weights.h5"] = weights_checksum or sums["model.weights.h5"]
    for name, content in files.items():
        (folder / name).write_bytes(content)
    (folder / "SHA256SUMS").write_text("".join(f"{sums[n]}  {n}\n" for n in files))


def _backup_with_damaged_recipe(out):
    _backup(out)
    (out / "recipe.json").write_text("[1, 2")


def _damaged_backup(out):
    _backup(out, weights_checksum="0" * 64)


TRAIN_CASES = {
    # name: (arguments, expected status, stderr fragment, prepare the output folder)
    "unknown_model": (["--model", "coat_huge"], 1, "coat_huge", None),
    "missing_dataset_folder": (["--dataset", "folder:{work}/absent"], 1, "absent", None),
    "output_is_a_file": (["--output-dir", "{inputs}/afile"], 1, "is a file", None),
    "output_under_a_file": (["--output-dir", "{inputs}/afile/run"], 1, "is a file", None),
    "corrupt_metrics": ([], 1, "metrics.json is damaged", _corrupt("metrics.json", b"{oops")),
    "metrics_not_utf8": ([], 1, "metrics.json is damaged", _corrupt("metrics.json", b"\xff\xfe{")),
    "damaged_recipe_of_a_resumable_run": ([], 1, "recipe.json is damaged",
                                          _backup_with_damaged_recipe),
    "only_backup_damaged": ([], 1, "No intact backup to resume from", _damaged_backup),
    "unknown_model_config_field": (["--model-config", '{"bogus": 1}'], 1, "bogus", None),
    "model_config_not_json": (["--model-config", "{oops"], 2, "--model-config", None),
    "missing_init_weights": (["--init-weights", "{work}/absent.weights.h5"], 1, "absent", None),
    "malicious_init_weights": (["--init-weights", "{inputs}/evil.pth"], 1, "evil.pth", None),
    "image_size_not_multiple_of_32": (["--image-size", "40"], 1, "multiple of 32", None),
    "batch_larger_than_dataset": (["--batch-size", "100000"], 1, "larger than", None),
    "negative_cpu_replicas": (["--cpu-replicas", "-1"], 1, "--cpu-replicas", None),
    "unknown_recipe": (["--recipe", "fast"], 2, "--recipe", None),
}


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_train_refuses_cleanly(name, files, tmp_path, capsys):
    argv, status, fragment, prepare = TRAIN_CASES[name]
    out = tmp_path / "run"
    if prepare:
        prepare(out)
    before = _tree(tmp_path)
    model = [] if {"--model", "--model-config"} & set(argv) else TINY_MODEL
    argv = _fill(TRAIN + model + ["--output-dir", str(out)] + argv, files, tmp_path)
    inputs_before = _tree(files)
    _assert_clean_failure(*_run(train_cli.main, argv, capsys), status, fragment)
    assert not (files / "pwned").exists()
    assert _tree(files) == inputs_before
    assert _tree(tmp_path) == before  # nothing written: no recipe.json, no folder


class _TrainingStarted(Exception):
    pass


def test_train_corrected_command_works_after_a_failed_start(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = TRAIN + TINY_MODEL + ["--output-dir", str(out)]
    status, err = _run(train_cli.main, argv + ["--dataset", f"folder:{tmp_path / 'absent'}"],
                       capsys)
    assert status == 1 and not out.exists(), err
    # A recipe.json left by an earlier version's failed start (no backup, nothing trained)
    # does not block the corrected command either. The run is stopped as fit begins (the
    # training itself is tested in test_training_distributed).
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps({"dataset": "folder:/elsewhere"}))
    import keras

    class StopAtStart(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            raise _TrainingStarted

    make_callbacks = train_cli.make_callbacks

    def with_stop(*args, **kwargs):
        callbacks, writer = make_callbacks(*args, **kwargs)
        return [StopAtStart()] + callbacks, writer

    monkeypatch.setattr(train_cli, "make_callbacks", with_stop)
    with pytest.raises(_TrainingStarted):
        train_cli.main(argv + ["--dataset", "digits"])
    assert json.loads((out / "recipe.json").read_text())["dataset"] == "digits"
