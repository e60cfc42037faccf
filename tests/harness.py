"""The shared checks every CoaT model and layer goes through, on every Keras backend.

KerasHub's idea (`run_vision_backbone_test`, `run_model_saving_test`, `run_task_test`,
`run_preset_test`), written for CoaT: each `check_*` function takes a model (or a layer) and
raises an AssertionError that names what is wrong. tests/test_harness.py runs them on
TensorFlow, JAX and PyTorch and plants a defect for each to show that it fails;
tests/test_layers.py calls `check_layer` on every layer.

Which checks run on which models (CI time):

- Every published variant goes through `check_published_variant`, the cheap checks with one
  build and one forward pass: its factory's name, the reference's parameter count, logits equal
  to the reference's (timm, `PARITY_TOLERANCE`) at the published resolution on TensorFlow and
  at 64x64 on JAX and PyTorch, layer names, every layer serializable, the pyramid (strides 4 to
  32, the stages' widths) and the `get_config` round trip with identical outputs.
- The tiny CoaT-Lite and CoaT configurations and one published variant (`EXPENSIVE_VARIANT`,
  CoaT Tiny: its parallel blocks are the most intricate part of the graph) go through the cheap
  checks and the expensive ones, which build, compile or save more models: predict on arrays
  and on a `tf.data.Dataset`, `.keras`, `.weights.h5` and preset round trips, mixed precision
  under "mixed_float16" and "mixed_bfloat16", and int8 quantization.

Every variant is the same code at another width and depth, so the cheap checks on all seven
and the expensive ones on both families cover each code path on each backend. Training (`fit`)
is tests/test_models.py's, on the tiny configurations.

A new variant (an entry of `keras_coat.backbone.VARIANTS`) gets its checks without a line of
test code; a new tiny configuration is one entry of `TINY_CONFIGS` in conftest.py; a new layer
is one `check_layer(layer)` call in its test.
"""

import contextlib
import dataclasses
import io
import logging
import re
import warnings

# conftest first: it loads timm before TensorFlow (the other order crashes), also when this
# module is imported outside pytest.
from tests.conftest import TINY_CONFIGS, pixels, to_numpy  # isort: skip

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_coat  # noqa: E402

PYRAMID_STRIDES = {"P2": 4, "P3": 8, "P4": 16, "P5": 32}
# Layer names become variable paths, `.keras` and `.weights.h5` keys and PyTorch parameter
# names (which may not hold "."): one convention for all of CoaT's, the reference's module path
# with "_" for ".".
LAYER_NAME = re.compile(r"[a-z][a-z0-9_]*")
# Variable paths are "<layer>/<sublayer>/<variable>".
VARIABLE_PATH = re.compile(r"[a-z][a-z0-9_]*(/[a-z_][a-z0-9_]*)*")


# ---------------------------------------------------------------------------------------------
# The models the checks run on


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A CoaT classifier to check: `build()` returns a fresh one (random weights)."""

    name: str
    build: callable
    input_shape: tuple  # (height, width, channels)
    embed_dims: tuple

    def images(self, batch=2, seed=0):
        return pixels(batch, *self.input_shape[:2], seed=seed)


# The published variant that goes through the expensive checks beside the tiny configurations.
EXPENSIVE_VARIANT = "coat_tiny"


def _tiny_classifier(config, input_shape):
    classes = 5
    backbone = keras_coat.CoaTBackbone(**config, image_shape=input_shape)
    return keras_coat.CoaTImageClassifier(
        backbone,
        num_classes=classes,
        class_names=[f"class {i}" for i in range(classes)],
        preprocessing=keras_coat.ImagePreprocessing(
            image_size=input_shape[:2], crop_pct=0.9, interpolation="bilinear"
        ),
    )


def model_cases():
    """The models of the expensive checks (and of the cheap ones, on top of the published
    variants): the tiny configurations (5 named classes, their own preprocessing) and
    `EXPENSIVE_VARIANT` through its factory, at 64x96: non-square, so that a swapped height
    and width shows."""
    shape = (64, 96, 3)
    cases = [
        ModelCase(f"tiny_{name}", lambda config=config: _tiny_classifier(config, shape), shape,
                  config["embed_dims"])
        for name, config in sorted(TINY_CONFIGS.items())
    ]
    cases.append(ModelCase(
        EXPENSIVE_VARIANT,
        lambda: keras_coat.create_model(EXPENSIVE_VARIANT, input_shape=shape),
        shape, tuple(keras_coat.MODEL_CONFIGS[EXPENSIVE_VARIANT]["embed_dims"]),
    ))
    return cases


def published_variants():
    """`[(variant, input size)]` of `check_published_variant`: every variant at its published
    resolution on TensorFlow (224, and 384 for CoaT-Lite Medium); at 64x64 on JAX and PyTorch,
    a tenth of the cost (tests/test_parity.py compares non-square 256x320 inputs on every
    backend)."""
    if keras.config.backend() == "tensorflow":
        return [(name, 224) for name in keras_coat.MODEL_CONFIGS] + [("coat_lite_medium", 384)]
    return [(name, 64) for name in keras_coat.MODEL_CONFIGS]


def rebuilt(model):
    """A second model of `model`'s config with its weights (checks that change a model, such as
    quantization, work on this copy)."""
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def outputs_of(model, images):
    """One forward pass giving everything a model computes, as a dict: a classifier's "output"
    and pyramid "P2".."P5", or all of a backbone's outputs (its pyramid and final tokens)."""
    if isinstance(model, keras_coat.CoaTBackbone):
        return dict(model(images))
    return keras.Model(model.input, {"output": model.output, **model.pyramid_outputs})(images)


