"""LiteRT (TFLite) flatbuffers ``*.tflite``, builtin ops only, and their interpreter.

Precisions: ``"float32"``; ``"dynamic_int8"`` (int8 weights, float activations); ``"int8"``
(full-integer kernels, activation ranges calibrated on images; float32 input and output).
"""

import re

import tensorflow as tf

from keras_coat.export.serving import frozen



def write(function, path, precision, calibration):
    """Converts the traced pixels -> probabilities `function` and writes it to `path`.

    `calibration`: float32 pixel images ``[N, H, W, 3]`` for ``precision="int8"``.
    """
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen(function)])
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
    non_builtin = sorted(set(litert_operators(flatbuffer)) - set(_builtin_names()))
    if non_builtin:
        raise ValueError(
            f"The LiteRT conversion needs ops outside LiteRT's builtin op set: "
            f"{', '.join(non_builtin)} (Flex ops need the TensorFlow Select runtime). "
            "Nothing was written."
        )
    with open(path, "wb") as f:
        f.write(flatbuffer)


def _builtin_names():
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


def session(path, precision="float32"):
    """``images [batch, H, W, 3] float32 -> probabilities``, in the LiteRT interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]

    def run(images):
        if tuple(interpreter.get_input_details()[0]["shape"]) != images.shape:
            interpreter.resize_tensor_input(input_index, images.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(input_index, images)
        interpreter.invoke()
        return interpreter.get_tensor(output_index).copy()

    interpreter.allocate_tensors()
    return run


def run_instructions(path, precision):
    """How to run the file at `path` (Python)."""
    return (
        "from ai_edge_litert.interpreter import Interpreter\n"
        f"  interpreter = Interpreter(model_path={path!r})\n"
        "  # resize_tensor_input(0, [batch, H, W, 3]) for batches other than 1"
    )
