"""Model hubs (`keras_coat.hub`) against a loopback server speaking the Hugging Face Hub's HTTP
protocol (tests/hub_server.py): a keras-coat preset published with `upload_preset` and loaded with
`from_preset("hf://...")`; timm repos written by timm's own `push_to_hf_hub`, converted on the
fly, matching timm on TensorFlow, JAX and PyTorch; and the attacker's and the unlucky user's
repos, each one clear error that leaves nothing in keras-coat's cache.

huggingface_hub reads HF_ENDPOINT when it is imported, so every client runs in a subprocess
(`HubServer.run_python`); the server runs in this process."""

import io
import json
import os
import string

import hypothesis
import keras
import pytest
from hypothesis import strategies as st

from keras_coat import hub, preset_io
from keras_coat.imagenet import class_wnids
from keras_coat.presets import PRESETS, ImagePreprocessing, PresetError
from tests._weights_fixtures import Hostile, import_blocker, write_torch_like_zip
from tests.hub_server import OVERSEND_BYTES, REPO_ROOT, HubServer

TINY = dict(embed_dims=(16, 16, 24, 32), serial_depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2))
BACKENDS = ("tensorflow", "jax", "torch")

# Client-side helpers every script starts with: how many requests the server has seen, and
# every file under keras-coat's cache.
CLIENT_PRELUDE = """
import json, os, urllib.request
import numpy as np

def server_requests():
    url = os.environ["HF_ENDPOINT"] + "/_loopback/requests"
    return json.load(urllib.request.urlopen(url))["count"]

def cache_files():
    root = os.path.join(os.environ["KERAS_HOME"], "models", "keras_coat")
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, names in os.walk(root) for f in names)
"""


# ------------------------------------------------------------------------------- handles


@pytest.mark.parametrize("handle, scheme, repo_id, revision", [
    ("hf://me/flowers", hub.HF_SCHEME, "me/flowers", None),
    ("hf://timm/coat_lite_small.in1k@main", hub.HF_SCHEME, "timm/coat_lite_small.in1k", "main"),
    ("hf://me/flowers@refs/pr/3", hub.HF_SCHEME, "me/flowers", "refs/pr/3"),
    ("kaggle://me/coat/keras/flowers", hub.KAGGLE_SCHEME, "me/coat/keras/flowers", None),
    ("kaggle://me/coat/keras/flowers/2", hub.KAGGLE_SCHEME, "me/coat/keras/flowers", "2"),
])
def test_handles_parse_as_keras_hub_and_huggingface_hub_spell_them(
    handle, scheme, repo_id, revision
):
    ref = hub.parse_handle(handle)
    assert (ref.scheme, ref.repo_id, ref.revision, str(ref)) == (scheme, repo_id, revision, handle)
    assert hub.is_handle(handle)


@pytest.mark.parametrize("handle", [
    "hf://flowers", "hf://me/flowers/main", "hf://me/flowers@", "hf://@main", "hf://me//x",
    "hf://datasets/me/flowers", "kaggle://me/coat/keras", "kaggle://me/coat/keras/a/b/c",
    "kaggle://me//keras/flowers", "kaggle://me/../keras/flowers", "s3://me/flowers",
    "me/flowers",
])
def test_malformed_handles_are_refused_naming_them(handle):
    with pytest.raises(PresetError, match="expected") as info:
        hub.parse_handle(handle)
    assert repr(handle) in str(info.value)


@pytest.mark.parametrize("handle", ["hf://me/flowers@main", "kaggle://me/coat/keras/flowers/2"])
def test_uploads_take_no_revision(handle):
    with pytest.raises(PresetError, match="expected"):
        hub.parse_handle(handle, for_upload=True)
    assert hub.parse_handle("hf://flowers", for_upload=True).repo_id == "flowers"


# ---------------------------------------------------------------- keras-coat preset repos


def _tiny_preset(folder, metrics=None, num_classes=3):
    backbone = keras.saving.get_registered_object(preset_io.BACKBONE_NAME)(
        **TINY, image_shape=(64, 64, 3)
    )
    classifier = keras.saving.get_registered_object(preset_io.CLASSIFIER_NAME)(
        backbone, num_classes=num_classes,
        class_names=["daisy", "rose", "tulip"][:num_classes] if num_classes else None,
        preprocessing=ImagePreprocessing(image_size=(64, 64), crop_pct=0.9),
    )
    preset_io.save_to_preset(classifier, folder, metadata={"metrics": metrics or {}})
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


