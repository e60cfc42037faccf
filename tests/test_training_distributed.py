"""Training through the command line in subprocesses: strategies and fault tolerance.

Logical CPU devices and TF_CONFIG must be set before TensorFlow initializes, so every run is a
fresh `python -m training.train` process. Models are a tiny custom CoaT at 32x32 on digits, a
couple of steps per epoch, to keep each test small. The classifier's fault-tolerance scenarios
share their runs (the `story` fixture).
"""

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

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


# A run that waits, after the first step of its second epoch, for a signal that StopOnSignal
# notes.
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


# ---------------------------------------------------------------------------------------------
# Fault tolerance: a run in use, SIGKILL, SIGTERM within an epoch, a damaged backup.
#
# Each training process costs about half a minute of CPU (TensorFlow's import, tracing the first
# epoch), so the classification scenarios are one story, told once per module (`story`) and
# checked by the tests after it: every interruption continues the same run, and one
# uninterrupted run with the same arguments is the reference of every resumed one.

# One recipe for every scenario, with every per-step random draw of the recipe: drop-path masks
# (the model's seed generators), Mixup (per batch) and augmentation (per example); EMA swaps at
# each epoch's end. With --deterministic a resumed run must match the uninterrupted one exactly,
# so a backup that missed any of them would show. Three epochs of three steps: killed after
# epoch 1, the run is resumed, then stopped within epoch 2, so that its last resume trains in two
# fits (the rest of epoch 2, then epoch 3) between which EMA must carry over
# (training.keras_internals.SwapEMAWeightsAcrossFits).
FAULT_ARGS = COMMON + [
    "--epochs", "3", "--steps-per-epoch", "3", "--drop-path", "0.1", "--mixup", "0.5",
    "--ema", "0.9", "--deterministic",
]  # fmt: skip
# The whole story runs in the first of its tests: 5 training processes (2 at once at times) and
# 2 short ones; measured up to 441 s on a very busy machine (load 6 on 2 cores).
STORY_TIMEOUT = 1200


def _wait_for(marker, process):
    deadline = time.time() + TIMEOUT
    while not marker.exists():
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.time() < deadline, f"{marker.name} never appeared"
        time.sleep(0.2)


def _second_run(args):
    """Output and exit status of a run started while another holds its output directory."""
    second = _start(args)
    output, _ = second.communicate(timeout=TIMEOUT)
    return output, second.returncode


def _stop_with_sigterm(process):
    """Output and exit status of a run waiting in WAITING_DRIVER, sent SIGTERM."""
    os.kill(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=TIMEOUT)
    return output, process.returncode


def _position(backup):
    return json.loads((backup / "training_metadata.json").read_text())


def _damage(backup):
    """Truncates the backup's weights file to half; returns its new size."""
    weights = backup / "model.weights.h5"
    size = weights.stat().st_size // 2
    with open(weights, "r+b") as f:
        f.truncate(size)
    return size


def _assert_refused(output, status, out, holder_pid):
    assert status == 1, output[-4000:]
    (line,) = [line for line in output.splitlines() if line.startswith("error:")]
    assert re.match(
        rf"error: --output-dir '{re.escape(str(out))}' is in use by another training run "
        rf"\(pid {holder_pid} on {re.escape(socket.gethostname())}, started "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, command: \S*python\S* -c .* "
        rf"{re.escape(str(out))}\)\. Wait for it to end or stop it, or use another output "
        r"directory\.$",
        line,
    ), line


def _assert_stopped_after_step_1(output, status, backup, position, epoch):
    """The exit status and message of a run stopped by SIGTERM after step 1 of epoch `epoch`
    (1-based), and the training `position` recorded in its backup (folder `backup`)."""
    assert status == 75, output[-4000:]
    assert (
        f"Stopped by SIGTERM after step 1 of epoch {epoch}; backup saved in {backup}. Rerun the "
        "same command to continue from it." in output
    ), output[-4000:]
    assert (position["epoch"], position["steps"]) == (epoch - 1, 1)


def _assert_epochs_run(output, first, epochs, last=None):
    """The output of a resumed run shows epochs `first`..`last` (1-based; default: all) of
    `epochs` and none before."""
    shown = [f"Epoch {e}/{epochs}" for e in range(1, (last or epochs) + 1)]
    assert not any(epoch in output for epoch in shown[: first - 1]), output[-4000:]
    assert all(epoch in output for epoch in shown[first - 1 :]), output[-4000:]


