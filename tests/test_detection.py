"""Detection on a CoaT backbone (training.detection, `python -m training.train --task detection`):
the digit canvases and their boxes, COCO evaluation, the picture, the task's options, and one tiny
run of the command shared by the end-to-end tests (interrupted and resumed, evaluated, the
`.keras` round trip of the KerasHub RetinaNet). The faults of a detection run (lock, SIGTERM,
damaged backup) are tested with the classifier's in tests/test_training_distributed.py, its
training on JAX in tests/test_training_jax.py."""

import dataclasses
import json
import os
import signal

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from training import detection

keras_hub = pytest.importorskip("keras_hub")
pytest.importorskip("pycocotools")

RECIPE = detection.DetectionRecipe()
TINY = '{"embed_dims": [16, 16, 16, 16], "serial_depths": [1, 1, 1, 1], "mlp_ratios": [2, 2, 2, 2]}'
# A tiny detection run: a tiny CoaT backbone, 64x64 canvases, two steps of 2 canvases an epoch.
TINY_RUN = [
    "--task", "detection", "--model-config", TINY, "--canvas-size", "64", "--digit-sizes", "12",
    "28", "--max-digits", "2", "--batch-size", "2", "--train-canvases", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def source():
    return detection.CanvasSource(RECIPE)


# ---------------------------------------------------------------------------------- canvases


def test_boxes_are_the_exact_extent_of_each_pasted_digit():
    # Synthetic scans, each ink-filled over a random rectangle with its own value: every pasted
    # digit is then one connected blob whose peak names it, found without the generator's help.
    rng = np.random.default_rng(0)
    scans, values = [], 20.0 * (1 + np.arange(10))
    for value in values:
        scan = np.zeros((8, 8), np.float32)
        y0, x0 = rng.integers(0, 4, size=2)
        y1, x1 = rng.integers(5, 9, size=2)
        scan[y0:y1, x0:x1] = value
        scans.append(scan)
    scans, labels = np.stack(scans), np.arange(10)
    for seed in range(40):
        image, boxes, found_labels = detection.make_canvas(
            np.random.default_rng(seed), scans, labels, 128, 4, (8, 60)
        )
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert 1 <= len(boxes) <= 4 and boxes.dtype == np.float32
        blobs, count = ndimage.label(image[..., 0] > 0)
        extents = {
            (s[1].start, s[0].start, s[1].stop, s[0].stop): int(image[..., 0][s].max())
            for s in ndimage.find_objects(blobs)
        }
        assert count == len(boxes)
        truth = {tuple(int(v) for v in box): int(values[c]) for box, c in zip(boxes, found_labels)}
        assert truth == extents


def test_real_digit_boxes_are_tight_disjoint_and_hold_all_ink(source):
    for index in range(30):
        image, boxes, labels = source.train_canvas(seed=3, epoch=1, index=index)
        ink = image[..., 0] > 0
        covered = np.zeros_like(ink)
        for x0, y0, x1, y1 in boxes.astype(int):
            assert not covered[y0:y1, x0:x1].any(), "digit boxes overlap"
            covered[y0:y1, x0:x1] = True
            inside = ink[y0:y1, x0:x1]
            # Every edge row and column of the box touches ink.
            assert inside[0].any() and inside[-1].any()
            assert inside[:, 0].any() and inside[:, -1].any()
        assert not (ink & ~covered).any(), "ink outside every box"
        assert set(labels.tolist()) <= set(range(10))


def test_canvases_are_seeded_and_held_out_ones_use_held_out_scans_only(source):
    a = source.train_canvas(seed=0, epoch=2, index=5)
    b = source.train_canvas(seed=0, epoch=2, index=5)
    c = source.train_canvas(seed=0, epoch=3, index=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])

    held_out = source.held_out(6)
    only_held_out = detection.CanvasSource(RECIPE)
    only_held_out.train_scans = only_held_out.train_labels = None
    again = only_held_out.held_out(6)
    assert all(np.array_equal(x, y) for x, y in zip(held_out[0], again[0]))
    only_train = detection.CanvasSource(RECIPE)
    only_train.held_out_scans = only_train.held_out_labels = None
    assert np.array_equal(only_train.train_canvas(0, 2, 5)[0], a[0])