def _normalized(model, images):
    """What the classifier's backbone receives for `images`."""
    if model.include_preprocessing:
        return model.get_layer("imagenet_normalization")(images)
    return images


def _assert_same_outputs(got, expected, what, atol=0.0):
    got, expected = to_numpy(got), to_numpy(expected)
    if isinstance(expected, dict):
        keys = sorted(got), sorted(expected)
        assert keys[0] == keys[1], f"{what}: outputs {keys[0]} != {keys[1]}"
        for key in expected:
            _assert_same_outputs(got[key], expected[key], f"{what} [{key}]", atol)
        return
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    difference = float(np.abs(got - expected).max()) if got.size else 0.0
    assert difference <= atol, f"{what}: outputs differ by up to {difference:g} (allowed {atol:g})"


# ---------------------------------------------------------------------------------------------
# Cheap checks


def check_build_and_call(model, images):
    """The classifier maps a batch to finite `[batch, num_classes]` outputs (probabilities that
    sum to 1 when the activation is softmax), in eager and in inference calls alike."""
    outputs = to_numpy(model(images))
    assert outputs.shape == (len(images), model.num_classes), outputs.shape
    assert np.isfinite(outputs).all(), "non-finite outputs"
    if model.activation == "softmax":
        np.testing.assert_allclose(outputs.sum(-1), 1.0, atol=1e-5)
    _assert_same_outputs(model(images, training=False), outputs, "training=False call")


def check_layer_names(model):
    """Every layer name and variable path is valid on every backend: lower case, digits and "_"
    only (no "." for PyTorch, no "/" inside a name), unique within its model; variable paths
    unique (they key `.weights.h5` files and PyTorch's parameters)."""
    for owner in (model, *[layer for layer in model._flatten_layers() if isinstance(layer,
                                                                                 keras.Model)]):
        names = [layer.name for layer in owner.layers]
        bad = [name for name in names if not LAYER_NAME.fullmatch(name)]
        assert not bad, f"{owner.name}: layer names not of the form {LAYER_NAME.pattern}: {bad}"
        repeated = sorted({name for name in names if names.count(name) > 1})
        assert not repeated, f"{owner.name}: repeated layer names {repeated}"
    paths = [variable.path for variable in model.weights]
    bad = [path for path in paths if not VARIABLE_PATH.fullmatch(path)]
    assert not bad, f"variable paths not of the form {VARIABLE_PATH.pattern}: {bad[:5]}"
    repeated = sorted({path for path in paths if paths.count(path) > 1})
    assert not repeated, f"repeated variable paths {repeated[:5]}"


