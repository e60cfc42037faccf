"""Export a classifier as a TensorFlow SavedModel ready for TensorFlow Serving.

The SavedModel is self-contained: it loads with plain ``tf.saved_model.load`` (no Keras, no
keras_coat) and in TF Serving. It has two signatures, both returning the same outputs:

``serving_default``
    input ``images``: float32 ``[batch, height, width, 3]``, RGB pixels in [0, 255]. Another
    shape, NaN/inf or values outside [0, 255] are refused (``INVALID_ARGUMENT``).
``serving_bytes``
    input ``image_bytes``: string ``[batch]``, encoded JPEG, PNG or BMP images of at most
    ``keras_coat.imagenet.MAX_IMAGE_PIXELS`` pixels and ``MAX_IMAGE_SIDE`` per side, checked
    from the header before decoding (other formats and larger images are ``INVALID_ARGUMENT``;
    GIF and WebP are refused because an animated file decodes every frame). Each image is
    decoded to RGB and goes through ``keras_coat.imagenet.eval_transform``, the evaluation
    transform that ``load_image`` and training's validation also use: bicubic resize so that
    the shorter side is ``int(size / crop_pct)`` (a non-square size: so that it just covers
    ``int(side / crop_pct)`` on both sides, aspect ratio kept), rounding to integer pixel
    values, center crop to the model's size.

Outputs: ``probabilities`` float32 ``[batch, classes]``; the ``top_k`` best ``classes`` (int32
indices), their ``scores`` (float32) and ``class_names`` (string), each ``[batch, top_k]``.

The export works for any single-input Keras classifier whose output is ``[batch, classes]``
probabilities or logits; the signatures add whatever the model lacks (ImageNet normalization
for a model built with ``include_preprocessing=False``, softmax for
``classifier_activation=None``), so clients always send pixels and always get probabilities.

This module and ``keras_coat.export_formats`` (LiteRT, ONNX, OpenVINO) are the only modules of
keras_coat that use TensorFlow directly; they need the TensorFlow backend of Keras.
"""

import json
import numbers
import os
import shlex
import shutil
import uuid

import keras
import numpy as np
import tensorflow as tf

from keras_coat.imagenet import (
    DEFAULT_CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    NUM_CLASSES,
    eval_transform,
)

SIGNATURE_IMAGES = "serving_default"
SIGNATURE_BYTES = "serving_bytes"
NORMALIZATION_LAYER_NAME = "imagenet_normalization"

_MODEL_INPUTS = ("auto", "pixels", "normalized")
_MODEL_OUTPUTS = ("auto", "probabilities", "logits")
# How far the reloaded SavedModel may drift from the eager Keras model before export fails.
_VERIFY_ATOL = 1e-4


