"""Object detection with a CoaT backbone: a KerasHub RetinaNet learns to find handwritten digits
on generated canvases. `DetectionTask` is what `python -m training.train --task detection` trains,
on the same engines and with the same fault handling as a classifier (`training.train`).

Data. Each canvas is a black square (`canvas_size` pixels, RGB) holding 1 to `max_digits` of
scikit-learn's handwritten digit scans, each upscaled (bilinear) to a random square size in
`digit_sizes`, placed at a random position without touching another digit. A digit's box is the
exact extent of its nonzero pixels on the canvas: `[x_min, y_min, x_max, y_max]` in pixel edges
("xyxy", `x_max` exclusive), so a box's pixels `canvas[y_min:y_max, x_min:x_max]` hold the whole
digit and its edges touch ink. Training canvases are drawn from the training scans only, each a
function of (seed, epoch, index), so a resumed run sees the same canvases as an uninterrupted one;
held-out canvases use only the held-out scans (`keras_coat.datasets.digits_split`) and a fixed
seed, so every run is measured on the same canvases.

Evaluation is pycocotools' COCOeval ("bbox"): `map` is mAP@[.5:.95], `map50` mAP@0.5.
"""

import contextlib
import dataclasses
import io
import math
import os
import warnings

import numpy as np

from training.recipes import common_problems, recipe_field

MAX_TRIES_PER_DIGIT = 50  # random positions tried before a digit is left out of a canvas
DIGIT_GAP = 1  # pixels kept free between two digits' boxes
HELD_OUT_SEED = 20_211_011  # the held-out canvases are the same for every run
BOX_LOSS_BETA = 0.1
PADDING = -1  # label and box coordinates of the unused box slots of a canvas
CLASS_NAMES = [str(d) for d in range(10)]


@dataclasses.dataclass(frozen=True)
class DetectionRecipe:
    """Every setting of a detection run (recorded in DIR/recipe.json; a resume must match).
    Each field is also a command-line option of `python -m training.train --task detection`."""

    model: str = recipe_field("coat_lite_tiny", "the backbone's CoaT variant", set_by="--model")
    canvas_size: int = recipe_field(128, "side of the square canvases, a multiple of 32")
    max_digits: int = recipe_field(4, "digits on a canvas, at most")
    digit_sizes: tuple[int, int] = recipe_field(
        (20, 48), "side of an upscaled digit scan, pixels", metavar=("MIN", "MAX")
    )
    min_level: int = recipe_field(3, "first feature pyramid level (P3: stride 8)")
    max_level: int = recipe_field(5, "last feature pyramid level (P5: stride 32)")
    anchor_size: float = recipe_field(2.5, "anchor side in strides: 2.5 x stride x 2^(k/scales)")
    anchor_scales: int = recipe_field(3, "anchor scales per level")
    aspect_ratios: tuple[float, ...] = recipe_field(
        (1.0,), "anchor aspect ratios", metavar="RATIO"
    )
    head_conv_layers: int = recipe_field(
        0, "3x3 conv layers before each head's output (and the FPN's output conv)"
    )
    epochs: int = recipe_field(5, "training epochs")
    batch_size: int = recipe_field(16, "global batch size, over all replicas")
    train_canvases: int = recipe_field(768, "training canvases per epoch, new ones every epoch")
    held_out_canvases: int = recipe_field(240, "held-out canvases the detector is measured on")
    lr: float = recipe_field(1e-3, "peak learning rate (AdamW, warm-up then cosine)")
    warmup_epochs: float = recipe_field(0.5, "linear warm-up from --warmup-lr, in epochs")
    warmup_lr: float = recipe_field(1e-5, "learning rate at the start of the warm-up")
    min_lr: float = recipe_field(1e-5, "learning rate at the end of the cosine schedule")
    weight_decay: float = recipe_field(0.05, "AdamW decoupled weight decay")
    adam_epsilon: float = recipe_field(1e-7, "AdamW epsilon")
    clip_norm: float | None = recipe_field(10.0, "global gradient-norm clip, 0 disables", off=0)
    ema_momentum: float | None = recipe_field(
        None, "EMA momentum of the weights (evaluated and saved), 0 disables", flag="ema", off=0
    )
    init_weights: str | None = recipe_field(
        None,
        "backbone weights to start from: a .keras CoaT classifier of the same variant (make "
        "demo's demo-output/last.keras), a .weights.h5 file or \"imagenet\" (default: random)",
    )
    backup_every: str | int = recipe_field(
        "epoch", '"epoch" or a number of steps between backups', metavar="epoch|STEPS"
    )

    def __post_init__(self):
        problems = common_problems(self)
        for field in ("canvas_size", "max_digits", "train_canvases", "held_out_canvases",
                      "anchor_scales", "anchor_size"):  # fmt: skip
            if getattr(self, field) <= 0:
                problems.append(f"{field} must be positive, got {getattr(self, field)}")
        if self.head_conv_layers < 0:
            problems.append(f"head_conv_layers must be >= 0, got {self.head_conv_layers}")
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            problems.append(f"aspect_ratios must be positive, got {self.aspect_ratios}")
        if self.canvas_size % 2**self.max_level:
            problems.append(
                f"canvas_size must be a multiple of 2**max_level = {2**self.max_level}, got "
                f"{self.canvas_size}"
            )
        low, high = self.digit_sizes
        if not 8 <= low <= high <= self.canvas_size:
            problems.append(
                f"digit_sizes must satisfy 8 <= min <= max <= canvas_size ({self.canvas_size}), "
                f"got {self.digit_sizes}"
            )
        if not 2 <= self.min_level <= self.max_level <= 5:
            problems.append(
                "min_level and max_level must satisfy 2 <= min_level <= max_level <= 5 (CoaT's "
                f"pyramid has P2..P5), got {self.min_level} and {self.max_level}"
            )
        if self.train_canvases < self.batch_size:
            problems.append(
                f"train_canvases ({self.train_canvases}) must be at least one batch "
                f"({self.batch_size})"
            )
        if problems:
            raise ValueError("Invalid detection recipe: " + "; ".join(problems) + ".")

    @property
    def steps_per_epoch(self):
        return self.train_canvases // self.batch_size

    @property
    def peak_lr(self):
        return self.lr

    def to_dict(self):
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------- canvases


