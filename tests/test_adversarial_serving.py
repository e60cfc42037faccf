"""Hostile requests to an exported SavedModel (keras_coat.export), as TF Serving would run them.

A tiny model is exported once; a fresh TensorFlow-only process loads it, limits its own address
space (RLIMIT_AS) to what it uses plus a margin far below what the image bombs below would need
without the header checks and the bounded resize, then sends every request and reports what
came back.
"""

import io
import json
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_coat
from keras_coat.export import serving
from keras_coat.export import export_saved_model
from tests.conftest import ADDRESS_SPACE_LIMIT, subprocess_env

pytestmark = pytest.mark.adversarial

SIZE = 32
# Address space the client may add after its warm-up requests. Without the fixes, a 1 x 16000
# PNG alone makes the 32-pixel model's eval transform allocate 36 x 576000 x 3 float32 (249 MB).
MARGIN_MB = 160

CLIENT = r'''
import json, resource, sys
import numpy as np
import tensorflow as tf

job = json.load(open(sys.argv[1]))
loaded = tf.saved_model.load(job["dir"])
default, from_bytes = loaded.signatures["serving_default"], loaded.signatures["serving_bytes"]
good_pixels = np.load(job["good_pixels"])
good_bytes = [open(p, "rb").read() for p in job["good_bytes"]]

def run(fn, **inputs):
    try:
        out = fn(**inputs)
        return {"shape": list(out["probabilities"].shape),
                "finite": bool(np.isfinite(out["probabilities"].numpy()).all())}
    except tf.errors.OpError as e:
        lines = [l for l in e.message.splitlines() if "assertion failed" in l]
        return {"error": type(e).__name__, "message": lines[0] if lines else e.message[-300:]}

before = run(default, images=tf.constant(good_pixels))
run(from_bytes, image_bytes=tf.constant(good_bytes))
limit_address_space(job["margin_mb"])  # tests/conftest.py's ADDRESS_SPACE_LIMIT, run first
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = {"pixels": {}, "bytes": {}}
for name, path in job["pixels"].items():
    report["pixels"][name] = run(default, images=tf.constant(np.load(path)))
for name, path in job["bytes"].items():
    report["bytes"][name] = run(from_bytes, image_bytes=tf.constant([open(path, "rb").read()]))
report["after"] = run(default, images=tf.constant(good_pixels))
report["after_bytes"] = run(from_bytes, image_bytes=tf.constant(good_bytes))
report["before"] = before
report["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
report["keras_coat_imported"] = any(m.startswith("keras_coat") for m in sys.modules)
json.dump(report, open(sys.argv[2], "w"))
'''


