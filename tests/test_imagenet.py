"""keras_coat.imagenet: preprocessing, the evaluation transform and class names."""

import numpy as np
import pytest

from keras_coat import imagenet

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def test_preprocess_input_numpy():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(2, 5, 7, 3)).astype(np.float32)
    out = imagenet.preprocess_input(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, (x / 255.0 - MEAN) / STD, rtol=1e-6, atol=1e-6)
    # The mean color maps to zero; uint8 input is accepted.
    np.testing.assert_allclose(imagenet.preprocess_input(255.0 * MEAN), 0.0, atol=1e-6)
    np.testing.assert_allclose(
        imagenet.preprocess_input(np.zeros((1, 1, 3), np.uint8))[0, 0], -MEAN / STD, rtol=1e-6
    )


def test_preprocess_input_keras_tensors_match_numpy():
    import keras

    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, size=(2, 4, 4, 3)).astype(np.float32)
    eager = imagenet.preprocess_input(keras.ops.convert_to_tensor(x))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(eager), imagenet.preprocess_input(x), atol=1e-6
    )
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, imagenet.preprocess_input(inputs))
    np.testing.assert_allclose(model.predict(x, verbose=0), imagenet.preprocess_input(x), atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 4, 1), (2, 3, 4, 4), ()])
def test_preprocess_input_needs_three_channels(shape):
    with pytest.raises(ValueError, match="3 channels"):
        imagenet.preprocess_input(np.zeros(shape, np.float32))


def test_class_names_come_from_the_imagenet_synsets():
    names, wnids = imagenet.class_names(), imagenet.class_wnids()
    assert len(names) == len(wnids) == 1000
    assert len(set(wnids)) == 1000
    assert (wnids[0], names[0]) == ("n01440764", "tench")
    assert (wnids[999], names[999]) == ("n15075141", "toilet tissue")
    timm_info = pytest.importorskip("timm.data").ImageNetInfo()
    for i in (0, 1, 281, 417, 999):
        assert timm_info.index_to_label_name(i) == wnids[i]
        assert timm_info.index_to_description(i).split(",")[0] == names[i]


def test_decode_predictions_orders_best_first():
    preds = np.zeros((2, 1000), np.float32)
    preds[0, [5, 281, 999]] = [0.2, 0.7, 0.1]
    preds[1, 417] = 3.0
    decoded = imagenet.decode_predictions(preds, top=3)
    wnids = imagenet.class_wnids()
    assert [row[0] for row in decoded[0]] == [wnids[281], wnids[5], wnids[999]]
    assert decoded[0][0][1] == "tabby"
    assert decoded[0][0][2] == pytest.approx(0.7)
    assert isinstance(decoded[0][0][2], float)
    assert decoded[1][0] == ("n02782093", "balloon", 3.0)
    assert len(decoded[1]) == 3


def test_decode_predictions_accepts_tensors():
    import keras

    preds = keras.ops.one_hot(keras.ops.convert_to_tensor([8]), 1000)
    assert imagenet.decode_predictions(preds, top=1)[0][0][:2] == ("n01514859", "hen")


@pytest.mark.parametrize("shape", [(1000,), (2, 10), (2, 1001), (1, 1, 1000)])
def test_decode_predictions_validates_shape(shape):
    with pytest.raises(ValueError, match=r"\(batch, 1000\)"):
        imagenet.decode_predictions(np.zeros(shape))


@pytest.mark.parametrize("top", [0, 1001, 2.0, True])
def test_decode_predictions_validates_top(top):
    with pytest.raises(ValueError, match="top"):
        imagenet.decode_predictions(np.zeros((1, 1000)), top=top)


def _write_image(path, width, height, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    # Smooth content so that resampling differences would show.
    base = rng.uniform(0, 255, size=(height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.BILINEAR)
    image.save(path)
    return path


def _timm_eval(path, size):
    timm_factory = pytest.importorskip("timm.data.transforms_factory")
    from PIL import Image

    transform = timm_factory.transforms_imagenet_eval(
        size, crop_pct=imagenet.DEFAULT_CROP_PCT, interpolation="bicubic", normalize=False
    )
    with Image.open(path) as image:
        return transform(image.convert("RGB")).permute(1, 2, 0).numpy().astype(np.float32)


@pytest.mark.parametrize(
    "width,height,size",
    [
        (500, 375, 224),  # landscape
        (333, 517, 224),  # portrait, odd sizes: rounding of the crop offset
        (256, 256, 224),  # already at the resize size
        (300, 301, 384),  # upsampled for the 384 checkpoint
        (640, 480, (224, 320)),  # non-square target
        (200, 700, (320, 224)),
    ],
)
def test_load_image_is_timms_eval_transform(tmp_path, width, height, size):
    path = _write_image(tmp_path / "image.png", width, height)
    ours = imagenet.load_image(path, image_size=size)
    expected_hw = size if isinstance(size, tuple) else (size, size)
    assert ours.shape == (*expected_hw, 3) and ours.dtype == np.float32
    assert 0.0 <= ours.min() and ours.max() <= 255.0
    np.testing.assert_array_equal(ours, _timm_eval(path, size))


def test_load_image_equals_timm_on_noise(tmp_path):
    # Sharp edges everywhere: the bicubic overshoot that PIL clips to 8 bits after each pass.
    from PIL import Image

    rng = np.random.default_rng(1)
    for width, height, size in [(150, 97, 64), (40, 52, 64), (130, 81, (64, 96)), (60, 400, 32)]:
        path = tmp_path / f"noise_{width}x{height}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        np.testing.assert_array_equal(imagenet.load_image(path, size), _timm_eval(path, size))


def test_load_image_converts_grayscale_and_rgba(tmp_path):
    from PIL import Image

    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((300, 400), 128, np.uint8)).save(gray)
    np.testing.assert_allclose(imagenet.load_image(gray), 128.0)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.full((300, 400, 4), 200, np.uint8)).save(rgba)
    assert imagenet.load_image(rgba, image_size=32).shape == (32, 32, 3)


@pytest.mark.parametrize("bad", [0, -3, (224,), (224, 0), 22.4, "224"])
def test_load_image_validates_size(tmp_path, bad):
    path = _write_image(tmp_path / "image.png", 64, 64)
    with pytest.raises(ValueError, match="image_size"):
        imagenet.load_image(path, image_size=bad)


def test_default_crop_pct_is_the_authors():
    assert imagenet.DEFAULT_CROP_PCT == 224 / 256
