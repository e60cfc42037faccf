"""The published CoaT ImageNet checkpoints: where they are, how to fetch them safely.

`ensure_converted_weights(checkpoint_name, converter)` (called through
`keras_coat.preset_io` for ``weights="imagenet"`` and built-in preset names):

1. finds the checkpoint's URL and SHA-256 in `CHECKPOINTS` (from
   `keras_coat.presets`), or in the JSON
   manifest named by the ``KERAS_COAT_WEIGHTS_MANIFEST`` environment variable,
   which replaces the table (for mirrors, local copies and offline machines)::

       {"coat_lite_tiny": {"url": "file:///mirror/coat_lite_tiny.pth",
                           "sha256": "e88e96b0"}, ...}

   ``url`` is ``http://``, ``https://`` or ``file://`` and ends in ``.pth``,
   ``.pt``, ``.bin`` or ``.safetensors``; ``sha256`` is the full hex digest
   or a prefix of at least 8 hex digits;
2. if the converted weights are already cached
   (``$KERAS_HOME/models/keras_coat/<name>-<sha8>-v2.weights.h5``, ``KERAS_HOME``
   defaulting to ``~/.keras``) and intact, returns them: no network access at
   all. The record beside them (``...-v2.json``) holds the full SHA-256 of the
   verified checkpoint and of the converted file; the file is hashed again on
   every hit, and a damaged file or one converted from another checkpoint is
   rebuilt;
3. otherwise downloads the checkpoint to a temporary file beside the cache
   (within a size cap and a time budget), checks its SHA-256, reads it without
   running anything from it (`keras_coat.checkpoint`) and hands it to the
   caller's `converter`, which writes the converted ``.weights.h5`` that is
   then moved into the cache.

This module knows nothing of models or conversion: `keras_coat.preset_io`
passes the converter and loads the cached file into a model.

Every file appears in the cache under its final name only when complete and
verified (temporary file in the same folder, then `os.replace`), and a lock
file serializes processes fetching the same checkpoint, so concurrent or
interrupted loads never leave a broken cache: the next call simply retries.
"""

import contextlib
import dataclasses
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

from keras_coat.checkpoint import SUPPORTED_EXTENSIONS, read_state_dict
from keras_coat.presets import BASE_URL, PRESETS
from keras_coat.utils.files import fsync_file, publish, sha256_file

__all__ = [
    "BASE_URL",
    "CHECKPOINTS",
    "MANIFEST_ENV",
    "ManifestError",
    "WeightsDownloadError",
    "WeightsEntry",
    "cache_dir",
    "cached_weights_path",
    "checkpoint_table",
    "discard_cached_weights",
    "ensure_converted_weights",
    "variant_of",
]

MANIFEST_ENV = "KERAS_COAT_WEIGHTS_MANIFEST"
# Bumped whenever the converted cache files would change for the same checkpoint. 2: the
# classifier holds its backbone as one nested layer. A valid entry of format 1 (keras-coat 0.1)
# is converted into format 2 without downloading again.
CACHE_FORMAT = 2
_LEGACY_CACHE_FORMATS = (1,)
# Seconds a download may wait on the server for any single read.
DOWNLOAD_TIMEOUT = 60.0
# Seconds a whole download may take: a server trickling bytes is cut off (30 minutes is over
# 100 kB/s for the largest checkpoint, coat_lite_medium's 180 MB).
DOWNLOAD_TIME_BUDGET = 1800.0
# Size cap of a download when the caller gives none.
DEFAULT_MAX_DOWNLOAD_BYTES = 2 * 2**30
_MAX_REDIRECTS = 5


@dataclasses.dataclass(frozen=True)
class WeightsEntry:
    """Where a checkpoint lives and the (prefix of its) SHA-256 digest."""

    name: str
    url: str
    sha256: str


# The published checkpoints' sources, as `keras_coat.presets` gives them.
CHECKPOINTS = {
    name: WeightsEntry(name, preset.url, preset.sha256) for name, preset in PRESETS.items()
}

_HEX = re.compile(r"[0-9a-f]+")
_URL_SCHEMES = ("http", "https", "file")
_MANIFEST_FIELDS = {"url", "sha256"}


class ManifestError(ValueError):
    """The weights manifest (``KERAS_COAT_WEIGHTS_MANIFEST``) is unusable."""


