"""training.faults: the output directory's lock, checked backups and SIGTERM, with plain
`model.fit` on a tiny model.

Every test runs on TensorFlow and on JAX (the `backends` marker: `make test`'s TensorFlow and JAX
passes); the trainer-level tests on TensorFlow are in tests/test_training_distributed.py.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from training import faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4  # per epoch
pytestmark = pytest.mark.backends("tensorflow", "jax")


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    return model


def _data():
    x = np.random.default_rng(0).normal(size=(8 * STEPS, 4)).astype("float32")
    y = np.eye(3, dtype="float32")[np.arange(8 * STEPS) % 3]
    return x, y


class _Call(keras.callbacks.Callback):
    """Calls `action(epoch, batch, model)` at each step's end (and records weights per epoch)."""

    def __init__(self, action=None):
        super().__init__()
        self.action = action
        self.epoch_weights = {}
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.action:
            self.action(self.epoch, batch, self.model)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_weights[epoch + 1] = self.model.get_weights()


class _Interrupt(Exception):
    pass


def _fit(model, backup_dir, epochs, action=None, resume=None, agree=None, save_freq="epoch"):
    backup = faults.CheckedBackupAndRestore(str(backup_dir), save_freq=save_freq, resume=resume)
    recorder = _Call(action)
    x, y = _data()
    history = model.fit(
        x, y, batch_size=8, epochs=epochs, initial_epoch=resume.epoch if resume else 0,
        shuffle=False, verbose=0,
        callbacks=[recorder, backup, faults.StopOnSignal(backup, agree=agree)],
    )  # fmt: skip
    return history, recorder


def _interrupted_run(backup_dir, at_epoch):
    """A run that fails at the start of epoch `at_epoch` (0-based), after `at_epoch` backups."""

    def fail(epoch, batch, model):
        if epoch == at_epoch:
            raise _Interrupt()

    model = _model()
    recorder = _Call()
    with pytest.raises(_Interrupt):
        backup = faults.CheckedBackupAndRestore(str(backup_dir))
        x, y = _data()
        recorder.action = fail
        model.fit(
            x, y, batch_size=8, epochs=5, shuffle=False, verbose=0, callbacks=[backup, recorder]
        )
    return recorder.epoch_weights


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------
# The lock


def test_a_second_run_is_refused_with_the_running_ones_details(tmp_path):
    out = tmp_path / "run"
    with faults.OutputDirLock(str(out), "chief", "--output-dir 'run'", command="python -m x"):
        with pytest.raises(faults.OutputDirInUse) as refused:
            with faults.OutputDirLock(str(out), "chief", "--output-dir 'run'"):
                pass
        expected = (
            rf"--output-dir 'run' is in use by another training run \(pid {os.getpid()} on "
            rf"{re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC, "
            r"command: python -m x\)\. Wait for it to end or stop it, or use another output "
            r"directory\.$"
        )
        assert re.match(expected, str(refused.value)), str(refused.value)
        # Processes of one job lock their own names.
        with faults.OutputDirLock(str(out), "worker-1"):
            assert sorted(os.listdir(out)) == [
                ".lock-chief", ".lock-chief.json", ".lock-worker-1", ".lock-worker-1.json"
            ]
    assert not out.exists()  # created by the lock, left empty: removed


def test_a_lock_leaves_an_existing_directory_as_it_found_it(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with faults.OutputDirLock(str(tmp_path)):
        pass
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_a_killed_holders_lock_is_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom training import faults\n"
         "with faults.OutputDirLock(sys.argv[1]):\n    print('held', flush=True)\n"
         "    time.sleep(600)", str(tmp_path)],
        cwd=ROOT, env=dict(os.environ, KERAS_BACKEND="numpy", PYTHONPATH=ROOT),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(faults.OutputDirInUse, match=rf"\(pid {holder.pid} on "):
            with faults.OutputDirLock(str(tmp_path)):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert sorted(os.listdir(tmp_path)) == [".lock-chief", ".lock-chief.json"]  # left behind
    with faults.OutputDirLock(str(tmp_path)):
        info = json.loads((tmp_path / ".lock-chief.json").read_text())
        assert info["pid"] == os.getpid()
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Checked backups


def test_backups_are_whole_checksummed_and_the_newest_two_kept(tmp_path):
    weights = _interrupted_run(tmp_path / "backup", at_epoch=3)
    assert sorted(os.listdir(tmp_path / "backup")) == ["000002", "000003"]
    newest = tmp_path / "backup" / "000003"
    lines = (newest / "SHA256SUMS").read_text().splitlines()
    for line in lines:  # sha256sum's format
        digest, name = line.split("  ")
        assert hashlib.sha256((newest / name).read_bytes()).hexdigest() == digest
    assert [line.split("  ")[1] for line in lines] == ["model.weights.h5", "training_metadata.json"]
    assert json.loads((newest / "training_metadata.json").read_text()) == {
        "epoch": 3, "steps": 0, "random_states": []
    }

    messages = []
    backup = faults.find_backup(str(tmp_path / "backup"), say=messages.append)
    assert (backup.path, backup.epoch, backup.steps, messages) == (str(newest), 3, 0, [])
    model = _model()
    history, _ = _fit(model, tmp_path / "backup", epochs=3, resume=backup)
    assert history.history == {} and _same(model.get_weights(), weights[3])
    assert not (tmp_path / "backup").exists()  # fit completed: removed


