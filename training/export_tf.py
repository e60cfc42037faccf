"""Exports a trained `.keras` classifier as a SavedModel on the TensorFlow backend.

    echo '{"model": "last.keras", "export_dir": "export", "class_names": [...]}' |
        KERAS_BACKEND=tensorflow python -m training.export_tf

The JAX engine runs this in a subprocess after training (`engine_jax.
export_saved_model_in_tensorflow`): a SavedModel is a TensorFlow graph, so the model trained on
JAX is loaded from its `.keras` file on the TensorFlow backend and exported there, as the
TensorFlow engine exports its own model (version 1, verified by `keras_coat.export`; the
evaluation transform of serving_bytes is the one the model carries).
"""

import json
import sys


def export(model_path, export_dir, class_names):
    import keras

    import keras_coat  # noqa: F401  registers the CoaT layers for loading
    from keras_coat.export import export_saved_model

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"A SavedModel is exported on the TensorFlow backend; this process runs "
            f"{keras.backend.backend()!r} (set KERAS_BACKEND=tensorflow)."
        )
    model = keras.saving.load_model(model_path, compile=False)
    return export_saved_model(
        model, export_dir, version=1, class_names=class_names, overwrite=True
    )


def main():
    request = json.load(sys.stdin)
    export(request["model"], request["export_dir"], request["class_names"])


if __name__ == "__main__":
    main()