def render_digit(scan, size):
    """An 8x8 scan in [0, 255] upscaled to `size` x `size` (bilinear), cropped to its ink.

    Returns a uint8 [h, w] patch whose first and last rows and columns all hold nonzero pixels.
    """
    from PIL import Image

    patch = Image.fromarray(np.asarray(scan, np.float32), mode="F").resize(
        (size, size), Image.Resampling.BILINEAR
    )
    patch = np.clip(np.round(np.asarray(patch)), 0, 255).astype(np.uint8)
    rows, cols = np.flatnonzero(patch.any(axis=1)), np.flatnonzero(patch.any(axis=0))
    if rows.size == 0:
        raise ValueError("render_digit: the scan has no nonzero pixel.")
    return patch[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def make_canvas(rng, scans, labels, canvas_size, max_digits, digit_sizes):
    """One canvas drawn with `rng` from `scans` ([N, 8, 8] in [0, 255]) and their `labels`.

    Returns (uint8 [canvas_size, canvas_size, 3] image, float32 [n, 4] xyxy boxes, int32 [n]
    labels), 1 <= n <= max_digits; digits' boxes are at least `DIGIT_GAP` pixels apart.
    """
    canvas = np.zeros((canvas_size, canvas_size), np.uint8)
    boxes, chosen = [], []
    for _ in range(rng.integers(1, max_digits + 1)):
        index = rng.integers(len(scans))
        patch = render_digit(scans[index], int(rng.integers(digit_sizes[0], digit_sizes[1] + 1)))
        height, width = patch.shape
        for _ in range(MAX_TRIES_PER_DIGIT):
            top = int(rng.integers(canvas_size - height + 1))
            left = int(rng.integers(canvas_size - width + 1))
            box = (left, top, left + width, top + height)
            if all(_apart(box, other) for other in boxes):
                canvas[top : top + height, left : left + width] = patch
                boxes.append(box)
                chosen.append(labels[index])
                break
    image = np.repeat(canvas[..., None], 3, axis=-1)
    return image, np.array(boxes, np.float32).reshape(-1, 4), np.array(chosen, np.int32)


def _apart(a, b):
    return (
        a[2] + DIGIT_GAP <= b[0]
        or b[2] + DIGIT_GAP <= a[0]
        or a[3] + DIGIT_GAP <= b[1]
        or b[3] + DIGIT_GAP <= a[1]
    )


def pad_targets(boxes, labels, max_digits):
    """Boxes and labels padded with `PADDING` to `max_digits` rows (KerasHub's dense format)."""
    padded_boxes = np.full((max_digits, 4), PADDING, np.float32)
    padded_labels = np.full((max_digits,), PADDING, np.int32)
    padded_boxes[: len(boxes)] = boxes
    padded_labels[: len(labels)] = labels
    return padded_boxes, padded_labels


class CanvasSource:
    """The digit scans of both splits and the canvases a recipe draws from them."""

    def __init__(self, recipe):
        from keras_coat.datasets import digits_split

        self.recipe = recipe
        self.train_scans, self.held_out_scans, self.train_labels, self.held_out_labels = (
            digits_split()
        )

    def _canvas(self, rng, scans, labels):
        r = self.recipe
        return make_canvas(rng, scans, labels, r.canvas_size, r.max_digits, r.digit_sizes)

    def train_canvas(self, seed, epoch, index):
        rng = np.random.default_rng([seed, epoch, index])
        return self._canvas(rng, self.train_scans, self.train_labels)

    def held_out(self, count=None):
        """(uint8 [count, S, S, 3] images, [boxes], [labels]) of the held-out canvases."""
        count = self.recipe.held_out_canvases if count is None else count
        canvases = [
            self._canvas(
                np.random.default_rng([HELD_OUT_SEED, i]), self.held_out_scans, self.held_out_labels
            )
            for i in range(count)
        ]
        size = self.recipe.canvas_size
        images = np.stack([c[0] for c in canvases]) if canvases else np.zeros((0, size, size, 3))
        return images, [c[1] for c in canvases], [c[2] for c in canvases]

    def train_dataset(self, seed, start_epoch=0, start_step=0, end_epoch=None, steps=None):
        """Batches of (float32 images in [0, 255], {"boxes", "labels"} padded with -1) for epochs
        `start_epoch` .. `end_epoch - 1` (default: the recipe's last), `steps` batches each
        (default `recipe.steps_per_epoch`), the first from its batch `start_step` on: the
        canvases of epoch e, batch b are the same whatever the start."""
        import tensorflow as tf

        r = self.recipe
        steps = r.steps_per_epoch if steps is None else steps
        end_epoch = r.epochs if end_epoch is None else end_epoch
        if not 0 <= start_step < steps or not start_epoch + bool(start_step) <= end_epoch:
            raise ValueError(
                f"train_dataset: start_step {start_step} of {steps} steps per epoch, epochs "
                f"{start_epoch}..{end_epoch}."
            )

        def draw(epoch, index):
            image, boxes, labels = self.train_canvas(seed, int(epoch), int(index))
            return (image.astype(np.float32), *pad_targets(boxes, labels, r.max_digits))

        def example(epoch, index):
            image, boxes, labels = tf.numpy_function(
                draw, [epoch, index], (tf.float32, tf.float32, tf.int32), stateful=False
            )
            image = tf.ensure_shape(image, (r.canvas_size, r.canvas_size, 3))
            boxes = tf.ensure_shape(boxes, (r.max_digits, 4))
            labels = tf.ensure_shape(labels, (r.max_digits,))
            return image, {"boxes": boxes, "labels": labels}

        def canvases(epoch, first):  # one epoch's canvases from index `first` on
            indices = tf.data.Dataset.range(first, steps * r.batch_size)
            return indices.map(
                lambda i: example(epoch, i), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )  # fmt: skip

        epochs = tf.data.Dataset.range(start_epoch, end_epoch)
        dataset = epochs.flat_map(
            lambda e: canvases(e, tf.cast(e == start_epoch, tf.int64) * start_step * r.batch_size)
        )
        dataset = dataset.batch(r.batch_size, drop_remainder=True)
        count = (end_epoch - start_epoch) * steps - start_step
        return dataset.apply(tf.data.experimental.assert_cardinality(count)).prefetch(
            tf.data.AUTOTUNE
        )


# ---------------------------------------------------------------------------------- detector


def build_detector(recipe, model_config=None):
    """A `keras_hub.models.RetinaNetObjectDetector` on a CoaT backbone for 10 digit classes.

    Images are float pixels in [0, 255] (the CoaT backbone normalizes them); boxes are "xyxy"
    pixels. The backbone is `recipe.model`, or `keras_coat.CoaT(**model_config)`; its weights
    (`recipe.init_weights`): None (random), "imagenet", a `.weights.h5` of a CoaT model of the
    same variant, or a `.keras` CoaT classifier (e.g. `make demo`'s demo-output/last.keras),
    whose backbone weights are taken (every layer but the classifier).
    """
    import keras_hub

    import keras_coat

    r = recipe
    init_weights = r.init_weights
    shape = (r.canvas_size, r.canvas_size, 3)
    from_file = init_weights if init_weights not in (None, "imagenet") else None
    if from_file is not None and not str(from_file).endswith((".keras", ".weights.h5")):
        raise ValueError(
            f"init_weights must be 'imagenet', a .weights.h5 file or a .keras CoaT model; "
            f"received {init_weights!r}."
        )
    weights = init_weights if from_file is None or from_file.endswith(".weights.h5") else None
    if model_config is not None:
        encoder = keras_coat.CoaT(
            **model_config, include_top=False, input_shape=shape, weights=weights
        )
    else:
        encoder = keras_coat.create_model(
            r.model, include_top=False, input_shape=shape, weights=weights
        )
    if from_file is not None and from_file.endswith(".keras"):
        copy_backbone_weights(keras_coat.load_model(from_file, compile=False), encoder)

    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=encoder,
        min_level=r.min_level,
        max_level=r.max_level,
        use_p5=False,
        image_shape=shape,
    )
    anchors = keras_hub.layers.AnchorGenerator(
        "xyxy",
        min_level=r.min_level,
        max_level=r.max_level,
        num_scales=r.anchor_scales,
        aspect_ratios=list(r.aspect_ratios),
        anchor_size=r.anchor_size,
    )
    detector = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone,
        num_classes=len(CLASS_NAMES),
        bounding_box_format="xyxy",
        anchor_generator=anchors,
        pre_logits_num_conv_layers=r.head_conv_layers,
        # COCO evaluation ranks every detection: keep those down to a low score.
        prediction_decoder=keras_hub.layers.NonMaxSuppression(
            bounding_box_format="xyxy",
            from_logits=True,
            iou_threshold=0.5,
            confidence_threshold=0.05,
            max_detections=20 * r.max_digits,
        ),
    )
    _initialize_heads(detector)
    return detector


