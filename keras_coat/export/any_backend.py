"""`export_model` and `export_saved_model` on every Keras backend, through one implementation.

Every export is a TensorFlow graph (the SavedModel; LiteRT, ONNX and OpenVINO files are
converted from one), written and verified by `keras_coat.export.exporter` and
`keras_coat.export.saved_model` on Keras' TensorFlow backend. On TensorFlow they run in this
process. On JAX or PyTorch the model is saved as ``.keras`` into a private temporary folder, and
the same function runs in a child process (``python -m keras_coat.export REQUEST``, Keras on
TensorFlow, on the CPU) that loads it and writes the files, verified against the model it
loaded: the same files a TensorFlow process writes. An error in the child is raised here as the
same exception type with the same message. The temporary folder is removed on every path; a
child stopped early removes what it staged (it is asked with SIGTERM, and killed only if it
does not stop).

Nothing here imports TensorFlow or a converter (Keras' own ``model.save`` loads TensorFlow
where it is installed); importing `keras_coat.export` is free on every backend.
"""

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np

from keras_coat.export.formats import HELD_OUT_IMAGES, ExportResult
from keras_coat.presets import PresetError

REQUEST_FILE = "request.json"
RESPONSE_FILE = "response.json"
MODEL_FILE = "model.keras"
# How long a child asked to stop (SIGTERM) may take to remove its staged files.
STOP_TIMEOUT_S = 60
# Image arguments, sent as .npy (an array) or .npz (a list of images) files.
IMAGE_OPTIONS = ("calibration_data", "held_out_data")
# Attributes the serving contract reads from a model when they are there (duck-typed, so a plain
# Keras model may carry them); a `.keras` file keeps them only for CoaT classifiers.
MODEL_ATTRIBUTES = ("class_names", "preprocessing")
PREPROCESSING_FIELDS = ("image_size", "crop_pct", "crop_fraction", "interpolation", "mean", "std")
# Exceptions raised here again by type name (the child reports its exception's classes, most
# derived first); any other is a RuntimeError with the child's message.
EXCEPTIONS = {
    cls.__name__: cls
    for cls in (
        PresetError, FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
        PermissionError, OSError, TypeError, ValueError, NotImplementedError, RuntimeError,
    )
}  # fmt: skip
# Variables of the parent's own runtime that must not reach the TensorFlow child: JAX's
# multi-process set-up (Keras' names) and XLA's flags.
PARENT_ONLY_VARIABLES = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
    "XLA_FLAGS",
)


def export_model(model, path, format="saved_model", **options):
    """Writes ``model`` in ``format`` to ``path``, verified in that format's runtime, and
    returns an `ExportResult` (the arguments: `keras_coat.export.exporter.export_model`).

    Runs on every Keras backend: on JAX and PyTorch the export is written by a TensorFlow child
    process from the model saved as ``.keras`` (see this module's docstring).
    """
    if keras.backend.backend() == "tensorflow":
        from keras_coat.export import exporter

        return exporter.export_model(model, path, format, **options)
    fields = run_in_tensorflow("export_model", model, path, {"format": format, **options})
    return ExportResult.from_dict(fields)


def export_saved_model(model, directory, version=1, **options):
    """Writes ``model`` as the TF Serving SavedModel ``directory/<version>/`` and returns its
    path (the arguments: `keras_coat.export.saved_model.export_saved_model`).

    Runs on every Keras backend, as `export_model`.
    """
    if keras.backend.backend() == "tensorflow":
        from keras_coat.export import saved_model

        return saved_model.export_saved_model(model, directory, version, **options)
    return run_in_tensorflow("export_saved_model", model, directory, {"version": version, **options})


# ---------------------------------------------------------------------------------------------
# This process: the request, the child, the answer


