"""Train a KerasHub RetinaNet on a CoaT-Lite Tiny backbone to find handwritten digits.

    python -m training.detect --output-dir DIR [--epochs N] [--batch-size B] [--seed S]

The data are built on the fly (`training.detection`): 128x128 canvases holding 1-4 of
scikit-learn's digit scans at random sizes and positions, with exact boxes and labels. Training
canvases use the training scans only; the held-out canvases, on which the detector is measured
with pycocotools, use only the held-out scans. Rerunning the same command with the same
`--output-dir` resumes an interrupted run. Outputs in DIR:

  recipe.json       the run's settings (a resume must use the same ones)
  backup/           BackupAndRestore state, removed once training completes
  detector.keras    the trained RetinaNetObjectDetector (`keras.saving.load_model`)
  metrics.json      map (mAP@[.5:.95]) and map50 (mAP@0.5) on the held-out canvases, seconds, ...
  detections.png    held-out canvases: true boxes beside the detections
  training_log.csv  one row per epoch
"""

import argparse
import dataclasses
import os
import sys
import time

from keras_coat.utils.files import check_can_create_folder, write_atomically
from training import detection, train
from training import engine_tf as strategy_lib
from training.callbacks import write_json

# Multi-worker training would need the classifier's batch-building workaround
# (strategy.prepare_multi_worker_fit) adapted to dict targets; it is not offered here.
STRATEGIES = tuple(s for s in strategy_lib.STRATEGIES if s != "multi_worker")
RELOAD_CHECK_CANVASES = 8


def parse_args(argv=None):
    defaults = detection.DetectionRecipe()
    parser = argparse.ArgumentParser(
        prog="python -m training.detect",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="global, over all replicas"
    )
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument(
        "--train-canvases", type=int, default=defaults.train_canvases, help="new ones each epoch"
    )
    parser.add_argument("--held-out-canvases", type=int, default=defaults.held_out_canvases)
    parser.add_argument(
        "--init-weights",
        help="backbone weights to start from: a CoaT-Lite Tiny .keras classifier (make demo's "
        "demo-output/last.keras), a .weights.h5 file or 'imagenet' (default: random)",
    )
    parser.add_argument("--show", type=int, default=8, help="held-out canvases in the picture")
    strategy_lib.add_device_arguments(parser, STRATEGIES)
    parser.add_argument(
        "--deterministic", action="store_true", help="TensorFlow op determinism"
    )
    parser.add_argument("--verbose", type=int, default=2, choices=(0, 1, 2))
    return parser.parse_args(argv)


def resolve_recipe(args):
    changes = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        train_canvases=args.train_canvases,
        held_out_canvases=args.held_out_canvases,
        init_weights=args.init_weights,
    )
    recipe = dataclasses.replace(detection.DetectionRecipe(), **changes)
    if recipe.init_weights not in (None, "imagenet") and not os.path.isfile(recipe.init_weights):
        raise train.SetupError(f"--init-weights: no file {recipe.init_weights!r}.")
    return recipe


