"""Command line: ``python -m keras_coat {predict,info,export} ...``.

    python -m keras_coat predict cat.jpg dog.png --model coat_lite_small --top 5
    python -m keras_coat predict photo.jpg --model coat_lite_medium --image-size 384
    python -m keras_coat predict photo.jpg --weights my_finetune.weights.h5
    python -m keras_coat info

Each subcommand is one ``_add_<name>_command(subparsers)`` function that
declares its arguments and sets ``handler``, a function of the parsed
arguments returning the exit status.
"""

import argparse
import importlib.util
import json
import sys

DEFAULT_MODEL = "coat_lite_small"
DEFAULT_IMAGE_SIZE = 224


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as e:
        # The package's errors (bad weights files, checkpoints, manifests, downloads, images)
        # are ValueError or OSError subclasses whose message names the file and the problem.
        _error(e)
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _error(message):
    """Prints ``error: <message>`` as one line on stderr."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_coat",
        description="CoaT (Co-scale conv-attentional image Transformers) for Keras 3.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_predict_command(subparsers)
    _add_info_command(subparsers)
    _add_export_command(subparsers)
    return parser


def _variants():
    from keras_coat.backbone import VARIANTS

    return list(VARIANTS)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# Largest --image-size: the model input (and every decoded image) is image_size^2 pixels.
MAX_INPUT_SIZE = 2048


def _input_size(text):
    value = _positive_int(text)
    if value > MAX_INPUT_SIZE:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_INPUT_SIZE}, got {text!r}")
    return value


def _crop_pct(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


# ----------------------------------------------------------------------------- predict


def _add_predict_command(subparsers):
    parser = subparsers.add_parser(
        "predict",
        help="classify images with an ImageNet-1k CoaT",
        description="Classify images into the 1000 ImageNet classes. Images get the reference "
        "evaluation transform (bicubic resize to size/crop_pct, center crop).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=_variants(),
        help=f"variant (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (default: download, verify and cache the authors' checkpoint) or a "
        "weights file: .weights.h5, .pth/.pt or .safetensors (1000-class head)",
    )
    parser.add_argument(
        "--image-size",
        type=_input_size,
        default=DEFAULT_IMAGE_SIZE,
        help="input resolution (default 224; the preset of a variant at this size, such as "
        "coat_lite_medium_384, is used when there is one)",
    )
    parser.add_argument(
        "--crop-pct",
        type=_crop_pct,
        default=None,
        help="center-crop share of the resized image (default: the checkpoint's preset, "
        "224/256 for the authors' checkpoints)",
    )
    parser.add_argument(
        "--top", type=_positive_int, default=5, help="classes per image (default 5)"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="images per batch")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.set_defaults(handler=_predict)


def _predict(args):
    from keras_coat import presets
    from keras_coat.applications import create_model
    from keras_coat.imagenet import NUM_CLASSES, load_image

    if args.top > NUM_CLASSES:
        _error(f"--top must be at most {NUM_CLASSES}")
        return 2
    size = (args.image_size, args.image_size)
    preprocessing = presets.checkpoint_for(args.model, size).preprocessing.resized(size)
    crop_pct = preprocessing.crop_pct if args.crop_pct is None else args.crop_pct
    images = []
    for path in args.images:
        try:
            images.append(load_image(path, image_size=size, crop_pct=crop_pct))
        except (OSError, ValueError) as e:  # missing file, not an image, too large
            named = path in str(e)  # Pillow's and load_image's messages usually name it
            _error(f"cannot read image: {e}" if named else f"cannot read image {path!r}: {e}")
            return 1
    model = create_model(
        args.model,
        weights=args.weights,
        input_shape=(args.image_size, args.image_size, 3),
        classifier_activation="softmax",
    )
    print_top_classes(model, images, args.images, args.top, args.batch_size, args.json)
    return 0


def print_top_classes(model, images, paths, top=5, batch_size=8, as_json=False):
    """Classifies `images` (pixels after the evaluation transform) with `model` and prints the
    `top` classes of each, named by the model's class names (and WordNet ids for the ImageNet
    classes); a model without names has ImageNet's for 1000 classes, ``class_<i>`` otherwise."""
    import numpy as np

    from keras_coat import imagenet

    classes = int(model.outputs[0].shape[-1])
    names = getattr(model, "class_names", None)
    if names is None:
        imagenet_head = classes == imagenet.NUM_CLASSES
        names = imagenet.class_names() if imagenet_head else [f"class_{i}" for i in range(classes)]
    names = list(names)
    wnids = imagenet.class_wnids() if names == list(imagenet.class_names()) else None
    for start in range(0, len(images), batch_size):
        probabilities = model.predict(np.stack(images[start : start + batch_size]), verbose=0)
        for path, row in zip(paths[start:], np.asarray(probabilities)):
            best = np.argsort(-row, kind="stable")[:top]  # ties: the lower class index first
            rows = [(names[i], float(row[i]), wnids and wnids[i]) for i in best]
            _print_predictions(path, rows, as_json)