class WeightsDownloadError(OSError):
    """A checkpoint could not be downloaded, or failed its SHA-256 check."""


def variant_of(checkpoint_name):
    """The variant a checkpoint belongs to: ``coat_lite_medium_384`` -> ``coat_lite_medium``."""
    _check_name(checkpoint_name)
    return PRESETS[checkpoint_name].variant


def _check_name(checkpoint_name):
    if checkpoint_name not in CHECKPOINTS:
        raise ValueError(
            f"Unknown CoaT checkpoint {checkpoint_name!r}. Available: " f"{', '.join(CHECKPOINTS)}."
        )


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
    url, sha256 = spec["url"], spec["sha256"]
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
    if (
        not isinstance(sha256, str)
        or not 8 <= len(sha256) <= 64
        or not _HEX.fullmatch(sha256.lower())
    ):
        raise ManifestError(
            f"In {where}, the sha256 of {name!r} must be the file's SHA-256 hex digest or a "
            f"prefix of it of at least 8 hex digits; found {sha256!r}."
        )
    return WeightsEntry(name, url, sha256.lower())


def resolve(checkpoint_name):
    """The `WeightsEntry` in force for `checkpoint_name`."""
    _check_name(checkpoint_name)
    table = checkpoint_table()
    if checkpoint_name not in table:
        raise ManifestError(
            f"The weights manifest {os.environ.get(MANIFEST_ENV)!r} (named by {MANIFEST_ENV}) "
            f"has no entry for {checkpoint_name!r}; it lists {', '.join(table) or 'nothing'}."
        )
    return table[checkpoint_name]


def cache_dir():
    """Folder of the downloads and converted weights: ``$KERAS_HOME/models/keras_coat``."""
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


def cached_weights_path(checkpoint_name, cache_format=CACHE_FORMAT):
    """Where the converted weights of `checkpoint_name` are (or will be) cached."""
    entry = resolve(checkpoint_name)
    return os.path.join(cache_dir(), f"{_stem(entry)}-v{cache_format}.weights.h5")


def _record_path(weights_path):
    """The JSON record beside a cached ``.weights.h5``: what it was converted from."""
    return weights_path.removesuffix(".weights.h5") + ".json"


def discard_cached_weights(checkpoint_name):
    """Deletes the cached converted weights of `checkpoint_name` (found damaged by a reader)."""
    target = cached_weights_path(checkpoint_name)
    _remove(target)
    _remove(_record_path(target))


def _cache_is_valid(target, entry, cache_format=CACHE_FORMAT):
    """Whether `target` is the intact conversion of a checkpoint matching `entry`.

    The record beside it holds the full SHA-256 of the verified checkpoint and of the converted
    file. The file is hashed again on every hit: a flipped bit, a truncated file or another
    checkpoint's conversion under this name (e.g. a manifest pinning a different full digest
    with the same first 8 hex digits) fails the check and is rebuilt, and so does an entry that
    is no regular file (a folder, a symlink, a FIFO) or cannot be read.
    """
    if not (_is_regular_file(target) and _is_regular_file(_record_path(target))):
        return False
    try:
        with open(_record_path(target), encoding="utf-8") as f:
            record = json.load(f)
        return (
            isinstance(record, dict)
            and record.get("checkpoint") == entry.name
            and record.get("cache_format") == cache_format
            and isinstance(record.get("checkpoint_sha256"), str)
            and len(record["checkpoint_sha256"]) == 64
            and record["checkpoint_sha256"].startswith(entry.sha256)
            and record.get("weights_sha256") == sha256_file(target)
        )
    except (OSError, ValueError):  # no file or record (or an older cache), unreadable JSON
        return False


