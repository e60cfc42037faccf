"""ONNX graphs ``*.onnx`` (opset 17, float32) converted with tf2onnx, and ONNX Runtime."""

import numpy as np

from keras_coat.export.serving import INPUT_NAME, OUTPUT_NAME, frozen

OPSET = 17


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


def write(function, path, precision, calibration):
    """Converts the traced pixels -> probabilities `function` and writes it to `path`."""
    import tf2onnx

    graph = frozen(function)
    input_name, output_name = graph.inputs[0].name, graph.outputs[0].name
    model, _ = tf2onnx.convert.from_graph_def(
        graph.graph.as_graph_def(),
        input_names=[input_name],
        output_names=[output_name],
        opset=OPSET,
        custom_op_handlers={"Erfc": (_erfc_as_erf, [])},
        tensors_to_rename={input_name: INPUT_NAME, output_name: OUTPUT_NAME},
    )
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def session(path, precision="float32"):
    """``images [batch, H, W, 3] float32 -> probabilities``, in ONNX Runtime (CPU)."""
    import onnxruntime

    runtime = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda images: runtime.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def run_instructions(path, precision):
    """How to run the file at `path` (Python)."""
    return (
        "import onnxruntime\n"
        f"  session = onnxruntime.InferenceSession({path!r})\n"
        "  probabilities = session.run(['probabilities'], {'images': images})[0]"
    )