def check_layer(layer):
    """One layer of a model: serializable (`get_config` gives a config that `from_config` turns
    into an equal layer, and Keras' serialization restores its class), registered with Keras
    under keras_coat's package when it is CoaT's own, and documented."""
    cls = type(layer)
    try:
        config = layer.get_config()
    except NotImplementedError as error:
        raise AssertionError(f"{cls.__name__} {layer.name!r} has no get_config: {error}") from None
    try:
        clone = cls.from_config(config)
    except Exception as error:
        raise AssertionError(
            f"{cls.__name__}.from_config(get_config()) of {layer.name!r} fails: "
            f"{type(error).__name__}: {error}"
        ) from None
    assert clone.get_config() == config, (
        f"{cls.__name__} {layer.name!r}: from_config(get_config()) has another config:\n"
        f"{clone.get_config()}\n!=\n{config}"
    )
    if cls.__module__.startswith("keras_coat"):
        assert keras.saving.get_registered_name(cls) == f"keras_coat>{cls.__name__}", (
            f"{cls.__name__} is not registered with @keras.saving.register_keras_serializable("
            "package='keras_coat'): a .keras file holding it would not load"
        )
        assert (cls.__doc__ or "").strip(), f"{cls.__name__} has no docstring"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is cls, f"{layer.name!r} deserializes as {type(restored).__name__}"
    return clone


def check_layers_serializable(model):
    """`check_layer` on every layer of the model, nested ones included (the models themselves
    by `check_config_round_trip`)."""
    for layer in model._flatten_layers(include_self=False):
        if not isinstance(layer, keras.Model):
            check_layer(layer)


def check_config_round_trip(model, images, expected=None):
    """`from_config(get_config())` gives a model of the same class, config, class names and
    preprocessing, which computes the same outputs with the same weights (`expected`: the
    model's `outputs_of`, when already computed)."""
    _assert_same_model(rebuilt(model), model, images, "from_config(get_config())", expected)


