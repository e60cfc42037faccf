"""The published CoaT checkpoints in the weights cache: fetched, verified and converted once.

`ensure_preset(name, write)` returns the preset directory ``$KERAS_HOME/models/keras_coat/
<name>-<sha8>/`` (``KERAS_HOME`` defaults to ``~/.keras``) of a built-in checkpoint:

1. its URL and SHA-256 come from `keras_coat.presets`, or from the JSON manifest named by
   ``KERAS_COAT_WEIGHTS_MANIFEST``, which replaces the table (mirrors, offline machines)::

       {"coat_lite_tiny": {"url": "file:///mirror/coat_lite_tiny.pth", "sha256": "e88e96b0"}}

   (``http://``, ``https://`` or ``file://`` URLs of ``.pth``, ``.pt``, ``.bin`` or
   ``.safetensors`` files; the full digest or a prefix of at least 8 hex digits);
2. an intact directory is returned with no network access: its ``metadata.json`` names the
   checkpoint and its full SHA-256, and the SHA-256 of every other file, hashed again on every
   load. A damaged entry (a changed, missing or extra file, a folder or FIFO in a file's place,
   another checkpoint's conversion) is rebuilt;
3. otherwise the checkpoint is downloaded beside the cache (size cap, time budget), its SHA-256
   checked, read without running anything from it (`keras_coat.checkpoint`) and handed to the
   caller's `write`, which writes the preset into a hidden directory then renamed into place.
   An intact cache entry of keras-coat 0.1 (`keras_coat.legacy`) is converted instead, without
   a download, and deleted.

A lock file serializes processes building the same entry; nothing appears under its final name
before it is complete, so interrupted loads never leave a broken cache.
"""

import collections
import contextlib
import http.client
import json
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.parse
import urllib.request
import uuid

import keras

from keras_coat import legacy
from keras_coat.checkpoint import SUPPORTED_EXTENSIONS, read_state_dict
from keras_coat.presets import BASE_URL, PRESETS, PresetError, get_preset
from keras_coat.utils.files import TEMPORARY_MARK, publish, publish_directory, sha256

__all__ = [
    "BASE_URL",
    "CHECKPOINTS",
    "MANIFEST_ENV",
    "ManifestError",
    "WeightsDownloadError",
    "WeightsEntry",
    "cache_dir",
    "cached_preset_path",
    "checkpoint_entry",
    "checkpoint_table",
    "ensure_preset",
    "is_intact",
]

MANIFEST_ENV = "KERAS_COAT_WEIGHTS_MANIFEST"
METADATA_FILE = "metadata.json"  # keras_coat.preset_io's name, which this module cannot import
# Seconds a download may wait on the server for any single read.
DOWNLOAD_TIMEOUT = 60.0
# Seconds a whole download may take: a server trickling bytes is cut off (30 minutes is over
# 100 kB/s for the largest checkpoint, coat_lite_medium's 180 MB).
DOWNLOAD_TIME_BUDGET = 1800.0
_MAX_REDIRECTS = 5


# Where a checkpoint lives and the (prefix of its) SHA-256 digest.
WeightsEntry = collections.namedtuple("WeightsEntry", "name url sha256")


# The published checkpoints' sources, as `keras_coat.presets` gives them.
CHECKPOINTS = {
    name: WeightsEntry(name, preset.url, preset.sha256) for name, preset in PRESETS.items()
}

_HEX = re.compile(r"[0-9a-f]+")
_URL_SCHEMES = ("http", "https", "file")
_MANIFEST_FIELDS = {"url", "sha256"}


class ManifestError(PresetError):
    """The weights manifest (``KERAS_COAT_WEIGHTS_MANIFEST``) is unusable."""


class WeightsDownloadError(OSError):
    """A checkpoint could not be downloaded, or failed its SHA-256 check."""


def checkpoint_table():
    """The checkpoint table in force: the manifest's if one is set, else `CHECKPOINTS`."""
    path = os.environ.get(MANIFEST_ENV)
    if not path:
        return dict(CHECKPOINTS)
    return read_manifest(path)


