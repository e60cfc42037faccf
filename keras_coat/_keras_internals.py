"""Every use of Keras internals in keras-coat, each with the Keras versions it is tested on.

Public Keras APIs do the rest of the package's work; what is here relies on Keras behaviour that
is not part of its API and may change in any release. Each piece checks, when used, that the
Keras it runs on still behaves as it relies on, and raises a `RuntimeError` naming the piece,
the versions it is tested on and the version found, instead of misbehaving silently.

- `SeedStream` (training's augmentation): a `keras.random.SeedGenerator` whose draws are a
  function of one seed tensor. Relies on Keras' random ops drawing their seed by calling
  `SeedGenerator.next()` and touching nothing else of it. Feature-checked on first use.
- `patch_multi_worker_fit` (training under MultiWorkerMirroredStrategy): works around
  keras-team/keras#20585 by patching `keras.src.backend.tensorflow.trainer` and a model's
  private build step. Version- and feature-checked.

Nothing here imports TensorFlow at module import: keras_coat runs on any Keras backend.
"""

import functools

import keras

# Keras versions (major, minor) the pieces below are tested on: CI runs the newest Keras below 4
# (3.15.1 when this was written); 3.8 is the oldest keras_coat supports (pyproject.toml), whose
# source has the same internals.
TESTED_KERAS = ((3, 8), (3, 15))


def keras_version():
    """The running Keras version as (major, minor)."""
    major, minor = keras.version().split(".")[:2]
    return int(major), int(minor)


def _range_text():
    (low_major, low_minor), (high_major, high_minor) = TESTED_KERAS
    return f"{low_major}.{low_minor}-{high_major}.{high_minor}"


def _unsupported(piece, detail):
    return RuntimeError(
        f"keras_coat's {piece} relies on Keras internals tested on Keras {_range_text()}; "
        f"found Keras {keras.version()}, {detail}"
    )


# ---------------------------------------------------------------------------------------------
# SeedStream


class SeedStream(keras.random.SeedGenerator):
    """A `SeedGenerator` whose draws are fold-ins of one seed tensor, without any state.

    Keras random ops accept a `SeedGenerator` as `seed` and call `next()` once per draw; this one
    returns `fold_in(seed, 1)`, `fold_in(seed, 2)`, ... (the counter advances while the graph is
    traced, so each draw site in the graph gets its own constant). TensorFlow only (tf.data).

    Args:
        seed: a ``[2]`` integer seed tensor (e.g. one example's seed in a tf.data pipeline).
    """

    def __init__(self, seed):  # no state variable: deliberately not calling super().__init__
        import tensorflow as tf

        _check_seed_generators_are_drawn_with_next()
        self._seed = tf.convert_to_tensor(seed)
        self._draws = 0

    def next(self, ordered=True):
        import tensorflow as tf

        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._draws)


class _CountingSeed(keras.random.SeedGenerator):
    """Counts `next()` calls; draws from a plain `SeedGenerator`, skipping its own state."""

    def __init__(self):  # no state variable, as SeedStream
        self.calls = 0
        self._inner = keras.random.SeedGenerator(0)

    def next(self, ordered=True):
        self.calls += 1
        return self._inner.next(ordered)


@functools.cache
def _check_seed_generators_are_drawn_with_next():
    probe = _CountingSeed()
    try:
        keras.random.uniform((2,), seed=probe)
        drawn = probe.calls == 1
    except Exception as error:  # any failure means the Keras behaviour relied on is gone
        raise _unsupported(
            "SeedStream", f"where a random op with a stateless SeedGenerator fails: {error!r}"
        ) from error
    if not drawn:
        raise _unsupported(
            "SeedStream",
            f"whose random ops called SeedGenerator.next() {probe.calls} times for one draw "
            "instead of once",
        )


# ---------------------------------------------------------------------------------------------
# Multi-worker fit


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
        RuntimeError: on a Keras outside `TESTED_KERAS` or without the internals patched here.
    """
    import tensorflow as tf

    trainer = _multi_worker_internals(model)
    batch = tuple(tf.zeros([1, *spec.shape[1:]], spec.dtype) for spec in element_spec)
    model._symbolic_build(data_batch=batch)
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


def _multi_worker_internals(model):
    """Keras' TensorFlow trainer module, once the internals the patch needs are checked."""
    piece = "multi-worker fit patch"
    if not TESTED_KERAS[0] <= keras_version() <= TESTED_KERAS[1]:
        raise _unsupported(piece, "outside that range; check keras-team/keras#20585 there")
    try:
        from keras.src.backend.tensorflow import trainer
    except ImportError as error:
        raise _unsupported(piece, f"which has no TensorFlow trainer module ({error})") from error
    missing = [
        name
        for owner, name in (
            (trainer, "reduce_per_replica"),
            (model, "_symbolic_build"),
            (model, "_maybe_symbolic_build"),
        )
        if not callable(getattr(owner, name, None))
    ]
    if missing:
        raise _unsupported(piece, f"which lacks {', '.join(missing)}")
    return trainer