def _print_predictions(path, predictions, as_json):
    """`predictions`: (class name, probability, WordNet id or None) rows, best first."""
    if as_json:
        rows = [
            {"class": name, "probability": p, **({"wnid": wnid} if wnid else {})}
            for name, p, wnid in predictions
        ]
        print(json.dumps({"image": path, "predictions": rows}))
        return
    print(path)
    for rank, (name, probability, wnid) in enumerate(predictions, start=1):
        print(f"  {rank:>2}. {100 * probability:6.2f}%  {name}" + (f" ({wnid})" if wnid else ""))


# -------------------------------------------------------------------------------- info


def _add_info_command(subparsers):
    parser = subparsers.add_parser(
        "info",
        help="list the variants and their ImageNet checkpoints",
        description="List the CoaT variants, their size and accuracy (paper), and where their "
        "ImageNet checkpoints come from and are cached.",
    )
    parser.set_defaults(handler=_info)


def _info(args):
    import os

    from keras_coat import presets, weights

    manifest = os.environ.get(weights.MANIFEST_ENV)
    table = weights.checkpoint_table()  # a bad manifest: main() reports it in one line
    print(f"{'preset':<21} {'variant':<17} {'size':>4} {'params':>11} {'GFLOPs':>7} "
          f"{'top-1':>6}  weights")
    for name, preset in presets.PRESETS.items():
        if name not in table:
            state = "not in manifest"
        elif os.path.isfile(weights.cached_weights_path(name)):
            state = "cached"
        else:
            state = "not downloaded"
        print(
            f"{name:<21} {preset.variant:<17} {preset.preprocessing.image_size[0]:>4} "
            f"{preset.params:>11,} {preset.gflops:>7} {preset.top1:>5}%  {state}"
        )
    print()
    source = f"manifest {manifest} ({weights.MANIFEST_ENV})" if manifest else "built-in table"
    print(f"weights source: {source}")
    print(f"weights cache:  {weights.cache_dir()}")
    return 0


# ------------------------------------------------------------------------------ export


def _add_export_command(subparsers):
    """Registers ``export`` (SavedModel for serving, LiteRT, ONNX, OpenVINO) when
    `keras_coat.export` is present.

    The export package is imported when the command runs, so the other commands never pay
    for it; on JAX and PyTorch it writes through a TensorFlow child process.
    """
    if importlib.util.find_spec("keras_coat.export") is None:
        return
    parser = subparsers.add_parser(
        "export",
        help="export a SavedModel (TF Serving), LiteRT, ONNX or OpenVINO file",
        description="Build a CoaT variant and export it, verified in its runtime. The default "
        "is a versioned SavedModel for TensorFlow Serving (OUTPUT/VERSION), with signatures "
        "serving_default (float pixels) and serving_bytes (encoded JPEG/PNG). --format litert, "
        "onnx or openvino writes the file OUTPUT (.tflite, .onnx, .xml + .bin) taking pixels in "
        "[0, 255] and returning probabilities, with the class names in <stem>.labels.txt.",
    )
    # The base directory, as --output DIR or positionally; SUPPRESS keeps an absent
    # positional from overwriting --output.
    parser.add_argument(
        "--output",
        help="model base directory (the SavedModel goes in OUTPUT/VERSION), or the file to "
        "write for the other formats",
    )
    parser.add_argument(
        "--format",
        default="saved_model",
        choices=["saved_model", "litert", "onnx", "openvino"],
        help="saved_model (default), litert, onnx or openvino",
    )
    parser.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "dynamic_int8", "int8", "bfloat16"],
        help="float32 (default, every format); litert: dynamic_int8 (int8 weights) or int8 "
        "(full-integer, needs --calibration-data); openvino: bfloat16",
    )
    parser.add_argument(
        "--calibration-data",
        metavar="SOURCE",
        help="images for --precision int8 and to measure the top-1 agreement of reduced "
        "precisions: digits, folder:PATH or tfds:NAME",
    )
    parser.add_argument(
        "--calibration-images",
        type=_positive_int,
        default=200,
        metavar="N",
        help="calibration images for --precision int8 (default 200)",
    )
    parser.add_argument("output", nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=_variants())
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (default), 'none' (random weights) or a weights file "
        "(.weights.h5, .pth/.pt, .safetensors)",
    )
    parser.add_argument(
        "--version", type=_positive_int, default=None, help="SavedModel version (default 1)"
    )
    parser.add_argument(
        "--image-size",
        type=_input_size,
        default=None,
        help="input resolution, a multiple of 32 (default 224; 384 with coat_lite_medium "
        "selects its 384 checkpoint)",
    )
    parser.add_argument(
        "--class-names",
        default=None,
        help="text file, one class name per line; sets the number of classes (default: the "
        "1000 ImageNet classes)",
    )
    parser.add_argument(
        "--top",
        type=_positive_int,
        default=None,
        help="top classes each SavedModel request returns (default 5)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing OUTPUT/VERSION"
    )
    parser.set_defaults(handler=_export)