@pytest.mark.slow
def test_an_uploaded_preset_loads_from_the_hub_with_identical_outputs(hub_server, tmp_path):
    hub_server.add_repo("me/owned", {"README.md": b"# My own card\n"})
    script = CLIENT_PRELUDE + """
import time, keras, keras_coat
from keras_coat import hub, preset_io
from keras_coat.presets import ImagePreprocessing

home = os.environ["TEST_HOME"]
backbone = keras_coat.CoaTBackbone(**TINY, image_shape=(64, 64, 3))
model = keras_coat.CoaTImageClassifier(
    backbone, num_classes=3, class_names=["daisy", "rose", "tulip"],
    preprocessing=ImagePreprocessing(image_size=(64, 64), crop_pct=0.9),
)
preset = os.path.join(home, "flowers")
preset_io.save_to_preset(model, preset, metadata={"metrics": {"flowers-val": {"top1": 0.93}}})
pinned = keras_coat.upload_preset("hf://me/flowers", preset)

x = np.random.RandomState(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
loaded = keras_coat.CoaTImageClassifier.from_preset("hf://me/flowers")
entry = hub.download("hf://me/flowers")
stamp = os.stat(os.path.join(entry, "model.weights.h5")).st_mtime_ns

before = server_requests()
again = keras_coat.CoaTImageClassifier.from_preset("hf://me/flowers")
second_load_requests = server_requests() - before
before = server_requests()
pinned_entry = hub.download(pinned)
pinned_requests = server_requests() - before

# The features alone, from the same repo.
features = keras_coat.CoaTBackbone.from_preset("hf://me/flowers")

# A backbone-only preset replaces it: the classifier's files go in the same commit.
backbone_dir = os.path.join(home, "backbone")
preset_io.save_to_preset(backbone, backbone_dir)
keras_coat.upload_preset("hf://me/flowers", backbone_dir)
headless = keras_coat.CoaTImageClassifier.from_preset("hf://me/flowers")
# hf://repo: the token's own namespace; an owner's card stays.
own = keras_coat.upload_preset("hf://owned", preset)
print(json.dumps({
    "pinned": pinned, "own": own,
    "same_outputs": bool(np.array_equal(np.asarray(model(x)), np.asarray(loaded(x)))),
    "same_again": bool(np.array_equal(np.asarray(model(x)), np.asarray(again(x)))),
    "same_features": bool(np.array_equal(
        np.asarray(backbone(x / 255.0)["P5"]), np.asarray(features(x / 255.0)["P5"]))),
    "class_names": loaded.class_names, "preprocessing": loaded.preprocessing.get_config(),
    "entry": os.path.relpath(entry, os.environ["KERAS_HOME"]),
    "pinned_entry": pinned_entry == entry,
    "unchanged": os.stat(os.path.join(entry, "model.weights.h5")).st_mtime_ns == stamp,
    "links": [n for n in os.listdir(entry) if os.path.islink(os.path.join(entry, n))],
    "second_load_requests": second_load_requests, "pinned_requests": pinned_requests,
    "headless_classes": headless.num_classes,
    "hf_cache": sorted(os.listdir(os.path.join(os.environ["HF_HOME"], "hub"))),
}))
""".replace("**TINY", f"**{TINY!r}")
    result = hub_server.run_python(script, tmp_path, TEST_HOME=str(tmp_path))
    assert result["same_outputs"] and result["same_again"] and result["same_features"]
    assert result["class_names"] == ["daisy", "rose", "tulip"]
    assert result["preprocessing"]["crop_pct"] == 0.9
    # One preset directory of real files per commit, in keras-coat's cache; huggingface_hub
    # keeps its own copy in its cache (HF_HOME).
    commit = result["pinned"].split("@")[1]
    assert result["pinned"] == f"hf://me/flowers@{commit}" and result["pinned_entry"]
    assert result["entry"] == os.path.join("models", "keras_coat", "hub", f"hf--me--flowers--{commit}")
    assert result["links"] == [] and "models--me--flowers" in result["hf_cache"]
    # A second load resolves the branch (the repo info, and config.json's HEAD which records the
    # branch's commit in huggingface_hub's cache) and converts nothing; a pinned commit needs no
    # request at all.
    assert result["unchanged"] and result["second_load_requests"] == 2
    assert result["pinned_requests"] == 0
    assert result["headless_classes"] is None

    first, latest = hub_server.repos["me/flowers"]["commits"], hub_server.files("me/flowers")
    assert sorted(latest) == [
        ".gitattributes", "README.md", "config.json", "metadata.json", "model.weights.h5",
    ]
    assert len(first) == 3  # created, the classifier, the backbone
    card = hub_server.files("me/flowers", commit)["README.md"].decode()
    assert card.startswith("---\nlibrary_name: keras-coat\n") and hub.CARD_MARKER in card
    for text in ("| classes | 3: daisy, rose, tulip |", "| metric: flowers-val top1 | 0.93 |",
                 'from_preset("hf://me/flowers")', "crop_pct 0.9", "| parameters | "):
        assert text in card
    assert hub_server.files("me/owned")["README.md"] == b"# My own card\n"
    assert result["own"].startswith("hf://me/owned@")
    assert "config.json" in hub_server.files("me/owned")

    # Offline (HF_HUB_OFFLINE=1): the same handle loads from the caches, with no request.
    before = len(hub_server.requests)
    offline = hub_server.run_python(CLIENT_PRELUDE + """
import keras_coat
model = keras_coat.CoaTImageClassifier.from_preset("hf://me/flowers")
print(json.dumps({"classes": model.num_classes}))
""", tmp_path, HF_HUB_OFFLINE="1")
    assert offline == {"classes": None} and len(hub_server.requests) == before


