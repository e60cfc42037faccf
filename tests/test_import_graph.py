"""The import graph of keras_coat/, training/ and conversion/, read from the source with `ast`.

Every import counts, at any depth (module level, inside functions, under `if`), ``__init__`` and
``__main__`` included:

- no cycle;
- no upward import: keras_coat's modules form layers (base helpers -> presets -> weights ->
  backbone -> task -> export -> the package's front: ``__init__`` and ``__main__``), and a
  module imports only from its own layer or those before it; keras_coat never imports training
  or conversion;
- no private module (``_name.py``) is imported from outside its package;
- no module inside a package imports a name from that package's ``__init__`` (it imports the
  module defining the name);
- no import that `FORBIDDEN` names, though the layers allow it: the models reach weights only
  through the preset reader, and presets are pure data.

A new keras_coat module gets its layer in `LAYERS`.
"""

import ast
import pathlib
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("keras_coat", "training", "conversion")

# keras_coat's layers, in the order data flows (presets -> weights -> backbone -> task ->
# export); the key is a module or a package (then every module inside it).
LAYERS = {
    # Shared helpers and the building blocks every model is made of.
    "keras_coat.utils": 0,
    "keras_coat.version": 0,
    "keras_coat.initializers": 0,
    "keras_coat.layers": 0,
    "keras_coat.blocks": 0,
    # What identifies a checkpoint, and the ImageNet conventions (classes, evaluation transform).
    "keras_coat.presets": 1,
    "keras_coat.imagenet": 1,
    # The same conventions in TensorFlow graphs, and the readers of image data sets (both import
    # TensorFlow: only export and training use them).
    "keras_coat.tf_images": 1,
    "keras_coat.datasets": 1,
    # Getting weights in: reading, fetching, converting, loading.
    "keras_coat.checkpoint": 2,
    "keras_coat.weights": 2,
    "keras_coat.convert": 2,
    "keras_coat.loading": 2,
    "keras_coat.preset_io": 2,
    "keras_coat.legacy": 2,
    "keras_coat.hub": 2,
    "keras_coat.loader": 2,
    # The backbone, then the task models and their factories.
    "keras_coat.backbone": 3,
    "keras_coat.models": 3,
    "keras_coat.image_classifier": 4,
    "keras_coat.applications": 4,
    # Export, the last step.
    "keras_coat.export": 5,
    # The package's front: its public names and its command line.
    "keras_coat": 6,
    "keras_coat.__main__": 6,
}
LAYER_NAMES = ["helpers", "presets", "weights", "backbone", "task", "export", "front"]
# importer -> (the keras_coat modules it may not import, None for all of them; why)
FORBIDDEN = {
    **{
        model: (
            {"keras_coat.convert", "keras_coat.weights", "keras_coat.checkpoint",
             "keras_coat.loading"},
            "the models reach weights only through keras_coat.preset_io",
        )
        for model in ("keras_coat.backbone", "keras_coat.image_classifier", "keras_coat.layers",
                      "keras_coat.blocks")
    },
    "keras_coat.presets": (None, "presets are pure data"),
}


# ---------------------------------------------------------------------------------------------
# Reading the graph