def _assert_damaged_backup_gave_way(output, out, damaged_size, stopped, epochs, task_files):
    """A rerun of a run of `epochs` epochs stopped after step 1 of epoch `stopped` (1-based),
    whose newest backup (within that epoch) was damaged: it resumed from the one before (after
    the epoch before), saying so, and completed. `task_files`: the files of a completed run of
    its task, besides those every run leaves. With one backup per epoch before the stop, the
    damaged backup is number `stopped`."""
    damaged, intact = out / "backup" / f"{stopped:06d}", out / "backup" / f"{stopped - 1:06d}"
    (aside,) = (out / "damaged-backups").iterdir()
    assert (
        f"Damaged backup: {damaged}: model.weights.h5 ({damaged_size} bytes) does not match its "
        f"SHA-256 in SHA256SUMS. Resuming from the newest intact backup, {intact}, instead; the "
        f"damaged files are moved to {aside}." in output
    ), output[-4000:]
    assert (
        f"Resuming from epoch {stopped - 1}: backup {intact} (after epoch {stopped - 1}, SHA-256 "
        "verified)." in output
    ), output[-4000:]
    _assert_epochs_run(output, stopped, epochs)
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "damaged-backups", "last.keras", "logs", "metrics.json", "recipe.json",
        "training_log.csv", *task_files,
    ])  # fmt: skip


@functools.cache
def _weights_of(path):
    return _weights(path)


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """One classification run interrupted in every way the tests below check, beside an
    uninterrupted run with the same arguments (`reference`):

    1. The run pauses after its first epoch (so after backup 000001). A second run on its
       output directory is refused; then the first is killed with SIGKILL.
    2. Its rerun (`stopped`) takes over the killed run's lock, resumes from 000001 and is
       stopped by SIGTERM after step 1 of epoch 2 (backup 000002).
    3. The stopped run's directory is copied (`fallback`) and the copy's newest backup damaged.
       Both reruns run to the end at once: `resumed` from 000002 (at step 2 of epoch 2: the
       rest of epoch 2 and then epoch 3, in two fits, with EMA), the copy's from 000001.
    4. `again`: a rerun of the completed run.

    What a later step changes (backups, lock files, metrics.json) is recorded when seen.
    """
    root = tmp_path_factory.mktemp("faults")
    run, fallback, reference = root / "run", root / "fallback", root / "reference"
    seen = types.SimpleNamespace(run=run, fallback=fallback, reference=reference)
    args = FAULT_ARGS + ["--output-dir", str(run)]
    started = []

    def start(*args, **kwargs):
        started.append(_start(*args, **kwargs))
        return started[-1]

    try:
        paused, waiting = root / "first-epoch-done", root / "waiting"
        killed = start([str(paused)] + args, driver=PAUSING_DRIVER)
        uninterrupted = start(FAULT_ARGS + ["--output-dir", str(reference)])
        _wait_for(paused, killed)
        seen.killed_pid = killed.pid
        seen.refused = _second_run(args)
        os.kill(killed.pid, signal.SIGKILL)
        seen.killed_status = killed.wait()
        seen.killed_position = _position(run / "backup" / "000001")
        seen.killed_lock_left = (run / ".lock-chief").exists()
        seen.killed_metrics = json.loads((run / "metrics.json").read_text())

        stopped = start([str(waiting)] + args, driver=WAITING_DRIVER)
        _wait_for(waiting, stopped)
        seen.stopped = _stop_with_sigterm(stopped)
        seen.stopped_position = _position(run / "backup" / "000002")

        shutil.copytree(run, fallback)
        seen.damaged_size = _damage(fallback / "backup" / "000002")
        resumed = start(args)
        from_fallback = start(FAULT_ARGS + ["--output-dir", str(fallback)])
        seen.resumed = _finish(resumed)
        again = start(args)
        seen.fallback_output = _finish(from_fallback)
        seen.again = _finish(again)
        _finish(uninterrupted)
    finally:  # a failed step leaves no training process behind
        for process in started:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return seen


@pytest.mark.slow
@pytest.mark.timeout(STORY_TIMEOUT)
def test_a_run_in_use_is_refused_naming_the_run_that_holds_it(story):
    _assert_refused(*story.refused, story.run, story.killed_pid)