# kagglehub's protocol is Kaggle's RPC API (kagglesdk), which no loopback server here speaks: a
# stand-in module with kagglehub's two calls keeps Kaggle Models in a local folder instead.
KAGGLEHUB_STAND_IN = """
import os, shutil

ROOT = os.environ["KAGGLE_STAND_IN_ROOT"]

def model_download(handle, path=None):
    parts = handle.split("/")
    folder = os.path.join(ROOT, *parts[:4])
    version = parts[4] if len(parts) == 5 else max(os.listdir(folder), key=int)
    file = os.path.join(folder, version, path)
    if not os.path.isfile(file):
        raise RuntimeError(f"404 Client Error: {path} not found")
    return file

def model_upload(handle, local_model_dir, license_name=None, version_notes=""):
    folder = os.path.join(ROOT, *handle.split("/"))
    os.makedirs(folder, exist_ok=True)
    version = str(len(os.listdir(folder)) + 1)
    shutil.copytree(local_model_dir, os.path.join(folder, version))
"""


MISSING_PACKAGES = [
    ("huggingface_hub", "hf://me/flowers"), ("kagglehub", "kaggle://me/coat/keras/flowers"),
]


@pytest.fixture(scope="module")
def client_without_requests(tmp_path_factory):
    """One client process, against a fresh hub server, for the checks that must not reach it:
    `hub.download` with each hub package blocked in turn (keras_coat.hub imports a package only
    when a handle of its scheme is downloaded; each blocker is removed before the next is set),
    `upload_preset` of an invalid preset to hf://me/broken, then a Kaggle preset's round trip
    through the kagglehub stand-in. With the server's requests and repos afterwards."""
    home = tmp_path_factory.mktemp("no_requests")
    stand_in = home / "stand_in" / "kagglehub"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text(KAGGLEHUB_STAND_IN)
    files = _tiny_preset(str(home / "preset"))
    _tiny_preset(str(home / "broken"))
    (home / "broken" / "model.weights.h5").write_bytes(files["model.weights.h5"][:100])
    script = CLIENT_PRELUDE + "import sys\nfrom keras_coat import hub\nmissing = {}\n"
    for package, handle in MISSING_PACKAGES:
        script += import_blocker(package) + f"""
try:
    hub.download({handle!r})
    missing[{package!r}] = {{"error": None, "cache": cache_files()}}
except ImportError as e:
    missing[{package!r}] = {{"error": str(e), "cache": cache_files()}}
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_Block"]  # unblocked
"""
    script += f"""
import keras_coat
from keras_coat.presets import PresetError
try:
    keras_coat.upload_preset("hf://me/broken", {str(home / "broken")!r})
    refusal = None
except PresetError as e:
    refusal = str(e)
requests_after_refusal = server_requests()
handle = keras_coat.upload_preset("kaggle://me/coat/keras/flowers", {str(home / "preset")!r})
entry = hub.download("kaggle://me/coat/keras/flowers")
model = keras_coat.CoaTImageClassifier.from_preset("kaggle://me/coat/keras/flowers/1")
print(json.dumps({{"missing": missing, "refusal": refusal,
                   "requests_after_refusal": requests_after_refusal,
                   "handle": handle, "entry": os.path.basename(entry),
                   "names": model.class_names, "cache": cache_files()}}))
"""
    with HubServer() as server:
        result = server.run_python(
            script, home, PYTHONPATH=os.pathsep.join([str(stand_in.parent), REPO_ROOT]),
            KAGGLE_STAND_IN_ROOT=str(home / "kaggle"),
        )  # fmt: skip
        result.update(requests=list(server.requests), repos=dict(server.repos), home=home)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("package, handle", MISSING_PACKAGES)
