"""The Keras internals training relies on, each checked for the behaviour it needs when used.

Public Keras APIs do the rest of the work; what is here relies on Keras behaviour that is not part
of its API and may change in any release. Each piece checks, when used, that the Keras it runs on
still behaves as relied on, and otherwise raises a `RuntimeError` naming the piece that is missing
and the Keras version found, instead of misbehaving silently. No Keras is refused by its version
number: CI runs these on the newest Keras below 4 and on the oldest one keras_coat supports
(pyproject.toml).

- `patch_multi_worker_fit` (training under MultiWorkerMirroredStrategy): works around
  keras-team/keras#20585 by replacing `reduce_per_replica` in Keras' TensorFlow trainer module and
  a model's private build step.
- `SwapEMAWeightsAcrossFits` (EMA in a run trained in several `fit` calls, as a run resumed
  within an epoch is): Keras' `SwapEMAWeights` with its private swap state and finalization.

TensorFlow is imported only by the functions that need it.
"""

import inspect
import types

import keras


def _unsupported(piece, detail):
    return RuntimeError(
        f"training's {piece} relies on Keras internals that Keras {keras.version()} no longer "
        f"has: {detail}"
    )


# ---------------------------------------------------------------------------------------------
# Multi-worker fit

MULTI_WORKER_PIECE = "multi-worker fit patch (keras-team/keras#20585)"


def patch_multi_worker_fit(model, element_spec):
    """Works around Keras 3's `fit` under MultiWorkerMirroredStrategy (keras-team/keras#20585).

    Two steps of Keras' TensorFlow trainer fail there: building state from a first batch averaged
    with `strategy.reduce` over a nest of per-replica values, and averaging the scalar step logs
    with `reduce(..., axis=0)`. So the metrics' and optimizer's variables are created here from a
    local zero batch (leaving that build step nothing to do, and it is skipped), and scalar logs
    are averaged over replicas with `axis=None`. Call inside `strategy.scope()` after `compile`.

    Args:
        model: a compiled Keras model (TensorFlow backend).
        element_spec: the `element_spec` of the dataset `fit` will get (images, labels, ...).

    Raises:
        RuntimeError: naming the piece of Keras' trainer that the patch relies on and that the
            running Keras lacks or uses differently.
    """
    import tensorflow as tf

    trainer = _multi_worker_internals(model)
    batch = tuple(tf.zeros([1, *spec.shape[1:]], spec.dtype) for spec in element_spec)
    model._symbolic_build(data_batch=batch)
    unbuilt = [m.name for m in model.metrics if getattr(m, "built", True) is False]
    if unbuilt:
        raise _unsupported(
            MULTI_WORKER_PIECE,
            f"Model._symbolic_build(data_batch=...) left the metrics {unbuilt} unbuilt",
        )
    model.optimizer.build(model.trainable_variables)
    model._maybe_symbolic_build = lambda *args, **kwargs: None

    reduce_per_replica = trainer.reduce_per_replica
    if getattr(reduce_per_replica, "_multi_worker_scalars", False):
        return

    def reduce_scalars_across_workers(values, strategy, reduction):
        if reduction in ("auto", "mean") and isinstance(
            strategy, tf.distribute.MultiWorkerMirroredStrategy
        ):
            return keras.tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None if v.shape.rank == 0 else 0),
                values,
            )
        return reduce_per_replica(values, strategy, reduction)

    reduce_scalars_across_workers._multi_worker_scalars = True
    trainer.reduce_per_replica = reduce_scalars_across_workers


def _names_reached(owner, method):
    """The global and attribute names that `owner.method`'s code looks up: its nested functions'
    and, transitively, those of the other methods of `owner` it names."""
    names, seen, pending = set(), set(), [method]
    while pending:
        name = pending.pop()
        function = inspect.unwrap(getattr(owner, name, None) or (lambda: None))
        if name in seen or not isinstance(function, types.FunctionType):
            continue
        seen.add(name)
        codes = [function.__code__]
        while codes:
            code = codes.pop()
            names.update(code.co_names)
            codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        pending.extend(n for n in names if n not in seen and hasattr(owner, n))
    return names


