"""What importing keras_coat (or the training app) sets up before TensorFlow loads: TensorFlow's
oneDNN kernels on every x86 CPU. TensorFlow's own default turns them on only on CPUs with AVX-512
VNNI or newer extensions; on AVX2-only CPUs its Eigen kernels ran CoaT-Lite Small at 0.72x the
speed (docs/performance.md). A value the user set is kept."""

import platform
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT, subprocess_env

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN is set up on x86 only"
)

PROGRAM = textwrap.dedent("""
    import os
    import {entry}
    import tensorflow  # noqa: F401
    from tensorflow.python.util import _pywrap_util_port

    print(os.environ.get("TF_ENABLE_ONEDNN_OPTS"), _pywrap_util_port.IsMklEnabled())
""")


@pytest.mark.parametrize(
    "entry, user_setting, expected",
    [
        ("keras_coat", None, "1 True"),
        ("training.train", None, "1 True"),
        ("keras_coat", "0", "0 False"),
    ],
)
def test_tensorflows_onednn_kernels_are_on_after_importing_keras_coat_unless_the_user_chose(
    entry, user_setting, expected
):
    env = subprocess_env(KERAS_BACKEND="tensorflow", TF_ENABLE_ONEDNN_OPTS=user_setting)
    result = subprocess.run([sys.executable, "-c", PROGRAM.format(entry=entry)], env=env,
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == expected