def _initialize_heads(detector, prior_probability=0.01, stddev=0.01):
    """RetinaNet's initialization of its two heads (Lin et al. 2017, section 4.1): every conv
    layer drawn from N(0, 0.01) with zero biases, except the class head's output biases, which
    start every anchor at the prior probability of an object.

    KerasHub 0.32 draws from N(0, 0.05) and gives the prior bias to the box head instead of the
    class head: on CoaT's features every anchor then starts with confident random classes and
    boxes many anchor sizes away, which costs much of a short training.
    """
    import keras

    for head in (detector.box_head, detector.classification_head):
        for conv in [*head.conv_layers, head.prediction_layer]:
            conv.kernel.assign(
                keras.random.normal(conv.kernel.shape, stddev=stddev, seed=len(conv.name))
            )
            if conv.bias is not None:
                conv.bias.assign(keras.ops.zeros(conv.bias.shape))
    class_bias = detector.classification_head.prediction_layer.bias
    prior_logit = -math.log((1 - prior_probability) / prior_probability)
    class_bias.assign(keras.ops.full(class_bias.shape, prior_logit))


def copy_backbone_weights(source, target):
    """Gives the CoaT model `target` the backbone weights of the CoaT model `source` (a saved
    classifier); CoaT's weights fit every input size. Fails before changing anything if the
    backbones are of different variants."""
    shapes = [tuple(w.shape) for w in source.backbone.weights]
    if shapes != [tuple(w.shape) for w in target.backbone.weights]:
        raise ValueError(
            f"The backbone of {source.name!r} does not fit that of {target.name!r}: init weights "
            "must come from a model of the same CoaT variant."
        )
    target.backbone.set_weights(source.backbone.get_weights())


