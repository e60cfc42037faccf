"""Train a CoaT classifier.

    python -m training.train --model coat_lite_tiny --dataset NAME --output-dir DIR

One entry point for every setting: a recipe (`--recipe imagenet|finetune|transfer|demo`, see
`training.recipes`) plus command-line overrides, on either Keras engine: TensorFlow with any
tf.distribute strategy (`training.engine_tf`), or JAX with keras.distribution data parallelism
over devices and processes (`training.engine_jax`); KERAS_BACKEND or --backend picks. Mixed
precision and XLA on both. Rerunning the same command with the same `--output-dir` resumes an
interrupted run from its last backup (model, optimizer, schedule step, epoch). A second run on a
DIR in use is refused; SIGTERM saves a backup after the step in progress and exits with status
75; backups carry SHA-256 checksums, and a damaged one is reported and replaced by the previous
one (training.faults). Outputs in DIR:

  recipe.json        the resolved recipe (a resume must use the same one)
  backup/            the newest two backups (training.faults), removed when the run completes
  last.keras         the model after the latest epoch (the final model once complete)
  best.keras         the model of the epoch with the best validation accuracy
  training_log.csv   one row per epoch; logs/ TensorBoard
  metrics.json       val_accuracy, val_loss, epochs_completed, images_per_second, ...
  preset/            the final model as a preset directory (CoaTImageClassifier.from_preset,
                     --model of python -m keras_coat, training.evaluate): the data's class
                     names, the evaluation preprocessing, the metrics in metadata.json
  export/1/          TensorFlow SavedModel for serving (keras_coat.export, from either engine)

Every model the run writes carries the data's class names and the evaluation preprocessing its
validation used (image size, crop fraction).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time

import keras

from keras_coat.utils.files import check_can_create_folder
from training import faults
from training import recipes as recipes_lib
from training.callbacks import read_json, write_json

BACKENDS = ("tensorflow", "jax")

BACKUP_METADATA = "training_metadata.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        # Not argparse's list of every option: an error then stays two short lines.
        usage="%(prog)s --output-dir DIR [--recipe NAME] [options] (see --help)",
        description=__doc__.split("\n\n")[2],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument("--recipe", choices=recipes_lib.RECIPE_NAMES, default="imagenet")
    run.add_argument(
        "--model",
        help=f'a keras_coat variant, e.g. coat_lite_tiny, or "{recipes_lib.PRESET_MODEL}": the '
        "architecture of the --init-weights preset (default: the recipe's)",
    )
    run.add_argument(
        "--model-config",
        type=json.loads,
        help="JSON keyword arguments of keras_coat.CoaT for a custom architecture "
        '(e.g. \'{"embed_dims": [16, 16, 16, 16], "serial_depths": [1, 1, 1, 1], '
        '"mlp_ratios": [2, 2, 2, 2]}\'); replaces --model',
    )
    run.add_argument("--data-dir", help="TFDS data_dir")
    run.add_argument("--manual-dir", help="TFDS manual_dir (imagenet2012's archives)")
    run.add_argument("--output-dir", required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--deterministic",
        action="store_true",
        help="TensorFlow op determinism: bitwise-reproducible runs, resumed or not",
    )
    run.add_argument("--steps-per-epoch", type=int, help="cap on training steps per epoch")
    run.add_argument(
        "--verbose", type=int, default=1, choices=(0, 1, 2), help="Keras fit verbosity"
    )
    run.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    run.add_argument(
        faults.RESTART_FLAG,
        action="store_true",
        help="when no intact backup is left to resume from, start the run over from its first "
        "epoch (the damaged backups are moved aside) instead of stopping",
    )
    run.add_argument(
        "--backend",
        choices=BACKENDS,
        help="the Keras engine (default: KERAS_BACKEND, else Keras' configured backend)",
    )

    from training import engine_jax, engine_tf

    devices = parser.add_argument_group("devices")
    engine_tf.add_device_arguments(devices)
    engine_jax.add_process_arguments(
        parser.add_argument_group("processes (JAX engine; TensorFlow reads TF_CONFIG)")
    )
    devices.add_argument(
        "--jit-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="XLA-compile the train step (default: Keras' choice, on for GPUs, off for CPUs)",
    )

    recipes_lib.add_override_arguments(
        parser.add_argument_group(
            "recipe overrides",
            "each replaces the recipe's value (training/recipes.py); an optional feature "
            '(FLOAT|none) is switched off by "none" or the value its help names',
        )
    )
    return parser.parse_args(argv)


def resolve_recipe(args):
    """The recipe named by --recipe for --model, with the command line's overrides."""
    recipe = recipes_lib.get_recipe(args.recipe, args.model)
    changes = recipes_lib.command_line_overrides(args)
    if args.model_config is not None:
        changes["model"] = "custom"
    recipe = recipes_lib.override(recipe, changes)
    recipes_lib.check_complete(recipe)
    return recipe


