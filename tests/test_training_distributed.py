"""Training through the command line in subprocesses: strategies and fault tolerance.

Logical CPU devices and TF_CONFIG must be set before TensorFlow initializes, so every run is a
fresh `python -m training.train` process. Models are a tiny custom CoaT at 32x32 on digits, a
couple of steps per epoch, to keep each test small.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = '{"embed_dims": [16, 16, 16, 16], "serial_depths": [1, 1, 1, 1], "mlp_ratios": [2, 2, 2, 2]}'
COMMON = [
    "--recipe", "demo", "--model-config", TINY, "--batch-size", "16", "--steps-per-epoch", "2",
    "--no-export", "--verbose", "2", "--seed", "3",
]  # fmt: skip
# A tiny detector (training.detection) on 64x64 canvases: 3 steps of 4 canvases an epoch.
DETECTION = [
    "--task", "detection", "--model-config", TINY, "--canvas-size", "64", "--digit-sizes", "12",
    "28", "--max-digits", "2", "--batch-size", "4", "--train-canvases", "12",
    "--held-out-canvases", "4", "--show", "1", "--verbose", "2", "--seed", "3",
]  # fmt: skip
# Per task: its options and the files of a completed run, besides those every run leaves.
TASKS = {
    "classification": (COMMON, ["best.keras", "preset"]),
    "detection": (DETECTION, ["detections.png"]),
}
TIMEOUT = 600

# A run whose callbacks end by blocking after the first epoch (so after the first backup):
# the test then kills it with SIGKILL at a known point.
PAUSING_DRIVER = """
import sys, time, keras
from training import train
make_callbacks = train.make_callbacks
class PauseAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        open(sys.argv[1], "w").close()
        time.sleep(3600)
def pausing(*args, **kwargs):
    callbacks, writer = make_callbacks(*args, **kwargs)
    return callbacks + [PauseAfterFirstEpoch()], writer
train.make_callbacks = pausing
train.main(sys.argv[2:])
"""


# A run that waits, after the first step of its second epoch, for a signal that StopOnSignal notes.
WAITING_DRIVER = """
import sys, time, keras
from training import faults, train
make_callbacks = train.make_callbacks
class WaitForSignalInEpoch2(keras.callbacks.Callback):
    def __init__(self, stopper):
        super().__init__()
        self.stopper, self.epoch = stopper, 0
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == (1, 0):
            open(sys.argv[1], "w").close()
            while self.stopper.received is None:
                time.sleep(0.05)
def waiting(*args, **kwargs):
    callbacks, writer = make_callbacks(*args, **kwargs)
    stopper = next(c for c in callbacks if isinstance(c, faults.StopOnSignal))
    return [WaitForSignalInEpoch2(stopper)] + callbacks, writer
