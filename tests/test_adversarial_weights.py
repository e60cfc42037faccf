"""Hostile weight servers and damaged caches (keras_coat.weights).

A loopback HTTP server plays a malicious or broken mirror: it declares huge sizes, streams
without end, trickles bytes, redirects elsewhere. Every case must end in a WeightsDownloadError
naming the URL, within the size cap and time budget, with nothing left in the cache and the
converter never called; the next load from a good server must then work.
"""

import os
import pathlib
import time

import pytest

from keras_coat import presets, weights
from tests._weights_fixtures import FileServer, fake_writer, sha256_of, use_manifest

pytestmark = pytest.mark.adversarial

NAME = "coat_lite_tiny"


def _headers(handler, length=None, status=200, extra=()):
    handler.send_response(status)
    if length is not None:
        handler.send_header("Content-Length", str(length))
    for key, value in extra:
        handler.send_header(key, value)
    handler.end_headers()


def declares_2_gib(handler, server):
    _headers(handler, 2 * 2**30)
    for _ in range(64):
        server.send(handler, bytes(1 << 16))


def endless_zeros_without_length(handler, server):
    _headers(handler)
    handler.close_connection = True
    for _ in range(10_000):  # 640 MiB if nobody stops it
        server.send(handler, bytes(1 << 16))


def lies_about_its_length(handler, server):
    _headers(handler, 1000)
    for _ in range(10_000):
        server.send(handler, bytes(1 << 16))


def trickles_zeros(handler, server):
    _headers(handler, 100_000)
    for _ in range(100_000):
        server.send(handler, b"\0")
        time.sleep(0.02)


def redirects_to_a_file(handler, server):
    _headers(handler, 0, status=302, extra=[("Location", "file:///etc/passwd")])


def redirects_to_ftp(handler, server):
    _headers(handler, 0, status=302, extra=[("Location", "ftp://127.0.0.1:9/w.pth")])


def redirects_forever(handler, server):
    _headers(handler, 0, status=302, extra=[("Location", handler.path)])


def stalls_after_the_headers(handler, server):
    _headers(handler, 100)
    time.sleep(5)


CASES = {
    # name: (behaviour, fragment of the error message)
    "declares_2_gib": (declares_2_gib, "refused before reading"),
    "endless_zeros_without_length": (endless_zeros_without_length, "sent more than"),
    # Only the declared 1000 bytes are read; they fail the hash.
    "lies_about_its_length": (lies_about_its_length, "has SHA-256"),
    "trickles_zeros": (trickles_zeros, "took longer than"),
    "redirects_to_a_file": (redirects_to_a_file, "'file:///etc/passwd' is not allowed"),
    "redirects_to_ftp": (redirects_to_ftp, "redirects to 'ftp://127.0.0.1:9/w.pth'; refused"),
    "redirects_forever": (redirects_forever, "redirect"),
    "stalls_after_the_headers": (stalls_after_the_headers, "timed out"),
}
MAX_BYTES = 1 << 20


@pytest.fixture
def hostile():
    with FileServer() as server:
        yield server


def _cache_files(tmp_path):
    folder = tmp_path / "keras_home" / "models" / "keras_coat"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _good_checkpoint(tmp_path):
    import torch

    path = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.arange(6.0)}}, path)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_server_is_stopped_and_leaves_nothing(name, hostile, tmp_path, monkeypatch):
    behaviour, fragment = CASES[name]
    monkeypatch.setattr(weights, "DOWNLOAD_TIME_BUDGET", 1.0)
    monkeypatch.setattr(weights, "DOWNLOAD_TIMEOUT", 1.0)
    hostile.behaviours["/w.pth"] = behaviour
    url = hostile.url("/w.pth")
    use_manifest(monkeypatch, tmp_path, {NAME: {"url": url, "sha256": "0" * 64}})
    calls = []
    start = time.monotonic()
    with pytest.raises(weights.WeightsDownloadError) as info:
        weights.ensure_preset(NAME, fake_writer(calls), max_bytes=MAX_BYTES)
    elapsed = time.monotonic() - start
    assert url in str(info.value) and fragment in str(info.value), str(info.value)
    assert elapsed < 4.0, elapsed  # budget 1 s, one read timeout of 1 s, and slack
    assert calls == []
    assert [n for n in _cache_files(tmp_path) if not n.endswith(".lock")] == []
    # Bounded by the cap plus what was in flight in the socket buffers.
    assert hostile.sent.get("/w.pth", 0) < MAX_BYTES + (8 << 20)

    # The next load from a good mirror works.
    good = _good_checkpoint(tmp_path)
    use_manifest(monkeypatch, tmp_path, {NAME: {"url": good.as_uri(), "sha256": sha256_of(good)}})
    path = weights.ensure_preset(NAME, fake_writer(calls), max_bytes=MAX_BYTES)
    assert os.path.isdir(path) and len(calls) == 1