@pytest.mark.slow
@pytest.mark.timeout(STORY_TIMEOUT)
def test_killed_run_resumes_from_its_backup_and_matches_an_uninterrupted_one(story):
    run = story.run
    assert story.killed_status == -signal.SIGKILL
    assert (story.killed_position["epoch"], story.killed_position["steps"]) == (1, 0)
    assert story.killed_lock_left  # left by the killed run, but not held
    assert story.killed_metrics["epochs_completed"] == 1
    # The rerun after the kill continues at epoch 2 (until SIGTERM stops it there, in the next
    # test).
    stopped, _ = story.stopped
    assert (
        f"Resuming from epoch 1: backup {run}/backup/000001 (after epoch 1, SHA-256 verified)."
        in stopped
    ), stopped[-4000:]
    _assert_epochs_run(stopped, 2, 3, last=2)
    # Both runs that go on from there end as the uninterrupted run ends, each epoch logged once,
    # and leave no backup and no lock behind.
    for out in (run, story.fallback):
        log = (out / "training_log.csv").read_text().splitlines()
        assert [line.split(",")[0] for line in log[1:]] == ["0", "1", "2"], out
        assert not (out / "backup").exists()  # removed once the run completed
        assert not list(out.glob(".lock-*"))
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["status"] == "complete" and metrics["epochs_completed"] == 3
        difference = _max_difference(
            _weights_of(out / "last.keras"), _weights_of(story.reference / "last.keras")
        )
        assert difference == 0.0, out


@pytest.mark.slow
@pytest.mark.timeout(STORY_TIMEOUT)
def test_a_run_stopped_by_sigterm_within_an_epoch_resumes_at_its_next_step(story):
    run, reference, resumed = story.run, story.reference, story.resumed
    backup = run / "backup" / "000002"
    _assert_stopped_after_step_1(*story.stopped, backup, story.stopped_position, epoch=2)
    assert story.stopped_position["random_states"]
    # Resumed within an epoch before the last: the rest of epoch 2, then epoch 3 (two fits,
    # between which the EMA averages and the raw weights must both carry over).
    assert (
        f"Resuming from epoch 1: backup {run}/backup/000002 (after step 1 of epoch 2, SHA-256 "
        "verified); epoch 2 continues at step 2 of 3." in resumed
    ), resumed[-4000:]
    # Keras counts the first fit's epochs to its own end: "Epoch 2/2", then "Epoch 3/3".
    assert "Epoch 1/" not in resumed and "Epoch 2/2" in resumed and "Epoch 3/3" in resumed, (
        resumed[-4000:]
    )
    for name in ("last.keras", "best.keras"):
        assert _max_difference(_weights_of(run / name), _weights_of(reference / name)) == 0.0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs_completed"] == 3
    assert metrics["val_accuracy"] == json.loads((reference / "metrics.json").read_text())[
        "val_accuracy"
    ]


@pytest.mark.slow
@pytest.mark.timeout(STORY_TIMEOUT)
def test_a_damaged_newest_backup_gives_way_to_the_previous_one(story):
    _assert_damaged_backup_gave_way(
        story.fallback_output, story.fallback, story.damaged_size, 2, 3, ["best.keras", "preset"]
    )


@pytest.mark.slow
@pytest.mark.timeout(STORY_TIMEOUT)
def test_a_completed_run_is_left_alone(story):
    assert "holds a completed run" in story.again, story.again[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(900)  # measured up to 174 s on a very busy machine (pyproject: 300 s)
def test_a_detection_run_in_use_is_refused_sigterm_saves_and_a_damaged_backup_gives_way(
    tmp_path,
):
    # The detector's runs go through the same fault handling as a classifier's: the classifier's
    # story in short, at the smallest size that has a backup within an epoch after one at an
    # epoch's end (2 epochs of 2 steps; SIGTERM after step 1 of epoch 2).
    out, marker = tmp_path / "run", tmp_path / "waiting"
    args = DETECTION + ["--epochs", "2", "--steps-per-epoch", "2", "--output-dir", str(out)]
    first = _start([str(marker)] + args, driver=WAITING_DRIVER)
    _wait_for(marker, first)
    _assert_refused(*_second_run(args), out, first.pid)
    stopped, status = _stop_with_sigterm(first)
    backup = out / "backup" / "000002"
    _assert_stopped_after_step_1(stopped, status, backup, _position(backup), epoch=2)
    size = _damage(backup)
    resumed = _finish(_start(args))
    _assert_damaged_backup_gave_way(resumed, out, size, 2, 2, ["detections.png"])
