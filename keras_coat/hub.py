"""Model hubs: ``hf://`` and ``kaggle://`` handles in, preset directories out; `upload_preset`.

`download(handle)` returns a local keras-coat preset directory for ``hf://owner/repo[@revision]``
(through huggingface_hub: its endpoint, token, cache and offline mode apply) or
``kaggle://owner/model/framework/variation[/version]`` (through kagglehub). A repo holds a
keras-coat preset (KerasHub's layout) or a timm CoaT (`config.json` with ``architecture`` and
``pretrained_cfg``, weights in ``model.safetensors`` or ``pytorch_model.bin``), converted on the
fly through the safe checkpoint reader and the strict converter, with the repo's preprocessing and
class names. Only the files those need are downloaded, each within a size limit checked in the
hub's metadata, on the bytes received and on disk. The result is published once per commit as a
directory of real files in keras-coat's cache (``hub/`` in ``$KERAS_HOME/models/keras_coat``), so
the strict preset reader reads it as it reads any preset (huggingface_hub's own cache holds
symlinks into its ``blobs/``). Failures are `PresetError`s naming the handle and the problem, and
leave nothing in keras-coat's cache. docs/hub.md has the details.

huggingface_hub and kagglehub (the ``hub`` extra) are imported only when a handle needs them.
"""

import dataclasses
import os
import re
import shutil
import tempfile
import uuid

import keras

from keras_coat import checkpoint, convert, preset_io, presets, weights
from keras_coat.presets import PRESETS, ImagePreprocessing, PresetError
from keras_coat.utils import files

__all__ = [
    "HF_SCHEME", "KAGGLE_SCHEME", "download", "is_handle", "model_card", "parse_handle",
    "timm_spec", "upload_preset",
]

HF_SCHEME = "hf://"
KAGGLE_SCHEME = "kaggle://"
# keras-coat's cache folder for hub repos (one preset directory per repo and commit).
CACHE_FOLDER = "hub"
# A model card at most this large is read back (to tell keras-coat's from the owner's).
MAX_CARD_BYTES = 1 * 2**20
# More classes than any public label set (ImageNet-21k has 21,843): a head of 100,000 classes
# holds 51 M parameters at CoaT's widest feature (512).
MAX_CLASSES = 100_000
# The widest final feature of a CoaT variant (the head holds this many weights per class).
_MAX_FEATURES = 512
# The first line of the model card upload_preset writes: a card without it is the owner's, and
# is left as it is.
CARD_MARKER = "<!-- keras-coat model card: written by keras_coat.upload_preset -->"
TIMM_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
REQUIRED_PRESET_FILES = (preset_io.CONFIG_FILE, preset_io.MODEL_WEIGHTS_FILE)
_TIMM_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
# Arguments a timm repo's `model_args` may hold: what keras-coat builds from elsewhere in the
# config (checked against it) and training-only regularization (no effect on inference).
_TIMM_MODEL_ARGS = {
    "num_classes", "in_chans", "global_pool", "img_size", "drop_rate", "drop_path_rate",
    "attn_drop_rate", "proj_drop_rate",
}
_COMMIT = re.compile(r"[0-9a-f]{40}")  # a full git commit id (it names a cache folder)
_KAGGLE_VERSION = re.compile(r"[0-9]{1,9}")
_KAGGLE_SLUG = re.compile(r"[A-Za-z0-9][\w.-]{0,99}")  # becomes part of a cache folder's name


@dataclasses.dataclass(frozen=True)
class HubHandle:
    """A parsed handle: ``hf://<repo_id>[@<revision>]`` or ``kaggle://<repo_id>[/<version>]``."""

    scheme: str  # HF_SCHEME or KAGGLE_SCHEME
    repo_id: str  # "owner/repo" (hf; just "repo" for an upload to one's own namespace), or
    # "owner/model/framework/variation" (kaggle)
    revision: str | None = None  # hf: branch, tag or commit; kaggle: version number
    text: str = ""  # the handle as given, for messages

    def __str__(self):
        return self.text


def is_handle(reference):
    """Whether `reference` is a hub handle (``hf://...`` or ``kaggle://...``)."""
    return isinstance(reference, str) and reference.startswith((HF_SCHEME, KAGGLE_SCHEME))


