"""Reading what keras-coat 0.1 wrote; nothing else in the package knows its formats.

Retire on 2027-06-30 (then delete this module, its callers' few lines, `MODEL_CONFIGS` and
tests/data/compat_0_1). 0.1 was never tagged and lived only as a source tree, so a year after
0.2.0 is ample for its files to have been loaded once (which rewrites its cache entries as
preset directories) or saved again (``model.save`` / ``save_to_preset``).

keras-coat 0.1 built the classifier and its backbone as one flat Keras graph, with the
normalization and pooling in the backbone:

- its `.keras` configs: a `CoaTBackbone` with `include_preprocessing`, `pooling` and
  `architecture`; a `CoaTImageClassifier` holding such a backbone and `classifier_activation`.
  `model_configs` turns them into today's backbone and classifier configs (a 0.1 backbone
  becomes a headless classifier that computes the same outputs);
- its `.weights.h5` layout: one flat list of layers addressed by class and position
  (`layouts` rebuilds it from a model's own graph for `keras_coat.loading`);
- its weights-cache entries, ``<name>-<sha8>-v1.weights.h5`` and the 0.1 development tree's
  ``-v2`` (a converted 1000-class classifier, flat or nested, with a JSON record):
  `cache_entry` finds an intact one, so that the cache turns it into a preset directory without
  downloading again, and `remove_cache_entries` deletes them afterwards.
"""

import json
import os

import keras

from keras_coat import preset_io
from keras_coat.loading import group_names, rename
from keras_coat.presets import PRESETS, VARIANTS, PresetError
from keras_coat.utils.files import sha256

__all__ = [
    "MODEL_CONFIGS",
    "cache_entry",
    "is_legacy_backbone",
    "layouts",
    "is_legacy_model_config",
    "legacy_error",
    "model_configs",
    "remove_cache_entries",
]

# Kept for code written against keras-coat 0.1: `{variant: architecture and paper figures}`.
# `keras_coat.presets.VARIANTS` and `PRESETS` are the source.
MODEL_CONFIGS = {
    name: {**VARIANTS[name], "params": PRESETS[name].params, "gflops": PRESETS[name].gflops,
           "top1": PRESETS[name].top1}
    for name in VARIANTS
}
# Fields of a 0.1 backbone config that now belong to the classifier (or to nothing).
BACKBONE_KEYS = ("include_preprocessing", "pooling", "architecture")
CLASSIFIER_FIELDS = {"name", "trainable", "backbone", "num_classes", "classifier_activation",
                     "dtype"}
CACHE_FORMATS = (1, 2)


# ------------------------------------------------------------------------------ .keras configs


def is_legacy_backbone(serialized):
    """Whether a serialized `CoaTBackbone` was written by keras-coat 0.1."""
    config = serialized.get("config") if isinstance(serialized, dict) else None
    return isinstance(config, dict) and any(key in config for key in BACKBONE_KEYS)


def is_legacy_model_config(serialized):
    """Whether a serialized CoaT model (a `.keras` file's config) was written by keras-coat 0.1."""
    if not isinstance(serialized, dict):
        return False
    if serialized.get("class_name") == "CoaTImageClassifier":
        return is_legacy_backbone(serialized.get("config", {}).get("backbone"))
    return is_legacy_backbone(serialized)


def legacy_error(kind):
    return ValueError(
        f"This {kind} configuration was written by keras-coat 0.1 (its backbone holds "
        "`pooling`/`include_preprocessing`); load such .keras files with "
        "keras_coat.load_model(path), which rebuilds them in the current layout."
    )


