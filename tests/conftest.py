"""Shared pytest set-up: the tiny model configurations and array helpers every test uses, the
`backends` marker, a fresh Keras state for every test, and a report of each test process's
peak resident memory.

Backends: a test runs on TensorFlow only unless it declares more with
``@pytest.mark.backends("tensorflow", "jax", "torch")`` (on the test, or as a module's
``pytestmark``). A pytest process runs on one Keras backend (``KERAS_BACKEND``); the tests
that exclude it are deselected, so `make test` runs one pass per backend over the whole tree.

Memory: each test process (xdist worker) reports its peak resident set size and that of its
largest child process at the end of the run; a process above ``KERAS_COAT_TEST_RSS_LIMIT_GB``
(6 by default) fails the run, and the test during which the limit was crossed is named as soon
as it ends.
"""

import atexit
import contextlib
import ctypes
import gc
import os
import shutil
import sys
import tempfile
import threading
import time

# One JAX compilation cache on disk for the whole run: the test processes and every subprocess
# they start (the training runs, the other-backend checks) share what any of them compiled, so
# a train step or a model's forward pass at a given shape is compiled once per run instead of
# once per process; eager ops too (a first eager call compiles a few hundred of them). Set here,
# before JAX is imported, by the process that starts the run (xdist's workers inherit it); a
# new folder for every run and removed at its end, so no run reuses another's compilations.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _jax_cache = tempfile.mkdtemp(prefix="keras-coat-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)

# One thread per op in TensorFlow and PyTorch (their intra-op pools; OpenMP): `make test` runs two
# test processes on two cores, each of which would otherwise size its pools to both cores, and
# the idle threads of the pools spin while they wait. Inter-op pools keep their size: collective
# ops (MirroredStrategy, MultiWorkerMirroredStrategy) wait on one another there. Inherited by
# every subprocess, like the cache above; a variable set before the run wins.
for _name in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

# timm (through torchvision) and TensorFlow both bundle LLVM; importing timm
# after TensorFlow aborts the process ("Option ... registered more than
# once"), while the other order works. Load the reference stack first when it
# is installed, so any test may use both.
with contextlib.suppress(ImportError):
    import timm  # noqa: F401

# keras_coat before Keras: it sets TensorFlow's defaults (oneDNN on every x86 CPU) as users get
# them; the test processes' subprocesses inherit them.
import keras_coat  # noqa: E402, F401
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("tensorflow", "jax", "torch")

# ---------------------------------------------------------------------------------------------
# Tiny models and inputs

# Custom configurations of each family that build and run in well under a second; every
# behaviour that does not depend on a variant's width or depth is tested on them.
TINY_LITE = dict(embed_dims=(16, 16, 24, 32), serial_depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2))
TINY_COAT = dict(
    embed_dims=(16, 24, 24, 24), serial_depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2),
    parallel_depth=2,
)
TINY_CONFIGS = {"lite": TINY_LITE, "coat": TINY_COAT}


def to_numpy(tree):
    """A backend tensor (or a nest of them) as NumPy arrays."""
    return keras.tree.map_structure(lambda x: np.asarray(keras.ops.convert_to_numpy(x)), tree)


def pixels(batch, height, width=None, seed=0):
    """Random RGB pixels in [0, 255], float32 ``[batch, height, width, 3]``."""
    width = height if width is None else width
    rng = np.random.RandomState(seed)
    return (rng.rand(batch, height, width, 3) * 255).astype("float32")


