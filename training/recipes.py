"""Training recipes: one plain dataclass per paper setting.

A recipe holds every hyper-parameter of a run; the command line only overrides fields
(`dataclasses.replace`). `get_recipe(name, model)` returns the recipe with the per-variant
overrides of the authors' README applied.

The ImageNet recipe is the DeiT recipe the CoaT authors trained with (their `src/args.py` and
README): 300 epochs, AdamW (eps 1e-8, weight decay 0.05) at lr 5e-4 x global_batch / 512, cosine
schedule with 5 warm-up epochs from 1e-6 down to 1e-5, label smoothing 0.1, Mixup 0.8 / CutMix 1.0
(switch probability 0.5), RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, colour jitter
0.4, bicubic random-resized crops, repeated augmentation (3), EMA 0.99996 and mixed precision,
8 GPUs x 256 images.
"""

import argparse
import dataclasses
import math
import typing

from keras_coat.presets import CROP_MODES

RECIPE_NAMES = ("imagenet", "finetune", "transfer", "demo")
# The `model` of a recipe that takes its architecture (and weights) from the preset
# `init_weights` names.
PRESET_MODEL = "preset"
MIXED_PRECISION_POLICIES = {
    "none": "float32",
    "bfloat16": "mixed_bfloat16",
    "float16": "mixed_float16",
}


