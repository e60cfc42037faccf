"""The optimizer of a recipe: AdamW on a warm-up + cosine schedule, with weight-decay exclusions."""

import math

import keras

# Variables that get no weight decay (DeiT/timm: class tokens, every norm and every bias).
# Matched against Keras variable names: LayerNormalization's are "gamma" and "beta", biases are
# "bias", the class tokens of keras_coat are "cls_token".
NO_WEIGHT_DECAY = ("cls_token", "gamma", "beta", "bias")


@keras.saving.register_keras_serializable(package="keras_coat_training")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from `warmup_lr` to `peak_lr`, then cosine decay to `min_lr`.

    As timm's `CosineLRScheduler` used by DeiT (without `warmup_prefix`): the cosine spans the whole
    run, `min_lr + (peak_lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2`, and during the
    first `warmup_steps` steps the linear ramp replaces it. Updated every step, not every epoch.
    """

    def __init__(self, peak_lr, total_steps, warmup_steps=0, warmup_lr=1e-6, min_lr=1e-5):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}.")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}."
            )
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_lr = float(warmup_lr)
        self.min_lr = float(min_lr)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        progress = keras.ops.minimum(step / self.total_steps, 1.0)
        cosine = self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (
            1.0 + keras.ops.cos(math.pi * progress)
        )
        if self.warmup_steps == 0:
            return cosine
        warmup = self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / self.warmup_steps
        return keras.ops.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "warmup_lr": self.warmup_lr,
            "min_lr": self.min_lr,
        }


def learning_rate_schedule(recipe, steps_per_epoch):
    """The recipe's schedule for an epoch of `steps_per_epoch` steps."""
    return WarmupCosineDecay(
        peak_lr=recipe.peak_lr,
        total_steps=recipe.epochs * steps_per_epoch,
        warmup_steps=round(recipe.warmup_epochs * steps_per_epoch),
        warmup_lr=recipe.warmup_lr,
        min_lr=recipe.min_lr,
    )


def build_optimizer(recipe, steps_per_epoch):
    """AdamW as DeiT configures it, with optional global-norm clipping and weight EMA.

    With EMA on, Keras keeps the moving average in the optimizer and swaps it into the model at
    the end of `fit`; during training `train.make_callbacks` swaps it in for validation and the
    epoch's checkpoints (`keras.callbacks.SwapEMAWeights`).
    """
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate_schedule(recipe, steps_per_epoch),
        weight_decay=recipe.weight_decay,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=recipe.adam_epsilon,
        global_clipnorm=recipe.clip_norm,
        use_ema=recipe.ema_momentum is not None,
        ema_momentum=recipe.ema_momentum if recipe.ema_momentum is not None else 0.99,
    )
    optimizer.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY))
    return optimizer