def _png(width, height, idat=None):
    """A PNG whose IHDR declares ``width x height``; `idat` replaces the real pixel data."""

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    if idat is None:
        rows = b"".join(b"\0" + bytes([(7 * y + x) % 256 for x in range(3 * width)])
                        for y in range(height))
        idat = zlib.compress(rows, 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encode(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _jpeg_declaring(height, width):
    """A real small JPEG whose frame header (SOF0) is patched to declare ``height x width``."""
    data = bytearray(_encode(np.full((16, 16, 3), 90, np.uint8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _bmp_declaring(height, width):
    """A BMP header declaring ``height x width`` 24-bit pixels, followed by 64 bytes of data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + bytes(64)


REQUESTS_PIXELS = {
    # name: (array, expected error message fragment)
    "smaller_images": (np.zeros((4, 16, 16, 3), np.float32), "received shape] [4 16 16 3]"),
    "larger_images": (np.zeros((1, 64, 64, 3), np.float32), "received shape] [1 64 64 3]"),
    "one_channel": (np.zeros((2, SIZE, SIZE, 1), np.float32), "RGB pixels"),
    "four_channels": (np.zeros((2, SIZE, SIZE, 4), np.float32), "RGB pixels"),
    "no_batch_axis": (np.zeros((SIZE, SIZE, 3), np.float32), f"received shape] [{SIZE} {SIZE} 3]"),
    "nan_pixel": (np.pad(np.full((1, 1, 1, 3), np.nan, np.float32),
                         ((0, 0), (0, SIZE - 1), (0, SIZE - 1), (0, 0))), "NaN or infinite"),
    "inf_pixels": (np.full((1, SIZE, SIZE, 3), np.inf, np.float32), "NaN or infinite"),
    "normalized_input": (np.full((2, SIZE, SIZE, 3), -1.5, np.float32), "in [0, 255]"),
    "above_255": (np.full((1, SIZE, SIZE, 3), 256.0, np.float32), "in [0, 255]"),
}

LIMITS = "outside the limits"
FORMAT = "only JPEG, PNG or BMP images are read"
REQUESTS_BYTES = {
    # name: (encoded bytes, expected error fragment, or None for a served image)
    "png_1x16000": (_png(16000, 1), None),
    "png_16000x1": (_png(1, 16000), None),
    "png_declares_20000x20000": (_png(20000, 20000, idat=zlib.compress(b"\0" * 4096)), LIMITS),
    "png_declares_1x20000": (_png(20000, 1, idat=b"x"), LIMITS),
    "png_declares_0x0": (_png(0, 0, idat=b"x"), LIMITS),
    "png_declares_2**31": (_png(2**31 - 1, 2**31 - 1, idat=b"x"), LIMITS),
    "jpeg_declares_60000x60000": (_jpeg_declaring(60000, 60000), LIMITS),
    "jpeg_declares_9000x9000": (_jpeg_declaring(9000, 9000), LIMITS),
    "bmp_declares_100000x100000": (_bmp_declaring(100000, 100000), LIMITS),
    "bmp_declares_negative_height": (_bmp_declaring(-(2**31), 10), LIMITS),
    "gif": (None, FORMAT),  # filled in below (needs PIL)
    "webp": (None, FORMAT),
    "junk": (b"definitely not an image", FORMAT),
    "empty": (b"", "empty"),
    "png_signature_only": (b"\x89PNG\r\n\x1a\n", LIMITS),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    model = keras_coat.CoaT(
        embed_dims=(16, 16, 16, 16),
        serial_depths=(1, 1, 1, 1),
        mlp_ratios=(2, 2, 2, 2),
        parallel_depth=0,
        input_shape=(SIZE, SIZE, 3),
        classes=10,
    )
    start = time.perf_counter()
    directory = export_saved_model(
        model, root / "model", class_names=[str(i) for i in range(10)], verify=False
    )
    exported = time.perf_counter()
    rng = np.random.default_rng(0)
    job = {"dir": directory, "margin_mb": MARGIN_MB, "pixels": {}, "bytes": {}}
    np.save(root / "good.npy", rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32))
    job["good_pixels"] = str(root / "good.npy")
    job["good_bytes"] = []
    for fmt in ("PNG", "JPEG", "BMP"):
        path = root / f"good.{fmt.lower()}"
        path.write_bytes(_encode(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), fmt))
        job["good_bytes"].append(str(path))
    for name, (array, _) in REQUESTS_PIXELS.items():
        np.save(root / f"{name}.npy", array)
        job["pixels"][name] = str(root / f"{name}.npy")
    small = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for name, (data, _) in REQUESTS_BYTES.items():
        if data is None:
            data = _encode(small, name.upper())
        (root / f"{name}.bin").write_bytes(data)
        job["bytes"][name] = str(root / f"{name}.bin")
    (root / "job.json").write_text(json.dumps(job))
    (root / "client.py").write_text(ADDRESS_SPACE_LIMIT + CLIENT)
    env = subprocess_env(PYTHONPATH=None, KERAS_BACKEND=None)  # TensorFlow alone
    result = subprocess.run(
        [sys.executable, str(root / "client.py"), str(root / "job.json"), str(root / "out.json")],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    print(f"export {exported - start:.1f} s, client {time.perf_counter() - exported:.1f} s")
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((root / "out.json").read_text())
    assert not report["keras_coat_imported"]
    assert report["before"] == {"shape": [2, 10], "finite": True}
    return report


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REQUESTS_PIXELS))
def test_bad_pixel_batches_are_invalid_argument(served, name):
    outcome = served["pixels"][name]
    assert outcome.get("error") == "InvalidArgumentError", outcome
    assert REQUESTS_PIXELS[name][1] in outcome["message"], outcome


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REQUESTS_BYTES))
def test_hostile_encoded_images_are_refused_or_served_in_bounded_memory(served, name):
    outcome = served["bytes"][name]
    expected = REQUESTS_BYTES[name][1]
    if expected is None:
        assert outcome == {"shape": [1, 10], "finite": True}
    else:
        assert outcome.get("error") == "InvalidArgumentError", outcome
        assert expected in outcome["message"], outcome


@pytest.mark.slow
def test_server_survives_and_memory_stays_bounded(served):
    assert served["after"] == {"shape": [2, 10], "finite": True}
    assert served["after_bytes"] == {"shape": [3, 10], "finite": True}
    # Far below the 249 MB one 1 x 16000 PNG costs with a full resize.
    print(f"peak memory growth over all hostile requests: {served['rss_growth_mb']:.1f} MB")
    assert served["rss_growth_mb"] < 100, served["rss_growth_mb"]


def test_crop_only_resize_gives_the_full_resizes_pixels():
    """The bounded resize (only the crop window) gives the pixels of Pillow's full resize, then
    the crop, for an extreme aspect ratio in both directions."""
    from PIL import Image

    from keras_coat import imagenet

    rng = np.random.default_rng(3)
    for shape in ((37, 300, 3), (300, 37, 3)):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        data = _encode(pixels, "PNG")
        for height, width in ((32, 32), (32, 64)):
            window = serving.eval_resize_and_crop(tf.constant(data), height, width, 0.875)
            new_h, new_w, top, left = (
                int(v) for v in imagenet.eval_geometry(*shape[:2], (height, width), 0.875)
            )
            full = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.BICUBIC))
            np.testing.assert_array_equal(
                window.numpy(), full[top : top + height, left : left + width]
            )

