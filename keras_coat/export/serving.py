"""The serving contract every export keeps, whatever its format.

Clients send float32 RGB pixels in [0, 255], ``images [batch, height, width, 3]``, and get float32
``probabilities [batch, classes]`` (and, where the format carries strings, class names). The
graph adds what the Keras model lacks: the normalization for a model that expects normalized
inputs, the softmax for a model that returns logits.

This module holds what the formats share:

- `serving_contract`: checks the model and the arguments and reads the model's evaluation
  preprocessing and class names (``model.preprocessing``, ``model.class_names``, duck-typed;
  explicit arguments win) into a `ServingContract`;
- `ServingContract.probabilities_fn`: the pixels -> probabilities graph, and
  `pixels_to_probabilities`, `frozen`: that graph traced and frozen for the file formats;
- `checked_pixels`: the shape and value checks of a served pixel batch;
- `eval_resize_and_crop`: decoding of JPEG, PNG or BMP bytes (size checked from the header
  before decoding) and the evaluation resize and crop (`keras_coat.tf_images`), for the
  SavedModel's ``serving_bytes``;
- `check_runtime_probabilities`: the comparison of an export, run in its runtime, with the
  Keras model.
"""

import dataclasses
import numbers

import keras
import numpy as np
import tensorflow as tf

from keras_coat import tf_images
from keras_coat.imagenet import (
    CROP_MODES,
    DEFAULT_CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_CLASSES,
    class_names as imagenet_class_names,
)

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
NORMALIZATION_LAYER_NAME = "imagenet_normalization"
MODEL_INPUTS = ("auto", "pixels", "normalized")
MODEL_OUTPUTS = ("auto", "probabilities", "logits")
# How far a float32 export, run in its runtime, may drift from the eager Keras model.
VERIFY_ATOL = 1e-4
# The one resize the serving graphs implement (the authors' evaluation transform).
SERVED_INTERPOLATION = "bicubic"


@dataclasses.dataclass(frozen=True)
class ServingContract:
    """What an export of one model serves.

    ``height``, ``width``: the pixel input size; ``classes``: the number of classes;
    ``class_names``: one string per class; ``crop_pct``, ``crop_mode``: the evaluation crop of
    ``serving_bytes``; ``mean``, ``std``: the normalization (fractions of 255, as
    ``keras_coat.imagenet.IMAGENET_MEAN``) the graph applies when ``normalize``; ``softmax``:
    whether the graph applies a softmax to the model's output.
    """

    height: int
    width: int
    classes: int
    class_names: tuple
    crop_pct: float
    crop_mode: str
    mean: tuple
    std: tuple
    normalize: bool
    softmax: bool

    def probabilities_fn(self, model):
        """``images [batch, H, W, 3] in [0, 255]`` -> float32 ``probabilities [batch, classes]``."""
        mean = tf.constant([255.0 * m for m in self.mean], tf.float32)
        std = tf.constant([255.0 * s for s in self.std], tf.float32)
        normalize, softmax = self.normalize, self.softmax

        def probabilities_of(images):
            x = (images - mean) / std if normalize else images
            predictions = tf.cast(model(x, training=False), tf.float32)
            return tf.nn.softmax(predictions, axis=-1) if softmax else predictions

        return probabilities_of


