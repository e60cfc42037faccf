"""keras_coat.datasets, the one reader of image data sets (training, evaluation, the export's
calibration): the layouts it reads, and the attacker's inputs it refuses: files that are no
images, declare gigapixels, are truncated, are links to what is no regular file, are too large;
a fuzz of encoded bytes. Reading writes nothing."""

import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_coat import datasets, tf_images
from training import data as training_data
from training import recipes


def _png(path, rows=12, cols=10, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((rows, cols, 3), value, np.uint8)).save(path)
    return path


def _png_declaring(width, height):
    """A PNG whose header declares `width` x `height`, with a few bytes of data."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))  # fmt: skip


def _listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                  for f in fs)  # fmt: skip


def _read(split):
    return [(split.decode(r)["image"].numpy(), int(r["label"])) for r in split.records]


# ------------------------------------------------------------------------------------ layouts


def test_class_folders_at_any_depth_with_a_fixed_held_out_share(tmp_path):
    for i in range(12):
        _png(tmp_path / "cat" / ("deep/er" if i % 3 == 0 else "") / f"{i}.png", value=40)
        _png(tmp_path / "dog" / f"{i}.PNG", value=200)  # endings in any case
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    _png(tmp_path / ".hidden" / "x.png")  # hidden folders and files are skipped
    _png(tmp_path / "dog" / ".x.png")
    _png(tmp_path / "loose.png")  # beside class folders: not a class
    (tmp_path / "empty").mkdir()  # no images: not a class
    before = _listing(tmp_path)
    source = datasets.load_source(f"folder:{tmp_path}")
    assert source.class_names == ["cat", "dog"]
    assert (source.train.num_examples, source.validation.num_examples) == (22, 2)
    examples = _read(source.train) + _read(source.validation)
    assert sorted(label for _, label in examples) == [0] * 12 + [1] * 12
    for image, label in examples:
        assert image.shape == (12, 10, 3) and image.dtype == np.uint8
        assert image.mean() == (40, 200)[label]
    again = datasets.load_source(f"folder:{tmp_path}")
    assert [r["path"] for r in again.validation.records.as_numpy_iterator()] == [
        r["path"] for r in source.validation.records.as_numpy_iterator()
    ]  # a fixed share
    assert _listing(tmp_path) == before  # nothing written


def test_train_and_val_folders_are_the_splits(tmp_path):
    for name in ("a", "b"):
        for i in range(2):
            _png(tmp_path / "train" / name / f"{i}.png")
    _png(tmp_path / "validation" / "b" / "0.png")
    source = datasets.load_source(f"folder:{tmp_path}")
    assert source.class_names == ["a", "b"]
    assert [label for _, label in _read(source.validation)] == [1]  # train's numbering
    _png(tmp_path / "validation" / "c" / "0.png")
    with pytest.raises(ValueError, match=r"validation/ has classes that train/ lacks: \['c'\]"):
        datasets.load_source(f"folder:{tmp_path}")


def test_a_folder_of_images_is_one_unnamed_class_which_a_classifier_refuses(tmp_path):
    for i in range(10):
        _png(tmp_path / f"{i}.bmp")
    source = datasets.load_source(f"folder:{tmp_path}")
    assert source.class_names == [""] and source.train.num_examples == 9
    recipe = recipes.override(recipes.get_recipe("demo"), {"batch_size": 2})
    with pytest.raises(ValueError, match=r"has 1 class\(es\); a classifier needs at least two"):
        training_data.steps_per_epoch(recipe, source)


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("folder:", ValueError, "Unknown data set 'folder:'"),
        ("tfds:", ValueError, "Unknown data set 'tfds:'"),
        ("", ValueError, "Unknown data set ''"),
        ("digits", ValueError, "needs the image size"),
    ],
)
def test_unknown_or_incomplete_sources_are_refused(spec, error, message):
    with pytest.raises(error, match=message):
        datasets.load_source(spec)


def test_empty_missing_and_tiny_folders_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*absent' is not a directory"):
        datasets.load_source(f"folder:{tmp_path / 'absent'}")
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match=r"no images \(.jpg, .jpeg, .png, .bmp\) under"):
        datasets.load_source(f"folder:{tmp_path}")
    _png(tmp_path / "a" / "only.png")
    with pytest.raises(ValueError, match="1 image\\(s\\), too few to hold some out"):
        datasets.load_source(f"folder:{tmp_path}")


def test_digits_are_made_at_the_image_size_asked_for():
    square = datasets.load_source("digits", 16)
    wide = datasets.load_source("digits", (16, 24))
    assert square.validation.num_examples == wide.validation.num_examples == 360
    assert next(iter(wide.validation.records))["image"].shape == (16, 24, 3)


def test_tfds_sources_name_their_held_out_split():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        source = datasets.load_source("tfds:imagenet2012:validation[:50%]", manual_dir="/none")
        assert source.validation.num_examples == 6 and source.num_classes == 1000
        image = source.validation.decode(next(iter(source.validation.records)))["image"]
        assert image.shape[-1] == 3 and image.dtype == tf.uint8
    with pytest.raises(ValueError, match="No TFDS data set 'no_such_data_set'"):
        datasets.load_source("tfds:no_such_data_set")


# ------------------------------------------------------------------------------- the attacker


def test_links_to_what_is_no_regular_file_are_refused_by_name(tmp_path):
    _png(tmp_path / "a" / "ok.png")
    os.mkfifo(tmp_path / "a" / "fifo.png")  # reading it would block for ever
    with pytest.raises(ValueError, match=r"'.*fifo\.png' is not a regular file"):
        datasets.load_source(f"folder:{tmp_path}")
    os.remove(tmp_path / "a" / "fifo.png")
    os.symlink("/dev/zero", tmp_path / "a" / "zero.png")
    with pytest.raises(ValueError, match=r"'.*zero\.png' is not a regular file"):
        datasets.load_source(f"folder:{tmp_path}")
    os.remove(tmp_path / "a" / "zero.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "a" / "dangling.png")
    with pytest.raises(ValueError, match=r"cannot read '.*dangling\.png'"):
        datasets.load_source(f"folder:{tmp_path}")


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    _png(tmp_path / "a" / "ok.png")
    with open(tmp_path / "a" / "huge.png", "wb") as f:  # sparse: no disk used
        f.truncate(datasets.MAX_IMAGE_FILE_BYTES + 1)
    with pytest.raises(ValueError, match=rf"huge\.png' has {datasets.MAX_IMAGE_FILE_BYTES + 1} "
                       "bytes, more than the"):
        datasets.load_source(f"folder:{tmp_path}")


@pytest.mark.parametrize(
    "content, message",
    [
        (_png_declaring(20000, 20000), "declares a size (height, width) outside the limits"),
        (_png_declaring(0, 7), "declares a size (height, width) outside the limits"),
        (b"GIF89a" + bytes(40), "only JPEG, PNG or BMP images are read"),
        (b"not an image at all", "only JPEG, PNG or BMP images are read"),
        (b"", "is empty (0 bytes)"),
    ],
)
def test_a_hostile_image_file_stops_reading_naming_it(tmp_path, content, message):
    for i in range(3):
        _png(tmp_path / "a" / f"{i}.png")
    (tmp_path / "a" / "bad.png").write_bytes(content)
    source = datasets.load_source(f"folder:{tmp_path}")
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        _read(source.train) + _read(source.validation)
    assert message in str(error.value) and "bad.png" in str(error.value)


def test_a_truncated_image_stops_reading(tmp_path):
    good = _png(tmp_path / "a" / "0.png", 40, 40, 7)
    for i in range(1, 3):
        _png(tmp_path / "a" / f"{i}.png")
    (tmp_path / "a" / "0.png").write_bytes(good.read_bytes()[:60])
    source = datasets.load_source(f"folder:{tmp_path}")
    with pytest.raises(tf.errors.InvalidArgumentError):
        _read(source.train) + _read(source.validation)


def test_fuzzed_bytes_decode_to_the_declared_size_or_raise_invalid_argument():
    decode = tf.function(
        lambda data: tf_images.decode_image(data, "fuzzed"),
        input_signature=[tf.TensorSpec([], tf.string)],
    )
    rng = np.random.default_rng(0)
    seeds = [tf.io.encode_png(np.full((5, 7, 3), 9, np.uint8)).numpy(),
             tf.io.encode_jpeg(np.full((6, 4, 3), 9, np.uint8)).numpy(),
             _png_declaring(3, 2)]  # fmt: skip
    outcomes = {"decoded": 0, "refused": 0}
    for trial in range(300):
        data = bytearray(seeds[trial % len(seeds)])
        for _ in range(int(rng.integers(1, 6))):  # flip, cut or append bytes
            kind = rng.integers(3)
            if kind == 0 and data:
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
            elif kind == 1:
                del data[int(rng.integers(len(data) + 1)) :]
            else:
                data += bytes(rng.integers(0, 256, int(rng.integers(1, 9)), np.uint8))
        try:
            image = decode(bytes(data)).numpy()
        except tf.errors.InvalidArgumentError:
            outcomes["refused"] += 1
            continue
        assert image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8
        assert 0 < image.shape[0] * image.shape[1] <= 64_000_000
        outcomes["decoded"] += 1
    assert outcomes["decoded"] and outcomes["refused"], outcomes
