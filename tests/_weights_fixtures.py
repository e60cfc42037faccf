"""Helpers for the checkpoint / weights / CLI tests: a loopback file server,
manifests, checkpoints written by torch, hostile pickles, and running code in
a subprocess where torch cannot be imported."""

import contextlib
import hashlib
import http.server
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import threading
import zipfile

from tests.conftest import REPO_ROOT, subprocess_env  # noqa: F401 (REPO_ROOT: for the tests)


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class FileServer:
    """Serves files over HTTP on 127.0.0.1 from a thread, counting requests.

    ``files`` maps URL paths ("/x.pth") to local files. ``truncate_to`` maps a
    URL path to a byte count: the server announces the full Content-Length but
    sends only that many bytes, then closes the connection. ``behaviours`` maps
    a URL path to ``behaviour(handler, server)``, which answers the request
    itself (a hostile mirror), writing its body with ``server.send``; ``sent``
    counts the bytes each path's behaviour sent.
    """

    def __init__(self):
        self.files = {}
        self.truncate_to = {}
        self.behaviours = {}
        self.sent = {}
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                behaviour = server.behaviours.get(self.path)
                if behaviour is not None:
                    server.sent[self.path] = 0
                    try:
                        behaviour(self, server)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client hung up: what a refusal looks like from here
                    return
                local = server.files.get(self.path)
                if local is None:
                    self.send_error(404)
                    return
                with open(local, "rb") as f:
                    body = f.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: server.truncate_to.get(self.path, len(body))])
                self.close_connection = True

            def do_HEAD(self):
                server.requests.append("HEAD " + self.path)
                self.send_error(405)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def serve(self, url_path, local_path):
        self.files[url_path] = str(local_path)
        return self.url(url_path)

    def url(self, url_path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{url_path}"

    def send(self, handler, data):
        handler.wfile.write(data)
        handler.wfile.flush()
        self.sent[handler.path] += len(data)


def closed_port_url(name="x.pth"):
    """A loopback URL on which nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def write_manifest(path, entries):
    """Writes ``{name: {"url": ..., "sha256": ...}}`` to `path`; returns its path."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f)
    return str(path)


def use_manifest(monkeypatch, tmp_path, entries):
    """Points KERAS_COAT_WEIGHTS_MANIFEST at a manifest and KERAS_HOME at tmp_path."""
    manifest = write_manifest(tmp_path / "manifest.json", entries)
    monkeypatch.setenv("KERAS_COAT_WEIGHTS_MANIFEST", manifest)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    return manifest


class Hostile:
    """Unpickling this runs `command` through os.system (if allowed to)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class HostileCall:
    """Unpickling this calls `func(*args)` (if allowed to)."""

    def __init__(self, func, *args):
        self.func = func
        self.args = args

    def __reduce__(self):
        return (self.func, self.args)


def as_numpy(tensor):
    """A torch tensor (or NumPy array) as the array read_state_dict returns
    for it: bfloat16 becomes float32."""
    if not hasattr(tensor, "detach"):
        return tensor
    tensor = tensor.detach()
    if str(tensor.dtype) == "torch.bfloat16":
        tensor = tensor.float()
    return tensor.numpy()


def assert_same_tensors(arrays, tensors):
    """`arrays` (from read_state_dict) hold exactly `tensors`: names, shapes,
    dtypes and values."""
    import numpy as np

    assert sorted(arrays) == sorted(tensors)
    for name, tensor in tensors.items():
        expected = as_numpy(tensor)
        assert arrays[name].shape == expected.shape, name
        assert arrays[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(arrays[name], expected, err_msg=name)


def write_torch_like_zip(path, obj, storages=None, archive_name="archive"):
    """Writes `obj` pickled (protocol 2) in torch's zip layout, without torch.

    `storages` maps storage keys to raw bytes stored under data/<key>.
    """
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{archive_name}/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr(f"{archive_name}/byteorder", "little")
        z.writestr(f"{archive_name}/version", "3\n")
        for key, data in (storages or {}).items():
            z.writestr(f"{archive_name}/data/{key}", data)
    return str(path)


def save_authors_checkpoint(model, path, epoch=3):
    """torch.save in the CoaT authors' training layout."""
    import argparse

    import torch

    state_dict = model.state_dict()
    torch.save(
        {
            "model": state_dict,
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]},
            "lr_scheduler": {"base_lrs": [5e-4], "last_epoch": epoch},
            "epoch": epoch,
            "model_ema": state_dict,
            "args": argparse.Namespace(model=str(type(model).__name__), lr=5e-4, drop_path=0.1),
        },
        path,
    )
    return str(path)


def import_blocker(package):
    """Python source that makes ``import <package>`` (and its submodules) fail."""
    return textwrap.dedent(f"""
        import sys

        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name == {package!r} or name.startswith({package + "."!r}):
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
                return None

        sys.meta_path.insert(0, _Block())
        """)


# Prepended to code run by `run_without_torch`: any import of torch fails as
# if it were not installed (while `sys.modules` stays free of it, as libraries
# probing for torch expect).
_BLOCK_TORCH = import_blocker("torch") + textwrap.dedent("""
    try:
        import torch
    except ImportError:
        pass
    else:
        raise SystemExit("torch is still importable")
    """)


def run_without_torch(code, env_updates=None, timeout=600):
    """Runs `code` in a fresh interpreter where ``import torch`` fails.

    Returns the CompletedProcess; raises AssertionError with the output when
    it exits non-zero.
    """
    env = subprocess_env(**(env_updates or {}))
    program = _BLOCK_TORCH + textwrap.dedent(code) + '\nassert "torch" not in sys.modules\n'
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def fake_writer(calls):
    """A `write` for `keras_coat.weights.ensure_preset` that records its calls and writes the
    state dict's arrays (or the 0.1 entry's path) as a preset-like directory: one HDF5 file and
    the metadata.json an intact cache entry has (the source, every file's SHA-256)."""

    def write(checkpoint_name, source, folder, metadata):
        import h5py

        calls.append((checkpoint_name, sorted(source) if isinstance(source, dict) else source))
        path = os.path.join(folder, "model.weights.h5")
        with h5py.File(path, "w") as f:
            for name, value in (source.items() if isinstance(source, dict) else ()):
                f[name] = value
        with open(os.path.join(folder, "metadata.json"), "w", encoding="utf-8") as f:
            json.dump({**metadata, "files": {"model.weights.h5": sha256_of(path)}}, f)

    return write


@contextlib.contextmanager
def no_network():
    """Makes any attempt to open a socket connection fail loudly."""
    real = socket.socket.connect

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"unexpected network access to {args}")

    socket.socket.connect = refuse
    try:
        yield
    finally:
        socket.socket.connect = real
