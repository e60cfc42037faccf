"""End-to-end demo: train CoaT-Lite Tiny on handwritten digits, then classify held-out digits
through the exported SavedModel.

    python -m training.demo [--output-dir demo-output] [--epochs N] [--show 8]

Training uses the `demo` recipe (scikit-learn's 8x8 digit scans upscaled to 32x32, 1,437 training
images) and the same entry point as every other run, so the output directory holds the usual
backup, checkpoints, logs, metrics.json and export/1. Rerunning resumes an interrupted run; a
completed one is reused. The held-out digits then go through the SavedModel's
`serving_default` signature exactly as a serving client would send them.
"""

import argparse
import os

from training import train

ASCII_SHADES = " .:-=+*#%@"
COLUMN = 22  # characters per digit in the printout


def ascii_digit(image):
    """An 8x8 character rendering of a [H, W, 3] image in [0, 255]."""
    height, width = image.shape[:2]
    rows = []
    for y in range(0, height, height // 8):
        row = ""
        for x in range(0, width, width // 8):
            value = image[y : y + height // 8, x : x + width // 8].mean() / 255.0
            row += ASCII_SHADES[min(int(value * len(ASCII_SHADES)), len(ASCII_SHADES) - 1)] * 2
        rows.append(row)
    return rows


def classify_held_out(export_dir, image_size, count):
    """Sends the first `count` held-out digits to the SavedModel.

    Returns ([(true label, predicted name, score, image)], size of the held-out split).
    """
    import numpy as np
    import tensorflow as tf

    from training import data

    source = data.load_source("digits", image_size)
    examples = list(source.validation.records.take(count).as_numpy_iterator())
    images = np.stack([e["image"] for e in examples]).astype(np.float32)
    labels = [int(e["label"]) for e in examples]
    served = tf.saved_model.load(export_dir).signatures["serving_default"]
    outputs = served(images=tf.constant(images))
    names = outputs["class_names"].numpy()[:, 0]
    scores = outputs["scores"].numpy()[:, 0]
    rows = [
        (label, name.decode(), float(score), image)
        for label, name, score, image in zip(labels, names, scores, images)
    ]
    return rows, source.validation.num_examples


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__)
    parser.add_argument("--output-dir", default="demo-output")
    parser.add_argument("--epochs", type=int, help="override the demo recipe's epochs")
    parser.add_argument("--show", type=int, default=8, help="held-out digits to classify")
    args = parser.parse_args(argv)

    train_args = ["--recipe", "demo", "--output-dir", args.output_dir, "--verbose", "2"]
    if args.epochs:
        train_args += ["--epochs", str(args.epochs)]
    metrics = train.main(train_args)

    export_dir = os.path.join(args.output_dir, "export", "1")
    image_size = train.read_json(os.path.join(args.output_dir, "recipe.json"))["image_size"]
    rows, held_out = classify_held_out(export_dir, image_size, args.show)
    print(f"\nHeld-out digits classified by the SavedModel in {export_dir}:")
    for start in range(0, len(rows), 4):
        group = rows[start : start + 4]
        drawings = [ascii_digit(image) for *_, image in group]
        for line in zip(*drawings):
            print("".join(part.ljust(COLUMN) for part in line))
        print(
            "".join(
                f"{label} -> {name} ({score:.0%}){'' if str(label) == name else ' WRONG'}".ljust(
                    COLUMN
                )
                for label, name, score, _ in group
            )
        )
        print()
    correct = sum(str(label) == name for label, name, *_ in rows)
    print(
        f"{correct}/{len(rows)} shown digits right; held-out accuracy over all "
        f"{held_out} digits: {metrics['val_accuracy']:.2%} after "
        f"{metrics['epochs_completed']} epochs."
    )


if __name__ == "__main__":
    main()