def read_manifest(path):
    """Reads and validates a weights manifest; returns ``{name: WeightsEntry}``."""
    where = f"the weights manifest {path!r} (named by {MANIFEST_ENV})"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ManifestError(f"Cannot read {where}: {e}.") from e
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where} is not valid JSON: {e}.") from e
    if not isinstance(data, dict):
        raise ManifestError(
            f"{where} must hold a JSON object mapping checkpoint names to "
            '{"url": ..., "sha256": ...}; found a JSON ' + type(data).__name__ + "."
        )
    table = {}
    for name, spec in data.items():
        if name not in CHECKPOINTS:
            raise ManifestError(
                f"{where} names an unknown checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}."
            )
        table[name] = _manifest_entry(name, spec, where)
    return table


def _manifest_entry(name, spec, where):
    if not isinstance(spec, dict) or set(spec) != _MANIFEST_FIELDS:
        raise ManifestError(
            f"In {where}, the entry for {name!r} must be an object with exactly the fields "
            f"'url' and 'sha256'; found {spec!r}."
        )
    url, digest = spec["url"], spec["sha256"]
    parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in _URL_SCHEMES:
        raise ManifestError(
            f"In {where}, the url of {name!r} must start with http://, https:// or file://; "
            f"found {url!r}."
        )
    if not parsed.path.lower().endswith(SUPPORTED_EXTENSIONS):
        raise ManifestError(
            f"In {where}, the url of {name!r} must name a file ending in "
            f"{', '.join(SUPPORTED_EXTENSIONS)}; found {url!r}."
        )
    if parsed.scheme == "file" and (parsed.netloc not in ("", "localhost")):
        raise ManifestError(
            f"In {where}, the file:// url of {name!r} must be absolute "
            f"(file:///path/to/file); found {url!r}."
        )
    if not isinstance(digest, str) or not 8 <= len(digest) <= 64 or not _HEX.fullmatch(
        digest.lower()
    ):
        raise ManifestError(
            f"In {where}, the sha256 of {name!r} must be the file's SHA-256 hex digest or a "
            f"prefix of it of at least 8 hex digits; found {digest!r}."
        )
    return WeightsEntry(name, url, digest.lower())


def checkpoint_entry(checkpoint_name):
    """The `WeightsEntry` in force for the built-in preset `checkpoint_name`."""
    get_preset(checkpoint_name)  # a PresetError listing the built-in names
    table = checkpoint_table()
    if checkpoint_name not in table:
        raise ManifestError(
            f"The weights manifest {os.environ.get(MANIFEST_ENV)!r} (named by {MANIFEST_ENV}) "
            f"has no entry for {checkpoint_name!r}; it lists {', '.join(table) or 'nothing'}."
        )
    return table[checkpoint_name]


def cache_dir():
    """The weights cache, ``$KERAS_HOME/models/keras_coat`` (created if needed)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    folder = os.path.join(home, "models", "keras_coat")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        pass
    if not os.access(folder, os.W_OK):
        # Keras' own fallback for a read-only home.
        folder = os.path.join(tempfile.gettempdir(), ".keras", "models", "keras_coat")
        os.makedirs(folder, exist_ok=True)
    return folder


def _stem(entry):
    return f"{entry.name}-{entry.sha256[:8]}"


def cached_preset_path(checkpoint_name):
    """Where the preset directory of `checkpoint_name` is (or will be) cached."""
    return os.path.join(cache_dir(), _stem(checkpoint_entry(checkpoint_name)))


def is_intact(folder, entry):
    """Whether `folder` is the complete, unaltered preset directory of a checkpoint matching
    `entry`: a real directory whose ``metadata.json`` names the checkpoint, a full SHA-256
    starting with the table's digest, and the SHA-256 of every other file it holds (each a
    regular file, hashed again here)."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        path = os.path.join(folder, METADATA_FILE)
        if not _is_regular_file(path):
            return False
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
        source, files = metadata.get("source"), metadata.get("files")
        digest = source.get("sha256") if isinstance(source, dict) else None
        return (
            source.get("checkpoint") == entry.name
            and isinstance(digest, str) and len(digest) == 64 and digest.startswith(entry.sha256)
            and isinstance(files, dict)
            and set(files) == set(os.listdir(folder)) - {METADATA_FILE}
            and all(
                _is_regular_file(os.path.join(folder, name))
                and sha256(os.path.join(folder, name)) == expected
                for name, expected in files.items()
            )
        )  # fmt: skip
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
        return False