def export_saved_model(
    model,
    directory,
    version=1,
    class_names=None,
    image_size=None,
    crop_pct=DEFAULT_CROP_PCT,
    top_k=5,
    overwrite=False,
    model_input="auto",
    model_output="auto",
    verify=True,
):
    """Write ``model`` as the SavedModel ``directory/<version>/`` with serving signatures.

    Args:
        model: a built single-input Keras classifier, ``[batch, H, W, 3]`` ->
            ``[batch, classes]``.
        directory: the model's base directory (what TF Serving's ``--model_base_path`` names);
            created if missing.
        version: the version number, a non-negative int; the SavedModel goes to
            ``directory/<version>``.
        class_names: one string per class. Default: the ImageNet names when the model has
            1000 classes, ``"class_<i>"`` otherwise.
        image_size: ``int`` or ``(height, width)``. Needed only when the model's input has no
            fixed size; otherwise it must equal the model's size.
        crop_pct: the evaluation crop fraction used by ``serving_bytes`` (0 < crop_pct <= 1).
        top_k: how many best classes the signatures return (at most ``classes``).
        overwrite: replace an existing ``directory/<version>``; otherwise that is an error.
        model_input: ``"pixels"`` if the model normalizes [0, 255] pixels itself,
            ``"normalized"`` if it expects ImageNet-normalized inputs (the signatures then
            normalize), ``"auto"`` to decide by the presence of a layer named
            ``"imagenet_normalization"``.
        model_output: ``"probabilities"``, ``"logits"`` (the signatures apply softmax) or
            ``"auto"`` to read it from the model's last layer.
        verify: reload the written SavedModel and check that both signatures answer and that
            ``serving_default`` matches the Keras model, before publishing the version.

    Returns:
        The path of the published version directory.

    The version directory appears atomically: the SavedModel is written to a hidden temporary
    directory inside ``directory`` (TF Serving ignores non-numeric names) and renamed into
    place only once complete (and verified). A failed export leaves nothing behind.
    """
    _check_backend("export_saved_model")
    version = _check_version(version)
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"`directory` must be a directory; {directory!r} is a file.")
    height, width, classes = _check_model_shapes(model, image_size)
    if (
        isinstance(crop_pct, bool)
        or not isinstance(crop_pct, numbers.Real)
        or not 0.0 < crop_pct <= 1.0
    ):
        raise ValueError(f"`crop_pct` must be in (0, 1]; received {crop_pct}.")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive int; received {top_k!r}.")
    names = _resolve_class_names(class_names, classes)
    normalize = _needs_normalization(model, model_input)
    softmax = _needs_softmax(model, model_output)

    target = os.path.join(directory, str(version))
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(
            f"{target} already exists; pass overwrite=True to replace it or choose another version."
        )

    created_directory = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    # mkdir, not mkdtemp: the published directory keeps the umask's permissions, not 0700.
    staging = os.path.join(directory, f".{version}.partial-{uuid.uuid4().hex}")
    os.mkdir(staging)
    try:
        classify = _classifier_fn(model, names, min(int(top_k), classes), normalize, softmax)
        archive = _build_archive(model, classify, height, width, float(crop_pct))
        archive.write_out(staging, verbose=False)
        if verify:
            _verify_export(staging, classify, height, width, classes, int(top_k))
        _publish(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_directory:
            _remove_if_empty(directory)
        raise
    return target


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_backend(caller):
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"{caller} needs the TensorFlow backend of Keras; the current backend is "
            f"{keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow before importing keras."
        )


def _check_version(version):
    if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 0:
        raise ValueError(
            f"`version` must be a non-negative int (TF Serving reads the version from the "
            f"directory name); received {version!r} of type {type(version).__name__}."
        )
    return int(version)


def _check_model_shapes(model, image_size):
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


def _resolve_class_names(class_names, classes):
    if class_names is None:
        if classes == NUM_CLASSES:
            from keras_coat.imagenet import class_names as imagenet_class_names

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


def _needs_normalization(model, model_input):
    if model_input not in _MODEL_INPUTS:
        raise ValueError(f"`model_input` must be one of {_MODEL_INPUTS}; received {model_input!r}.")
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