def parse_handle(handle, for_upload=False):
    """Splits a hub handle into a `HubHandle`, or raises a PresetError saying what is wrong.

    ``hf://owner/repo[@revision]``; for an upload also ``hf://repo`` (the token's own
    namespace), and no revision. ``kaggle://owner/model/framework/variation[/version]``; an upload
    takes no version (Kaggle numbers them).
    """
    if not is_handle(handle):
        raise PresetError(
            f"{handle!r} is not a hub handle; expected hf://owner/repo[@revision] or "
            "kaggle://owner/model/framework/variation[/version]."
        )
    if handle.startswith(HF_SCHEME):
        body = handle[len(HF_SCHEME):]
        repo_id, at, revision = body.partition("@")
        parts = repo_id.split("/")
        owner_optional = for_upload and len(parts) == 1
        if (at and (not revision or for_upload)) or (len(parts) != 2 and not owner_optional) \
                or not all(parts):
            spelling = "hf://owner/repo (or hf://repo for your own namespace)" if for_upload \
                else "hf://owner/repo or hf://owner/repo@revision"
            raise PresetError(
                f"{handle!r} is not a Hugging Face model handle; expected {spelling}."
            )
        return HubHandle(HF_SCHEME, repo_id, revision or None, handle)
    parts = handle[len(KAGGLE_SCHEME):].split("/")
    version = None
    if len(parts) == 5 and not for_upload and _KAGGLE_VERSION.fullmatch(parts[4]):
        version = parts.pop()
    if len(parts) != 4 or not all(_KAGGLE_SLUG.fullmatch(p) for p in parts):
        spelling = "kaggle://owner/model/framework/variation" + ("" if for_upload else "[/version]")
        raise PresetError(f"{handle!r} is not a Kaggle model handle; expected {spelling}.")
    return HubHandle(KAGGLE_SCHEME, "/".join(parts), version, handle)


# ------------------------------------------------------------------------------ downloading


def download(handle):
    """The local preset directory of the hub handle `handle` (see the module docstring).

    Raises:
        PresetError: a malformed handle, no such repo, revision or file, a repo that holds no
            CoaT, an oversized or damaged file, or a failed download; the message names the
            handle and the problem.
        ImportError: huggingface_hub (hf://) or kagglehub (kaggle://) is not installed.
    """
    ref = parse_handle(handle)
    if ref.scheme == KAGGLE_SCHEME:
        return _KaggleRepo(ref).preset_directory()
    return _HuggingFaceRepo(ref).preset_directory()


def _cache_entry(*parts):
    """The cache directory of one hub repo commit: ``<cache>/hub/<scheme>--<id>--<commit>``
    (``--`` appears in no hub's repo names, so the name is unambiguous)."""
    return os.path.join(weights.cache_dir(), CACHE_FOLDER, "--".join(parts).replace("/", "--"))


def _is_published(entry):
    # Entries are renamed into place whole, so a config.json means the entry is complete.
    return os.path.isfile(os.path.join(entry, preset_io.CONFIG_FILE))


