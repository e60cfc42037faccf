"""What the export formats are, without TensorFlow: their names, precisions and file endings,
and the `ExportResult` an export returns.

Importing this module costs nothing on any backend (`keras_coat.export.any_backend` checks
arguments and returns results with it in processes that never load TensorFlow).
"""

import dataclasses

# The formats, each with the precisions it offers (the first is the default).
PRECISIONS = {
    "saved_model": ("float32",),
    "litert": ("float32", "dynamic_int8", "int8"),
    "onnx": ("float32",),
    "openvino": ("float32", "bfloat16"),
}
FORMATS = tuple(PRECISIONS)
# The file a file format writes ends so; OpenVINO's weights go beside it with WEIGHTS_SUFFIX.
SUFFIXES = {"litert": ".tflite", "onnx": ".onnx", "openvino": ".xml"}
OPENVINO_WEIGHTS_SUFFIX = ".bin"
LABELS_SUFFIX = ".labels.txt"
# Held-out images the top-1 agreement of a reduced-precision export is measured on, at most.
HELD_OUT_IMAGES = 360


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how it compared with the Keras model in its runtime.

    ``max_abs_diff``: the largest probability difference on the verification images;
    ``top1_agreement``: the share of ``held_out`` images whose top-1 class is the Keras model's
    (reduced precisions only). An ``ExportResult`` is an ``os.PathLike`` of ``path``.
    """

    path: str
    files: tuple
    format: str
    precision: str
    max_abs_diff: float | None = None
    top1_agreement: float | None = None
    held_out: int = 0

    def __fspath__(self):
        return self.path

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields):
        return cls(**{**fields, "files": tuple(fields["files"])})