def compile_detector(detector, recipe, steps_per_epoch=None, jit_compile=None):
    """The recipe's optimizer (`training.optim`: AdamW, warm-up then cosine, no weight decay on
    norms and biases) and RetinaNet's losses."""
    import keras

    from training import optim

    steps = recipe.steps_per_epoch if steps_per_epoch is None else steps_per_epoch
    detector.compile(
        optimizer=optim.build_optimizer(recipe, steps),
        # Smooth L1 with beta 0.1 on the box deltas, as Detectron2's RetinaNet: KerasHub's default
        # Huber(delta=1) sees deltas of ~0.1 and barely moves the boxes.
        box_loss=keras.losses.Huber(delta=BOX_LOSS_BETA, reduction="sum"),
        loss_weights={"bbox_regression": 1 / BOX_LOSS_BETA, "cls_logits": 1.0},
        jit_compile="auto" if jit_compile is None else jit_compile,
    )
    return detector


def detect(detector, images, batch_size=32):
    """Per image: (float32 [k, 4] xyxy boxes, int [k] labels, float32 [k] scores)."""
    import tensorflow as tf

    images = np.asarray(images, np.float32)
    count = len(images)
    batch_size = max(1, min(batch_size, count))
    # KerasHub's NonMaxSuppression needs a static batch size: pad to full batches.
    padded = math.ceil(count / batch_size) * batch_size
    images = np.concatenate([images, np.zeros((padded - count, *images.shape[1:]), np.float32)])
    batches = tf.data.Dataset.from_tensor_slices(images).batch(batch_size, drop_remainder=True)
    outputs = detector.predict(batches, verbose=0)
    return [
        (
            outputs["boxes"][i, :found].astype(np.float32),
            outputs["labels"][i, :found].astype(np.int64),
            outputs["confidence"][i, :found].astype(np.float32),
        )
        for i, found in enumerate(np.asarray(outputs["num_detections"][:count]).astype(int))
    ]