def ensure_converted_weights(checkpoint_name, converter, max_bytes=DEFAULT_MAX_DOWNLOAD_BYTES):
    """Returns the cached converted weights file, fetching and converting it if needed.

    Args:
        checkpoint_name: a key of `CHECKPOINTS`.
        converter: ``converter(checkpoint_name, source, path)`` writes the
            converted weights to `path` (a temporary ``.weights.h5`` name that
            is renamed into the cache once written); `source` is the verified
            checkpoint's state dict, or the path of an intact cache entry of an
            older format (keras-coat 0.1's), converted without downloading.
        max_bytes: the largest checkpoint file accepted: a larger declared size
            is refused before reading, and the download stops once it passes it.

    Returns:
        The path of the converted weights file in the cache. When it already
        exists nothing is downloaded (no network access at all).
    """
    entry = resolve(checkpoint_name)
    target = cached_weights_path(checkpoint_name)
    if _cache_is_valid(target, entry):
        return target
    folder = os.path.dirname(target)
    with _file_lock(os.path.join(folder, f"{_stem(entry)}.lock")):
        if _cache_is_valid(target, entry):  # another process finished it while we waited
            return target
        # Damaged, of another checkpoint, or from an older version: rebuilt from the source.
        _remove(target)
        _remove(_record_path(target))
        _remove_temporaries(folder, entry)
        legacy = _valid_legacy_entry(checkpoint_name, entry)
        if legacy is None:
            checkpoint, checkpoint_sha256 = _fetch_verified(entry, folder, max_bytes)
        else:
            checkpoint, checkpoint_sha256 = None, legacy[1]
        temporary = _temporary_name(folder, entry, ".weights.h5")
        record = _temporary_name(folder, entry, ".json")
        try:
            # The converter receives the state dict, or the path of a keras-coat 0.1 entry.
            source = legacy[0] if legacy else read_state_dict(checkpoint)
            converter(checkpoint_name, source, temporary)
            fsync_file(temporary)
            _write_record(record, {
                "checkpoint": entry.name,
                "url": entry.url,
                "checkpoint_sha256": checkpoint_sha256,
                "weights_sha256": sha256_file(temporary),
                "cache_format": CACHE_FORMAT,
            })  # fmt: skip
            # The weights first: killed in between, they have no record and are rebuilt.
            publish(temporary, target)
            publish(record, _record_path(target))
        finally:
            _remove(temporary)
            _remove(record)
            # Later loads need only the converted file; a checkpoint that could
            # not be read or converted would fail again.
            if checkpoint is not None:
                _remove(checkpoint)
    return target


def _valid_legacy_entry(checkpoint_name, entry):
    """`(path, checkpoint SHA-256)` of an intact cache entry of an older format, or None."""
    for cache_format in _LEGACY_CACHE_FORMATS:
        path = cached_weights_path(checkpoint_name, cache_format)
        if _cache_is_valid(path, entry, cache_format):
            with open(_record_path(path), encoding="utf-8") as f:
                return path, json.load(f)["checkpoint_sha256"]
    return None


def _write_record(path, record):
    with open(path, "x", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fetch_verified(entry, folder, max_bytes):
    """Downloads `entry` into `folder` (unless already there) and checks its SHA-256.

    Returns the path of the verified file and its full SHA-256.
    """
    extension = _extension(entry.url)
    verified = os.path.join(folder, _stem(entry) + extension)
    if _is_regular_file(verified):
        # Left by a process killed while converting; check it again.
        try:
            digest = sha256_file(verified)
        except OSError:  # unreadable: fetched again
            digest = ""
        if digest and digest.startswith(entry.sha256):
            return verified, digest
    _remove(verified)  # damaged, or no regular file
    temporary = _temporary_name(folder, entry, extension)
    try:
        _download(entry, temporary, max_bytes)
        actual = sha256_file(temporary)
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


def _extension(url):
    path = urllib.parse.urlsplit(url).path.lower()
    for extension in SUPPORTED_EXTENSIONS:
        if path.endswith(extension):
            return extension
    raise ManifestError(
        f"Cannot tell the checkpoint format of {url!r}: it should end in "
        f"{', '.join(SUPPORTED_EXTENSIONS)}."
    )


_TEMPORARY_MARK = ".partial-"


def _temporary_name(folder, entry, suffix):
    # Dot-prefixed and unique; the real suffix last, since readers and
    # Keras' save_weights go by it.
    return os.path.join(folder, f".{_stem(entry)}{_TEMPORARY_MARK}{uuid.uuid4().hex}{suffix}")


def _remove_temporaries(folder, entry):
    """Deletes what an interrupted load of `entry` left (only called under its lock)."""
    prefix = f".{_stem(entry)}{_TEMPORARY_MARK}"
    for name in os.listdir(folder):
        if name.startswith(prefix):
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
