"""CoaT models as Keras objects: `.keras` round trips of every variant, `.weights.h5` loading
into classifiers and backbones, and the one-way import graph of the package.

`make test` runs it on every backend; the round trip of all seven variants (slow) on TensorFlow
only, the tiny configurations on JAX and PyTorch as well.
"""

import ast
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_coat
from keras_coat.convert import ConversionError
from keras_coat.loading import load_keras_weights
from tests._weights_fixtures import import_blocker

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

PACKAGE_DIR = os.path.dirname(keras_coat.__file__)
REPO_ROOT = os.path.dirname(PACKAGE_DIR)
TINY_LITE = dict(embed_dims=(16, 16, 24, 32), serial_depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2))
TINY_COAT = dict(
    embed_dims=(16, 24, 24, 24), serial_depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2),
    parallel_depth=2,
)
SIZE = 32


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _images(batch=2, size=SIZE, seed=0):
    return (np.random.RandomState(seed).rand(batch, size, size, 3) * 255).astype("float32")


class Quiet:
    """Records Python warnings, Keras' log records and printed output inside a `with` block."""

    def __init__(self, capsys, caplog):
        self.capsys, self.caplog = capsys, caplog

    def __enter__(self):
        self.capsys.readouterr()
        self.caplog.clear()
        self._warnings = warnings.catch_warnings(record=True)
        self.caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        # Upstream: Keras' TensorFlow and torch backends convert variables with np.array(x),
        # which NumPy 2 flags (hidden by default) whenever weights are written, as the loader's
        # layout check does; nothing keras-coat can change.
        warnings.filterwarnings(
            "ignore", message="__array__ implementation doesn't accept a copy keyword",
            category=DeprecationWarning,
        )
        self._level = self.caplog.at_level(logging.INFO)
        self._level.__enter__()
        return self

    def __exit__(self, *exc):
        self._level.__exit__(*exc)
        self._warnings.__exit__(*exc)
        printed = self.capsys.readouterr()
        self.printed = printed.out + printed.err
        self.logged = [r.getMessage() for r in self.caplog.records]

    def assert_silent(self):
        assert [str(w.message) for w in self.caught] == []
        assert self.logged == []
        assert self.printed == ""


