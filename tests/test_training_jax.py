"""`python -m training.train` on the JAX engine, in subprocesses: one device, two host devices
and two processes on 127.0.0.1 reach the same weights; a process killed mid-epoch stops its
peer, and a rerun of both resumes and ends where an uninterrupted run ends; a classifier and a
detector (KerasHub's RetinaNet) stopped by SIGTERM resume to an uninterrupted run's weights.

Host devices (XLA_FLAGS) and JAX's distributed runtime are set up once per process, so every
run is a fresh process with KERAS_BACKEND=jax. The model is a tiny custom CoaT at 32x32 on
digits, 2 epochs of 3 steps.
"""

import json
import os
import re
import signal
import time

import pytest

from tests.test_training_distributed import (
    COMMON,
    DETECTION,
    WAITING_DRIVER,
    _env,
    _free_ports,
    _max_difference,
    _start,
    _wait_for,
    _weights,
)

ARGS = COMMON + ["--epochs", "2", "--steps-per-epoch", "3", "--deterministic"]
# XLA's compilation of the train step dominates these runs (about a minute of CPU each); on a
# busy machine four of them at once take many minutes.
TIMEOUT = 1800
# The runs are subprocesses on JAX whatever this process runs on: the JAX pass runs them.
pytestmark = [pytest.mark.backends("jax"), pytest.mark.timeout(TIMEOUT + 300)]

# Measured: the three layouts differ only in how XLA sums the gradients of the global batch
# (one device sums 16 examples, two devices sum 8 each and add the halves); after 6 AdamW steps
# one device differs from the other two by at most 1.5e-8, and two host devices and two
# processes agree exactly. The bound leaves room for other CPUs' kernels.
LAYOUT_TOLERANCE = 1e-6

# Process 1 stops answering in the second epoch, after its first step (so after the backup of
# epoch 1): the test then kills it mid-epoch.
PAUSING_DRIVER = """
import sys, time, keras
from training import train
make_callbacks = train.make_callbacks
class PauseInSecondEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 1:
            open(sys.argv[1], "w").close()
            time.sleep(3600)
def pausing(*args, **kwargs):
    callbacks, writer = make_callbacks(*args, **kwargs)
    return callbacks + [PauseInSecondEpoch()], writer
train.make_callbacks = pausing
train.main(sys.argv[2:])
"""


def _jax_env():
    # JAX's compilation cache on disk (tests/conftest.py) lets every run after the first of a
    # kind reuse its compiled steps.
    env = _env(KERAS_BACKEND="jax")
    for name in ("XLA_FLAGS", "KERAS_DISTRIBUTION_JOB_ADDRESSES",
                 "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID"):  # fmt: skip
        env.pop(name, None)
    return env


def _finish(process):
    output, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, output[-4000:]
    return output


