"""The run's metrics file: DIR/metrics.json, rewritten atomically after every epoch."""

import json
import os
import time

import keras
import numpy as np

from keras_coat.utils.files import write_text_atomically


def write_json(path, data):
    """Writes `data` to `path` atomically."""
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class MetricsWriter(keras.callbacks.Callback):
    """Keeps DIR/metrics.json current: every metric Keras logs for the latest epoch (``loss``
    as ``train_loss``, ``val_accuracy`` as itself, ...), the best validation accuracy where there
    is one, epochs done and training throughput (images per second over the epoch's training
    steps, input pipeline included; the first epoch of a session also pays for
    tracing/compilation).

    `previous` is the file of an interrupted session, so the best result survives a resume.
    """

    def __init__(self, path, epochs, global_batch, previous=None):
        super().__init__()
        self.path = path
        previous = previous or {}
        self.metrics = {
            "status": "running",
            "epochs": epochs,
            "epochs_completed": previous.get("epochs_completed", 0),
            **{k: previous[k] for k in ("best_val_accuracy", "best_epoch") if k in previous},
        }
        self.global_batch = global_batch
        self._epoch_start = None
        self.last_step_end = None  # time.perf_counter() at the end of the latest step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._steps_run = 0

    def on_train_batch_end(self, batch, logs=None):
        self.last_step_end = time.perf_counter()
        self._steps_run = batch + 1  # fewer than steps_per_epoch in an epoch resumed within

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        seconds = self.last_step_end - self._epoch_start
        self.metrics.update(
            epochs_completed=epoch + 1,
            images_per_second=self.global_batch * self._steps_run / seconds,
            learning_rate=float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
        )
        self.metrics.update(
            {name if name.startswith("val_") else f"train_{name}": v for name, v in logs.items()}
        )
        best = self.metrics.get("best_val_accuracy")
        if logs.get("val_accuracy") is not None and (best is None or logs["val_accuracy"] > best):
            self.metrics.update(best_val_accuracy=logs["val_accuracy"], best_epoch=epoch + 1)
        write_json(self.path, self.metrics)

    def finish(self, results):
        """The completed run's metrics, with the final model's `results` (a dict)."""
        self.metrics.update(status="complete", **results)
        return dict(self.metrics)


def random_states(model):
    """The model's random-number states (Keras `SeedGenerator` variables, e.g. stochastic
    depth's), in a fixed order; `save_weights` does not save them."""
    return [v for v in model.non_trainable_variables if v.name == "seed_generator_state"]


class ReseedModelRandomness(keras.callbacks.Callback):
    """Sets the model's random-number states (stochastic depth) from (seed, epoch) at the start
    of every epoch.

    Keras keeps them in `SeedGenerator` variables that backups do not save; re-deriving them per
    epoch makes a resumed run draw the same drop-path masks as an uninterrupted one. A run
    resumed within epoch `resume_epoch` starts that epoch with `resume_states` instead (the
    values of `random_states` that the backup recorded after its last step).
    """

    def __init__(self, seed, resume_epoch=None, resume_states=None):
        super().__init__()
        self.seed = seed
        self.resume_epoch = resume_epoch
        self.resume_states = resume_states

    def on_epoch_begin(self, epoch, logs=None):
        states = random_states(self.model)
        if epoch == self.resume_epoch and self.resume_states is not None:
            if len(self.resume_states) != len(states):
                raise ValueError(
                    f"The backup records {len(self.resume_states)} random-number states; the "
                    f"model has {len(states)}. Resume with the model the run started with."
                )
            for state, value in zip(states, self.resume_states):
                state.assign(np.array(value, dtype=state.dtype))
            self.resume_epoch = self.resume_states = None
            return
        for index, state in enumerate(states):
            # [stream, counter]: one stream per generator and run; the counter starts per epoch
            # (TensorFlow's int64 states), or a stream per epoch from 0 (JAX's uint32 ones).
            stream = (self.seed * 1_000_003 + index) % (2**31 - 1)
            if np.dtype(state.dtype).itemsize >= 8:
                value = [stream, epoch << 32]
            else:
                value = [(stream * 2_654_435_761 + epoch * 40_503) % 2**31, 0]
            state.assign(np.array(value, dtype=state.dtype))
