"""Faults a long training run meets, handled the same way on every Keras backend.

- `OutputDirLock`: one run per output directory (and process). A second run is refused with a
  message naming the running one; the lock is an `flock` on an open file, so the kernel frees it
  when its holder dies, however it dies.
- `CheckedBackupAndRestore` and `find_backup`: backups as Keras' `BackupAndRestore` takes them,
  published whole (written to a temporary folder, then renamed) with SHA-256 checksums beside
  them, the newest two kept. A rerun verifies them before training starts, resumes from the newest
  intact one and says which; it falls back to the previous one when the newest is damaged, and
  starts over only when asked to (`--restart-on-damaged-backup`), never silently.
- `StopOnSignal`: SIGTERM (how cloud and TPU VMs announce preemption) saves a backup at the next
  step boundary and ends `fit` with `Preempted`; the trainer then exits with
  `PREEMPTED_EXIT_STATUS`. Several processes of one job stop at the same step through an
  agreement function their engine supplies.

Nothing here is specific to a backend: the callbacks use Keras' public callback API and
`save_weights` / `load_weights` only; files are plain Python.
"""

import datetime
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import uuid

import keras

from keras_coat.utils.files import fsync, publish_directory, sha256

from training.callbacks import random_states, write_json

# EX_TEMPFAIL (sysexits.h): a temporary failure, the command may be retried. A run stopped by
# SIGTERM exits with it after saving its backup; rerunning the same command continues the run.
PREEMPTED_EXIT_STATUS = 75
RESTART_FLAG = "--restart-on-damaged-backup"

