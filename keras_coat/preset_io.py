"""Preset directories in KerasHub's layout and `.keras` archives: written atomically, read strictly.

A preset directory holds (keras-hub's file names, without depending on keras-hub):

- ``config.json``: the backbone, as `keras.saving.serialize_keras_object` writes it;
- ``model.weights.h5``: the backbone's weights;
- ``task.json`` and ``task.weights.h5``: the classifier (its config holds the backbone's, the
  pooling, the head, the preprocessing and the class names) and its weights beyond the
  backbone's (none for a headless CoaT-Lite: then no file);
- ``image_converter.json``: the evaluation preprocessing (image size, crop fraction,
  interpolation, mean, std), also inside ``task.json``, for readers that only want this;
- ``metadata.json``: the Keras and keras-coat versions that wrote it, backend, parameter count,
  date, the SHA-256 of every other file, and for a converted checkpoint where it came from.

Reading a preset or a `.keras` archive is reading outside data: only the two keras_coat classes
are described (never an arbitrary registered name), unknown fields are refused, files are
regular files inside the directory (a symlink pointing out of it is refused), JSON files are
small and free of NaN, weights files within a size cap. Errors are
`keras_coat.presets.PresetError`s naming the file and the problem. This module builds no model:
`keras_coat.loader` builds them from the configs read here, so it sits below the model classes.
"""

import contextlib
import datetime
import json
import os
import shutil
import tempfile
import zipfile

import keras

from keras_coat.presets import ImagePreprocessing, PresetError
from keras_coat.utils.files import fsync, publish_directory, sha256, temporary_path
from keras_coat.version import __version__

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
# Largest weights file or `.keras` archive read (coat_lite_medium's weights are 180 MB).
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
_SERIALIZED_FIELDS = {
    "module", "class_name", "config", "registered_name", "build_config", "compile_config",
}


# ------------------------------------------------------------------------------------ writing


def _serialize(model):
    config = keras.saving.serialize_keras_object(model)
    for key in ("build_config", "compile_config"):
        config.pop(key, None)
        if isinstance(config["config"].get("backbone"), dict):
            config["config"]["backbone"].pop(key, None)
    return config


