"""Hostile weight servers and caches (keras_coat.weights, keras_coat.loading).

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
from tests._weights_fixtures import FileServer, fake_converter, sha256_of, use_manifest

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
        weights.ensure_converted_weights(NAME, fake_converter(calls), max_bytes=MAX_BYTES)
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
    path = weights.ensure_converted_weights(NAME, fake_converter(calls), max_bytes=MAX_BYTES)
    assert os.path.isfile(path) and len(calls) == 1


def test_declared_size_is_refused_without_reading_the_body(hostile, tmp_path, monkeypatch):
    hostile.behaviours["/w.pth"] = declares_2_gib
    use_manifest(monkeypatch, tmp_path, {NAME: {"url": hostile.url("/w.pth"), "sha256": "0" * 8}})
    with pytest.raises(weights.WeightsDownloadError, match="declares 2147483648 bytes"):
        weights.ensure_converted_weights(
            NAME, fake_converter([]), max_bytes=presets.get_preset(NAME).max_download_bytes
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


# ------------------------------------------------------------------ the converted-weights cache


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _another_checkpoints_file(path):
    """Replace it with the conversion of another checkpoint (what a cache shared by two
    manifests, or a copy from another machine, could hold under this name)."""
    import h5py

    path.unlink()
    with h5py.File(path, "w") as f:
        f["w"] = [5.0, 4.0, 3.0]


def _record(path):
    return path.with_name(path.name.replace(".weights.h5", ".json"))


def _drop_the_record(path):
    _record(path).unlink()


def _damage_the_record(path):
    _record(path).write_text("{")


def _record_of_another_checkpoint(path):
    """A record whose checkpoint digest shares the 8-digit prefix but differs after it."""
    import json

    record = json.loads(_record(path).read_text())
    digest = record["checkpoint_sha256"]
    record["checkpoint_sha256"] = digest[:8] + ("0" if digest[8] != "0" else "1") + digest[9:]
    _record(path).write_text(json.dumps(record))


def _a_folder(path):
    path.unlink()
    path.mkdir()
    (path / "inside").write_bytes(b"x")


def _a_symlink(path):
    """A link to an intact copy elsewhere: the cache holds only files it wrote itself."""
    copy = path.with_name("elsewhere.bin")
    copy.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(copy)


def _a_dangling_symlink(path):
    path.unlink()
    path.symlink_to(path.with_name("missing.bin"))


def _a_fifo(path):
    """Reading a FIFO with no writer would block forever."""
    path.unlink()
    os.mkfifo(path)


def _unreadable(path):
    path.chmod(0)


def _record_a_folder(path):
    _record(path).unlink()
    _record(path).mkdir()


CACHE_DAMAGE = {
    "folder": _a_folder,
    "symlink": _a_symlink,
    "dangling_symlink": _a_dangling_symlink,
    "fifo": _a_fifo,
    "unreadable": _unreadable,
    "record_is_a_folder": _record_a_folder,
    "flipped_bit": _flip_a_bit,
    "truncated": _truncate,
    "another_checkpoints_file": _another_checkpoints_file,
    "emptied": lambda path: path.write_bytes(b""),
    "became_a_directory": lambda path: (path.unlink(), path.mkdir(), (path / "x").write_text("")),
    "no_record": _drop_the_record,
    "damaged_record": _damage_the_record,
    "record_of_another_checkpoint": _record_of_another_checkpoint,
}


@pytest.mark.parametrize("damage", sorted(CACHE_DAMAGE))
def test_damaged_cache_is_rebuilt_not_loaded(damage, tmp_path, monkeypatch):
    import h5py
    import numpy as np

    if damage == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    source = _good_checkpoint(tmp_path)
    with FileServer() as server:
        url = server.serve("/w.pth", source)
        use_manifest(monkeypatch, tmp_path, {NAME: {"url": url, "sha256": sha256_of(source)}})
        calls = []
        path = pathlib.Path(weights.ensure_converted_weights(NAME, fake_converter(calls)))
        intact = path.read_bytes()
        assert server.requests == ["/w.pth"]

        CACHE_DAMAGE[damage](path)
        again = weights.ensure_converted_weights(NAME, fake_converter(calls))
        # Rebuilt from the verified source: fetched and converted a second time.
        assert again == str(path) and len(calls) == 2 and server.requests == ["/w.pth"] * 2
        assert path.read_bytes() == intact
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(f["w"][()], np.arange(6.0))
        assert path.is_file() and not path.is_symlink() and _record(path).is_file()
        leftovers = [
            n for n in _cache_files(tmp_path) if not n.endswith(".lock") and n != "elsewhere.bin"
        ]
        assert leftovers == sorted([path.name, _record(path).name])

        # And an intact cache is used as is: no network, no conversion.
        weights.ensure_converted_weights(NAME, fake_converter(calls))
        assert len(calls) == 2 and len(server.requests) == 2


def test_unreadable_cache_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    """Reads of the cached file fail (what chmod 0 does to a user other than root)."""
    source = _good_checkpoint(tmp_path)
    with FileServer() as server:
        url = server.serve("/w.pth", source)
        use_manifest(monkeypatch, tmp_path, {NAME: {"url": url, "sha256": sha256_of(source)}})
        calls = []
        path = weights.ensure_converted_weights(NAME, fake_converter(calls))
        real_open = open

        def unreadable(file, *args, **kwargs):
            if os.fspath(file) == path:
                raise PermissionError(13, "Permission denied", file)
            return real_open(file, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr("builtins.open", unreadable)
            assert weights.ensure_converted_weights(NAME, fake_converter(calls)) == path
        assert len(calls) == 2 and len(server.requests) == 2  # rebuilt
        weights.ensure_converted_weights(NAME, fake_converter(calls))
        assert len(calls) == 2  # and intact again


@pytest.mark.parametrize("damage", ["folder", "fifo", "symlink"])
def test_damaged_downloaded_checkpoint_is_fetched_again(damage, tmp_path, monkeypatch):
    """A checkpoint left beside the cache by a killed process, damaged, is downloaded again."""
    source = _good_checkpoint(tmp_path)
    with FileServer() as server:
        url = server.serve("/w.pth", source)
        use_manifest(monkeypatch, tmp_path, {NAME: {"url": url, "sha256": sha256_of(source)}})
        entry = weights.resolve(NAME)
        folder = pathlib.Path(weights.cache_dir())
        left = folder / f"{NAME}-{entry.sha256[:8]}.pth"
        left.write_bytes(source.read_bytes())
        {"folder": _a_folder, "fifo": _a_fifo, "symlink": _a_symlink}[damage](left)
        calls = []
        weights.ensure_converted_weights(NAME, fake_converter(calls))
        assert len(calls) == 1 and server.requests == ["/w.pth"]
        assert not os.path.lexists(left)
