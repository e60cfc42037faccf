"""Train a CoaT model: an image classifier, or a KerasHub RetinaNet detector on a CoaT backbone.

    python -m training.train --output-dir DIR [--task classification|detection] [options]

One entry point for every task and setting: a task (`--task`: a classifier on a data set of
`keras_coat.datasets`, or a detector of handwritten digits on generated canvases,
`training.detection`), its recipe (`--recipe imagenet|finetune|transfer|demo` for classifiers, see
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
  training_log.csv   one row per epoch; logs/ TensorBoard
  metrics.json       the final measurements, epochs_completed, images_per_second, ...
  classification:
    best.keras       the model of the epoch with the best validation accuracy
    preset/          the final model as a preset directory (CoaTImageClassifier.from_preset,
                     --model of python -m keras_coat, training.evaluate): the data's class
                     names, the evaluation preprocessing, the metrics in metadata.json
    export/1/        TensorFlow SavedModel for serving (keras_coat.export, from either engine)
  detection:
    detections.png   held-out canvases: the true boxes beside the detections
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
from training.detection import DetectionTask

BACKENDS = ("tensorflow", "jax")
TASK_NAMES = ("classification", "detection")
LAST = "last.keras"


def parse_args(argv=None):
    task = TASKS[_task_name(argv)]
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        # Not argparse's list of every option: an error then stays two short lines.
        usage="%(prog)s --output-dir DIR [--task NAME] [--recipe NAME] [options] (see --help; "
        "--task detection --help for the detector's options)",
        description=__doc__.split("\n\n")[2],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--task",
        choices=TASK_NAMES,
        default="classification",
        help="an image classifier, or a KerasHub RetinaNet detector on a CoaT backbone",
    )
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
    task.add_arguments(parser.add_argument_group(f"{task.name} task"))

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
            f"each replaces the recipe's value ({task.recipe_module}); an optional feature "
            '(FLOAT|none) is switched off by "none" or the value its help names',
        ),
        task.recipe_type,
    )
    return parser.parse_args(argv)


def _task_name(argv):
    """The --task of a command line (the options offered depend on it)."""
    parser = argparse.ArgumentParser(prog="python -m training.train", add_help=False)
    parser.add_argument("--task", choices=TASK_NAMES, default="classification")
    return parser.parse_known_args(argv)[0].task


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
    """The recipe's CoaT classifier (softmax outputs, pixels in [0, 255]) for `num_classes`.

    `recipe.init_weights`: None (random), "imagenet" (the variant's checkpoint), a weights file
    of the same model, or any preset reference (`keras_coat.loader`), whose architecture the
    model then has, with a new head when its number of classes differs.
    """
    import keras_coat
    from keras_coat.loader import WEIGHT_FILE_SUFFIXES

    init = recipe.init_weights
    kwargs = dict(
        input_shape=(recipe.image_size, recipe.image_size, 3),
        classes=num_classes,
        classifier_activation="softmax",
        include_preprocessing=True,
        drop_path_rate=recipe.drop_path,
    )
    if model_config is not None:
        model = keras_coat.CoaT(**model_config, weights=init, **kwargs)
    elif init is None or init.endswith(WEIGHT_FILE_SUFFIXES):
        if recipe.model == recipes_lib.PRESET_MODEL:
            raise SetupError(
                f"--init-weights {init} is a weights file, which names no architecture; the "
                f"recipe {recipe.name!r} takes it from a preset (a built-in name such as "
                "coat_lite_small, a preset directory, a .keras file or hf://owner/repo)."
            )
        model = keras_coat.create_model(recipe.model, weights=init, **kwargs)
    else:
        if init == "imagenet":
            size = (recipe.image_size, recipe.image_size)
            init = keras_coat.presets.checkpoint_for(recipe.model, size).name
        model = keras_coat.CoaTImageClassifier.from_preset(
            init,
            image_shape=kwargs["input_shape"],
            drop_path_rate=recipe.drop_path,
            num_classes=num_classes,
            activation="softmax",
            include_preprocessing=True,
        )
    # The model carries the evaluation transform it is validated with, for its exports.
    model.preprocessing = dataclasses.replace(
        model.preprocessing,
        image_size=(recipe.image_size, recipe.image_size),
        crop_pct=recipe.eval_crop_pct,
        crop_mode=recipe.eval_crop_mode,
    )
    return model


def check_init_architecture(model, requested, init_weights):
    """A preset given as --init-weights sets the architecture; an explicit --model must agree."""
    from keras_coat.loader import WEIGHT_FILE_SUFFIXES
    from keras_coat.presets import variant_of

    if requested in (None, recipes_lib.PRESET_MODEL) or init_weights in (None, "imagenet"):
        return
    if init_weights.endswith(WEIGHT_FILE_SUFFIXES):
        return
    variant = variant_of(model.backbone.get_config())
    if variant != requested:
        raise SetupError(
            f"--init-weights {init_weights} holds a {variant or 'custom'} CoaT, not the "
            f"--model {requested}; leave --model out to train the preset's architecture."
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


def check_same_recipe(path, recipe, resuming):
    """A resumed run must use the recipe it started with.

    A recipe.json without training state to resume (a start that failed before its first
    backup) binds nothing: the corrected command replaces it.
    """
    current = json.loads(json.dumps(recipe.to_dict()))  # tuples -> lists, as stored
    if not resuming:
        return current
    previous = read_run_file(path)
    if previous is not None:
        # A field added since the run started reads as its default.
        defaults = {
            f.name: json.loads(json.dumps(f.default))
            for f in dataclasses.fields(recipe)
            if f.default is not dataclasses.MISSING
        }
        previous = {**{k: v for k, v in defaults.items() if k in current}, **previous}
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
    recipe,
    work_dir,
    global_batch,
    steps,
    metrics_path,
    seed,
    resume=None,
    agree=None,
    best_metric="val_accuracy",
):
    """The run's callbacks and its MetricsWriter. `resume`: the backup to restore
    (faults.find_backup); `agree`: for several processes, faults.StopOnSignal's agreement;
    `best_metric`: the validation metric whose best epoch best.keras keeps (None: no
    best.keras)."""
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
    if getattr(recipe, "ema_momentum", None) is not None:
        # Validation and the epoch's checkpoints see the EMA weights, as the reference evaluates
        # its EMA model. After BackupAndRestore, so backups keep the raw weights to resume from.
        from training.keras_internals import SwapEMAWeightsAcrossFits

        callbacks.append(SwapEMAWeightsAcrossFits(last_epoch=recipe.epochs - 1))
    callbacks += [metrics_writer, keras.callbacks.ModelCheckpoint(os.path.join(work_dir, LAST))]
    if best_metric is not None:
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                os.path.join(work_dir, "best.keras"),
                monitor=best_metric,
                mode="max",
                save_best_only=True,
                initial_value_threshold=best,
            )
        )
    callbacks += [
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
        task = TASKS[args.task](args)
        recipe = task.recipe
        check_can_create_folder(args.output_dir, f"--output-dir {args.output_dir!r}")

        # Devices first: nothing may touch the backend's runtime before this.
        engine = start_engine(args)
        if engine.several_processes and not task.several_processes:
            raise SetupError(
                f"--task {task.name} trains in one process (with every device it has); this "
                "run has several processes."
            )
        recipes_lib.set_precision(task.precision)
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
                f"{args.output_dir} holds a completed run ({task.completed(previous)}); nothing "
                "to do. Use a new --output-dir to train again."
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

        task.load()
        steps = task.steps
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
                task.train_dataset(
                    args.seed, start_epoch, shard, start_step=within_epoch,
                    end_epoch=start_epoch + 1,
                ),
                start_epoch, start_epoch + 1, steps - within_epoch,
            )
        ] if within_epoch else []  # fmt: skip
        first_whole = start_epoch + 1 if within_epoch else start_epoch
        # Called even with no epoch left when it is the only fit: its start restores the backup
        # (a run stopped after its last epoch, before evaluation and export).
        if first_whole < recipe.epochs or not fits:
            whole_epochs = task.train_dataset(args.seed, first_whole, shard)
            fits.append((whole_epochs, first_whole, recipe.epochs, steps))
        val_ds = task.validation_dataset(shard)

        replicas = engine.replicas
        say(
            f"{engine.describe()}, global batch {recipe.batch_size} "
            f"({recipe.batch_size / replicas:g} per replica), precision {task.precision}.\n"
            + task.describe()
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
            model = task.build()
            engine.prepare(model, val_ds)
        # Only now, with everything checked, does the run leave files behind.
        os.makedirs(work_dir, exist_ok=True)
        write_json(recipe_path, recorded_recipe)

    callbacks, metrics_writer = make_callbacks(
        recipe, work_dir, recipe.batch_size, steps, metrics_path, args.seed, resume,
        engine.agree, best_metric=task.best_metric,
    )  # fmt: skip
    stopper = next(c for c in callbacks if isinstance(c, faults.StopOnSignal))
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
    finally:
        stopper.restore_handlers()  # also after a failed fit, which calls no callback
    # With EMA, fit ends with the averaged weights in the model: save, measure and export those.
    model.save(os.path.join(work_dir, LAST))
    seconds = round(time.time() - started, 1)
    run = Run(args.output_dir, work_dir, chief, val_ds)
    metrics = metrics_writer.finish(task.finish(model, run))
    metrics["train_seconds_this_session"] = seconds
    write_json(metrics_path, metrics)
    shutil.rmtree(backup_dir, ignore_errors=True)  # the run is complete: nothing to resume
    say(f"Done: {task.done(metrics)}. Outputs in {args.output_dir}.")
    return metrics


@dataclasses.dataclass
class Run:
    """Where a run's outputs go: what a task's `finish` needs besides the model."""

    output_dir: str
    work_dir: str  # output_dir, or a non-chief process's private folder in it
    chief: bool
    validation: object  # the validation dataset, or None


class ClassificationTask:
    """A CoaT image classifier on a data set of `keras_coat.datasets`; its recipes are in
    `training.recipes`, its pipelines in `training.data`.

    A task tells the trainer what it trains (`recipe`, `build`), on what (`load`,
    `train_dataset`, `validation_dataset`) and what to do with the result (`finish`); the
    trainer does the rest, the same for every task (`training.detection.DetectionTask`).
    """

    name = "classification"
    recipe_type = recipes_lib.Recipe
    recipe_module = "training/recipes.py"
    best_metric = "val_accuracy"
    several_processes = True

    @staticmethod
    def add_arguments(group):
        group.add_argument("--recipe", choices=recipes_lib.RECIPE_NAMES, default="imagenet")
        group.add_argument("--data-dir", help="TFDS data_dir")
        group.add_argument("--manual-dir", help="TFDS manual_dir (imagenet2012's archives)")
        group.add_argument("--no-export", action="store_true", help="skip the SavedModel export")

    def __init__(self, args):
        self.args = args
        self.recipe = resolve_recipe(args)
        self.precision = self.recipe.mixed_precision
        self.source = self.steps = None

    @staticmethod
    def completed(metrics):
        return (
            f"{metrics.get('epochs_completed')} epochs, val_accuracy "
            f"{metrics.get('val_accuracy')}"
        )

    def load(self):
        from training import data

        args, recipe = self.args, self.recipe
        self.source = data.load_source(
            recipe.dataset, recipe.image_size, args.data_dir, args.manual_dir
        )
        self.steps = data.steps_per_epoch(recipe, self.source, args.steps_per_epoch)

    def train_dataset(self, seed, start_epoch, shard, start_step=0, end_epoch=None):
        from training import data

        return data.train_dataset(
            self.recipe, self.source, seed, start_epoch, self.args.steps_per_epoch, **shard,
            start_step=start_step, end_epoch=end_epoch,
        )  # fmt: skip

    def validation_dataset(self, shard):
        from training import data

        return data.eval_dataset(self.recipe, self.source, **shard)

    def describe(self):
        from training import data

        r, source = self.recipe, self.source
        return (
            f"Recipe {r.name}: {model_text(r)} at {r.image_size}px on {source.name} "
            f"({source.train.num_examples} train / {source.validation.num_examples} held-out "
            f"images, {source.num_classes} classes), {r.epochs} epochs x {self.steps} steps, "
            f"peak lr {r.peak_lr:.3g}.\nTraining pipeline: "
            + " -> ".join(data.TrainTransform(r, source.num_classes).step_names)
        )

    def build(self):
        model = build_model(self.recipe, self.source.num_classes, self.args.model_config)
        check_init_architecture(model, self.args.model, self.recipe.init_weights)
        describe_data(model, self.source.class_names)
        return compile_model(model, self.recipe, self.steps, self.args.jit_compile)

    def finish(self, model, run):
        """Measures the final model on the validation split and exports it."""
        final = model.evaluate(run.validation, verbose=0, return_dict=True)
        results = {"val_loss": float(final["loss"]), "val_accuracy": float(final["accuracy"])}
        if "top5_accuracy" in final:
            results["val_top5_accuracy"] = float(final["top5_accuracy"])
        # Every process writes it (the others into their own folder, as last.keras): a chief
        # still writing while its JAX peers exit would find them gone and stop with an error.
        preset_dir = save_preset(
            model, run.work_dir, self.recipe, self.source, results, self.recipe.epochs
        )
        if run.chief:
            results["preset_dir"] = preset_dir
        if run.chief and not self.args.no_export:
            export_dir = os.path.join(run.output_dir, "export")
            results["export_dir"] = export(model, export_dir)
        return results

    @staticmethod
    def done(metrics):
        return (
            f"val_accuracy {metrics['val_accuracy']:.4f}, val_loss {metrics['val_loss']:.4f} "
            f"after {metrics['epochs_completed']} epochs; {metrics['images_per_second']:.1f} "
            "images/s"
        )


def describe_data(model, class_names):
    """Makes `model` carry its data's class names (its evaluation preprocessing is set by
    `build_model`), so that every file the run writes says how to read its outputs."""
    model.class_names = list(class_names)


def save_preset(model, output_dir, recipe, source, metrics, epochs):
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
            "epochs": epochs,
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


TASKS = {"classification": ClassificationTask, "detection": DetectionTask}


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