def subprocess_env(**changes):
    """The environment for a Python subprocess of a test: this checkout first on the path, no
    TensorFlow log noise, and `changes` (a value of None removes the variable)."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


# Python source that a memory-bounded subprocess runs first: `limit_address_space(margin_mib)`
# caps its address space (RLIMIT_AS) at what it holds now plus the margin, so that whatever it
# does next (decode a hostile image, read a hostile checkpoint) fails with MemoryError long before
# it could take the machine's memory.
ADDRESS_SPACE_LIMIT = r'''
import resource as _resource


def vm_size():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def limit_address_space(margin_mib):
    limit = vm_size() + int(margin_mib) * 2**20
    _resource.setrlimit(_resource.RLIMIT_AS, (limit, _resource.RLIM_INFINITY))
'''


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_config(request):
    """Each tiny configuration in turn (ids "coat", "lite")."""
    return TINY_CONFIGS[request.param]


@pytest.fixture
def keras_backend():
    """The Keras backend of this test process: "tensorflow", "jax" or "torch"."""
    return keras.config.backend()


@pytest.fixture
def dtype_policy():
    """Sets Keras' global dtype policy for one test: `dtype_policy("mixed_bfloat16")`; the
    policy in force before is restored afterwards, whatever the test does."""
    previous = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(previous)


@pytest.fixture
def hub_server():
    """A loopback server speaking the Hugging Face Hub's HTTP protocol on 127.0.0.1
    (tests/hub_server.py), with no repos: `hub_server.add_repo(...)` adds some, and
    `hub_server.run_python(script, home)` runs a client (huggingface_hub, keras_coat.hub) against
    it in a subprocess."""
    from tests.hub_server import HubServer

    with HubServer() as server:
        yield server


# Above this resident size after a test, the process also drops JAX's compiled-op caches and
# returns freed memory to the system (see `_fresh_keras_state`).
TRIM_ABOVE = 3 * 2**30


def _resident():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Every test starts from a fresh Keras state: the models, graphs and kernel caches a test
    leaves behind would otherwise pile up in the process that runs the next ones.

    Measured: that is not enough on JAX, whose eager ops keep an XLA executable for every
    operation and shape they ran (about 0.4 GB more per published variant run eagerly, 6.2 GB
    for the layer, model, parity and harness tests in one process); and memory the allocator
    got back stays resident. So past `TRIM_ABOVE` the caches go (the next tests recompile what
    they run) and the freed memory is returned (malloc_trim): 3.2 GB back to 1.2 GB.
    """
    yield
    keras.backend.clear_session()  # and gc.collect()
    if sys.platform.startswith("linux") and _resident() > TRIM_ABOVE:
        if keras.config.backend() == "jax":
            import jax

            jax.clear_caches()
            gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------------------------------------
# The `backends` marker


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "backends(*names): the Keras backends the test runs on (default: tensorflow only)",
    )
    config.pluginmanager.register(_MemoryReport(config), "keras_coat_memory")


def pytest_report_header(config):
    return f"Keras {keras.__version__} on the {keras.config.backend()} backend"


def declared_backends(item):
    """The backends an item declares (its closest `backends` marker), TensorFlow by default."""
    marker = item.get_closest_marker("backends")
    if marker is None:
        return ("tensorflow",)
    unknown = set(marker.args) - set(BACKENDS)
    if unknown or not marker.args:
        raise pytest.UsageError(f"{item.nodeid}: backends{marker.args}: choose from {BACKENDS}")
    return marker.args


def pytest_collection_finish(session):
    # Everything imported so far (TensorFlow, JAX, PyTorch, the test modules) lives for the whole
    # run: out of the garbage collector's sight, a full collection (Keras runs one at every
    # clear_session and whenever a layer drops a variable, as quantization does) takes
    # microseconds instead of about 0.6 s.
    gc.freeze()


# The test files that take longest (measured, longest first), which `make test`'s two workers
# start with: a worker takes a whole file at a time (`--dist loadfile`, in collection order with
# `--no-loadscope-reorder`), so a long file started last would leave the other worker idle.
LONGEST_FILES = (
    "test_training_jax.py", "test_training_distributed.py", "test_resolve.py", "test_harness.py",
    "test_export.py", "test_export_backends.py", "test_hub_presets.py", "test_export_formats.py",
    "test_training.py", "test_transfer.py", "test_benchmarks.py", "test_evaluate.py",
    "test_adversarial_cli.py", "test_compatibility.py", "test_serialization.py",
    "test_detection.py", "test_weights.py", "test_models.py", "test_parity.py",
)


