"""One way in: every preset reference is resolved by `resolve`, every model loaded through it.

A *preset reference* is one of:

1. a built-in name (`keras_coat.presets.PRESETS`, e.g. ``"coat_lite_small"``): its checkpoint is
   fetched, verified and converted once into a preset directory in the weights cache
   (`keras_coat.weights`), then read like any preset;
2. a preset directory, KerasHub's layout (`keras_coat.preset_io`);
3. a `.keras` file of a CoaT classifier or backbone (keras-coat 0.1's too: `keras_coat.legacy`);
4. a hub handle, ``hf://owner/repo[@revision]`` or
   ``kaggle://owner/model/framework/variation[/version]``, which `keras_coat.hub` downloads (a
   timm CoaT repo is converted) into a local preset directory.

`from_preset` of both model classes, the factories' ``weights=``, `keras_coat.load_model`, the
command line's ``--model`` and training's ``--init-weights`` all come here. A reference that
cannot be used raises a `keras_coat.presets.PresetError` naming it and the problem (the
checkpoint's, converter's and manifest's errors are PresetErrors too); a download that fails
raises `keras_coat.weights.WeightsDownloadError` (an OSError). Nothing is left in the cache.

The model classes are looked up by their registered names, so this module sits below them.
"""

import contextlib
import dataclasses
import os

import keras

from keras_coat import hub, initializers, legacy, loading, preset_io, weights
from keras_coat.checkpoint import read_state_dict
from keras_coat.convert import ConversionError, assign_state_dict
from keras_coat.presets import PRESETS, VARIANTS, PresetError, get_preset

__all__ = [
    "ResolvedPreset",
    "WEIGHT_FILE_SUFFIXES",
    "load_backbone",
    "load_classifier",
    "load_model",
    "load_weights_file",
    "preset_configs",
    "resolve",
]

WEIGHT_FILE_SUFFIXES = (".weights.h5", ".pth", ".pt", ".safetensors")
ACCEPTED = (
    f"A preset reference is a built-in name ({', '.join(PRESETS)}), a preset directory, a .keras "
    "file, hf://owner/repo[@revision] or kaggle://owner/model/framework/variation[/version]."
)
BACKBONE_OVERRIDES = ("image_shape", "drop_path_rate")
CLASSIFIER_OVERRIDES = (
    "num_classes", "pooling", "activation", "include_preprocessing", "class_names", "name",
)
@dataclasses.dataclass(frozen=True)
class ResolvedPreset:
    """A preset reference made local: `path` is a preset directory or a `.keras` file;
    `source` says where it came from (a checkpoint's URL and SHA-256, a hub handle, a path)."""

    reference: str
    path: str
    source: str

    @property
    def is_keras_file(self):
        return not os.path.isdir(self.path)

    def metadata(self):
        """The preset's ``metadata.json`` (``{}`` for a `.keras` file or a preset without one)."""
        if self.is_keras_file:
            return {}
        return preset_io.read_json(self.path, preset_io.METADATA_FILE, required=False) or {}


def resolve(reference):
    """The local preset a reference names (see the module docstring), or a PresetError."""
    if isinstance(reference, ResolvedPreset):
        return reference
    if isinstance(reference, os.PathLike):
        reference = os.fspath(reference)
    if not isinstance(reference, str) or not reference:
        raise PresetError(f"Not a preset reference: {reference!r}. {ACCEPTED}")
    if "://" in reference:
        if hub.is_handle(reference):
            return ResolvedPreset(reference, os.fspath(_hub_download(reference)), reference)
        raise PresetError(
            f"Unknown scheme {reference.split('://')[0] + '://'!r} in the preset reference "
            f"{reference!r}. {ACCEPTED}"
        )
    if reference in PRESETS:
        entry = weights.checkpoint_entry(reference)
        folder = weights.ensure_preset(reference, _write_builtin)
        return ResolvedPreset(reference, folder, f"{entry.url} (SHA-256 {entry.sha256})")
    if os.path.isdir(reference) or (os.path.isfile(reference) and reference.endswith(".keras")):
        return ResolvedPreset(reference, reference, os.path.abspath(reference))
    if os.path.lexists(reference):
        hint = (" (a weights file: pass it as `weights=` of a factory, or --weights)"
                if reference.endswith(WEIGHT_FILE_SUFFIXES) else "")
        raise PresetError(
            f"{reference!r} is neither a preset directory nor a .keras file{hint}; weights files "
            f"must end with {', '.join(WEIGHT_FILE_SUFFIXES)}. {ACCEPTED}"
        )
    if os.sep in reference or "." in reference:  # a path, not a name
        raise PresetError(
            f"{reference!r} does not exist (no such preset directory or .keras file; a weights "
            f"file's name must end with {', '.join(WEIGHT_FILE_SUFFIXES)}). {ACCEPTED}"
        )
    raise PresetError(f"Unknown CoaT preset {reference!r}. {ACCEPTED}")