train.make_callbacks = waiting
train.main(sys.argv[2:])
"""


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _start(args, env=None, driver=None):
    command = [sys.executable] + (["-c", driver] if driver else ["-m", "training.train"]) + args
    return subprocess.Popen(
        command, cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def _finish(process):
    output, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, output[-4000:]
    return output


def _weights(path):
    import keras

    import keras_coat  # noqa: F401  (registers the layers)

    with contextlib.suppress(ImportError):
        import keras_hub  # noqa: F401  (a detector's classes)

    return keras.saving.load_model(path, compile=False).get_weights()


def _max_difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
@pytest.mark.timeout(900)  # measured up to 112 s on a busy machine (pyproject: 300 s)
def test_mirrored_on_two_cpu_replicas_matches_one_device(tmp_path):
    args = COMMON + ["--epochs", "2", "--deterministic"]
    single = _start(args + ["--strategy", "one_device", "--output-dir", str(tmp_path / "one")])
    mirrored = _start(args + ["--cpu-replicas", "2", "--output-dir", str(tmp_path / "two")])
    single_out, mirrored_out = _finish(single), _finish(mirrored)
    assert "OneDeviceStrategy: 1 replica(s), global batch 16 (16 per replica)" in single_out
    # --strategy auto picks MirroredStrategy over the two logical CPUs.
    assert "MirroredStrategy: 2 replica(s), global batch 16 (8 per replica)" in mirrored_out
    difference = _max_difference(
        _weights(tmp_path / "one" / "last.keras"), _weights(tmp_path / "two" / "last.keras")
    )
    assert difference < 1e-5
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs_completed"] == 2


# The oldest Keras keras_coat supports (pyproject.toml's floor), installed beside the venv by
# `make venv` (pip install --no-deps --target .venv-keras38 "keras==3.8.*"); it runs on the
# venv's TensorFlow and Keras' own dependencies.
OLDEST_KERAS = os.environ.get("KERAS_COAT_OLDEST_KERAS", os.path.join(ROOT, ".venv-keras38"))
# Prints the Keras it runs on, then trains.
VERSION_DRIVER = """
import sys, keras
print("Keras", keras.version())
from training import train
train.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("keras_install", ["newest", "oldest"])
@pytest.mark.timeout(900)  # measured up to 115 s on a busy machine (pyproject: 300 s)
def test_two_multi_worker_processes_end_with_identical_weights(tmp_path, keras_install):
    import keras

    path, version = ROOT, keras.version()
    if keras_install == "oldest":
        assert os.path.isdir(os.path.join(OLDEST_KERAS, "keras")), (
            f"the oldest supported Keras is not installed in {OLDEST_KERAS}; run `make venv`"
        )
        path, version = OLDEST_KERAS + os.pathsep + ROOT, "3.8."
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    args = COMMON + [
        "--epochs", "1", "--drop-path", "0.1", "--strategy", "multi_worker",
        "--output-dir", str(tmp_path),
    ]  # fmt: skip
    configs = [{"cluster": cluster, "task": {"type": "worker", "index": i}} for i in range(2)]
    workers = [
        _start(args, env=_env(TF_CONFIG=json.dumps(c), PYTHONPATH=path), driver=VERSION_DRIVER)
        for c in configs
    ]
    outputs = [_finish(worker) for worker in workers]
    assert all(f"Keras {version}" in output for output in outputs), outputs[0][:2000]
    assert "CollectiveAllReduceStrategy: 2 replica(s), global batch 16 (8" in outputs[0]
    chief = _weights(tmp_path / "last.keras")
    other = _weights(tmp_path / "workers" / "worker-1" / "last.keras")
    assert _max_difference(chief, other) == 0.0
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "complete"