def check_pyramid(model, images, embed_dims, outputs=None):
    """`pyramid_outputs` are "P2".."P5", channels-last maps at strides 4, 8, 16, 32 with the
    stages' widths, in the classifier and its backbone alike (statically and when run), and
    the classifier's are its backbone's (`outputs`: the model's `outputs_of`, when already
    computed)."""
    height, width = images.shape[1:3]
    expected = {
        level: (height // stride, width // stride, dim)
        for (level, stride), dim in zip(PYRAMID_STRIDES.items(), embed_dims)
    }
    for owner in (model, model.backbone):
        assert list(owner.pyramid_outputs) == list(PYRAMID_STRIDES), list(owner.pyramid_outputs)
        static = {k: tuple(v.shape[1:]) for k, v in owner.pyramid_outputs.items()}
        assert static == expected, f"{owner.name}: pyramid {static}, expected {expected}"
    outputs = outputs_of(model, images) if outputs is None else outputs
    features = {level: outputs[level] for level in PYRAMID_STRIDES}
    shapes = {k: tuple(v.shape) for k, v in features.items()}
    assert shapes == {k: (len(images), *v) for k, v in expected.items()}, shapes
    backbone_features = outputs_of(model.backbone, _normalized(model, images))
    _assert_same_outputs(features, {level: backbone_features[level] for level in features},
                         "classifier pyramid against its backbone's", atol=1e-5)


def check_parameter_count(model, expected):
    assert model.count_params() == expected, (
        f"{model.name}: {model.count_params()} parameters, the reference has {expected}"
    )


PARITY_TOLERANCE = 1e-4


def check_published_variant(variant, size):
    """A published variant holding the reference's (timm's, randomly perturbed) weights goes
    through the cheap checks with one build and one forward pass: its factory's name, the
    reference's parameter count, logits within `PARITY_TOLERANCE` of the reference's, layer
    names, every layer serializable, the pyramid, and the `get_config` round trip."""
    from tests.reference import keras_twin, random_images, timm_model, torch_forward

    reference = timm_model(variant, img_size=size)
    model = keras_twin(variant, reference, input_shape=(size, size, 3))
    assert model.name == variant, model.name
    check_parameter_count(model, keras_coat.MODEL_CONFIGS[variant]["params"])
    check_parameter_count(model, sum(p.numel() for p in reference.parameters()))
    images = random_images(2, size, size)
    outputs = outputs_of(model, images)
    expected = torch_forward(reference, images)
    assert np.abs(expected).max() > 0.1  # not a comparison of near-zero outputs
    _assert_same_outputs(outputs["output"], expected, f"{variant} at {size} against timm",
                         atol=PARITY_TOLERANCE)
    check_layer_names(model)
    check_layers_serializable(model)
    check_pyramid(model, images, keras_coat.MODEL_CONFIGS[variant]["embed_dims"], outputs)
    check_config_round_trip(model, images, expected=outputs)


# ---------------------------------------------------------------------------------------------
# Expensive checks


class Silence:
    """Records Python warnings (pytest's configured filters still apply), log records and
    printed output inside a `with` block; `assert_silent()` after it."""

    def __enter__(self):
        self._warnings = warnings.catch_warnings(record=True)
        self.caught = self._warnings.__enter__()
        warnings.filterwarnings("always", append=True)
        self._handler = logging.Handler(logging.INFO)
        self.logged = []
        self._handler.emit = lambda record: self.logged.append(record.getMessage())
        self._root_level = logging.getLogger().level
        logging.getLogger().addHandler(self._handler)
        logging.getLogger().setLevel(logging.INFO)
        self._printed = io.StringIO()
        self._redirects = contextlib.ExitStack()
        self._redirects.enter_context(contextlib.redirect_stdout(self._printed))
        self._redirects.enter_context(contextlib.redirect_stderr(self._printed))
        return self

    def __exit__(self, *exc):
        self._redirects.close()
        logging.getLogger().removeHandler(self._handler)
        logging.getLogger().setLevel(self._root_level)
        self._warnings.__exit__(*exc)
        self.printed = self._printed.getvalue()

    def assert_silent(self, what):
        warned = [f"{w.category.__name__}: {w.message}" for w in self.caught]
        assert not warned, f"{what} warned: {warned}"
        assert not self.logged, f"{what} logged: {self.logged}"
        assert not self.printed, f"{what} printed: {self.printed!r}"


def check_predict(model, images):
    """`predict` on NumPy arrays and on a batched `tf.data.Dataset` (any backend) gives what a
    call gives."""
    import tensorflow as tf

    expected = model(images)
    _assert_same_outputs(model.predict(images, batch_size=2, verbose=0), expected,
                         "predict on arrays", atol=1e-5)
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(2)
    _assert_same_outputs(model.predict(dataset, verbose=0), expected, "predict on tf.data",
                         atol=1e-5)


def _assert_same_model(restored, model, images, what, expected=None):
    """`restored` is `model` again: class, config, head attributes, parameters, shared layers,
    and identical outputs (`expected`: `model`'s `outputs_of`, when already computed)."""
    assert type(restored) is type(model), f"{what}: {type(restored).__name__}"
    assert restored.get_config() == model.get_config(), f"{what}: another config"
    for attribute in ("class_names", "preprocessing", "num_classes", "pooling", "activation",
                      "include_preprocessing"):
        if hasattr(model, attribute):
            got, wanted = getattr(restored, attribute), getattr(model, attribute)
            assert got == wanted, f"{what}: {attribute} {got!r} != {wanted!r}"
    assert restored.count_params() == model.count_params()
    # One CPE and one CRPE per scale, called by every block of the scale, stay shared.
    backbone = getattr(restored, "backbone", restored)
    names = [layer.name for layer in backbone.layers]
    for name in names:
        if re.fullmatch(r"c(rp|p)e\d", name):
            assert names.count(name) == 1, f"{what}: {name} is no longer one shared layer"
    expected = outputs_of(model, images) if expected is None else expected
    _assert_same_outputs(outputs_of(restored, images), expected, what)


def check_keras_file_round_trip(model, images, directory):
    """`model.save` and `keras.models.load_model` give the same class (classifier and backbone)
    with the same config, class names, preprocessing and identical outputs, loading silently."""
    for owner, inputs in ((model, images), (model.backbone, _normalized(model, images))):
        path = f"{directory}/{type(owner).__name__}.keras"
        owner.save(path)
        with Silence() as silence:
            restored = keras.models.load_model(path)
        silence.assert_silent(f"loading {path}")
        _assert_same_model(restored, owner, inputs, f".keras round trip of {owner.name}")


def check_weights_file_round_trip(model, images, directory):
    """`save_weights` then `load_weights` into a fresh model of the same config restores the
    outputs exactly."""
    path = f"{directory}/{model.name}.weights.h5"
    model.save_weights(path)
    fresh = type(model).from_config(model.get_config())
    fresh.load_weights(path)
    _assert_same_outputs(fresh(images), model(images), ".weights.h5 round trip")


def check_preset_round_trip(model, images, directory):
    """`save_to_preset` then `from_preset` of the classifier and of its backbone give the same
    classes, config, class names, preprocessing and outputs."""
    preset = f"{directory}/preset"
    model.save_to_preset(preset)
    with Silence() as silence:
        classifier = type(model).from_preset(preset)
        backbone = type(model.backbone).from_preset(preset)
    silence.assert_silent(f"from_preset({preset!r})")
    _assert_same_model(classifier, model, images, "preset round trip")
    _assert_same_model(backbone, model.backbone, _normalized(model, images),
                       "preset round trip of the backbone")


def check_mixed_precision(case, policy):
    """A model built under a mixed policy computes in the policy's dtype, keeps float32
    variables and float32 outputs, and is finite and close to the float32 model."""
    compute_dtype = policy.split("_")[1]
    full = case.build()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        mixed = case.build()
    finally:
        keras.config.set_dtype_policy(previous)
    mixed.set_weights(full.get_weights())
    assert {variable.dtype for variable in mixed.weights} == {"float32"}, "non-float32 variables"
    head = mixed.get_layer("head")
    assert head.compute_dtype == compute_dtype, head.compute_dtype
    assert keras.backend.standardize_dtype(head.output.dtype) == compute_dtype
    images = case.images()
    outputs = mixed(images)
    assert keras.backend.standardize_dtype(outputs.dtype) == "float32", outputs.dtype
    outputs = to_numpy(outputs)
    assert np.isfinite(outputs).all(), f"non-finite outputs under {policy}"
    _assert_same_outputs(outputs, full(images), f"{policy} against float32", atol=0.05)


def check_int8_quantization(model, images):
    """Keras' `quantize("int8")` runs without a warning, quantizes the dense projections and
    keeps the outputs close to the float model's (on a copy: the model stays float)."""
    quantized = rebuilt(model)
    with Silence() as silence:
        quantized.quantize("int8")
    silence.assert_silent('quantize("int8")')
    modes = {layer.name: layer.quantization_mode for layer in quantized._flatten_layers()
             if getattr(layer, "quantization_mode", None)}
    assert modes and set(modes.values()) == {"int8"}, modes
    assert "head" in modes and any(name.endswith("_proj") for name in modes), sorted(modes)
    _assert_same_outputs(quantized(images), model(images), "int8 against float32", atol=0.02)
    # Compiled (predict) and eager calls round the int8 rescaling differently.
    _assert_same_outputs(quantized.predict(images, verbose=0), quantized(images),
                         "int8 predict against call", atol=1e-4)


# Each check as `check(case, model, directory)`: `model` is what `case.build()` gave, which the
# check may not change; `directory` is the test's temporary directory.
CHEAP_CHECKS = {
    "build_and_call": lambda case, model, _: check_build_and_call(model, case.images()),
    "layer_names": lambda case, model, _: check_layer_names(model),
    "layers_serializable": lambda case, model, _: check_layers_serializable(model),
    "config_round_trip": lambda case, model, _: check_config_round_trip(model, case.images()),
    "pyramid": lambda case, model, _: check_pyramid(model, case.images(), case.embed_dims),
}
EXPENSIVE_CHECKS = {
    "predict": lambda case, model, _: check_predict(model, case.images()),
    "keras_file": lambda case, model, directory: check_keras_file_round_trip(
        model, case.images(), directory
    ),
    "weights_file": lambda case, model, directory: check_weights_file_round_trip(
        model, case.images(), directory
    ),
    "preset": lambda case, model, directory: check_preset_round_trip(
        model, case.images(), directory
    ),
    "mixed_float16": lambda case, model, _: check_mixed_precision(case, "mixed_float16"),
    "mixed_bfloat16": lambda case, model, _: check_mixed_precision(case, "mixed_bfloat16"),
    "int8": lambda case, model, _: check_int8_quantization(model, case.images()),
}
CHECKS = {**CHEAP_CHECKS, **EXPENSIVE_CHECKS}
