"""``export_model``: one entry point for every format, each export verified in its runtime.

``"saved_model"`` is the TF Serving SavedModel of `keras_coat.export.saved_model`; the file
formats (``"litert"``, ``"onnx"``, ``"openvino"``, one module each) take float32 RGB pixels in
[0, 255], ``images [batch, height, width, 3]`` (any batch size), and return float32
``probabilities [batch, classes]``; their class names go beside the file, one per line, in
``<stem>.labels.txt``.

A file export is written under temporary names in the destination folder, run in its runtime
(LiteRT interpreter, ONNX Runtime, OpenVINO) and compared with the Keras model, and renamed into
place only once verified: float32 exports must match within 1e-4 in every probability; reduced
precisions report their top-1 agreement with the Keras model on held-out images. A failed export
leaves nothing behind.
"""

import itertools
import numbers
import os

import numpy as np
import tensorflow as tf

from keras_coat.export import litert, onnx, openvino, saved_model, serving
from keras_coat.export.formats import (
    FORMATS,
    HELD_OUT_IMAGES,
    LABELS_SUFFIX,
    OPENVINO_WEIGHTS_SUFFIX,
    PRECISIONS,
    SUFFIXES,
    ExportResult,
)
from keras_coat.utils.files import publish, remove_if_exists, temporary_path

FORMAT_MODULES = {"litert": litert, "onnx": onnx, "openvino": openvino}


