"""Reading PyTorch and safetensors checkpoints into NumPy, without PyTorch.

`read_state_dict(path)` returns ``{name: numpy.ndarray}`` in the layout of the
checkpoint (the authors' / timm names), ready for `keras_coat.convert`.

A ``.pth`` file is a zip archive holding a pickle (``data.pkl``) and one entry
per tensor storage (``data/<key>``). A pickle can name any Python callable and
have it called while loading, so this module never hands the file to
`pickle.load`: `_RestrictedUnpickler.find_class` answers only from an
allowlist of inert stand-ins written here (tensor rebuilders that return lazy
NumPy views, storage types, dtypes, ``OrderedDict`` and a few harmless
containers such as ``argparse.Namespace`` that become opaque records). Any
other global (``os.system``, ``builtins.eval``, a training script's class, ...)
stops the read with `UnsafeCheckpointError` before anything runs. PyTorch is
not imported, whether or not it is installed.
"""

import _compat_pickle
import collections
import json
import os
import pickle
import zipfile
from collections.abc import Mapping

import numpy as np

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "read_state_dict",
    "SUPPORTED_EXTENSIONS",
]

TORCH_EXTENSIONS = (".pth", ".pt", ".bin")
SAFETENSORS_EXTENSIONS = (".safetensors",)
SUPPORTED_EXTENSIONS = TORCH_EXTENSIONS + SAFETENSORS_EXTENSIONS

# Keys under which training scripts nest the model's state dict, most
# specific first (the CoaT authors' checkpoints use "model").
_STATE_DICT_KEYS = ("model", "state_dict")


class CheckpointError(ValueError):
    """The file is not a checkpoint this module can read."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle names a global outside the allowlist; nothing was run."""


def read_state_dict(path):
    """Reads a checkpoint's tensors as NumPy arrays, running nothing from it.

    Args:
        path: a ``.pth`` / ``.pt`` / ``.bin`` file written by ``torch.save``
            (zip format, PyTorch >= 1.6) or a ``.safetensors`` file.

    Returns:
        A dict from tensor name to `numpy.ndarray` (bfloat16 tensors become
        float32). A training checkpoint's state dict is taken from its
        ``"model"`` (or ``"state_dict"``) entry; optimizer state and the like
        are not materialized. A ``module.`` prefix shared by every key
        (``DistributedDataParallel``) is removed.

    Raises:
        FileNotFoundError: no file at `path`.
        UnsafeCheckpointError: the pickle names a callable outside the
            allowlist (the error names it); nothing from the file was run.
        CheckpointError: unknown extension, not a zip-format torch file,
            a damaged archive, or no tensors in the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    lowered = path.lower()
    if lowered.endswith(SAFETENSORS_EXTENSIONS):
        tensors = _read_safetensors(path)
    elif lowered.endswith(TORCH_EXTENSIONS):
        tensors = _read_torch_zip(path)
    else:
        raise CheckpointError(
            f"Cannot tell the format of {path!r} from its extension; expected "
            f"one of {', '.join(SUPPORTED_EXTENSIONS)}."
        )
    if not tensors:
        raise CheckpointError(f"No tensors found in {path!r}.")
    return _strip_common_prefix(tensors, "module.")


# --------------------------------------------------------------------------
# safetensors


def _read_safetensors(path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            names = list(f.keys())
            tensors = {}
            for name in names:
                try:
                    value = f.get_tensor(name)
                except TypeError:  # bfloat16, unless ml_dtypes registered it
                    tensors[name] = None
                    continue
                if value.dtype.name == "bfloat16":
                    value = value.astype(np.float32)
                tensors[name] = value
    except SafetensorError as e:
        raise CheckpointError(f"{path!r} is not a valid safetensors file: {e}") from e
    missing = [name for name, value in tensors.items() if value is None]
    if missing:
        tensors.update(_read_safetensors_bfloat16(path, missing))
    return tensors


def _read_safetensors_bfloat16(path, names):
    """Reads the BF16 tensors `names` as float32 from the raw file layout."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        base = 8 + header_size
        out = {}
        for name in names:
            info = header[name]
            if info["dtype"] != "BF16":
                raise CheckpointError(
                    f"Tensor {name!r} in {path!r} has dtype {info['dtype']}, "
                    "which NumPy cannot represent."
                )
            start, end = info["data_offsets"]
            f.seek(base + start)
            raw = np.frombuffer(f.read(end - start), dtype="<u2")
            out[name] = _bfloat16_bits_to_float32(raw).reshape(info["shape"])
    return out


def _bfloat16_bits_to_float32(bits):
    return (bits.astype("<u4") << 16).view("<f4").astype(np.float32)


# --------------------------------------------------------------------------
# torch zip pickles


