"""``python -m keras_coat.export REQUEST``: the TensorFlow process that writes an export for a
process running Keras on JAX or PyTorch (`keras_coat.export.any_backend`)."""

import signal
import sys

from keras_coat.export.any_backend import serve_request


def _stop(signum, frame):
    # Asked to stop by the parent: SystemExit unwinds the export, whose handlers remove what it
    # staged.
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m keras_coat.export REQUEST (written by keras_coat.export)")
    signal.signal(signal.SIGTERM, _stop)
    serve_request(sys.argv[1])
