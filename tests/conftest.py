"""Shared pytest setup: the reference stack before TensorFlow, and the Keras backend helpers.

The layer, model, parity and serialization tests run once per Keras backend (`make test` runs
them on TensorFlow, then again with KERAS_BACKEND=jax and KERAS_BACKEND=torch); these helpers
let a test say what it needs of the backend it runs on.
"""

import contextlib

# timm (through torchvision) and TensorFlow both bundle LLVM; importing timm
# after TensorFlow aborts the process ("Option ... registered more than
# once"), while the other order works. Load the reference stack first when it
# is installed, so any test may use both.
with contextlib.suppress(ImportError):
    import timm  # noqa: F401

import keras  # noqa: E402
import pytest  # noqa: E402


def pytest_report_header(config):
    return f"Keras {keras.__version__} on the {keras.config.backend()} backend"


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
