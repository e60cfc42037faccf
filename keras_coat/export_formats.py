"""Export a classifier for CPU servers and phones: LiteRT, ONNX and OpenVINO files.

``export_model(model, path, format=...)`` writes one of

``"saved_model"``
    the TF Serving SavedModel of ``keras_coat.export`` (``path`` is the model's base directory).
``"litert"``
    a LiteRT (TFLite) flatbuffer ``*.tflite`` with builtin ops only; ``precision`` ``"float32"``,
    ``"dynamic_int8"`` (int8 weights, float activations) or ``"int8"`` (full-integer kernels,
    activation ranges calibrated on ``calibration_data``; float32 input and output).
``"onnx"``
    an ONNX graph ``*.onnx`` (opset 17) for ONNX Runtime, float32.
``"openvino"``
    OpenVINO IR ``*.xml`` plus its weights ``*.bin``, float32 weights. Compile it with
    ``{"INFERENCE_PRECISION_HINT": "f32"}``: OpenVINO's CPU plugin otherwise computes in bf16 on
    CPUs that have bf16 instructions (``precision="bfloat16"`` verifies the export that way).

Every file takes float32 RGB pixels in [0, 255], ``images [batch, height, width, 3]`` (any batch
size), and returns float32 ``probabilities [batch, classes]``: the ImageNet normalization and the
softmax are in the file when the Keras model lacks them (as for the SavedModel). The class names
go beside the file, one per line, in ``<stem>.labels.txt``.

Each export is verified in its own runtime (LiteRT interpreter, ONNX Runtime, OpenVINO) before it
is published: float exports must match the Keras model within 1e-4 in every probability, reduced
precision ones report their top-1 agreement with the Keras model on held-out images. The files
are written under temporary names in the destination folder and renamed into place only once
verified; a failed export leaves nothing behind.
"""

import dataclasses
import numbers
import os
import re
import uuid

import numpy as np
import tensorflow as tf

from keras_coat import export as saved_model_export
from keras_coat.imagenet import DEFAULT_CROP_PCT, eval_transform

