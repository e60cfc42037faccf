"""keras_coat.weights: the checkpoint table, manifests, download, verification, safe reading,
conversion and the offline cache of preset directories."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keras_coat import weights
from keras_coat.checkpoint import UnsafeCheckpointError
from tests._weights_fixtures import (
    REPO_ROOT,
    FileServer,
    Hostile,
    closed_port_url,
    fake_writer,
    no_network,
    run_without_torch,
    save_authors_checkpoint,
    sha256_of,
    use_manifest,
    write_manifest,
)
from tests.reference import timm_model

torch = pytest.importorskip("torch")

MANIFEST_ENV = "KERAS_COAT_WEIGHTS_MANIFEST"


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


@pytest.fixture
def small_checkpoint(tmp_path):
    """A small authors'-layout .pth (not a CoaT) for the fetch/verify/cache logic."""
    import argparse

    path = tmp_path / "small.pth"
    torch.save(
        {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "args": argparse.Namespace(a=1)},
        path,
    )
    return path


def _cache_files(tmp_path):
    folder = tmp_path / "keras_home" / "models" / "keras_coat"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _entry_files(path):
    return sorted(os.listdir(path))


def _cache_is_clean(tmp_path):
    """Nothing but lock files: no partial download, no unverified or half-written file."""
    return all(name.endswith(".lock") for name in _cache_files(tmp_path))


# ---------------------------------------------------------------- the table


def test_builtin_table_lists_the_eight_official_checkpoints(monkeypatch):
    monkeypatch.delenv(MANIFEST_ENV, raising=False)
    table = weights.checkpoint_table()
    assert sorted(table) == sorted(
        [
            "coat_lite_tiny",
            "coat_lite_mini",
            "coat_lite_small",
            "coat_lite_medium",
            "coat_lite_medium_384",
            "coat_tiny",
            "coat_mini",
            "coat_small",
        ]
    )
    for name, entry in table.items():
        assert entry.url.startswith("https://vcl.ucsd.edu/coat/pretrained/")
        assert entry.url.endswith(f"_{entry.sha256}.pth")
        assert len(entry.sha256) == 8
    assert table["coat_lite_medium_384"].url.endswith("coat_lite_medium_384x384_f9129688.pth")
    with pytest.raises(ValueError, match="Unknown CoaT preset 'coat_huge'.*coat_lite_tiny"):
        weights.checkpoint_entry("coat_huge")


def test_cache_lives_under_keras_home(monkeypatch, tmp_path):
    monkeypatch.delenv(MANIFEST_ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    path = weights.cached_preset_path("coat_lite_tiny")
    assert path == str(tmp_path / "home" / "models" / "keras_coat" / "coat_lite_tiny-e88e96b0")


# ---------------------------------------------------------------- manifests

GOOD = {"url": "https://mirror.example/coat_lite_tiny.pth", "sha256": "e88e96b0"}


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not valid JSON"),
        ("[]", "JSON object"),
        (json.dumps({"coat_huge": GOOD}), "unknown checkpoint 'coat_huge'"),
        (json.dumps({"coat_lite_tiny": "https://x/y.pth"}), "exactly the fields"),
        (json.dumps({"coat_lite_tiny": {"url": GOOD["url"]}}), "exactly the fields"),
        (json.dumps({"coat_lite_tiny": {**GOOD, "md5": "0"}}), "exactly the fields"),
        (
            json.dumps({"coat_lite_tiny": {**GOOD, "url": "ftp://x/y.pth"}}),
            "http://, https:// or file://",
        ),
        (
            json.dumps({"coat_lite_tiny": {**GOOD, "url": "/local/y.pth"}}),
            "http://, https:// or file://",
        ),
        (json.dumps({"coat_lite_tiny": {**GOOD, "url": 3}}), "http://, https:// or file://"),
        (json.dumps({"coat_lite_tiny": {**GOOD, "url": "https://x/y.zip"}}), "ending in"),
        (json.dumps({"coat_lite_tiny": {**GOOD, "url": "file://relative/y.pth"}}), "absolute"),
        (json.dumps({"coat_lite_tiny": {**GOOD, "sha256": "e88e96b"}}), "at least 8 hex"),
        (json.dumps({"coat_lite_tiny": {**GOOD, "sha256": "e88e96bz"}}), "at least 8 hex"),
        (json.dumps({"coat_lite_tiny": {**GOOD, "sha256": "0" * 65}}), "at least 8 hex"),
        (json.dumps({"coat_lite_tiny": {**GOOD, "sha256": None}}), "at least 8 hex"),
    ],
)
def test_manifest_errors_are_clear(monkeypatch, tmp_path, content, message):
    path = tmp_path / "manifest.json"
    path.write_text(content)
    monkeypatch.setenv(MANIFEST_ENV, str(path))
    with pytest.raises(weights.ManifestError, match=message) as info:
        weights.checkpoint_entry("coat_lite_tiny")
    assert str(path) in str(info.value) and MANIFEST_ENV in str(info.value)