def test_a_missing_hub_package_is_named(client_without_requests, package, handle):
    result = client_without_requests["missing"][package]
    assert result["error"] is not None, result
    assert package in result["error"] and handle in result["error"]
    assert "pip install" in result["error"] and result["cache"] == []


@pytest.mark.slow
def test_a_kaggle_preset_round_trips_through_kagglehubs_calls(client_without_requests):
    result = client_without_requests
    assert result["handle"] == "kaggle://me/coat/keras/flowers"
    assert result["entry"] == "kaggle--me--coat--keras--flowers--1"
    assert result["names"] == ["daisy", "rose", "tulip"]
    uploaded = sorted(os.listdir(result["home"] / "kaggle" / "me" / "coat" / "keras" / "flowers"
                                 / "1"))
    assert "README.md" in uploaded and "model.weights.h5" in uploaded


@pytest.mark.slow
def test_upload_refuses_an_invalid_preset_before_any_request(client_without_requests):
    result = client_without_requests
    assert result["refusal"] is not None, result
    assert "model.weights.h5" in result["refusal"] and "unreadable" in result["refusal"]
    assert result["requests_after_refusal"] == 0
    # Nor did anything else in that process (the blocked packages, the Kaggle round trip).
    assert result["requests"] == [] and result["repos"] == {}


# ----------------------------------------------------------------------------- timm repos

# Run without Keras: timm's own hub code writes the repos; the reference logits come from the
# same model.
TIMM_SCRIPT = CLIENT_PRELUDE + """
import tempfile, torch, timm, safetensors.torch
from huggingface_hub import HfApi
from timm.models import push_to_hf_hub, save_for_hf

home = os.environ["TEST_HOME"]
torch.manual_seed(0)
model = timm.create_model("coat_lite_tiny").eval()
# pytorch_model.bin, config.json and README.md, as timm publishes a model (its safetensors
# writer refuses CoaT's shared modules).
push_to_hf_hub(model, "timm-test/coat_lite_tiny", safe_serialization=False)
# model.safetensors as the Hub's timm/coat_* repos hold it: one name per shared tensor.
with tempfile.TemporaryDirectory() as folder:
    save_for_hf(model, folder)
    os.remove(os.path.join(folder, "pytorch_model.bin"))
    safetensors.torch.save_model(model, os.path.join(folder, "model.safetensors"))
    HfApi().create_repo("timm-test/coat_lite_tiny_st")
    HfApi().upload_folder(repo_id="timm-test/coat_lite_tiny_st", folder_path=folder)
push_to_hf_hub(timm.create_model("test_resnet"), "timm-test/test_resnet",
               safe_serialization=False)

x = np.random.RandomState(0).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
cfg = model.pretrained_cfg
normalized = (x / 255 - np.float32(cfg["mean"])) / np.float32(cfg["std"])
with torch.no_grad():
    logits = model(torch.from_numpy(normalized.transpose(0, 3, 1, 2))).numpy()
np.save(os.path.join(home, "images.npy"), x)
np.save(os.path.join(home, "logits.npy"), logits)
print(json.dumps({"cfg": {k: cfg[k] for k in ("crop_pct", "interpolation", "crop_mode")}}))
"""


