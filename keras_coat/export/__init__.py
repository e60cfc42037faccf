"""Export a classifier for serving: a TF Serving SavedModel, LiteRT, ONNX or OpenVINO file.

Every export keeps one serving contract (`keras_coat.export.serving`): clients send float32 RGB
pixels in [0, 255] and get probabilities (and class names), whatever the Keras model expects
and returns; the SavedModel also decodes JPEG, PNG and BMP bytes with the evaluation resize and
crop. Each export is verified in its own runtime before it is published, and appears
atomically.

- `export_model(model, path, format)`: any format (`keras_coat.export.exporter`);
- `export_saved_model(model, directory, version)`: the SavedModel and its two signatures
  (`keras_coat.export.saved_model`);
- `load_calibration_images(source, image_size)`: images to calibrate a full-integer export
  (`keras_coat.export.calibration`).

Both export functions run on every Keras backend. The formats are written with TensorFlow (and
tf2onnx, OpenVINO's converter): on JAX or PyTorch the same code runs in a TensorFlow-backend
child process and writes the same verified files (`keras_coat.export.any_backend`). Importing
this package loads no TensorFlow; the names that need it are imported on first use.
"""

from keras_coat.export.any_backend import export_model, export_saved_model
from keras_coat.export.formats import FORMATS, PRECISIONS, ExportResult

__all__ = [
    "FORMATS",
    "PRECISIONS",
    "SIGNATURE_BYTES",
    "SIGNATURE_IMAGES",
    "ExportResult",
    "export_model",
    "export_saved_model",
    "litert_operators",
    "load_calibration_images",
]


def __getattr__(name):
    """The public names that need TensorFlow, imported when first asked for."""
    if name in ("SIGNATURE_BYTES", "SIGNATURE_IMAGES"):
        from keras_coat.export import saved_model

        return getattr(saved_model, name)
    if name == "litert_operators":
        from keras_coat.export.litert import litert_operators

        return litert_operators
    if name == "load_calibration_images":
        from keras_coat.export.calibration import load_calibration_images

        return load_calibration_images
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
