"""The CoaT variants and their published checkpoints: the one place that says what they are.

`VARIANTS` holds the architecture of each published variant (paper, Table 1). Each `Preset` names
its architecture (a key of `VARIANTS`), where the
weights come from and their SHA-256, the evaluation preprocessing, the class names and the
paper's figures. The factories, ``weights="imagenet"``, ``python -m keras_coat predict`` and
``info``, the download size caps and the exports read these entries; nothing restates them.

Pure data: this module imports nothing from the models.
"""

import dataclasses
import math
import numbers

__all__ = [
    "BASE_URL",
    "VARIANTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImagePreprocessing",
    "PRESETS",
    "Preset",
    "PresetError",
    "checkpoint_for",
    "get_preset",
]

BASE_URL = "https://vcl.ucsd.edu/coat/pretrained/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
# timm's evaluation crop modes that keras_coat implements: "center" resizes the shorter side
# (keeping the aspect ratio) and crops the centre; "squash" resizes both sides to size / crop_pct
# (ignoring the aspect ratio), then crops the centre.
CROP_MODES = ("center", "squash")
# The authors' evaluation (their `main.py`, DeiT's): the shorter side resized to
# size * 256 / 224, then a centre crop of `size`, at every input size.
AUTHORS_CROP_PCT = 224 / 256


# The architecture of each published variant (paper, Table 1); all attend with 8 heads and the
# same convolutional relative position encoding windows (window, heads).
VARIANTS = {
    name: dict(embed_dims=dims, serial_depths=depths, mlp_ratios=ratios, parallel_depth=parallel,
               num_heads=8, crpe_windows=((3, 2), (5, 3), (7, 3)))
    for name, dims, depths, ratios, parallel in (
        ("coat_lite_tiny", (64, 128, 256, 320), (2, 2, 2, 2), (8, 8, 4, 4), 0),
        ("coat_lite_mini", (64, 128, 320, 512), (2, 2, 2, 2), (8, 8, 4, 4), 0),
        ("coat_lite_small", (64, 128, 320, 512), (3, 4, 6, 3), (8, 8, 4, 4), 0),
        ("coat_lite_medium", (128, 256, 320, 512), (3, 6, 10, 8), (4, 4, 4, 4), 0),
        ("coat_tiny", (152, 152, 152, 152), (2, 2, 2, 2), (4, 4, 4, 4), 6),
        ("coat_mini", (152, 216, 216, 216), (2, 2, 2, 2), (4, 4, 4, 4), 6),
        ("coat_small", (152, 320, 320, 320), (2, 2, 2, 2), (4, 4, 4, 4), 6),
    )
}


ARCHITECTURE_FIELDS = (
    "embed_dims", "serial_depths", "mlp_ratios", "parallel_depth", "num_heads", "crpe_windows",
)


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def architecture(config):
    """The architecture fields of a backbone config, comparable whatever JSON made of them."""
    return tuple(_freeze(config.get(field)) for field in ARCHITECTURE_FIELDS)


def variant_of(config):
    """The published variant a backbone config is (e.g. ``"coat_lite_tiny"``), or None."""
    return next((name for name, fields in VARIANTS.items()
                 if architecture(fields) == architecture(config)), None)


class PresetError(ValueError):
    """A preset reference is unusable: unknown, unsupported, missing, incomplete, damaged or
    hostile. The message names the reference and the problem."""


