"""Training CoaT models with Keras on any tf.distribute strategy.

`python -m training.train --help` is the entry point; `training.recipes` holds the paper's
settings, `training.data` the input pipelines, `training.augment` their augmentation ops,
`training.optim` the optimizer and schedule, `training.strategy` the device set-up and
`training.demo` the end-to-end digits demo.
"""