def serving_contract(
    model,
    *,
    class_names=None,
    image_size=None,
    crop_pct=None,
    crop_mode=None,
    model_input="auto",
    model_output="auto",
):
    """Checks `model` and the arguments; returns the `ServingContract` of its exports.

    ``class_names`` default: ``model.class_names`` if the model carries them, else the ImageNet
    names for 1000 classes, ``"class_<i>"`` otherwise. ``crop_pct`` and ``crop_mode`` default:
    those of ``model.preprocessing`` if the model carries one, else ``DEFAULT_CROP_PCT`` and
    "center";
    ``image_size`` default for a model without a fixed input size: its
    ``model.preprocessing.image_size``. The other arguments are those of
    `keras_coat.export.export_saved_model`.
    """
    preprocessing = getattr(model, "preprocessing", None)
    if image_size is None and _has_free_input_size(model):
        image_size = _preprocessing_value(preprocessing, ("image_size",))
        image_size = tuple(image_size) if isinstance(image_size, list) else image_size
    height, width, classes = check_model_shapes(model, image_size)
    if crop_pct is None:
        crop_pct = _preprocessing_value(preprocessing, ("crop_pct", "crop_fraction"))
        crop_pct = DEFAULT_CROP_PCT if crop_pct is None else crop_pct
    if (
        isinstance(crop_pct, bool)
        or not isinstance(crop_pct, numbers.Real)
        or not 0.0 < crop_pct <= 1.0
    ):
        raise ValueError(f"`crop_pct` must be in (0, 1]; received {crop_pct!r}.")
    if crop_mode is None:
        crop_mode = _preprocessing_value(preprocessing, ("crop_mode",)) or "center"
    if crop_mode not in CROP_MODES:
        raise ValueError(f"`crop_mode` must be one of {CROP_MODES}; received {crop_mode!r}.")
    interpolation = _preprocessing_value(preprocessing, ("interpolation",))
    if interpolation is not None and str(interpolation).lower() != SERVED_INTERPOLATION:
        raise ValueError(
            f"The model's preprocessing resizes with {interpolation!r} interpolation; the "
            f"exported serving graphs resize with {SERVED_INTERPOLATION!r} only."
        )
    mean = _preprocessing_value(preprocessing, ("mean",))
    std = _preprocessing_value(preprocessing, ("std",))
    mean = _three_floats("preprocessing.mean", IMAGENET_MEAN if mean is None else mean)
    std = _three_floats("preprocessing.std", IMAGENET_STD if std is None else std)
    if min(std) <= 0:
        raise ValueError(f"`preprocessing.std` must be positive; received {std}.")
    if class_names is None:
        class_names = getattr(model, "class_names", None)
    return ServingContract(
        height=height,
        width=width,
        classes=classes,
        class_names=tuple(resolve_class_names(class_names, classes)),
        crop_pct=float(crop_pct),
        crop_mode=crop_mode,
        mean=mean,
        std=std,
        normalize=needs_normalization(model, model_input),
        softmax=needs_softmax(model, model_output),
    )


def _has_free_input_size(model):
    shape = getattr(model, "inputs", None) and tuple(model.inputs[0].shape)
    return bool(shape) and len(shape) == 4 and None in shape[1:3]


def _preprocessing_value(preprocessing, names):
    """The first of the attributes `names` that `preprocessing` (object or dict) has, or None."""
    if preprocessing is None:
        return None
    for name in names:
        value = (
            preprocessing.get(name)
            if isinstance(preprocessing, dict)
            else getattr(preprocessing, name, None)
        )
        if value is not None:
            return value
    return None


def _three_floats(what, values):
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        floats = ()
    if len(floats) != 3 or not all(np.isfinite(floats)):
        raise ValueError(f"`{what}` must be three finite numbers (R, G, B); received {values!r}.")
    return floats


def check_model_shapes(model, image_size):
    """Returns ``(height, width, classes)`` after checking the model's input/output contract."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model; received {type(model).__name__}.")
    if not model.built or not model.inputs:
        raise ValueError(
            "`model` must be a built model with a known input (a functional model, or a model "
            "that has been called on data)."
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            "`model` must have one input and one output; received "
            f"{len(model.inputs)} input(s) and {len(model.outputs)} output(s)."
        )
    input_shape = tuple(model.inputs[0].shape)
    if len(input_shape) != 4 or input_shape[-1] != 3:
        raise ValueError(
            f"The model's input must be [batch, height, width, 3] RGB images; its input shape "
            f"is {input_shape}."
        )
    output_shape = tuple(model.outputs[0].shape)
    if len(output_shape) != 2 or output_shape[-1] is None:
        raise ValueError(
            "The model's output must be [batch, classes] class probabilities or logits (build "
            f"it with include_top=True); its output shape is {output_shape}."
        )
    classes = int(output_shape[-1])

    model_size = input_shape[1:3]
    if image_size is None:
        if None in model_size:
            raise ValueError(
                f"The model's input size is not fixed ({input_shape}); pass `image_size`."
            )
        return int(model_size[0]), int(model_size[1]), classes
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in image_size)
    ):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(
            f"`image_size` must be an int or (height, width); received {image_size!r}."
        )
    if min(size) < 1:
        raise ValueError(f"`image_size` must be positive; received {image_size!r}.")
    for expected, received in zip(model_size, size):
        if expected is not None and expected != received:
            raise ValueError(
                f"`image_size`={image_size!r} contradicts the model's input shape {input_shape}; "
                "rebuild the model with the input size you want to serve."
            )
    return size[0], size[1], classes


def resolve_class_names(class_names, classes):
    """``class_names`` checked against ``classes``; ImageNet's or ``class_<i>`` when None."""
    if class_names is None:
        if classes == NUM_CLASSES:
            return list(imagenet_class_names())
        return [f"class_{i}" for i in range(classes)]
    if isinstance(class_names, (str, bytes)):
        raise ValueError("`class_names` must be a sequence of strings, not a single string.")
    names = list(class_names)
    if len(names) != classes:
        raise ValueError(
            f"`class_names` has {len(names)} names but the model has {classes} classes."
        )
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ValueError(
            f"`class_names` must all be str; received e.g. {bad[0]!r} ({type(bad[0]).__name__})."
        )
    return names