def ensure_preset(checkpoint_name, write, max_bytes=None):
    """Returns the cached preset directory of `checkpoint_name`, building it if needed.

    Args:
        checkpoint_name: a key of `CHECKPOINTS`.
        write: ``write(checkpoint_name, source, folder, metadata)`` writes the preset files
            into the empty directory `folder`, adding `metadata` (where the checkpoint came
            from) to its ``metadata.json``; `source` is the verified checkpoint's state dict,
            or the path of an intact keras-coat 0.1 cache entry's weights.
        max_bytes: the largest checkpoint file accepted (default: the preset's
            `max_download_bytes`): a larger declared size is refused before reading, and the
            download stops once it passes it.

    Returns:
        The path of the preset directory. When it is intact nothing is downloaded.
    """
    entry = checkpoint_entry(checkpoint_name)
    max_bytes = max_bytes or get_preset(checkpoint_name).max_download_bytes
    folder, stem = cache_dir(), _stem(entry)
    target = os.path.join(folder, stem)
    if is_intact(target, entry):
        return target
    with _file_lock(os.path.join(folder, f"{stem}.lock")):
        if is_intact(target, entry):  # another process finished it while we waited
            return target
        # Damaged, of another checkpoint, or interrupted: rebuilt from the source.
        _remove(target)
        _remove_temporaries(folder, stem)
        old = legacy.cache_entry(folder, stem, entry.name, entry.sha256)
        checkpoint = None
        staging = os.path.join(folder, f".{stem}{TEMPORARY_MARK}{uuid.uuid4().hex}")
        try:
            if old is None:
                checkpoint, digest = _fetch_verified(entry, folder, max_bytes)
                source = read_state_dict(checkpoint)
            else:
                source, digest = old
            os.mkdir(staging)
            write(checkpoint_name, source, staging, {
                "source": {"checkpoint": entry.name, "url": entry.url, "sha256": digest}
            })  # fmt: skip
            publish_directory(staging, target)
        finally:
            _remove(staging)
            # Later loads need only the preset; a checkpoint that could not be read or
            # converted would fail again.
            if checkpoint is not None:
                _remove(checkpoint)
        if old is not None:
            legacy.remove_cache_entries(folder, stem)
    return target


