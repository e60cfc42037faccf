"""training.keras_internals: each use of Keras internals works here, on a Keras of any version
number that behaves as relied on, and fails naming the missing piece on a Keras that does not;
the export reads a model's output kind through public API."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_coat.export import serving
from training import keras_internals as internals


def _compiled_model():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def _dataset():
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.eye(3, dtype="float32")[np.arange(8) % 3]
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(4)


def test_multi_worker_fit_patch_builds_state_and_keeps_fit_working(monkeypatch):
    from keras.src.backend.tensorflow import trainer

    monkeypatch.setattr(trainer, "reduce_per_replica", trainer.reduce_per_replica)  # restored
    model, dataset = _compiled_model(), _dataset()
    internals.patch_multi_worker_fit(model, dataset.element_spec)
    patched = trainer.reduce_per_replica
    assert patched._multi_worker_scalars and model.optimizer.built
    internals.patch_multi_worker_fit(_compiled_model(), dataset.element_spec)
    assert trainer.reduce_per_replica is patched  # not wrapped twice
    # Under other strategies the patched reduction is Keras' own.
    history = model.fit(dataset, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])


def test_multi_worker_fit_patch_works_on_any_version_number_with_its_internals(monkeypatch):
    from keras.src.backend.tensorflow import trainer

    monkeypatch.setattr(trainer, "reduce_per_replica", trainer.reduce_per_replica)  # restored
    monkeypatch.setattr(keras, "version", lambda: "3.99.0")
    model = _compiled_model()
    internals.patch_multi_worker_fit(model, _dataset().element_spec)
    assert trainer.reduce_per_replica._multi_worker_scalars and model.optimizer.built


def _without_step_reduction(monkeypatch, trainer):
    def make_function(self, step_function):  # Keras' step without reduce_per_replica
        return step_function

    monkeypatch.setattr(trainer.TensorFlowTrainer, "_make_function", make_function)


def _without_symbolic_build_in_fit(monkeypatch, trainer):
    monkeypatch.setattr(trainer.TensorFlowTrainer, "fit", lambda self, *args, **kwargs: None)


PREFIX = (
    r"^training's multi-worker fit patch \(keras-team/keras#20585\) relies on Keras internals "
    r"that Keras 3\.99\.0 no longer has: "
)


@pytest.mark.parametrize(
    "take_away, missing",
    [
        (
            lambda monkeypatch, trainer: monkeypatch.delattr(trainer, "reduce_per_replica"),
            r"keras\.src\.backend\.tensorflow\.trainer\.reduce_per_replica is missing$",
        ),
        (
            lambda monkeypatch, trainer: monkeypatch.setattr(
                trainer, "reduce_per_replica", lambda outputs, strategy: outputs
            ),
            r"keras\.src\.backend\.tensorflow\.trainer\.reduce_per_replica takes "
            r"\['outputs', 'strategy'\] instead of \(values, strategy, reduction\)$",
        ),
        (
            _without_step_reduction,
            r"TensorFlowTrainer's train step no longer reduces its outputs with "
            r"keras\.src\.backend\.tensorflow\.trainer\.reduce_per_replica$",
        ),
        (
            _without_symbolic_build_in_fit,
            r"TensorFlowTrainer\.fit no longer calls self\._maybe_symbolic_build$",
        ),
        (
            lambda monkeypatch, trainer: monkeypatch.delattr(
                keras.src.trainers.trainer.Trainer, "_symbolic_build"
            ),
            r"Model\._symbolic_build\(data_batch=\.\.\.\) is missing$",
        ),
    ],
    ids=["reduce_per_replica", "its_signature", "step_reduction", "fit_build", "symbolic_build"],
)
def test_multi_worker_fit_patch_names_the_missing_internal(monkeypatch, take_away, missing):
    from keras.src.backend.tensorflow import trainer

    monkeypatch.setattr(keras, "version", lambda: "3.99.0")
    take_away(monkeypatch, trainer)
    with pytest.raises(RuntimeError, match=PREFIX + missing):
        internals.patch_multi_worker_fit(_compiled_model(), _dataset().element_spec)


# ---------------------------------------------------------------------------------------------
# The export's output detection, with public API only


def _functional(*stack):
    inputs = keras.Input((4,))
    x = inputs
    for layer in stack:
        x = layer(x)
    return keras.Model(inputs, x)


class _SubclassedClassifier(keras.Model):
    """The KerasHub pattern: a Model subclass built functionally in __init__."""

    def __init__(self, activation, **kwargs):
        inputs = keras.Input((4,))
        super().__init__(inputs, keras.layers.Dense(3, activation=activation)(inputs), **kwargs)


@pytest.mark.parametrize(
    "build, needs_softmax",
    [
        (lambda: _functional(keras.layers.Dense(3, activation="softmax")), False),
        (lambda: _functional(keras.layers.Dense(3)), True),
        (lambda: _functional(keras.layers.Dense(3), keras.layers.Softmax()), False),
        # A float32 cast after the head (mixed precision) says nothing by itself.
        (lambda: _functional(keras.layers.Dense(3), keras.layers.Activation("linear")), True),
        (lambda: _functional(
            keras.layers.Dense(3, activation="softmax"), keras.layers.Activation("linear")
        ), False),
        (lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]), True),
        # Nested models, called on the outer model's input.
        (lambda: _functional(_functional(keras.layers.Dense(3), keras.layers.Softmax())), False),
        (lambda: _functional(keras.Sequential([keras.layers.Dense(3)])), True),
        (lambda: _SubclassedClassifier("softmax"), False),
        (lambda: _SubclassedClassifier(None), True),
    ],
)
def test_output_kind_is_read_through_public_api(build, needs_softmax):
    assert serving.needs_softmax(build(), "auto") is needs_softmax


class _CallOnly(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)


@pytest.mark.parametrize(
    "build",
    [lambda: _functional(keras.layers.Dense(3, activation="sigmoid")), lambda: _CallOnly()],
)
def test_unknown_output_kinds_ask_for_model_output(build):
    with pytest.raises(ValueError, match="model_output='probabilities' or 'logits'"):
        serving.needs_softmax(build(), "auto")


def _ema_run(epoch_splits, callback):
    """A 3-epoch EMA run of a small model trained in one fit per `(first, end)` epoch range,
    with `callback(last_epoch)` swapping the averages in at each epoch's end; its final
    weights."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.5, use_ema=True, ema_momentum=0.5,
                                                 ema_overwrite_frequency=None),
                  loss="categorical_crossentropy")  # fmt: skip
    swap = callback(2)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.eye(3, dtype="float32")[np.arange(8) % 3]
    for first, end in epoch_splits:
        model.fit(x, y, batch_size=4, initial_epoch=first, epochs=end, shuffle=False, verbose=0,
                  callbacks=[swap])  # fmt: skip
    return [np.array(w) for w in model.get_weights()]


