"""Weights into a CoaT model: the one step above the model classes and the weight sources.

Data flows one way: `keras_coat.checkpoint` reads files into NumPy, `keras_coat.convert` maps
the reference's names and layouts onto a model's layers, `keras_coat.weights` finds, fetches,
verifies and caches the published checkpoints, `keras_coat.models` builds the models, and this
module joins them. Nothing below imports it.
"""

import collections
import os
import warnings

import h5py

from keras_coat import convert, weights
from keras_coat.checkpoint import read_state_dict
from keras_coat.imagenet import NUM_CLASSES
from keras_coat.models import (
    MODEL_CONFIGS,
    CoaTBackbone,
    CoaTImageClassifier,
    variant_config,
)

__all__ = ["imagenet_checkpoint", "load_imagenet_weights", "load_weights", "load_weights_file"]

WEIGHT_FILE_SUFFIXES = (".weights.h5", ".pth", ".pt", ".safetensors")


def load_weights(model, weights_arg):
    """Loads the factories' `weights` argument (`"imagenet"` or a path) into `model`."""
    if weights_arg is None:
        return
    if weights_arg == "imagenet":
        backbone = getattr(model, "backbone", model)
        checkpoint_name = imagenet_checkpoint(backbone.architecture, backbone.image_shape)
        load_imagenet_weights(model, checkpoint_name)
    else:
        load_weights_file(model, weights_arg)


def imagenet_checkpoint(architecture, image_shape):
    """The published checkpoint for a variant at an input size (CoaT-Lite Medium has a 384 one)."""
    if architecture == "coat_lite_medium" and tuple(image_shape[:2]) == (384, 384):
        return "coat_lite_medium_384"
    return architecture


def load_weights_file(model, path):
    """Loads a `.weights.h5`, `.pth`/`.pt` or `.safetensors` file into a CoaT model.

    PyTorch checkpoints are read without executing anything from the file and converted with
    `keras_coat.convert.assign_state_dict` (strict: every weight accounted for). A
    `.weights.h5` is one saved by `model.save_weights` from a CoaT model of the same
    configuration; a backbone also loads the file of its classifier (the head is left out).
    """
    path = os.fspath(path)
    if path.endswith(".weights.h5"):
        load_keras_weights(model, path)
    else:
        convert.assign_state_dict(model, read_state_dict(path))


def load_imagenet_weights(model, checkpoint_name):
    """Loads the ImageNet weights `checkpoint_name` into a CoaT `model`.

    `model` is a model of the checkpoint's variant, with or without its 1000-class head, at any
    input size. `keras_coat.weights` fetches, verifies and caches the checkpoint; the cache holds
    it converted to the `.weights.h5` of a 1000-class classifier.

    Raises:
        ValueError: unknown checkpoint, a model without 3 input channels, or a head with other
            than 1000 classes.
        keras_coat.weights.ManifestError: the manifest in ``KERAS_COAT_WEIGHTS_MANIFEST`` is
            unusable or lacks the checkpoint.
        keras_coat.weights.WeightsDownloadError: the download failed or its SHA-256 differs.
        keras_coat.checkpoint.UnsafeCheckpointError: the file asks to run code; nothing from
            it was run.
        keras_coat.convert.ConversionError: the checkpoint does not fit the variant.
    """
    _check_imagenet_model(model, checkpoint_name)
    max_bytes = max_checkpoint_bytes(checkpoint_name)
    path = weights.ensure_converted_weights(checkpoint_name, _convert_to_weights_file, max_bytes)
    try:
        load_keras_weights(model, path)
    except OSError:
        # Cache files are written whole, so this one was damaged afterwards (disk, a user's
        # edit): replace it once.
        weights.discard_cached_weights(checkpoint_name)
        path = weights.ensure_converted_weights(
            checkpoint_name, _convert_to_weights_file, max_bytes
        )
        load_keras_weights(model, path)


def max_checkpoint_bytes(checkpoint_name):
    """The largest file accepted as the checkpoint `checkpoint_name` (the download size cap).

    A published checkpoint holds one float32 copy of the variant's weights, 4 bytes per
    parameter; a manifest may name a training checkpoint that also holds an EMA copy and
    AdamW's two moments. Four copies and 64 MiB of pickle and archive overhead bound both
    (e.g. 159 MB for coat_lite_tiny, 780 MB for coat_lite_medium).
    """
    params = MODEL_CONFIGS[weights.variant_of(checkpoint_name)]["params"]
    return 4 * 4 * params + 64 * 2**20