def _layers(model):
    """Every layer of ``model``, nested models included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def needs_normalization(model, model_input):
    """Whether the serving graph must normalize pixels before calling `model`."""
    if model_input not in MODEL_INPUTS:
        raise ValueError(f"`model_input` must be one of {MODEL_INPUTS}; received {model_input!r}.")
    if model_input == "auto":
        has_layer = any(layer.name == NORMALIZATION_LAYER_NAME for layer in _layers(model))
        return not has_layer
    return model_input == "normalized"


def _output_layer(model):
    """``(owner, layer)``: the layer computing the model's output (looking inside nested models)
    and the model it belongs to; ``(None, None)`` for a model that is no layer graph.

    Public API only: a functional model lists its layers in topological order, and each of them
    feeds its one output, so the last one computes it.
    """
    owner, layer = None, model
    while isinstance(layer, keras.Model):
        if len(getattr(layer, "outputs", None) or ()) != 1 or not layer.layers:
            return None, None
        owner, layer = layer, layer.layers[-1]
    return owner, layer


def _layer_feeding(owner, layer):
    """The layer of `owner` whose output `layer` takes as input (first calls); None if none."""
    for candidate in owner.layers:
        try:
            outputs = keras.tree.flatten(candidate.output)
        except AttributeError:  # a layer never called
            continue
        if any(output is layer.input for output in outputs):
            return candidate
    return None


def _activation_name(layer):
    return getattr(getattr(layer, "activation", None), "__name__", None)


def needs_softmax(model, model_output):
    """Whether the serving graph must apply a softmax to `model`'s output."""
    if model_output not in MODEL_OUTPUTS:
        raise ValueError(
            f"`model_output` must be one of {MODEL_OUTPUTS}; received {model_output!r}."
        )
    if model_output != "auto":
        return model_output == "logits"
    owner, layer = _output_layer(model)
    # A linear Activation layer (e.g. a float32 cast) says nothing; look at what feeds it.
    while isinstance(layer, keras.layers.Activation) and _activation_name(layer) == "linear":
        layer = _layer_feeding(owner, layer)
    if layer is None:
        raise ValueError(
            "Cannot tell whether the model outputs probabilities or logits: its output layer "
            "could not be found in its layer graph. The signatures return softmax "
            "probabilities; pass model_output='probabilities' or 'logits'."
        )
    if isinstance(layer, keras.layers.Softmax) or _activation_name(layer) == "softmax":
        return False
    if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) and (
        _activation_name(layer) == "linear"
    ):
        return True
    raise ValueError(
        f"Cannot tell whether the model outputs probabilities or logits: its last layer "
        f"{layer.name!r} ({type(layer).__name__}, activation {_activation_name(layer)!r}) is "
        "neither a softmax nor a linear Dense layer. The signatures return softmax "
        "probabilities; pass model_output='probabilities' or 'logits' if one applies."
    )