def _real_tuple(value, length, what):
    if not isinstance(value, (list, tuple)) or len(value) != length or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        for v in value
    ):
        raise ValueError(f"{what} must be {length} finite numbers; received {value!r}.")
    return tuple(float(v) for v in value)


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """How images are prepared for a model, as timm's `default_cfg` and KerasHub's
    `ImageConverter` say it: resize, centre crop, then normalize.

    The evaluation transform (`keras_coat.imagenet.load_image`): the image is resized with
    `interpolation` so that it just covers ``image_size / crop_pct`` (``crop_mode="center"``,
    the aspect ratio kept) or to exactly ``image_size / crop_pct`` (``"squash"``), then
    centre-cropped to `image_size`; the RGB values in [0, 255] are normalized as
    ``(x / 255 - mean) / std`` (inside the model when it is built with
    ``include_preprocessing=True``).

    Attributes:
        image_size: `(height, width)` of the model input.
        crop_pct: the crop's share of the resized image, in (0, 1].
        crop_mode: "center" or "squash", as timm's `crop_mode`.
        interpolation: "bicubic", "bilinear" or "nearest".
        mean, std: per-channel normalization of RGB values scaled to [0, 1].
    """

    image_size: tuple = (224, 224)
    crop_pct: float = AUTHORS_CROP_PCT
    interpolation: str = "bicubic"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    crop_mode: str = "center"

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, numbers.Integral) and not isinstance(size, bool):
            size = (size, size)
        if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and 0 < s <= 8192
            for s in size
        ):
            raise ValueError(
                f"image_size must be a (height, width) pair of ints in [1, 8192]; received "
                f"{self.image_size!r}."
            )
        crop_pct = self.crop_pct
        if isinstance(crop_pct, bool) or not isinstance(crop_pct, numbers.Real) or not (
            0 < crop_pct <= 1
        ):
            raise ValueError(f"crop_pct must be a number in (0, 1]; received {crop_pct!r}.")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(
                f"crop_mode must be one of {CROP_MODES}; received {self.crop_mode!r}."
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}; received {self.interpolation!r}."
            )
        mean = _real_tuple(self.mean, 3, "mean")
        std = _real_tuple(self.std, 3, "std")
        if not all(s > 0 for s in std):
            raise ValueError(f"std must be positive; received {self.std!r}.")
        object.__setattr__(self, "image_size", tuple(int(s) for s in size))
        object.__setattr__(self, "crop_pct", float(crop_pct))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def get_config(self):
        return {
            "image_size": list(self.image_size),
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_mode": self.crop_mode,
        }

    @classmethod
    def from_config(cls, config):
        """Strict: a dict with exactly the fields of `get_config`; `crop_mode` may be missing
        (configs written before it existed), and then reads as "center"."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if isinstance(config, dict) and "crop_mode" not in config:
            config = {**config, "crop_mode": "center"}
        if not isinstance(config, dict) or set(config) != fields:
            keys = sorted(config) if isinstance(config, dict) else type(config).__name__
            raise ValueError(
                f"An image preprocessing config needs exactly the fields {sorted(fields)}; "
                f"received {keys}."
            )
        return cls(**config)

    def resized(self, image_size):
        """The same transform for another input size (the crop share stays, as the authors')."""
        return dataclasses.replace(self, image_size=image_size)


@dataclasses.dataclass(frozen=True)
class Preset:
    """One published checkpoint."""

    name: str
    variant: str  # a key of VARIANTS
    url: str
    sha256: str  # the first hex digits of the file's SHA-256 (at least 8)
    preprocessing: ImagePreprocessing
    params: int  # timm's count, 1000-class head
    gflops: float  # paper, Table 2 (or the authors' README for 384)
    top1: float  # ImageNet-1k top-1 %, paper
    class_names: str = "imagenet"  # the 1000 classes of keras_coat/data
    description: str = ""

    @property
    def num_classes(self):
        return 1000

    @property
    def max_download_bytes(self):
        """The largest file accepted as this checkpoint (the download size cap).

        A published checkpoint holds one float32 copy of the weights, 4 bytes per parameter;
        a manifest may name a training checkpoint that also holds an EMA copy and AdamW's two
        moments. Four copies and 64 MiB of pickle and archive overhead bound both (e.g. 159 MB
        for coat_lite_tiny, 780 MB for coat_lite_medium).
        """
        return 4 * 4 * self.params + 64 * 2**20


def _authors(name, variant, file_name, params, gflops, top1, size=224, description=""):
    sha256 = file_name.rsplit("_", 1)[1].split(".")[0]
    return Preset(
        name=name,
        variant=variant,
        url=BASE_URL + file_name,
        sha256=sha256,
        preprocessing=ImagePreprocessing(image_size=(size, size)),
        params=params,
        gflops=gflops,
        top1=top1,
        description=description,
    )


# The authors' checkpoints; the first 8 hex digits of each file's SHA-256 are part of its name.
# Parameter counts are timm's (1000-class head); GFLOPs and top-1 from the paper's Table 2.
# Evaluation at 384 follows the authors' rule too (resize to 438, crop 384); timm's
# `coat_lite_medium_384` config squashes the whole image to 384 instead (crop_pct 1.0).
PRESETS = {
    preset.name: preset
    for preset in (
        _authors("coat_lite_tiny", "coat_lite_tiny", "coat_lite_tiny_e88e96b0.pth",
                 5_721_960, 1.6, 77.5),
        _authors("coat_lite_mini", "coat_lite_mini", "coat_lite_mini_6b4a8ae5.pth",
                 11_011_560, 2.0, 79.1),
        _authors("coat_lite_small", "coat_lite_small", "coat_lite_small_8d362f48.pth",
                 19_838_504, 4.0, 81.9),
        _authors("coat_lite_medium", "coat_lite_medium", "coat_lite_medium_a750cd63.pth",
                 44_571_048, 9.8, 83.6),
        _authors("coat_lite_medium_384", "coat_lite_medium",
                 "coat_lite_medium_384x384_f9129688.pth", 44_571_048, 28.7, 84.5, size=384,
                 description="fine-tuned at 384x384"),
        _authors("coat_tiny", "coat_tiny", "coat_tiny_c6efc33c.pth", 5_498_540, 4.4, 78.3),
        _authors("coat_mini", "coat_mini", "coat_mini_40667eec.pth", 10_337_004, 6.8, 81.0),
        _authors("coat_small", "coat_small", "coat_small_7479cf9b.pth", 21_693_908, 12.6, 82.1),
    )
}


def get_preset(name):
    """The `Preset` called `name`, or a PresetError listing the built-in names."""
    if not isinstance(name, str) or name not in PRESETS:
        raise PresetError(
            f"Unknown CoaT preset {name!r}. Built-in presets: {', '.join(PRESETS)}; or pass a "
            "preset directory written by save_to_preset."
        )
    return PRESETS[name]


def checkpoint_for(variant, image_size):
    """The published checkpoint of `variant` meant for `image_size` `(height, width)`: the one
    whose evaluation size it is if there is one (coat_lite_medium at 384), else the 224 one."""
    candidates = [p for p in PRESETS.values() if p.variant == variant]
    if not candidates:
        raise PresetError(f"The CoaT variant {variant!r} has no published checkpoint.")
    for preset in candidates:
        if preset.preprocessing.image_size == tuple(image_size):
            return preset
    return next(p for p in candidates if p.preprocessing.image_size == (224, 224))
