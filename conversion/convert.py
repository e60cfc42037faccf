"""Converts a PyTorch CoaT checkpoint (the authors' `.pth` or timm's `.safetensors`) to Keras.

    python -m conversion.convert SOURCE --model coat_lite_tiny --output coat_lite_tiny.weights.h5
    python -m conversion.convert coat_lite_medium_384.pth --model coat_lite_medium \\
        --input-size 384 --output coat_lite_medium_384.weights.h5 --verify
    python -m conversion.convert coat_lite_tiny_e88e96b0.pth --model coat_lite_tiny \\
        --preset-dir presets/coat_lite_tiny --verify

`--preset-dir` writes a preset directory (KerasHub's layout, see `keras_coat.preset_io`): the
classifier taking RGB pixels in [0, 255] with softmax outputs, the evaluation preprocessing of
the published checkpoint at that size and the ImageNet class names, ready to publish on a model
hub and to load with `keras_coat.CoaTImageClassifier.from_preset(directory)`.

The checkpoint is read without running anything from it and without PyTorch
(`keras_coat.checkpoint`), mapped strictly onto the model (`keras_coat.convert`), and written
atomically. `--verify` (needs timm) loads the same tensors into timm's reference model and
prints the largest absolute logit difference on random inputs; it fails above `--tolerance`.
"""

import argparse
import contextlib
import os
import sys

# TensorFlow's C++ start-up chatter would bury the converter's own report.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# timm (through torchvision) must be imported before TensorFlow, which keras_coat loads: in the
# other order both register the same LLVM options and the process aborts. The variant list comes
# from keras_coat, so the reference stack --verify needs is loaded first whenever it is installed.
with contextlib.suppress(ImportError):
    import timm  # noqa: F401

from keras_coat.presets import VARIANTS as _VARIANTS  # noqa: E402
from keras_coat.utils.files import write_atomically  # noqa: E402

VARIANTS = tuple(_VARIANTS)


