"""One evaluation transform: `load_image` (Pillow), the TensorFlow-ops version of graphs
(`keras_coat.tf_images`: the SavedModel's `serving_bytes`, training's validation pipeline) and
timm's transforms give the same pixels, bit for bit, in both crop modes."""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_coat import imagenet, presets, tf_images
from keras_coat.export import serving
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


def _serving_bytes_pixels(encoded, height, width, crop_mode="center"):
    # As the SavedModel's serving_bytes builds it: a graph in which image sizes are unknown.
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
    def transform(image_bytes):
        return tf.map_fn(
            lambda data: serving.eval_resize_and_crop(data, height, width, CROP_PCT, crop_mode),
            image_bytes,
            fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32),
        )

    return transform(tf.constant(encoded)).numpy()


@pytest.mark.parametrize("crop_mode", imagenet.CROP_MODES)
def test_load_image_serving_bytes_and_validation_agree_pixel_for_pixel(image_folder, crop_mode):
    root, sizes, paths = image_folder
    recipe = dataclasses.replace(
        recipes.get_recipe("demo"), image_size=SIZE, eval_crop_pct=CROP_PCT,
        eval_crop_mode=crop_mode, batch_size=8,
    )  # fmt: skip
    source = data_lib.load_source(f"folder:{root}", SIZE)
    validation = np.concatenate(
        [images.numpy() for images, _, _ in data_lib.eval_dataset(recipe, source)]
    )[: len(paths)]
    served = _serving_bytes_pixels([p.read_bytes() for p in paths], SIZE, SIZE, crop_mode)
    loaded = np.stack([imagenet.load_image(p, SIZE, CROP_PCT, crop_mode) for p in paths])

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


# Seeded image sizes, output sizes, crops and modes: shrunk and enlarged, landscape and portrait
# (extreme ratios too, which Pillow resizes height first), square and non-square outputs.
def _cases(count, seed):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        rows, cols = (int(v) for v in rng.integers(1, 300, 2))
        if i % 5 == 0:  # an extreme aspect ratio
            rows, cols = (rows, max(1, cols // 30)) if i % 2 else (max(1, rows // 30), cols)
        side = int(rng.choice([16, 24, 32, 33, 64]))
        size = (side, side) if i % 3 else (side, int(rng.choice([16, 40, 48])))
        crop_pct = float(rng.choice([1.0, 0.95, 0.9, 0.875, 0.5]))
        cases.append((rows, cols, size, crop_pct, imagenet.CROP_MODES[i % 2]))
    return cases


def _noise(rows, cols, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (rows, cols, 3), dtype=np.uint8)
    # Half of them black and white: the bicubic overshoot that Pillow clips after each pass.
    return image if seed % 2 else (image > 127).astype(np.uint8) * 255


def test_the_graph_transform_is_pillows_bit_for_bit():
    graphs = {}
    for index, (rows, cols, size, crop_pct, crop_mode) in enumerate(_cases(60, seed=5)):
        image = _noise(rows, cols, index)
        key = (size, crop_pct, crop_mode)
        if key not in graphs:  # sizes unknown until the graph runs, as in tf.data
            graphs[key] = tf.function(
                lambda x, key=key: tf_images.eval_transform(x, *key),
                input_signature=[tf.TensorSpec((None, None, 3), tf.uint8)],
            )
        expected = imagenet.eval_transform(image, size, crop_pct, crop_mode)
        np.testing.assert_array_equal(
            graphs[key](image).numpy(), expected, err_msg=f"{(rows, cols)} -> {key}"
        )
    # Eagerly, and from float pixels (rounded to 8 bits first, as PIL holds them).
    image = _noise(50, 70, 1).astype(np.float32) + 0.3
    np.testing.assert_array_equal(
        tf_images.eval_transform(image, 32, 0.875).numpy(), imagenet.eval_transform(image, 32)
    )


def _timm_pixels(image, size, crop_pct, crop_mode):
    timm_factory = pytest.importorskip("timm.data.transforms_factory")
    transform = timm_factory.transforms_imagenet_eval(
        size, crop_pct=crop_pct, crop_mode=crop_mode, interpolation="bicubic", normalize=False
    )
    return transform(Image.fromarray(image)).permute(1, 2, 0).numpy().astype(np.float32)


def test_the_pillow_transform_is_timms_bit_for_bit():
    for index, (rows, cols, size, crop_pct, crop_mode) in enumerate(_cases(40, seed=8)):
        image = _noise(rows, cols, index)
        if crop_mode == "center" and size[0] != size[1]:
            timm = _timm_geometry(rows, cols, size, crop_pct)
            ours = tuple(int(v) for v in imagenet.eval_geometry(rows, cols, size, crop_pct))
            if ours != timm:  # an exact .5 tie, see test_eval_geometry_is_timms
                continue
        np.testing.assert_array_equal(
            imagenet.eval_transform(image, size, crop_pct, crop_mode),
            _timm_pixels(image, size, crop_pct, crop_mode),
            err_msg=f"{(rows, cols)} -> {size}, {crop_pct}, {crop_mode}",
        )


def test_squash_resizes_both_sides_whatever_the_aspect_ratio():
    for rows, cols in [(10, 300), (300, 10), (64, 64)]:
        assert [int(v) for v in imagenet.eval_geometry(rows, cols, (32, 48), 0.8, "squash")] == [
            40, 60, 4, 6
        ]
    image = _noise(20, 90, 3)
    squashed = imagenet.eval_transform(image, 32, 1.0, "squash")
    resized = np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC), np.float32)
    np.testing.assert_array_equal(squashed, resized)