def _needs_softmax(model, model_output):
    if model_output not in _MODEL_OUTPUTS:
        raise ValueError(
            f"`model_output` must be one of {_MODEL_OUTPUTS}; received {model_output!r}."
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


# ---------------------------------------------------------------------------------------------
# The serving graph


def _probabilities_fn(model, normalize, softmax):
    """``images [batch, H, W, 3] in [0, 255]`` -> float32 ``probabilities [batch, classes]``."""
    mean = tf.constant([255.0 * m for m in IMAGENET_MEAN], tf.float32)
    std = tf.constant([255.0 * s for s in IMAGENET_STD], tf.float32)

    def probabilities_of(images):
        x = (images - mean) / std if normalize else images
        predictions = tf.cast(model(x, training=False), tf.float32)
        return tf.nn.softmax(predictions, axis=-1) if softmax else predictions

    return probabilities_of


def _classifier_fn(model, class_names, top_k, normalize, softmax):
    """``images [batch, H, W, 3] in [0, 255]`` -> the dict of serving outputs."""
    names = tf.constant(class_names, dtype=tf.string)
    probabilities_of = _probabilities_fn(model, normalize, softmax)

    def classify(images):
        probabilities = probabilities_of(images)
        top = tf.math.top_k(probabilities, k=top_k)
        return {
            "probabilities": probabilities,
            "classes": top.indices,
            "scores": top.values,
            "class_names": tf.gather(names, top.indices),
        }

    return classify


# Formats serving_bytes decodes: those whose size it reads from the header before decoding.
# GIF and WebP are refused: an animated file makes the decoder hold every frame, and the frame
# count is not in any header.
_SERVED_FORMATS = "JPEG, PNG or BMP"
# Images one serving_bytes request decodes at the same time (each costs at most about
# MAX_IMAGE_PIXELS * 3 bytes plus the resize).
_DECODE_PARALLELISM = 4


def _header_image_size(image_bytes):
    """``(height, width)`` (int64) read from the header of a JPEG, PNG or BMP, before decoding.

    Raises InvalidArgument (when run) for another format, or a size over `MAX_IMAGE_SIDE` or
    `MAX_IMAGE_PIXELS`: a tiny file can declare gigapixels.
    """
    # 32 header bytes, zero-padded so that short inputs index safely.
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(image_bytes, 0, 32),
                                              tf.constant(b"\0" * 32)]), 0, 32)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)

    def big_endian(i):
        return b[i] * 2**24 + b[i + 1] * 2**16 + b[i + 2] * 2**8 + b[i + 3]

    def little_endian_signed(i):
        value = b[i] + b[i + 1] * 2**8 + b[i + 2] * 2**16 + b[i + 3] * 2**24
        return tf.where(value >= 2**31, value - 2**32, value)

    not_empty = tf.debugging.Assert(
        tf.strings.length(image_bytes) > 0, ["serving_bytes received an empty image"]
    )
    with tf.control_dependencies([not_empty]):
        is_jpeg = tf.io.is_jpeg(image_bytes)
    is_png = tf.strings.substr(head, 0, 8) == b"\x89PNG\r\n\x1a\n"
    is_bmp = tf.strings.substr(head, 0, 2) == b"BM"
    known = tf.debugging.Assert(
        is_jpeg | is_png | is_bmp,
        [f"serving_bytes accepts {_SERVED_FORMATS} images; this one (bytes:",
         tf.strings.length(image_bytes), ") is in another format or not an image"],
    )
    with tf.control_dependencies([known]):
        size = tf.cond(
            is_jpeg,
            lambda: tf.cast(tf.image.extract_jpeg_shape(image_bytes)[:2], tf.int64),
            lambda: tf.where(
                is_png,
                tf.stack([big_endian(20), big_endian(16)]),
                # BMP: signed 32-bit width and height (negative height: rows top-down).
                tf.abs(tf.stack([little_endian_signed(22), little_endian_signed(18)])),
            ),
        )
    height, width = size[0], size[1]
    in_bounds = tf.debugging.Assert(
        (tf.minimum(height, width) >= 1)
        & (tf.maximum(height, width) <= MAX_IMAGE_SIDE)
        & (height * width <= MAX_IMAGE_PIXELS),
        [f"the image's header declares a size (height, width) outside the served limits "
         f"(each side 1 to {MAX_IMAGE_SIDE} pixels, at most {MAX_IMAGE_PIXELS} pixels):",
         height, width],
    )
    with tf.control_dependencies([in_bounds]):
        return tf.identity(height), tf.identity(width)


def _eval_resize_and_crop(image_bytes, height, width, crop_pct):
    """Decodes one encoded image and applies the evaluation transform; float32 [H, W, 3].

    Memory is bounded whatever the image declares: the size is checked from the header before
    decoding, and `eval_transform` resamples only the crop window, never the whole resized image.
    """
    h, w = _header_image_size(image_bytes)
    with tf.control_dependencies([h, w]):
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    decoded = tf.shape(image, out_type=tf.int64)
    agrees = tf.debugging.Assert(
        tf.reduce_all(decoded[:2] == tf.stack([h, w])),
        ["the decoded image's size differs from its header's:", decoded[:2], h, w],
    )
    with tf.control_dependencies([agrees]):
        return eval_transform(image, (height, width), crop_pct)