def test_declared_size_is_refused_without_reading_the_body(hostile, tmp_path, monkeypatch):
    hostile.behaviours["/w.pth"] = declares_2_gib
    use_manifest(monkeypatch, tmp_path, {NAME: {"url": hostile.url("/w.pth"), "sha256": "0" * 8}})
    with pytest.raises(weights.WeightsDownloadError, match="declares 2147483648 bytes"):
        weights.ensure_preset(
            NAME, fake_writer([]), max_bytes=presets.get_preset(NAME).max_download_bytes
        )
    assert [n for n in _cache_files(tmp_path) if not n.endswith(".lock")] == []


def test_size_cap_follows_the_variant():
    def cap(name):
        return presets.get_preset(name).max_download_bytes

    tiny, medium = cap(NAME), cap("coat_lite_medium_384")
    # Room for a training checkpoint (weights, EMA, two AdamW moments), far below 2 GiB.
    assert 4 * 4 * 5_721_960 < tiny < 200e6
    assert 4 * 4 * 44_571_048 < medium < 1e9
    assert cap("coat_lite_medium") == medium


# ------------------------------------------------------------------ the cache of preset directories
# Each damage gets the cached preset directory; its weights file and metadata.json are inside.


def _weights(entry):
    return entry / "model.weights.h5"


def _metadata(entry):
    return entry / "metadata.json"


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _another_checkpoints_file(entry):
    """Another checkpoint's conversion under this name (a cache shared by two manifests, or a
    copy from another machine)."""
    import h5py

    _weights(entry).unlink()
    with h5py.File(_weights(entry), "w") as f:
        f["w"] = [5.0, 4.0, 3.0]


def _edit_metadata(edit):
    def damage(entry):
        import json

        metadata = json.loads(_metadata(entry).read_text())
        edit(metadata)
        _metadata(entry).write_text(json.dumps(metadata))

    return damage


def _digest_of_another_checkpoint(metadata):
    """A checkpoint digest that shares the 8-digit prefix but differs after it."""
    digest = metadata["source"]["sha256"]
    metadata["source"]["sha256"] = digest[:8] + ("0" if digest[8] != "0" else "1") + digest[9:]


def _a_folder(path):
    path.unlink()
    path.mkdir()
    (path / "inside").write_bytes(b"x")


def _a_symlink(path):
    """A link to an intact copy elsewhere: the cache holds only what it wrote itself."""
    copy = path.with_name("elsewhere.bin")
    copy.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(copy)


def _a_fifo(path):
    """Reading a FIFO with no writer would block forever."""
    path.unlink()
    os.mkfifo(path)


def _entry_is_a_symlink(entry):
    import shutil

    copy = entry.with_name("elsewhere")
    shutil.copytree(entry, copy)
    shutil.rmtree(entry)
    entry.symlink_to(copy)


def _entry_is_a_file(entry):
    import shutil

    shutil.rmtree(entry)
    entry.write_bytes(b"not a directory")


CACHE_DAMAGE = {
    "weights_folder": lambda e: _a_folder(_weights(e)),
    "weights_symlink": lambda e: _a_symlink(_weights(e)),
    "weights_dangling_symlink": lambda e: (_weights(e).unlink(),
                                           _weights(e).symlink_to(e / "missing.bin")),
    "weights_fifo": lambda e: _a_fifo(_weights(e)),
    "weights_unreadable": lambda e: _weights(e).chmod(0),
    "flipped_bit": lambda e: _flip_a_bit(_weights(e)),
    "truncated": lambda e: _weights(e).write_bytes(_weights(e).read_bytes()[:-100]),
    "emptied": lambda e: _weights(e).write_bytes(b""),
    "weights_missing": lambda e: _weights(e).unlink(),
    "another_checkpoints_file": _another_checkpoints_file,
    "an_extra_file": lambda e: (e / "task.weights.h5").write_bytes(b"planted"),
    "no_metadata": lambda e: _metadata(e).unlink(),
    "damaged_metadata": lambda e: _metadata(e).write_text("{"),
    "metadata_a_list": lambda e: _metadata(e).write_text("[]"),
    "metadata_a_folder": lambda e: (_metadata(e).unlink(), _metadata(e).mkdir()),
    "metadata_a_fifo": lambda e: _a_fifo(_metadata(e)),
    "metadata_of_another_checkpoint": _edit_metadata(_digest_of_another_checkpoint),
    "metadata_of_another_name": _edit_metadata(lambda m: m["source"].update(checkpoint="x")),
    "metadata_without_digests": _edit_metadata(lambda m: m.pop("files")),
    "metadata_with_a_wrong_digest": _edit_metadata(
        lambda m: m["files"].update({"model.weights.h5": "0" * 64})),
    "entry_is_a_symlink": _entry_is_a_symlink,
    "entry_is_a_file": _entry_is_a_file,
}