def test_missing_manifest_file(monkeypatch, tmp_path):
    monkeypatch.setenv(MANIFEST_ENV, str(tmp_path / "absent.json"))
    with pytest.raises(weights.ManifestError, match="Cannot read"):
        weights.checkpoint_entry("coat_lite_tiny")


def test_manifest_replaces_the_table(monkeypatch, tmp_path):
    full = "AB" * 32
    monkeypatch.setenv(
        MANIFEST_ENV,
        write_manifest(
            tmp_path / "m.json",
            {"coat_small": {"url": "file:///srv/coat_small.safetensors", "sha256": full}},
        ),
    )
    entry = weights.checkpoint_entry("coat_small")
    assert entry.url == "file:///srv/coat_small.safetensors"
    assert entry.sha256 == full.lower()
    with pytest.raises(weights.ManifestError, match="no entry for 'coat_lite_tiny'.*coat_small"):
        weights.checkpoint_entry("coat_lite_tiny")


# ------------------------------------------- download, verify, cache (fake converter)


def test_download_verify_convert_cache_then_offline(
    monkeypatch, tmp_path, server, small_checkpoint
):
    url = server.serve("/w/coat_lite_tiny.pth", small_checkpoint)
    use_manifest(
        monkeypatch,
        tmp_path,
        {"coat_lite_tiny": {"url": url, "sha256": sha256_of(small_checkpoint)[:12]}},
    )
    calls = []
    path = weights.ensure_preset("coat_lite_tiny", fake_writer(calls))
    assert server.requests == ["/w/coat_lite_tiny.pth"]
    assert calls == [("coat_lite_tiny", ["w"])]
    assert path == weights.cached_preset_path("coat_lite_tiny")
    assert path.startswith(str(tmp_path / "keras_home"))
    # Only the preset directory (and the lock) stay: no checkpoint, no partials.
    assert [n for n in _cache_files(tmp_path) if not n.endswith(".lock")] == [
        os.path.basename(path)
    ]
    with open(os.path.join(path, "metadata.json")) as f:
        source = json.load(f)["source"]
    assert source == {"checkpoint": "coat_lite_tiny", "url": url,
                      "sha256": sha256_of(small_checkpoint)}

    with no_network():
        again = weights.ensure_preset("coat_lite_tiny", fake_writer(calls))
    assert again == path
    assert server.requests == ["/w/coat_lite_tiny.pth"]
    assert len(calls) == 1


def test_full_digest_and_file_url(monkeypatch, tmp_path, small_checkpoint):
    use_manifest(
        monkeypatch,
        tmp_path,
        {
            "coat_mini": {
                "url": small_checkpoint.as_uri(),
                "sha256": sha256_of(small_checkpoint).upper(),
            }
        },
    )
    calls = []
    path = weights.ensure_preset("coat_mini", fake_writer(calls))
    assert os.path.isdir(path) and len(calls) == 1
    assert small_checkpoint.exists()  # the source of a file:// url is left alone


