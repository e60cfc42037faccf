"""keras-coat: CoaT (Co-scale conv-attentional image Transformers) for Keras 3."""

import os as _os
import platform as _platform

# TensorFlow runs its oneDNN kernels by default only on x86 CPUs with AVX-512 VNNI or newer
# extensions (Intel Cascade Lake on); elsewhere (AVX2-only CPUs: AMD Zen 2 and 3, many cloud VMs
# and laptops) it falls back to Eigen's, which leave the MLPs' GELU unfused and run CoaT-Lite
# Small at 0.72x the speed of oneDNN's at batch 8 (docs/performance.md). Set before this package
# imports Keras, hence TensorFlow; a value the user set wins, and it has no effect once
# TensorFlow is imported. Only x86: on Arm, oneDNN's kernels are another library's (ACL).
if _platform.machine().lower() in ("x86_64", "amd64"):
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

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