def test_training_batches_are_padded_and_resume_at_their_epoch_and_step(source):
    recipe = dataclasses.replace(RECIPE, epochs=2, batch_size=3, train_canvases=6)
    canvases = detection.CanvasSource(recipe)
    full = list(canvases.train_dataset(seed=1).as_numpy_iterator())
    resumed = list(canvases.train_dataset(seed=1, start_epoch=1).as_numpy_iterator())
    within = canvases.train_dataset(seed=1, start_epoch=0, start_step=1, end_epoch=1)
    assert len(full) == 4 and len(resumed) == 2 and within.cardinality() == 1
    for (x, y), (rx, ry) in zip(full[2:] + full[1:2], resumed + list(within.as_numpy_iterator())):
        assert np.array_equal(x, rx) and np.array_equal(y["boxes"], ry["boxes"])
    images, targets = full[0]
    assert images.shape == (3, 128, 128, 3) and images.dtype == np.float32
    assert targets["boxes"].shape == (3, 4, 4) and targets["labels"].shape == (3, 4)
    _, boxes, labels = canvases.train_canvas(1, 0, 0)
    assert np.array_equal(targets["boxes"][0, : len(boxes)], boxes)
    assert (targets["boxes"][0, len(boxes) :] == -1).all()
    assert (targets["labels"][0, len(labels) :] == -1).all()
    capped = list(canvases.train_dataset(seed=1, steps=1).as_numpy_iterator())
    assert len(capped) == 2 and np.array_equal(capped[1][0], full[2][0])  # epoch 1, batch 0
    with pytest.raises(ValueError, match="start_step 2 of 2 steps per epoch"):
        canvases.train_dataset(seed=1, start_step=2)


def test_recipe_validation():
    with pytest.raises(ValueError, match="canvas_size must be a multiple of 2\\*\\*max_level"):
        dataclasses.replace(RECIPE, canvas_size=100)
    with pytest.raises(ValueError, match="digit_sizes"):
        dataclasses.replace(RECIPE, digit_sizes=(40, 20))
    with pytest.raises(ValueError, match="at least one batch"):
        dataclasses.replace(RECIPE, train_canvases=4, batch_size=8)
    with pytest.raises(ValueError, match="held_out_canvases must be positive, got 0"):
        dataclasses.replace(RECIPE, held_out_canvases=0)
    with pytest.raises(ValueError, match="backup_every must be 'epoch' or a positive number"):
        dataclasses.replace(RECIPE, backup_every=0)


def test_every_recipe_field_is_an_option_of_the_detection_task():
    from training import train

    args = train.parse_args(
        ["--task", "detection", "--output-dir", "x", "--model", "coat_lite_mini",
         "--digit-sizes", "12", "28", "--aspect-ratios", "0.5", "1", "2", "--ema", "0.9",
         "--clip-norm", "0", "--lr", "3e-4", "--backup-every", "5", "--show", "0"]
    )  # fmt: skip
    recipe = detection.DetectionTask(args).recipe
    assert recipe == dataclasses.replace(
        RECIPE, model="coat_lite_mini", digit_sizes=(12, 28), aspect_ratios=(0.5, 1.0, 2.0),
        ema_momentum=0.9, clip_norm=None, lr=3e-4, backup_every=5,
    )  # fmt: skip
    # The classifier's options are not the detector's, and the other way round.
    for argv in (["--task", "detection", "--recipe", "demo"], ["--canvas-size", "64"]):
        with pytest.raises(SystemExit):
            train.parse_args([*argv, "--output-dir", "x"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--show", "-1"], "--show must be >= 0, got -1."),
        (["--init-weights", "missing.keras"], "--init-weights: no file 'missing.keras'."),
        (["--canvas-size", "100"], "canvas_size must be a multiple of 2**max_level = 32"),
    ],
)
def test_bad_detection_options_stop_before_anything_is_written(tmp_path, capsys, argv, message):
    from training import train

    with pytest.raises(SystemExit) as stopped:
        train.main(["--task", "detection", "--output-dir", str(tmp_path / "run"), *argv])
    assert str(stopped.value).startswith("error: ") and message in str(stopped.value)
    assert not (tmp_path / "run").exists()