def run_in_tensorflow(function, model, target, options):
    """Runs the export `function` ("export_model" or "export_saved_model") of `model` to
    `target` in a TensorFlow-backend child process; returns what it returned (JSON)."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model; received {type(model).__name__}.")
    folder = tempfile.mkdtemp(prefix="keras-coat-export-")  # private: mode 0700
    try:
        request = {
            "function": function,
            "target": os.fspath(target),
            "options": {},
            "images": {},
            "attributes": _model_attributes(model),
        }
        for name, value in options.items():
            if name in IMAGE_OPTIONS and value is not None and not isinstance(value, str):
                request["images"][name] = _save_images(folder, name, value, options)
            else:
                request["options"][name] = _portable(name, value)
        model.save(os.path.join(folder, MODEL_FILE))
        with open(os.path.join(folder, REQUEST_FILE), "w", encoding="utf-8") as f:
            json.dump(request, f)
        response = _run_child(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if "error" in response:
        error = response["error"]
        kind = next((EXCEPTIONS[n] for n in error["types"] if n in EXCEPTIONS), RuntimeError)
        raise kind(error["message"])
    return response["result"]


def _portable(name, value):
    """`value` as JSON (tuples as lists, NumPy scalars as numbers); a TypeError otherwise."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (tuple, list)):
        return [_portable(name, v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(
        f"`{name}`={value!r} ({type(value).__name__}) cannot be passed to the TensorFlow process "
        f"that exports from the {keras.backend.backend()} backend; pass numbers, strings or "
        "lists of them."
    )


def _save_images(folder, name, data, options):
    """Saves image data for the child: an array as ``<name>.npy``; an iterable (the images the
    export would take from it, at most) as ``<name>.npz``, read back as a list."""
    if hasattr(data, "__array__") and not isinstance(data, (list, tuple)):
        path = os.path.join(folder, f"{name}.npy")
        np.save(path, keras.ops.convert_to_numpy(data), allow_pickle=False)
        return path
    count = options.get("calibration_images", 200) if name == "calibration_data" else 0
    count = max(count if isinstance(count, int) else 0, HELD_OUT_IMAGES)
    try:
        images = [np.asarray(image) for image in itertools.islice(iter(data), count)]
    except TypeError:  # not iterable: the export names the problem
        return {"value": _portable(name, data)}
    path = os.path.join(folder, f"{name}.npz")
    np.savez(path, **{str(i): image for i, image in enumerate(images)})
    return path


def _model_attributes(model):
    attributes = {}
    names = getattr(model, "class_names", None)
    if names is not None:
        attributes["class_names"] = _portable("model.class_names", list(names))
    preprocessing = getattr(model, "preprocessing", None)
    if preprocessing is not None:
        fields = {}
        for field in PREPROCESSING_FIELDS:
            value = (
                preprocessing.get(field)
                if isinstance(preprocessing, dict)
                else getattr(preprocessing, field, None)
            )
            if value is not None:
                fields[field] = _portable(f"model.preprocessing.{field}", value)
        attributes["preprocessing"] = fields
    return attributes


def _child_environment():
    env = {k: v for k, v in os.environ.items() if k not in PARENT_ONLY_VARIABLES}
    # The same keras_coat as this process, wherever it was imported from.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(
        KERAS_BACKEND="tensorflow",
        PYTHONPATH=os.pathsep.join(paths),
        # The export runs on the CPU: the accelerators stay with this process.
        CUDA_VISIBLE_DEVICES="-1",
        TF_CPP_MIN_LOG_LEVEL=env.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    )
    return env


def child_command(folder):
    """The command line of the export child for the request in `folder`."""
    return [sys.executable, "-m", "keras_coat.export", os.path.join(folder, REQUEST_FILE)]


def _run_child(folder):
    """Runs the child to its end; returns its response. If this process is interrupted, the
    child is asked to stop (and clean up) before the interruption goes on."""
    with subprocess.Popen(
        child_command(folder),
        env=_child_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as child:
        try:
            output, _ = child.communicate()
        except BaseException:
            child.terminate()
            try:
                child.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
    try:
        with open(os.path.join(folder, RESPONSE_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        tail = output.decode("utf-8", "replace")[-4000:]
        raise RuntimeError(
            f"The TensorFlow process that exports from the {keras.backend.backend()} backend "
            f"stopped (exit status {child.returncode}) without an answer. Its output ends:\n"
            + tail
        ) from None


# ---------------------------------------------------------------------------------------------
# The child: python -m keras_coat.export REQUEST


def serve_request(request_path):
    """Runs the export a parent process asked for in `request_path` and writes the response
    (the function's result, or the exception's classes and message) beside it."""
    folder = os.path.dirname(os.path.abspath(request_path))
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    try:
        response = {"result": _export(folder, request)}
    except Exception as error:
        types = [cls.__name__ for cls in type(error).__mro__]
        response = {"error": {"types": types, "message": str(error)}}
    partial = os.path.join(folder, RESPONSE_FILE + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(response, f)
    os.replace(partial, os.path.join(folder, RESPONSE_FILE))


def _export(folder, request):
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"The export process runs Keras on {keras.backend.backend()!r}.")
    import keras_coat.image_classifier  # noqa: F401  registers the CoaT classes for loading
    from keras_coat.export import exporter, saved_model

    # The file was written by the parent moments ago into its private folder: trusted as the
    # model in the parent's memory is (safe_mode=False keeps a Lambda layer loadable).
    model = keras.saving.load_model(
        os.path.join(folder, MODEL_FILE), compile=False, safe_mode=False
    )
    for name, value in request["attributes"].items():
        if getattr(model, name, None) is None:
            setattr(model, name, value)
    options = dict(request["options"])
    for name, saved in request["images"].items():
        if isinstance(saved, dict):
            options[name] = saved["value"]
        elif saved.endswith(".npy"):
            options[name] = np.load(saved, allow_pickle=False)
        else:
            with contextlib.closing(np.load(saved, allow_pickle=False)) as images:
                options[name] = [images[str(i)] for i in range(len(images.files))]
    if request["function"] == "export_model":
        return exporter.export_model(model, request["target"], **options).to_dict()
    return saved_model.export_saved_model(model, request["target"], **options)