def train_detector(recipe, args, work_dir, strategy, metrics_path):
    """Trains (or resumes training) and saves DIR/detector.keras; returns (detector, metrics)."""
    import keras

    from training.callbacks import MetricsWriter

    source = detection.CanvasSource(recipe)
    backup_dir = os.path.join(work_dir, "backup")
    start_epoch = train.backed_up_epoch(backup_dir)
    dataset = source.train_dataset(args.seed, start_epoch)
    with train.refuse_setup_errors(), strategy.scope():
        detector = detection.build_detector(recipe, recipe.init_weights)
        detection.compile_detector(detector, recipe)
    if start_epoch:
        print(f"Resuming from epoch {start_epoch} (backup in {backup_dir}).")
    writer = MetricsWriter(
        metrics_path, recipe.epochs, recipe.batch_size, train.read_run_file(metrics_path),
    )
    callbacks = [
        # First, so that the restored epoch and weights are in place for everyone else.
        keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch", double_checkpoint=True),
        writer,
        keras.callbacks.CSVLogger(os.path.join(work_dir, "training_log.csv"), append=True),
    ]
    detector.fit(
        dataset,
        epochs=recipe.epochs,
        steps_per_epoch=recipe.steps_per_epoch,
        callbacks=callbacks,
        shuffle=False,  # the canvases are drawn per (seed, epoch, index)
        verbose=args.verbose,
    )
    metrics = {k: v for k, v in writer.metrics.items() if v is not None and "val_" not in k}
    return detector, metrics


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    with train.refuse_setup_errors():
        recipe = resolve_recipe(args)
        if args.show < 0:
            raise train.SetupError(f"--show must be >= 0, got {args.show}.")
        if args.cpu_replicas < 0:
            raise train.SetupError(f"--cpu-replicas must be >= 0, got {args.cpu_replicas}.")
        check_can_create_folder(args.output_dir, f"--output-dir {args.output_dir!r}")

        # Devices first: nothing may touch TensorFlow's runtime before this.
        strategy_lib.configure_devices(args.cpu_replicas, args.seed, args.deterministic)
        strategy = strategy_lib.make_strategy(args.strategy, args.tpu)
        work_dir = args.output_dir
        metrics_path = os.path.join(work_dir, "metrics.json")
        detector_path = os.path.join(work_dir, "detector.keras")
        picture_path = os.path.join(work_dir, "detections.png")

        previous = train.read_run_file(metrics_path) or {}
        if previous.get("status") == "complete":
            print(
                f"{work_dir} holds a completed run (held-out mAP@[.5:.95] "
                f"{previous.get('map')}, mAP@0.5 {previous.get('map50')}); nothing to do. "
                f"Picture: {picture_path}. Use a new --output-dir to train again."
            )
            return previous
        backup_dir = os.path.join(work_dir, "backup")
        resuming = (os.path.isdir(backup_dir) and bool(os.listdir(backup_dir))) or bool(
            previous.get("epochs_completed")
        )
        recipe_path = os.path.join(work_dir, "recipe.json")
        recorded_recipe = train.check_same_recipe(recipe_path, recipe, resuming)
        os.makedirs(work_dir, exist_ok=True)
        write_json(recipe_path, recorded_recipe)

    import keras
    import numpy as np

    print(
        f"{type(strategy).__name__}: {strategy.num_replicas_in_sync} replica(s). RetinaNet on "
        f"{recipe.backbone} (P{recipe.min_level}-P{recipe.max_level}), "
        f"{recipe.canvas_size}x{recipe.canvas_size} canvases of 1-{recipe.max_digits} digits, "
        f"{recipe.epochs} epochs x {recipe.steps_per_epoch} steps of {recipe.batch_size}, "
        f"backbone from {recipe.init_weights or 'random weights'}."
    )
    if previous.get("status") == "trained" and os.path.isfile(detector_path):
        # Interrupted after training (its backup is gone): evaluate the saved detector.
        detector, metrics = keras.saving.load_model(detector_path, compile=False), previous
    else:
        detector, metrics = train_detector(recipe, args, work_dir, strategy, metrics_path)
        write_atomically(detector_path, detector.save)
        metrics["status"] = "trained"
        write_json(metrics_path, metrics)

    source = detection.CanvasSource(recipe)
    images, true_boxes, true_labels = source.held_out()
    detections = detection.detect(detector, images)
    metrics.update(detection.coco_evaluate(true_boxes, true_labels, detections))
    shown = min(args.show, len(images))
    if shown:
        detection.draw_detections(
            picture_path, images[:shown], true_boxes, true_labels, detections
        )

    # The saved file must give the model that was measured.
    reloaded = keras.saving.load_model(detector_path, compile=False)
    sample = images[:RELOAD_CHECK_CANVASES].astype(np.float32)
    reload_diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            keras.tree.flatten(detector(sample)), keras.tree.flatten(reloaded(sample))
        )
    )
    metrics.update(
        status="complete",
        held_out_canvases=len(images),
        held_out_digits=int(sum(len(b) for b in true_boxes)),
        reload_max_abs_diff=reload_diff,
        detector=detector_path,
        seconds=round(time.time() - started, 1),
    )
    if shown:
        metrics["picture"] = picture_path
    write_json(metrics_path, metrics)
    print(
        f"Held-out mAP@[.5:.95] {metrics['map']:.3f}, mAP@0.5 {metrics['map50']:.3f} on "
        f"{metrics['held_out_canvases']} canvases ({metrics['held_out_digits']} digits); "
        f"{metrics['seconds']:.0f} s. Detector: {detector_path} (reloaded: largest output "
        f"difference {reload_diff:.1e})."
    )
    if shown:
        print(f"Picture of {shown} held-out canvases (truth | detections): {picture_path}")
    return metrics


if __name__ == "__main__":
    main()
    sys.exit(0)
