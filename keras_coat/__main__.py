"""Command line: ``python -m keras_coat {predict,info,export} ...``.

    python -m keras_coat predict cat.jpg dog.png --model coat_lite_small --top 5
    python -m keras_coat predict photo.jpg --model coat_lite_medium --image-size 384
    python -m keras_coat predict photo.jpg --model runs/flowers/preset
    python -m keras_coat predict photo.jpg --model hf://me/coat-flowers
    python -m keras_coat info
    python -m keras_coat info --model runs/flowers/best.keras

``--model`` takes any preset reference (`keras_coat.loader`): a built-in name, a preset
directory, a `.keras` file or a hub handle; the class names and the preprocessing come from it.

Each subcommand is one ``_add_<name>_command(subparsers)`` function that
declares its arguments and sets ``handler``, a function of the parsed
arguments returning the exit status.
"""

import argparse
import importlib.util
import json
import sys

DEFAULT_MODEL = "coat_lite_small"


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


def _add_model_argument(parser, default=DEFAULT_MODEL):
    parser.add_argument(
        "--model",
        default=default,
        metavar="REFERENCE",
        help="a preset reference: a built-in name (coat_lite_tiny, ..., coat_small; see "
        "`info`), a preset directory, a .keras file, hf://owner/repo[@revision] or "
        "kaggle://owner/model/framework/variation" + (f" (default {default})" if default else ""),
    )


def _reference(model, image_size):
    """`--model`, or for a built-in variant name with another --image-size the variant's
    checkpoint for that size when there is one (coat_lite_medium at 384)."""
    from keras_coat import presets

    if image_size is None or model not in presets.VARIANTS:
        return model
    return presets.checkpoint_for(model, (image_size, image_size)).name