def build_model(recipe, num_classes, model_config=None):
    """The recipe's CoaT classifier (softmax outputs, pixels in [0, 255]) for `num_classes`."""
    import keras_coat
    from keras_coat.imagenet import NUM_CLASSES

    kwargs = dict(
        input_shape=(recipe.image_size, recipe.image_size, 3),
        classes=num_classes,
        classifier_activation="softmax",
        include_preprocessing=True,
        drop_path_rate=recipe.drop_path,
    )
    if model_config is not None:
        return keras_coat.CoaT(**model_config, weights=recipe.init_weights, **kwargs)
    if recipe.model == recipes_lib.PRESET_MODEL:
        # The preset's architecture and weights, with a new head for this data's classes.
        features = keras_coat.CoaTImageClassifier.from_preset(
            recipe.init_weights,
            image_shape=kwargs["input_shape"],
            drop_path_rate=recipe.drop_path,
            num_classes=None,
            include_preprocessing=True,
        )
        return features.with_new_head(num_classes, activation="softmax")
    if recipe.init_weights is None:
        return keras_coat.create_model(recipe.model, **kwargs)
    if recipe.init_weights != "imagenet" or num_classes == NUM_CLASSES:
        return keras_coat.create_model(recipe.model, weights=recipe.init_weights, **kwargs)
    # New label set: the ImageNet preset's features with a fresh head.
    size = (recipe.image_size, recipe.image_size)
    return keras_coat.CoaTImageClassifier.from_preset(
        keras_coat.presets.checkpoint_for(recipe.model, size).name,
        image_shape=(*size, 3),
        drop_path_rate=recipe.drop_path,
        num_classes=num_classes,
        activation="softmax",
        include_preprocessing=True,
        name=recipe.model,
    )


def model_text(recipe):
    if recipe.model == recipes_lib.PRESET_MODEL:
        return f"the preset {recipe.init_weights} with a new head"
    return recipe.model