def _checked_pixels(images, height, width):
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


def _build_archive(model, classify, height, width, crop_pct):
    images_spec = tf.TensorSpec((None, height, width, 3), tf.float32, name="images")
    bytes_spec = tf.TensorSpec((None,), tf.string, name="image_bytes")
    # One traced copy of the model, called by both signatures.
    classify_graph = tf.function(classify, input_signature=[images_spec], autograph=False)

    def serve_images(images):
        return classify_graph(_checked_pixels(images, height, width))

    def serve_bytes(image_bytes):
        images = tf.map_fn(
            lambda data: _eval_resize_and_crop(data, height, width, crop_pct),
            image_bytes,
            fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32),
            parallel_iterations=_DECODE_PARALLELISM,
        )
        return classify_graph(images)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE_IMAGES, serve_images, input_signature=[images_spec])
    archive.add_endpoint(SIGNATURE_BYTES, serve_bytes, input_signature=[bytes_spec])
    return archive


# ---------------------------------------------------------------------------------------------
# Verification and publication


def _verify_export(path, classify, height, width, classes, top_k):
    """Reloads the SavedModel at ``path`` and checks it against the eager Keras model."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 255.0, size=(2, height, width, 3)).astype(np.float32)
    expected = classify(tf.constant(images))["probabilities"].numpy()
    loaded = tf.saved_model.load(path)
    served = loaded.signatures[SIGNATURE_IMAGES](images=tf.constant(images))
    probabilities = served["probabilities"].numpy()
    if probabilities.shape != (2, classes):
        raise ValueError(
            f"The exported signature returned probabilities of shape {probabilities.shape}; "
            f"expected (2, {classes})."
        )
    sums = probabilities.sum(axis=-1)
    if np.any(probabilities < 0) or not np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError(
            "The model's outputs are not probabilities (negative values or rows not summing to "
            f"1: {sums}); pass model_output='logits' if the model returns logits."
        )
    error = float(np.max(np.abs(probabilities - expected)))
    if error > _VERIFY_ATOL:
        raise ValueError(
            f"The reloaded SavedModel differs from the Keras model by {error:.3g} "
            f"(> {_VERIFY_ATOL}); the export is broken."
        )
    encoded = tf.io.encode_png(images[0, : height // 2 + 3].astype(np.uint8))
    served = loaded.signatures[SIGNATURE_BYTES](image_bytes=tf.stack([encoded]))
    if tuple(served["probabilities"].shape) != (1, classes) or tuple(
        served["class_names"].shape
    ) != (1, min(top_k, classes)):
        raise ValueError("The exported serving_bytes signature returned unexpected shapes.")


def _publish(staging, target, overwrite):
    """Renames ``staging`` to ``target``; an existing ``target`` is swapped out, not merged."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    if not overwrite:
        raise FileExistsError(f"{target} appeared while exporting; not replacing it.")
    parent, name = os.path.split(os.path.abspath(target))
    retired = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _remove_if_empty(directory):
    try:
        os.rmdir(directory)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Command line: `python -m keras_coat export` (the arguments live in keras_coat/__main__.py)


def export_command(
    model_name,
    weights,
    output,
    version=1,
    image_size=None,
    class_names_file=None,
    top_k=5,
    overwrite=False,
    print_fn=print,
):
    """Builds a CoaT variant, exports it, and prints its signatures and how to serve it.

    ``weights``: ``"imagenet"``, a weights file (``.weights.h5``, ``.pth``, ``.safetensors``),
    or ``None`` for random weights. ``class_names_file``: UTF-8 text, one class name per line;
    its length sets the number of classes. Returns the version directory.
    """
    model, class_names = build_command_model(model_name, weights, image_size, class_names_file)
    path = export_saved_model(
        model,
        output,
        version=version,
        class_names=class_names,
        crop_pct=DEFAULT_CROP_PCT,
        top_k=top_k,
        overwrite=overwrite,
    )
    print_fn(f"Exported {model_name} to {path}\n")
    print_fn(describe_saved_model(path))
    print_fn(serving_instructions(output, model_name))
    return path