def _load_classifier(reference, weights, image_size, **overrides):
    """The classifier `reference` holds, with the weights file `weights` instead of its own
    (None: random weights; "imagenet": its own) and `image_size` as its input size."""
    from keras_coat import loader
    from keras_coat.image_classifier import CoaTImageClassifier

    if image_size is not None:
        overrides["image_shape"] = (image_size, image_size, 3)
    own = weights is not None and weights.lower() == "imagenet"
    model = CoaTImageClassifier.from_preset(reference, load_weights=own, **overrides)
    if weights is not None and not own:
        loader.load_weights_file(model, weights)
    return model


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
        help="classify images with a CoaT preset",
        description="Classify images with a CoaT classifier (default: the ImageNet-1k "
        "coat_lite_small), printing its own class names. Images get the preset's evaluation "
        "transform (bicubic resize to size/crop_pct, center crop).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _add_model_argument(parser)
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (default: the preset's own weights; a built-in checkpoint is "
        "downloaded, verified and cached once) or a weights file of the same head: "
        ".weights.h5, .pth/.pt or .safetensors",
    )
    parser.add_argument(
        "--image-size",
        type=_input_size,
        default=None,
        help="input resolution (default: the preset's; for a built-in variant name, its "
        "checkpoint at this size is used when there is one, such as coat_lite_medium_384)",
    )
    parser.add_argument(
        "--crop-pct",
        type=_crop_pct,
        default=None,
        help="center-crop share of the resized image (default: the preset's, 224/256 for the "
        "authors' checkpoints)",
    )
    parser.add_argument(
        "--top", type=_positive_int, default=None,
        help="classes per image (default 5, or all when the model has fewer)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="images per batch")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.set_defaults(handler=_predict)


def _predict(args):
    from keras_coat import loader
    from keras_coat.imagenet import load_image
    from keras_coat.presets import ImagePreprocessing

    reference = _reference(args.model, args.image_size)
    # Before any weights are read: a built-in name's configs come from the table.
    resolved, backbone, saved = loader.preset_configs(reference, fetch=False)
    classes = saved["num_classes"]
    if classes is None:
        _error(f"--model {args.model} holds a backbone without a classifier head")
        return 1
    if args.top is not None and args.top > classes:
        _error(f"--top must be at most {classes}, the classes of {args.model}")
        return 2
    top = min(5, classes) if args.top is None else args.top
    preprocessing = saved.get("preprocessing") or ImagePreprocessing(backbone["image_shape"][:2])
    size = preprocessing.image_size if args.image_size is None else (args.image_size,) * 2
    crop_pct = preprocessing.crop_pct if args.crop_pct is None else args.crop_pct
    images = []
    for path in args.images:
        try:
            images.append(
                load_image(path, size, crop_pct=crop_pct, crop_mode=preprocessing.crop_mode)
            )
        except (OSError, ValueError) as e:  # missing file, not an image, too large
            named = path in str(e)  # Pillow's and load_image's messages usually name it
            _error(f"cannot read image: {e}" if named else f"cannot read image {path!r}: {e}")
            return 1
    model = _load_classifier(resolved or reference, args.weights, args.image_size,
                             activation="softmax")
    print_top_classes(model, images, args.images, top, args.batch_size, args.json)
    return 0


def print_top_classes(model, images, paths, top=5, batch_size=8, as_json=False):
    """Classifies `images` (pixels after the evaluation transform) with `model` and prints the
    `top` classes of each, named by the model's class names (and WordNet ids for the ImageNet
    classes); a model without names has ImageNet's for 1000 classes, ``class_<i>`` otherwise."""
    import itertools

    import numpy as np

    from keras_coat import imagenet
    from keras_coat.image_classifier import predict_in_batches

    classes = int(model.outputs[0].shape[-1])
    names = getattr(model, "class_names", None)
    if names is None:
        imagenet_head = classes == imagenet.NUM_CLASSES
        names = imagenet.class_names() if imagenet_head else [f"class_{i}" for i in range(classes)]
    names = list(names)
    wnids = imagenet.class_wnids() if names == list(imagenet.class_names()) else None
    # One row of probabilities per image, each batch printed as soon as it is computed.
    probabilities = itertools.chain.from_iterable(predict_in_batches(model, images, batch_size))
    for path, row in zip(paths, probabilities):
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
        help="list the built-in presets, or describe one preset",
        description="Without --model: list the built-in presets (variant, size and accuracy "
        "from the paper), where their checkpoints come from and whether they are cached. With "
        "--model: describe that preset (variant, classes, preprocessing, metrics, source).",
    )
    _add_model_argument(parser, default=None)
    parser.set_defaults(handler=_info)


def _info(args):
    import os

    from keras_coat import presets, weights

    if args.model is not None:
        return _describe(args.model)
    manifest = os.environ.get(weights.MANIFEST_ENV)
    table = weights.checkpoint_table()  # a bad manifest: main() reports it in one line
    print(f"{'preset':<21} {'variant':<17} {'size':>4} {'params':>11} {'GFLOPs':>7} "
          f"{'top-1':>6}  weights")
    for name, preset in presets.PRESETS.items():
        if name not in table:
            state = "not in manifest"
        elif os.path.isdir(weights.cached_preset_path(name)):
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