def _input_size(text):
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW (e.g. 384 or 256x320), got {text!r}")
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or any(s <= 0 or s % 32 for s in size):
        raise argparse.ArgumentTypeError(
            f"the input size must be N or HxW with multiples of 32, got {text!r}"
        )
    return size


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m conversion.convert",
        description="Convert a PyTorch CoaT checkpoint to a Keras .weights.h5 file.",
    )
    parser.add_argument("source", help="checkpoint: .pth/.pt (authors' or timm's) or .safetensors")
    parser.add_argument("--model", required=True, choices=VARIANTS, help="CoaT variant")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="output path ending in .weights.h5")
    target.add_argument(
        "--preset-dir", help="write a preset directory (config, weights, preprocessing, classes)"
    )
    parser.add_argument(
        "--input-size", type=_input_size, default=(224, 224),
        help="model input size, N or HxW (default 224; 384 for the Lite-Medium 384 checkpoint)",
    )
    parser.add_argument(
        "--verify", action="store_true",
        help="compare logits with timm's reference model on random inputs (needs timm)",
    )
    parser.add_argument("--batch", type=int, default=2, help="images for --verify (default 2)")
    parser.add_argument(
        "--tolerance", type=float, default=1e-4,
        help="largest allowed absolute logit difference for --verify (default 1e-4)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def save_weights_atomically(model, path):
    """Writes `model`'s weights to `path` through a temporary file in the same directory.

    On failure nothing is left: no temporary file, and no folder this call created.
    """
    folder = os.path.dirname(os.path.abspath(path))
    created = []
    parent = folder
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(folder, exist_ok=True)
    try:
        write_atomically(path, lambda temporary: model.save_weights(temporary, overwrite=True))
    except BaseException:
        for directory in created:  # deepest first
            try:
                os.rmdir(directory)
            except OSError:
                break
        raise


def verify_against_reference(model, state_dict, variant, input_size, batch, seed=0):
    """Largest absolute logit difference between `model` and timm's `variant` on random inputs.

    timm's model gets the same tensors under every name it registers them (shared modules
    appear several times in its state dict), so a checkpoint holding one alias verifies too.
    """
    import numpy as np
    import timm
    import torch

    from keras_coat.convert import canonical_name, canonical_tensors

    reference = timm.create_model(variant, pretrained=False, img_size=input_size).eval()
    tensors, _ = canonical_tensors(state_dict)
    reference.load_state_dict(
        {key: torch.from_numpy(np.ascontiguousarray(tensors[canonical_name(key)]))
         for key in reference.state_dict()},
        strict=True,
    )
    images = np.random.RandomState(seed).randn(batch, *input_size, 3).astype("float32")
    with torch.no_grad():
        expected = reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    return float(np.abs(_logits(model, images) - expected).max())


def _logits(model, images):
    """The model's logits for normalized `images`, whatever its input and output conventions."""
    import keras
    import numpy as np

    if model.include_preprocessing:
        mean = np.asarray(model.preprocessing.mean, "float32")
        std = np.asarray(model.preprocessing.std, "float32")
        images = (images * std + mean) * np.float32(255.0)
    if model.activation is not None:  # the head's output, in the same graph
        model = keras.Model(model.inputs, model.get_layer("head").output)
    return np.asarray(model.predict(images, verbose=0))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be a positive integer, got {args.batch}")
    if not 0.0 <= args.tolerance < float("inf"):  # also refuses nan
        parser.error(f"--tolerance must be a finite number >= 0, got {args.tolerance}")
    target = args.output or args.preset_dir
    if args.output and not args.output.endswith(".weights.h5"):
        sys.exit(f"error: --output must end with .weights.h5 (got {args.output!r})")
    if os.path.exists(target) and not args.overwrite:
        sys.exit(f"error: {target!r} exists; pass --overwrite to replace it")
    if not os.path.isfile(args.source):
        sys.exit(f"error: the checkpoint {args.source!r} does not exist or is not a file")
    from keras_coat.utils.files import check_can_create_folder

    try:
        check_can_create_folder(os.path.dirname(os.path.abspath(target)), repr(target))
    except OSError as error:
        sys.exit(f"error: {error}")
    if args.verify and "timm" not in sys.modules:
        sys.exit("error: --verify needs timm and torch: pip install 'keras-coat[conversion]'")

    from keras_coat import create_model
    from keras_coat.checkpoint import CheckpointError, read_state_dict
    from keras_coat.convert import ConversionError, assign_state_dict

    try:
        state_dict = read_state_dict(args.source)
        # A preset is the model users load: pixels in, probabilities out, with the checkpoint's
        # preprocessing and class names (create_model sets them for a published variant).
        publish = args.preset_dir is not None
        model = create_model(
            args.model,
            input_shape=(*args.input_size, 3),
            include_preprocessing=publish,
            classifier_activation="softmax" if publish else None,
        )
        assign_state_dict(model, state_dict)
    except (CheckpointError, ConversionError) as error:
        sys.exit(_one_line(f"error: {args.source}: {error}"))
    except OSError as error:  # unreadable source
        sys.exit(_one_line(f"error: {args.source}: {error}"))
    print(f"converted {len(state_dict)} tensors into {args.model} "
          f"({model.count_params():,} parameters)")

    if args.verify:
        difference = verify_against_reference(
            model, state_dict, args.model, args.input_size, args.batch
        )
        print(f"verify: largest absolute logit difference vs timm = {difference:.3e} "
              f"(tolerance {args.tolerance:g})")
        if not difference <= args.tolerance:
            sys.exit("error: the converted model does not match the reference; nothing written")

    try:
        if publish:
            model.save_to_preset(args.preset_dir)
        else:
            save_weights_atomically(model, args.output)
    except (OSError, ValueError) as error:  # disk full, folder removed meanwhile, ...
        sys.exit(_one_line(f"error: cannot write {target!r}: {error}"))
    print(f"wrote {target}")
    return 0


def _one_line(message):
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