def modules_of(root, packages=PACKAGES):
    """``{dotted module name: path}`` of every .py file of `packages` under `root`."""
    modules = {}
    for package in packages:
        for path in sorted((pathlib.Path(root) / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_package(modules, name):
    path = modules.get(name)
    return path is not None and path.name == "__init__.py"


def imports_of(name, path, modules):
    """``[(imported module, imported names or None, line)]`` for every import in the file,
    resolved to modules of the graph (imports of other libraries are left out).

    ``from package import name`` imports the module ``package.name`` when there is one, else
    the name from ``package``'s ``__init__``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if _is_package(modules, name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    found.append((alias.name, None, node.lineno))
                elif alias.name.split(".")[0] in modules:
                    raise AssertionError(f"{path}:{node.lineno} imports unknown {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            if source.split(".")[0] not in {m.split(".")[0] for m in modules}:
                continue
            names = []
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    found.append((submodule, None, node.lineno))
                else:
                    names.append(alias.name)
            if names:
                found.append((source, tuple(names), node.lineno))
    return found


def import_graph(root, packages=PACKAGES):
    modules = modules_of(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}, modules


# ---------------------------------------------------------------------------------------------
# The rules


def cycles(graph):
    """Each import cycle once, as ``a -> b -> ... -> a``."""
    edges = {m: sorted({target for target, _, _ in found if target != m})
             for m, found in graph.items()}
    found, state, stack = [], {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in edges.get(module, ()):
            if state.get(target) == "open":
                found.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)
    return found


def layer_of(module):
    """The layer of a keras_coat module (its own entry or its subpackage's); None if unlisted.

    The entry "keras_coat" is the package's ``__init__`` only.
    """
    if module in LAYERS:
        return LAYERS[module]
    parts = module.split(".")
    for end in range(len(parts) - 1, 1, -1):
        key = ".".join(parts[:end])
        if key in LAYERS:
            return LAYERS[key]
    return None


def upward_imports(graph):
    problems = []
    for module, found in graph.items():
        inside = module.split(".")[0] == "keras_coat"
        if inside and layer_of(module) is None:
            problems.append(f"{module} has no layer in LAYERS (tests/test_import_graph.py)")
            continue
        for target, _, line in found:
            if not inside:
                continue
            if target.split(".")[0] != "keras_coat":
                problems.append(f"{module}:{line} imports {target}: keras_coat is installed "
                                "without training/ and conversion/")
                continue
            source_layer, target_layer = layer_of(module), layer_of(target)
            if target_layer is None:
                continue  # reported as unlisted itself
            if target_layer > source_layer:
                problems.append(
                    f"{module}:{line} ({LAYER_NAMES[source_layer]}) imports {target} "
                    f"({LAYER_NAMES[target_layer]}), a later layer"
                )
    return problems


def private_modules_used_outside(graph, modules):
    problems = []
    for module, found in graph.items():
        for target, _, line in found:
            private = [part for part in target.split(".") if part.startswith("_")
                       and part not in ("__init__", "__main__")]
            if not private:
                continue
            # The package that owns the private module (or private package).
            parts = target.split(".")
            owner = ".".join(parts[: parts.index(private[0])])
            if not (module == owner or module.startswith(owner + ".")):
                problems.append(f"{module}:{line} imports the private module {target} of {owner}")
    return problems


def names_from_own_init(graph, modules):
    """``from package import name`` (or ``import package``) in a module inside `package`."""
    problems = []
    for module, found in graph.items():
        for target, names, line in found:
            if not _is_package(modules, target) or target == module:
                continue
            if module.startswith(target + "."):
                what = ", ".join(names) if names else "the package"
                problems.append(
                    f"{module}:{line} imports {what} from {target}'s __init__; import the "
                    "module that defines it"
                )
    return problems


def forbidden_imports(graph):
    problems = []
    for module, (targets, why) in FORBIDDEN.items():
        for target, _, line in graph.get(module, ()):
            if target.split(".")[0] == "keras_coat" and (targets is None or target in targets):
                problems.append(f"{module}:{line} imports {target}: {why}")
    return problems


# ---------------------------------------------------------------------------------------------
# The repository


@pytest.fixture(scope="module")
def repository():
    return import_graph(REPO_ROOT)


def test_the_graph_covers_every_module_and_function_level_imports(repository):
    graph, modules = repository
    assert {"keras_coat", "keras_coat.__main__", "training", "conversion.convert"} <= set(graph)
    # keras_coat/__init__.py imports the export package inside a function: it is in the graph.
    assert any(t.startswith("keras_coat.export") for t, _, _ in graph["keras_coat"])


def test_no_import_cycle(repository):
    assert cycles(repository[0]) == []


def test_no_upward_import(repository):
    assert upward_imports(repository[0]) == []


def test_no_private_module_is_used_outside_its_package(repository):
    assert private_modules_used_outside(*repository) == []


def test_no_module_imports_a_name_from_its_own_package_init(repository):
    assert names_from_own_init(*repository) == []


def test_no_forbidden_import(repository):
    assert set(FORBIDDEN) <= set(repository[0])  # the rules name modules that exist
    assert forbidden_imports(repository[0]) == []


# ---------------------------------------------------------------------------------------------
# Each rule catches a planted violation


def _tree(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return import_graph(root)


CLEAN = {
    "keras_coat/__init__.py": "from keras_coat.applications import create_model\n",
    "keras_coat/__main__.py": "def main():\n    from keras_coat.applications import create_model\n",
    "keras_coat/applications.py": "from keras_coat import loading\ndef create_model(): pass\n",
    "keras_coat/loading.py": "from keras_coat.utils import files\n",
    "keras_coat/utils/__init__.py": "",
    "keras_coat/utils/files.py": "import os\nfrom keras_coat.utils import _helpers\n",
    "keras_coat/utils/_helpers.py": "",
    "keras_coat/export/__init__.py": "from keras_coat.export.serving import contract\n",
    "keras_coat/export/serving.py": "contract = 1\n",
    "keras_coat/backbone.py": "from keras_coat import preset_io\n",
    "keras_coat/preset_io.py": "from keras_coat import loading\n",
    "keras_coat/presets.py": "",
    "training/__init__.py": "",
    "training/train.py": "import keras_coat\nfrom keras_coat.utils.files import os\n",
    "conversion/__init__.py": "",
    "conversion/convert.py": "from keras_coat.applications import create_model\n",
}


def test_a_clean_tree_passes(tmp_path):
    graph, modules = _tree(tmp_path, CLEAN)
    assert cycles(graph) == []
    assert upward_imports(graph) == []
    assert private_modules_used_outside(graph, modules) == []
    assert names_from_own_init(graph, modules) == []
    assert forbidden_imports(graph) == []


PLANTED = {
    "cycle, through a function-level import": (
        {"keras_coat/utils/files.py": "def f():\n    from keras_coat import loading\n"},
        cycles,
        "keras_coat.loading -> keras_coat.utils.files -> keras_coat.loading",
    ),
    "upward: weights imports the task": (
        {"keras_coat/loading.py": "if True:\n    from keras_coat.applications import x\n"},
        upward_imports,
        "keras_coat.loading:2 (weights) imports keras_coat.applications (task)",
    ),
    "keras_coat imports training": (
        {"keras_coat/applications.py": "def f():\n    import training.train\n"},
        upward_imports,
        "keras_coat.applications:2 imports training.train",
    ),
    "a module without a layer": (
        {"keras_coat/newcomer.py": ""},
        upward_imports,
        "keras_coat.newcomer has no layer",
    ),
    "private module from training": (
        {"training/train.py": "def f():\n    from keras_coat.utils._helpers import x\n"},
        private_modules_used_outside,
        "training.train:2 imports the private module keras_coat.utils._helpers of "
        "keras_coat.utils",
    ),
    "private module by a relative import": (
        {"keras_coat/export/serving.py": "from ..utils import _helpers\n"},
        private_modules_used_outside,
        "keras_coat.export.serving:1 imports the private module keras_coat.utils._helpers",
    ),
    "a name from keras_coat's __init__": (
        {"keras_coat/__main__.py": "def main():\n    from keras_coat import create_model\n"},
        names_from_own_init,
        "keras_coat.__main__:2 imports create_model from keras_coat's __init__",
    ),
    "the package itself from inside": (
        {"keras_coat/export/serving.py": "import keras_coat\n"},
        names_from_own_init,
        "keras_coat.export.serving:1 imports the package from keras_coat's __init__",
    ),
    "a model reads weights itself": (
        {"keras_coat/backbone.py": "def f():\n    from keras_coat.loading import x\n"},
        forbidden_imports,
        "keras_coat.backbone:2 imports keras_coat.loading: the models reach weights only through",
    ),
    "presets import a helper": (
        {"keras_coat/presets.py": "from keras_coat.utils import files\n"},
        forbidden_imports,
        "keras_coat.presets:1 imports keras_coat.utils.files: presets are pure data",
    ),
    "a name from a subpackage's __init__": (
        {"keras_coat/export/serving.py": "from keras_coat.export import contract\n"},
        names_from_own_init,
        "imports contract from keras_coat.export's __init__",
    ),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_a_planted_violation_fails(tmp_path, case):
    changes, rule, message = PLANTED[case]
    graph, modules = _tree(tmp_path, {**CLEAN, **changes})
    args = (graph,) if rule in (cycles, upward_imports, forbidden_imports) else (graph, modules)
    problems = rule(*args)
    assert any(message in problem for problem in problems), problems
