"""Measure a classifier: top-1, top-5, loss and images per second, with its own preprocessing.

    python -m training.evaluate PRESET --data folder:DIR | tfds:NAME[:SPLIT] | digits
        [--batch-size 64] [--output results.json]

PRESET is a preset reference, as `keras_coat.CoaTImageClassifier.from_preset` takes it: a
built-in name (coat_lite_small, ...), or a preset directory such as the OUTPUT/preset of a
`training.train` run. Every image gets the model's own evaluation transform
(`model.preprocessing`: bicubic resize so that the crop is `crop_pct` of it, centre crop to
`image_size`), as timm's validate.py evaluates a checkpoint with its pretrained_cfg.

Data (`keras_coat.datasets.load_held_out`):

  folder:DIR         class subfolders, as timm's ImageFolder reads them (ImageNet's
                     validation set: DIR/<wnid>/*.JPEG); of a train/val tree, DIR/val (or
                     DIR/validation); otherwise every image under DIR's class folders
  tfds:NAME[:SPLIT]  a prepared TFDS dataset: tfds:imagenet2012 is ImageNet's validation split
                     (--data-dir, --manual-dir as training.train's); default split validation
  digits             the 360 held-out scans of training's digits dataset

Classes are matched by name: a data class is the model's class of that name, or, for a model of
the 1000 ImageNet classes, the class of that WordNet id (n01440764, ...), as timm's folders and
TFDS' imagenet2012 name them. A folder holding some of the classes is scored against the full
head; a data class the model does not know is an error. A model without class names is matched
by position, if it has as many classes as the data.

Prints a progress bar on stderr, then the results as JSON on stdout (and into --output): top1
and top5 in percent (timm's convention), loss (the mean cross-entropy of the model's
probabilities, as Keras' CategoricalCrossentropy computes it), images, images_per_second (the
whole evaluation: reading, decoding, transform and model, the first batch's compilation
included), the preset, the data and the preprocessing.
"""

import argparse
import contextlib
import json
import sys
import time
import types

import numpy as np

# Keras' CategoricalCrossentropy clips probabilities to [EPSILON, 1 - EPSILON] before the log.
EPSILON = 1e-7
TOP_K = 5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Top-1, top-5, loss and images per second of a CoaT classifier on labelled "
        "images, with the preset's own preprocessing.",
    )
    parser.add_argument("preset", metavar="PRESET", help="a preset name or directory")
    parser.add_argument(
        "--data", required=True, metavar="DATA", help="folder:DIR, tfds:NAME[:SPLIT] or digits"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--output", metavar="FILE", help="also write the results (JSON) here")
    parser.add_argument("--data-dir", help="TFDS data_dir")
    parser.add_argument("--manual-dir", help="TFDS manual_dir (imagenet2012's archives)")
    parser.add_argument(
        "--verbose", type=int, default=1, choices=(0, 1), help="progress bar (default 1)"
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        results = evaluate(
            args.preset, args.data, args.batch_size, args.data_dir, args.manual_dir,
            args.verbose,
        )  # fmt: skip
        if args.output:
            from training.callbacks import write_json

            write_json(args.output, results)
    except (ValueError, OSError) as error:
        raise SystemExit("error: " + " ".join(str(error).split())) from None
    print(json.dumps(results, indent=2))
    return results


def evaluate(preset, data, batch_size=64, data_dir=None, manual_dir=None, verbose=1):
    """The results (see the module docstring) of the classifier `preset` on `data`."""
    import keras
    import tensorflow as tf

    import keras_coat
    from keras_coat import datasets
    from training import data as data_lib

    if batch_size < 1:
        raise ValueError(f"The batch size must be positive; received {batch_size}.")
    model = keras_coat.CoaTImageClassifier.from_preset(preset)
    preprocessing = check_evaluable(model, preset)
    size = preprocessing.image_size[0]
    split, data_classes, data_name = datasets.load_held_out(data, size, data_dir, manual_dir)
    model_classes, matched_by = match_classes(data_classes, model)
    # The data's labels, as indices of the model's classes.
    table = tf.constant(model_classes, tf.int64)
    split = data_lib.Split(
        split.records.map(lambda r: {**r, "label": tf.gather(table, r["label"])}),
        split.num_examples,
        split.decode,
        split.encoded,
    )
    source = data_lib.Source(
        data_name, None, split, list(model.class_names or range(model.num_classes))
    )
    settings = types.SimpleNamespace(
        batch_size=batch_size, image_size=size, eval_crop_pct=preprocessing.crop_pct,
        eval_crop_mode=preprocessing.crop_mode,
    )
    batches = data_lib.eval_dataset(settings, source)
    steps = int(batches.cardinality())

    totals = np.zeros(3)  # top-1 hits, top-5 hits, summed loss
    k = min(TOP_K, model.num_classes)
    progress = keras.utils.Progbar(steps, verbose=verbose, stateful_metrics=["top1", "top5"])
    started = time.perf_counter()
    try:
        for step, (images, labels, weights) in enumerate(batches.as_numpy_iterator(), start=1):
            real = weights > 0  # the last batch is padded with weight-0 images
            outputs = np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(images)))
            totals += batch_results(outputs[real], labels[real].argmax(-1), model.activation, k)
            seen = min(step * batch_size, split.num_examples)
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the results only
                progress.update(
                    step,
                    [("top1", 100 * totals[0] / seen), ("top5", 100 * totals[1] / seen)],
                )
    except tf.errors.OpError as error:  # an image tf.data cannot read or decode
        raise ValueError(
            f"An image of {data_name} cannot be read: {error.message}"
            + "".join(f" ({path})" for path in _first_unreadable(split))
        ) from None
    seconds = time.perf_counter() - started
    count = split.num_examples
    return {
        "preset": str(preset),
        "data": data_name,
        "images": count,
        "top1": 100 * totals[0] / count,
        "top5": 100 * totals[1] / count,
        "top5_k": k,
        "loss": totals[2] / count,
        "images_per_second": count / seconds,
        "seconds": seconds,
        "batch_size": batch_size,
        "classes": model.num_classes,
        "data_classes": len(data_classes),
        "classes_matched_by": matched_by,
        "preprocessing": preprocessing.get_config(),
        "backend": keras.backend.backend(),
    }


