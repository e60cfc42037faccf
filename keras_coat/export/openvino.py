"""OpenVINO IR ``*.xml`` plus its float32 weights ``*.bin``, and OpenVINO's CPU runtime.

Compile it with ``{"INFERENCE_PRECISION_HINT": "f32"}``: OpenVINO's CPU plugin otherwise
computes in bf16 on CPUs that have bf16 instructions (``precision="bfloat16"`` verifies the
export that way).
"""

from keras_coat.export.serving import INPUT_NAME, OUTPUT_NAME

# OpenVINO's CPU plugin picks bf16 by itself where the CPU has bf16 instructions.
HINTS = {"float32": "f32", "bfloat16": "bf16"}


def write(function, path, precision, calibration):
    """Converts the traced pixels -> probabilities `function` to `path` and its ``.bin``."""
    import openvino as ov

    model = ov.convert_model(function)
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    # Float32 weights in the .bin (save_model's default would halve them to float16).
    ov.save_model(model, path, compress_to_fp16=False)


def session(path, precision="float32"):
    """``images [batch, H, W, 3] float32 -> probabilities``, in OpenVINO on the CPU."""
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": HINTS[precision]})
    request = compiled.create_infer_request()
    return lambda images: request.infer({INPUT_NAME: images})[OUTPUT_NAME].copy()


def run_instructions(path, precision):
    """How to run the file at `path` (Python)."""
    return (
        "import openvino\n"
        f"  compiled = openvino.Core().compile_model({path!r}, 'CPU',\n"
        f"      {{'INFERENCE_PRECISION_HINT': '{HINTS[precision]}'}})\n"
        "  probabilities = compiled(images)[0]"
    )