def recipe_field(default=dataclasses.MISSING, help="", **cli):
    """A recipe field with its command-line help. `cli` may name the `flag` when it is not the
    field's name, the value that switches an optional feature `off`, `choices`, a `metavar`,
    or `set_by`: the option that sets a field which is no plain override."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


def common_problems(recipe):
    """What is wrong with the fields every recipe has (`Recipe`, the detector's
    `training.detection.DetectionRecipe`): finite numbers, epochs and batch, the optimizer and
    its schedule (`training.optim`), backups. A list of texts, empty when nothing is."""
    problems = []
    for field in dataclasses.fields(recipe):
        value = getattr(recipe, field.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            problems.append(f"{field.name} must be finite, got {value}")
    for field in ("epochs", "batch_size"):
        if getattr(recipe, field) <= 0:
            problems.append(f"{field} must be positive, got {getattr(recipe, field)}")
    for field in ("lr", "warmup_lr", "min_lr", "weight_decay"):
        if getattr(recipe, field) < 0:
            problems.append(f"{field} must be >= 0, got {getattr(recipe, field)}")
    if recipe.warmup_epochs < 0 or recipe.warmup_epochs > recipe.epochs:
        problems.append(
            f"warmup_epochs must be in [0, epochs={recipe.epochs}], got {recipe.warmup_epochs}"
        )
    if recipe.adam_epsilon <= 0:
        problems.append(f"adam_epsilon must be positive, got {recipe.adam_epsilon}")
    if recipe.clip_norm is not None and recipe.clip_norm <= 0:
        problems.append(f"clip_norm must be positive or None, got {recipe.clip_norm}")
    if recipe.ema_momentum is not None and not 0.0 < recipe.ema_momentum < 1.0:
        problems.append(f"ema_momentum must be in (0, 1) or None, got {recipe.ema_momentum}")
    if recipe.backup_every != "epoch" and not (
        isinstance(recipe.backup_every, int) and recipe.backup_every > 0
    ):
        problems.append(
            f"backup_every must be 'epoch' or a positive number of steps, got "
            f"{recipe.backup_every!r}"
        )
    return problems


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every hyper-parameter of a training run.

    Learning rates are given for `lr_reference_batch` images and scaled linearly with the global
    batch size (`peak_lr`), as DeiT does. `None` switches an optional feature off. Each field is
    also a command-line option of `training.train` (`add_override_arguments`), with the help
    given here.
    """

    name: str = recipe_field(help="the recipe", set_by="--recipe")
    dataset: str = recipe_field(help="digits, folder:PATH or a TFDS name")
    model: str = recipe_field(
        "coat_lite_tiny",
        f'a keras_coat variant, or "{PRESET_MODEL}": the --init-weights preset\'s',
        set_by="--model",
    )
    image_size: int = recipe_field(224, "training and evaluation image size, a multiple of 32")
    epochs: int = recipe_field(300, "training epochs")
    batch_size: int = recipe_field(2048, "global batch size, over all replicas")
    # Optimizer: AdamW with decoupled weight decay, not applied to class tokens, norms, biases.
    lr: float = recipe_field(5e-4, "learning rate per --lr-reference-batch images")
    lr_reference_batch: int = recipe_field(512, "batch size that --lr is given for")
    warmup_epochs: float = recipe_field(5.0, "linear warm-up from --warmup-lr, in epochs")
    warmup_lr: float = recipe_field(1e-6, "learning rate at the start of the warm-up")
    min_lr: float = recipe_field(1e-5, "learning rate at the end of the cosine schedule")
    weight_decay: float = recipe_field(0.05, "AdamW decoupled weight decay")
    adam_epsilon: float = recipe_field(1e-8, "AdamW epsilon")
    clip_norm: float | None = recipe_field(None, "global gradient-norm clip, 0 disables", off=0)
    ema_momentum: float | None = recipe_field(
        0.99996, "EMA momentum of the weights (validated, checkpointed, exported), 0 disables",
        flag="ema", off=0,
    )
    # Model.
    drop_path: float = recipe_field(0.1, "stochastic depth rate")
    init_weights: str | None = recipe_field(
        None, '"imagenet", a weights file or a preset reference (built-in name, preset '
        "directory, .keras file, hf://owner/repo) to start from; a preset sets the architecture",
    )
    # Loss and batch mixing.
    label_smoothing: float = recipe_field(0.1, "label smoothing")
    mixup: float = recipe_field(0.8, "Mixup Beta(alpha, alpha), 0 disables")
    cutmix: float = recipe_field(1.0, "CutMix Beta(alpha, alpha), 0 disables")
    mixup_switch_prob: float = recipe_field(0.5, "with both on: probability of CutMix for a batch")
    # Per-image augmentation.
    crop_scale: tuple[float, float] = recipe_field(
        (0.08, 1.0), "random-resized-crop area range", metavar=("MIN", "MAX")
    )
    crop_ratio: tuple[float, float] = recipe_field(
        (3 / 4, 4 / 3), "random-resized-crop aspect-ratio range", metavar=("MIN", "MAX")
    )
    horizontal_flip: bool = recipe_field(True, "random horizontal flips")
    rand_augment_ops: int = recipe_field(2, "RandAugment ops per image")
    rand_augment_magnitude: float | None = recipe_field(
        9.0, "RandAugment magnitude (0-10), -1 disables", flag="rand_augment", off=-1
    )
    color_jitter: float | None = recipe_field(
        0.4, "colour jitter strength (only used when RandAugment is off), 0 disables", off=0
    )
    random_erasing: float = recipe_field(0.25, "random erasing probability, 0 disables")
    repeated_augmentations: int = recipe_field(
        3, "copies of each image per epoch (DeiT's RASampler)"
    )
    eval_crop_pct: float = recipe_field(0.875, "evaluation: resize to size / crop_pct, center crop")
    eval_crop_mode: str = recipe_field(
        "center", "evaluation: keep the aspect ratio (center) or resize both sides (squash)",
        choices=CROP_MODES,
    )
    # Numerics.
    mixed_precision: str = recipe_field(
        "bfloat16", "mixed precision policy", choices=sorted(MIXED_PRECISION_POLICIES)
    )
    backup_every: str | int = recipe_field(
        "epoch", '"epoch" or a number of steps between backups', metavar="epoch|STEPS"
    )

    def __post_init__(self):
        problems = common_problems(self)
        for field in ("image_size", "lr_reference_batch"):
            if getattr(self, field) <= 0:
                problems.append(f"{field} must be positive, got {getattr(self, field)}")
        if self.image_size % 32:
            problems.append(f"image_size must be a multiple of 32, got {self.image_size}")
        if not 0.0 <= self.drop_path < 1.0:
            problems.append(f"drop_path must be in [0, 1), got {self.drop_path}")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for field in ("mixup", "cutmix"):
            if getattr(self, field) < 0:
                problems.append(f"{field} must be >= 0, got {getattr(self, field)}")
        for field in ("mixup_switch_prob", "random_erasing"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                problems.append(f"{field} must be in [0, 1], got {getattr(self, field)}")
        if self.rand_augment_magnitude is not None and not 0 <= self.rand_augment_magnitude <= 10:
            problems.append(
                f"rand_augment_magnitude must be in [0, 10] or None, got "
                f"{self.rand_augment_magnitude}"
            )
        if self.color_jitter is not None and self.color_jitter < 0:
            problems.append(f"color_jitter must be >= 0 or None, got {self.color_jitter}")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            problems.append(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            problems.append(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if self.repeated_augmentations < 1:
            problems.append(
                f"repeated_augmentations must be >= 1, got {self.repeated_augmentations}"
            )
        if not 0.0 < self.eval_crop_pct <= 1.0:
            problems.append(f"eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}")
        if self.eval_crop_mode not in CROP_MODES:
            problems.append(
                f"eval_crop_mode must be one of {list(CROP_MODES)}, got {self.eval_crop_mode!r}"
            )
        if self.mixed_precision not in MIXED_PRECISION_POLICIES:
            problems.append(
                f"mixed_precision must be one of {sorted(MIXED_PRECISION_POLICIES)}, got "
                f"{self.mixed_precision!r}"
            )
        if problems:
            raise ValueError(f"Invalid recipe {self.name!r}: " + "; ".join(problems) + ".")

    @property
    def peak_lr(self):
        """The learning rate after warm-up, scaled to the global batch size."""
        return self.lr * self.batch_size / self.lr_reference_batch

    def to_dict(self):
        return dataclasses.asdict(self)


# The DeiT/CoaT ImageNet-1k recipe: 8 GPUs x 256 images.
IMAGENET = Recipe(name="imagenet", dataset="imagenet2012")

# Authors' README: the large variants use 128 images per GPU, stronger stochastic depth,
# 20 warm-up epochs, gradient clipping at 5 and no EMA.
VARIANT_OVERRIDES = {
    "imagenet": {
        "coat_small": dict(
            batch_size=8 * 128, drop_path=0.2, ema_momentum=None, warmup_epochs=20, clip_norm=5.0
        ),
        "coat_lite_medium": dict(
            batch_size=8 * 128, drop_path=0.3, ema_momentum=None, warmup_epochs=20, clip_norm=5.0
        ),
    },
}

# CoaT-Lite Medium 224 -> 384: 6 epochs from the 224 checkpoint, 8 GPUs x 32 images, a fixed
# lr of 5e-6, weight decay 1e-8, drop path 0.2. Same augmentation as pre-training.
FINETUNE = dataclasses.replace(
    IMAGENET,
    name="finetune",
    model="coat_lite_medium",
    image_size=384,
    epochs=6,
    batch_size=8 * 32,
    lr=5e-6,
    lr_reference_batch=8 * 32,
    warmup_epochs=0.0,
    min_lr=5e-6,
    weight_decay=1e-8,
    drop_path=0.2,
    ema_momentum=None,
    init_weights="imagenet",
    eval_crop_pct=1.0,
)

# Fine-tuning a preset on a small labelled folder (a few hundred to a few thousand images): the
# preset's architecture and weights with a new head for the folder's classes; a short schedule:
# 10 epochs at batch 32, one warm-up epoch, AdamW at 5e-4 for every layer (Keras' optimizers have
# no per-layer rates; in tests/test_transfer.py's setting, 1e-4 left a new head at 50% held-out
# accuracy after the 50 steps of a 160-image folder, 5e-4 reached 100% on a 400-image folder and
# 70-80% on 160-image ones); augmentation sized for small data: mild crops, flips and a
# light colour jitter, no RandAugment, Mixup, CutMix, random erasing or repeated augmentation;
# no EMA. Needs --dataset and --init-weights; --image-size is 224 unless given.
TRANSFER = Recipe(
    name="transfer",
    dataset=None,
    model=PRESET_MODEL,
    image_size=224,
    epochs=10,
    batch_size=32,
    lr=5e-4,
    lr_reference_batch=32,
    warmup_epochs=1.0,
    warmup_lr=1e-6,
    min_lr=1e-6,
    weight_decay=0.05,
    ema_momentum=None,
    drop_path=0.1,
    label_smoothing=0.1,
    mixup=0.0,
    cutmix=0.0,
    crop_scale=(0.5, 1.0),
    horizontal_flip=True,
    rand_augment_magnitude=None,
    color_jitter=0.2,
    random_erasing=0.0,
    repeated_augmentations=1,
    mixed_precision="none",
)

# CoaT-Lite Tiny on scikit-learn's 8x8 handwritten digits, sized to train to well above 90%
# held-out accuracy in a few minutes on two CPU cores. Digits are not mirror-symmetric, so no
# flips; mild crops and no batch mixing, because the images are tiny and the set is small.
DEMO = Recipe(
    name="demo",
    dataset="digits",
    model="coat_lite_tiny",
    image_size=32,
    epochs=10,
    batch_size=64,
    lr=1e-3,
    lr_reference_batch=64,
    warmup_epochs=1.0,
    min_lr=1e-5,
    weight_decay=0.05,
    ema_momentum=None,
    drop_path=0.0,
    label_smoothing=0.1,
    mixup=0.0,
    cutmix=0.0,
    crop_scale=(0.7, 1.0),
    crop_ratio=(0.8, 1.25),
    horizontal_flip=False,
    rand_augment_magnitude=None,
    color_jitter=None,
    random_erasing=0.0,
    repeated_augmentations=1,
    eval_crop_pct=1.0,
    mixed_precision="none",
)

RECIPES = {"imagenet": IMAGENET, "finetune": FINETUNE, "transfer": TRANSFER, "demo": DEMO}


def get_recipe(name, model=None):
    """The recipe `name` for `model` (default: the recipe's own), with per-variant overrides."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}. Available: {', '.join(RECIPE_NAMES)}.")
    recipe = RECIPES[name]
    model = model or recipe.model
    overrides = VARIANT_OVERRIDES.get(name, {}).get(model, {})
    return dataclasses.replace(recipe, model=model, **overrides)


def check_complete(recipe):
    """Raises a ValueError naming what a recipe needs before it can run: a dataset, and the
    preset of a recipe whose model is the preset's."""
    if not recipe.dataset:
        raise ValueError(
            f"Recipe {recipe.name!r} needs --dataset (folder:PATH, digits or a TFDS name)."
        )
    if recipe.model == PRESET_MODEL and not recipe.init_weights:
        raise ValueError(
            f"Recipe {recipe.name!r} fine-tunes a preset: pass --init-weights with a preset (a "
            "built-in name such as coat_lite_small, or a preset directory), or --model VARIANT."
        )
    if recipe.model == PRESET_MODEL and recipe.init_weights == "imagenet":
        raise ValueError(
            f"Recipe {recipe.name!r} takes the architecture from --init-weights; 'imagenet' "
            "names none: pass a preset such as --init-weights coat_lite_small, or --model "
            "VARIANT --init-weights imagenet."
        )


def override(recipe, changes):
    """`recipe` with the fields in the dict `changes` replaced (and validated again)."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(Recipe)}
    if unknown:
        raise ValueError(f"Unknown recipe fields: {', '.join(sorted(unknown))}.")
    return dataclasses.replace(recipe, **changes)


# ----------------------------------------------------------------------------------------------
# Command-line overrides, one per field


def flag(field):
    """The command-line option of a recipe field: ``--lr``, ``--ema`` (ema_momentum), ..."""
    if "set_by" in field.metadata:
        return field.metadata["set_by"]
    return "--" + field.metadata.get("flag", field.name).replace("_", "-")


def add_override_arguments(group, recipe_type=Recipe):
    """Adds an option for every field of the recipe dataclass `recipe_type` (its fields made
    with `recipe_field`) not set by another option (see `flag`).

    Options are typed from the field's annotation (a finite number, an int, a MIN MAX pair or a
    list of numbers for tuples, --x/--no-x for booleans); ``none`` switches an optional field
    off, as does its `off` value. Only options given on the command line appear in the parsed
    namespace.
    """
    for field in dataclasses.fields(recipe_type):
        if "set_by" in field.metadata:
            continue
        meta = field.metadata
        kwargs = dict(dest=field.name, default=argparse.SUPPRESS, help=meta.get("help", ""))
        if field.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(field.type) is tuple:
            items = typing.get_args(field.type)
            kwargs.update(
                type=_finite_float if items[0] is float else int,
                nargs="+" if Ellipsis in items else len(items),
                metavar=meta["metavar"],
            )
        elif "choices" in meta:
            kwargs.update(choices=meta["choices"])
        else:
            kinds = typing.get_args(field.type) or (field.type,)
            if not set(kinds) <= set(_TYPES):
                raise TypeError(
                    f"Recipe field {field.name!r} has type {field.type}, which no command-line "
                    f"option parses ({', '.join(k.__name__ for k in _TYPES)}, tuples, bool); "
                    "give it `set_by` or a supported type."
                )
            names = [_TYPES[k][0] for k in kinds]
            kwargs.update(
                type=_value_parser(kinds, meta.get("off")),
                metavar=meta.get("metavar", "|".join(names)),
            )
        group.add_argument(flag(field), **kwargs)


def command_line_overrides(args, recipe_type=Recipe):
    """The recipe fields given on the command line (`add_override_arguments`), as a dict."""
    changes = {}
    for field in dataclasses.fields(recipe_type):
        if "set_by" not in field.metadata and hasattr(args, field.name):
            value = getattr(args, field.name)
            changes[field.name] = tuple(value) if isinstance(value, list) else value
    return changes


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# Per type: its metavar, its name in error messages, its parser.
_TYPES = {
    int: ("INT", "an integer", int),
    float: ("FLOAT", "a finite number", _finite_float),
    str: ("TEXT", "a string", str),
    type(None): ("none", "none", None),
}


def _value_parser(kinds, off):
    """argparse `type` for a field of one of the types `kinds` (str tried last)."""
    order = sorted((k for k in kinds if k is not type(None)), key=lambda k: k is str)

    def parse(text):
        if type(None) in kinds and text.lower() == "none":
            return None
        for kind in order:
            try:
                value = _TYPES[kind][2](text)
            except (ValueError, argparse.ArgumentTypeError):
                continue
            return None if off is not None and value == off else value
        expected = " or ".join(_TYPES[k][1] for k in (*order, type(None)) if k in kinds)
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")

    return parse


def set_precision(mixed_precision):
    """Sets Keras' global dtype policy on either engine: "none" (float32), "bfloat16" or
    "float16" (mixed)."""
    if mixed_precision not in MIXED_PRECISION_POLICIES:
        raise ValueError(
            f"mixed_precision must be one of {sorted(MIXED_PRECISION_POLICIES)}, got "
            f"{mixed_precision!r}."
        )
    import keras

    keras.mixed_precision.set_global_policy(MIXED_PRECISION_POLICIES[mixed_precision])