FORMATS = ("saved_model", "litert", "onnx", "openvino")
# The precisions each format offers; the first is the default.
PRECISIONS = {
    "saved_model": ("float32",),
    "litert": ("float32", "dynamic_int8", "int8"),
    "onnx": ("float32",),
    "openvino": ("float32", "bfloat16"),
}
# OpenVINO's CPU plugin picks bf16 by itself where the CPU has bf16 instructions.
OPENVINO_HINTS = {"float32": "f32", "bfloat16": "bf16"}
SUFFIXES = {"litert": ".tflite", "onnx": ".onnx", "openvino": ".xml"}
LABELS_SUFFIX = ".labels.txt"
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
CALIBRATION_SOURCES = "digits, folder:PATH or tfds:NAME"
# Held-out images for the top-1 agreement of a reduced-precision export.
HELD_OUT_IMAGES = 360


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how it compared with the Keras model in its runtime.

    ``max_abs_diff``: the largest probability difference on the verification images;
    ``top1_agreement``: the share of ``held_out`` images whose top-1 class is the Keras model's
    (reduced precisions only). An ``ExportResult`` is an ``os.PathLike`` of ``path``.
    """

    path: str
    files: tuple
    format: str
    precision: str
    max_abs_diff: float | None = None
    top1_agreement: float | None = None
    held_out: int = 0

    def __fspath__(self):
        return self.path


def export_model(
    model,
    path,
    format="saved_model",
    *,
    precision="float32",
    calibration_data=None,
    calibration_images=200,
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
            ``[batch, classes]`` (see ``keras_coat.export.export_saved_model``).
        path: for ``"saved_model"`` the base directory (the SavedModel goes to
            ``path/<version>``); otherwise the file to write, ending in ``.tflite``, ``.onnx``
            or ``.xml`` (OpenVINO's ``.bin`` goes beside it with the same stem).
        format: one of ``FORMATS``.
        precision: one of ``PRECISIONS[format]``.
        calibration_data: for ``"int8"`` (required) and other reduced precisions (optional: the
            held-out images for the top-1 agreement): a float array of pixels in [0, 255]
            ``[N, H, W, 3]``, or a source name ``"digits"``, ``"folder:PATH"`` or
            ``"tfds:NAME"`` (read with the repository's ``training.data``; its training split
            calibrates, its held-out split measures the agreement).
        calibration_images: how many images calibrate a full-integer export.
        class_names, image_size, model_input, model_output: as for ``export_saved_model``.
        overwrite: replace existing files; otherwise an existing file is an error.
        verify: run the written file in its runtime and compare it with the Keras model.
        min_top1_agreement: fail a reduced-precision export whose top-1 agreement with the Keras
            model on the held-out images is lower than this (default: only report it).
        **saved_model_options: ``version``, ``crop_pct``, ``top_k`` for ``"saved_model"``.

    Returns:
        An ``ExportResult``.
    """
    saved_model_export._check_backend("export_model")
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}; received {format!r}.")
    if precision not in PRECISIONS[format]:
        raise ValueError(
            f"precision {precision!r} is not available for format {format!r}; it offers "
            f"{', '.join(PRECISIONS[format])}."
        )
    if format == "saved_model":
        if calibration_data is not None:
            raise ValueError("`calibration_data` applies to reduced-precision exports only.")
        target = saved_model_export.export_saved_model(
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
    if calibration_data is not None and precision == "float32":
        raise ValueError(
            "`calibration_data` applies to reduced precisions (int8, dynamic_int8, bfloat16); "
            "a float32 export needs none."
        )
    if precision == "int8" and calibration_data is None:
        raise ValueError(
            "precision 'int8' (full-integer) needs `calibration_data`: a pixel array or "
            f"{CALIBRATION_SOURCES}."
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
    height, width, classes = saved_model_export._check_model_shapes(model, image_size)
    names = saved_model_export._resolve_class_names(class_names, classes)
    bad = [n for n in names if "\n" in n or "\r" in n or not n.strip()]
    if bad:
        raise ValueError(
            f"Class names are written one per line; {bad[0]!r} is empty or spans lines."
        )
    probabilities_of = saved_model_export._probabilities_fn(
        model,
        saved_model_export._needs_normalization(model, model_input),
        saved_model_export._needs_softmax(model, model_output),
    )
    targets = _target_files(path, format)
    label_text = "".join(f"{name}\n" for name in names)
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

    calibration, held_out = None, None
    if calibration_data is not None:
        calibration, held_out = _calibration_split(
            calibration_data, height, width, calibration_images
        )

    signature = tf.TensorSpec((None, height, width, 3), tf.float32, name=INPUT_NAME)
    pixels_to_probabilities = tf.function(
        lambda images: tf.identity(probabilities_of(images), name=OUTPUT_NAME),
        input_signature=[signature],
        autograph=False,
    )
    staging = _target_files(
        os.path.join(directory, f".{os.path.basename(path)}.partial-{uuid.uuid4().hex}{suffix}"),
        format,
    )
    try:
        if format == "litert":
            _write_litert(pixels_to_probabilities, staging["model"], precision, calibration)
        elif format == "onnx":
            _write_onnx(pixels_to_probabilities, staging["model"])
        else:
            _write_openvino(pixels_to_probabilities, staging["model"])
        with open(staging["labels"], "w", encoding="utf-8") as f:
            f.write(label_text)
        report = {}
        if verify:
            report = _verify(
                format,
                precision,
                staging["model"],
                pixels_to_probabilities,
                height,
                width,
                classes,
                held_out,
                min_top1_agreement,
            )
        _publish_files(staging, targets)
    except BaseException:
        for file in staging.values():
            if os.path.lexists(file):
                os.remove(file)
        raise
    return ExportResult(path, tuple(targets.values()), format, precision, **report)


def _target_files(path, format):
    """The files of an export at ``path``: the model (and weights), then the labels."""
    stem = path[: -len(SUFFIXES[format])]
    files = {"model": path}
    if format == "openvino":
        files["weights"] = stem + ".bin"
    files["labels"] = stem + LABELS_SUFFIX
    return files


def _has_text(path, text):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read() == text
    except (OSError, UnicodeDecodeError):
        return False


def _publish_files(staging, targets):
    """Renames each verified staging file over its target; OpenVINO's weights before its graph,
    so the graph never names weights that are not there yet."""
    for key in ("weights", "model", "labels"):
        if key not in staging:
            continue
        with open(staging[key], "rb") as f:
            os.fsync(f.fileno())
        os.replace(staging[key], targets[key])
    directory = os.open(os.path.dirname(os.path.abspath(targets["model"])), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# ---------------------------------------------------------------------------------------------
# Calibration and held-out images


def _calibration_split(calibration_data, height, width, count):
    """``(calibration images, held-out images or None)``, float32 pixels in [0, 255]."""
    if isinstance(calibration_data, str):
        return _source_images(calibration_data, height, width, count)
    images = np.asarray(calibration_data)
    if images.ndim != 4 or images.shape[1:] != (height, width, 3) or len(images) == 0:
        raise ValueError(
            f"`calibration_data` must be [N, {height}, {width}, 3] pixels; received an array of "
            f"shape {images.shape}."
        )
    if not np.issubdtype(images.dtype, np.number) or not np.all(np.isfinite(images)):
        raise ValueError("`calibration_data` must hold finite numbers (pixels in [0, 255]).")
    if images.min() < 0 or images.max() > 255:
        raise ValueError(
            f"`calibration_data` must be pixels in [0, 255]; received values from "
            f"{images.min()} to {images.max()}."
        )
    images = images.astype(np.float32)
    # The same images calibrate and measure the agreement: pass held-out images when that matters.
    return images[:count], images


def _source_images(name, height, width, count):
    """Images of a training data source: ``count`` of its training split (a fixed shuffle) to
    calibrate and up to ``HELD_OUT_IMAGES`` of its held-out split, with the evaluation crop."""
    if not (name == "digits" or name.startswith(("folder:", "tfds:"))) or name in (
        "folder:",
        "tfds:",
    ):
        raise ValueError(
            f"Unknown calibration source {name!r}; use {CALIBRATION_SOURCES}, or pass an array."
        )
    try:
        from training import data
    except ImportError as error:
        raise ValueError(
            f"The calibration source {name!r} is read with the repository's `training` package, "
            "which is not importable here; pass an array of calibration images instead."
        ) from error
    source = data.load_source(name[len("tfds:") :] if name.startswith("tfds:") else name, height)
    # The digits are stored at the model's height; other sources get the evaluation crop.
    crop_pct = 1.0 if name == "digits" else DEFAULT_CROP_PCT

    def images_of(split, take, shuffle):
        records = split.records
        if shuffle:
            records = records.shuffle(min(split.num_examples, 10_000), seed=0)
        records = records.take(take).map(
            lambda r: eval_transform(split.decode(r)["image"], (height, width), crop_pct)
        )
        return np.stack(list(records.as_numpy_iterator()))

    calibration = images_of(source.train, count, shuffle=True)
    held_out = images_of(source.validation, HELD_OUT_IMAGES, shuffle=False)
    return calibration, held_out


# ---------------------------------------------------------------------------------------------
# Writers


def _frozen(function):
    """The traced function with every variable and captured tensor folded in as a constant
    (the normalization constants become constants, not graph inputs)."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    return convert_variables_to_constants_v2(function.get_concrete_function())


def _write_litert(function, path, precision, calibration):
    converter = tf.lite.TFLiteConverter.from_concrete_functions([_frozen(function)])
    # Flex (select TF) ops are allowed here only so that the converter finishes and the check
    # below can name every op that the builtin op set lacks.
    builtins = tf.lite.OpsSet.TFLITE_BUILTINS_INT8 if precision == "int8" else (
        tf.lite.OpsSet.TFLITE_BUILTINS
    )
    converter.target_spec.supported_ops = [builtins, tf.lite.OpsSet.SELECT_TF_OPS]
    if precision in ("dynamic_int8", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision == "int8":
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    try:
        flatbuffer = converter.convert()
    except Exception as error:  # the converter's ConverterError, and whatever MLIR raises
        # Ops that neither the builtin set nor Flex has: the converter lists them by TF name.
        listed = re.findall(r"^(?:Custom|Flex) ops: (.+)$", str(error), flags=re.M)
        if not listed:
            raise
        ops = sorted({op.strip() for line in listed for op in line.split(",")})
        raise ValueError(
            f"The LiteRT conversion needs ops outside LiteRT's builtin op set: {', '.join(ops)}. "
            "Nothing was written."
        ) from error
    non_builtin = sorted(set(litert_operators(flatbuffer)) - set(_litert_builtin_names()))
    if non_builtin:
        raise ValueError(
            f"The LiteRT conversion needs ops outside LiteRT's builtin op set: "
            f"{', '.join(non_builtin)} (Flex ops need the TensorFlow Select runtime). "
            "Nothing was written."
        )
    with open(path, "wb") as f:
        f.write(flatbuffer)


def _litert_builtin_names():
    from tensorflow.lite.python import schema_py_generated as schema

    return [
        name
        for name, code in vars(schema.BuiltinOperator).items()
        if not name.startswith("_") and name != "CUSTOM" and isinstance(code, int)
    ]


def litert_operators(flatbuffer):
    """The operator codes of a LiteRT flatbuffer: builtin op names, custom ops (Flex included)
    by their custom name."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    names = {code: name for name, code in vars(schema.BuiltinOperator).items()
             if not name.startswith("_")}
    operators = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        # Codes above 127 live in BuiltinCode; DeprecatedBuiltinCode holds the rest.
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            operators.append((code.CustomCode() or b"?").decode())
        else:
            operators.append(names.get(builtin, f"BUILTIN_{builtin}"))
    return operators


def _erfc_as_erf(ctx, node, name, args):
    """tf2onnx handler: ``Erfc(x)`` as ``1 - Erf(x)``.

    TensorFlow's exact GELU is ``0.5 x erfc(-x / sqrt 2)``, and ONNX has no Erfc. Rewriting the
    op in the ONNX graph leaves the Keras model (its numerics and its oneDNN-fused GELU on
    TensorFlow) untouched. Where erfc is tiny (x < -4) ``1 - erf`` loses its relative precision,
    but the GELU is then ``x`` times that tiny value: an absolute error below 1e-6.
    """
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    node.type = "Erf"
    one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype=dtype))
    ctx.insert_new_node_on_output(
        "Sub", node.output[0], name=utils.make_name(f"{node.name}_erfc"),
        inputs=[one.output[0], node.output[0]],
    )