def test_a_detection_run_of_several_processes_is_refused(tmp_path, monkeypatch):
    from training import engine_tf, train

    def start_engine_of_several_processes(args):
        engine = engine_tf.Engine(engine_tf.make_strategy("one_device"))
        engine.several_processes = True  # as a MultiWorkerMirroredStrategy's
        return engine

    monkeypatch.setattr(train, "start_engine", start_engine_of_several_processes)
    with pytest.raises(SystemExit, match=r"^error: --task detection trains in one process \(with "
                       r"every device it has\); this run has several processes\.$"):
        train.main([*TINY_RUN, "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------- evaluation


def test_coco_map_is_one_for_the_truth_and_drops_for_shifted_boxes(source):
    images, boxes, labels = source.held_out(12)
    truth = [(b, c, np.ones(len(c))) for b, c in zip(boxes, labels)]
    perfect = detection.coco_evaluate(boxes, labels, truth)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0)

    # Shifted by a fifth of their size: still found at IoU 0.5, not at the stricter thresholds.
    shifted = [(b + 0.2 * (b[:, 2:3] - b[:, 0:1]) * [1, 0, 1, 0], c, s) for b, c, s in truth]
    moved = detection.coco_evaluate(boxes, labels, shifted)
    assert moved["map50"] == pytest.approx(1.0) and moved["map"] < 0.8
    wrong = [(b, (c + 1) % 10, s) for b, c, s in truth]
    assert detection.coco_evaluate(boxes, labels, wrong)["map50"] == 0.0
    nothing = [(np.zeros((0, 4)), np.zeros(0, int), np.zeros(0)) for _ in truth]
    assert detection.coco_evaluate(boxes, labels, nothing)["map"] == 0.0
    with pytest.raises(ValueError, match="one of each per image"):
        detection.coco_evaluate(boxes, labels, truth[:-1])


# ----------------------------------------------------------------------------------- picture


def test_picture_is_a_png_of_the_grid_size(source, tmp_path):
    images, boxes, labels = source.held_out(3)
    found = [(b + 2, c, np.full(len(c), 0.9)) for b, c in zip(boxes, labels)]
    # An untrained detector's boxes may be inverted, outside the canvas or not finite.
    odd = np.array([[50, 50, 40, 60], [-90, 10, -20, 30], [np.nan, 0, 5, 5]], np.float32)
    found[0] = tuple(np.concatenate([a, b]) for a, b in zip(found[0], (odd, [1, 2, 3], [1.0] * 3)))
    path = detection.draw_detections(str(tmp_path / "d.png"), images, boxes, labels, found)
    panel, gap = 128 * detection.PICTURE_SCALE, detection.PICTURE_GAP
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        # 3 canvases, 2 (truth, detections) pairs per row: 4 panels x 2 rows.
        assert picture.size == (4 * panel + 5 * gap, 2 * panel + 3 * gap)
        pixels = np.asarray(picture)
    assert (pixels == detection.TRUE_COLOR).all(axis=-1).any()
    assert (pixels == detection.FOUND_COLOR).all(axis=-1).any()
    assert os.listdir(tmp_path) == ["d.png"]


# ---------------------------------------------------------------------- the command, end to end


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two two-step epochs of a tiny detector, interrupted after the first and resumed, then
    evaluation, picture and save; the detections the run measured are kept to compare the saved
    file's against. The one detector the end-to-end tests share."""
    from training import train
    from training.callbacks import MetricsWriter

    output = tmp_path_factory.mktemp("detect")
    argv = [
        *TINY_RUN, "--output-dir", str(output), "--epochs", "2", "--held-out-canvases", "4",
        "--show", "3", "--verbose", "0",
    ]  # fmt: skip
    measured = {}
    original_detect, original_epoch_begin = detection.detect, MetricsWriter.on_epoch_begin

    def recording_detect(detector, images, **kwargs):
        measured["images"], measured["detections"] = images, original_detect(detector, images)
        measured["outputs"] = {k: np.asarray(v) for k, v in detector(images).items()}
        return measured["detections"]

    def interrupt_second_epoch(self, epoch, logs=None):
        if epoch == 1:
            raise Interrupted
        original_epoch_begin(self, epoch, logs)

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MetricsWriter, "on_epoch_begin", interrupt_second_epoch)
        with pytest.raises(Interrupted):
            train.main(argv)
    # A failed fit calls no callback: the run puts SIGTERM's handler back itself.
    measured["handler_restored"] = signal.getsignal(signal.SIGTERM) == handler
    interrupted = json.loads((output / "metrics.json").read_text())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(detection, "detect", recording_detect)
        metrics = train.main(argv)
    return output, metrics, argv, measured, interrupted