def test_a_fit_that_restores_a_backup_must_start_at_its_epoch(tmp_path):
    _interrupted_run(tmp_path / "backup", at_epoch=2)
    resume = faults.find_backup(str(tmp_path / "backup"))
    backup = faults.CheckedBackupAndRestore(str(tmp_path / "backup"), resume=resume)
    x, y = _data()
    with pytest.raises(ValueError, match=r"^The backup restored holds the state after 2 "
                       r"epoch\(s\) \(\+0 steps\); fit started at epoch 0 instead\. Pass "
                       r"initial_epoch=2 to fit\.$"):
        _model().fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[backup])
    with pytest.raises(ValueError, match="save_freq must be 'epoch' or a positive number"):
        faults.CheckedBackupAndRestore(str(tmp_path / "backup"), save_freq=0)


def test_a_damaged_newest_backup_gives_way_to_the_previous_one(tmp_path):
    weights = _interrupted_run(tmp_path / "backup", at_epoch=3)
    damaged = tmp_path / "backup" / "000003" / "model.weights.h5"
    size = damaged.stat().st_size
    with open(damaged, "r+b") as f:
        f.truncate(size // 2)
    messages = []
    backup = faults.find_backup(str(tmp_path / "backup"), say=messages.append)
    assert (backup.path, backup.epoch) == (str(tmp_path / "backup" / "000002"), 2)
    (aside,) = os.listdir(tmp_path / "damaged-backups")
    aside = tmp_path / "damaged-backups" / aside
    assert messages == [
        f"Damaged backup: {tmp_path}/backup/000003: model.weights.h5 ({size // 2} bytes) does not "
        f"match its SHA-256 in SHA256SUMS. Resuming from the newest intact backup, "
        f"{tmp_path}/backup/000002, instead; the damaged files are moved to {aside}."
    ]
    assert os.listdir(aside) == ["000003"] and os.listdir(tmp_path / "backup") == ["000002"]
    model = _model()
    history, _ = _fit(model, tmp_path / "backup", epochs=2, resume=backup)
    assert history.history == {} and _same(model.get_weights(), weights[2])


def test_no_intact_backup_stops_the_run_unless_asked_to_start_over(tmp_path):
    _interrupted_run(tmp_path / "backup", at_epoch=2)
    (tmp_path / "backup" / "000002" / "SHA256SUMS").unlink()
    edited = '{"epoch": 7, "steps": 0}'
    (tmp_path / "backup" / "000001" / "training_metadata.json").write_text(edited)
    problems = (
        f"{tmp_path}/backup/000002: SHA256SUMS is missing; {tmp_path}/backup/000001: "
        f"training_metadata.json ({len(edited)} bytes) does not match its SHA-256 in SHA256SUMS"
    )
    with pytest.raises(faults.DamagedBackupError) as stopped:
        faults.find_backup(str(tmp_path / "backup"))
    assert str(stopped.value) == (
        f"No intact backup to resume from: {problems}. Rerun with --restart-on-damaged-backup "
        "to start the run over from its first epoch (the damaged backups and the run's records "
        f"are then moved to {tmp_path}/damaged-backups)."
    )
    assert sorted(os.listdir(tmp_path / "backup")) == ["000001", "000002"]  # untouched

    (tmp_path / "metrics.json").write_text("{}")
    messages = []
    assert (
        faults.find_backup(
            str(tmp_path / "backup"), True, [str(tmp_path / "metrics.json")], messages.append
        )
        is None
    )
    (aside,) = os.listdir(tmp_path / "damaged-backups")
    aside = tmp_path / "damaged-backups" / aside
    assert messages == [
        f"Starting the run over (--restart-on-damaged-backup): no intact backup ({problems}). "
        f"The damaged backups and the run's records are moved to {aside}."
    ]
    assert sorted(os.listdir(aside)) == ["000001", "000002", "metrics.json"]
    assert sorted(os.listdir(tmp_path)) == ["backup", "damaged-backups"]
    assert os.listdir(tmp_path / "backup") == []


def test_a_backup_without_checksums_is_not_resumed_from(tmp_path):
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "latest.weights.h5").write_bytes(b"Keras' own BackupAndRestore")
    with pytest.raises(faults.DamagedBackupError, match=(
        rf"^No intact backup to resume from: {re.escape(str(tmp_path))}/backup/latest\.weights"
        r"\.h5: not a backup with checksums\. Rerun with --restart-on-damaged-backup ")):
        faults.find_backup(str(tmp_path / "backup"))