def test_wrong_hash_leaves_nothing_and_the_next_call_retries(
    monkeypatch, tmp_path, server, small_checkpoint
):
    url = server.serve("/coat_lite_tiny.pth", small_checkpoint)
    wrong = "0123abcd"
    use_manifest(monkeypatch, tmp_path, {"coat_lite_tiny": {"url": url, "sha256": wrong}})
    calls = []
    with pytest.raises(weights.WeightsDownloadError) as info:
        weights.ensure_preset("coat_lite_tiny", fake_writer(calls))
    message = str(info.value)
    assert url in message and wrong in message and sha256_of(small_checkpoint) in message
    assert MANIFEST_ENV in message and "Retry" in message
    assert calls == [] and _cache_is_clean(tmp_path)

    use_manifest(
        monkeypatch,
        tmp_path,
        {"coat_lite_tiny": {"url": url, "sha256": sha256_of(small_checkpoint)}},
    )
    assert os.path.isdir(weights.ensure_preset("coat_lite_tiny", fake_writer(calls)))
    assert len(server.requests) == 2


def test_truncated_download(monkeypatch, tmp_path, server, small_checkpoint):
    url = server.serve("/coat_lite_tiny.pth", small_checkpoint)
    server.truncate_to["/coat_lite_tiny.pth"] = small_checkpoint.stat().st_size // 2
    digest = sha256_of(small_checkpoint)
    use_manifest(monkeypatch, tmp_path, {"coat_lite_tiny": {"url": url, "sha256": digest}})
    calls = []
    with pytest.raises(weights.WeightsDownloadError) as info:
        weights.ensure_preset("coat_lite_tiny", fake_writer(calls))
    assert url in str(info.value) and digest in str(info.value)
    assert calls == [] and _cache_is_clean(tmp_path)

    del server.truncate_to["/coat_lite_tiny.pth"]
    assert os.path.isdir(weights.ensure_preset("coat_lite_tiny", fake_writer(calls)))


def test_cut_file_fails_its_hash(monkeypatch, tmp_path, small_checkpoint):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(small_checkpoint.read_bytes()[:-100])
    use_manifest(
        monkeypatch,
        tmp_path,
        {"coat_lite_tiny": {"url": cut.as_uri(), "sha256": sha256_of(small_checkpoint)}},
    )
    with pytest.raises(weights.WeightsDownloadError, match="SHA-256"):
        weights.ensure_preset("coat_lite_tiny", fake_writer([]))
    assert _cache_is_clean(tmp_path)


def test_unreachable_server(monkeypatch, tmp_path):
    url = closed_port_url("coat_lite_tiny.pth")
    use_manifest(monkeypatch, tmp_path, {"coat_lite_tiny": {"url": url, "sha256": "e88e96b0"}})
    with pytest.raises(weights.WeightsDownloadError) as info:
        weights.ensure_preset("coat_lite_tiny", fake_writer([]))
    message = str(info.value)
    assert (
        url in message
        and "e88e96b0" in message
        and "network" in message
        and MANIFEST_ENV in message
    )
    assert _cache_is_clean(tmp_path)


def test_missing_file_url(monkeypatch, tmp_path):
    url = (tmp_path / "absent.pth").as_uri()
    use_manifest(monkeypatch, tmp_path, {"coat_lite_tiny": {"url": url, "sha256": "e88e96b0"}})
    with pytest.raises(weights.WeightsDownloadError, match="absent.pth"):
        weights.ensure_preset("coat_lite_tiny", fake_writer([]))
    assert _cache_is_clean(tmp_path)


