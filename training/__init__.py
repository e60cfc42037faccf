"""Training CoaT models with Keras: TensorFlow with tf.distribute, or JAX with keras.distribution.

`python -m training.train --help` is the entry point; `training.recipes` holds the paper's
settings, `training.data` the input pipelines, `training.augment` their augmentation ops,
`training.optim` the optimizer and schedule, `training.engine_tf` (tf.distribute) and
`training.engine_jax` (keras.distribution on JAX) the device and process set-up, and
`training.demo` the end-to-end digits demo.
"""

# keras_coat first: importing it sets TensorFlow's defaults (its oneDNN kernels on every x86 CPU)
# before anything in this package imports TensorFlow.
import keras_coat  # noqa: F401