def _hub_download(handle):
    """The local preset directory `keras_coat.hub` makes of a hub handle."""
    return hub.download(handle)


# -------------------------------------------------------------------------------- configs


def _builtin_configs(name):
    preset = get_preset(name)
    from keras_coat.imagenet import class_names

    backbone = {**VARIANTS[preset.variant], "name": f"{name}_backbone",
                "image_shape": (*preset.preprocessing.image_size, 3)}
    classifier = {"num_classes": preset.num_classes, "preprocessing": preset.preprocessing,
                  "class_names": class_names(), "name": name}
    return backbone, classifier


def _keras_configs(path):
    serialized = preset_io.read_keras_archive(path)
    where = f"config.json in the .keras file {path!r}"
    if legacy.is_legacy_model_config(serialized):
        return legacy.model_configs(serialized, where)
    if serialized.get("registered_name") == preset_io.BACKBONE_NAME:
        config = preset_io.check_serialized(serialized, preset_io.BACKBONE_NAME,
                                            preset_io.BACKBONE_FIELDS, where)
        return config, {"num_classes": None}
    return preset_io.split_classifier(serialized, where)


def preset_configs(reference, fetch=True):
    """`(resolved, backbone config, classifier config)` of a reference, read strictly.

    A backbone's preset gives ``{"num_classes": None}`` as classifier config (a headless model).
    With ``fetch=False`` a built-in name's configs come from the table, nothing is fetched, and
    `resolved` is None.
    """
    if not fetch and isinstance(reference, str) and reference in PRESETS:
        return (None, *_builtin_configs(reference))
    resolved = resolve(reference)
    if resolved.is_keras_file:
        return (resolved, *_keras_configs(resolved.path))
    return (resolved, *preset_io.read_configs(resolved.path))


# --------------------------------------------------------------------------------- models


def _build(where, factory, *args, **kwargs):
    """Calls a constructor on preset data: any failure becomes a PresetError naming `where`."""
    try:
        return factory(*args, **kwargs)
    except PresetError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, AttributeError) as e:
        raise PresetError(f"{where} does not describe a valid model: {e}") from None


def _named(reference):
    return reference.reference if isinstance(reference, ResolvedPreset) else reference


def _check_overrides(overrides, allowed):
    unknown = set(overrides) - set(allowed)
    if unknown:
        raise PresetError(
            f"from_preset() takes the overrides {sorted(allowed)}; received {sorted(unknown)}."
        )


def load_backbone(cls, reference, load_weights=True, **overrides):
    """`cls` (a `CoaTBackbone`) from a reference; `overrides`: `BACKBONE_OVERRIDES`."""
    _check_overrides(overrides, BACKBONE_OVERRIDES)
    resolved, config, _ = preset_configs(reference, fetch=load_weights)
    with _weights_loaded_next(resolved):
        backbone = _build(f"The preset {_named(reference)!r}", cls, **{**config, **overrides})
    if resolved is not None:
        _load_preset_weights(backbone, resolved, [])
    return backbone


def load_classifier(cls, reference, load_weights=True, **overrides):
    """`cls` (a `CoaTImageClassifier`) from a reference; `overrides`: those of the backbone
    and `CLASSIFIER_OVERRIDES` (another `num_classes` gives a fresh head)."""
    _check_overrides(overrides, BACKBONE_OVERRIDES + CLASSIFIER_OVERRIDES)
    resolved, backbone_config, saved = preset_configs(reference, fetch=load_weights)
    where = f"The preset {_named(reference)!r}"
    backbone_overrides = {k: overrides.pop(k) for k in BACKBONE_OVERRIDES if k in overrides}
    with _weights_loaded_next(resolved):
        backbone = _build(where, cls.backbone_cls, **{**backbone_config, **backbone_overrides})
    if "preprocessing" in saved and "image_shape" in backbone_overrides:
        saved["preprocessing"] = saved["preprocessing"].resized(backbone.image_shape[:2])
    new_head = "num_classes" in overrides and overrides["num_classes"] != saved["num_classes"]
    if new_head and "class_names" not in overrides:
        saved.pop("class_names", None)
    model = _build(where, cls, backbone, **{**saved, **overrides})
    if resolved is not None:
        skip = [layer for layer in model.layers if layer.name in ("head", "predictions")]
        _load_preset_weights(model, resolved, skip if new_head else [])
    return model