# -------------------------------------------------------------------------------- evaluation


def coco_evaluate(true_boxes, true_labels, detections, num_classes=len(CLASS_NAMES)):
    """COCO box mAP of `detections` against the ground truth, with pycocotools.

    true_boxes / true_labels: per image, [n, 4] xyxy pixel boxes and [n] class ids.
    detections: per image, (boxes [k, 4] xyxy, labels [k], scores [k]).
    Returns {"map": mAP@[.5:.95], "map50": mAP@0.5, "map75", "mar100"} (-1 where undefined, as
    pycocotools reports a metric with no ground truth).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not len(true_boxes) == len(true_labels) == len(detections):
        raise ValueError(
            f"coco_evaluate: {len(true_boxes)} box lists, {len(true_labels)} label lists and "
            f"{len(detections)} detection lists; one of each per image is needed."
        )
    ground_truth = {
        "images": [{"id": i + 1} for i in range(len(true_boxes))],
        "categories": [{"id": c, "name": str(c)} for c in range(num_classes)],
        "annotations": [],
    }
    results = []
    for image_id, (boxes, labels, (found, found_labels, scores)) in enumerate(
        zip(true_boxes, true_labels, detections), start=1
    ):
        for box, label in zip(np.asarray(boxes, np.float64), labels):
            ground_truth["annotations"].append(
                {
                    "id": len(ground_truth["annotations"]) + 1,  # COCOeval needs ids >= 1
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": _xywh(box),
                    "area": float((box[2] - box[0]) * (box[3] - box[1])),
                    "iscrowd": 0,
                }
            )
        for box, label, score in zip(np.asarray(found, np.float64), found_labels, scores):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": _xywh(box),
                    "score": float(score),
                }
            )
    if not ground_truth["annotations"]:
        raise ValueError("coco_evaluate: no ground-truth boxes to evaluate against.")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        coco = COCO()
        coco.dataset = ground_truth
        coco.createIndex()
        if not results:
            return {"map": 0.0, "map50": 0.0, "map75": 0.0, "mar100": 0.0}
        evaluation = COCOeval(coco, coco.loadRes(results), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    return {
        "map": float(stats[0]),
        "map50": float(stats[1]),
        "map75": float(stats[2]),
        "mar100": float(stats[8]),
    }


def _xywh(box):
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


# ----------------------------------------------------------------------------------- picture

PICTURE_SCALE = 2  # canvas pixels -> picture pixels
PICTURE_GAP = 8  # pixels between panels
PICTURE_PAIRS_PER_ROW = 2  # (ground truth, detections) pairs side by side
PICTURE_MIN_SCORE = 0.5  # detections drawn
TRUE_COLOR = (80, 220, 80)
FOUND_COLOR = (255, 170, 0)
WRONG_COLOR = (255, 60, 60)


def picture_size(count, canvas_size):
    """(width, height) of the picture of `count` canvases."""
    panel = canvas_size * PICTURE_SCALE
    columns = 2 * min(count, PICTURE_PAIRS_PER_ROW)
    rows = math.ceil(count / PICTURE_PAIRS_PER_ROW)
    return (
        columns * panel + (columns + 1) * PICTURE_GAP,
        rows * panel + (rows + 1) * PICTURE_GAP,
    )


def draw_detections(path, images, true_boxes, true_labels, detections, min_score=None):
    """Writes a PNG grid: each canvas with its true boxes and labels (green), beside the same
    canvas with the detections scoring at least `min_score` (orange; red when no true box of
    that digit overlaps it by IoU >= 0.5). Written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    from keras_coat.utils.files import write_atomically

    min_score = PICTURE_MIN_SCORE if min_score is None else min_score
    if len(images) == 0:
        raise ValueError("draw_detections: no canvases to draw.")
    size = images.shape[1]
    panel = size * PICTURE_SCALE
    picture = Image.new("RGB", picture_size(len(images), size), (40, 40, 40))
    font = ImageFont.load_default(size=13)
    for i, image in enumerate(images):
        row, pair = divmod(i, PICTURE_PAIRS_PER_ROW)
        top = PICTURE_GAP + row * (panel + PICTURE_GAP)
        left = PICTURE_GAP + 2 * pair * (panel + PICTURE_GAP)
        canvas = Image.fromarray(np.asarray(image, np.uint8)).resize(
            (panel, panel), Image.Resampling.NEAREST
        )
        found, found_labels, scores = detections[i]
        keep = np.asarray(scores) >= min_score
        truth = [
            (box, TRUE_COLOR, CLASS_NAMES[int(c)]) for box, c in zip(true_boxes[i], true_labels[i])
        ]
        found = [
            (
                box,
                FOUND_COLOR if _matches(box, c, true_boxes[i], true_labels[i]) else WRONG_COLOR,
                f"{CLASS_NAMES[int(c)]} {s:.2f}",
            )
            for box, c, s in zip(found[keep], found_labels[keep], np.asarray(scores)[keep])
        ]
        for offset, (boxes, title) in enumerate(((truth, "truth"), (found, "detected"))):
            cell = canvas.copy()
            draw = ImageDraw.Draw(cell)
            draw.text((3, panel - 16), title, fill=(160, 160, 160), font=font)
            for box, color, text in boxes:
                x0, y0, x1, y1 = np.clip(np.asarray(box, np.float64), 0, size) * PICTURE_SCALE
                if not (x1 > x0 and y1 > y0):  # outside the canvas, inverted or not finite
                    continue
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=2)
                draw.text((x0 + 2, max(y0 - 15, 0)), text, fill=color, font=font)
            picture.paste(cell, (left + offset * (panel + PICTURE_GAP), top))
    return write_atomically(path, lambda tmp: picture.save(tmp, format="PNG", optimize=True))