def test_hostile_checkpoint_runs_nothing_and_is_not_kept(monkeypatch, tmp_path, server):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "x": Hostile(f"touch {marker}")}, evil)
    url = server.serve("/coat_lite_tiny.pth", evil)
    use_manifest(monkeypatch, tmp_path, {"coat_lite_tiny": {"url": url, "sha256": sha256_of(evil)}})
    calls = []
    with pytest.raises(UnsafeCheckpointError, match="system"):
        weights.ensure_preset("coat_lite_tiny", fake_writer(calls))
    assert not marker.exists()
    assert calls == [] and _cache_is_clean(tmp_path)


def test_failed_conversion_leaves_no_half_written_file(
    monkeypatch, tmp_path, server, small_checkpoint
):
    url = server.serve("/coat_lite_tiny.pth", small_checkpoint)
    use_manifest(
        monkeypatch,
        tmp_path,
        {"coat_lite_tiny": {"url": url, "sha256": sha256_of(small_checkpoint)}},
    )

    def crashing_converter(name, state_dict, folder, metadata):
        with open(os.path.join(folder, "model.weights.h5"), "wb") as f:
            f.write(b"half")
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError, match="converter crashed"):
        weights.ensure_preset("coat_lite_tiny", crashing_converter)
    assert _cache_is_clean(tmp_path)
    calls = []
    assert os.path.isdir(weights.ensure_preset("coat_lite_tiny", fake_writer(calls)))
    assert len(calls) == 1


def test_leftovers_of_a_killed_process_are_reused_or_removed(
    monkeypatch, tmp_path, server, small_checkpoint
):
    url = server.serve("/coat_lite_tiny.pth", small_checkpoint)
    digest = sha256_of(small_checkpoint)
    use_manifest(monkeypatch, tmp_path, {"coat_lite_tiny": {"url": url, "sha256": digest}})
    folder = tmp_path / "keras_home" / "models" / "keras_coat"
    folder.mkdir(parents=True)
    stem = f"coat_lite_tiny-{digest[:8]}"
    (folder / f".{stem}.partial-dead.pth").write_bytes(b"partial download")
    (folder / f".{stem}.partial-dead").mkdir()  # a preset directory being written
    (folder / f".{stem}.partial-dead" / "model.weights.h5").write_bytes(b"partial conversion")
    # A verified download whose conversion was killed: reused, not fetched again.
    (folder / f"{stem}.pth").write_bytes(small_checkpoint.read_bytes())
    calls = []
    weights.ensure_preset("coat_lite_tiny", fake_writer(calls))
    assert server.requests == [] and len(calls) == 1
    assert _cache_files(tmp_path) == sorted([stem, f"{stem}.lock"])