@pytest.mark.backends("tensorflow", "jax", "torch")
def test_ema_across_fits_ends_where_one_fit_ends():
    # A run resumed after epoch 1 of 3 trains in two fits (epoch 2, then epoch 3): it must end
    # with the weights of one fit over the 3 epochs (the averages, finalized once).
    one_fit = _ema_run([(0, 3)], internals.SwapEMAWeightsAcrossFits)
    two_fits = _ema_run([(0, 1), (1, 2), (2, 3)], internals.SwapEMAWeightsAcrossFits)
    for a, b in zip(one_fit, two_fits):
        np.testing.assert_array_equal(a, b)
    # Keras' own callback finalizes at the end of every fit: the later fits train on from the
    # averages (what this piece is for; if Keras changes that, this piece can go).
    keras_swap = _ema_run([(0, 1), (1, 2), (2, 3)],
                          lambda last: keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    assert max(float(np.abs(a - b).max()) for a, b in zip(one_fit, keras_swap)) > 1e-4
    # Within one fit, it is Keras' callback.
    keras_one_fit = _ema_run([(0, 3)],
                             lambda last: keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    for a, b in zip(one_fit, keras_one_fit):
        np.testing.assert_array_equal(a, b)


def test_ema_across_fits_names_the_missing_internal(monkeypatch):
    monkeypatch.delattr(keras.callbacks.SwapEMAWeights, "_finalize_ema_values")
    with pytest.raises(RuntimeError, match=r"EMA weights across several fits .* no "
                                           r"_finalize_ema_values"):
        internals.SwapEMAWeightsAcrossFits(last_epoch=2)