def _weights_loaded_next(resolved):
    """Around the build of a backbone whose weights the preset `resolved` then loads (None: no
    weights, the model keeps its initial values)."""
    return contextlib.nullcontext() if resolved is None else initializers.values_loaded_next()


def _load_preset_weights(model, resolved, skip):
    if resolved.is_keras_file:
        with preset_io.extracted_weights(resolved.path) as path:
            _load_file(model, path, f"The .keras file {resolved.path!r}", skip)
        return
    folder = resolved.path
    backbone = getattr(model, "backbone", model)
    _load_file(backbone, _weights_path(folder, preset_io.MODEL_WEIGHTS_FILE),
               f"{preset_io.MODEL_WEIGHTS_FILE} in the preset {folder!r}", [])
    if backbone is not model:
        skip = skip + preset_io.backbone_objects(model)
        if preset_io.weights_beyond(model, skip):
            _load_file(model, _weights_path(folder, preset_io.TASK_WEIGHTS_FILE),
                       f"{preset_io.TASK_WEIGHTS_FILE} in the preset {folder!r}", skip)


def _weights_path(folder, name):
    return preset_io.preset_file(folder, name, max_bytes=preset_io.MAX_WEIGHTS_BYTES)


def _load_file(model, path, where, skip):
    try:
        loading.load_keras_weights(model, path, objects_to_skip=skip or None,
                                   layouts=legacy.layouts)
    except OSError as e:
        raise PresetError(f"{where} is unreadable: {e}") from None
    except ValueError as e:
        raise PresetError(f"{where} does not fit the model: {e}") from None


def load_weights_file(model, path):
    """Loads a `.weights.h5` (keras-coat 0.1's too), `.pth`/`.pt` or `.safetensors` file into a
    CoaT model, strictly (`keras_coat.loading`, `keras_coat.convert`)."""
    path = os.fspath(path)
    if not path.endswith(WEIGHT_FILE_SUFFIXES):
        raise PresetError(f"Cannot load weights from {path!r}: the file name must end with one "
                          f"of {', '.join(WEIGHT_FILE_SUFFIXES)}.")
    if not os.path.isfile(path):
        raise PresetError(f"The weights file {path!r} does not exist or is no file.")
    if path.endswith(".weights.h5"):
        loading.load_keras_weights(model, path, layouts=legacy.layouts)
    else:
        assign_state_dict(model, read_state_dict(path))


def load_model(reference, compile=True):
    """The model a reference holds, as saved: a `CoaTImageClassifier` (a headless one for a
    keras-coat 0.1 backbone), or a `CoaTBackbone` for a backbone's preset or `.keras` file.

    A `.keras` file of this version is checked to describe only keras_coat's classes and then
    loaded by `keras.saving.load_model` (with its compile state when `compile`).
    """
    resolved = resolve(reference)
    classifier_cls = keras.saving.get_registered_object(preset_io.CLASSIFIER_NAME)
    if resolved.is_keras_file:
        if legacy.is_legacy_model_config(preset_io.read_keras_archive(resolved.path)):
            return load_classifier(classifier_cls, resolved)
        _keras_configs(resolved.path)  # CoaT classes and known fields only
        try:
            return keras.saving.load_model(resolved.path, compile=compile)
        except (ValueError, OSError, KeyError, TypeError) as e:
            hint = " (compile=False skips its training configuration)" if compile else ""
            raise PresetError(f"The .keras file {resolved.path!r} is unreadable{hint}: {e}") \
                from None
    if os.path.lexists(os.path.join(resolved.path, preset_io.TASK_CONFIG_FILE)):
        return load_classifier(classifier_cls, resolved)
    return load_backbone(classifier_cls.backbone_cls, resolved)


def _write_builtin(name, source, folder, metadata):
    """Writes the published checkpoint `name` as a preset directory into `folder`, from its
    state dict or a keras-coat 0.1 cache entry's weights file (`keras_coat.weights`)."""
    classifier_cls = keras.saving.get_registered_object(preset_io.CLASSIFIER_NAME)
    backbone_config, classifier_config = _builtin_configs(name)
    model = classifier_cls(classifier_cls.backbone_cls(**backbone_config), **classifier_config)
    if isinstance(source, dict):
        try:
            assign_state_dict(model, source)
        except ConversionError as e:
            raise ConversionError(
                f"The checkpoint {metadata['source']['url']} given for {name!r} does not fit "
                f"the {get_preset(name).variant} model (if {weights.MANIFEST_ENV} is set, check "
                f"its entry): {e}"
            ) from e
    else:
        load_weights_file(model, source)
    preset_io.write_preset_files(model, folder, metadata)