def _outputs(model):
    """One forward pass giving the model's outputs: a classifier's and its pyramid, or all of a
    backbone's (its pyramid and final tokens)."""
    if isinstance(model, keras_coat.CoaTImageClassifier):
        return keras.Model(model.input, {"output": model.output, **model.pyramid_outputs})(
            _images()
        )
    return model(_images())


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("variant", list(keras_coat.MODEL_CONFIGS))
def test_every_variant_saves_and_loads_as_itself(variant, tmp_path, capsys, caplog):
    classifier = keras_coat.create_model(variant, input_shape=(SIZE, SIZE, 3), classes=10)
    expected = {k: _np(v) for k, v in _outputs(classifier).items()}
    dims = keras_coat.MODEL_CONFIGS[variant]["embed_dims"]
    shapes = {f"P{i + 2}": (None, SIZE // s, SIZE // s, d) for i, (s, d) in
              enumerate(zip((4, 8, 16, 32), dims))}

    for model, kind in ((classifier, keras_coat.CoaTImageClassifier),
                        (classifier.backbone, keras_coat.CoaTBackbone)):
        path = tmp_path / f"{kind.__name__}.keras"
        model.save(path)
        with Quiet(capsys, caplog) as quiet:
            restored = keras.models.load_model(path)
        quiet.assert_silent()
        assert type(restored) is kind
        assert {k: tuple(v.shape) for k, v in restored.pyramid_outputs.items()} == shapes
        assert restored.count_params() == model.count_params()
        # One CPE and one CRPE per scale, called by every block of the scale.
        backbone_layers = getattr(restored, "backbone", restored).layers
        for name in ("cpe2", "crpe2", "cpe4", "crpe4"):
            assert sum(layer.name == name for layer in backbone_layers) == 1
        assert restored.get_config() == model.get_config()
        outputs = {k: _np(v) for k, v in _outputs(restored).items()}
        reference = expected if kind is keras_coat.CoaTImageClassifier else {
            k: _np(v) for k, v in _outputs(model).items()
        }
        for key in outputs:
            np.testing.assert_array_equal(outputs[key], reference[key])
        if kind is keras_coat.CoaTBackbone:
            # The bare backbone takes normalized images: its pyramid on the classifier's
            # normalized pixels is the classifier's pyramid.
            normalized = classifier.get_layer("imagenet_normalization")(_images())
            for level, feature_map in restored(normalized).items():
                if level in shapes:
                    np.testing.assert_array_equal(_np(feature_map), expected[level])
        else:
            for level in shapes:
                np.testing.assert_array_equal(outputs[level], expected[level])


@pytest.fixture(scope="module", params=[TINY_LITE, TINY_COAT], ids=["lite", "coat"])
def saved_classifier(request, tmp_path_factory):
    config = request.param
    model = keras_coat.CoaT(**config, input_shape=(SIZE, SIZE, 3), classes=6)
    path = str(tmp_path_factory.mktemp("weights") / "classifier.weights.h5")
    model.save_weights(path)
    return config, model, path


@pytest.mark.parametrize("pooling", [None, "token", "avg"])  # "max" builds as "avg" does
def test_backbones_load_their_classifiers_weights_file(saved_classifier, pooling, capsys, caplog):
    config, classifier, path = saved_classifier
    with Quiet(capsys, caplog) as quiet:
        backbone = keras_coat.CoaT(**config, input_shape=(SIZE, SIZE, 3), include_top=False,
                                   pooling=pooling, weights=path)
    quiet.assert_silent()
    # The headless model is the classifier's own backbone (and pooling): the same weights.
    _assert_same_weights(backbone.backbone, classifier.backbone)
    if pooling is not None and config.get("parallel_depth"):
        _assert_same_weights(backbone.get_layer("aggregate"), classifier.get_layer("aggregate"))
    expected = _np(backbone(_images()))

    # And a headless model's own file loads into a headless model of the same pooling, and the
    # bare backbone reads both.
    own = os.path.join(os.path.dirname(path), f"backbone-{pooling}.weights.h5")
    backbone.save_weights(own)
    again = keras_coat.CoaT(**config, input_shape=(SIZE, SIZE, 3), include_top=False,
                            pooling=pooling, weights=own)
    np.testing.assert_array_equal(_np(again(_images())), expected)
    for source in (path, own):
        bare = keras_coat.CoaTBackbone(**config, image_shape=(SIZE, SIZE, 3))
        load_keras_weights(bare, source)
        _assert_same_weights(bare, classifier.backbone)


def _assert_same_weights(model, reference):
    assert len(model.weights) == len(reference.weights)
    for got, expected in zip(model.weights, reference.weights):
        np.testing.assert_array_equal(_np(got), _np(expected))


@pytest.mark.parametrize(
    "changes",
    [
        dict(embed_dims=(32, 32, 32, 32)),  # wider: shapes the file lacks
        dict(serial_depths=(2, 1, 1, 1)),  # deeper: more arrays than the file has
        dict(serial_depths=(1, 1, 1, 1), classes=7),  # another head
        dict(include_top=False, pooling=None, serial_depths=(1, 2, 1, 1)),
    ],
    ids=["wider", "deeper", "classes", "headless-deeper"],
)
def test_weights_file_of_another_model_is_refused_before_keras_warns(
    saved_classifier, changes, capsys, caplog
):
    config, _, path = saved_classifier
    kwargs = {"input_shape": (SIZE, SIZE, 3), "classes": 6, **config, **changes}
    with Quiet(capsys, caplog) as quiet:
        with pytest.raises(ConversionError, match="another variant") as info:
            keras_coat.CoaT(**kwargs, weights=path)
    quiet.assert_silent()
    assert path in str(info.value)


def test_a_shallower_model_is_refused_and_keeps_its_weights(tmp_path, capsys, caplog):
    deep = keras_coat.CoaT(**dict(TINY_COAT, serial_depths=(2, 1, 1, 1)),
                           input_shape=(SIZE, SIZE, 3), classes=6)
    path = str(tmp_path / "deep.weights.h5")
    deep.save_weights(path)
    from keras_coat.loading import load_weights_file

    shallow = keras_coat.CoaT(**TINY_COAT, input_shape=(SIZE, SIZE, 3), classes=6)
    before = [w.copy() for w in shallow.get_weights()]
    with Quiet(capsys, caplog) as quiet:
        with pytest.raises(ConversionError, match="another variant"):
            load_weights_file(shallow, path)
    quiet.assert_silent()
    for old, new in zip(before, shallow.get_weights()):
        np.testing.assert_array_equal(old, new)


def test_a_backbone_file_does_not_fill_a_classifier(tmp_path):
    backbone = keras_coat.CoaT(**TINY_LITE, input_shape=(SIZE, SIZE, 3), include_top=False)
    path = str(tmp_path / "backbone.weights.h5")
    backbone.save_weights(path)
    with pytest.raises(ConversionError, match=r"lacks .*\(32, 6\)"):
        keras_coat.CoaT(**TINY_LITE, input_shape=(SIZE, SIZE, 3), classes=6, weights=path)


def test_classifier_holds_a_backbone_and_checks_its_head():
    backbone = keras_coat.CoaTBackbone(**TINY_LITE, image_shape=(SIZE, SIZE, 3))
    with pytest.raises(ValueError, match="headless"):
        keras_coat.CoaTImageClassifier(backbone, num_classes=3, pooling=None)
    with pytest.raises(ValueError, match="pooling"):
        keras_coat.CoaTImageClassifier(backbone, num_classes=3, pooling="sum")
    with pytest.raises(ValueError, match="2 names for num_classes=3"):
        keras_coat.CoaTImageClassifier(backbone, num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="CoaTBackbone"):
        keras_coat.CoaTImageClassifier(keras.Sequential([keras.Input((4,))]), num_classes=3)


def _imports(path, package):
    """Modules of `package` that the file at `path` imports, at any depth in its code."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            module = name.split(".")[:2]
            if module[0] == package and len(module) == 2:
                found.add(module[1])
    return found


def test_the_package_imports_in_one_direction():
    modules = {
        name[:-3]: os.path.join(PACKAGE_DIR, name)
        for name in os.listdir(PACKAGE_DIR)
        if name.endswith(".py") and name not in ("__init__.py", "__main__.py")
    }
    graph = {name: _imports(path, "keras_coat") & modules.keys() - {name}
             for name, path in modules.items()}
    for module in ("checkpoint", "convert", "weights", "presets", "preset_io", "loading",
                   "backbone", "layers", "blocks"):
        assert "image_classifier" not in graph[module] and "applications" not in graph[module]
    # The models reach weights only through the preset reader; presets are pure data.
    for module in ("backbone", "image_classifier", "layers", "blocks"):
        assert not graph[module] & {"convert", "weights", "checkpoint", "loading"}
    assert not graph["presets"]
    assert not graph["preset_io"] & {"backbone", "image_classifier"}

    # Depth-first search for a cycle.
    state = {}

    def visit(name, path):
        state[name] = "open"
        for dependency in sorted(graph[name]):
            if state.get(dependency) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path + [dependency])}")
            if dependency not in state:
                visit(dependency, path + [dependency])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_imports_in_functions_count_for_the_import_graph(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        "def f():\n    from keras_coat import weights\n    import keras_coat.backbone\n"
    )
    assert _imports(str(source), "keras_coat") == {"weights", "backbone"}


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
def test_the_package_works_without_keras_hub(tmp_path):
    program = import_blocker("keras_hub") + textwrap.dedent(f"""
        import keras
        import numpy as np
        import keras_coat

        model = keras_coat.CoaTLiteTiny(input_shape=(32, 32, 3), include_top=False)
        model.save({str(tmp_path / "backbone.keras")!r})
        restored = keras.models.load_model({str(tmp_path / "backbone.keras")!r})
        x = np.zeros((1, 32, 32, 3), "float32")
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(restored(x)), keras.ops.convert_to_numpy(model(x))
        )
        assert sorted(restored.pyramid_outputs) == ["P2", "P3", "P4", "P5"]
        assert not any(name.startswith("keras_hub") for name in sys.modules)
    """)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            env=env, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