@pytest.fixture(scope="module")
def timm_hub(tmp_path_factory):
    """A server holding timm repos pushed by timm itself, and timm's logits for `images.npy`."""
    home = tmp_path_factory.mktemp("timm_hub")
    with HubServer(user="timm-test") as server:
        server.timm_cfg = server.run_python(TIMM_SCRIPT, home, TEST_HOME=str(home))["cfg"]
        server.home = str(home)
        yield server


# timm_results(home): what keras_coat makes of the timm repos, against timm's logits.
TIMM_CHECK = """
import keras, keras_coat
from keras_coat import hub

def timm_results(home):
    images = np.load(os.path.join(home, "images.npy"))
    logits = np.load(os.path.join(home, "logits.npy"))
    result = {"backend": keras.backend.backend()}
    for repo in ("timm-test/coat_lite_tiny", "timm-test/coat_lite_tiny_st"):
        model = keras_coat.CoaTImageClassifier.from_preset("hf://" + repo, activation=None)
        entry = hub.download("hf://" + repo)
        with open(os.path.join(entry, "metadata.json")) as f:
            source = json.load(f)["source"]
        result[repo] = {
            "max_diff": float(np.max(np.abs(np.asarray(model.predict(images, verbose=0))
                                            - logits))),
            "classes": model.num_classes, "first_names": model.class_names[:2],
            "preprocessing": model.preprocessing.get_config(), "source": source,
        }
    return result
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_timm_repo_converts_on_the_fly_and_matches_timm(timm_hub, tmp_path, backend, request):
    if backend == "tensorflow":
        # On TensorFlow the `refusals` client process runs the same check after the refusals:
        # one Keras and TensorFlow start-up fewer.
        result = request.getfixturevalue("refusals")["timm"]
    else:
        script = CLIENT_PRELUDE + TIMM_CHECK + f"print(json.dumps(timm_results({timm_hub.home!r})))"
        result = timm_hub.run_python(script, tmp_path, backend=backend)
    assert result["backend"] == backend
    assert timm_hub.timm_cfg == {"crop_pct": 0.9, "interpolation": "bicubic", "crop_mode": "center"}
    for repo, weights_file in (("timm-test/coat_lite_tiny", "pytorch_model.bin"),
                               ("timm-test/coat_lite_tiny_st", "model.safetensors")):
        got = result[repo]
        assert got["max_diff"] < 1e-4, (repo, got["max_diff"])
        assert got["classes"] == 1000 and got["first_names"] == ["tench", "goldfish"]
        assert got["preprocessing"] == {
            "image_size": [224, 224], "crop_pct": 0.9, "crop_mode": "center",
            "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        }
        assert got["source"] == {
            "hub": f"hf://{repo}", "revision": timm_hub.repos[repo]["refs"]["main"],
            "file": weights_file, "format": "timm", "architecture": "coat_lite_tiny",
        }


# --------------------------------------------------------- the attacker and the unlucky user


def _timm_config(server, **changes):
    config = json.loads(server.files("timm-test/coat_lite_tiny")["config.json"])
    for key, value in changes.items():
        if key.startswith("cfg_"):
            config["pretrained_cfg"][key[4:]] = value
        else:
            config[key] = value
    return json.dumps(config).encode()


def _truncated(data):
    return data[: len(data) // 3]


def _hostile_bin(marker):
    buffer = io.BytesIO()
    write_torch_like_zip(buffer, Hostile(f"touch {marker}"))
    return buffer.getvalue()


HUGE_CONFIG = json.dumps({"pad": "x" * (5 * 2**20)}).encode()
# handle -> (what the message says, beyond the handle), with each repo's files set up by
# `_bad_repos`.
REFUSALS = {
    "hf://nobody/nothing": "no such repo",
    "hf://timm-test/coat_lite_tiny@v9": "has no revision 'v9'",
    "hf://bad/private": "no such repo",
    "hf://bad/preset-without-weights": "has no model.weights.h5",
    "hf://bad/timm-without-weights": "neither model.safetensors nor pytorch_model.bin",
    "hf://timm-test/test_resnet": "not a CoaT repo: it holds the timm architecture 'test_resnet'",
    "hf://bad/keras-hub-vit": "not a CoaT repo: its config.json describes the Keras class "
                              "'keras_hub>ViTBackbone'",
    "hf://bad/transformers": "not a CoaT repo: its config.json describes the transformers model",
    "hf://bad/no-config": "has no config.json",
    "hf://bad/declared-huge": "pytorch_model.bin has 10000000000 bytes, more than the",
    "hf://bad/huge-config": f"config.json has {len(HUGE_CONFIG)} bytes, more than the 4194304 "
                            "allowed; refused before downloading",
    "hf://bad/oversend": "the server sent more than the 4194304 bytes allowed for config.json",
    "hf://bad/truncated-safetensors": "model.safetensors is not a readable checkpoint",
    "hf://bad/truncated-bin": "pytorch_model.bin is not a readable checkpoint",
    "hf://bad/hostile-bin": "pytorch_model.bin is not a readable checkpoint",
    "hf://bad/damaged-preset": "model.weights.h5 in the repo is unreadable: Cannot read the "
                               "weights file 'model.weights.h5' as HDF5",
    "hf://bad/preset-bad-json": "config.json is not valid JSON",
    "hf://bad/other-variant": "pytorch_model.bin does not fit timm's coat_lite_mini",
    "hf://bad/dropped": "downloading pytorch_model.bin failed: RemoteProtocolError",
    "hf://bad/border-crop": "crop_mode must be one of ('center', 'squash'); received 'border'",
    "hf://bad/changed-architecture": "model_args ['embed_dims'] change timm's coat_lite_tiny",
    "hf://bad/label-names": "label_names must be 1000 strings",
    "hf://bad/huge-head": "num_classes must be an integer in [0, 100000]",
    "hf://bad/not-a-coat-in-a-coat-preset": ": The repo does not describe a valid model: Every "
                                            "embedding dim must be divisible",
}


def _bad_repos(server, preset, marker):
    timm = server.files("timm-test/coat_lite_tiny")
    safetensors = server.files("timm-test/coat_lite_tiny_st")["model.safetensors"]
    bin_, config = timm["pytorch_model.bin"], timm["config.json"]
    bad_backbone = json.loads(preset["config.json"])
    bad_backbone["config"]["embed_dims"] = [16, 16, 24, 30]  # not divisible by the 8 heads
    repos = {
        "bad/private": ({"config.json": config, "pytorch_model.bin": bin_}, True),
        "bad/preset-without-weights": {
            k: v for k, v in preset.items() if k != "model.weights.h5"},
        "bad/timm-without-weights": {"config.json": config},
        "bad/keras-hub-vit": {"config.json": json.dumps(
            {"module": "keras_hub.models", "class_name": "ViTBackbone", "config": {},
             "registered_name": "keras_hub>ViTBackbone"}).encode()},
        "bad/transformers": {"config.json": json.dumps(
            {"architectures": ["ViTForImageClassification"], "model_type": "vit"}).encode()},
        "bad/no-config": {"pytorch_model.bin": bin_},
        "bad/declared-huge": {"config.json": config, "pytorch_model.bin": bin_},
        "bad/huge-config": {"config.json": HUGE_CONFIG},
        "bad/oversend": {"config.json": config},
        "bad/truncated-safetensors": {"config.json": config,
                                      "model.safetensors": _truncated(safetensors)},
        "bad/truncated-bin": {"config.json": config, "pytorch_model.bin": _truncated(bin_)},
        "bad/hostile-bin": {"config.json": config, "pytorch_model.bin": _hostile_bin(marker)},
        "bad/damaged-preset": {**preset, "model.weights.h5": _truncated(
            preset["model.weights.h5"])},
        "bad/preset-bad-json": {**preset, "config.json": b'{"registered_name": '},
        "bad/other-variant": {"config.json": _timm_config(server, architecture="coat_lite_mini"),
                              "pytorch_model.bin": bin_},
        "bad/dropped": {"config.json": config, "pytorch_model.bin": bin_},
        "bad/border-crop": {"config.json": _timm_config(server, cfg_crop_mode="border"),
                       "pytorch_model.bin": bin_},
        "bad/changed-architecture": {"config.json": _timm_config(
            server, model_args={"embed_dims": [64, 128, 256, 512]}), "pytorch_model.bin": bin_},
        "bad/label-names": {"config.json": _timm_config(server, label_names=["cat", "dog"]),
                            "pytorch_model.bin": bin_},
        "bad/huge-head": {"config.json": _timm_config(
            server, num_classes=10**9, cfg_num_classes=10**9,
            model_args={"num_classes": 10**9, "in_chans": 3}),
                          "pytorch_model.bin": bin_},
        "bad/not-a-coat-in-a-coat-preset": {
            **{k: v for k, v in preset.items() if k != "task.json"},
            "config.json": json.dumps(bad_backbone).encode()},
    }
    for repo_id, files in repos.items():
        files, private = files if isinstance(files, tuple) else (files, False)
        server.add_repo(repo_id, files, private=private)
    server.faults[("bad/declared-huge", "pytorch_model.bin")] = 10**10
    server.faults[("bad/oversend", "config.json")] = "oversend"
    server.faults[("bad/dropped", "pytorch_model.bin")] = "drop"


@pytest.fixture(scope="module")
def refusals(timm_hub, tmp_path_factory):
    """What `keras_coat.hub.download` did with each handle of REFUSALS, in one client process on
    TensorFlow: {handle: {"type", "message", "cache"}}, plus the private repo loaded with the
    token, and then TIMM_CHECK's results ("timm")."""
    home = tmp_path_factory.mktemp("refusals")
    marker = home / "hostile-code-ran"
    preset = _tiny_preset(str(home / "preset"))
    _bad_repos(timm_hub, preset, marker)
    result = timm_hub.run_python(CLIENT_PRELUDE + TIMM_CHECK + f"""
from keras_coat import hub
outcomes = {{}}
token = os.environ.pop("HF_TOKEN")  # the private repo is refused without it
for handle in {list(REFUSALS)!r}:
    try:
        hub.download(handle)
        outcomes[handle] = {{"type": None, "message": "", "cache": cache_files()}}
    except Exception as e:
        outcomes[handle] = {{"type": type(e).__name__, "message": str(e),
                            "cache": cache_files()}}
try:
    hub.upload_preset("hf://me/new", {str(home / "preset")!r})
except Exception as e:
    outcomes["upload without token"] = f"{{type(e).__name__}}: {{e}}"
os.environ["HF_TOKEN"] = token
outcomes["with token"] = os.path.basename(hub.download("hf://bad/private"))
# test_a_timm_repo_converts_on_the_fly_and_matches_timm[tensorflow], once the refusals' cache
# checks are done.
outcomes["timm"] = timm_results({timm_hub.home!r})
print(json.dumps(outcomes))
""", home, backend="tensorflow")
    result["marker"] = marker.exists()
    return result


