"""Keras `.weights.h5` files into CoaT models, strictly: what a file holds is checked against what
the model needs before Keras reads anything, so nothing is skipped silently and no warning is
watched.

A Keras `.weights.h5` addresses arrays by layer class and position (Keras' saving_lib), not by
layer name. `load_keras_weights` maps a file onto the model it loads from the layouts a CoaT file
can have: the model's own, a `CoaTImageClassifier`'s (the backbone nested under
``layers/coa_t_backbone``) read by a backbone, a `CoaTBackbone`'s read by a classifier, and any
layouts the caller adds (`keras_coat.legacy`'s, for files of keras-coat 0.1). A classifier's
file loads into a headless classifier (the head is left out); a backbone's file loads into a
classifier whose only weights beyond the backbone's are none (CoaT-Lite, or a headless model).
A file that fits no layout is refused with a `ConversionError` naming the arrays it lacks, and
the model keeps its weights.
"""

import os
import re
import tempfile

import h5py
import keras
import numpy as np

from keras_coat.convert import ConversionError

__all__ = ["file_arrays", "group_names", "load_keras_weights", "rename"]


def _snake(name):
    # keras.src.utils.naming.to_snake_case, which names the groups of a weights file.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def group_names(layers):
    """`{id(layer): group name}` as Keras names a list of layers in a weights file."""
    used, names = {}, {}
    for layer in layers:
        name = _snake(type(layer).__name__)
        if name in used:
            used[name] += 1
            name = f"{name}_{used[name]}"
        else:
            used[name] = 0
        names[id(layer)] = name
    return names


def file_arrays(path):
    """`{dataset path: shape}` of an HDF5 weights file; OSError if it is no readable HDF5."""
    shapes = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            shapes[name] = tuple(item.shape)

    try:
        with h5py.File(path, "r") as f:
            f.visititems(visit)
    except OSError as e:
        raise OSError(f"Cannot read the weights file {path!r} as HDF5: {e}") from e
    return shapes


def _model_arrays(model, objects_to_skip=None):
    """The `{dataset path: shape}` Keras writes for `model` (learned by writing it)."""
    with tempfile.TemporaryDirectory(prefix="keras-coat-layout-") as folder:
        path = os.path.join(folder, "layout.weights.h5")
        keras.saving.save_weights(model, path, objects_to_skip=objects_to_skip)
        return file_arrays(path)


def rename(arrays, renames):
    """Maps dataset paths by their leading group: `renames` is `{old prefix: new prefix}`."""
    mapped = {}
    for path, shape in arrays.items():
        head, _, rest = path.partition("/")
        group, _, rest = rest.partition("/")
        new = renames.get(f"{head}/{group}")
        if new is not None:
            mapped[f"{new}/{rest}"] = path
    return mapped


def _candidates(model, arrays, layouts):
    """Ways to read the file's arrays as `model`'s: `({model path: file path}, absent)`, where
    `absent` are the path prefixes of model layers that the file's model did not have."""
    identity = {path: path for path in arrays}
    yield identity, ()
    backbone = getattr(model, "backbone", model)
    nested = f"layers/{group_names(model.layers)[id(backbone)]}" if backbone is not model else ""
    if backbone is model:  # a classifier's file: its backbone's group
        prefix = "layers/coa_t_backbone/"
        if any(path.startswith(prefix) for path in arrays):
            yield {p[len(prefix):]: p for p in arrays if p.startswith(prefix)}, ()
    else:  # a backbone's file: the nested backbone's group
        yield {f"{nested}/{path}": path for path in arrays}, ()
    if layouts is not None:
        yield from layouts(model, backbone, nested, arrays)


def _missing(expected, arrays, mapping):
    return [
        (path, shape) for path, shape in expected.items()
        if path not in mapping or arrays[mapping[path]] != shape
    ]


def load_keras_weights(model, path, objects_to_skip=None, layouts=None):
    """Loads a `.weights.h5` of a CoaT model into `model`, checking the fit first.

    Args:
        model: a `CoaTBackbone` or `CoaTImageClassifier`.
        path: the file.
        objects_to_skip: layers not to load (KerasHub's task weights leave out the backbone).
        layouts: ``layouts(model, backbone, nested prefix, arrays)`` yielding more candidate
            `({model path: file path}, absent prefixes)` mappings (`keras_coat.legacy.layouts`).

    Raises:
        ConversionError: the file lacks arrays the model needs, naming them.
        OSError: the file is no readable HDF5 (missing, truncated, not a weights file).
    """
    path = os.fspath(path)
    arrays = file_arrays(path)
    expected = _model_arrays(model, objects_to_skip)
    best = None
    for mapping, absent in _candidates(model, arrays, layouts):
        # Layers the file's model did not have keep their values.
        missing = [
            item for item in _missing(expected, arrays, mapping)
            if not (absent and item[0] not in mapping and item[0].startswith(absent))
        ]
        if not missing:
            _load_mapped(model, path, arrays, expected, mapping, objects_to_skip)
            return
        if best is None or len(missing) < len(best):
            best = missing
    examples = ", ".join(f"{p} {s}" for p, s in best[:4])
    raise ConversionError(
        f"The weights file {path!r} does not fit {model.name!r}: it lacks {len(best)} array(s) "
        f"the model needs (e.g. {examples}). Was it saved from a model of another variant, "
        "input channels or number of classes?"
    )


def _load_mapped(model, path, arrays, expected, mapping, objects_to_skip):
    """Writes the mapped arrays into a file of the model's own layout and has Keras load it."""
    identity = all(mapping.get(p) == p for p in expected) and set(arrays) == set(expected)
    if identity:
        keras.saving.load_weights(model, path, objects_to_skip=objects_to_skip)
        return
    with tempfile.TemporaryDirectory(prefix="keras-coat-load-") as folder:
        staged = os.path.join(folder, "staged.weights.h5")
        # The model's current values first: arrays the file may lack keep them.
        keras.saving.save_weights(model, staged, objects_to_skip=objects_to_skip)
        with h5py.File(path, "r") as source, h5py.File(staged, "r+") as target:
            for model_path in expected:
                if model_path in mapping:
                    target[model_path][...] = np.asarray(source[mapping[model_path]])
        keras.saving.load_weights(model, staged, objects_to_skip=objects_to_skip)
