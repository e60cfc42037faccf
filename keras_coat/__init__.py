"""keras-coat: CoaT (Co-scale conv-attentional image Transformers) for Keras 3."""

from keras_coat.applications import (
    CoaT,
    CoaTLiteMedium,
    CoaTLiteMini,
    CoaTLiteSmall,
    CoaTLiteTiny,
    CoaTMini,
    CoaTSmall,
    CoaTTiny,
    create_model,
    load_model,
)
from keras_coat.backbone import CoaTBackbone
from keras_coat.hub import upload_preset
from keras_coat.image_classifier import CoaTImageClassifier
from keras_coat.imagenet import decode_predictions, preprocess_input
from keras_coat.legacy import MODEL_CONFIGS
from keras_coat.presets import ImagePreprocessing, PresetError
from keras_coat.version import __version__
__all__ = [
    "CoaT",
    "CoaTBackbone",
    "CoaTImageClassifier",
    "CoaTLiteMedium",
    "CoaTLiteMini",
    "CoaTLiteSmall",
    "CoaTLiteTiny",
    "CoaTMini",
    "CoaTSmall",
    "CoaTTiny",
    "ImagePreprocessing",
    "MODEL_CONFIGS",
    "PresetError",
    "create_model",
    "decode_predictions",
    "export_model",
    "export_saved_model",
    "load_model",
    "preprocess_input",
    "upload_preset",
]


def export_saved_model(model, directory, version=1, **kwargs):
    """Exports `model` as a TF Serving SavedModel in `directory/<version>/`.

    See `keras_coat.export.export_saved_model`; TensorFlow is imported only when this is called,
    so the package itself runs on any Keras backend.
    """
    from keras_coat.export.saved_model import export_saved_model as export

    return export(model, directory, version=version, **kwargs)


def export_model(model, path, format="saved_model", **kwargs):
    """Exports `model` as a SavedModel, LiteRT, ONNX or OpenVINO file, verified in its runtime.

    See `keras_coat.export.export_model`; TensorFlow and the format's converter are
    imported only when this is called.
    """
    from keras_coat.export.exporter import export_model as export

    return export(model, path, format, **kwargs)