def _write_onnx(function, path):
    import tf2onnx

    frozen = _frozen(function)
    input_name, output_name = frozen.inputs[0].name, frozen.outputs[0].name
    model, _ = tf2onnx.convert.from_graph_def(
        frozen.graph.as_graph_def(),
        input_names=[input_name],
        output_names=[output_name],
        opset=ONNX_OPSET,
        custom_op_handlers={"Erfc": (_erfc_as_erf, [])},
        tensors_to_rename={input_name: INPUT_NAME, output_name: OUTPUT_NAME},
    )
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def _write_openvino(function, path):
    import openvino as ov

    model = ov.convert_model(function)
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    # Float32 weights in the .bin (save_model's default would halve them to float16).
    ov.save_model(model, path, compress_to_fp16=False)


# ---------------------------------------------------------------------------------------------
# Verification, each format in its own runtime


def runtime_session(format, path, precision="float32"):
    """A function ``images [batch, H, W, 3] float32 -> probabilities`` running the export at
    ``path`` in its runtime (any batch size)."""
    if format == "litert":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path)
        input_index = interpreter.get_input_details()[0]["index"]
        output_index = interpreter.get_output_details()[0]["index"]

        def run_litert(images):
            if tuple(interpreter.get_input_details()[0]["shape"]) != images.shape:
                interpreter.resize_tensor_input(input_index, images.shape)
                interpreter.allocate_tensors()
            interpreter.set_tensor(input_index, images)
            interpreter.invoke()
            return interpreter.get_tensor(output_index).copy()

        interpreter.allocate_tensors()
        return run_litert
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda images: session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    if format == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(
            path, "CPU", {"INFERENCE_PRECISION_HINT": OPENVINO_HINTS[precision]}
        )
        request = compiled.create_infer_request()
        return lambda images: request.infer({INPUT_NAME: images})[OUTPUT_NAME].copy()
    raise ValueError(f"No runtime for format {format!r}.")