def export_model(
    model,
    path,
    format="saved_model",
    *,
    precision="float32",
    calibration_data=None,
    calibration_images=200,
    held_out_data=None,
    class_names=None,
    image_size=None,
    model_input="auto",
    model_output="auto",
    overwrite=False,
    verify=True,
    min_top1_agreement=None,
    **saved_model_options,
):
    """Writes ``model`` in ``format`` to ``path``, verified in that format's runtime.

    Args:
        model: a built single-input Keras classifier, ``[batch, H, W, 3]`` ->
            ``[batch, classes]`` (see `keras_coat.export.export_saved_model`).
        path: for ``"saved_model"`` the base directory (the SavedModel goes to
            ``path/<version>``); otherwise the file to write, ending in ``.tflite``, ``.onnx``
            or ``.xml`` (OpenVINO's ``.bin`` goes beside it with the same stem).
        format: one of ``FORMATS``.
        precision: one of ``PRECISIONS[format]``.
        calibration_data: for ``"int8"`` (required) and other reduced precisions (optional):
            images of pixels in [0, 255], an array ``[N, H, W, 3]`` or an iterable of
            ``[H, W, 3]`` images (`load_calibration_images` reads them from a folder, a TFDS
            data set or scikit-learn's digits). The first ``calibration_images`` calibrate a
            full-integer export.
        calibration_images: how many images calibrate a full-integer export.
        held_out_data: images (as ``calibration_data``) on which the top-1 agreement of a
            reduced-precision export with the Keras model is measured, at most
            ``HELD_OUT_IMAGES``. Default: all of ``calibration_data`` when it is an array,
            else the calibration images.
        class_names, image_size, model_input, model_output: as for ``export_saved_model``
            (``class_names`` defaults to ``model.class_names`` when the model carries them).
        overwrite: replace existing files; otherwise an existing file is an error.
        verify: run the written file in its runtime and compare it with the Keras model.
        min_top1_agreement: fail a reduced-precision export whose top-1 agreement with the Keras
            model on the held-out images is lower than this (default: only report it).
        **saved_model_options: ``version``, ``crop_pct``, ``crop_mode``, ``top_k`` for
            ``"saved_model"``.

    Returns:
        An ``ExportResult``.
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}; received {format!r}.")
    if precision not in PRECISIONS[format]:
        raise ValueError(
            f"precision {precision!r} is not available for format {format!r}; it offers "
            f"{', '.join(PRECISIONS[format])}."
        )
    if format == "saved_model":
        if calibration_data is not None or held_out_data is not None:
            raise ValueError(
                "`calibration_data` and `held_out_data` apply to reduced-precision exports only."
            )
        target = saved_model.export_saved_model(
            model,
            path,
            class_names=class_names,
            image_size=image_size,
            overwrite=overwrite,
            model_input=model_input,
            model_output=model_output,
            verify=verify,
            **saved_model_options,
        )
        return ExportResult(target, (target,), format, precision)
    if saved_model_options:
        raise ValueError(
            f"{', '.join(sorted(saved_model_options))} apply to format='saved_model' only."
        )
    if (calibration_data is not None or held_out_data is not None) and precision == "float32":
        raise ValueError(
            "`calibration_data` (and `held_out_data`) applies to reduced precisions (int8, "
            "dynamic_int8, bfloat16); a float32 export needs none."
        )
    if precision == "int8" and calibration_data is None:
        raise ValueError(
            "precision 'int8' (full-integer) needs `calibration_data`: images of pixels in "
            "[0, 255] (see keras_coat.export.load_calibration_images)."
        )
    if (
        isinstance(calibration_images, bool)
        or not isinstance(calibration_images, numbers.Integral)
        or calibration_images < 1
    ):
        raise ValueError(
            f"`calibration_images` must be a positive int; received {calibration_images!r}."
        )
    if min_top1_agreement is not None and (
        isinstance(min_top1_agreement, bool)
        or not isinstance(min_top1_agreement, numbers.Real)
        or not 0.0 <= min_top1_agreement <= 1.0
    ):
        raise ValueError(f"`min_top1_agreement` must be in [0, 1]; received {min_top1_agreement}.")

    path = os.fspath(path)
    suffix = SUFFIXES[format]
    if not path.endswith(suffix) or os.path.basename(path) == suffix:
        raise ValueError(f"A {format} export is a `*{suffix}` file; received path {path!r}.")
    contract = serving.serving_contract(
        model,
        class_names=class_names,
        image_size=image_size,
        model_input=model_input,
        model_output=model_output,
    )
    bad = [n for n in contract.class_names if "\n" in n or "\r" in n or not n.strip()]
    if bad:
        raise ValueError(
            f"Class names are written one per line; {bad[0]!r} is empty or spans lines."
        )
    targets = _target_files(path, format)
    label_text = "".join(f"{name}\n" for name in contract.class_names)
    existing = [
        t
        for key, t in targets.items()
        # Exports of one model in several formats share a stem, hence their labels file.
        if os.path.lexists(t) and not (key == "labels" and _has_text(t, label_text))
    ]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass overwrite=True to replace it.")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"The folder of {path!r} does not exist.")

    shape = (contract.height, contract.width)
    calibration = held_out = None
    if calibration_data is not None:
        calibration = _images("calibration_data", calibration_data, shape, calibration_images)
        # An array measures the agreement on all its images; an iterable on those it gave.
        held_out = (
            _images("calibration_data", calibration_data, shape, len(calibration_data))
            if isinstance(calibration_data, np.ndarray)
            else calibration
        )
    if held_out_data is not None:
        held_out = _images("held_out_data", held_out_data, shape, HELD_OUT_IMAGES)

    function = serving.pixels_to_probabilities(
        contract.probabilities_fn(model), contract.height, contract.width
    )
    staging = _target_files(temporary_path(path), format)
    writer = FORMAT_MODULES[format]
    try:
        writer.write(function, staging["model"], precision, calibration)
        with open(staging["labels"], "w", encoding="utf-8") as f:
            f.write(label_text)
        report = {}
        if verify:
            run = writer.session(staging["model"], precision)
            report = _verify(format, precision, run, function, contract, held_out,
                             min_top1_agreement)
        # OpenVINO's weights before its graph, so that the graph never names missing weights.
        for key in ("weights", "model", "labels"):
            if key in staging:
                publish(staging[key], targets[key])
    except BaseException:
        for file in staging.values():
            remove_if_exists(file)
        raise
    return ExportResult(path, tuple(targets.values()), format, precision, **report)


def _target_files(path, format):
    """The files of an export at ``path``: the model (and weights), then the labels."""
    stem = path[: -len(SUFFIXES[format])]
    files = {"model": path}
    if format == "openvino":
        files["weights"] = stem + OPENVINO_WEIGHTS_SUFFIX
    files["labels"] = stem + LABELS_SUFFIX
    return files


def _has_text(path, text):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read() == text
    except (OSError, UnicodeDecodeError):
        return False


def _images(argument, data, size, count):
    """At most `count` images of `data` (an array or an iterable of images) as float32
    ``[N, H, W, 3]`` pixels, checked."""
    height, width = size
    if isinstance(data, (str, bytes)):
        raise ValueError(
            f"`{argument}` must be images (an array [N, {height}, {width}, 3] or an iterable of "
            f"[{height}, {width}, 3] images); received the string {data!r}. Read a folder, a "
            "TFDS data set or the digits with keras_coat.export.load_calibration_images."
        )
    if not isinstance(data, np.ndarray) and not tf.is_tensor(data):
        try:
            data = [np.asarray(image) for image in itertools.islice(iter(data), count)]
        except TypeError as error:
            raise ValueError(
                f"`{argument}` must be an array or an iterable of images; received "
                f"{type(data).__name__}."
            ) from error
        shapes = {image.shape for image in data}
        if len(shapes) > 1:
            raise ValueError(
                f"`{argument}` must hold [{height}, {width}, 3] images; received shapes "
                f"{sorted(shapes)[:3]}."
            )
        data = np.stack(data) if data else np.zeros((0, height, width, 3))
    images = np.asarray(data)[:count]
    if images.ndim != 4 or images.shape[1:] != (height, width, 3) or len(images) == 0:
        raise ValueError(
            f"`{argument}` must be [N, {height}, {width}, 3] pixels; received an array of "
            f"shape {images.shape}."
        )
    if not np.issubdtype(images.dtype, np.number) or not np.all(np.isfinite(images)):
        raise ValueError(f"`{argument}` must hold finite numbers (pixels in [0, 255]).")
    if images.min() < 0 or images.max() > 255:
        raise ValueError(
            f"`{argument}` must be pixels in [0, 255]; received values from "
            f"{images.min()} to {images.max()}."
        )
    return images.astype(np.float32)


def _verify(format, precision, run, function, contract, held_out, min_agreement):
    """Runs the export in its runtime and compares it with the Keras model."""
    images = serving.verification_images(3, contract.height, contract.width)
    expected = function(tf.constant(images)).numpy()
    # Two batch sizes: the batch dimension must stay dynamic.
    probabilities = np.concatenate([run(images[:2]), run(images[2:])])
    exact = precision == "float32"
    error = serving.check_runtime_probabilities(
        f"{format}'s runtime", probabilities, expected,
        atol=serving.VERIFY_ATOL if exact else None,
    )
    if exact:
        return {"max_abs_diff": error}
    if held_out is None:
        held_out = images
    predicted, reference = [], []
    for start in range(0, len(held_out), 32):
        batch = held_out[start : start + 32]
        predicted.append(np.argmax(run(batch), axis=-1))
        reference.append(np.argmax(function(tf.constant(batch)).numpy(), axis=-1))
    agreement = float(np.mean(np.concatenate(predicted) == np.concatenate(reference)))
    if min_agreement is not None and agreement < min_agreement:
        raise ValueError(
            f"The {precision} {format} export agrees with the Keras model's top-1 class on "
            f"{agreement:.2%} of {len(held_out)} held-out images (< {min_agreement:.2%}); "
            "not written."
        )
    return {"max_abs_diff": error, "top1_agreement": agreement, "held_out": len(held_out)}
