"""Writes the compatibility fixtures: files as keras-coat 0.1.0 (before the backend-neutral
layer names and the classifier around its backbone) saved them, with the outputs it computed.

Run once with the 0.1.0 code (commit 4aeaf81) on the TensorFlow backend:

    python tests/data/compat_0_1/make_fixtures.py

It is kept to say how the fixtures were made; the code it calls no longer exists in this form.
The tests in tests/test_compatibility.py load the files with today's code and compare outputs.

Weights are rounded to multiples of 1/1024 so that the files compress in git.
"""

import json
import os

import numpy as np

import keras
import keras_coat
from keras_coat import weights as weights_lib

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = {"embed_dims": (16, 32, 32, 32), "serial_depths": (1, 1, 1, 1), "mlp_ratios": (2, 2, 2, 2)}


def quantize(model, seed):
    rng = np.random.default_rng(seed)
    values = []
    for w in model.weights:
        scale = 0.05 if len(w.shape) > 1 else 0.2
        noise = rng.normal(0.0, scale, size=w.shape)
        if w.name == "gamma":
            noise = noise + 1.0
        values.append(np.round(noise * 1024) / 1024)
    model.set_weights(values)


def main():
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(1).uniform(0, 255, size=(2, 64, 64, 3)).astype("float32")
    outputs = {"images": images}

    for kind, parallel in (("lite", 0), ("parallel", 2)):
        classifier = keras_coat.CoaT(
            **SMALL, parallel_depth=parallel, input_shape=(64, 64, 3), classes=10,
            name=f"{kind}_classifier",
        )
        quantize(classifier, seed=parallel + 2)
        classifier.save(os.path.join(HERE, f"{kind}_classifier.keras"))
        classifier.save_weights(os.path.join(HERE, f"{kind}_classifier.weights.h5"))
        outputs[f"{kind}_classifier"] = classifier.predict(images, verbose=0)
        backbone = keras_coat.CoaT(
            **SMALL, parallel_depth=parallel, input_shape=(64, 64, 3), include_top=False,
            weights=os.path.join(HERE, f"{kind}_classifier.weights.h5"), name=f"{kind}_backbone",
        )
        backbone.save(os.path.join(HERE, f"{kind}_backbone.keras"))
        backbone.save_weights(os.path.join(HERE, f"{kind}_backbone.weights.h5"))
        outputs[f"{kind}_backbone"] = backbone.predict(images, verbose=0)

    # A weights-cache entry for coat_lite_tiny as 0.1.0 writes it (converted 1000-class
    # classifier + record), for a checkpoint whose SHA-256 starts with the published prefix.
    entry = weights_lib.CHECKPOINTS["coat_lite_tiny"]
    cache = os.path.join(HERE, "cache")
    os.makedirs(cache, exist_ok=True)
    reference = keras_coat.CoaTLiteTiny()
    quantize(reference, seed=7)
    name = f"coat_lite_tiny-{entry.sha256}-v1.weights.h5"
    path = os.path.join(cache, name)
    reference.save_weights(path)
    record = {
        "checkpoint": "coat_lite_tiny",
        "url": entry.url,
        "checkpoint_sha256": entry.sha256 + "0" * (64 - len(entry.sha256)),
        "weights_sha256": weights_lib._sha256(path),
        "cache_format": 1,
    }
    with open(path.removesuffix(".weights.h5") + ".json", "w") as f:
        json.dump(record, f, indent=1)
    small = keras_coat.CoaTLiteTiny(input_shape=(64, 64, 3), weights=None)
    small.load_weights(path)  # the path weights="imagenet" takes from a valid cache entry
    outputs["cache_coat_lite_tiny_64"] = small.predict(images, verbose=0)
    headless = keras_coat.CoaTLiteTiny(input_shape=(64, 64, 3), include_top=False, pooling="avg")
    keras_coat.loading.load_keras_weights(headless, path)
    outputs["cache_coat_lite_tiny_64_avg"] = headless.predict(images, verbose=0)
    np.savez(os.path.join(HERE, "outputs.npz"), **outputs)
    print({k: v.shape for k, v in outputs.items()})


if __name__ == "__main__":
    main()