@pytest.mark.slow
@pytest.mark.adversarial
@pytest.mark.parametrize("handle", REFUSALS)
def test_each_bad_repo_is_one_clear_error_leaving_nothing_behind(refusals, handle):
    outcome = refusals[handle]
    assert outcome["type"] == "PresetError", outcome
    assert outcome["message"].startswith(f"{handle}: "), outcome["message"]
    assert REFUSALS[handle] in outcome["message"], outcome["message"]
    assert outcome["cache"] == [], outcome["cache"]


@pytest.mark.slow
@pytest.mark.adversarial
def test_what_the_attacks_did_not_do(refusals, timm_hub):
    assert not refusals["marker"]  # the hostile pickle ran nothing
    assert timm_hub.got("bad/declared-huge", "pytorch_model.bin") == 0  # refused before
    assert timm_hub.sent_bytes[("bad/oversend", "config.json")] < OVERSEND_BYTES / 2
    # The private repo loads with the token (HF_TOKEN), and only with it; writing needs it too.
    assert refusals["with token"].startswith("hf--bad--private--")
    assert refusals["upload without token"] == (
        "PresetError: hf://me/new: the hub refused the upload (HTTP 401): log in with a token "
        "that may write to this repo (HF_TOKEN or `hf auth login`).")
    assert "me/new" not in timm_hub.repos


