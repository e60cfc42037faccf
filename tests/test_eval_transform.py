"""One evaluation transform: `load_image`, the SavedModel's `serving_bytes` and training's
validation pipeline give the same pixels, with timm's geometry."""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_coat.export import serving
from keras_coat import imagenet
from training import data as data_lib
from training import recipes

SIZE = 32
CROP_PCT = 0.875  # resize to 36, crop 32


def _smooth_image(rng, rows, cols):
    # Smooth content with some sharp noise on top: a resampling difference anywhere would show.
    coarse = rng.integers(0, 256, size=(rows // 5 + 2, cols // 5 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((cols, rows), Image.BILINEAR), np.int16)
    noise = rng.integers(-40, 41, size=smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """20 PNGs of seeded random sizes as the validation split of a folder dataset."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(13)
    sizes = [tuple(int(v) for v in rng.integers(9, 150, size=2)) for _ in range(20)]
    paths = []
    for i, (rows, cols) in enumerate(sizes):
        path = root / "val" / "only" / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_smooth_image(rng, rows, cols)).save(path)
        paths.append(path)
    (root / "train" / "only").mkdir(parents=True)
    Image.fromarray(_smooth_image(rng, 40, 40)).save(root / "train" / "only" / "a.png")
    return root, sizes, paths


def _serving_bytes_pixels(encoded, height, width):
    # As the SavedModel's serving_bytes builds it: a graph in which image sizes are unknown.
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
    def transform(image_bytes):
        return tf.map_fn(
            lambda data: serving.eval_resize_and_crop(data, height, width, CROP_PCT),
            image_bytes,
            fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32),
        )

    return transform(tf.constant(encoded)).numpy()


def test_load_image_serving_bytes_and_validation_agree_pixel_for_pixel(image_folder):
    root, sizes, paths = image_folder
    recipe = dataclasses.replace(
        recipes.get_recipe("demo"), image_size=SIZE, eval_crop_pct=CROP_PCT, batch_size=8
    )
    source = data_lib.load_source(f"folder:{root}", SIZE)
    validation = np.concatenate(
        [images.numpy() for images, _, _ in data_lib.eval_dataset(recipe, source)]
    )[: len(paths)]
    served = _serving_bytes_pixels([p.read_bytes() for p in paths], SIZE, SIZE)
    loaded = np.stack([imagenet.load_image(p, SIZE, CROP_PCT) for p in paths])

    # Downscaled, upscaled, landscape, portrait, odd and even crop margins.
    scale = math.floor(SIZE / CROP_PCT)
    assert {min(s) < scale for s in sizes} == {True, False}
    assert {(max(s) * scale // min(s) - SIZE) % 2 for s in sizes} == {0, 1}
    assert loaded.shape == (len(paths), SIZE, SIZE, 3)
    for i, size in enumerate(sizes):
        np.testing.assert_array_equal(served[i], loaded[i], err_msg=f"serving_bytes, {size}")
        np.testing.assert_array_equal(validation[i], loaded[i], err_msg=f"validation, {size}")


def test_load_image_and_serving_bytes_agree_on_non_square_sizes(image_folder):
    _, sizes, paths = image_folder
    for height, width in [(32, 48), (48, 32)]:
        served = _serving_bytes_pixels([p.read_bytes() for p in paths[:6]], height, width)
        for i, path in enumerate(paths[:6]):
            loaded = imagenet.load_image(path, (height, width), CROP_PCT)
            np.testing.assert_array_equal(served[i], loaded, err_msg=f"{sizes[i]}")


def _timm_geometry(rows, cols, image_size, crop_pct):
    """Resized size and crop offsets of timm's eval transform, read off its own transforms."""
    timm_data = pytest.importorskip("timm.data")
    transform = timm_data.create_transform(
        input_size=(3, *image_size), interpolation="bicubic", crop_pct=crop_pct
    )
    resize, center_crop = transform.transforms[0], transform.transforms[1]
    resized = resize(Image.new("L", (cols, rows)))
    # Pixel values that are their own coordinates show where the crop starts.
    new_cols, new_rows = resized.size
    coordinates = np.arange(new_rows * new_cols, dtype=np.int32).reshape(new_rows, new_cols)
    first = np.asarray(center_crop(Image.fromarray(coordinates, mode="I")))[0, 0]
    return new_rows, new_cols, int(first) // new_cols, int(first) % new_cols


@pytest.mark.parametrize(
    "image_size, crop_pct",
    [((224, 224), 0.875), ((64, 64), 1.0), ((33, 33), 0.9), ((64, 96), 0.9), ((224, 160), 0.95)],
)
def test_eval_geometry_is_timms(image_size, crop_pct):
    rng = np.random.default_rng(sum(image_size))
    # Exact .5 ties of the non-square rule (width = 248.5 and 816.5 for 64x96 at 0.9).
    cases = np.concatenate([rng.integers(1, 500, size=(100, 2)), [[14, 49], [22, 253]]])
    # One call over all cases: the geometry works elementwise on arrays.
    geometry = np.stack(
        [np.asarray(v) for v in imagenet.eval_geometry(*cases.T, image_size, crop_pct)], axis=1
    )
    for (rows, cols), ours in zip(cases.tolist(), geometry.tolist()):
        ours = tuple(ours)
        timm = _timm_geometry(rows, cols, image_size, crop_pct)
        if ours == timm:
            continue
        # timm rounds `side / ratio` in float64; on exact ties that goes either way, and we
        # round half to even. Nothing else may differ.
        height, width = image_size
        scale_h, scale_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
        if rows * scale_w <= cols * scale_h:
            numerator, denominator, index = 2 * cols * scale_h, rows, 1
        else:
            numerator, denominator, index = 2 * rows * scale_w, cols, 0
        tie = numerator % denominator == 0 and (numerator // denominator) % 2 == 1
        assert tie and abs(ours[index] - timm[index]) == 1, ((rows, cols), ours, timm)


def test_eval_geometry_in_a_graph_matches_python_ints():
    rows_cols = np.random.default_rng(0).integers(1, 400, size=(50, 2)).astype(np.int32)

    @tf.function(input_signature=[tf.TensorSpec([2], tf.int32)], autograph=False)
    def geometry(shape):
        return tf.stack(imagenet.eval_geometry(shape[0], shape[1], (64, 96), 0.9))

    for rows, cols in rows_cols:
        expected = [int(v) for v in imagenet.eval_geometry(int(rows), int(cols), (64, 96), 0.9)]
        assert geometry(tf.constant([rows, cols])).numpy().tolist() == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=0), "image_size"),
        (dict(image_size=(32,)), "image_size"),
        (dict(crop_pct=0.0), "crop_pct"),
        (dict(crop_pct=1.5), "crop_pct"),
        (dict(crop_pct=float("nan")), "crop_pct"),
        (dict(crop_pct="0.9"), "crop_pct"),
    ],
)
def test_eval_transform_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        imagenet.eval_transform(np.zeros((40, 50, 3), np.uint8), **kwargs)


@pytest.mark.parametrize("shape", [(40, 50), (40, 50, 4), (2, 40, 50, 3)])
def test_eval_transform_refuses_other_than_one_rgb_image(shape):
    with pytest.raises(ValueError, match="3"):
        imagenet.eval_transform(np.zeros(shape, np.uint8), 32)