class _Repo:
    """What both hubs share: given a way to fetch one file, publish the repo as a preset."""

    def __init__(self, ref):
        self.ref = ref
        self.entry = None  # set by preset_directory once the commit/version is known

    def fail(self, problem):
        return PresetError(f"{self.ref}: {problem}")

    def fetch(self, name, max_bytes, required=True):
        """The local path of the repo file `name` (None if absent and not `required`)."""
        raise NotImplementedError

    def publish(self):
        """Publishes the preset directory `self.entry` from the repo's files."""
        config_path = self.fetch(preset_io.CONFIG_FILE, preset_io.MAX_JSON_BYTES)
        try:
            config = preset_io.read_json_file(config_path, preset_io.CONFIG_FILE)
        except PresetError as e:
            raise self.fail(str(e)) from None
        kind = _repo_kind(config)
        if kind == "preset":
            self._publish_preset()
        elif kind == "timm":
            self._publish_timm(config)
        else:
            raise self.fail(f"not a CoaT repo: {kind}.")

    def _publish_preset(self):
        found = {}
        for name in preset_io.PRESET_FILES:
            is_json = name.endswith(".json")
            max_bytes = preset_io.MAX_JSON_BYTES if is_json else preset_io.MAX_WEIGHTS_BYTES
            path = self.fetch(name, max_bytes, required=name in REQUIRED_PRESET_FILES)
            if path is not None:
                found[name] = path
        parent = os.path.dirname(self.entry)
        os.makedirs(parent, exist_ok=True)
        staging = os.path.join(parent, f".{files.TEMPORARY_MARK}{uuid.uuid4().hex[:16]}")
        os.mkdir(staging)
        try:
            for name, path in found.items():
                shutil.copyfile(path, os.path.join(staging, name))  # a real file, not a link
            try:
                _classifier_class().from_preset(staging)
            except PresetError as e:
                # The staging folder's name means nothing to the user; the handle does.
                message = str(e).replace(f"the preset {staging!r}", "the repo")
                message = message.replace(f"The preset {staging!r}", "The repo")
                for old, new in ((staging + os.sep, ""), (repr(staging), "the repo")):
                    message = message.replace(old, new)
                raise self.fail(message) from None
            for name in found:
                with open(os.path.join(staging, name), "rb+") as f:
                    os.fsync(f.fileno())
            files.publish_directory(staging, self.entry, overwrite=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _publish_timm(self, config):
        spec = timm_spec(config, self.ref)
        weights_path = None
        for name in TIMM_WEIGHTS_FILES:
            weights_path = self.fetch(name, spec.max_weights_bytes, required=False)
            if weights_path is not None:
                break
        if weights_path is None:
            raise self.fail(
                f"the timm repo has neither {' nor '.join(TIMM_WEIGHTS_FILES)}; nothing to load."
            )
        try:
            state_dict = checkpoint.read_state_dict(weights_path)
        except checkpoint.CheckpointError as e:
            raise self.fail(f"{name} is not a readable checkpoint: {e}") from None
        classifier = _timm_classifier(spec, self.fail)
        try:
            convert.assign_state_dict(classifier, state_dict)
        except convert.ConversionError as e:
            raise self.fail(f"{name} does not fit timm's {spec.architecture}: {e}") from None
        preset_io.save_to_preset(classifier, self.entry, metadata={"source": {
            "hub": self.ref.text.split("@")[0],
            "revision": self.revision_label(),
            "file": name,
            "format": "timm",
            "architecture": spec.architecture,
        }})

    def revision_label(self):
        raise NotImplementedError


def _classifier_class():
    # The task class registers itself with Keras when keras_coat is imported; asking the
    # registry keeps this module below the models in the import graph (as preset_io does).
    return keras.saving.get_registered_object(preset_io.CLASSIFIER_NAME)


def _repo_kind(config):
    """"preset", "timm", or a phrase naming what else the repo's config.json describes."""
    registered = config.get("registered_name")
    if registered == preset_io.BACKBONE_NAME:
        return "preset"
    if isinstance(config.get("architecture"), str) and isinstance(
        config.get("pretrained_cfg"), dict
    ):
        return "timm"
    if isinstance(registered, str):
        return f"its config.json describes the Keras class {registered!r}"
    architectures = config.get("architectures") or config.get("model_type")
    if architectures:
        return f"its config.json describes the transformers model {architectures!r}"
    return (
        "its config.json is neither a keras-coat preset's (registered_name "
        f"{preset_io.BACKBONE_NAME!r}) nor a timm model's (architecture and pretrained_cfg)"
    )


# ------------------------------------------------------------------------------- timm repos


@dataclasses.dataclass(frozen=True)
class _TimmSpec:
    architecture: str  # timm's model name, e.g. "coat_lite_medium_384"
    variant: str  # keras-coat's, e.g. "coat_lite_medium"
    num_classes: int | None
    pooling: str
    preprocessing: ImagePreprocessing
    class_names: list | None

    @property
    def max_weights_bytes(self):
        # The built-in downloads' rule (four float32 copies of the parameters and 64 MiB), with
        # the head counted for this repo's classes.
        extra_classes = max(0, (self.num_classes or 0) - 1000)
        return PRESETS[self.architecture].max_download_bytes + 16 * (_MAX_FEATURES + 1) * (
            extra_classes
        )


def timm_spec(config, where):
    """What a timm repo's config.json (`config`, parsed) says about the model, checked.

    Raises a PresetError naming `where` (the handle) and the problem for anything keras-coat
    cannot build as timm would: another architecture, a changed one (`model_args`), another
    input, an unknown preprocessing, class names that do not fit.
    """

    def fail(problem):
        return PresetError(f"{where}: {problem}")

    if not isinstance(config.get("architecture"), str) or not isinstance(
        config.get("pretrained_cfg"), dict
    ):
        raise fail("config.json is not a timm model's (architecture and pretrained_cfg).")
    architecture = config["architecture"].split(".")[0]  # "coat_lite_small.in1k" -> the model
    if architecture not in PRESETS:
        raise fail(
            f"not a CoaT repo: it holds the timm architecture {config['architecture']!r}; "
            f"keras-coat reads {', '.join(PRESETS)}."
        )
    cfg = config["pretrained_cfg"]
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise fail(f"model_args in config.json must be an object; found {model_args!r}.")
    unknown = sorted(set(model_args) - _TIMM_MODEL_ARGS)
    if unknown:
        raise fail(
            f"config.json's model_args {unknown} change timm's {architecture} in a way "
            "keras-coat does not build; only the published architecture is read."
        )
    num_classes = config.get("num_classes", cfg.get("num_classes", 1000))
    for part, values in (("pretrained_cfg", cfg), ("model_args", model_args)):
        if values.get("num_classes", num_classes) != num_classes:
            raise fail(
                f"config.json gives num_classes {num_classes!r} but its {part} "
                f"{values['num_classes']!r}."
            )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not (
        0 <= num_classes <= MAX_CLASSES
    ):
        raise fail(f"num_classes must be an integer in [0, {MAX_CLASSES}]; found {num_classes!r}.")
    pooling = config.get("global_pool", model_args.get("global_pool", "token"))
    if pooling not in ("token", "avg") or model_args.get("global_pool", pooling) != pooling:
        raise fail(f"global_pool must be 'token' or 'avg' (timm's CoaT); found {pooling!r}.")
    if model_args.get("in_chans", 3) != 3:
        raise fail(f"keras-coat reads RGB models; model_args has in_chans={model_args['in_chans']}.")
    preprocessing = _timm_preprocessing(cfg, fail)
    img_size = model_args.get("img_size")
    if img_size is not None:
        img_size = tuple(img_size) if isinstance(img_size, list) else (img_size, img_size)
        if img_size != preprocessing.image_size:
            raise fail(
                f"model_args.img_size {img_size} differs from pretrained_cfg's input_size "
                f"{preprocessing.image_size}."
            )
    return _TimmSpec(
        architecture=architecture,
        variant=PRESETS[architecture].variant,
        num_classes=num_classes or None,  # timm's 0 classes: the pooled features
        pooling=pooling,
        preprocessing=preprocessing,
        class_names=_timm_class_names(config, num_classes, fail),
    )


def _timm_preprocessing(cfg, fail):
    """timm's pretrained_cfg (input_size, crop_pct, crop_mode, interpolation, mean, std) as an
    `ImagePreprocessing`."""
    input_size = cfg.get("input_size", [3, 224, 224])
    if not isinstance(input_size, list) or len(input_size) != 3 or input_size[0] != 3:
        raise fail(f"pretrained_cfg.input_size must be [3, height, width]; found {input_size!r}.")
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in _TIMM_INTERPOLATIONS:
        raise fail(
            f"pretrained_cfg.interpolation {interpolation!r} is not one keras-coat's evaluation "
            f"transform offers ({', '.join(_TIMM_INTERPOLATIONS)})."
        )
    try:
        return ImagePreprocessing(
            image_size=tuple(input_size[1:]),
            crop_pct=cfg.get("crop_pct", 0.875),
            crop_mode=cfg.get("crop_mode", "center"),  # timm's 384 checkpoint squashes
            interpolation=interpolation,
            mean=cfg.get("mean", (0.485, 0.456, 0.406)),
            std=cfg.get("std", (0.229, 0.224, 0.225)),
        )
    except ValueError as e:
        raise fail(f"pretrained_cfg does not describe a usable preprocessing: {e}") from None


def _timm_class_names(config, num_classes, fail):
    """The repo's `label_names` (a list, or timm's {index: name}), ImageNet's 1000 names when
    it has none or names ImageNet's WordNet ids, or None."""
    from keras_coat.imagenet import class_names, class_wnids

    names = config.get("label_names")
    if not num_classes:
        return None
    if isinstance(names, dict):  # {"0": name, ...}: JSON keys are strings
        try:
            names = [names[str(i)] for i in range(num_classes)]
        except KeyError:
            raise fail(f"label_names does not name every one of the {num_classes} classes.") \
                from None
    if names is None:
        return class_names() if num_classes == 1000 else None
    if not isinstance(names, list) or len(names) != num_classes or not all(
        isinstance(n, str) for n in names
    ):
        raise fail(f"label_names must be {num_classes} strings (one per class).")
    return class_names() if names == class_wnids() else names


def _timm_classifier(spec, fail):
    cls = _classifier_class()
    try:
        backbone = cls.backbone_cls.from_variant(
            spec.variant, image_shape=(*spec.preprocessing.image_size, 3)
        )
        return cls(
            backbone,
            num_classes=spec.num_classes,
            pooling=spec.pooling,
            preprocessing=spec.preprocessing,
            class_names=spec.class_names,
            name=spec.architecture,
        )
    except ValueError as e:
        raise fail(f"keras-coat cannot build timm's {spec.architecture} as configured: {e}") \
            from None


# ----------------------------------------------------------------------------- Hugging Face


class _Oversized(Exception):
    """Raised from the progress callback once a download passes its size limit."""


def _huggingface_hub(what):
    try:
        import huggingface_hub
        import huggingface_hub.errors
        import huggingface_hub.utils
    except ImportError:
        raise ImportError(
            f"{what} needs the huggingface_hub package: pip install 'keras-coat[hub]'."
        ) from None
    return huggingface_hub


def _size_guard(hub, max_bytes):
    """A huggingface_hub progress bar class that stops a download past `max_bytes` (the hub's
    metadata is checked first; this catches a server that sends more than it declared)."""

    class SizeGuard(hub.utils.tqdm):
        def update(self, n=1):
            self.received = getattr(self, "received", 0) + (n or 0)
            if self.received > max_bytes:
                raise _Oversized(self.received)
            return super().update(n)

    return SizeGuard


def _network_errors(hub):
    """The exception classes of a failed HTTP exchange (the HTTP library huggingface_hub uses)."""
    errors = (OSError, hub.errors.HfHubHTTPError)
    http = getattr(hub.utils, "httpx", None)
    return errors + ((http.HTTPError,) if http is not None else ())


class _HuggingFaceRepo(_Repo):
    def __init__(self, ref):
        super().__init__(ref)
        self.hub = _huggingface_hub(f"Loading {ref}")
        try:
            self.hub.utils.validate_repo_id(ref.repo_id)
        except self.hub.errors.HFValidationError as e:
            raise self.fail(f"not a valid repo id: {e}") from None
        self.commit = None
        self.sizes = None  # {file name: size} from the hub; None when offline

    def revision_label(self):
        return self.commit

    def preset_directory(self):
        revision = self.ref.revision
        if revision and _COMMIT.fullmatch(revision):
            # A pinned commit already converted needs no network at all.
            entry = _cache_entry("hf", self.ref.repo_id, revision)
            if _is_published(entry):
                return entry
        self._resolve()
        if self.sizes is not None and self.ref.revision != self.commit:
            self._record_branch()
        self.entry = _cache_entry("hf", self.ref.repo_id, self.commit)
        if not _is_published(self.entry):
            self.publish()
        return self.entry

    def _record_branch(self):
        """Fetches config.json through the branch (or tag) itself, so that huggingface_hub's
        cache records which commit it names now (what offline mode resolves it to), and checks
        that this is still the commit the repo info named."""
        path = self.fetch(preset_io.CONFIG_FILE, preset_io.MAX_JSON_BYTES,
                          revision=self.ref.revision or "main")
        if os.path.basename(os.path.dirname(path)) != self.commit:  # .../snapshots/<commit>/
            raise self.fail(
                f"the revision moved from commit {self.commit[:12]} while it was read; retry."
            )

    def _resolve(self):
        """Sets the commit the revision names and the sizes of the repo's files."""
        hub, errors = self.hub, self.hub.errors
        revision = self.ref.revision
        try:
            info = hub.HfApi(library_name="keras-coat").model_info(
                self.ref.repo_id, revision=revision, files_metadata=True
            )
        except errors.GatedRepoError:
            raise self.fail(
                "the repo is gated: accept its terms on the hub, and log in (HF_TOKEN or "
                "`hf auth login`)."
            ) from None
        except errors.RepositoryNotFoundError:
            raise self.fail(
                f"no such repo on {hub.constants.ENDPOINT} (or it is private: log in with "
                "HF_TOKEN or `hf auth login`)."
            ) from None
        except errors.RevisionNotFoundError:
            raise self.fail(f"the repo has no revision {revision!r} (branch, tag or commit).") \
                from None
        except _network_errors(hub) as e:
            # Offline (HF_HUB_OFFLINE) or unreachable: what huggingface_hub's cache holds.
            self.commit = self._cached_commit()
            if self.commit is None:
                raise self.fail(
                    f"cannot reach {hub.constants.ENDPOINT} ({_describe(e)}), and "
                    "huggingface_hub's cache holds no copy of this revision."
                ) from None
            return
        if not isinstance(info.sha, str) or not _COMMIT.fullmatch(info.sha):
            raise self.fail(f"the hub named no valid commit for the revision ({info.sha!r}).")
        self.commit = info.sha
        self.sizes = {}
        for sibling in info.siblings or ():
            size = sibling.size if sibling.size is not None else getattr(sibling.lfs, "size", None)
            self.sizes[sibling.rfilename] = size

    def _cached_commit(self):
        revision = self.ref.revision or "main"
        if _COMMIT.fullmatch(revision):
            return revision
        path = self.hub.try_to_load_from_cache(
            self.ref.repo_id, preset_io.CONFIG_FILE, revision=revision
        )
        commit = os.path.basename(os.path.dirname(path)) if isinstance(path, str) else ""
        return commit if _COMMIT.fullmatch(commit) else None  # .../snapshots/<commit>/

    def fetch(self, name, max_bytes, required=True, revision=None):
        hub, errors = self.hub, self.hub.errors
        declared = None
        if self.sizes is not None:
            if name not in self.sizes:
                if not required:
                    return None
                raise self.fail(
                    f"the repo has no {name} at commit {self.commit[:12]} (its files: "
                    f"{', '.join(sorted(self.sizes)[:20]) or 'none'})."
                )
            declared = self.sizes[name]
            if declared is not None and declared > max_bytes:
                raise self.fail(
                    f"{name} has {declared} bytes, more than the {max_bytes} allowed; refused "
                    "before downloading."
                )
        try:
            path = hub.hf_hub_download(
                self.ref.repo_id, name, revision=revision or self.commit,
                library_name="keras-coat", tqdm_class=_size_guard(hub, max_bytes),
            )
        except _Oversized as e:
            raise self.fail(
                f"the server sent more than the {max_bytes} bytes allowed for {name} ({e} so "
                "far); download stopped."
            ) from None
        except errors.EntryNotFoundError:
            if self.sizes is not None:
                raise self.fail(f"the repo has no {name} at commit {self.commit[:12]}.") \
                    from None
            if not required:  # offline, and not in huggingface_hub's cache
                return None
            raise self.fail(
                f"{name} is not in huggingface_hub's cache, and the hub cannot be reached."
            ) from None
        except _network_errors(hub) as e:
            raise self.fail(f"downloading {name} failed: {_describe(e)}") from None
        size = os.path.getsize(path)
        if size > max_bytes or (declared is not None and size != declared):
            raise self.fail(
                f"{name} in huggingface_hub's cache ({path}) has {size} bytes; the hub "
                f"declared {declared}, at most {max_bytes} are allowed. Delete it from that "
                "cache (`hf cache delete`) and retry."
            )
        return path


def _describe(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------------- Kaggle


def _kagglehub(what):
    try:
        import kagglehub
    except ImportError:
        raise ImportError(f"{what} needs the kagglehub package: pip install kagglehub.") \
            from None
    return kagglehub


class _KaggleRepo(_Repo):
    """A keras-coat preset on Kaggle Models (kagglehub keeps real files in its own cache)."""

    def __init__(self, ref):
        super().__init__(ref)
        self.kagglehub = _kagglehub(f"Loading {ref}")
        self.version = ref.revision

    def revision_label(self):
        return self.version

    def preset_directory(self):
        if self.version:
            self.entry = _cache_entry("kaggle", self.ref.repo_id, self.version)
            if _is_published(self.entry):
                return self.entry
        config = self.fetch(preset_io.CONFIG_FILE, preset_io.MAX_JSON_BYTES)
        # kagglehub's cache path ends in .../<variation>/<version>/config.json.
        version = os.path.basename(os.path.dirname(config))
        if not _KAGGLE_VERSION.fullmatch(version):
            raise self.fail(f"kagglehub returned {config!r}, which names no model version.")
        self.version = version
        self.entry = _cache_entry("kaggle", self.ref.repo_id, version)
        if not _is_published(self.entry):
            self.publish()
        return self.entry

    def fetch(self, name, max_bytes, required=True):
        handle = self.ref.repo_id + (f"/{self.version}" if self.version else "")
        try:
            path = self.kagglehub.model_download(handle, path=name)
        except Exception as e:  # kagglehub's HTTP errors have no common base but Exception
            if not required and "404" in str(e):
                return None
            raise self.fail(f"downloading {name} failed: {_describe(e)}") from None
        size = os.path.getsize(path)
        if size > max_bytes:
            raise self.fail(f"{name} has {size} bytes, more than the {max_bytes} allowed.")
        return path


# -------------------------------------------------------------------------------- uploading


def upload_preset(handle, directory):
    """Publishes the preset `directory` to a model hub, with a model card.

    Args:
        handle: ``hf://owner/repo`` (``hf://repo``: your own namespace; the repo is created if
            needed) or ``kaggle://owner/model/framework/variation``.
        directory: a preset directory (`save_to_preset`'s), read strictly first: a preset that
            would not load is not uploaded.

    The preset's files are uploaded, and a README.md model card (variant, parameters, classes,
    preprocessing, the metrics metadata.json records, how to load it) unless the repo holds a
    card its owner wrote; preset files the repo holds from an earlier upload but `directory`
    lacks are deleted in the same commit, so the repo is exactly this preset.

    Returns:
        The handle of what was uploaded: ``hf://owner/repo@<commit>`` on Hugging Face (a
        reference that always loads this upload), `handle` on Kaggle.
    """
    ref = parse_handle(handle, for_upload=True)
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise PresetError(f"The preset directory {directory!r} does not exist.")
    model = _classifier_class().from_preset(directory)
    present, metadata, root = [], {}, os.path.realpath(directory)
    for name in preset_io.PRESET_FILES:  # the files the reader read, and metadata.json
        path = os.path.join(directory, name)
        if not os.path.lexists(path):
            continue
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root or not os.path.isfile(real):
            raise PresetError(f"{name} in the preset {directory!r} is not a regular file in it.")
        present.append(name)
        if name == preset_io.METADATA_FILE:
            where = f"{name} in the preset {directory!r}"
            if os.path.getsize(real) > preset_io.MAX_JSON_BYTES:
                raise PresetError(f"{where} has more than {preset_io.MAX_JSON_BYTES} bytes.")
            metadata = preset_io.read_json_file(real, where)
    if ref.scheme == KAGGLE_SCHEME:
        return _upload_kaggle(ref, directory, present, model, metadata)
    return _upload_hf(ref, directory, present, model, metadata)


def _upload_hf(ref, directory, present, model, metadata):
    hub = _huggingface_hub(f"Uploading to {ref}")
    api = hub.HfApi(library_name="keras-coat")
    try:
        repo_id = api.create_repo(ref.repo_id, exist_ok=True).repo_id
        remote = set(api.list_repo_files(repo_id))
        operations = [
            hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(directory, name))
            for name in present
        ]
        operations += [
            hub.CommitOperationDelete(path_in_repo=name)
            for name in sorted(set(preset_io.PRESET_FILES) & remote - set(present))
        ]
        if "README.md" not in remote or _is_our_card(hub, repo_id):
            card = model_card(model, metadata, f"{HF_SCHEME}{repo_id}")
            operations.append(hub.CommitOperationAdd(
                path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")
            ))
        info = api.create_commit(
            repo_id, operations, commit_message=f"Upload keras-coat preset ({_variant(model)})"
        )
    except hub.errors.HFValidationError as e:
        raise PresetError(f"{ref}: not a valid repo id: {e}") from None
    except hub.errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise PresetError(
                f"{ref}: the hub refused the upload (HTTP {status}): log in with a token that "
                "may write to this repo (HF_TOKEN or `hf auth login`)."
            ) from None
        raise PresetError(f"{ref}: the upload failed: {_describe(e)}") from None
    except _network_errors(hub) as e:
        raise PresetError(f"{ref}: the upload failed: {_describe(e)}") from None
    return f"{HF_SCHEME}{repo_id}@{info.oid}"


def _is_our_card(hub, repo_id):
    try:
        path = hub.hf_hub_download(
            repo_id, "README.md", library_name="keras-coat",
            tqdm_class=_size_guard(hub, MAX_CARD_BYTES),
        )
    except _Oversized:
        return False  # larger than any card keras-coat writes
    with open(path, encoding="utf-8", errors="replace") as f:
        return CARD_MARKER in f.read(MAX_CARD_BYTES)


def _upload_kaggle(ref, directory, present, model, metadata):
    kagglehub = _kagglehub(f"Uploading to {ref}")
    with tempfile.TemporaryDirectory(prefix="keras-coat-upload-") as staging:
        for name in present:
            shutil.copyfile(os.path.join(directory, name), os.path.join(staging, name))
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(model, metadata, str(ref)))
        try:
            kagglehub.model_upload(ref.repo_id, staging,
                                   version_notes=f"keras-coat preset ({_variant(model)})")
        except Exception as e:  # kagglehub's errors have no common base but Exception
            raise PresetError(f"{ref}: the upload failed: {_describe(e)}") from None
    return ref.text