def _check_imagenet_model(model, checkpoint_name):
    weights.variant_of(checkpoint_name)  # a ValueError for unknown names
    channels = model.inputs[0].shape[-1] if model.inputs else None
    if channels != 3:
        raise ValueError(
            f"The ImageNet weights {checkpoint_name!r} expect RGB input with 3 channels; the "
            f"model's input has {channels}."
        )
    classes = getattr(model, "num_classes", None)
    if classes is not None and classes != NUM_CLASSES:
        raise ValueError(
            f"The ImageNet weights {checkpoint_name!r} have a {NUM_CLASSES}-class head; "
            f"the model's head has {classes} classes. Build it with include_top=False (and add "
            f"your own head), or with classes={NUM_CLASSES}."
        )


def _convert_to_weights_file(checkpoint_name, state_dict, path):
    """Converts `state_dict` into a 1000-class classifier and saves its weights to `path`."""
    variant = weights.variant_of(checkpoint_name)
    backbone = CoaTBackbone(**variant_config(variant), pooling="token", architecture=variant)
    reference = CoaTImageClassifier(backbone, num_classes=NUM_CLASSES)
    try:
        convert.assign_state_dict(reference, state_dict)
    except convert.ConversionError as e:
        raise convert.ConversionError(
            f"The checkpoint {weights.resolve(checkpoint_name).url} given for "
            f"{checkpoint_name!r} does not fit the {variant} model (if {weights.MANIFEST_ENV} is "
            f"set, check its entry): {e}"
        ) from e
    reference.save_weights(path)


def load_keras_weights(model, path):
    """Loads a `.weights.h5` saved from a CoaT model into `model`, checking the fit first.

    Keras addresses the arrays of a `.weights.h5` by layer class and position, not by layer
    name, so a file fits a model with the same layers in the same order; a backbone's layers
    come first in its classifier, so a backbone reads its classifier's file directly. Before Keras
    reads anything, every array the model needs must be in the file with its shape: a file of
    another variant or head size is refused with a `ConversionError` naming the arrays, before
    Keras would warn about (and skip) the layers it cannot fill. A failed load leaves the model's
    weights as they were.
    """
    target = model
    if _lacks_classifier_norms(model):
        # A CoaT backbone without pooling has no norm2, norm3 and aggregate (only the
        # classifier's class-token path uses them), so by position its norm4 would read
        # norm2's arrays from a classifier's file. Such files are read into a token-pooled twin
        # and copied over by layer name; the backbone's own files are read directly.
        twin = CoaTBackbone(**{**model.get_config(), "pooling": "token", "name": None})
        if not _missing_arrays(twin, _file_array_shapes(path)):
            target = twin
    missing = _missing_arrays(target, _file_array_shapes(path))
    if missing:
        examples = ", ".join(f"{count} of shape {shape}" for shape, count in missing[:4])
        raise convert.ConversionError(
            f"The weights file {path!r} does not fit {model.name!r}: it lacks arrays the model "
            f"needs ({examples}). Was it saved from a model of another variant, input channels "
            "or number of classes?"
        )
    _keras_load_weights(target, path, model.name)
    if target is not model:
        _copy_weights_by_layer_name(target, model)


def _lacks_classifier_norms(model):
    return isinstance(model, CoaTBackbone) and model.parallel_depth and model.pooling is None


def _file_array_shapes(path):
    """How many arrays of each shape the HDF5 file holds, whatever its group layout."""
    shapes = collections.Counter()

    def visit(_, item):
        if isinstance(item, h5py.Dataset):
            shapes[tuple(item.shape)] += 1

    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except OSError as e:
        raise OSError(f"Cannot read the weights file {path!r} as HDF5: {e}") from e
    return shapes


def _missing_arrays(model, file_shapes):
    needed = collections.Counter(tuple(w.shape) for w in model.weights)
    return sorted((needed - file_shapes).items(), key=lambda item: -item[1])


def _keras_load_weights(model, path, name):
    snapshot = [w.numpy() for w in model.weights]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
            error = None
        except (ValueError, KeyError) as e:
            error = e
    # Keras warns, rather than fails, when a layer of the model has no arrays in the file.
    skipped = [w for w in caught if "keras" in os.path.normpath(w.filename).split(os.sep)]
    if error is not None or skipped:
        model.set_weights(snapshot)
        reason = error if error is not None else skipped[0].message
        raise convert.ConversionError(
            f"Could not load {path!r} into {name!r}: {reason}. Was the file saved from a model "
            "of another variant or with another number of classes?"
        ) from error
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _copy_weights_by_layer_name(source, target):
    source_layers = {layer.name: layer for layer in source.layers}
    for layer in target.layers:
        if layer.weights:
            layer.set_weights(source_layers[layer.name].get_weights())
