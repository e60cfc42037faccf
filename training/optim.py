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


@keras.saving.register_keras_serializable(package="keras_coat_training")
class AdamW(keras.optimizers.AdamW):
    """Keras' AdamW, whose update of each variable on TensorFlow is one fused kernel.

    Keras writes Adam's update of a variable as about twenty ops, and its decoupled weight decay
    as a strategy update of its own that evaluates the learning-rate schedule again: tracing a
    training step spent about two thirds of its time there (104 variables of a tiny CoaT). On
    TensorFlow each variable gets its weight decay (two ops, with the step's learning rate) and
    then TensorFlow's `ResourceApplyAdam` kernel, which computes Keras' formula, m and v updated
    in place and ``lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)``
    subtracted, in one op. Same updates to float32 rounding; the first `fit` step of CoaT-Lite
    Small at batch 16 took 15.2-16.7 s instead of 22.3-27.0 s (docs/training.md). Other
    backends, AMSGrad and sparse gradients run Keras' code.
    """

    def _apply_weight_decay(self, variables):
        if keras.backend.backend() != "tensorflow":
            super()._apply_weight_decay(variables)
        # On TensorFlow `update_step` applies it, variable by variable.

    def update_step(self, gradient, variable, learning_rate):
        if keras.backend.backend() != "tensorflow":
            return super().update_step(gradient, variable, learning_rate)
        return self._tensorflow_update_step(gradient, variable, learning_rate)

    def _tensorflow_update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        # Inside the strategy's update of `variable`: the tf.Variable (a replica's copy under
        # MirroredStrategy), whose slots' handles resolve to the same replica.
        variable = variable.value if isinstance(variable, keras.Variable) else variable
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        if self.weight_decay and self._use_weight_decay(variable):
            variable.assign_sub(variable * (tf.cast(self.weight_decay, dtype) * lr))
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=lr,
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
        )


def build_optimizer(recipe, steps_per_epoch):
    """AdamW as DeiT configures it, with optional global-norm clipping and weight EMA.

    With EMA on, Keras keeps the moving average in the optimizer and swaps it into the model at
    the end of `fit`; during training `train.make_callbacks` swaps it in for validation and the
    epoch's checkpoints (`keras.callbacks.SwapEMAWeights`).
    """
    optimizer = AdamW(
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