def pixels_to_probabilities(probabilities_of, height, width):
    """``probabilities_of`` traced for float32 ``images [None, height, width, 3]``, its output
    named ``probabilities``: the graph the file formats convert."""
    signature = tf.TensorSpec((None, height, width, 3), tf.float32, name=INPUT_NAME)
    return tf.function(
        lambda images: tf.identity(probabilities_of(images), name=OUTPUT_NAME),
        input_signature=[signature],
        autograph=False,
    )


def frozen(function):
    """The traced function with every variable and captured tensor folded in as a constant
    (the normalization constants become constants, not graph inputs)."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    return convert_variables_to_constants_v2(function.get_concrete_function())


# ---------------------------------------------------------------------------------------------
# Checks inside the serving graph


def checked_pixels(images, height, width):
    """``images`` once it is a [batch, height, width, 3] batch of finite values in [0, 255].

    TF Serving feeds whatever shape a client sends (the signature's shape is not enforced), and
    the model would reshape a wrong one into a wrong number of predictions: refuse it, and
    NaN/inf or out-of-range pixels, as InvalidArgument.
    """
    shape = tf.shape(images)
    # Padded, so that a feed of another rank compares unequal instead of failing to broadcast.
    padded = tf.concat([shape, tf.fill([4], -1)], axis=0)
    checks = [
        tf.debugging.Assert(
            tf.reduce_all(padded[1:5] == tf.constant([height, width, 3, -1])),
            [f"`images` must be float32 [batch, {height}, {width}, 3] RGB pixels; received "
             "shape", shape],
            summarize=8,
        )
    ]
    with tf.control_dependencies(checks):
        checks.append(
            tf.debugging.Assert(
                tf.reduce_all(tf.math.is_finite(images)),
                ["`images` contains NaN or infinite values"],
            )
        )
        checks.append(
            tf.debugging.Assert(
                tf.reduce_all((images >= 0.0) & (images <= 255.0)),
                ["`images` must hold pixel values in [0, 255]; received values from",
                 tf.reduce_min(images), "to", tf.reduce_max(images)],
            )
        )
    with tf.control_dependencies(checks):
        return tf.identity(images)


def eval_resize_and_crop(image_bytes, height, width, crop_pct, crop_mode="center"):
    """Decodes one encoded image and applies the evaluation transform; float32 [H, W, 3].

    Memory is bounded whatever the image declares: the size is checked from the header before
    decoding (`keras_coat.tf_images.decode_image`), and the transform resamples only the crop
    window, never the whole resized image.
    """
    image = tf_images.decode_image(image_bytes, "serving_bytes' image")
    return tf_images.eval_transform(image, (height, width), crop_pct, crop_mode)


# ---------------------------------------------------------------------------------------------
# Verification


def verification_images(count, height, width):
    """Fixed random pixel images [count, height, width, 3] in [0, 255], float32."""
    rng = np.random.default_rng(0)
    return rng.uniform(0.0, 255.0, size=(count, height, width, 3)).astype(np.float32)


def check_runtime_probabilities(runtime, received, expected, atol=None):
    """Checks probabilities an export returned in `runtime` against the Keras model's.

    Raises ValueError when the shapes differ or a value is not finite, and, with ``atol`` (float
    exports), when a row is no probability distribution or a value differs by more than
    ``atol``. Returns the largest absolute difference.
    """
    received = np.asarray(received)
    if received.shape != expected.shape or not np.all(np.isfinite(received)):
        raise ValueError(
            f"The export returned {received.shape} probabilities in {runtime} (finite: "
            f"{bool(np.all(np.isfinite(received)))}); expected finite {expected.shape}."
        )
    error = float(np.max(np.abs(received - expected)))
    if atol is None:  # a reduced precision: its agreement is measured on held-out images
        return error
    sums = received.sum(axis=-1)
    if np.any(received < 0) or not np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError(
            f"The export's outputs in {runtime} are not probabilities (negative values or rows "
            f"not summing to 1: {sums}); pass model_output='logits' if the model returns logits."
        )
    if error > atol:
        raise ValueError(
            f"The export differs from the Keras model by {error:.3g} (> {atol}) in {runtime}; "
            "it is broken and was not published."
        )
    return error