@pytest.mark.slow
@pytest.mark.timeout(900)  # measured up to 186 s on a busy machine (pyproject: 300 s)
def test_killed_run_resumes_from_its_backup_and_matches_an_uninterrupted_one(tmp_path):
    args = COMMON + ["--epochs", "3", "--drop-path", "0.1", "--deterministic"]
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    marker = tmp_path / "first-epoch-done"
    pausing = _start(
        [str(marker)] + args + ["--output-dir", str(interrupted)], driver=PAUSING_DRIVER
    )
    uninterrupted = _start(args + ["--output-dir", str(reference)])
    deadline = time.time() + TIMEOUT
    while not marker.exists():
        assert pausing.poll() is None, pausing.communicate()[0][-4000:]
        assert time.time() < deadline, "the first epoch never ended"
        time.sleep(0.2)
    os.kill(pausing.pid, signal.SIGKILL)
    pausing.wait()
    assert pausing.returncode == -signal.SIGKILL
    backup = json.loads((interrupted / "backup" / "000001" / "training_metadata.json").read_text())
    assert (backup["epoch"], backup["steps"]) == (1, 0)
    assert (interrupted / ".lock-chief").exists()  # left by the killed run, but not held
    assert json.loads((interrupted / "metrics.json").read_text())["epochs_completed"] == 1

    resumed = _finish(_start(args + ["--output-dir", str(interrupted)]))
    _finish(uninterrupted)
    assert "Resuming from epoch 1" in resumed
    assert "Epoch 1/3" not in resumed and "Epoch 2/3" in resumed and "Epoch 3/3" in resumed
    log = (interrupted / "training_log.csv").read_text().splitlines()
    epochs = [line.split(",")[0] for line in log[1:]]
    assert epochs == ["0", "1", "2"]
    assert not (interrupted / "backup").exists()  # removed once the run completed
    assert not list(interrupted.glob(".lock-*"))
    metrics = json.loads((interrupted / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs_completed"] == 3
    difference = _max_difference(
        _weights(interrupted / "last.keras"), _weights(reference / "last.keras")
    )
    assert difference == 0.0

    # A completed run is left alone.
    again = _finish(_start(args + ["--output-dir", str(interrupted)]))
    assert "holds a completed run" in again


def _wait_for(marker, process):
    deadline = time.time() + TIMEOUT
    while not marker.exists():
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.time() < deadline, f"{marker.name} never appeared"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(900)  # measured up to 178 s on a busy machine (pyproject: 300 s)
def test_a_run_stopped_by_sigterm_within_an_epoch_resumes_at_its_next_step(tmp_path):
    # Every per-step random draw of the recipe: drop-path masks (the model's seed generators),
    # Mixup (per batch) and augmentation (per example); EMA swaps at each epoch's end.
    args = COMMON + [
        "--epochs", "2", "--steps-per-epoch", "3", "--drop-path", "0.1", "--mixup", "0.5",
        "--ema", "0.9", "--deterministic",
    ]  # fmt: skip
    out, reference, marker = tmp_path / "run", tmp_path / "reference", tmp_path / "waiting"
    first = _start([str(marker)] + args + ["--output-dir", str(out)], driver=WAITING_DRIVER)
    uninterrupted = _start(args + ["--output-dir", str(reference)])
    _wait_for(marker, first)
    os.kill(first.pid, signal.SIGTERM)
    stopped, _ = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 75, stopped[-4000:]
    position = json.loads((out / "backup" / "000002" / "training_metadata.json").read_text())
    assert (position["epoch"], position["steps"]) == (1, 1) and position["random_states"]

    resumed = _finish(_start(args + ["--output-dir", str(out)]))
    _finish(uninterrupted)
    assert (
        f"Resuming from epoch 1: backup {out}/backup/000002 (after step 1 of epoch 2, SHA-256 "
        "verified); epoch 2 continues at step 2 of 3." in resumed
    ), resumed[-4000:]
    assert "Epoch 1/2" not in resumed and "Epoch 2/2" in resumed
    log = (out / "training_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["0", "1"]
    for name in ("last.keras", "best.keras"):
        assert _max_difference(_weights(out / name), _weights(reference / name)) == 0.0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs_completed"] == 2
    assert metrics["val_accuracy"] == json.loads((reference / "metrics.json").read_text())[
        "val_accuracy"
    ]


@pytest.mark.slow
@pytest.mark.timeout(900)  # measured up to 134 s on a busy machine (pyproject: 300 s)
@pytest.mark.parametrize("task", TASKS)
def test_a_run_in_use_is_refused_sigterm_saves_and_a_damaged_backup_gives_way(tmp_path, task):
    out, marker = tmp_path / "run", tmp_path / "waiting"
    task_args, task_files = TASKS[task]
    args = task_args + ["--epochs", "3", "--steps-per-epoch", "3", "--output-dir", str(out)]
    first = _start([str(marker)] + args, driver=WAITING_DRIVER)
    _wait_for(marker, first)

    second = _start(args)
    refused, _ = second.communicate(timeout=TIMEOUT)
    assert second.returncode == 1, refused[-4000:]
    (line,) = [line for line in refused.splitlines() if line.startswith("error:")]
    assert re.match(
        rf"error: --output-dir '{re.escape(str(out))}' is in use by another training run "
        rf"\(pid {first.pid} on {re.escape(socket.gethostname())}, started "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, command: \S*python\S* -c .* "
        rf"{re.escape(str(out))}\)\. Wait for it to end or stop it, or use another output "
        r"directory\.$",
        line,
    ), line

    os.kill(first.pid, signal.SIGTERM)
    stopped, _ = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 75, stopped[-4000:]
    backup = out / "backup" / "000002"
    assert (
        f"Stopped by SIGTERM after step 1 of epoch 2; backup saved in {backup}. Rerun the same "
        "command to continue from it." in stopped
    )
    position = json.loads((backup / "training_metadata.json").read_text())
    assert (position["epoch"], position["steps"]) == (1, 1)

    weights = backup / "model.weights.h5"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    resumed = _finish(_start(args))
    (aside,) = (out / "damaged-backups").iterdir()
    assert (
        f"Damaged backup: {backup}: model.weights.h5 ({size // 2} bytes) does not match its "
        f"SHA-256 in SHA256SUMS. Resuming from the newest intact backup, {out}/backup/000001, "
        f"instead; the damaged files are moved to {aside}." in resumed
    )
    assert (
        f"Resuming from epoch 1: backup {out}/backup/000001 (after epoch 1, SHA-256 verified)."
        in resumed
    )
    assert "Epoch 1/3" not in resumed and "Epoch 2/3" in resumed and "Epoch 3/3" in resumed
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "damaged-backups", "last.keras", "logs", "metrics.json", "recipe.json",
        "training_log.csv", *task_files,
    ])  # fmt: skip
