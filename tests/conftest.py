"""Shared pytest setup."""

import contextlib

# timm (through torchvision) and TensorFlow both bundle LLVM; importing timm
# after TensorFlow aborts the process ("Option ... registered more than
# once"), while the other order works. Load the reference stack first when it
# is installed, so any test may use both.
with contextlib.suppress(ImportError):
    import timm  # noqa: F401