def _write_json(folder, name, data):
    with open(os.path.join(folder, name), "x", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def save_to_preset(model, preset_dir, metadata=None):
    """Writes `model` (a CoaT backbone or classifier) as the preset directory `preset_dir`.

    Everything is written into a hidden directory beside `preset_dir` and renamed into place
    (`keras_coat.utils.files.publish_directory`); an existing preset directory there is
    replaced, anything else is refused. `metadata` adds fields to ``metadata.json``.
    """
    preset_dir = os.path.abspath(os.fspath(preset_dir))
    if os.path.lexists(preset_dir) and not _is_replaceable(preset_dir):
        raise PresetError(
            f"{preset_dir!r} exists and is not a preset directory (no {CONFIG_FILE}); refusing "
            "to replace it. Pass a new or empty directory."
        )
    os.makedirs(os.path.dirname(preset_dir), exist_ok=True)
    staging = temporary_path(preset_dir)
    os.mkdir(staging)
    try:
        write_preset_files(model, staging, metadata)
        publish_directory(staging, preset_dir, overwrite=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _is_replaceable(path):
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    entries = os.listdir(path)
    return not entries or CONFIG_FILE in entries


def write_preset_files(model, folder, metadata=None):
    """Writes the preset files of `model` into the empty directory `folder`, each flushed."""
    backbone = getattr(model, "backbone", model)
    _write_json(folder, CONFIG_FILE, _serialize(backbone))
    backbone.save_weights(os.path.join(folder, MODEL_WEIGHTS_FILE))
    tasks = []
    if backbone is not model:
        tasks = [type(model).__name__]
        _write_json(folder, TASK_CONFIG_FILE, _serialize(model))
        _write_json(folder, IMAGE_CONVERTER_CONFIG_FILE, model.preprocessing.get_config())
        if weights_beyond(model, backbone_objects(model)):
            keras.saving.save_weights(
                model, os.path.join(folder, TASK_WEIGHTS_FILE),
                objects_to_skip=backbone_objects(model),
            )
    files = {}
    for name in sorted(os.listdir(folder)):
        fsync(os.path.join(folder, name))
        files[name] = sha256(os.path.join(folder, name))
    _write_json(folder, METADATA_FILE, {
        "keras_version": keras.version(),
        "keras_coat_version": __version__,
        "backend": keras.backend.backend(),
        "parameter_count": int(model.count_params()),
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
        "tasks": tasks,
        "files": files,
        **(metadata or {}),
    })  # fmt: skip


def backbone_objects(model):
    """The layers of a classifier's backbone (what its task weights leave out)."""
    return list(model.backbone._flatten_layers())


def weights_beyond(model, skip):
    """Whether `model` has weights outside the layers `skip`."""
    skipped = {id(w) for layer in skip for w in layer.weights}
    return any(id(w) not in skipped for w in model.weights)


# ------------------------------------------------------------------------------------ reading


def preset_file(folder, name, required=True, max_bytes=MAX_JSON_BYTES):
    """The path of `name` in the preset `folder`, checked: a regular file inside the folder, at
    most `max_bytes` long (None if it is absent and not `required`)."""
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


def parse_json(text, where):
    """A JSON object from `text` (NaN and Infinity refused), or a PresetError naming `where`."""
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise PresetError(f"{where} is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise PresetError(f"{where} must hold a JSON object; found {type(data).__name__}.")
    return data


def read_json_file(path, where):
    """The JSON object in the file `path` (`parse_json`; errors name `where`)."""
    with open(path, "rb") as f:
        return parse_json(f.read(), where)


def read_json(folder, name, required=True):
    path = preset_file(folder, name, required)
    if path is None:
        return None
    return read_json_file(path, f"{name} in the preset {folder!r}")


def check_serialized(data, registered_name, fields, where):
    """The `config` of a serialized keras_coat object, after checking its class and fields."""
    if not isinstance(data, dict) or data.get("registered_name") != registered_name:
        found = data.get("registered_name") if isinstance(data, dict) else type(data).__name__
        raise PresetError(
            f"{where} must describe a {registered_name.split('>')[1]} (registered_name "
            f"{registered_name!r}); found {found!r}. Only keras_coat's own classes are built "
            "from a preset."
        )
    unknown = set(data) - _SERIALIZED_FIELDS
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
    config = dict(config)
    config.pop("dtype", None)
    return config


def split_classifier(data, where):
    """`(backbone config, classifier config)` of a serialized `CoaTImageClassifier`."""
    config = check_serialized(data, CLASSIFIER_NAME, CLASSIFIER_FIELDS, where)
    backbone = check_serialized(config.pop("backbone", None), BACKBONE_NAME, BACKBONE_FIELDS,
                                f"the backbone in {where}")
    config.setdefault("num_classes", 1000)
    if "preprocessing" in config:
        config["preprocessing"] = preprocessing_from(config["preprocessing"], where)
    return backbone, config


def preprocessing_from(config, where):
    try:
        return ImagePreprocessing.from_config(config)
    except (ValueError, TypeError) as e:
        raise PresetError(f"{where} does not describe a valid preprocessing: {e}") from None


def read_configs(folder):
    """`(backbone config, classifier config)` of the preset directory `folder`, checked.

    A backbone's preset (no ``task.json``) gives ``{"num_classes": None}`` (a headless model
    over its features), with the preprocessing of ``image_converter.json`` if it has one.
    """
    where = f"{CONFIG_FILE} in the preset {folder!r}"
    backbone = check_serialized(read_json(folder, CONFIG_FILE), BACKBONE_NAME, BACKBONE_FIELDS,
                                where)
    task = read_json(folder, TASK_CONFIG_FILE, required=False)
    classifier = {"num_classes": None}
    if task is not None:
        where = f"{TASK_CONFIG_FILE} in the preset {folder!r}"
        nested, classifier = split_classifier(task, where)
        if nested != backbone:
            raise PresetError(f"The backbone in {where} differs from {CONFIG_FILE}.")
    converter = read_json(folder, IMAGE_CONVERTER_CONFIG_FILE, required=False)
    if converter is not None:
        preprocessing = preprocessing_from(converter, f"{IMAGE_CONVERTER_CONFIG_FILE} in {folder!r}")
        if classifier.get("preprocessing", preprocessing) != preprocessing:
            raise PresetError(
                f"{IMAGE_CONVERTER_CONFIG_FILE} and {TASK_CONFIG_FILE} in {folder!r} give "
                "different preprocessing."
            )
        classifier["preprocessing"] = preprocessing
    return backbone, classifier


# ---------------------------------------------------------------------------- .keras archives


def _archive_entry(archive, path, name, max_bytes):
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise PresetError(f"The .keras file {path!r} has no {name}.") from None
    if info.file_size > max_bytes:
        raise PresetError(
            f"{name} in the .keras file {path!r} has {info.file_size} bytes, more than the "
            f"{max_bytes} allowed; refused."
        )
    return info


def read_keras_archive(path):
    """The model config (``config.json``) of the `.keras` archive `path`, as a JSON object."""
    try:
        if os.path.getsize(path) > MAX_WEIGHTS_BYTES:
            raise PresetError(f"The .keras file {path!r} is larger than {MAX_WEIGHTS_BYTES} "
                              "bytes; refused.")
        with zipfile.ZipFile(path) as archive:
            info = _archive_entry(archive, path, CONFIG_FILE, MAX_JSON_BYTES)
            text = archive.read(info)
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise PresetError(f"{path!r} is not a readable .keras file: {e}") from None
    return parse_json(text, f"config.json in the .keras file {path!r}")


@contextlib.contextmanager
def extracted_weights(path):
    """The ``model.weights.h5`` of a `.keras` archive, as a temporary file (at most
    `MAX_WEIGHTS_BYTES` are extracted, whatever the archive declares)."""
    with tempfile.TemporaryDirectory(prefix="keras-coat-archive-") as folder:
        target = os.path.join(folder, MODEL_WEIGHTS_FILE)
        try:
            with zipfile.ZipFile(path) as archive:
                info = _archive_entry(archive, path, MODEL_WEIGHTS_FILE, MAX_WEIGHTS_BYTES)
                with archive.open(info) as source, open(target, "wb") as f:
                    shutil.copyfileobj(source, f)
        except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
            raise PresetError(f"The weights in the .keras file {path!r} are unreadable: "
                              f"{e}") from None
        yield target
