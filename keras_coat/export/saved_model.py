"""A classifier as a TensorFlow SavedModel for TensorFlow Serving.

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
    decoded to RGB and goes through the evaluation transform (``keras_coat.tf_images``), whose
    pixels are those of ``keras_coat.imagenet.load_image`` and training's validation (Pillow's,
    timm's): bicubic resize so that the shorter side is ``int(size / crop_pct)`` (a non-square
    size: so that it just covers ``int(side / crop_pct)`` on both sides, aspect ratio kept; with
    ``crop_mode="squash"`` both sides to ``int(side / crop_pct)``), center crop to the model's
    size.

Outputs: ``probabilities`` float32 ``[batch, classes]``; the ``top_k`` best ``classes`` (int32
indices), their ``scores`` (float32) and ``class_names`` (string), each ``[batch, top_k]``.
"""

import json
import numbers
import os
import shlex
import shutil
import uuid

import tensorflow as tf

from keras_coat.export import serving
from keras_coat.utils.files import publish_directory

SIGNATURE_IMAGES = "serving_default"
SIGNATURE_BYTES = "serving_bytes"
# Images one serving_bytes request decodes at the same time (each costs at most about
# MAX_IMAGE_PIXELS * 3 bytes plus the resize).
DECODE_PARALLELISM = 4


def export_saved_model(
    model,
    directory,
    version=1,
    class_names=None,
    image_size=None,
    crop_pct=None,
    crop_mode=None,
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
        class_names: one string per class. Default: ``model.class_names`` when the model
            carries them, else the ImageNet names when it has 1000 classes, ``"class_<i>"``
            otherwise.
        image_size: ``int`` or ``(height, width)``. Needed only when the model's input has no
            fixed size; otherwise it must equal the model's size.
        crop_pct: the evaluation crop fraction used by ``serving_bytes`` (0 < crop_pct <= 1).
            Default: the crop fraction of ``model.preprocessing`` when the model carries one,
            else ``keras_coat.imagenet.DEFAULT_CROP_PCT``.
        crop_mode: the evaluation crop mode of ``serving_bytes``, "center" or "squash" (as
            timm's). Default: that of ``model.preprocessing``, else "center".
        top_k: how many best classes the signatures return (at most ``classes``).
        overwrite: replace an existing ``directory/<version>``; otherwise that is an error.
        model_input: ``"pixels"`` if the model normalizes [0, 255] pixels itself,
            ``"normalized"`` if it expects normalized inputs (the signatures then normalize,
            with the mean and std of ``model.preprocessing``, default ImageNet's), ``"auto"``
            to decide by the presence of a layer named ``"imagenet_normalization"``.
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
    version = _check_version(version)
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"`directory` must be a directory; {directory!r} is a file.")
    contract = serving.serving_contract(
        model,
        class_names=class_names,
        image_size=image_size,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        model_input=model_input,
        model_output=model_output,
    )
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive int; received {top_k!r}.")
    top_k = min(int(top_k), contract.classes)

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
        classify = _classifier_fn(model, contract, top_k)
        _write_saved_model(model, classify, contract, staging)
        if verify:
            _verify_export(staging, classify, contract, top_k)
        publish_directory(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_directory:
            _remove_if_empty(directory)
        raise
    return target


def _check_version(version):
    if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 0:
        raise ValueError(
            f"`version` must be a non-negative int (TF Serving reads the version from the "
            f"directory name); received {version!r} of type {type(version).__name__}."
        )
    return int(version)


def _classifier_fn(model, contract, top_k):
    """``images [batch, H, W, 3] in [0, 255]`` -> the dict of serving outputs."""
    names = tf.constant(contract.class_names, dtype=tf.string)
    probabilities_of = contract.probabilities_fn(model)

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


def _write_saved_model(model, classify, contract, path):
    """Writes the SavedModel of the two signatures, which hold the model's variables.

    Each signature is traced once, as a concrete function. (Keras' `ExportArchive` saves the
    `tf.function`s themselves, which `tf.saved_model.save` traces again, and walks the whole
    model for lookup tables, which a classifier has none of: measured, 40% of an export's
    time, 6.9-7.9 s -> 4.1-4.3 s for a tiny CoaT-Lite, 10.6-11.9 s -> 6.4-7.1 s for CoaT-Lite
    Tiny at 224.)"""
    height, width = contract.height, contract.width
    images_spec = tf.TensorSpec((None, height, width, 3), tf.float32, name=serving.INPUT_NAME)
    bytes_spec = tf.TensorSpec((None,), tf.string, name="image_bytes")
    # One traced copy of the model, called by both signatures.
    classify_graph = tf.function(classify, input_signature=[images_spec], autograph=False)

    def serve_images(images):
        return classify_graph(serving.checked_pixels(images, height, width))

    def serve_bytes(image_bytes):
        images = tf.map_fn(
            lambda data: serving.eval_resize_and_crop(
                data, height, width, contract.crop_pct, contract.crop_mode
            ),
            image_bytes,
            fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32),
            parallel_iterations=DECODE_PARALLELISM,
        )
        return classify_graph(images)

    signatures = {
        SIGNATURE_IMAGES: tf.function(serve_images, autograph=False).get_concrete_function(
            images_spec
        ),
        SIGNATURE_BYTES: tf.function(serve_bytes, autograph=False).get_concrete_function(
            bytes_spec
        ),
    }
    root = _SavedModelRoot()
    root.variables = list(model.variables)
    root.trainable_variables = list(model.trainable_variables)
    root.non_trainable_variables = list(model.non_trainable_variables)
    for name, function in signatures.items():
        setattr(root, name, function)
    tf.saved_model.save(root, path, signatures=signatures)


class _SavedModelRoot(tf.Module):
    """The SavedModel's root object: the model's variables (Keras' own, which are trackable on
    TensorFlow) and the signatures' functions, under the attribute names of Keras'
    `ExportArchive` and TF Hub's loaders. Plain attributes replace `tf.Module`'s computed
    properties of those names, so that they are saved."""

    variables = trainable_variables = non_trainable_variables = None


def _verify_export(path, classify, contract, top_k):
    """Reloads the SavedModel at ``path`` and checks it against the eager Keras model."""
    images = serving.verification_images(2, contract.height, contract.width)
    expected = classify(tf.constant(images))["probabilities"].numpy()
    loaded = tf.saved_model.load(path)
    served = loaded.signatures[SIGNATURE_IMAGES](images=tf.constant(images))
    serving.check_runtime_probabilities(
        "TensorFlow (the reloaded SavedModel)",
        served["probabilities"].numpy(),
        expected,
        atol=serving.VERIFY_ATOL,
    )
    encoded = tf.io.encode_png(images[0, : contract.height // 2 + 3].astype("uint8"))
    served = loaded.signatures[SIGNATURE_BYTES](image_bytes=tf.stack([encoded]))
    if tuple(served["probabilities"].shape) != (1, contract.classes) or tuple(
        served["class_names"].shape
    ) != (1, top_k):
        raise ValueError("The exported serving_bytes signature returned unexpected shapes.")


def _remove_if_empty(directory):
    try:
        os.rmdir(directory)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Descriptions for people (the command line prints them)


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