def _fetch_verified(entry, folder, max_bytes):
    """Downloads `entry` into `folder` (unless already there) and checks its SHA-256.

    Returns the path of the verified file and its full SHA-256.
    """
    path = urllib.parse.urlsplit(entry.url).path.lower()
    extension = next(e for e in SUPPORTED_EXTENSIONS if path.endswith(e))  # checked in the table
    verified = os.path.join(folder, _stem(entry) + extension)
    if _is_regular_file(verified):
        # Left by a process killed while converting; check it again.
        try:
            digest = sha256(verified)
        except OSError:  # unreadable: fetched again
            digest = ""
        if digest and digest.startswith(entry.sha256):
            return verified, digest
    _remove(verified)  # damaged, or no regular file
    temporary = os.path.join(folder, f".{_stem(entry)}{TEMPORARY_MARK}{uuid.uuid4().hex}{extension}")
    try:
        _download(entry, temporary, max_bytes)
        actual = sha256(temporary)
        if not actual.startswith(entry.sha256):
            raise WeightsDownloadError(
                f"The file downloaded from {entry.url} for {entry.name!r} has SHA-256 "
                f"{actual}, but {entry.sha256} was expected: it is truncated, corrupt or not "
                "the published checkpoint, and was deleted. Retry the load; if the server "
                f"moved or changed the file, point {MANIFEST_ENV} at a manifest giving a "
                "trusted URL and hash."
            )
        publish(temporary, verified)
    finally:
        _remove(temporary)
    return verified, actual


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows at most `_MAX_REDIRECTS` redirects, and only to http(s) URLs."""

    max_redirections = _MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise WeightsDownloadError(f"{req.full_url} redirects to {newurl!r}; refused.")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(entry, path, max_bytes):
    """Copies `entry.url` to the new file `path`, within `max_bytes` and the time budget.

    Shows its progress as `keras.utils.get_file` does: a `keras.utils.Progbar` of the bytes
    received (of the declared size, when the server declares one) and the rate in MB/s.
    """
    advice = (
        f"Check the network connection and retry; to use a mirror or a local copy, set "
        f"{MANIFEST_ENV} to a JSON manifest "
        '{"' + entry.name + '": {"url": ..., "sha256": ...}}.'
    )
    deadline = time.monotonic() + DOWNLOAD_TIME_BUDGET
    opener = urllib.request.build_opener(_RedirectHandler)
    try:
        with opener.open(entry.url, timeout=DOWNLOAD_TIMEOUT) as response, open(path, "xb") as f:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
                raise WeightsDownloadError(
                    f"{entry.url} declares {int(declared)} bytes, more than the {max_bytes} a "
                    f"{entry.name!r} checkpoint can take; refused before reading it."
                )
            total = int(declared) if declared is not None and declared.strip().isdigit() else None
            print(f"Downloading the {entry.name} weights from {entry.url}")
            progress = keras.utils.Progbar(total, unit_name="B", stateful_metrics=["MB/s"])
            started = time.monotonic()
            received = 0
            while True:
                # read1: what one read returns, so that a trickle still meets the deadline check.
                block = response.read1(1 << 20)
                if not block:
                    if total is None or received < total:  # else the bar has ended itself
                        progress.update(received, finalize=True)
                    break
                received += len(block)
                if received > max_bytes:
                    raise WeightsDownloadError(
                        f"{entry.url} sent more than {max_bytes} bytes, more than a "
                        f"{entry.name!r} checkpoint can take; stopped and deleted."
                    )
                f.write(block)
                elapsed = max(time.monotonic() - started, 1e-6)
                progress.update(received, [("MB/s", received / elapsed / 1e6)])
                if time.monotonic() > deadline:
                    raise WeightsDownloadError(
                        f"Downloading {entry.url} took longer than {DOWNLOAD_TIME_BUDGET:.0f} s "
                        f"({received} bytes received); stopped and deleted. {advice}"
                    )
    except WeightsDownloadError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise WeightsDownloadError(
            f"Could not download the {entry.name!r} weights from {entry.url} "
            f"(expected SHA-256 {entry.sha256}) into {os.path.dirname(path)}: {e}. {advice}"
        ) from e


def _remove_temporaries(folder, stem):
    """Deletes what an interrupted load of `stem` left (only called under its lock)."""
    for name in os.listdir(folder):
        if name.startswith(f".{stem}{TEMPORARY_MARK}"):
            _remove(os.path.join(folder, name))


def _is_regular_file(path):
    """Whether `path` is a regular file itself (not a symlink, folder, FIFO or device)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _remove(path):
    """Deletes whatever is at `path` (a folder with its contents; a symlink, not its target)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def _file_lock(path, timeout=3600.0):
    """An exclusive lock between processes on `path` (flock, or an O_EXCL file)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    if fcntl is not None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path + ".excl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Waited {timeout:.0f} s for the lock {path}.excl; if no other process "
                    "is loading these weights, delete it."
                ) from None
            time.sleep(0.5)
    try:
        os.close(fd)
        yield
    finally:
        _remove(path + ".excl")