def _two_processes(output_dir, drivers=(None, None), extra=()):
    port = _free_ports(1)[0]
    processes = []
    for index, driver in enumerate(drivers):
        args = ARGS + list(extra) + [
            "--output-dir", str(output_dir), "--coordinator-address", f"127.0.0.1:{port}",
            "--num-processes", "2", "--process-id", str(index),
        ]  # fmt: skip
        if driver is not None:
            args = driver[1] + args
        processes.append(_start(args, env=_jax_env(), driver=driver and driver[0]))
    return processes


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same run on one device, on two host devices and in two processes."""
    root = tmp_path_factory.mktemp("jax-layouts")
    env = _jax_env()
    one = _start(ARGS + ["--output-dir", str(root / "one")], env=env)
    two = _start(ARGS + ["--cpu-replicas", "2", "--output-dir", str(root / "two")], env=env)
    processes = _two_processes(root / "processes")
    outputs = {
        "one": _finish(one),
        "two": _finish(two),
        "processes": [_finish(p) for p in processes],
    }
    return root, outputs


@pytest.mark.slow
def test_one_device_two_devices_and_two_processes_end_with_the_same_weights(layouts):
    root, outputs = layouts
    assert "JAX: 1 device, no distribution, global batch 16 (16 per replica)" in outputs["one"]
    assert "JAX DataParallel: 2 device(s), global batch 16 (8 per replica)" in outputs["two"]
    chief_output = outputs["processes"][0]
    assert "JAX DataParallel: 2 device(s) in 2 processes, global batch 16 (8" in chief_output
    assert "Epoch 1/2" not in outputs["processes"][1]  # only process 0 reports
    one = _weights(root / "one" / "last.keras")
    two = _weights(root / "two" / "last.keras")
    chief = _weights(root / "processes" / "last.keras")
    other = _weights(root / "processes" / "workers" / "process-1" / "last.keras")
    assert _max_difference(chief, other) == 0.0  # replicas of one set of weights
    differences = {"two devices": _max_difference(one, two), "processes": _max_difference(one, chief)}
    print("largest weight difference from one device:", differences)
    assert max(differences.values()) < LAYOUT_TOLERANCE, differences
    for run in ("one", "two", "processes"):
        metrics = json.loads((root / run / "metrics.json").read_text())
        assert metrics["status"] == "complete" and metrics["epochs_completed"] == 2
        log = (root / run / "training_log.csv").read_text().splitlines()
        assert [line.split(",")[0] for line in log[1:]] == ["0", "1"]
        assert (root / run / "logs").is_dir() and (root / run / "recipe.json").is_file()


@pytest.mark.slow
def test_a_killed_process_stops_its_peer_and_a_rerun_resumes_to_the_same_weights(
    layouts, tmp_path
):
    root, _ = layouts
    marker = tmp_path / "paused"
    chief, paused = _two_processes(
        tmp_path / "run", drivers=(None, (PAUSING_DRIVER, [str(marker)])),
        extra=["--heartbeat-timeout", "20"],
    )  # fmt: skip
    deadline = time.time() + TIMEOUT
    while not marker.exists():
        assert paused.poll() is None, paused.communicate()[0][-4000:]
        assert time.time() < deadline, "process 1 never reached its second epoch"
        time.sleep(0.2)
    os.kill(paused.pid, signal.SIGKILL)
    killed_at = time.time()
    paused.wait()
    output, _ = chief.communicate(timeout=TIMEOUT)
    stopped_after = time.time() - killed_at
    print(f"process 0 stopped {stopped_after:.1f} s after process 1 was killed")
    assert chief.returncode == 1, output[-4000:]
    assert stopped_after < 60, output[-4000:]
    (line,) = [line for line in output.splitlines() if line.startswith("error:")]
    assert re.fullmatch(
        r"error: another process of this job stopped \((process 1|a process) of 2, according to "
        r"JAX's distributed runtime; this process's last training step ended \d+\.\d s before the "
        r"error\), so process 0 stopped too\. Rerun the same command on every process to resume "
        r"from the last backup\. JAX's error:",
        line,
    ), output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    backup = tmp_path / "run" / "backup" / "000001" / "training_metadata.json"
    position = json.loads(backup.read_text())
    assert (position["epoch"], position["steps"]) == (1, 0)

    outputs = [_finish(p) for p in _two_processes(tmp_path / "run")]
    assert "Resuming from epoch 1" in outputs[0]
    assert "Epoch 1/2" not in outputs[0] and "Epoch 2/2" in outputs[0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs_completed"] == 2
    difference = _max_difference(
        _weights(tmp_path / "run" / "last.keras"), _weights(root / "processes" / "last.keras")
    )
    assert difference == 0.0


# Per task, the options of the run stopped by SIGTERM: the classifier with every per-step random
# draw (drop-path, Mixup, augmentation), the detector (KerasHub's RetinaNet on JAX).
SIGTERM_RUNS = {
    "classification": ARGS + ["--drop-path", "0.1", "--mixup", "0.5"],
    "detection": DETECTION + ["--epochs", "2", "--steps-per-epoch", "3", "--deterministic"],
}


@pytest.mark.slow
@pytest.mark.parametrize("task", SIGTERM_RUNS)
def test_a_run_stopped_by_sigterm_within_an_epoch_resumes_to_the_same_weights(tmp_path, task):
    # One process, one device: the resume within an epoch is the engine-independent part
    # (training.faults, training.data); the drop-path states are JAX's uint32 ones.
    args = SIGTERM_RUNS[task]
    out, reference, marker = tmp_path / "run", tmp_path / "reference", tmp_path / "waiting"
    env = _jax_env()
    # The uninterrupted run first: its compiled steps land in the run's compilation cache
    # (conftest), and the two runs after it, which compile the same programs, load them (about
    # 55 s of CPU for a cold run of this size, 18 s for a warm one).
    _finish(_start(args + ["--output-dir", str(reference)], env=env))
    first = _start([str(marker)] + args + ["--output-dir", str(out)], env=env, driver=WAITING_DRIVER)
    _wait_for(marker, first)
    os.kill(first.pid, signal.SIGTERM)
    stopped, _ = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 75, stopped[-4000:]
    resumed = _finish(_start(args + ["--output-dir", str(out)], env=env))
    assert "(after step 1 of epoch 2, SHA-256 verified); epoch 2 continues at step 2 of 3." in (
        resumed
    ), resumed[-4000:]
    difference = _max_difference(_weights(out / "last.keras"), _weights(reference / "last.keras"))
    assert difference == 0.0


def test_the_error_of_a_lost_process_says_what_happened_and_what_to_do():
    from training import engine_jax

    engine = engine_jax.Engine(distribution=None, process_index=0, num_processes=2)
    gloo = ValueError(
        "UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:547] "
        "Connection closed by peer [127.0.0.1]:39119"
    )  # what JAX 0.10 raised in the survivor of two processes on CPUs
    assert engine.lost_process_message(gloo, 12.34) == (
        "error: another process of this job stopped (a process of 2, according to JAX's "
        "distributed runtime; this process's last training step ended 12.3 s before the error), so "
        "process 0 stopped too. Rerun the same command on every process to resume from the last "
        f"backup. JAX's error:\n{gloo}"
    )
    heartbeat = ValueError("UNAVAILABLE: The following tasks are unhealthy (stopped sending "
                           "heartbeats):\n1\nThe tasks have crashed.")  # fmt: skip
    assert "(process 1 of 2, according to JAX's distributed runtime, before this process's " \
        "first training step)" in engine.lost_process_message(heartbeat)  # fmt: skip
    # Anything else is left as it is: other errors, and one process alone.
    assert engine.lost_process_message(ValueError("Cannot reshape")) is None
    assert engine.lost_process_message(KeyError("Connection closed by peer")) is None
    alone = engine_jax.Engine(distribution=None, process_index=0, num_processes=1)
    assert alone.lost_process_message(gloo) is None