WEIGHTS_FILE = "model.weights.h5"
METADATA_FILE = "training_metadata.json"
CHECKSUMS_FILE = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` checks a backup by hand
KEPT_BACKUPS = 2
DAMAGED_FOLDER = "damaged-backups"


class OutputDirInUse(ValueError):
    """Another live run holds the output directory."""


class DamagedBackupError(ValueError):
    """No intact backup is left to resume from, and starting over was not asked for."""


class Preempted(Exception):
    """`fit` was stopped by a signal after its backup was saved; rerun to continue."""

    def __init__(self, signal_name, backup):
        self.signal_name = signal_name
        self.backup = backup
        super().__init__(
            f"Stopped by {signal_name} {backup.position_text()}; backup saved in {backup.path}. "
            "Rerun the same command to continue from it."
        )


# ---------------------------------------------------------------------------------------------
# One run per output directory


def _now_text():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class OutputDirLock:
    """Holds `output_dir` for this process while the `with` block runs.

    The lock is `flock` on `DIR/.lock-<process>`; the holder's pid, host, start time and command
    are written beside it (`.lock-<process>.json`) for the message that refuses a second run. The
    kernel drops an `flock` when its process ends, so a killed run leaves no stuck lock: its files
    may remain, and the next run takes them over. A run that ends normally removes both files, and
    the output directory if it created it and left it empty.

    Several processes of one job that share an output directory each lock their own name
    (`process`: "chief", "worker-1", "process-3", ...), so they do not refuse each other.

    Args:
        output_dir: the run's output directory (created if missing).
        process: this process's name within its job.
        what: how messages name the directory (e.g. "--output-dir runs/a").
        command: the command shown to a refused run (default: this process's command line).
    """

    def __init__(self, output_dir, process="chief", what=None, command=None):
        self.output_dir = output_dir
        self.process = process
        self.what = what or output_dir
        self.command = command or shlex.join(getattr(sys, "orig_argv", sys.argv))
        self.path = os.path.join(output_dir, f".lock-{process}")
        self.info_path = self.path + ".json"
        self._fd = None
        self._created_dir = False

    def __enter__(self):
        self._created_dir = not os.path.isdir(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        try:
            self._fd = self._lock()
        except BaseException:
            self._remove_dir_if_created()
            raise
        write_json(
            self.info_path,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": _now_text(),
                "command": self.command,
                "process": self.process,
            },
        )
        return self

    def _lock(self):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputDirInUse(self._in_use_message()) from None
            except BaseException:
                os.close(fd)
                raise
            # A holder that was ending may have removed the file between open and flock: the
            # lock then guards nothing; take the file now at the path instead.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _in_use_message(self):
        try:
            with open(self.info_path) as f:
                holder = json.load(f)
            who = (
                f"pid {holder['pid']} on {holder['host']}, started {holder['started']}, "
                f"command: {holder['command']}"
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            who = f"its details in {self.info_path} are unreadable: {error}"
        return (
            f"{self.what} is in use by another training run ({who}). Wait for it to end or stop "
            "it, or use another output directory."
        )

    def __exit__(self, *exc_info):
        for path in (self.info_path, self.path):  # removed while still locked
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = None
        self._remove_dir_if_created()
        return False

    def _remove_dir_if_created(self):
        if self._created_dir:
            try:
                os.rmdir(self.output_dir)
            except OSError:  # not empty: the run's outputs
                pass


# ---------------------------------------------------------------------------------------------
# Checked backups


class Backup:
    """One published backup: its folder and the training position it holds."""

    def __init__(self, path, epoch, steps, random_states=None):
        self.path = path
        self.epoch = epoch  # epochs completed before it
        self.steps = steps  # steps of epoch `epoch` (0-based) completed after those
        # The model's random-number states after those steps (lists of ints; None when the
        # backup has none recorded): a run resumed within an epoch continues from them.
        self.random_states = random_states

    def position_text(self):
        if self.steps:
            return f"after step {self.steps} of epoch {self.epoch + 1}"
        return f"after epoch {self.epoch}" if self.epoch else "before the first epoch"


def _published_backups(backup_dir):
    """The published backup folders in `backup_dir`, newest first."""
    if not os.path.isdir(backup_dir):
        return []
    names = [n for n in os.listdir(backup_dir) if n.isascii() and n.isdigit()]
    return [os.path.join(backup_dir, n) for n in sorted(names, key=int, reverse=True)]


def _remove_unpublished(backup_dir):
    """Removes the temporary folders of saves that a killed run did not finish."""
    if os.path.isdir(backup_dir):
        for name in os.listdir(backup_dir):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(backup_dir, name), ignore_errors=True)


def check_backup(path):
    """The `Backup` in folder `path`; `DamagedBackupError` naming what is wrong with it."""

    def damaged(problem):
        return DamagedBackupError(f"{path}: {problem}")

    try:
        with open(os.path.join(path, CHECKSUMS_FILE)) as f:
            lines = f.read().splitlines()
        recorded = dict(reversed(line.split("  ", 1)) for line in lines if line)
    except FileNotFoundError:
        raise damaged(f"{CHECKSUMS_FILE} is missing") from None
    except (OSError, ValueError) as error:
        raise damaged(f"{CHECKSUMS_FILE} is unreadable ({error})") from None
    for name in (WEIGHTS_FILE, METADATA_FILE):
        file = os.path.join(path, name)
        if name not in recorded:
            raise damaged(f"{CHECKSUMS_FILE} records no checksum of {name}")
        if not os.path.isfile(file):
            raise damaged(f"{name} is missing")
        if sha256(file) != recorded[name]:
            raise damaged(
                f"{name} ({os.path.getsize(file)} bytes) does not match its SHA-256 in "
                f"{CHECKSUMS_FILE}"
            )
    try:
        with open(os.path.join(path, METADATA_FILE)) as f:
            metadata = json.load(f)
        states = metadata.get("random_states")
        if states is not None:
            states = [[int(x) for x in state] for state in states]
        return Backup(path, int(metadata["epoch"]), int(metadata["steps"]), states)
    except (OSError, ValueError, KeyError, TypeError) as error:  # checksummed, yet not ours
        raise damaged(f"{METADATA_FILE} holds no training position ({error!r})") from None


def find_backup(backup_dir, restart_on_damaged=False, set_aside=(), say=print):
    """The newest intact backup in `backup_dir` to resume from; None to start from epoch 0.

    Damaged backups are moved to `DIR/damaged-backups/` (DIR: `backup_dir`'s parent), and each
    move is reported with `say`. Anything else in `backup_dir` (e.g. Keras' own
    `latest.weights.h5`) counts as damaged: it is never resumed from, nor ignored silently. When no
    intact backup is left, the run stops with `DamagedBackupError`, unless `restart_on_damaged`:
    then the files in `set_aside` (the run's per-epoch records, e.g. metrics.json and
    training_log.csv) are moved there as well and the run starts over.
    """
    _remove_unpublished(backup_dir)
    published = _published_backups(backup_dir)
    names = sorted(os.listdir(backup_dir)) if os.path.isdir(backup_dir) else []
    damaged = [  # (path, what is wrong)
        (path, f"{path}: not a backup with checksums")
        for path in (os.path.join(backup_dir, name) for name in names)
        if path not in published
    ]
    for path in published:
        try:
            backup = check_backup(path)
        except DamagedBackupError as error:
            damaged.append((path, str(error)))
            continue
        if damaged:
            aside = _set_aside(backup_dir, [path for path, _ in damaged])
            say(
                f"Damaged backup: {'; '.join(problem for _, problem in damaged)}. Resuming from "
                f"the newest intact backup, {backup.path}, instead; the damaged files are moved "
                f"to {aside}."
            )
        return backup
    if not damaged:
        return None
    problems = "; ".join(problem for _, problem in damaged)
    if not restart_on_damaged:
        raise DamagedBackupError(
            f"No intact backup to resume from: {problems}. Rerun with {RESTART_FLAG} to start "
            "the run over from its first epoch (the damaged backups and the run's records are "
            f"then moved to {os.path.join(_parent(backup_dir), DAMAGED_FOLDER)})."
        )
    paths = [path for path, _ in damaged] + [p for p in set_aside if os.path.exists(p)]
    aside = _set_aside(backup_dir, paths)
    say(
        f"Starting the run over ({RESTART_FLAG}): no intact backup ({problems}). The damaged "
        f"backups and the run's records are moved to {aside}."
    )
    return None


def _parent(backup_dir):
    return os.path.dirname(os.path.abspath(backup_dir))


def _set_aside(backup_dir, paths):
    """Moves `paths` into a new folder under DIR/damaged-backups/; returns that folder."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    root = os.path.join(_parent(backup_dir), DAMAGED_FOLDER)
    os.makedirs(root, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"{stamp}-", dir=root)
    for path in paths:
        os.replace(path, os.path.join(folder, os.path.basename(path)))
    return folder


class CheckedBackupAndRestore(keras.callbacks.Callback):
    """Backups of a `fit` as Keras' `BackupAndRestore` takes them, checked before they are
    trusted.

    Each backup is a folder `backup_dir/<number>/` holding `model.weights.h5` (model and
    optimizer), `training_metadata.json` (epochs completed, steps into the next) and `SHA256SUMS`;
    it is written under a temporary name, flushed to disk and renamed, so a reader sees whole
    backups only. The newest `KEPT_BACKUPS` are kept. Restoring loads the backup that
    `find_backup` chose before training (`resume`) at the start of `fit`, which must then start
    at the backup's epoch (`fit(..., initial_epoch=resume.epoch)`; another start is refused).

    A backup taken within an epoch (after step k) also records the model's random-number states.
    The `fit` that restores it must be fed the rest of that epoch only (its steps k+1.. of that
    epoch, e.g. `training.data.train_dataset(..., start_step=k, end_epoch=epoch + 1)`): this
    callback counts that fit's first steps from k + 1, and the trainer passes the states to
    `training.callbacks.ReseedModelRandomness`. Keras' own callback restarts the epoch instead.

    Args:
        backup_dir: the folder of the backups (nothing else may write there).
        save_freq: "epoch" or a number of steps between backups.
        resume: the `Backup` to restore at the start of `fit` (None: start from scratch).
        delete_checkpoint: remove the backup folder when `fit` completes. A trainer with work
            after `fit` (evaluation, export) passes False and removes it once that is done, so
            that a run stopped then resumes after its last epoch instead of from scratch.
    """

    def __init__(self, backup_dir, save_freq="epoch", resume=None, delete_checkpoint=True):
        super().__init__()
        if save_freq != "epoch" and not (
            isinstance(save_freq, int) and not isinstance(save_freq, bool) and save_freq > 0
        ):
            raise ValueError(
                f"save_freq must be 'epoch' or a positive number of steps; received {save_freq!r}."
            )
        self.backup_dir = backup_dir
        self.save_freq = save_freq
        self.resume = resume
        self.delete_checkpoint = delete_checkpoint
        self._epoch = 0  # the epoch in progress (0-based), or the epochs completed after one
        self._steps_in_epoch = 0
        self._steps_before = 0  # steps of the current epoch trained before this fit
        self._steps_since_save = 0
        self._saved_at = None
        self._first_epoch = None  # the epoch the restoring fit must start at

    def on_train_begin(self, logs=None):
        if self.resume is None:
            return
        model = self.model
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)  # its variables are in the file
        model.load_weights(os.path.join(self.resume.path, WEIGHTS_FILE))
        self._first_epoch = self._epoch = self.resume.epoch
        self._steps_before = self.resume.steps
        self._saved_at = (self.resume.epoch, self.resume.steps)
        self.resume = None  # restored: a later `fit` (the next epochs) continues from here

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch is not None and epoch != self._first_epoch:
            raise ValueError(
                f"The backup restored holds the state after {self._first_epoch} epoch(s) "
                f"(+{self._steps_before} steps); fit started at epoch {epoch} instead. Pass "
                f"initial_epoch={self._first_epoch} to fit."
            )
        self._first_epoch = None
        self._epoch = epoch
        self._steps_in_epoch = self._steps_before

    def on_train_batch_end(self, batch, logs=None):
        self._steps_in_epoch = self._steps_before + batch + 1
        if self.save_freq != "epoch":
            self._steps_since_save += 1
            if self._steps_since_save >= self.save_freq:
                self._save_backup()

    def on_epoch_end(self, epoch, logs=None):
        self._epoch, self._steps_in_epoch, self._steps_before = epoch + 1, 0, 0
        if self.save_freq == "epoch":
            self._save_backup()

    def on_train_end(self, logs=None):
        self._first_epoch = None
        if self.delete_checkpoint:
            shutil.rmtree(self.backup_dir, ignore_errors=True)

    def save_now(self):
        """Publishes a backup of the current position (unless it is already the newest)."""
        return self._save_backup()

    def _save_backup(self):
        self._steps_since_save = 0
        position = (self._epoch, self._steps_in_epoch)
        newest = _published_backups(self.backup_dir)
        if self._saved_at == position and newest:
            return Backup(newest[0], *position)
        os.makedirs(self.backup_dir, exist_ok=True)
        _remove_unpublished(self.backup_dir)
        number = int(os.path.basename(newest[0])) + 1 if newest else 1
        # mkdir, not mkdtemp: the backup gets the umask's permissions, as every published file.
        temporary = os.path.join(self.backup_dir, f".tmp-{uuid.uuid4().hex}")
        os.mkdir(temporary)
        try:
            self.model.save_weights(os.path.join(temporary, WEIGHTS_FILE))
            with open(os.path.join(temporary, METADATA_FILE), "w") as f:
                states = [
                    keras.ops.convert_to_numpy(state).tolist()
                    for state in random_states(self.model)
                ]
                json.dump(
                    {"epoch": position[0], "steps": position[1], "random_states": states}, f
                )
            sums = "".join(
                f"{sha256(os.path.join(temporary, name))}  {name}\n"
                for name in (WEIGHTS_FILE, METADATA_FILE)
            )
            with open(os.path.join(temporary, CHECKSUMS_FILE), "w") as f:
                f.write(sums)
            for name in (WEIGHTS_FILE, METADATA_FILE, CHECKSUMS_FILE, ""):
                fsync(os.path.join(temporary, name))
            path = os.path.join(self.backup_dir, f"{number:06d}")
            publish_directory(temporary, path)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        for old in _published_backups(self.backup_dir)[KEPT_BACKUPS:]:
            shutil.rmtree(old, ignore_errors=True)
        self._saved_at = position
        return Backup(path, *position)


# ---------------------------------------------------------------------------------------------
# Stopping on a signal


class StopOnSignal(keras.callbacks.Callback):
    """Turns SIGTERM (by default) into a backup at the next step boundary and a clean stop.

    The signal handler only notes the signal; after the step in progress ends, the backup is
    saved through `backup.save_now()` and `fit` ends by raising `Preempted`, which the trainer
    turns into a message and `PREEMPTED_EXIT_STATUS`. So at most the step in progress when the
    signal came is lost. Place it right after `backup` in the callback list, before callbacks
    that swap weights (EMA), so the backup holds the weights being trained.

    Args:
        backup: the run's `CheckedBackupAndRestore`.
        signals: the signals to handle.
        agree: for runs of several processes, a function of this process's wish to stop (bool)
            that returns whether any process wishes to (a collective every process calls after
            every step); the processes then stop at the same step. None: this process alone.
    """

    def __init__(self, backup, signals=(signal.SIGTERM,), agree=None):
        super().__init__()
        self.backup = backup
        self.signals = tuple(signals)
        self.agree = agree
        self.received = None
        self._previous_handlers = {}

    def _note(self, signum, frame):
        self.received = signal.Signals(signum).name

    def on_train_begin(self, logs=None):
        for sig in self.signals:
            self._previous_handlers[sig] = signal.signal(sig, self._note)

    def restore_handlers(self):
        """Puts back the handlers the signals had before `fit` began (at most once). `fit` calls
        no callback when it fails, so whoever runs it calls this when it raises."""
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    def on_train_end(self, logs=None):
        self.restore_handlers()

    def _stop_if_asked(self):
        asked = self.received is not None
        if self.agree is not None:
            asked = bool(self.agree(asked))
        if asked:
            backup = self.backup.save_now()
            self.restore_handlers()
            raise Preempted(self.received or "another process of the run", backup)

    # Only after steps: at an epoch's end the other callbacks' records of it (metrics, log,
    # checkpoints) are still to come, and at its start EMA weights may still be swapped in.
    def on_train_batch_end(self, batch, logs=None):
        self._stop_if_asked()


def any_process_on_jax(wish):
    """`StopOnSignal`'s `agree` for a JAX run of several processes (`jax.distributed`): whether
    any process wishes to stop, from an all-gather of one flag per process. One small collective
    per step; in a single process it returns `wish`."""
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(wish))))