def test_an_unfinished_save_is_cleared(tmp_path):
    _interrupted_run(tmp_path / "backup", at_epoch=1)
    os.makedirs(tmp_path / "backup" / ".tmp-killed")
    (tmp_path / "backup" / ".tmp-killed" / "model.weights.h5").write_bytes(b"half")
    assert faults.find_backup(str(tmp_path / "backup")).epoch == 1
    assert os.listdir(tmp_path / "backup") == ["000001"]


# ---------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_saves_a_backup_after_the_step_in_progress_and_stops(tmp_path):
    seen = {}

    def signal_in_epoch_2(epoch, batch, model):
        if (epoch, batch) == (1, 1):
            seen["weights"] = model.get_weights()
            os.kill(os.getpid(), signal.SIGTERM)  # noted until StopOnSignal's turn

    model = _model()
    with pytest.raises(faults.Preempted) as stopped:
        _fit(model, tmp_path / "backup", epochs=3, action=signal_in_epoch_2)
    backup = tmp_path / "backup" / "000002"
    assert str(stopped.value) == (
        f"Stopped by SIGTERM after step 2 of epoch 2; backup saved in {backup}. Rerun the same "
        "command to continue from it."
    )
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored
    metadata = json.loads((backup / "training_metadata.json").read_text())
    assert metadata == {"epoch": 1, "steps": 2, "random_states": []}  # the model draws none
    resume = faults.find_backup(str(tmp_path / "backup"))
    assert (resume.epoch, resume.steps, resume.random_states) == (1, 2, [])
    assert resume.position_text() == "after step 2 of epoch 2"
    shutil.copytree(tmp_path / "backup", tmp_path / "copy")
    resumed = _model()
    history, _ = _fit(resumed, tmp_path / "backup", epochs=1, resume=resume)
    assert history.history == {} and _same(resumed.get_weights(), seen["weights"])


def test_a_run_resumed_within_an_epoch_ends_as_an_uninterrupted_one(tmp_path):
    def signal_in_epoch_2(epoch, batch, model):
        if (epoch, batch) == (1, 1):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(faults.Preempted):
        _fit(_model(), tmp_path / "backup", epochs=3, action=signal_in_epoch_2)
    _, uninterrupted = _fit(_model(), tmp_path / "reference", epochs=3)
    resume = faults.find_backup(str(tmp_path / "backup"))
    model = _model()
    backup = faults.CheckedBackupAndRestore(str(tmp_path / "backup"), resume=resume)
    positions = []
    recorder = _Call(lambda epoch, batch, model: positions.append(backup._steps_in_epoch))
    x, y = _data()
    rest = slice(resume.steps * 8, None)  # the epoch's remaining batches, then whole epochs
    for data, first, end in [((x[rest], y[rest]), 1, 2), ((x, y), 2, 3)]:
        model.fit(
            *data, batch_size=8, initial_epoch=first, epochs=end, shuffle=False, verbose=0,
            callbacks=[backup, recorder],
        )  # fmt: skip
    assert positions == [3, 4, 1, 2, 3, 4]  # steps of the epoch, counted from the backup's
    assert _same(model.get_weights(), uninterrupted.epoch_weights[3])


def test_processes_stop_at_the_same_step_when_any_of_them_is_asked(tmp_path):
    wishes = []

    def another_process_wishes_to_stop_at_step_2(wish):
        wishes.append(wish)
        return len(wishes) == 2

    with pytest.raises(faults.Preempted, match=r"^Stopped by another process of the run after "
                       r"step 2 of epoch 1; backup saved in "):
        _fit(_model(), tmp_path / "backup", 2, agree=another_process_wishes_to_stop_at_step_2)
    assert wishes == [False, False]


@pytest.mark.backends("jax")  # JAX's agreement function
def test_jax_agreement_of_one_process_is_its_own_wish(tmp_path):
    assert faults.any_process_on_jax(True) is True and faults.any_process_on_jax(False) is False

    def signal_at_step_2(epoch, batch, model):
        if (epoch, batch) == (0, 1):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(faults.Preempted, match=r"^Stopped by SIGTERM after step 2 of epoch 1; "):
        _fit(_model(), tmp_path / "backup", 2, signal_at_step_2, agree=faults.any_process_on_jax)


def test_a_backup_taken_at_the_step_is_not_written_twice(tmp_path):
    def signal_at_step_2(epoch, batch, model):
        if (epoch, batch) == (0, 1):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(faults.Preempted, match=r"after step 2 of epoch 1; backup saved in "
                       rf"{re.escape(str(tmp_path))}/backup/000001\."):
        _fit(_model(), tmp_path / "backup", 2, action=signal_at_step_2, save_freq=2)
    assert os.listdir(tmp_path / "backup") == ["000001"]