def _multi_worker_internals(model):
    """Keras' TensorFlow trainer module, once the behaviour the patch needs is checked:

    - the module has `reduce_per_replica(values, strategy, reduction)`, and the trainer's step
      functions reduce their outputs by looking that module global up (so replacing it works);
    - `fit` builds state through `self._maybe_symbolic_build` (so an instance attribute replaces
      it), and the model has `_symbolic_build(data_batch=...)` to build that state beforehand.
    """
    try:
        from keras.src.backend.tensorflow import trainer
    except ImportError as error:
        raise _unsupported(
            MULTI_WORKER_PIECE, f"keras.src.backend.tensorflow.trainer is missing ({error})"
        ) from error

    def parameters(function):
        return list(inspect.signature(function).parameters)

    reduce = getattr(trainer, "reduce_per_replica", None)
    if not callable(reduce):
        raise _unsupported(
            MULTI_WORKER_PIECE, "keras.src.backend.tensorflow.trainer.reduce_per_replica is missing"
        )
    if parameters(reduce)[:3] != ["values", "strategy", "reduction"]:
        raise _unsupported(
            MULTI_WORKER_PIECE,
            "keras.src.backend.tensorflow.trainer.reduce_per_replica takes "
            f"{parameters(reduce)} instead of (values, strategy, reduction)",
        )
    trainer_class = getattr(trainer, "TensorFlowTrainer", None)
    if "reduce_per_replica" not in _names_reached(trainer_class, "make_train_function"):
        raise _unsupported(
            MULTI_WORKER_PIECE,
            "TensorFlowTrainer's train step no longer reduces its outputs with "
            "keras.src.backend.tensorflow.trainer.reduce_per_replica",
        )
    if "_maybe_symbolic_build" not in _names_reached(trainer_class, "fit"):
        raise _unsupported(
            MULTI_WORKER_PIECE, "TensorFlowTrainer.fit no longer calls self._maybe_symbolic_build"
        )
    build = getattr(model, "_symbolic_build", None)
    if not callable(build) or "data_batch" not in parameters(build):
        raise _unsupported(MULTI_WORKER_PIECE, "Model._symbolic_build(data_batch=...) is missing")
    return trainer


# ---------------------------------------------------------------------------------------------
# EMA weights across several fits

EMA_PIECE = "EMA weights across several fits (SwapEMAWeightsAcrossFits)"


class SwapEMAWeightsAcrossFits(keras.callbacks.SwapEMAWeights):
    """`keras.callbacks.SwapEMAWeights(swap_on_epoch=True)` for a run trained in several `fit`
    calls: a run resumed within an epoch trains the rest of that epoch in one `fit` and the
    epochs after it in another.

    Keras' callback, and the optimizer at the end of every `fit`, make the averages the model's
    weights for good at the end of each fit's last epoch, so the next fit would train on from
    the averages instead of the raw weights (measured: a run resumed within its second of three
    epochs ended 1.45e-4 away from an uninterrupted one). Here that happens only at the end of
    the run's last epoch, `last_epoch` (0-based). A fit that ends before it ends as any epoch
    does, with the averages in the model (for its checkpoints) and the raw weights in the
    optimizer; the next fit's first epoch swaps them back, as the next epoch of one fit would.
    """

    def __init__(self, last_epoch):
        super().__init__(swap_on_epoch=True)
        relied_on = ("_swap_variables", "_finalize_ema_values", "_ema_weights_in_model")
        missing = [name for name in relied_on if not hasattr(self, name)]
        if missing:
            raise _unsupported(EMA_PIECE, f"SwapEMAWeights has no {', '.join(missing)}")
        self.last_epoch = int(last_epoch)
        self._deferred = None  # the optimizer whose end-of-fit finalization is deferred

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.last_epoch or epoch != self.params["epochs"] - 1:
            super().on_epoch_end(epoch, logs)
            return
        # The last epoch of a fit before the run's last: swap as between two epochs, and keep
        # the optimizer from writing the averages into the model when `fit` returns (its
        # `finalize_variable_values` reads `use_ema` then; the train step, traced already, does
        # not read it again).
        if not self._ema_weights_in_model:
            self._swap_variables()
            self._ema_weights_in_model = True
        optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
        if not getattr(optimizer, "use_ema", False):
            raise _unsupported(EMA_PIECE, f"{type(optimizer).__name__} has no use_ema set")
        optimizer.use_ema = False
        self._deferred = optimizer

    def on_train_end(self, logs=None):
        # After `fit`'s finalization: the next fit's steps update the averages again.
        if self._deferred is not None:
            self._deferred.use_ema, self._deferred = True, None
        super().on_train_end(logs)