def _verify(format, precision, path, function, height, width, classes, held_out, min_agreement):
    run = runtime_session(format, path, precision)
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 255.0, size=(3, height, width, 3)).astype(np.float32)
    expected = function(tf.constant(images)).numpy()
    # Two batch sizes: the batch dimension must stay dynamic.
    probabilities = np.concatenate([run(images[:2]), run(images[2:])])
    if probabilities.shape != (3, classes) or not np.all(np.isfinite(probabilities)):
        raise ValueError(
            f"The {format} export returned {probabilities.shape} probabilities (finite: "
            f"{bool(np.all(np.isfinite(probabilities)))}); expected finite (3, {classes})."
        )
    error = float(np.max(np.abs(probabilities - expected)))
    if precision == "float32":
        if error > saved_model_export._VERIFY_ATOL:
            raise ValueError(
                f"The {format} export differs from the Keras model by {error:.3g} "
                f"(> {saved_model_export._VERIFY_ATOL}) in {format}'s runtime; not written."
            )
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


# ---------------------------------------------------------------------------------------------
# Command line: `python -m keras_coat export --format litert|onnx|openvino`


def export_file_command(
    model_name,
    weights,
    output,
    format,
    precision="float32",
    image_size=None,
    class_names_file=None,
    calibration_data=None,
    calibration_images=200,
    overwrite=False,
    print_fn=print,
):
    """Builds a CoaT variant, exports it as a LiteRT, ONNX or OpenVINO file, prints the
    verification and how to run it. Returns the ``ExportResult``."""
    model, class_names = saved_model_export.build_command_model(
        model_name, weights, image_size, class_names_file
    )
    result = export_model(
        model,
        output,
        format,
        precision=precision,
        calibration_data=calibration_data,
        calibration_images=calibration_images,
        class_names=class_names,
        overwrite=overwrite,
    )
    print_fn(f"Exported {model_name} ({format}, {precision}) to {', '.join(result.files)}")
    if result.max_abs_diff is not None:
        print_fn(f"Largest probability difference from Keras: {result.max_abs_diff:.3g}")
    if result.top1_agreement is not None:
        print_fn(
            f"Top-1 agreement with the float Keras model: {result.top1_agreement:.2%} of "
            f"{result.held_out} held-out images"
        )
    print_fn(_run_instructions(format, result.path, precision))
    return result


def _run_instructions(format, path, precision):
    hint = OPENVINO_HINTS[precision] if format == "openvino" else None
    runtime = {
        "litert": "from ai_edge_litert.interpreter import Interpreter\n"
        f"  interpreter = Interpreter(model_path={path!r})\n"
        "  # resize_tensor_input(0, [batch, H, W, 3]) for batches other than 1",
        "onnx": "import onnxruntime\n"
        f"  session = onnxruntime.InferenceSession({path!r})\n"
        "  probabilities = session.run(['probabilities'], {'images': images})[0]",
        "openvino": "import openvino\n"
        f"  compiled = openvino.Core().compile_model({path!r}, 'CPU',\n"
        f"      {{'INFERENCE_PRECISION_HINT': '{hint}'}})\n"
        "  probabilities = compiled(images)[0]",
    }[format]
    return (
        "\nInput: float32 RGB pixels in [0, 255], [batch, height, width, 3]; output: "
        "probabilities [batch, classes]; class names one per line in the .labels.txt file.\n\n"
        f"  {runtime}\n"
    )


__all__ = ["ExportResult", "FORMATS", "PRECISIONS", "export_model", "litert_operators"]
