"""KerasHub task models on a CoaT backbone: RetinaNet detection and DeepLabV3 segmentation train,
save as `.keras` and load back with the same predictions (the `keras-hub` extra).

RetinaNet trains on TensorFlow in the detection runs of `training.train --task detection`
(tests/test_detection.py), so here it trains on PyTorch only, and saves and loads on both."""

import keras
import numpy as np
import pytest

import keras_coat
from tests.conftest import pixels, to_numpy

keras_hub = pytest.importorskip("keras_hub")

SIZE = 128  # RetinaNet's P7 needs strides up to 128.
CLASSES = 3


def _train_one_step(model, x, y):
    before = [w.copy() for w in to_numpy(model.trainable_weights)]
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    after = to_numpy(model.trainable_weights)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def _round_trip(model, x, path):
    expected = to_numpy(model(x))
    model.save(path)
    restored = keras.models.load_model(path)
    assert type(restored) is type(model)
    # The factories' headless model: pixels in, normalized inside, around a CoaTBackbone.
    encoder = restored.backbone.image_encoder
    assert type(encoder) is keras_coat.CoaTImageClassifier and encoder.num_classes is None
    assert type(encoder.backbone) is keras_coat.CoaTBackbone
    keras.tree.map_structure(np.testing.assert_array_equal, to_numpy(restored(x)), expected)


@pytest.mark.slow
@pytest.mark.backends("tensorflow", "torch")
def test_retinanet_on_a_coat_backbone_trains_saves_and_loads(tmp_path):
    encoder = keras_coat.CoaTLiteTiny(include_top=False, input_shape=(SIZE, SIZE, 3))
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=encoder, min_level=3, max_level=7, use_p5=False,
        image_shape=(SIZE, SIZE, 3),
    )
    detector = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=CLASSES, bounding_box_format="yxyx",
        pre_logits_num_conv_layers=1,
    )
    detector.compile(optimizer=keras.optimizers.SGD(0.01), run_eagerly=True)
    x = pixels(2, SIZE)
    y = {
        "boxes": np.array([[[10, 10, 60, 70], [40, 30, 120, 100]]] * 2, "float32"),
        "labels": np.array([[0, 2]] * 2, "int32"),
    }
    if keras.config.backend() != "tensorflow":
        _train_one_step(detector, x, y)
    _round_trip(detector, x, tmp_path / "retinanet.keras")


@pytest.mark.slow
def test_deeplab_v3_on_a_coat_backbone_trains_saves_and_loads(tmp_path):
    encoder = keras_coat.CoaTLiteTiny(include_top=False, input_shape=(64, 64, 3))
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder, spatial_pyramid_pooling_key="P5", low_level_feature_key="P2",
        upsampling_size=8, dilation_rates=[1, 2], projection_filters=16,
        image_shape=(64, 64, 3),
    )
    segmenter = keras_hub.models.DeepLabV3ImageSegmenter(backbone=backbone, num_classes=CLASSES)
    segmenter.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=True,
    )
    x = pixels(2, 64, seed=1)
    y = np.random.RandomState(2).randint(0, CLASSES, size=(2, 64, 64, 1))
    assert segmenter(x).shape == (2, 64, 64, CLASSES)
    _train_one_step(segmenter, x, y)
    _round_trip(segmenter, x, tmp_path / "deeplab_v3.keras")