@pytest.mark.parametrize("damage", sorted(CACHE_DAMAGE))
def test_damaged_cache_is_rebuilt_not_loaded(damage, tmp_path, monkeypatch):
    import h5py
    import numpy as np

    if damage == "weights_unreadable" and os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    source = _good_checkpoint(tmp_path)
    with FileServer() as server:
        url = server.serve("/w.pth", source)
        use_manifest(monkeypatch, tmp_path, {NAME: {"url": url, "sha256": sha256_of(source)}})
        calls = []
        entry = pathlib.Path(weights.ensure_preset(NAME, fake_writer(calls)))
        intact = {name: (entry / name).read_bytes() for name in os.listdir(entry)}
        assert server.requests == ["/w.pth"]

        CACHE_DAMAGE[damage](entry)
        again = weights.ensure_preset(NAME, fake_writer(calls))
        # Rebuilt from the verified source: fetched and converted a second time.
        assert again == str(entry) and len(calls) == 2 and server.requests == ["/w.pth"] * 2
        assert entry.is_dir() and not entry.is_symlink()
        assert {name: (entry / name).read_bytes() for name in os.listdir(entry)} == intact
        with h5py.File(_weights(entry), "r") as f:
            np.testing.assert_array_equal(f["w"][()], np.arange(6.0))
        leftovers = [n for n in _cache_files(tmp_path)
                     if not n.endswith(".lock") and n not in ("elsewhere", "elsewhere.bin")]
        assert leftovers == [entry.name]

        # And an intact cache is used as is: no network, no conversion.
        weights.ensure_preset(NAME, fake_writer(calls))
        assert len(calls) == 2 and len(server.requests) == 2


def test_unreadable_cache_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    """Reads of the cached weights fail (what chmod 0 does to a user other than root)."""
    source = _good_checkpoint(tmp_path)
    with FileServer() as server:
        url = server.serve("/w.pth", source)
        use_manifest(monkeypatch, tmp_path, {NAME: {"url": url, "sha256": sha256_of(source)}})
        calls = []
        entry = weights.ensure_preset(NAME, fake_writer(calls))
        cached = os.path.join(entry, "model.weights.h5")
        real_open = open

        def unreadable(file, *args, **kwargs):
            if os.fspath(file) == cached:
                raise PermissionError(13, "Permission denied", file)
            return real_open(file, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr("builtins.open", unreadable)
            assert weights.ensure_preset(NAME, fake_writer(calls)) == entry
        assert len(calls) == 2 and len(server.requests) == 2  # rebuilt
        weights.ensure_preset(NAME, fake_writer(calls))
        assert len(calls) == 2  # and intact again


@pytest.mark.parametrize("damage", ["folder", "fifo", "symlink"])
def test_damaged_downloaded_checkpoint_is_fetched_again(damage, tmp_path, monkeypatch):
    """A checkpoint left beside the cache by a killed process, damaged, is downloaded again."""
    source = _good_checkpoint(tmp_path)
    with FileServer() as server:
        url = server.serve("/w.pth", source)
        use_manifest(monkeypatch, tmp_path, {NAME: {"url": url, "sha256": sha256_of(source)}})
        entry = weights.checkpoint_entry(NAME)
        folder = pathlib.Path(weights.cache_dir())
        left = folder / f"{NAME}-{entry.sha256[:8]}.pth"
        left.write_bytes(source.read_bytes())
        {"folder": _a_folder, "fifo": _a_fifo, "symlink": _a_symlink}[damage](left)
        calls = []
        weights.ensure_preset(NAME, fake_writer(calls))
        assert len(calls) == 1 and server.requests == ["/w.pth"]
        assert not os.path.lexists(left)