def test_crop_mode_travels_with_the_preprocessing():
    assert presets.ImagePreprocessing().crop_mode == "center"
    squash = presets.ImagePreprocessing(crop_pct=0.95, crop_mode="squash")
    assert presets.ImagePreprocessing.from_config(squash.get_config()) == squash
    # A config written before the field existed reads as "center".
    older = {k: v for k, v in squash.get_config().items() if k != "crop_mode"}
    assert presets.ImagePreprocessing.from_config(older).crop_mode == "center"
    with pytest.raises(ValueError, match=r"crop_mode must be one of \('center', 'squash'\); "
                       r"received 'border'"):
        presets.ImagePreprocessing(crop_mode="border")
    for transform in (imagenet.eval_transform, tf_images.eval_transform):
        with pytest.raises(ValueError, match="crop_mode must be one of"):
            transform(np.zeros((40, 50, 3), np.uint8), 32, 0.9, "border")


def test_an_export_serves_the_crop_mode_of_the_models_preprocessing():
    import keras_coat

    model = keras_coat.CoaT(
        embed_dims=(16, 16, 16, 16), serial_depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2),
        input_shape=(32, 32, 3), classes=3,
    )  # fmt: skip
    assert serving.serving_contract(model).crop_mode == "center"
    model.preprocessing = dataclasses.replace(model.preprocessing, crop_mode="squash")
    contract = serving.serving_contract(model)
    assert (contract.crop_mode, contract.crop_pct) == ("squash", model.preprocessing.crop_pct)
    assert serving.serving_contract(model, crop_mode="center").crop_mode == "center"


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


@pytest.mark.parametrize("crop_mode", imagenet.CROP_MODES)
def test_eval_geometry_in_a_graph_matches_python_ints(crop_mode):
    rows_cols = np.random.default_rng(0).integers(1, 400, size=(50, 2)).astype(np.int32)

    @tf.function(input_signature=[tf.TensorSpec([2], tf.int32)], autograph=False)
    def geometry(shape):
        return tf.stack(imagenet.eval_geometry(shape[0], shape[1], (64, 96), 0.9, crop_mode))

    for rows, cols in rows_cols:
        expected = [
            int(v) for v in imagenet.eval_geometry(int(rows), int(cols), (64, 96), 0.9, crop_mode)
        ]
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