@pytest.mark.slow
def test_two_processes_share_one_download(monkeypatch, tmp_path, server, small_checkpoint):
    url = server.serve("/coat_lite_tiny.pth", small_checkpoint)
    manifest = write_manifest(
        tmp_path / "m.json", {"coat_lite_tiny": {"url": url, "sha256": sha256_of(small_checkpoint)}}
    )
    calls_log = tmp_path / "calls.log"
    program = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.join(REPO_ROOT, "tests")!r})
        from tests._weights_fixtures import fake_writer  # first: it loads timm before TF
        from keras_coat import weights

        def slow_converter(name, state_dict, folder, metadata):
            with open({str(calls_log)!r}, "a") as log:
                log.write("convert\\n")
            time.sleep(1.5)  # long enough for the other process to reach the lock
            fake_writer([])(name, state_dict, folder, metadata)

        print(weights.ensure_preset("coat_lite_tiny", slow_converter))
        """)
    env = dict(
        os.environ,
        KERAS_COAT_WEIGHTS_MANIFEST=manifest,
        KERAS_HOME=str(tmp_path / "keras_home"),
        PYTHONPATH=REPO_ROOT,
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", program],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1 and os.path.isdir(paths.pop())
    assert server.requests == ["/coat_lite_tiny.pth"]
    assert calls_log.read_text() == "convert\n"
    assert len([n for n in _cache_files(tmp_path) if not n.endswith(".lock")]) == 1


# ------------------------------------------------ end to end, with the real model

IMAGE_SIZE = 224


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """A perturbed timm coat_lite_tiny in the authors' checkpoint layout, with
    its logits and pre-logits on random inputs."""
    folder = tmp_path_factory.mktemp("reference")
    model = timm_model("coat_lite_tiny", seed=0)
    path = save_authors_checkpoint(model, folder / "coat_lite_tiny.pth")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    from keras_coat.imagenet import preprocess_input

    normalized = preprocess_input(images)
    with torch.no_grad():
        x = torch.from_numpy(normalized).permute(0, 3, 1, 2)
        features = model.forward_features(x)
        logits = model.forward_head(features).numpy()
        pre_logits = model.forward_head(features, pre_logits=True).numpy()
    np.savez(folder / "expected.npz", images=images, normalized=normalized, logits=logits)
    return {
        "path": path,
        "sha256": sha256_of(path),
        "images": images,
        "normalized": normalized,
        "logits": logits,
        "pre_logits": pre_logits,
        "npz": str(folder / "expected.npz"),
    }


@pytest.mark.slow
def test_imagenet_weights_end_to_end(monkeypatch, tmp_path, server, tiny_reference):
    import keras_coat
    from keras_coat.imagenet import preprocess_input

    url = server.serve("/pretrained/coat_lite_tiny.pth", tiny_reference["path"])
    use_manifest(
        monkeypatch,
        tmp_path,
        {"coat_lite_tiny": {"url": url, "sha256": tiny_reference["sha256"][:8]}},
    )

    model = keras_coat.CoaTLiteTiny(
        weights="imagenet", include_preprocessing=False, classifier_activation=None
    )
    logits = model.predict(tiny_reference["normalized"], verbose=0)
    np.testing.assert_allclose(logits, tiny_reference["logits"], atol=1e-4, rtol=0)
    assert server.requests == ["/pretrained/coat_lite_tiny.pth"]
    cached = weights.cached_preset_path("coat_lite_tiny")
    assert _entry_files(cached) == ["config.json", "image_converter.json", "metadata.json",
                                    "model.weights.h5", "task.json", "task.weights.h5"]
    with open(os.path.join(cached, "metadata.json")) as f:
        metadata = json.load(f)
    assert metadata["source"] == {"checkpoint": "coat_lite_tiny", "url": url,
                                  "sha256": tiny_reference["sha256"]}
    assert metadata["keras_coat_version"] == keras_coat.__version__

    with no_network():
        # Headless, from the cache, with no request at all.
        backbone = keras_coat.CoaTLiteTiny(
            weights="imagenet", include_top=False, pooling="token", include_preprocessing=False
        )
        features = backbone.predict(tiny_reference["normalized"], verbose=0)
        # The built-in normalization agrees with preprocess_input.
        full = keras_coat.CoaTLiteTiny(weights="imagenet", classifier_activation=None)
        raw_logits = full.predict(tiny_reference["images"], verbose=0)
    np.testing.assert_allclose(features, tiny_reference["pre_logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(raw_logits, tiny_reference["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        preprocess_input(tiny_reference["images"]), tiny_reference["normalized"], atol=0
    )
    assert server.requests == ["/pretrained/coat_lite_tiny.pth"]

    # A cache file damaged after the fact is fetched and converted again.
    with open(os.path.join(cached, "model.weights.h5"), "r+b") as f:
        f.write(b"garbage!")
    model = keras_coat.CoaTLiteTiny(
        weights="imagenet", include_preprocessing=False, classifier_activation=None
    )
    np.testing.assert_allclose(
        model.predict(tiny_reference["normalized"], verbose=0),
        tiny_reference["logits"],
        atol=1e-4,
        rtol=0,
    )
    assert len(server.requests) == 2


@pytest.mark.slow
def test_imagenet_weights_load_without_torch(tmp_path, server, tiny_reference):
    url = server.serve("/coat_lite_tiny.pth", tiny_reference["path"])
    manifest = write_manifest(
        tmp_path / "m.json", {"coat_lite_tiny": {"url": url, "sha256": tiny_reference["sha256"]}}
    )
    run_without_torch(
        f"""
        import numpy as np
        import keras_coat
        expected = np.load({tiny_reference["npz"]!r})
        model = keras_coat.CoaTLiteTiny(
            weights="imagenet", include_preprocessing=False, classifier_activation=None
        )
        logits = model.predict(expected["normalized"], verbose=0)
        np.testing.assert_allclose(logits, expected["logits"], atol=1e-4, rtol=0)
        """,
        env_updates={"KERAS_COAT_WEIGHTS_MANIFEST": manifest, "KERAS_HOME": str(tmp_path / "home")},
    )
    assert server.requests == ["/coat_lite_tiny.pth"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "factory,match",
    [
        # Lite Small is deeper: the tiny checkpoint lacks its blocks.
        ("CoaTLiteSmall", r"lacks .*serial_blocks1\.2\."),
        # Lite Mini has the same depths but wider stages 3-4: a shape mismatch.
        ("CoaTLiteMini", r"Shape mismatch for '.*'.*\(\d+(, \d+)*\).*\(\d+(, \d+)*\)"),
    ],
    ids=["deeper-variant", "wider-variant"],
)
def test_checkpoint_of_another_variant(
    monkeypatch, tmp_path, server, tiny_reference, factory, match
):
    import keras_coat
    from keras_coat.convert import ConversionError

    url = server.serve("/tiny.pth", tiny_reference["path"])
    name = {"CoaTLiteSmall": "coat_lite_small", "CoaTLiteMini": "coat_lite_mini"}[factory]
    use_manifest(monkeypatch, tmp_path, {name: {"url": url, "sha256": tiny_reference["sha256"]}})
    with pytest.raises(ConversionError, match=match) as info:
        getattr(keras_coat, factory)(weights="imagenet")
    assert url in str(info.value) and name in str(info.value)
    assert _cache_is_clean(tmp_path)


def test_model_checks_before_any_download(monkeypatch, tmp_path):
    import keras_coat

    use_manifest(
        monkeypatch, tmp_path, {"coat_lite_tiny": {"url": closed_port_url(), "sha256": "e88e96b0"}}
    )
    with pytest.raises(ValueError, match="classes"):
        keras_coat.CoaTLiteTiny(weights="imagenet", classes=10)
    with pytest.raises(ValueError, match="3 input channels"):
        keras_coat.CoaTLiteTiny(weights="imagenet", input_shape=(64, 64, 1),
                                include_preprocessing=False)
    with pytest.raises(ValueError, match="Unknown CoaT preset 'coat_lite_huge'"):
        keras_coat.CoaTLiteTiny(weights="coat_lite_huge")
    assert _cache_is_clean(tmp_path)


# ------------------------------------------------------------------ download progress


def test_a_download_shows_its_progress_once_and_a_cached_load_is_quiet(
    monkeypatch, tmp_path, server, small_checkpoint, capsys
):
    url = server.serve("/w/coat_lite_tiny.pth", small_checkpoint)
    use_manifest(
        monkeypatch, tmp_path, {"coat_lite_tiny": {"url": url, "sha256": sha256_of(small_checkpoint)}}
    )
    size = os.path.getsize(small_checkpoint)
    weights.ensure_preset("coat_lite_tiny", fake_writer([]))
    out = capsys.readouterr().out
    assert out.count(f"Downloading the coat_lite_tiny weights from {url}") == 1
    # keras.utils.Progbar's line: bytes received of the declared size, and the rate.
    assert f"{size}/{size}" in out and "MB/s" in out
    assert out.count("\n") == 2  # the heading and one finished bar, not a line per block

    weights.ensure_preset("coat_lite_tiny", fake_writer([]))
    assert capsys.readouterr().out == ""  # cached: nothing printed, nothing fetched
    assert server.requests == ["/w/coat_lite_tiny.pth"]
