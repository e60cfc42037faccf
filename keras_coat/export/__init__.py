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

The formats are written with TensorFlow (and tf2onnx, OpenVINO's converter): this package needs
the TensorFlow backend of Keras. On JAX or PyTorch, save the model as ``.keras`` and export it
from a process started with ``KERAS_BACKEND=tensorflow``.
"""

from keras_coat.export.calibration import load_calibration_images
from keras_coat.export.exporter import FORMATS, PRECISIONS, ExportResult, export_model
from keras_coat.export.litert import litert_operators
from keras_coat.export.saved_model import SIGNATURE_BYTES, SIGNATURE_IMAGES, export_saved_model

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