def _matches(box, label, true_boxes, true_labels):
    return any(
        int(label) == int(c) and _iou(box, t) >= 0.5 for t, c in zip(true_boxes, true_labels)
    )


def _iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------------------- task

RELOAD_CHECK_CANVASES = 8  # held-out canvases the saved detector is checked on
PICTURE_FILE = "detections.png"


class DetectionTask:
    """`python -m training.train --task detection`: a RetinaNet on a CoaT backbone learns the
    digit canvases of a `DetectionRecipe`; once trained, it is measured with COCO mAP on the
    held-out canvases, checked against its saved file (last.keras) and pictured
    (detections.png). The trainer runs it as it runs `training.train.ClassificationTask`."""

    name = "detection"
    recipe_type = DetectionRecipe
    recipe_module = "training/detection.py"
    best_metric = None  # nothing is validated during training
    # The COCO evaluation runs in one process; several devices of one process are used.
    several_processes = False
    precision = "none"

    @staticmethod
    def add_arguments(group):
        group.add_argument(
            "--show", type=int, default=8, help="held-out canvases in detections.png (0: none)"
        )

    def __init__(self, args):
        from training import recipes

        if args.show < 0:
            raise ValueError(f"--show must be >= 0, got {args.show}.")
        changes = recipes.command_line_overrides(args, DetectionRecipe)
        if args.model_config is not None:
            changes["model"] = "custom"
        elif args.model is not None:
            changes["model"] = args.model
        self.recipe = DetectionRecipe(**changes)
        init = self.recipe.init_weights
        if init not in (None, "imagenet") and not os.path.isfile(init):
            raise ValueError(f"--init-weights: no file {init!r}.")
        self.args = args
        self.canvases = self.steps = None

    @staticmethod
    def completed(metrics):
        return f"held-out mAP@[.5:.95] {metrics.get('map')}, mAP@0.5 {metrics.get('map50')}"

    def load(self):
        self.canvases = CanvasSource(self.recipe)
        cap = self.args.steps_per_epoch
        self.steps = min(self.recipe.steps_per_epoch, cap) if cap else self.recipe.steps_per_epoch

    def train_dataset(self, seed, start_epoch, shard, start_step=0, end_epoch=None):
        return self.canvases.train_dataset(seed, start_epoch, start_step, end_epoch, self.steps)

    def validation_dataset(self, shard):
        return None

    def describe(self):
        r = self.recipe
        return (
            f"RetinaNet on {r.model} (P{r.min_level}-P{r.max_level}), {r.canvas_size}x"
            f"{r.canvas_size} canvases of 1-{r.max_digits} digits, {r.epochs} epochs x "
            f"{self.steps} steps, peak lr {r.peak_lr:.3g}, backbone from "
            f"{r.init_weights or 'random weights'}."
        )

    def build(self):
        detector = build_detector(self.recipe, self.args.model_config)
        return compile_detector(detector, self.recipe, self.steps, self.args.jit_compile)

    def finish(self, model, run):
        """COCO mAP on the held-out canvases, the picture, and the saved detector's check."""
        import keras

        images, true_boxes, true_labels = self.canvases.held_out()
        detections = detect(model, images)
        results = coco_evaluate(true_boxes, true_labels, detections)
        shown = min(self.args.show, len(images))
        if shown and run.chief:
            results["picture"] = draw_detections(
                os.path.join(run.output_dir, PICTURE_FILE), images[:shown], true_boxes,
                true_labels, detections,
            )  # fmt: skip
        # The saved file must give the model that was measured.
        with warnings.catch_warnings():  # the optimizer's state is not loaded: not wanted
            warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
            reloaded = keras.saving.load_model(
                os.path.join(run.work_dir, "last.keras"), compile=False
            )
        sample = images[:RELOAD_CHECK_CANVASES].astype(np.float32)
        results["reload_max_abs_diff"] = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(
                keras.tree.flatten(model(sample)), keras.tree.flatten(reloaded(sample))
            )
        )
        results.update(
            held_out_canvases=len(images),
            held_out_digits=int(sum(len(b) for b in true_boxes)),
        )
        return results

    @staticmethod
    def done(metrics):
        return (
            f"held-out mAP@[.5:.95] {metrics['map']:.3f}, mAP@0.5 {metrics['map50']:.3f} on "
            f"{metrics['held_out_canvases']} canvases ({metrics['held_out_digits']} digits), "
            f"after {metrics['epochs_completed']} epochs; {metrics['images_per_second']:.1f} "
            "images/s; the saved detector gives the same outputs (largest difference "
            f"{metrics['reload_max_abs_diff']:.1e})"
            + (f". Picture of held-out canvases: {metrics['picture']}" if "picture" in metrics
               else "")
        )