# ------------------------------------------------------------------ timm config.json fuzz

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2000) | st.floats(allow_nan=False)
    | st.text(string.ascii_letters + "._", max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_CFG_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std",
             "num_classes")


@pytest.mark.adversarial
@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    architecture=st.sampled_from(["coat_lite_tiny", "coat_tiny.in1k", "resnet50", ""]) | st.text(),
    cfg=st.dictionaries(st.sampled_from(_CFG_KEYS), _JSON, max_size=7),
    top=st.dictionaries(
        st.sampled_from(["num_classes", "global_pool", "label_names", "model_args"]), _JSON,
        max_size=4,
    ),
)
def test_timm_configs_give_a_spec_or_one_clear_error(architecture, cfg, top):
    config = {"architecture": architecture, "pretrained_cfg": cfg, **top}
    try:
        spec = hub.timm_spec(config, "hf://fuzz/repo")
    except PresetError as e:
        assert str(e).startswith("hf://fuzz/repo: ")
        return
    assert spec.variant == PRESETS[architecture.split(".")[0]].variant
    assert spec.num_classes is None or 1 <= spec.num_classes <= hub.MAX_CLASSES
    assert spec.class_names is None or len(spec.class_names) == spec.num_classes
    assert isinstance(spec.preprocessing, ImagePreprocessing)