def _read_torch_zip(path):
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path!r} is not a zip-format torch checkpoint. Files written by "
            "PyTorch < 1.6 (legacy format) are not supported: re-save it with "
            "a recent torch.save, or convert it to .safetensors."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pickle_name = _find_pickle(archive, path)
            prefix = pickle_name[: -len("data.pkl")]
            loader = _StorageLoader(archive, prefix, _byteorder(archive, prefix))
            with archive.open(pickle_name) as f:
                obj = _RestrictedUnpickler(f, loader).load()
            state_dict = _unwrap_state_dict(obj)
            return {
                name: value.materialize()
                for name, value in state_dict.items()
                if isinstance(value, _LazyTensor)
            }
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from None
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path!r} is damaged or truncated: {e}") from e


def _find_pickle(archive, path):
    names = [n for n in archive.namelist() if n.endswith("data.pkl")]
    # The pickle sits one folder deep ("<archive name>/data.pkl").
    names = [n for n in names if n.count("/") == 1]
    if len(names) != 1:
        raise CheckpointError(
            f"{path!r} is a zip file but not a torch checkpoint "
            f"(expected one '<name>/data.pkl', found {len(names)})."
        )
    return names[0]


def _byteorder(archive, prefix):
    try:
        order = archive.read(prefix + "byteorder").decode("ascii").strip()
    except KeyError:
        return "little"  # written before the entry existed, on little-endian hosts
    if order not in ("little", "big"):
        raise CheckpointError(f"Unknown byte order {order!r} in the checkpoint.")
    return order


class _StorageType:
    """Stands in for ``torch.FloatStorage`` and friends: only a dtype."""

    def __init__(self, name, dtype):
        self.name = name
        self.dtype = dtype  # a NumPy dtype string, or "bfloat16"

    def __repr__(self):
        return f"torch.{self.name}"


class _Dtype:
    """Stands in for ``torch.float32`` and friends."""

    def __init__(self, name, dtype):
        self.name = name
        self.dtype = dtype

    def __repr__(self):
        return f"torch.{self.name}"


# torch storage class -> element type (little-endian; swapped for "big").
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "<c8",
    "ComplexDoubleStorage": "<c16",
    "UntypedStorage": "u1",
}
_TORCH_DTYPES = {
    "float64": "<f8",
    "double": "<f8",
    "float32": "<f4",
    "float": "<f4",
    "float16": "<f2",
    "half": "<f2",
    "bfloat16": "bfloat16",
    "int64": "<i8",
    "long": "<i8",
    "int32": "<i4",
    "int": "<i4",
    "int16": "<i2",
    "short": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
    "complex64": "<c8",
    "complex128": "<c16",
}


def _itemsize(dtype):
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


class _StorageRef:
    """A storage named by the pickle; its bytes are read on first use."""

    def __init__(self, loader, key, storage_type, numel):
        self.loader = loader
        self.key = key
        self.storage_type = storage_type
        self.numel = numel

    def elements(self, dtype):
        """The storage as a flat NumPy array of `dtype`."""
        return self.loader.load(self, dtype)


class _StorageLoader:
    def __init__(self, archive, prefix, byteorder):
        self.archive = archive
        self.prefix = prefix
        self.byteorder = byteorder
        self.cache = {}

    def load(self, ref, dtype):
        cache_key = (ref.key, dtype)
        if cache_key not in self.cache:
            try:
                raw = self.archive.read(f"{self.prefix}data/{ref.key}")
            except KeyError:
                raise CheckpointError(f"Storage {ref.key!r} is missing from the archive.") from None
            storage_dtype = "<u2" if dtype == "bfloat16" else dtype
            array = np.frombuffer(raw, dtype=storage_dtype)
            if self.byteorder == "big" and array.dtype.itemsize > 1:
                array = array.byteswap()
            if dtype == "bfloat16":
                array = _bfloat16_bits_to_float32(array)
            self.cache[cache_key] = array
        return self.cache[cache_key]