def _describe(reference):
    """``info --model``: one preset, without reading its weights (a built-in is not fetched)."""
    import os

    from keras_coat import loader, presets, weights

    resolved, backbone, saved = loader.preset_configs(reference, fetch=False)
    metadata = resolved.metadata() if resolved is not None else {}
    fields = dict(zip(presets.ARCHITECTURE_FIELDS, presets.architecture(backbone)))
    rows = [
        ("preset", reference),
        ("variant", presets.variant_of(backbone) or "custom"),
        ("architecture", ", ".join(f"{k}={v}" for k, v in fields.items())),
        ("input", "x".join(str(side) for side in backbone["image_shape"])),
    ]
    classes, names = saved["num_classes"], saved.get("class_names")
    if classes is None:
        rows.append(("classes", "none (a backbone)"))
    else:
        shown = "" if not names else ": " + ", ".join(names[:5]) + (", ..." if classes > 5 else "")
        rows.append(("classes", f"{classes}{shown}"))
    preprocessing = saved.get("preprocessing")
    if preprocessing is not None:
        rows.append(("preprocessing", ", ".join(f"{k}={v}" for k, v in
                                                vars(preprocessing).items())))
    metrics = metadata.get("metrics")
    if isinstance(metrics, dict) and metrics:
        rows.append(("metrics", ", ".join(f"{k}={v}" for k, v in metrics.items())))
    if resolved is None:
        preset = presets.PRESETS[reference]
        entry = weights.checkpoint_entry(reference)
        cached = os.path.isdir(weights.cached_preset_path(reference))
        rows.append(("metrics", f"top-1 {preset.top1}% on ImageNet-1k (paper)"))
        rows.append(("source", f"{entry.url} (SHA-256 {entry.sha256}), "
                               + ("cached" if cached else "not downloaded")))
    else:
        rows.append(("source", resolved.source))
        if "keras_coat_version" in metadata:
            rows.append(("written by", f"keras-coat {metadata['keras_coat_version']}, "
                                       f"Keras {metadata.get('keras_version')}"))
    for key, value in rows:
        print(f"{key + ':':<15} {value}")
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
    _add_model_argument(parser)
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (default: the preset's own weights), 'none' (random weights) or a "
        "weights file (.weights.h5, .pth/.pt, .safetensors)",
    )
    parser.add_argument(
        "--version", type=_positive_int, default=None, help="SavedModel version (default 1)"
    )
    parser.add_argument(
        "--image-size",
        type=_input_size,
        default=None,
        help="input resolution, a multiple of 32 (default: the preset's; 384 with "
        "coat_lite_medium selects its 384 checkpoint)",
    )
    parser.add_argument(
        "--class-names",
        default=None,
        help="text file, one class name per line (default: the preset's class names); with "
        "the preset's own weights it must name as many classes as its head has",
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


def build_export_model(reference, weights, image_size=None, class_names_file=None):
    """The classifier the export command writes: ``(model, class names or None)``.

    ``weights``: ``"imagenet"`` (the preset's own), a weights file or None (random weights).
    ``class_names_file``: UTF-8 text, one class name per line; it relabels the preset's head,
    or sets the number of classes of a random or weights-file model (default: the preset's).
    """
    from keras_coat import loader
    from keras_coat.presets import PresetError

    reference = _reference(reference, image_size)
    overrides = {"activation": "softmax"}
    class_names = None
    if class_names_file is not None:
        with open(class_names_file, encoding="utf-8") as f:
            class_names = [line.rstrip("\r\n") for line in f if line.strip()]
        overrides.update(num_classes=len(class_names), class_names=class_names)
        if weights is not None and weights.lower() == "imagenet":
            resolved, _, saved = loader.preset_configs(reference)
            if saved["num_classes"] != len(class_names):
                raise PresetError(
                    f"--class-names names {len(class_names)} classes, but the head of "
                    f"{reference!r} has {saved['num_classes']}; a new head would be untrained. "
                    "Relabel it with as many names, or export --weights none or a weights file "
                    "of that many classes."
                )
            reference = resolved
    return _load_classifier(reference, weights, image_size, **overrides), class_names


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
    print(serving_instructions(args.output, model.name))


def _export_file(args, model, class_names):
    """``export --format litert|onnx|openvino``: prints the verification and how to run it."""
    from keras_coat.export import export_model
    from keras_coat.export.calibration import load_calibration_images

    calibration = held_out = None
    if args.calibration_data:
        size = tuple(int(side) for side in model.inputs[0].shape[1:3])
        preprocessing = getattr(model, "preprocessing", None)
        crop = {} if preprocessing is None else {  # the model's own evaluation transform
            "crop_pct": preprocessing.crop_pct, "crop_mode": preprocessing.crop_mode
        }
        calibration, held_out = load_calibration_images(
            args.calibration_data, size, args.calibration_images, **crop
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