def test_timm_configs_of_the_hub_read_as_timm_means_them():
    # config.json of the Hub's timm/coat_lite_small.in1k (as timm 0.9 published it).
    config = {
        "architecture": "coat_lite_small", "num_classes": 1000, "num_features": 512,
        "global_pool": "token",
        "pretrained_cfg": {
            "tag": "in1k", "custom_load": False, "input_size": [3, 224, 224],
            "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 0.9,
            "crop_mode": "center", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "num_classes": 1000, "pool_size": None, "first_conv": "patch_embed1.proj",
            "classifier": "head",
        },
    }
    spec = hub.timm_spec(config, "hf://timm/coat_lite_small.in1k")
    assert (spec.variant, spec.num_classes, spec.pooling) == ("coat_lite_small", 1000, "token")
    assert spec.preprocessing == ImagePreprocessing(crop_pct=0.9)
    assert spec.class_names[:2] == ["tench", "goldfish"]
    # timm's label_names: a list, {index: name}, or ImageNet's WordNet ids (read as the names).
    five = dict(config, num_classes=5, pretrained_cfg=dict(config["pretrained_cfg"], num_classes=5))
    assert hub.timm_spec(dict(five, label_names=list("abcde")), "x").class_names == list("abcde")
    by_index = {str(i): c for i, c in enumerate("abcde")}
    assert hub.timm_spec(dict(five, label_names=by_index), "x").class_names == list("abcde")
    assert hub.timm_spec(dict(config, label_names=class_wnids()), "x").class_names[0] == "tench"
    assert hub.timm_spec(dict(five), "x").class_names is None
    # timm's coat_lite_medium_384 squashes the whole image to 384 (crop_pct 1.0).
    squash = dict(config, pretrained_cfg=dict(config["pretrained_cfg"], crop_mode="squash"))
    assert hub.timm_spec(squash, "x").preprocessing.crop_mode == "squash"
    headless = dict(config, num_classes=0, pretrained_cfg=dict(config["pretrained_cfg"],
                                                              num_classes=0))
    assert hub.timm_spec(headless, "x").num_classes is None


def test_weights_size_limit_follows_the_variant_and_its_head():
    config = {
        "architecture": "coat_lite_tiny", "num_classes": 21843,
        "pretrained_cfg": {"num_classes": 21843},
    }
    spec = hub.timm_spec(config, "x")
    base = PRESETS["coat_lite_tiny"].max_download_bytes
    assert spec.max_weights_bytes == base + 16 * 513 * 20843
    assert hub.timm_spec(dict(config, num_classes=10, pretrained_cfg={"num_classes": 10}),
                         "x").max_weights_bytes == base