@pytest.mark.slow
@pytest.mark.timeout(900)  # measured up to 240 s on a busy machine (pyproject: 300 s)
def test_training_resumes_then_the_saved_detector_gives_equal_detections(tiny_run, capsys):
    import keras

    output, metrics, _, measured, interrupted = tiny_run
    assert measured["handler_restored"]
    assert interrupted["status"] == "running" and interrupted["epochs_completed"] == 1
    assert metrics["status"] == "complete" and metrics["epochs_completed"] == 2
    with open(output / "training_log.csv") as log:
        assert [line.split(",")[0] for line in log][1:] == ["0", "1"]  # resumed at epoch 1
    assert 0.0 <= metrics["map"] <= metrics["map50"] <= 1.0
    assert metrics["train_seconds_this_session"] > 0 and metrics["train_loss"] > 0
    assert metrics["reload_max_abs_diff"] < 1e-5
    assert (metrics["held_out_canvases"], metrics["picture"]) == (4, str(output / "detections.png"))
    assert json.loads((output / "metrics.json").read_text()) == metrics
    assert sorted(p.name for p in output.iterdir()) == [
        "detections.png", "last.keras", "logs", "metrics.json", "recipe.json", "training_log.csv"
    ]  # no backup left, no best.keras: nothing is validated during training
    with Image.open(output / "detections.png") as picture:
        assert picture.format == "PNG" and picture.size == detection.picture_size(3, 64)

    reloaded = keras.saving.load_model(output / "last.keras")
    assert isinstance(reloaded, keras_hub.models.RetinaNetObjectDetector)
    # Raw head outputs (the detections of a two-step detector may be few or none).
    outputs = reloaded(measured["images"])
    for name, expected in measured["outputs"].items():
        np.testing.assert_allclose(np.asarray(outputs[name]), expected, rtol=1e-5, atol=1e-5)
    again = detection.detect(reloaded, measured["images"])
    assert len(again) == len(measured["detections"]) == 4
    for found, expected in zip(again, measured["detections"]):
        for a, b in zip(found, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_a_completed_run_is_not_redone(tiny_run, capsys):
    from training import train

    output, _, argv, *_ = tiny_run
    assert train.main(argv) == json.loads((output / "metrics.json").read_text())
    assert "holds a completed run (held-out mAP@[.5:.95] " in capsys.readouterr().out


@pytest.mark.slow
def test_init_weights_take_the_backbone_of_a_saved_classifier(tmp_path):
    import keras_coat

    recipe = dataclasses.replace(RECIPE, canvas_size=64, digit_sizes=(12, 28))
    classifier = keras_coat.CoaTLiteTiny(input_shape=(32, 32, 3), classes=10)
    path = str(tmp_path / "digits.keras")
    classifier.save(path)
    detector = detection.build_detector(dataclasses.replace(recipe, init_weights=path))
    encoder = detector.backbone.image_encoder
    for name in ("patch_embed1", "serial_blocks4_1_mlp", "cpe3", "crpe2", "norm4"):
        for got, expected in zip(
            encoder.backbone.get_layer(name).get_weights(),
            classifier.backbone.get_layer(name).get_weights(),
        ):
            np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="init_weights must be"):
        detection.build_detector(
            dataclasses.replace(recipe, init_weights=str(tmp_path / "digits.pth"))
        )
    mini = keras_coat.CoaTLiteMini(input_shape=(32, 32, 3), classes=10)
    mini.save(str(tmp_path / "mini.keras"))
    with pytest.raises(ValueError, match="same CoaT variant"):
        detection.build_detector(
            dataclasses.replace(recipe, init_weights=str(tmp_path / "mini.keras"))
        )