def _first_unreadable(split):
    """[the path of the first file of `split` that does not decode], or [] for records that are
    no files. Only called after a failure, to name the file."""
    import tensorflow as tf

    for record in split.records:
        if "path" not in record:
            return []
        try:
            split.decode(record)
        except tf.errors.OpError:
            return [record["path"].numpy().decode()]
    return []


def check_evaluable(model, preset):
    """The model's preprocessing, once the model is one this command can measure."""
    if model.num_classes is None:
        raise ValueError(f"The preset {preset!r} is headless (no classes); nothing to evaluate.")
    if model.activation not in ("softmax", None):
        raise ValueError(
            f"The preset {preset!r} outputs {model.activation!r}; evaluation needs softmax "
            "probabilities or logits."
        )
    preprocessing = model.preprocessing
    if preprocessing.interpolation != "bicubic":
        raise ValueError(
            f"The preset {preset!r} resizes with {preprocessing.interpolation!r} interpolation; "
            "the evaluation transform resizes bicubic only."
        )
    height, width = preprocessing.image_size
    if height != width:
        raise ValueError(
            f"The preset {preset!r} takes {height}x{width} images; the evaluation transform "
            "crops squares only."
        )
    return preprocessing


def match_classes(data_classes, model):
    """``(model class index of each data class, "name" | "wordnet id" | "position")``."""
    from keras_coat import imagenet

    names = model.class_names
    imagenet_head = model.num_classes == imagenet.NUM_CLASSES
    if names is None:
        if imagenet_head:
            names = imagenet.class_names()
        elif len(data_classes) == model.num_classes:
            return list(range(model.num_classes)), "position"
        else:
            raise ValueError(
                f"The model carries no class names, and its {model.num_classes} classes cannot "
                f"be matched with the data's {len(data_classes)}."
            )
    index = {}
    for i, name in enumerate(names):
        index.setdefault(name, []).append(i)
    wordnet = imagenet_head and list(names) == list(imagenet.class_names())
    if wordnet:
        for i, wnid in enumerate(imagenet.class_wnids()):
            index.setdefault(wnid, []).append(i)
    matched, unknown, ambiguous = [], [], []
    for name in data_classes:
        hits = index.get(name, [])
        if len(hits) == 1:
            matched.append(hits[0])
        else:
            (ambiguous if hits else unknown).append(name)
    if unknown:
        known = ", ".join(repr(n) for n in names[:5])
        raise ValueError(
            f"The data has {len(unknown)} class(es) the model does not know: "
            f"{', '.join(repr(n) for n in unknown[:5])}{', ...' if len(unknown) > 5 else ''}. "
            f"Classes are matched by name{' or ImageNet WordNet id' if wordnet else ''}; the "
            f"model's {len(names)} classes are {known}{', ...' if len(names) > 5 else ''}."
        )
    if ambiguous:
        raise ValueError(
            f"The model has several classes named {ambiguous[0]!r}; name the data's classes "
            f"{'by WordNet id (n01440764, ...)' if wordnet else 'uniquely'}."
        )
    by_wordnet = wordnet and any(name not in names for name in data_classes)
    return matched, "wordnet id" if by_wordnet else "name"


def batch_results(outputs, labels, activation, k):
    """``[top-1 hits, top-k hits, summed cross-entropy]`` of one batch of model outputs.

    As Keras' metrics count them: top-1 by the first largest probability, top-k with ties in
    the label's favour (in_top_k); the loss clipped as CategoricalCrossentropy clips.
    """
    outputs = outputs.astype(np.float64)
    if activation is None:  # logits
        outputs = np.exp(outputs - outputs.max(axis=-1, keepdims=True))
    probabilities = outputs / outputs.sum(axis=-1, keepdims=True)
    rows = np.arange(len(labels))
    label_probability = probabilities[rows, labels]
    top1 = np.sum(probabilities.argmax(-1) == labels)
    topk = np.sum((probabilities > label_probability[:, None]).sum(-1) < k)
    loss = -np.log(np.clip(label_probability, EPSILON, 1 - EPSILON)).sum()
    return np.array([top1, topk, loss])


if __name__ == "__main__":
    main()