def model_configs(serialized, where):
    """`(backbone config, classifier config)` in today's layout for a 0.1 model config, checked
    as strictly as today's (keras_coat's classes only, known fields only)."""
    if serialized.get("class_name") == "CoaTImageClassifier":
        config = preset_io.check_serialized(serialized, preset_io.CLASSIFIER_NAME,
                                            CLASSIFIER_FIELDS, where)
        nested, where = config.get("backbone"), f"the backbone in {where}"
        head = {"num_classes": config.get("num_classes", 1000),
                "activation": config.get("classifier_activation", "softmax")}
    else:
        config, nested, head = serialized.get("config"), serialized, {"num_classes": None}
    inner = nested.get("config") if isinstance(nested, dict) else None
    if not isinstance(inner, dict):
        raise PresetError(f"{where}: `config` must be a JSON object; found {inner!r}.")
    legacy = {key: inner.get(key) for key in BACKBONE_KEYS}
    backbone = preset_io.check_serialized(
        {**nested, "config": {k: v for k, v in inner.items() if k not in BACKBONE_KEYS}},
        preset_io.BACKBONE_NAME, preset_io.BACKBONE_FIELDS, where,
    )
    backbone.pop("name", None)
    pooling = legacy["pooling"] or ("token" if head["num_classes"] is not None else None)
    preprocessing = legacy["include_preprocessing"]
    return backbone, {**head, "pooling": pooling, "name": config.get("name"),
                      "include_preprocessing": True if preprocessing is None else preprocessing}


# ------------------------------------------------------------------------- .weights.h5 layout


def layouts(model, backbone, nested, arrays):
    """Ways to read the arrays of a 0.1 file as `model`'s, as `keras_coat.loading` candidates:
    `({model path: file path}, absent)`.

    0.1 wrote one flat list, the classifier's layers around the backbone's, in the order of its
    one graph, and held only the layers its output depended on: its CoaT backbones without
    pooling lacked the class-token norms of scales 2 and 3 and the last parallel block's MLP
    norms of those scales. The layers (and their order) of each such graph are read off this
    backbone's own graph, from the outputs it had; `absent` names the model's layers the file's
    model did not have (they keep their values).
    """
    outer = [] if backbone is model else model.layers
    position = next((i for i, layer in enumerate(outer) if layer is backbone), 0)
    before, after = outer[:position], outer[position + 1:]
    inner_names, outer_names = group_names(backbone.layers), group_names(outer)
    prefix = {id(layer): f"layers/{outer_names[id(layer)]}" for layer in before + after}
    for layer in backbone.layers:
        group = f"layers/{inner_names[id(layer)]}"
        prefix[id(layer)] = f"{nested}/{group}" if nested else group
    names = backbone.feature_names
    for outputs in (names, names[-1:]) if len(names) > 1 else (names,):
        graph = keras.Model(backbone.inputs, [backbone.output[key] for key in outputs])
        flat = before + graph.layers[1:] + after
        old = group_names(flat)
        used = {id(layer) for layer in graph.layers}
        absent = tuple(prefix[id(layer)] + "/" for layer in backbone.layers if id(layer) not in used)
        yield rename(arrays, {f"layers/{old[id(layer)]}": prefix[id(layer)] for layer in flat}), \
            absent


# ----------------------------------------------------------------------------- cache entries


def _entry_paths(folder, stem, cache_format):
    base = os.path.join(folder, f"{stem}-v{cache_format}")
    return base + ".weights.h5", base + ".json"


def cache_entry(folder, stem, name, sha256_prefix):
    """`(weights path, checkpoint SHA-256)` of an intact 0.1 cache entry of the checkpoint
    `name` whose digest starts with `sha256_prefix`, or None.

    Intact: both files are regular files, the record names the checkpoint, its format and a full
    checkpoint digest with that prefix, and the weights file hashes to the recorded digest.
    """
    for cache_format in CACHE_FORMATS:
        weights, record_path = _entry_paths(folder, stem, cache_format)
        try:
            if not (os.path.isfile(weights) and not os.path.islink(weights)
                    and os.path.isfile(record_path) and not os.path.islink(record_path)):
                continue
            with open(record_path, encoding="utf-8") as f:
                record = json.load(f)
            digest = record.get("checkpoint_sha256") if isinstance(record, dict) else None
            if (record.get("checkpoint") == name and record.get("cache_format") == cache_format
                    and isinstance(digest, str) and len(digest) == 64
                    and digest.startswith(sha256_prefix)
                    and record.get("weights_sha256") == sha256(weights)):
                return weights, digest
        except (OSError, ValueError, AttributeError):  # unreadable or not JSON: not intact
            continue
    return None


def remove_cache_entries(folder, stem):
    """Deletes the 0.1 cache entries of `stem` (once the preset directory replaces them)."""
    for cache_format in CACHE_FORMATS:
        for path in _entry_paths(folder, stem, cache_format):
            if os.path.lexists(path) and not os.path.isdir(path):
                os.remove(path)
