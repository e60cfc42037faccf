"""Preset directories in KerasHub's layout: writing them atomically, reading them strictly.

A preset directory holds (keras-hub's file names, without depending on keras-hub):

- ``config.json``: the backbone, as `keras.saving.serialize_keras_object` writes it;
- ``model.weights.h5``: the backbone's weights;
- ``task.json`` and ``task.weights.h5``: the classifier (its config holds the backbone's, the
  pooling, the head, the preprocessing and the class names) and its weights beyond the
  backbone's (none for a headless CoaT-Lite: then no file);
- ``image_converter.json``: the evaluation preprocessing (image size, crop fraction,
  interpolation, mean, std), also inside ``task.json``, for readers that only want this;
- ``metadata.json``: versions, parameter count, date, backend, and for converted checkpoints
  where they came from.

Reading a directory is reading outside data: only the two keras_coat classes are built (never
an arbitrary registered name), every config field is checked, files are regular files inside
the directory (a symlink pointing out of it is refused), JSON files are small, and weights must
fit the model exactly before Keras reads them. Errors are `keras_coat.presets.PresetError`s
naming the file and the problem.

This module builds no model class itself: the classes pass themselves in (`cls`), so it sits
below `backbone.py` and `image_classifier.py` in the import graph.
"""

import contextlib
import datetime
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile

import keras

from keras_coat import convert, loading, weights
from keras_coat.presets import ImagePreprocessing, PresetError, get_preset
from keras_coat.utils.files import fsync_file, publish_directory, temporary_path

CONFIG_FILE = "config.json"
MODEL_WEIGHTS_FILE = "model.weights.h5"
TASK_CONFIG_FILE = "task.json"
TASK_WEIGHTS_FILE = "task.weights.h5"
IMAGE_CONVERTER_CONFIG_FILE = "image_converter.json"
METADATA_FILE = "metadata.json"
PRESET_FILES = (
    CONFIG_FILE, MODEL_WEIGHTS_FILE, TASK_CONFIG_FILE, TASK_WEIGHTS_FILE,
    IMAGE_CONVERTER_CONFIG_FILE, METADATA_FILE,
)
# Largest JSON file read (a task.json with 20,000 class names is ~0.5 MB).
MAX_JSON_BYTES = 4 * 2**20
# Largest weights file read (coat_lite_medium's are 180 MB).
MAX_WEIGHTS_BYTES = 2 * 2**30
BACKBONE_NAME = "keras_coat>CoaTBackbone"
CLASSIFIER_NAME = "keras_coat>CoaTImageClassifier"
BACKBONE_FIELDS = {
    "name", "trainable", "embed_dims", "serial_depths", "mlp_ratios", "parallel_depth",
    "num_heads", "crpe_windows", "image_shape", "drop_path_rate", "dtype",
}
CLASSIFIER_FIELDS = {
    "name", "trainable", "backbone", "num_classes", "pooling", "activation",
    "include_preprocessing", "preprocessing", "class_names", "dtype",
}
# Fields of a keras-coat 0.1 backbone config that now belong to the classifier (or to nothing).
LEGACY_BACKBONE_KEYS = ("include_preprocessing", "pooling", "architecture")
BACKBONE_OVERRIDES = ("image_shape", "drop_path_rate")
CLASSIFIER_OVERRIDES = (
    "num_classes", "pooling", "activation", "include_preprocessing", "class_names", "name",
)


# ------------------------------------------------------------------------------------ writing


def _serialize(model):
    config = keras.saving.serialize_keras_object(model)
    for key in ("build_config", "compile_config"):
        config.pop(key, None)
    if isinstance(config.get("config", {}).get("backbone"), dict):
        for key in ("build_config", "compile_config"):
            config["config"]["backbone"].pop(key, None)
    return config