def build_command_model(model_name, weights, image_size=None, class_names_file=None):
    """The classifier the export commands write: ``(model, class names or None)``.

    ``class_names_file``: UTF-8 text, one class name per line; its length sets the number of
    classes (default: the 1000 ImageNet classes).
    """
    from keras_coat import create_model

    class_names = None
    classes = NUM_CLASSES
    if class_names_file is not None:
        with open(class_names_file, encoding="utf-8") as f:
            class_names = [line.rstrip("\r\n") for line in f if line.strip()]
        classes = len(class_names)
    input_shape = None if image_size is None else (image_size, image_size, 3)
    model = create_model(
        model_name, weights=weights, input_shape=input_shape, classes=classes, include_top=True
    )
    return model, class_names


def describe_saved_model(path):
    """The signatures of a SavedModel, in the layout of ``saved_model_cli show --all``."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    lines = []
    for meta_graph in saved_model.meta_graphs:
        tags = ", ".join(meta_graph.meta_info_def.tags)
        lines.append(f"MetaGraphDef with tag-set: '{tags}' contains the following SignatureDefs:")
        for key in sorted(meta_graph.signature_def):
            if key.startswith("__"):
                continue
            signature = meta_graph.signature_def[key]
            lines.append("")
            lines.append(f"signature_def['{key}']:")
            for kind, tensors in (("input", signature.inputs), ("output", signature.outputs)):
                lines.append(
                    f"  The given SavedModel SignatureDef contains the following {kind}(s):"
                )
                for name in sorted(tensors):
                    lines.extend(_describe_tensor(f"{kind}s['{name}']", tensors[name]))
            lines.append(f"  Method name is: {signature.method_name}")
    return "\n".join(lines) + "\n"


def _describe_tensor(label, info):
    from tensorflow.core.framework import types_pb2

    if info.tensor_shape.unknown_rank:
        shape = "unknown_rank"
    else:
        dims = [str(d.size) for d in info.tensor_shape.dim]
        shape = f"({dims[0]})" if len(dims) == 1 else f"({', '.join(dims)})"
    return [
        f"    {label} tensor_info:",
        f"        dtype: {types_pb2.DataType.Name(info.dtype)}",
        f"        shape: {shape}",
        f"        name: {info.name}",
    ]


def serving_instructions(directory, model_name):
    """A TF Serving docker command and REST requests for the export in ``directory``."""
    mount = shlex.quote(
        f"type=bind,source={os.path.abspath(directory)},target=/models/{model_name},readonly"
    )
    bytes_request = json.dumps(
        {"signature_name": SIGNATURE_BYTES, "instances": [{"image_bytes": {"b64": "%s"}}]}
    )
    return f"""
Serve it with TensorFlow Serving (REST on 8501, gRPC on 8500; the newest version is served):

  docker run --rm -p 8501:8501 -p 8500:8500 \\
    --mount {mount} \\
    -e MODEL_NAME={model_name} -t tensorflow/serving

Classify an image file (JPEG or PNG) with the serving_bytes signature:

  printf '{bytes_request}' "$(base64 -w0 image.jpg)" > request.json
  curl -s -X POST -H 'Content-Type: application/json' --data @request.json \\
    http://localhost:8501/v1/models/{model_name}:predict

or send decoded RGB pixels in [0, 255] (float32 [batch, height, width, 3]) to serving_default:

  {{"signature_name": "serving_default", "instances": [{{"images": [[[r, g, b], ...], ...]}}]}}

Each prediction holds "probabilities", and the top classes as "classes", "scores", "class_names".
"""