class _LazyTensor:
    """A tensor the pickle rebuilds; NumPy data is read by `materialize`."""

    def __init__(self, storage, offset, size, stride, dtype=None, metadata=None):
        if not isinstance(storage, _StorageRef):
            raise CheckpointError("A tensor in the checkpoint has no storage.")
        if not isinstance(storage.storage_type, _StorageType):
            raise CheckpointError("A tensor storage has an unknown type.")
        self.storage = storage
        self.dtype = dtype.dtype if dtype is not None else storage.storage_type.dtype
        self.offset = _int(offset)
        self.size = tuple(_int(s) for s in size)
        self.stride = tuple(_int(s) for s in stride)
        self.metadata = metadata or {}
        if len(self.size) != len(self.stride):
            raise CheckpointError("A tensor's size and stride differ in length.")

    @property
    def shape(self):
        return self.size

    def materialize(self):
        flat = self.storage.elements(self.dtype)
        if any(s < 0 for s in self.size + self.stride) or self.offset < 0:
            raise CheckpointError("A tensor has a negative size, stride or offset.")
        if 0 in self.size:
            return np.zeros(self.size, dtype=flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= flat.size:
            raise CheckpointError(
                f"A tensor of shape {self.size} reaches element {last} of a "
                f"storage holding {flat.size}: the checkpoint is damaged."
            )
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        array = np.array(view, copy=True)
        if self.metadata.get("neg"):
            array = -array
        if self.metadata.get("conj"):
            array = np.conj(array)
        return array


def _int(value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"Expected an integer in a tensor header, got {value!r}.")
    return value


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    return _LazyTensor(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(
    storage,
    storage_offset,
    size,
    stride,
    requires_grad,
    backward_hooks,
    dtype,
    metadata=None,
):
    if not isinstance(dtype, _Dtype):
        raise CheckpointError(f"Unknown tensor dtype {dtype!r} in the checkpoint.")
    return _LazyTensor(storage, storage_offset, size, stride, dtype, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


class _Opaque:
    """An inert record standing in for a harmless class named by the pickle.

    Calling it, constructing it with ``__new__`` or restoring its state only
    stores the arguments; the real class is never imported or called.
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args = args
        self.state = None
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<opaque {self.qualname}>"


def _opaque(qualname):
    return type("Opaque", (_Opaque,), {"qualname": qualname})


_TENSOR_TYPES = ("torch.Tensor", "torch.nn.parameter.Parameter")


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDERS or getattr(new_type, "qualname", None) not in _TENSOR_TYPES:
        raise UnsafeCheckpointError(
            f"Refusing to rebuild a tensor of type {new_type!r} with {func!r}."
        )
    return func(*args)


def _codecs_encode(text, encoding="utf-8"):
    # protocol-2 pickles write bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("Unexpected arguments to _codecs.encode.")
    return text.encode("latin1")


_REBUILDERS = (
    _rebuild_tensor,
    _rebuild_tensor_v2,
    _rebuild_tensor_v3,
    _rebuild_parameter,
    _rebuild_parameter_with_state,
)


def _allowed_globals():
    allowed = {
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "builtins.slice": slice,
        "builtins.bytearray": bytearray,
        "_codecs.encode": _codecs_encode,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[f"torch.{name}"] = _StorageType(name, dtype)
    allowed["torch.storage.UntypedStorage"] = allowed["torch.UntypedStorage"]
    for name, dtype in _TORCH_DTYPES.items():
        allowed[f"torch.{name}"] = _Dtype(name, dtype)
    # Harmless objects found beside state dicts in training checkpoints
    # (the authors' "args" is an argparse.Namespace): kept as opaque records.
    for qualname in (
        "argparse.Namespace",
        "torch.device",
        "torch.Size",
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "numpy.dtype",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
    ):
        allowed[qualname] = _opaque(qualname)
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only build what `_ALLOWED_GLOBALS` offers."""

    def __init__(self, file, loader):
        super().__init__(file)
        self._loader = loader

    def find_class(self, module, name):
        # Protocol-2 pickles name Python 2 modules ("__builtin__.set"); map
        # them as pickle's fix_imports does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualname = f"{module}.{name}"
        try:
            return _ALLOWED_GLOBALS[qualname]
        except KeyError:
            raise UnsafeCheckpointError(
                f"The checkpoint's pickle refers to {qualname!r}, which is not "
                "needed to rebuild tensors; refusing to load it (nothing from "
                "the file was run). Only load checkpoints from sources you "
                "trust, or convert them to .safetensors."
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"Unknown persistent id {pid!r} in the checkpoint.")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"Unknown storage type {storage_type!r}.")
        if not isinstance(key, str) or "/" in key or key.startswith("."):
            raise CheckpointError(f"Bad storage key {key!r} in the checkpoint.")
        return _StorageRef(self._loader, key, storage_type, _int(numel))


def _unwrap_state_dict(obj):
    """The state dict inside a training checkpoint, or `obj` itself."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"Expected the checkpoint to hold a dict, found {type(obj).__name__}."
        )
    for key in _STATE_DICT_KEYS:
        nested = obj.get(key)
        if isinstance(nested, Mapping) and any(isinstance(v, _LazyTensor) for v in nested.values()):
            return nested
    if not any(isinstance(v, _LazyTensor) for v in obj.values()):
        raise CheckpointError(
            "No tensors found at the top level of the checkpoint or under "
            f"{' / '.join(repr(k) for k in _STATE_DICT_KEYS)}; top-level keys: "
            f"{sorted(map(str, obj.keys()))}."
        )
    return obj


def _strip_common_prefix(tensors, prefix):
    if tensors and all(name.startswith(prefix) for name in tensors):
        return {name[len(prefix) :]: value for name, value in tensors.items()}
    return tensors
