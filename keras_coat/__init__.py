"""keras-coat: CoaT (Co-scale conv-attentional image Transformers) for Keras 3."""

from keras_coat.models import (
    MODEL_CONFIGS,
    CoaT,
    CoaTLiteMedium,
    CoaTLiteMini,
    CoaTLiteSmall,
    CoaTLiteTiny,
    CoaTMini,
    CoaTSmall,
    CoaTTiny,
    create_model,
)

__version__ = "0.1.0"