def _export(args):
    if not args.output:
        _error("the export needs --output DIR")
        return 2
    if args.format == "saved_model" and (args.precision != "float32" or args.calibration_data):
        _error("a SavedModel is float32; --precision and --calibration-data apply to "
               "--format litert and openvino")
        return 2
    if args.format != "saved_model":
        from keras_coat.export.formats import PRECISIONS

        misplaced = [flag for flag, value in (("--version", args.version), ("--top", args.top))
                     if value is not None]
        if misplaced:
            _error(f"{' and '.join(misplaced)} apply to --format saved_model only")
            return 2
        if args.precision not in PRECISIONS[args.format]:
            _error(f"--format {args.format} offers --precision "
                   f"{', '.join(PRECISIONS[args.format])}; received {args.precision}")
            return 2
    weights = None if args.weights.lower() == "none" else args.weights
    # Bad arguments, existing files, a failed verification: main() reports them in one line.
    model, class_names = build_export_model(
        args.model, weights, args.image_size, args.class_names
    )
    if args.format == "saved_model":
        _export_saved_model(args, model, class_names)
    else:
        _export_file(args, model, class_names)
    return 0


def build_export_model(model_name, weights, image_size=None, class_names_file=None):
    """The classifier the export command writes: ``(model, class names or None)``.

    ``weights``: ``"imagenet"``, a weights file or None (random weights). ``class_names_file``:
    UTF-8 text, one class name per line; its length sets the number of classes (default: the
    1000 ImageNet classes).
    """
    from keras_coat.applications import create_model
    from keras_coat.imagenet import NUM_CLASSES

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


def _export_saved_model(args, model, class_names):
    """``export`` (SavedModel): prints its signatures and how to serve it."""
    from keras_coat.export import export_saved_model
    from keras_coat.export.saved_model import describe_saved_model, serving_instructions

    path = export_saved_model(
        model,
        args.output,
        version=1 if args.version is None else args.version,
        class_names=class_names,
        top_k=5 if args.top is None else args.top,
        overwrite=args.overwrite,
    )
    print(f"Exported {args.model} to {path}\n")
    print(describe_saved_model(path))
    print(serving_instructions(args.output, args.model))


def _export_file(args, model, class_names):
    """``export --format litert|onnx|openvino``: prints the verification and how to run it."""
    from keras_coat.export import export_model
    from keras_coat.export.calibration import load_calibration_images

    calibration = held_out = None
    if args.calibration_data:
        size = tuple(int(side) for side in model.inputs[0].shape[1:3])
        calibration, held_out = load_calibration_images(
            args.calibration_data, size, args.calibration_images
        )
    result = export_model(
        model,
        args.output,
        args.format,
        precision=args.precision,
        calibration_data=calibration,
        calibration_images=args.calibration_images,
        held_out_data=held_out,
        class_names=class_names,
        overwrite=args.overwrite,
    )
    print(f"Exported {args.model} ({args.format}, {args.precision}) to {', '.join(result.files)}")
    if result.max_abs_diff is not None:
        print(f"Largest probability difference from Keras: {result.max_abs_diff:.3g}")
    if result.top1_agreement is not None:
        print(
            f"Top-1 agreement with the float Keras model: {result.top1_agreement:.2%} of "
            f"{result.held_out} held-out images"
        )
    from keras_coat.export.exporter import FORMAT_MODULES

    runtime = FORMAT_MODULES[args.format].run_instructions(result.path, args.precision)
    print(
        "\nInput: float32 RGB pixels in [0, 255], [batch, height, width, 3]; output: "
        "probabilities [batch, classes]; class names one per line in the .labels.txt file.\n\n"
        f"  {runtime}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