def _variant(model):
    backbone = model.backbone
    return presets.variant_of(backbone.get_config()) or (
        f"custom CoaT (embed_dims {list(backbone.embed_dims)}, serial_depths "
        f"{list(backbone.serial_depths)}, parallel_depth {backbone.parallel_depth})"
    )


def model_card(model, metadata, handle):
    """The README.md model card of a preset: `model` (its classifier, as loaded) and its
    metadata.json (`metadata`), published as `handle`."""
    preprocessing = model.preprocessing
    height, width = preprocessing.image_size
    if model.num_classes is None:
        classes = "none: a headless model (pooled features)"
    else:
        names = model.class_names or []
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        classes = f"{model.num_classes}" + (f": {shown}" if names else "")
    resize = round(min(height, width) / preprocessing.crop_pct)
    rows = [
        ("variant", _variant(model)),
        ("parameters", f"{model.count_params():,}"),
        ("input", f"{height}x{width} RGB, values in [0, 255]"),
        ("classes", classes),
        ("preprocessing", f"{preprocessing.interpolation} resize of the shorter side to about "
                          f"{resize}, centre crop {height}x{width} (crop_pct "
                          f"{preprocessing.crop_pct:g}), mean {list(preprocessing.mean)}, std "
                          f"{list(preprocessing.std)} (inside the model)"),
    ]
    rows += [(f"metric: {name}", value) for name, value in _metrics(metadata)]
    rows.append(("written by", f"keras-coat {metadata.get('keras_coat_version') or '?'}, Keras "
                               f"{metadata.get('keras_version') or '?'}"))
    source = metadata.get("source")
    if isinstance(source, dict) and source.get("hub"):
        rows.append(("converted from", f"{source['hub']} ({source.get('file', '')})"))
    table = "\n".join(f"| {key} | {_cell(value)} |" for key, value in rows)
    tags = "\n".join(f"  - {t}" for t in ("keras", "keras-coat", "coat", "image-classification"))
    return f"""---
library_name: keras-coat
pipeline_tag: image-classification
tags:
{tags}
---
{CARD_MARKER}

# {handle.split("://", 1)[1]}

A [CoaT](https://arxiv.org/abs/2104.06399) image model (Co-scale conv-attentional image
Transformer) as a [keras-coat](https://pypi.org/project/keras-coat/) preset: KerasHub's preset
layout, loads on TensorFlow, JAX and PyTorch.

| | |
|---|---|
{table}

## Use

```python
import keras_coat

model = keras_coat.CoaTImageClassifier.from_preset("{handle}")
image = keras_coat.imagenet.load_image(
    "photo.jpg", ({height}, {width}), crop_pct={preprocessing.crop_pct:g}
)
probabilities = model.predict(image[None])
```

From the command line: `python -m keras_coat predict photo.jpg --model {handle}`.
"""


def _metrics(metadata):
    """(name, value) rows of metadata.json's ``metrics``: numbers, one level of nesting (e.g.
    ``{"imagenet-val": {"top1": 81.9}}`` gives ``imagenet-val top1``)."""
    metrics = metadata.get("metrics")
    if not isinstance(metrics, dict):
        return []
    rows = []
    for name, value in metrics.items():
        if isinstance(value, dict):
            rows += [(f"{name} {k}", v) for k, v in value.items() if _is_number(v)]
        elif _is_number(value) or isinstance(value, str):
            rows.append((name, value))
    return rows[:50]


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value):
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")[:500]