def _write_json(folder, name, data):
    path = os.path.join(folder, name)
    with open(path, "x", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def save_to_preset(model, preset_dir, metadata=None):
    """Writes `model` (a CoaT backbone or classifier) as a preset directory, atomically.

    Everything is written into a temporary directory beside `preset_dir` and renamed into
    place; an existing preset directory there is replaced, anything else is refused.
    """
    preset_dir = os.path.abspath(os.fspath(preset_dir))
    parent = os.path.dirname(preset_dir)
    if os.path.lexists(preset_dir) and not _is_replaceable(preset_dir):
        raise PresetError(
            f"{preset_dir!r} exists and is not a preset directory (no {CONFIG_FILE}); refusing "
            "to replace it. Pass a new or empty directory."
        )
    os.makedirs(parent, exist_ok=True)
    staging = temporary_path(preset_dir)
    os.mkdir(staging)  # not mkdtemp: its 0700 would hide a published preset
    try:
        _write_preset_files(model, staging, metadata)
        publish_directory(staging, preset_dir, overwrite=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _is_replaceable(path):
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    entries = os.listdir(path)
    return not entries or CONFIG_FILE in entries


def _write_preset_files(model, folder, metadata):
    backbone = getattr(model, "backbone", model)
    _write_json(folder, CONFIG_FILE, _serialize(backbone))
    backbone.save_weights(os.path.join(folder, MODEL_WEIGHTS_FILE))
    tasks = []
    if backbone is not model:
        tasks = [type(model).__name__]
        _write_json(folder, TASK_CONFIG_FILE, _serialize(model))
        _write_json(folder, IMAGE_CONVERTER_CONFIG_FILE, model.preprocessing.get_config())
        if _has_task_weights(model):
            keras.saving.save_weights(
                model, os.path.join(folder, TASK_WEIGHTS_FILE),
                objects_to_skip=_backbone_objects(model),
            )
    _write_json(folder, METADATA_FILE, {
        "keras_version": keras.version(),
        "keras_coat_version": _package_version(),
        "backend": keras.backend.backend(),
        "parameter_count": int(model.count_params()),
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
        "tasks": tasks,
        **(metadata or {}),
    })  # fmt: skip
    for name in os.listdir(folder):
        fsync_file(os.path.join(folder, name))


def _package_version():
    try:
        return importlib.metadata.version("keras-coat")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return None


def _backbone_objects(model):
    return list(model.backbone._flatten_layers())


def _has_task_weights(model):
    backbone_ids = {id(w) for w in model.backbone.weights}
    return any(id(w) not in backbone_ids for w in model.weights)


# ------------------------------------------------------------------------------------ reading


def _preset_file(folder, name, required=True, max_bytes=MAX_JSON_BYTES):
    """The path of `name` in the preset `folder`, checked: a regular file inside the folder."""
    path = os.path.join(folder, name)
    if not os.path.lexists(path):
        if required:
            raise PresetError(f"The preset {folder!r} has no {name} (a required file).")
        return None
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.commonpath([real_folder, real]) != real_folder:
        raise PresetError(
            f"{name} in the preset {folder!r} is a link to {real!r}, outside the preset "
            "directory; refused."
        )
    if not os.path.isfile(real):
        raise PresetError(f"{name} in the preset {folder!r} is not a regular file.")
    size = os.path.getsize(real)
    if size > max_bytes:
        raise PresetError(
            f"{name} in the preset {folder!r} has {size} bytes, more than the {max_bytes} "
            "allowed; refused."
        )
    return real


def _reject_constant(name):
    raise ValueError(f"non-finite number {name}")


def _read_json(folder, name, required=True):
    path = _preset_file(folder, name, required)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read(), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise PresetError(f"{name} in the preset {folder!r} is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise PresetError(
            f"{name} in the preset {folder!r} must hold a JSON object; found "
            f"{type(data).__name__}."
        )
    return data


def _check_serialized(data, registered_name, fields, where):
    """The `config` of a serialized keras_coat object, after checking its class and fields."""
    if not isinstance(data, dict) or data.get("registered_name") != registered_name:
        found = data.get("registered_name") if isinstance(data, dict) else type(data).__name__
        raise PresetError(
            f"{where} must describe a {registered_name.split('>')[1]} (registered_name "
            f"{registered_name!r}); found {found!r}. Only keras_coat's own classes are built "
            "from a preset."
        )
    unknown = set(data) - {"module", "class_name", "config", "registered_name", "build_config"}
    if unknown:
        raise PresetError(f"{where} has unknown top-level fields {sorted(unknown)}.")
    config = data.get("config")
    if not isinstance(config, dict):
        raise PresetError(f"{where}: `config` must be a JSON object; found {config!r}.")
    unknown = set(config) - fields
    if unknown:
        raise PresetError(
            f"{where}: unknown config fields {sorted(unknown)}; allowed: {sorted(fields)}."
        )
    return dict(config)


def _build(where, factory, *args, **kwargs):
    """Calls a constructor on preset data: any failure becomes a PresetError naming `where`."""
    try:
        return factory(*args, **kwargs)
    except PresetError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, AttributeError) as e:
        raise PresetError(f"{where} does not describe a valid model: {e}") from None


def _backbone_config(folder):
    where = f"{CONFIG_FILE} in the preset {folder!r}"
    config = _check_serialized(_read_json(folder, CONFIG_FILE), BACKBONE_NAME, BACKBONE_FIELDS,
                               where)
    config.pop("dtype", None)
    return config, where


def _directory(preset):
    """`preset` as a directory path, or None for a built-in name (a PresetError otherwise)."""
    if isinstance(preset, os.PathLike):
        preset = os.fspath(preset)
    if not isinstance(preset, str):
        raise PresetError(f"A preset is a name or a directory; received {type(preset).__name__}.")
    if os.path.isdir(preset):
        return preset
    if os.sep in preset or preset.startswith(".") or os.path.lexists(preset):
        raise PresetError(f"The preset directory {preset!r} does not exist or is no directory.")
    get_preset(preset)  # a PresetError listing the built-in names
    return None


def load_backbone(cls, preset, load_weights=True, **overrides):
    _check_overrides(overrides, BACKBONE_OVERRIDES)
    folder = _directory(preset)
    if folder is None:
        entry = get_preset(preset)
        overrides.setdefault("image_shape", (*entry.preprocessing.image_size, 3))
        backbone = cls.from_variant(entry.variant, **overrides)
        if load_weights:
            load_builtin_weights(backbone, preset)
        return backbone
    config, where = _backbone_config(folder)
    config.update(overrides)
    backbone = _build(where, cls, **config)
    if load_weights:
        _load_file(backbone, folder, MODEL_WEIGHTS_FILE)
    return backbone


def load_classifier(cls, preset, load_weights=True, **overrides):
    _check_overrides(overrides, BACKBONE_OVERRIDES + CLASSIFIER_OVERRIDES)
    folder = _directory(preset)
    backbone_overrides = {k: overrides.pop(k) for k in BACKBONE_OVERRIDES if k in overrides}
    backbone = load_backbone(cls.backbone_cls, preset, load_weights=False, **backbone_overrides)
    if folder is None:
        saved = builtin_classifier_config(preset)
    else:
        saved = _saved_classifier_config(folder)
    if "preprocessing" in saved and "image_shape" in backbone_overrides:
        saved["preprocessing"] = saved["preprocessing"].resized(backbone.image_shape[:2])
    new_head = "num_classes" in overrides and overrides["num_classes"] != saved["num_classes"]
    if new_head and "class_names" not in overrides:
        saved.pop("class_names", None)
    saved.update(overrides)
    where = f"{TASK_CONFIG_FILE} in the preset {folder!r}" if folder else f"the preset {preset!r}"
    model = _build(where, cls, backbone, **saved)
    if not load_weights:
        return model
    skip = [layer for layer in model.layers if layer.name in ("head", "predictions")]
    skip = skip if new_head else []
    if folder is None:
        load_builtin_weights(model, preset, objects_to_skip=skip or None)
        return model
    _load_file(backbone, folder, MODEL_WEIGHTS_FILE)
    skip += _backbone_objects(model)
    if _has_task_weights_beyond(model, skip):
        _load_file(model, folder, TASK_WEIGHTS_FILE, objects_to_skip=skip)
    return model


def builtin_classifier_config(name):
    """The classifier arguments of a published checkpoint: its head, preprocessing, classes."""
    from keras_coat.imagenet import class_names

    entry = get_preset(name)
    return {
        "num_classes": entry.num_classes,
        "preprocessing": entry.preprocessing,
        "class_names": class_names(),
        "name": name,
    }


def _saved_classifier_config(folder):
    where = f"{TASK_CONFIG_FILE} in the preset {folder!r}"
    task = _read_json(folder, TASK_CONFIG_FILE, required=False)
    if task is None:  # a backbone's preset: a headless model over its features
        saved = {"num_classes": None}
    else:
        saved = _check_serialized(task, CLASSIFIER_NAME, CLASSIFIER_FIELDS, where)
        saved.pop("dtype", None)
        nested = saved.pop("backbone", None)
        nested_config = _check_serialized(nested, BACKBONE_NAME, BACKBONE_FIELDS,
                                          f"the backbone in {where}")
        nested_config.pop("dtype", None)
        stored, _ = _backbone_config(folder)
        if nested_config != stored:
            raise PresetError(f"The backbone in {where} differs from {CONFIG_FILE}.")
        saved.setdefault("num_classes", 1000)
    converter = _read_json(folder, IMAGE_CONVERTER_CONFIG_FILE, required=False)
    if converter is not None:
        preprocessing = _build(f"{IMAGE_CONVERTER_CONFIG_FILE} in {folder!r}",
                               ImagePreprocessing.from_config, converter)
        if "preprocessing" in saved and _build(
            where, ImagePreprocessing.from_config, saved["preprocessing"]
        ) != preprocessing:
            raise PresetError(
                f"{IMAGE_CONVERTER_CONFIG_FILE} and {TASK_CONFIG_FILE} in {folder!r} give "
                "different preprocessing."
            )
        saved["preprocessing"] = preprocessing
    elif "preprocessing" in saved:
        saved["preprocessing"] = _build(where, ImagePreprocessing.from_config,
                                        saved["preprocessing"])
    return saved


def load_builtin_weights(model, name, objects_to_skip=None):
    """Loads the published checkpoint `name` into `model` (a backbone, or a classifier of its
    variant at any input size); `keras_coat.weights` fetches, verifies and caches it."""
    entry = get_preset(name)
    channels = model.inputs[0].shape[-1]
    if channels != 3:
        raise ValueError(
            f"The ImageNet weights {name!r} expect RGB input with 3 channels; the model's "
            f"input has {channels}."
        )
    classes = getattr(model, "num_classes", None)
    skipped = {layer.name for layer in objects_to_skip or ()}
    if classes is not None and classes != entry.num_classes and "head" not in skipped:
        raise ValueError(
            f"The ImageNet weights {name!r} have a {entry.num_classes}-class head; the model's "
            f"head has {classes} classes. Build it with include_top=False (and add your own "
            f"head), or with classes={entry.num_classes}."
        )
    converter = getattr(keras.saving.get_registered_object(CLASSIFIER_NAME),
                        "_write_checkpoint_weights")
    path = weights.ensure_converted_weights(name, converter, entry.max_download_bytes)
    try:
        loading.load_keras_weights(model, path, objects_to_skip=objects_to_skip)
    except OSError:
        # Cache files are written whole, so this one was damaged afterwards (disk, a user's
        # edit): replace it once.
        weights.discard_cached_weights(name)
        path = weights.ensure_converted_weights(name, converter, entry.max_download_bytes)
        loading.load_keras_weights(model, path, objects_to_skip=objects_to_skip)


def _has_task_weights_beyond(model, skip):
    skipped = {id(w) for layer in skip for w in layer.weights}
    return any(id(w) not in skipped for w in model.weights)


def _check_overrides(overrides, allowed):
    unknown = set(overrides) - set(allowed)
    if unknown:
        raise PresetError(
            f"from_preset() takes the overrides {sorted(allowed)}; received {sorted(unknown)}."
        )


def _load_file(model, folder, name, objects_to_skip=None):
    path = _preset_file(folder, name, max_bytes=MAX_WEIGHTS_BYTES)
    try:
        loading.load_keras_weights(model, path, objects_to_skip=objects_to_skip)
    except OSError as e:
        raise PresetError(f"{name} in the preset {folder!r} is unreadable: {e}") from None
    except ValueError as e:
        raise PresetError(f"{name} in the preset {folder!r} does not fit the model: {e}") from None


# ------------------------------------------------------------------------- built-in presets


def convert_checkpoint(classifier, name, source):
    """Fills `classifier` (built for the published checkpoint `name`) from `source`: the
    checkpoint's state dict, or the path of a keras-coat 0.1 cache entry (the converted weights
    of its 1000-class classifier), read instead of downloading again."""
    if isinstance(source, dict):
        try:
            convert.assign_state_dict(classifier, source)
        except convert.ConversionError as e:
            raise convert.ConversionError(
                f"The checkpoint {weights.resolve(name).url} given for {name!r} does not fit "
                f"the {get_preset(name).variant} model (if {weights.MANIFEST_ENV} is set, check "
                f"its entry): {e}"
            ) from e
    else:
        loading.load_keras_weights(classifier, source)


# ----------------------------------------------------------------------- keras-coat 0.1 files


def is_legacy_backbone_config(serialized):
    config = serialized.get("config") if isinstance(serialized, dict) else None
    return isinstance(config, dict) and any(k in config for k in LEGACY_BACKBONE_KEYS)


def is_legacy_model_config(serialized):
    """Whether a serialized CoaT model (a `.keras` file's config) was written by keras-coat 0.1."""
    if not isinstance(serialized, dict):
        return False
    if serialized.get("registered_name") == CLASSIFIER_NAME:
        return is_legacy_backbone_config(serialized.get("config", {}).get("backbone"))
    return is_legacy_backbone_config(serialized)


def legacy_error(kind):
    return ValueError(
        f"This {kind} configuration was written by keras-coat 0.1 (its backbone holds "
        "`pooling`/`include_preprocessing`); load such .keras files with "
        "keras_coat.load_model(path), which rebuilds them in the current layout."
    )


def split_legacy(config):
    config = dict(config)
    legacy = {key: config.pop(key) for key in LEGACY_BACKBONE_KEYS if key in config}
    return config, legacy


def legacy_headless_model(classifier_cls, backbone, legacy, name=None):
    """The model a keras-coat 0.1 `CoaTBackbone` config described: normalization and pooling
    inside, now the headless classifier around the backbone."""
    return classifier_cls(
        backbone,
        num_classes=None,
        pooling=legacy.get("pooling"),
        include_preprocessing=legacy.get("include_preprocessing", True),
        name=name or backbone.name,
    )


def legacy_classifier(cls, config):
    """The model a keras-coat 0.1 `CoaTImageClassifier` config described."""
    backbone_config, legacy = split_legacy(config["backbone"]["config"])
    backbone_config.pop("name", None)
    backbone_config.pop("trainable", None)
    backbone = cls.backbone_cls(**backbone_config)
    return cls(
        backbone,
        num_classes=config.get("num_classes", 1000),
        pooling=legacy.get("pooling") or "token",
        activation=config.get("classifier_activation", "softmax"),
        include_preprocessing=legacy.get("include_preprocessing", True),
        name=config.get("name"),
    )


def read_keras_archive_config(path):
    """The model config (`config.json`) of a `.keras` archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("config.json")
            if info.file_size > MAX_JSON_BYTES:
                raise ValueError(f"{path!r}: its config.json has {info.file_size} bytes.")
            return json.loads(archive.read(info))
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{path!r} is not a .keras file: {e}") from None


@contextlib.contextmanager
def extracted_weights(path):
    """The `model.weights.h5` of a `.keras` archive, as a temporary file."""
    with tempfile.TemporaryDirectory(prefix="keras-coat-archive-") as folder:
        target = os.path.join(folder, "model.weights.h5")
        with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as source, \
                open(target, "wb") as f:
            shutil.copyfileobj(source, f)
        yield target
