"""Publishing files so that readers never see half of one, and output-path checks.

Every file keras-coat publishes (converted weights, cache entries, exports, training outputs)
goes through `write_atomically` or `temporary_path` + `publish`: it is written under a hidden
unique name in its destination folder, flushed to disk, and renamed over the destination in one
step (``os.replace``), so a reader sees the old file or the new one, and an interrupted write
leaves at most a hidden temporary file.

Permissions follow one rule: a published file gets the permissions a normally created file gets
(``0o666`` less the process umask), never ``tempfile.mkstemp``'s private ``0o600``.
"""

import contextlib
import hashlib
import os
import shutil
import uuid

__all__ = [
    "TEMPORARY_MARK",
    "check_can_create_folder",
    "create_temporary",
    "fsync",
    "publish",
    "publish_directory",
    "remove_if_exists",
    "sha256",
    "temporary_path",
    "write_atomically",
    "write_bytes_atomically",
    "write_text_atomically",
]

# Part of every temporary name, so that a cleanup can find what an interrupted write left.
TEMPORARY_MARK = ".partial-"


def temporary_path(path, prefix=""):
    """A new hidden name in `path`'s folder that ends like `path` (writers such as Keras' and
    h5py's choose the format by the ending): ``.<prefix>.partial-<hex>-<name>``.

    Nothing is created; `create_temporary` creates the file.
    """
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{prefix}{TEMPORARY_MARK}{uuid.uuid4().hex[:16]}-{name}")


def create_temporary(path, prefix=""):
    """Creates an empty temporary file for `path` (see `temporary_path`) and returns its name.

    It is created like any file (mode ``0o666`` less the umask), exclusively.
    """
    temporary = temporary_path(path, prefix)
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return temporary


def fsync(path):
    """Flushes the file (or folder) `path` to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sha256(path):
    """The SHA-256 hex digest of the file `path`, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(temporary, path):
    """Flushes the written file `temporary` to disk and renames it to `path` (replacing it).

    The folder is flushed too, so that the new name survives a power cut.
    """
    fsync(temporary)
    os.replace(temporary, path)
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def write_atomically(path, write):
    """Calls ``write(temporary)`` for a temporary file beside `path` (same ending), then
    publishes it as `path`. On failure the temporary file is removed and `path` is untouched.

    Returns `path`.
    """
    temporary = create_temporary(path)
    try:
        write(temporary)
        publish(temporary, path)
    finally:
        remove_if_exists(temporary)
    return path


def write_bytes_atomically(path, data):
    """Publishes `data` (bytes) as the file `path`."""

    def write(temporary):
        with open(temporary, "wb") as f:
            f.write(data)

    return write_atomically(path, write)


def write_text_atomically(path, text, encoding="utf-8"):
    """Publishes `text` as the file `path`."""
    return write_bytes_atomically(path, text.encode(encoding))


def publish_directory(staging, target, overwrite=False):
    """Renames the complete folder `staging` to `target`.

    An existing `target` (with ``overwrite=True``) is swapped out, not merged: it is renamed
    aside, `staging` takes its name, and the old folder is deleted; if the rename fails, the old
    folder is put back. Create `staging` with ``os.mkdir`` (not ``mkdtemp``), in `target`'s
    folder, so that it has the umask's permissions.
    """
    if not os.path.lexists(target):
        os.rename(staging, target)
        _fsync_folder(os.path.dirname(os.path.abspath(target)))
        return
    if not overwrite:
        raise FileExistsError(f"{target} appeared while it was being written; not replacing it.")
    parent, name = os.path.split(os.path.abspath(target))
    retired = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    _fsync_folder(parent)
    shutil.rmtree(retired, ignore_errors=True)


def remove_if_exists(path):
    """Deletes the file `path` if it is there."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def check_can_create_folder(folder, what):
    """Raises OSError unless `folder` exists or can be created, and is writable.

    Called before any long work, so that a bad output path fails at once and nothing is
    created for it. `what` names the path in the message (e.g. "--output-dir 'runs/a'").
    """
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OSError(f"cannot write {what}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(f"cannot write {what}: the folder {existing!r} is not writable")


def _fsync_folder(folder):
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder; the rename itself is done
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
