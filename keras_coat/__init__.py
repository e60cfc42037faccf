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
from keras_coat.export.any_backend import export_model, export_saved_model
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

