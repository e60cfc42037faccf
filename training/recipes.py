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

import dataclasses

RECIPE_NAMES = ("imagenet", "finetune", "demo")
MIXED_PRECISION_POLICIES = {
    "none": "float32",
    "bfloat16": "mixed_bfloat16",
    "float16": "mixed_float16",
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every hyper-parameter of a training run.

    Learning rates are given for `lr_reference_batch` images and scaled linearly with the global
    batch size (`peak_lr`), as DeiT does. `None` switches an optional feature off.
    """

    name: str
    dataset: str
    model: str = "coat_lite_tiny"
    image_size: int = 224
    epochs: int = 300
    batch_size: int = 2048  # global, over every replica
    # Optimizer: AdamW with decoupled weight decay, not applied to class tokens, norms, biases.
    lr: float = 5e-4
    lr_reference_batch: int = 512
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    adam_epsilon: float = 1e-8
    clip_norm: float | None = None  # global gradient-norm clipping
    ema_momentum: float | None = 0.99996  # EMA of the weights, swapped in at the end
    # Model.
    drop_path: float = 0.1
    init_weights: str | None = None  # "imagenet" or a weights file to start from
    # Loss and batch mixing.
    label_smoothing: float = 0.1
    mixup: float = 0.8  # Beta(alpha, alpha); 0 disables
    cutmix: float = 1.0  # Beta(alpha, alpha); 0 disables
    mixup_switch_prob: float = 0.5  # with both on: probability of CutMix for a batch
    # Per-image augmentation.
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    horizontal_flip: bool = True
    rand_augment_ops: int = 2
    rand_augment_magnitude: float | None = 9.0  # out of 10; None disables RandAugment
    color_jitter: float | None = 0.4  # as in timm, only used when RandAugment is off
    random_erasing: float = 0.25
    repeated_augmentations: int = 3
    # Evaluation: bicubic resize to size / crop_pct, center crop.
    eval_crop_pct: float = 0.875
    # Numerics.
    mixed_precision: str = "bfloat16"
    # Checkpointing: "epoch" or a number of steps between backups.
    backup_every: str | int = "epoch"

    def __post_init__(self):
        problems = []
        for field in ("image_size", "epochs", "batch_size", "lr_reference_batch"):
            if getattr(self, field) <= 0:
                problems.append(f"{field} must be positive, got {getattr(self, field)}")
        if self.image_size % 32:
            problems.append(f"image_size must be a multiple of 32, got {self.image_size}")
        for field in ("lr", "warmup_lr", "min_lr"):
            if getattr(self, field) < 0:
                problems.append(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            problems.append(
                f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}"
            )
        if not 0.0 <= self.drop_path < 1.0:
            problems.append(f"drop_path must be in [0, 1), got {self.drop_path}")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for field in ("mixup", "cutmix", "weight_decay"):
            if getattr(self, field) < 0:
                problems.append(f"{field} must be >= 0, got {getattr(self, field)}")
        for field in ("mixup_switch_prob", "random_erasing"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                problems.append(f"{field} must be in [0, 1], got {getattr(self, field)}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            problems.append(f"clip_norm must be positive or None, got {self.clip_norm}")
        if self.ema_momentum is not None and not 0.0 < self.ema_momentum < 1.0:
            problems.append(f"ema_momentum must be in (0, 1) or None, got {self.ema_momentum}")
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
        if self.mixed_precision not in MIXED_PRECISION_POLICIES:
            problems.append(
                f"mixed_precision must be one of {sorted(MIXED_PRECISION_POLICIES)}, got "
                f"{self.mixed_precision!r}"
            )
        if self.backup_every != "epoch" and not (
            isinstance(self.backup_every, int) and self.backup_every > 0
        ):
            problems.append(
                f"backup_every must be 'epoch' or a positive number of steps, got "
                f"{self.backup_every!r}"
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

RECIPES = {"imagenet": IMAGENET, "finetune": FINETUNE, "demo": DEMO}


def get_recipe(name, model=None):
    """The recipe `name` for `model` (default: the recipe's own), with per-variant overrides."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}. Available: {', '.join(RECIPE_NAMES)}.")
    recipe = RECIPES[name]
    model = model or recipe.model
    overrides = VARIANT_OVERRIDES.get(name, {}).get(model, {})
    return dataclasses.replace(recipe, model=model, **overrides)


def override(recipe, changes):
    """`recipe` with the fields in the dict `changes` replaced (and validated again)."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(Recipe)}
    if unknown:
        raise ValueError(f"Unknown recipe fields: {', '.join(sorted(unknown))}.")
    return dataclasses.replace(recipe, **changes)