def pytest_collection_modifyitems(config, items):
    backend = keras.config.backend()
    selected, deselected = [], []
    for item in items:
        (selected if backend in declared_backends(item) else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    # A stable sort: the other files keep their order, after the long ones.
    selected.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    items[:] = selected


# ---------------------------------------------------------------------------------------------
# Peak resident memory per test process

GIB = 2**30
RSS_LIMIT = float(os.environ.get("KERAS_COAT_TEST_RSS_LIMIT_GB", "6")) * GIB


def _high_water_rss(pid="self"):
    """Peak resident set size in bytes of a process since it started its program (VmHWM; 0 once
    it is gone). Not `ru_maxrss`: that also counts the parent's memory at the fork."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _descendants(root):
    """Process ids of every descendant of `root`, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


class _MemoryReport:
    """Follows the peak RSS of this test process and of the processes its tests start (sampled
    twice a second), test by test; the xdist controller gathers every worker's figures and prints
    them at the end of the run."""

    def __init__(self, config):
        self.config = config
        self.name = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.peak = {"self": [0, None], "children": [0, None]}  # bytes, the test that set it
        self.growth = []  # (bytes, test): how much each test raised this process's peak
        self.over = []
        self.workers = {}
        self.test = None
        controller = not hasattr(config, "workerinput") and config.getoption("numprocesses", 0)
        if not controller:  # the xdist controller runs no test: its workers report
            threading.Thread(target=self._watch_children, daemon=True).start()

    def pytest_collection_finish(self, session):
        # What the imports and the collection took: the tests' growth is measured from here.
        self.peak["self"] = [_high_water_rss(), "the imports and collection"]

    def _watch_children(self):
        while True:
            peak = max((_high_water_rss(pid) for pid in _descendants(os.getpid())), default=0)
            if peak > self.peak["children"][0]:
                self.peak["children"] = [peak, self.test]
            time.sleep(0.5)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item):
        self.test = item.nodeid
        yield
        peak = _high_water_rss()
        if peak > self.peak["self"][0]:
            self.growth = sorted(self.growth + [(peak - self.peak["self"][0], item.nodeid)])[-3:]
            self.peak["self"] = [peak, item.nodeid]
        for key in ("self", "children"):
            peak, nodeid = self.peak[key]
            if peak > RSS_LIMIT and not any(k == key for k, _ in self.over):
                self.over.append((key, nodeid))
                process = "a child process of " if key == "children" else ""
                sys.stderr.write(
                    f"\nMEMORY: {process}test process {self.name} passed {RSS_LIMIT / GIB:.1f} "
                    f"GB resident ({peak / GIB:.2f} GB) in {nodeid}\n"
                )

    def pytest_sessionfinish(self, session):
        if hasattr(self.config, "workeroutput"):  # an xdist worker: tell the controller
            self.config.workeroutput["keras_coat_memory"] = self._report()
        else:
            self.workers.setdefault(self.name, self._report())
        if any(report["over"] for report in self.workers.values()):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _report(self):
        return {"peak": self.peak, "over": self.over, "growth": self.growth}

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        report = getattr(node, "workeroutput", {}).get("keras_coat_memory")
        if report is not None:
            self.workers[node.gateway.id] = report

    def pytest_terminal_summary(self, terminalreporter):
        if hasattr(self.config, "workeroutput") or not any(
            report["peak"]["self"][0] for report in self.workers.values()
        ):
            return  # a worker, or nothing ran
        write = terminalreporter.write_line
        terminalreporter.section("peak resident memory per test process")
        for name, report in sorted(self.workers.items()):
            for key, label in (("self", "itself"), ("children", "its largest child")):
                peak, nodeid = report["peak"][key]
                if peak:
                    write(f"{name} {label}: {peak / GIB:.2f} GB (reached in {nodeid})")
            raised = ", ".join(f"{test} +{grown / GIB:.2f} GB" for grown, test in
                               reversed(report.get("growth", [])))
            if raised:
                write(f"{name}: the tests that raised its peak most: {raised}")
        for name, report in sorted(self.workers.items()):
            for key, nodeid in report["over"]:
                process = f"a child of {name}" if key == "children" else name
                write(f"FAILED: {process} passed the limit of {RSS_LIMIT / GIB:.1f} GB resident "
                      f"in {nodeid}", red=True, bold=True)