def compile_model(model, recipe, steps_per_epoch, jit_compile=None):
    import keras

    from training import optim

    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if model.output_shape[-1] > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5_accuracy"))
    model.compile(
        optimizer=optim.build_optimizer(recipe, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
        weighted_metrics=metrics,
        jit_compile="auto" if jit_compile is None else jit_compile,
    )
    return model


class SetupError(ValueError):
    """The run cannot start: a bad argument, dataset, model or output directory."""


def read_run_file(path):
    """A JSON file of the run (None if absent); SetupError if it is damaged."""
    try:
        return read_json(path)
    except (ValueError, UnicodeDecodeError) as error:
        raise SetupError(
            f"{path} is damaged ({error}); delete it to start the run over, or use a new "
            "--output-dir."
        ) from None


def backed_up_epoch(backup_dir):
    """The epoch a BackupAndRestore backup in `backup_dir` resumes at (0 without backup)."""
    path = os.path.join(backup_dir, BACKUP_METADATA)
    metadata = read_run_file(path)
    if metadata is None:
        return 0
    try:
        return int(metadata["epoch"])
    except (TypeError, KeyError, ValueError):
        raise SetupError(
            f"{path} holds no epoch number; delete {backup_dir} to start the run over."
        ) from None


def check_same_recipe(path, recipe, resuming):
    """A resumed run must use the recipe it started with.

    A recipe.json without training state to resume (a start that failed before its first
    backup) binds nothing: the corrected command replaces it.
    """
    current = json.loads(json.dumps(recipe.to_dict()))  # tuples -> lists, as stored
    if not resuming:
        return current
    previous = read_run_file(path)
    if previous is not None and previous != current:
        keys = set(previous) | set(current)
        changed = sorted(k for k in keys if previous.get(k) != current.get(k))
        details = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise SetupError(
            f"{path} records a different recipe ({details}). Resume with the same settings or "
            "use a new --output-dir."
        )
    return current


def make_callbacks(
    recipe, work_dir, global_batch, steps, metrics_path, seed, resume=None, agree=None
):
    """The run's callbacks and its MetricsWriter. `resume`: the backup to restore
    (faults.find_backup); `agree`: for several processes, faults.StopOnSignal's agreement."""
    import keras

    from training.callbacks import MetricsWriter, ReseedModelRandomness

    previous = read_json(metrics_path) or {}
    best = previous.get("best_val_accuracy")
    metrics_writer = MetricsWriter(metrics_path, recipe.epochs, global_batch, previous)
    # First, so that the restored epoch and weights are in place for everyone else.
    # Kept after fit until the run's outputs are written (main removes it).
    backup = faults.CheckedBackupAndRestore(
        os.path.join(work_dir, "backup"), recipe.backup_every, resume, delete_checkpoint=False
    )
    reseed = (
        ReseedModelRandomness(seed, resume.epoch, resume.random_states)
        if resume is not None and resume.steps
        else ReseedModelRandomness(seed)
    )
    callbacks = [backup, faults.StopOnSignal(backup, agree=agree), reseed]
    if recipe.ema_momentum is not None:
        # Validation and the epoch's checkpoints see the EMA weights, as the reference evaluates
        # its EMA model. After BackupAndRestore, so backups keep the raw weights to resume from.
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    callbacks += [
        metrics_writer,
        keras.callbacks.ModelCheckpoint(os.path.join(work_dir, "last.keras")),
        keras.callbacks.ModelCheckpoint(
            os.path.join(work_dir, "best.keras"),
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            initial_value_threshold=best,
        ),
        keras.callbacks.CSVLogger(os.path.join(work_dir, "training_log.csv"), append=True),
        keras.callbacks.TensorBoard(os.path.join(work_dir, "logs")),
    ]
    return callbacks, metrics_writer


@contextlib.contextmanager
def refuse_setup_errors():
    """Ordinary mistakes before training starts (arguments, dataset, model, output directory,
    damaged run files) end the process with one line on stderr, exit status 1, no traceback."""
    try:
        yield
    except (ValueError, OSError, TypeError) as error:
        raise SystemExit("error: " + " ".join(str(error).split())) from None


def select_backend(args, argv):
    """Runs the command on the backend --backend names: Keras picks its backend once, at import,
    so a command line that asks for another one is run again with KERAS_BACKEND set."""
    if args.backend is None or args.backend == keras.backend.backend():
        return
    if argv is not None:  # called in process: this interpreter's Keras cannot switch
        raise SetupError(
            f"--backend {args.backend}: this process runs Keras on "
            f"{keras.backend.backend()!r}; set KERAS_BACKEND={args.backend} before Keras is "
            "imported."
        )
    sys.stdout.flush()
    env = {**os.environ, "KERAS_BACKEND": args.backend}
    os.execve(sys.executable, [sys.executable, "-m", "training.train", *sys.argv[1:]], env)


def start_engine(args):
    """The engine of the running Keras backend, its devices and processes set up (before
    anything runs on them)."""
    backend = keras.backend.backend()
    if backend == "jax":
        from training import engine_jax as engine_lib
    elif backend == "tensorflow":
        from training import engine_tf as engine_lib
    else:
        raise SetupError(
            f"Training runs on the {' or '.join(BACKENDS)} backend; Keras runs on {backend!r}."
        )
    return engine_lib.start(args, args.seed, args.deterministic)


class LostProcess(Exception):
    """Another process of the job stopped, so this one cannot go on; the message says so."""


def main(argv=None):
    args = parse_args(argv)
    with refuse_setup_errors():
        select_backend(args, argv)
    with contextlib.ExitStack() as held:  # the output directory's lock, until the run ends
        return _train(args, held)


def _train(args, held):
    with refuse_setup_errors():
        recipe = resolve_recipe(args)
        check_can_create_folder(args.output_dir, f"--output-dir {args.output_dir!r}")

        # Devices first: nothing may touch the backend's runtime before this.
        engine = start_engine(args)
        recipes_lib.set_precision(recipe.mixed_precision)
        chief = engine.chief
        # Non-chief workers write the same files, to a private directory.
        work_dir = (
            args.output_dir
            if chief
            else os.path.join(args.output_dir, "workers", engine.worker_name)
        )
        metrics_path = os.path.join(work_dir, "metrics.json")
        say = print if chief else (lambda *a, **k: None)
        held.enter_context(
            faults.OutputDirLock(
                args.output_dir,
                engine.worker_name,
                f"--output-dir {args.output_dir!r}",
            )
        )

        previous = read_run_file(metrics_path)
        if previous and previous.get("status") == "complete":
            say(
                f"{args.output_dir} holds a completed run ({previous.get('epochs_completed')} "
                f"epochs, val_accuracy {previous.get('val_accuracy')}); nothing to do. Use a new "
                "--output-dir to train again."
            )
            return previous
        backup_dir = os.path.join(work_dir, "backup")
        log_path = os.path.join(work_dir, "training_log.csv")
        resume = faults.find_backup(
            backup_dir, args.restart_on_damaged_backup, (metrics_path, log_path), say
        )
        start_epoch = resume.epoch if resume else 0
        # Processes that resumed from different steps would wait for each other for ever.
        engine.check_same_everywhere(
            [start_epoch, resume.steps if resume else 0], "the backup to resume from"
        )
        previous = read_run_file(metrics_path)  # set aside if the run starts over
        resuming = resume is not None or bool(previous and previous.get("epochs_completed"))
        recipe_path = os.path.join(work_dir, "recipe.json")
        recorded_recipe = check_same_recipe(recipe_path, recipe, resuming)

        from training import data

        source = data.load_source(
            recipe.dataset, recipe.image_size, args.data_dir, args.manual_dir
        )
        steps = data.steps_per_epoch(recipe, source, args.steps_per_epoch)
        shard = dict(process_index=engine.process_index, num_processes=engine.num_processes)
        # A backup taken within an epoch (after step k) resumes in two `fit` calls: the rest of
        # that epoch (its batches k+1.., `steps - k` steps), then the epochs after it. One
        # dataset of (rest, whole epochs) in a single fit cannot do it: Keras' epochs all have
        # `steps_per_epoch` steps, so every later epoch would end k steps into the next one's
        # data, with validation, checkpoints, EMA swaps and the log rows at the wrong places.
        # Two fits keep Keras' epoch numbering (initial_epoch) and every callback's per-epoch
        # work; the callbacks carry their state from one fit to the next.
        within_epoch = resume.steps if resume else 0
        fits = [  # (dataset, first epoch, end epoch, steps per epoch)
            (
                data.train_dataset(
                    recipe, source, args.seed, start_epoch, args.steps_per_epoch, **shard,
                    start_step=within_epoch, end_epoch=start_epoch + 1,
                ),
                start_epoch, start_epoch + 1, steps - within_epoch,
            )
        ] if within_epoch else []  # fmt: skip
        first_whole = start_epoch + 1 if within_epoch else start_epoch
        # Called even with no epoch left when it is the only fit: its start restores the backup
        # (a run stopped after its last epoch, before evaluation and export).
        if first_whole < recipe.epochs or not fits:
            whole_epochs = data.train_dataset(
                recipe, source, args.seed, first_whole, args.steps_per_epoch, **shard
            )
            fits.append((whole_epochs, first_whole, recipe.epochs, steps))
        val_ds = data.eval_dataset(recipe, source, **shard)

        replicas = engine.replicas
        say(
            f"{engine.describe()}, global batch "
            f"{recipe.batch_size} ({recipe.batch_size / replicas:g} per replica), precision "
            f"{recipe.mixed_precision}.\nRecipe {recipe.name}: {model_text(recipe)} at "
            f"{recipe.image_size}px on {source.name} ({source.train.num_examples} train / "
            f"{source.validation.num_examples} held-out images, {source.num_classes} classes), "
            f"{recipe.epochs} epochs x {steps} steps, peak lr {recipe.peak_lr:.3g}.\n"
            "Training pipeline: "
            + " -> ".join(data.TrainTransform(recipe, source.num_classes).step_names)
        )
        if resume:
            say(
                f"Resuming from epoch {start_epoch}: backup {resume.path} "
                f"({resume.position_text()}, SHA-256 verified)"
                + (
                    f"; epoch {start_epoch + 1} continues at step {resume.steps + 1} of {steps}."
                    if resume.steps
                    else "."
                )
            )

        with engine.scope():
            model = build_model(recipe, source.num_classes, args.model_config)
            describe_data(model, source.class_names, recipe)
            compile_model(model, recipe, steps, args.jit_compile)
            engine.prepare(model, val_ds)
        # Only now, with everything checked, does the run leave files behind.
        os.makedirs(work_dir, exist_ok=True)
        write_json(recipe_path, recorded_recipe)

    callbacks, metrics_writer = make_callbacks(
        recipe, work_dir, recipe.batch_size, steps, metrics_path, args.seed, resume, engine.agree
    )
    started = time.time()
    try:
        for train_ds, first_epoch, end_epoch, fit_steps in fits:
            model.fit(
                train_ds,
                initial_epoch=first_epoch,
                epochs=end_epoch,
                steps_per_epoch=fit_steps,
                validation_data=val_ds,
                callbacks=callbacks,
                shuffle=False,  # the pipeline shuffles, per epoch and seed
                verbose=args.verbose if chief else 0,
            )
    except faults.Preempted as stop:
        say(stop)
        raise SystemExit(faults.PREEMPTED_EXIT_STATUS) from None
    except Exception as error:
        last = metrics_writer.last_step_end
        lost = engine.lost_process_message(
            error, None if last is None else time.perf_counter() - last
        )
        if lost is None:
            raise
        raise LostProcess(lost) from error
    # With EMA, fit ends with the averaged weights in the model: measure, save and export those.
    final = model.evaluate(val_ds, verbose=0, return_dict=True)
    model.save(os.path.join(work_dir, "last.keras"))
    metrics = metrics_writer.finish(final)
    metrics["train_seconds_this_session"] = round(time.time() - started, 1)

    if chief:
        metrics["preset_dir"] = save_preset(model, args.output_dir, recipe, source, metrics)
    if chief and not args.no_export:
        export_dir = os.path.join(args.output_dir, "export")
        metrics["export_dir"] = export(model, export_dir)
    write_json(metrics_path, metrics)
    shutil.rmtree(backup_dir, ignore_errors=True)  # the run is complete: nothing to resume
    say(
        f"Done: val_accuracy {metrics['val_accuracy']:.4f}, val_loss {metrics['val_loss']:.4f} "
        f"after {metrics['epochs_completed']} epochs; {metrics['images_per_second']:.1f} "
        f"images/s. Outputs in {args.output_dir}."
    )
    return metrics


def describe_data(model, class_names, recipe):
    """Makes `model` carry its data's class names and the evaluation preprocessing of the
    run's validation, so that every file the run writes says how to feed and read it."""
    model.class_names = list(class_names)
    model.preprocessing = dataclasses.replace(
        model.preprocessing,
        image_size=(recipe.image_size, recipe.image_size),
        crop_pct=recipe.eval_crop_pct,
    )


def save_preset(model, output_dir, recipe, source, metrics):
    """Writes the trained model as the preset directory output_dir/preset, with the run's
    validation results in its metadata.json; returns its path."""
    from keras_coat import preset_io

    path = os.path.join(output_dir, "preset")
    results = {k: metrics[k] for k in ("val_accuracy", "val_top5_accuracy", "val_loss")
               if metrics.get(k) is not None}  # fmt: skip
    folder = recipe.dataset.startswith("folder:")
    preset_io.save_to_preset(model, path, metadata={
        "training": {
            "recipe": recipe.name,
            "dataset": "folder:" + _public_name(recipe.dataset[7:]) if folder else recipe.dataset,
            "init_weights": _public_name(recipe.init_weights),
            "epochs": metrics["epochs_completed"],
        },
        "metrics": {**results, "held_out_images": source.validation.num_examples},
    })  # fmt: skip
    return path


def _public_name(reference):
    """A local path by its last part only (a preset may be published, its metadata with it)."""
    if reference is None or not (os.sep in reference or os.path.exists(reference)):
        return reference
    return os.path.basename(os.path.normpath(reference))


def export(model, export_dir):
    """Writes the SavedModel export_dir/1 of the trained model (from a TensorFlow child process
    on JAX, keras_coat.export); returns its path."""
    from keras_coat.export import export_saved_model

    return export_saved_model(model, export_dir, version=1, overwrite=True)


if __name__ == "__main__":
    try:
        main()
    except LostProcess as lost:
        sys.stdout.flush()
        print(lost, file=sys.stderr, flush=True)
        # Not SystemExit: at exit JAX's distributed runtime would wait in its shutdown barrier
        # for the lost process until the heartbeat timeout, then abort with a C++ stack trace.
        os._exit(1)
    sys.exit(0)
