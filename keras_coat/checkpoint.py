"""Reading PyTorch and safetensors checkpoints into NumPy, without PyTorch.

`read_state_dict(path)` returns ``{name: numpy.ndarray}`` in the layout of the
checkpoint (the authors' / timm names), ready for `keras_coat.convert`.

A ``.pth`` file is a zip archive holding a pickle (``data.pkl``) and one entry
per tensor storage (``data/<key>``). A pickle can name any Python callable and
have it called while loading, so this module never hands the file to
`pickle`: it checks the whole opcode stream first (only the protocol-2 opcodes
``torch.save`` writes, only globals from an allowlist), then runs it on a small
stack machine of its own whose globals are inert stand-ins made afresh for
each file (tensor rebuilders that record where the data lies, storage types,
dtypes, ``OrderedDict``, and opaque records for harmless classes such as the
authors' ``argparse.Namespace``). Nothing it builds outlives the call or is
shared between calls, and every allocation is bounded by bytes present in the
file. PyTorch is not imported, whether or not it is installed.
"""

import _compat_pickle
import collections
import json
import math
import os
import pickletools
import re
import reprlib
import struct
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np

from keras_coat.presets import PresetError

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

# Limits (README, "Safe checkpoint reading"). A CoaT checkpoint's pickle is
# well under 1 MiB and a few ten thousand opcodes, its header a few KiB.
MAX_PICKLE_BYTES = 16 * 2**20
MAX_PICKLE_OPCODES = 1_000_000
MAX_SAFETENSORS_HEADER_BYTES = 4 * 2**20
# Dict keys and set items must be of these types (ints below 2**61 - 1, whose
# hashes are all distinct): hashing or comparing nested keys recurses in C,
# and ints, tuples or frozensets crafted to share one hash would make every
# insertion scan all the others (quadratic time).
_KEY_TYPES = (str, bytes, int, float, bool, type(None))
_MAX_KEY_INT = 2**61 - 1
_MAX_NDIM = 32
# An empty tensor's other dimensions cost nothing, but NumPy refuses shapes
# whose product overflows.
_MAX_EMPTY_SHAPE_PRODUCT = 2**40
# Decompressed zip entries may hold at most this many times the file's size
# (torch.save stores entries uncompressed; this allows re-zipped files).
MAX_INFLATE_RATIO = 16
# The tensors returned may hold at most this many times the bytes of the
# storages in the file (bfloat16 doubles on the way to float32; views of one
# storage may overlap each other), plus a small allowance.
MAX_OUTPUT_RATIO = 4
_OUTPUT_ALLOWANCE = 2**20


class CheckpointError(PresetError):
    """The file is not a checkpoint this module can read."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle uses an opcode or global outside the allowlist; nothing was run."""


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
        UnsafeCheckpointError: the pickle uses an opcode or names a global
            outside the allowlist (the error names it); nothing from the file
            was run.
        CheckpointError: unknown extension, a legacy-format torch file, a
            damaged, truncated or oversized file, or no tensors in it. Every
            error names `path`.
    """
    path = os.fsdecode(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    lowered = path.lower()
    if lowered.endswith(SAFETENSORS_EXTENSIONS):
        reader = _read_safetensors
    elif lowered.endswith(TORCH_EXTENSIONS):
        reader = _read_torch_zip
    else:
        raise CheckpointError(
            f"Cannot tell the format of {path!r} from its extension; expected "
            f"one of {', '.join(SUPPORTED_EXTENSIONS)}."
        )
    try:
        tensors = reader(path)
        if not tensors:
            raise CheckpointError("no tensors found in the file.")
    except CheckpointError as e:
        raise type(e)(f"{path!r}: {e}") from e
    return _strip_common_prefix(tensors, "module.")


def _short(value):
    """A bounded repr of a value built from the file, for error messages."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an integer with more digits than str() allows
        return f"<{type(value).__name__}>"


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = 60


# --------------------------------------------------------------------------
# safetensors

# safetensors dtype -> (NumPy dtype of the stored bytes, NumPy dtype returned).
_SAFETENSORS_DTYPES = {
    "BOOL": ("?", "?"),
    "U8": ("u1", "u1"),
    "I8": ("i1", "i1"),
    "U16": ("<u2", "u2"),
    "I16": ("<i2", "i2"),
    "U32": ("<u4", "u4"),
    "I32": ("<i4", "i4"),
    "U64": ("<u8", "u8"),
    "I64": ("<i8", "i8"),
    "F16": ("<f2", "f2"),
    "BF16": ("<u2", "f4"),
    "F32": ("<f4", "f4"),
    "F64": ("<f8", "f8"),
    "C64": ("<c8", "c8"),
}


def _read_safetensors(path):
    """Reads a safetensors file; the `safetensors` library checks its layout.

    The library refuses oversized headers, offsets outside the file,
    overlapping or uncovered byte ranges and sizes that disagree with shape
    and dtype. This function adds a smaller header cap, refuses duplicate
    names (the library keeps the last one silently) and turns bytes into
    NumPy arrays itself, so dtypes NumPy lacks are a clear error whatever
    else the process has imported.
    """
    import safetensors

    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise CheckpointError(f"not a safetensors file ({len(data)} bytes, no header).")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(MAX_SAFETENSORS_HEADER_BYTES, len(data) - 8):
        raise CheckpointError(
            f"not a valid safetensors file: its header claims {header_size} bytes; the "
            f"file holds {len(data)} and headers may have at most "
            f"{MAX_SAFETENSORS_HEADER_BYTES}."
        )
    try:
        json.loads(data[8 : 8 + header_size], object_pairs_hook=_refuse_duplicate_keys)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"not a valid safetensors file: bad header: {e}") from e
    try:
        entries = safetensors.deserialize(data)
    except safetensors.SafetensorError as e:
        raise CheckpointError(f"not a valid safetensors file: {e}") from e
    del data
    tensors = {}
    for name, entry in entries:
        dtype = entry["dtype"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} has dtype {dtype}, which NumPy cannot represent; "
                f"readable dtypes: {', '.join(_SAFETENSORS_DTYPES)}."
            )
        stored, returned = _SAFETENSORS_DTYPES[dtype]
        array = np.frombuffer(entry["data"], dtype=stored).reshape(entry["shape"])
        if dtype == "BF16":
            array = _bfloat16_bits_to_float32(array)
        tensors[name] = array.astype(returned, copy=False)
    return tensors


def _refuse_duplicate_keys(pairs):
    result = dict(pairs)
    if len(result) != len(pairs):
        counts = collections.Counter(key for key, _ in pairs)
        duplicates = sorted(key for key, count in counts.items() if count > 1)
        raise ValueError(f"duplicate names {_short(duplicates)}")
    return result


def _bfloat16_bits_to_float32(bits):
    return (bits.astype("<u4") << 16).view("<f4").astype(np.float32)


# --------------------------------------------------------------------------
# torch zip archives

# What zipfile raises for damaged archives and entries: a bad directory or
# CRC, a corrupt deflate stream, a short file, bad offsets or field values.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    struct.error,
    OverflowError,
    NotImplementedError,
)
# Magic number of the legacy (PyTorch < 1.6) format, pickled as a LONG1.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
# zip general-purpose flags zipfile cannot read safely: encrypted (bit 0),
# compressed patched data (bit 5), strong encryption (bit 6).
_UNREADABLE_ZIP_FLAGS = 0x1 | 0x20 | 0x40
_STORAGE_KEY = re.compile(r"[0-9A-Za-z_]{1,64}")


def _read_torch_zip(path):
    try:
        is_zip = zipfile.is_zipfile(path)
    except _ZIP_ERRORS as e:  # a damaged end record can raise here too
        raise CheckpointError(f"damaged zip archive: {e}") from e
    if not is_zip:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            raise CheckpointError(
                "written by PyTorch < 1.6 (legacy format), which is not supported: re-save it "
                "with a recent torch.save, or convert it to .safetensors."
            )
        raise CheckpointError("not a zip-format torch checkpoint (no zip directory found).")
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"damaged zip archive: {e}") from e
    with archive:
        infos = _checked_entries(archive, os.path.getsize(path))
        pickle_info = _find_pickle(infos)
        prefix = pickle_info.filename[: -len("data.pkl")]
        if pickle_info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(
                f"its pickle has {pickle_info.file_size} bytes; at most {MAX_PICKLE_BYTES} "
                "are read."
            )
        loader = _StorageLoader(archive, infos, prefix)
        obj = _Unpickler(_read_entry(archive, pickle_info), loader).load()
        state_dict = _unwrap_state_dict(obj)
        return {
            name: value.materialize()
            for name, value in state_dict.items()
            if isinstance(value, _LazyTensor)
        }


def _checked_entries(archive, file_size):
    """The archive's entries by name, once their declared sizes are plausible."""
    infos = {}
    total_compressed = total_size = 0
    for info in archive.infolist():
        name = info.filename
        if name in infos:
            raise CheckpointError(f"the archive holds {name!r} twice.")
        if info.flag_bits & _UNREADABLE_ZIP_FLAGS:
            raise CheckpointError(f"entry {name!r} is encrypted or patched.")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(
                f"entry {name!r} uses zip compression method {info.compress_type}; only "
                "stored (0) and deflated (8) entries are read."
            )
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise CheckpointError(f"entry {name!r} is stored but its two sizes differ.")
        infos[name] = info
        total_compressed += info.compress_size
        total_size += info.file_size
    if total_compressed > file_size:
        raise CheckpointError(
            f"its entries claim {total_compressed} compressed bytes in a {file_size}-byte "
            "file (overlapping or false sizes)."
        )
    if total_size > MAX_INFLATE_RATIO * file_size:
        raise CheckpointError(
            f"its entries claim {total_size} bytes once decompressed, more than "
            f"{MAX_INFLATE_RATIO} times the file's {file_size} bytes."
        )
    return infos


def _read_entry(archive, info):
    """The bytes of one entry, whose declared size was checked."""
    try:
        return archive.read(info)
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"entry {info.filename!r} is damaged: {e}") from e


def _find_pickle(infos):
    # The pickle sits one folder deep ("<archive name>/data.pkl").
    names = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(names) != 1:
        raise CheckpointError(
            f"a zip file but not a torch checkpoint (expected one '<name>/data.pkl', "
            f"found {len(names)})."
        )
    return infos[names[0]]


class _StorageType:
    """Stands in for ``torch.FloatStorage`` and friends; immutable."""

    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)  # a NumPy dtype string, or "bfloat16"

    def __setattr__(self, name, value):
        raise AttributeError(f"{self!r} is read-only")

    def __repr__(self):
        return f"torch.{self.name}"


class _Dtype(_StorageType):
    """Stands in for ``torch.float32`` and friends; immutable."""

    __slots__ = ()


# torch storage class -> element type (little-endian; read as big-endian
# where the archive says so).
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
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "bool": "?",
    "complex64": "<c8",
    "complex128": "<c16",
}


def _stored_dtype(dtype, byteorder):
    """The NumPy dtype of the bytes in the file for a stand-in's dtype."""
    stored = np.dtype("<u2" if dtype == "bfloat16" else dtype)
    return stored.newbyteorder(">") if byteorder == "big" and stored.itemsize > 1 else stored


class _StorageRef:
    """A storage named by the pickle: an archive entry of checked size."""

    __slots__ = ("loader", "key", "nbytes", "dtype")

    def __init__(self, loader, key, nbytes, dtype):
        self.loader = loader
        self.key = key
        self.nbytes = nbytes
        self.dtype = dtype


class _StorageLoader:
    """Reads storages from one archive, and bounds what is built from them."""

    def __init__(self, archive, infos, prefix):
        self.archive = archive
        self.infos = infos
        self.prefix = prefix
        self.byteorder = self._byteorder()
        self.cache = {}
        stored = sum(
            info.file_size for name, info in infos.items() if name.startswith(prefix + "data/")
        )
        self.output_budget = MAX_OUTPUT_RATIO * stored + _OUTPUT_ALLOWANCE

    def _byteorder(self):
        info = self.infos.get(self.prefix + "byteorder")
        if info is None:
            return "little"  # written before the entry existed, on little-endian hosts
        order = _read_entry(self.archive, info) if info.file_size <= 16 else b"?"
        order = order.decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise CheckpointError(f"unknown byte order {_short(order)} in the checkpoint.")
        return order

    def storage(self, pid):
        """The storage a persistent id names, checked against its entry."""
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"unknown persistent id {_short(pid)} in the pickle.")
        _, storage_type, key, location, numel = pid
        if type(storage_type) is not _StorageType:
            raise CheckpointError(f"unknown storage type {_short(storage_type)}.")
        if type(key) is not str or not _STORAGE_KEY.fullmatch(key):
            raise CheckpointError(f"bad storage key {_short(key)} in the pickle.")
        if type(location) is not str:
            raise CheckpointError(f"bad storage location {_short(location)} in the pickle.")
        info = self.infos.get(f"{self.prefix}data/{key}")
        if info is None:
            raise CheckpointError(f"storage {key!r} is missing from the archive.")
        nbytes = _int(numel) * _stored_dtype(storage_type.dtype, "little").itemsize
        if nbytes != info.file_size:
            raise CheckpointError(
                f"storage {key!r} should hold {numel} x {storage_type.name} = {nbytes} bytes; "
                f"its entry holds {info.file_size}."
            )
        return _StorageRef(self, key, nbytes, storage_type.dtype)

    def raw(self, key):
        if key not in self.cache:
            self.cache[key] = _read_entry(self.archive, self.infos[f"{self.prefix}data/{key}"])
        return self.cache[key]

    def charge(self, nbytes):
        if nbytes > self.output_budget:
            raise CheckpointError(
                "its tensors would take more memory than the storages in the file can hold "
                f"(more than {MAX_OUTPUT_RATIO} times their size)."
            )
        self.output_budget -= nbytes


class _LazyTensor:
    """A tensor the pickle rebuilds; its data is read by `materialize`."""

    __slots__ = ("storage", "dtype", "offset", "size", "stride", "negate", "conjugate")

    def __init__(self, storage, offset, size, stride, dtype=None, metadata=None):
        if type(storage) is not _StorageRef:
            raise CheckpointError("a tensor in the pickle has no storage.")
        if dtype is not None and type(dtype) is not _Dtype:
            raise CheckpointError(f"unknown tensor dtype {_short(dtype)} in the pickle.")
        if type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride):
            raise CheckpointError(
                f"a tensor's size {_short(size)} and stride {_short(stride)} are not two "
                "tuples of one length."
            )
        if len(size) > _MAX_NDIM:
            raise CheckpointError(f"a tensor has {len(size)} dimensions; at most {_MAX_NDIM}.")
        if metadata is not None and not isinstance(metadata, dict):
            raise CheckpointError(f"bad tensor metadata {_short(metadata)} in the pickle.")
        self.storage = storage
        self.dtype = dtype  # a _Dtype, or None: the storage's own type
        self.offset = _int(offset)
        self.size = tuple(_int(s) for s in size)
        self.stride = tuple(_int(s) for s in stride)
        self.negate = bool((metadata or {}).get("neg"))
        self.conjugate = bool((metadata or {}).get("conj"))

    def materialize(self):
        """The tensor as a new NumPy array, once its layout is proven inside its storage."""
        loader = self.storage.loader
        dtype = self.dtype.dtype if self.dtype is not None else self.storage.dtype
        stored = _stored_dtype(dtype, loader.byteorder)
        returned = np.dtype(np.float32 if dtype == "bfloat16" else stored.newbyteorder("="))
        if self.storage.nbytes % stored.itemsize:
            raise CheckpointError(
                f"a storage of {self.storage.nbytes} bytes does not hold whole {dtype} elements."
            )
        count = self.storage.nbytes // stored.itemsize
        if any(s < 0 for s in self.size) or self.offset < 0:
            raise CheckpointError(f"a tensor has a negative size {self.size} or offset.")
        numel = math.prod(self.size)
        if numel == 0:
            if math.prod(max(s, 1) for s in self.size) > _MAX_EMPTY_SHAPE_PRODUCT:
                raise CheckpointError(f"an empty tensor has an absurd shape {self.size}.")
            return np.zeros(self.size, dtype=returned)
        extent = _extent(self.size, self.stride)
        if self.offset + extent > count:
            raise CheckpointError(
                f"a tensor of shape {self.size} and stride {self.stride} at offset "
                f"{self.offset} reaches past its storage of {count} elements."
            )
        loader.charge(numel * returned.itemsize)
        flat = np.frombuffer(loader.raw(self.storage.key), dtype=stored, count=count)
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * stored.itemsize for s in self.stride),
            writeable=False,
        )
        if dtype == "bfloat16":
            array = _bfloat16_bits_to_float32(view)
        else:
            array = view.astype(returned, copy=True)
        if self.negate:
            array = -array
        if self.conjugate:
            array = np.conj(array)
        return array



def _extent(size, stride):
    """How many storage elements a layout spans; refuses overlapping layouts.

    A dimension of size > 1 must step over everything the dimensions with
    smaller strides span, so no two elements share storage and the tensor is
    never larger than its storage (zero or negative strides are refused).
    """
    extent = 1
    for step, length in sorted((st, sz) for sz, st in zip(size, stride) if sz > 1):
        if step < extent:
            raise CheckpointError(
                f"a tensor of shape {size} has stride {stride}: its elements overlap (zero, "
                "negative or interleaved strides). Save tensors with .contiguous()."
            )
        extent += (length - 1) * step
    return extent


def _int(value):
    """An integer of a tensor header; torch's are int64."""
    if type(value) is not int or not -(2**63) <= value < 2**63:
        raise CheckpointError(f"expected a 64-bit integer in a tensor header, got {_short(value)}.")
    return value


# --------------------------------------------------------------------------
# the pickle

# The opcodes CPython's pickler writes at protocol 2 for what torch.save
# stores (dicts, lists, tuples, numbers, strings, globals, reduce calls,
# NEWOBJ + BUILD for plain objects, binary persistent ids for storages).
# Every other opcode is refused: text-mode opcodes, EXT1/2/4 (served from
# copyreg's registry without any name check), INST/OBJ, NEWOBJ_EX,
# STACK_GLOBAL, PERSID, DUP, POP, FRAME and the other protocol 3-5 opcodes.
_ALLOWED_OPCODES = frozenset(
    {
        "MARK", "STOP", "NONE", "NEWTRUE", "NEWFALSE",
        "BININT", "BININT1", "BININT2", "LONG1", "LONG4", "BINFLOAT", "BINUNICODE",
        "EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE",
        "EMPTY_LIST", "APPEND", "APPENDS", "EMPTY_DICT", "SETITEM", "SETITEMS",
        "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET",
        "GLOBAL", "REDUCE", "NEWOBJ", "BUILD", "BINPERSID",
    }
)  # fmt: skip


class _Record:
    """An inert record of a harmless object named by the pickle.

    Calling the global, constructing it with NEWOBJ or restoring its state
    with BUILD (once) only stores the arguments; the real class is never
    imported or called.
    """

    __slots__ = ("qualname", "args", "state")

    def __init__(self, qualname, args):
        self.qualname = qualname
        self.args = args
        self.state = None

    def __repr__(self):
        return f"<record of {self.qualname}>"


class _Global:
    """A callable global from the allowlist, made afresh for each file.

    `call(args)` stands in for calling it; `makes_records` says whether it
    may also be the class of a NEWOBJ.
    """

    __slots__ = ("qualname", "call", "makes_records")

    def __init__(self, qualname, call, makes_records=False):
        self.qualname = qualname
        self.call = call
        self.makes_records = makes_records

    def __repr__(self):
        return self.qualname


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    return _LazyTensor(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    return _LazyTensor(storage, storage_offset, size, stride, dtype, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if type(data) is not _LazyTensor:
        raise CheckpointError(f"a parameter wraps {_short(data)}, not a tensor.")
    return data


_TENSOR_REBUILDERS = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
}
# Harmless objects found beside state dicts in training checkpoints (the
# authors' "args" is an argparse.Namespace): kept as inert records.
_RECORD_TYPES = (
    "argparse.Namespace",
    "torch.device",
    "torch.Size",
    "torch.Tensor",
    "torch.nn.parameter.Parameter",
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
)
_TENSOR_TYPES = ("torch.Tensor", "torch.nn.parameter.Parameter")


def _call_with(function, qualname):
    """`function` called with a pickle's argument tuple; a wrong count is an error."""

    def call(args):
        try:
            return function(*args)
        except TypeError as e:  # the number of arguments
            raise CheckpointError(f"bad arguments to {qualname}: {e}") from e

    return call


def _ordered_dict(args):
    # Protocol 2 writes OrderedDict() and then SETITEMS.
    if args != ():
        raise CheckpointError(f"OrderedDict called with {_short(args)}.")
    return collections.OrderedDict()


def _set_items(args, qualname):
    if args == ():
        return []
    if len(args) != 1 or type(args[0]) is not list:
        raise CheckpointError(f"{qualname} called with {_short(args)}, not one list.")
    for item in args[0]:
        _check_key(item)
    return args[0]


def _complex(args):
    if len(args) != 2 or not all(type(a) in (int, float) for a in args):
        raise CheckpointError(f"complex called with {_short(args)}, not two numbers.")
    try:
        return complex(*args)
    except OverflowError as e:
        raise CheckpointError(f"complex called with {_short(args)}: {e}") from e


def _slice(args):
    if not 1 <= len(args) <= 3 or not all(a is None or type(a) is int for a in args):
        raise CheckpointError(f"slice called with {_short(args)}.")
    return slice(*args)


def _bytearray(args):
    # Only a copy of bytes already in the file, never bytearray(size).
    if len(args) != 1 or type(args[0]) is not bytes:
        raise CheckpointError(f"bytearray called with {_short(args)}, not bytes.")
    return bytearray(args[0])


def _codecs_encode(args):
    # Protocol 2 writes bytes as _codecs.encode(str, "latin1").
    if len(args) != 2 or type(args[0]) is not str or args[1] not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode called with {_short(args)}.")
    try:
        return args[0].encode("latin1")
    except UnicodeEncodeError as e:
        raise CheckpointError(f"_codecs.encode of a non-latin1 string: {e}") from e


def _rebuild_from_type_v2(args):
    # torch writes tensor subclasses (and Parameter, in recent versions) as
    # _rebuild_from_type_v2(rebuilder, type, args, state).
    if len(args) != 4:
        raise CheckpointError(f"_rebuild_from_type_v2 called with {len(args)} arguments.")
    func, new_type, func_args, _state = args
    if (
        type(func) is not _Global
        or func.qualname not in _TENSOR_REBUILDERS
        or type(new_type) is not _Global
        or new_type.qualname not in _TENSOR_TYPES
        or type(func_args) is not tuple
    ):
        raise UnsafeCheckpointError(
            f"refusing to rebuild a tensor of type {_short(new_type)} with {_short(func)}."
        )
    return func.call(func_args)


def _fresh_globals():
    """The allowlist: qualified name -> a new stand-in, for one file."""
    allowed = {
        qualname: _Global(qualname, _call_with(function, qualname))
        for qualname, function in _TENSOR_REBUILDERS.items()
    }
    for qualname in _RECORD_TYPES:
        allowed[qualname] = _Global(
            qualname, lambda args, qualname=qualname: _Record(qualname, args), makes_records=True
        )
    for qualname, call in (
        ("torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2),
        ("collections.OrderedDict", _ordered_dict),
        ("builtins.set", lambda args: set(_set_items(args, "set"))),
        ("builtins.frozenset", lambda args: frozenset(_set_items(args, "frozenset"))),
        ("builtins.complex", _complex),
        ("builtins.slice", _slice),
        ("builtins.bytearray", _bytearray),
        ("_codecs.encode", _codecs_encode),
    ):
        allowed[qualname] = _Global(qualname, call)
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[f"torch.{name}"] = _StorageType(name, dtype)
    allowed["torch.storage.UntypedStorage"] = allowed["torch.UntypedStorage"]
    for name, dtype in _TORCH_DTYPES.items():
        allowed[f"torch.{name}"] = _Dtype(name, dtype)
    return allowed


_ALLOWED_GLOBAL_NAMES = frozenset(_fresh_globals())


def _qualname(arg):
    """The allowlist's name for a GLOBAL's "module name" argument."""
    module, _, name = arg.partition(" ")
    # Protocol-2 pickles name Python 2 modules ("__builtin__.set"); map
    # them as pickle's fix_imports does.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _check_key(key):
    """Refuses dict keys and set items other than plain scalars and strings."""
    if type(key) not in _KEY_TYPES:
        raise CheckpointError(
            f"a dict key or set item of type {type(key).__name__}; only str, bytes, int, "
            "float, bool and None are read."
        )
    if type(key) is int and not -_MAX_KEY_INT < key < _MAX_KEY_INT:
        raise CheckpointError(f"an integer dict key or set item {_short(key)} out of range.")


class _Unpickler:
    """Checks a protocol-2 pickle's whole opcode stream, then runs it on inert objects.

    The check refuses any opcode outside `_ALLOWED_OPCODES`, any global
    outside the allowlist, other protocols and more than `MAX_PICKLE_OPCODES`
    opcodes before anything is built. The run then keeps pickle's semantics
    for what remains, narrowed: REDUCE only calls allowlisted stand-ins,
    NEWOBJ and BUILD only make and fill fresh records (BUILD on an OrderedDict
    drops its attributes), APPEND(S) only extend lists and SETITEM(S) only
    fill dicts built by this same pickle, with scalar or string keys.
    """

    def __init__(self, data, loader):
        self.data = data
        self.loader = loader

    def load(self):
        self._check()
        return self._run()

    def _ops(self):
        try:
            yield from pickletools.genops(self.data)
        except ValueError as e:  # unknown opcode, truncated argument, bad UTF-8, no STOP
            raise CheckpointError(f"the pickle is damaged: {e}") from e

    def _check(self):
        end = None
        for count, (op, arg, pos) in enumerate(self._ops()):
            if count >= MAX_PICKLE_OPCODES:
                raise CheckpointError(f"the pickle has more than {MAX_PICKLE_OPCODES} opcodes.")
            if count == 0:
                if op.name != "PROTO" or arg != 2:
                    raise UnsafeCheckpointError(
                        "the pickle is not protocol 2, which torch.save writes (opcode "
                        f"{op.name} {_short(arg)} at its start); refusing it (nothing from the "
                        "file was run). Re-save it with torch.save's default pickle_protocol, "
                        "or convert it to .safetensors."
                    )
            elif op.name not in _ALLOWED_OPCODES:
                raise UnsafeCheckpointError(
                    f"the pickle uses opcode {op.name} (at byte {pos}), which torch.save does "
                    "not write; refusing it (nothing from the file was run)."
                )
            elif op.name == "GLOBAL" and _qualname(arg) not in _ALLOWED_GLOBAL_NAMES:
                raise UnsafeCheckpointError(
                    f"the pickle refers to {_short(_qualname(arg))}, which is not needed to "
                    "rebuild tensors; refusing to load it (nothing from the file was run). "
                    "Only load checkpoints from sources you trust, or convert them to "
                    ".safetensors."
                )
            if op.name == "STOP":
                end = pos + 1
        if end != len(self.data):
            raise CheckpointError(f"the pickle has {len(self.data) - end} bytes after its end.")

    def _run(self):
        self.globals = _fresh_globals()
        self.stack = []
        self.metastack = []
        self.memo = {}
        handlers = {
            "PROTO": lambda arg: None,
            "MARK": self._mark,
            "GLOBAL": lambda arg: self.stack.append(self.globals[_qualname(arg)]),
            "EMPTY_TUPLE": lambda arg: self._push_tuple(()),
            "TUPLE1": lambda arg: self._push_tuple(self._pop_n(1)),
            "TUPLE2": lambda arg: self._push_tuple(self._pop_n(2)),
            "TUPLE3": lambda arg: self._push_tuple(self._pop_n(3)),
            "TUPLE": lambda arg: self._push_tuple(self._pop_mark()),
            "EMPTY_LIST": lambda arg: self.stack.append([]),
            "APPEND": lambda arg: self._extend([self._pop()]),
            "APPENDS": lambda arg: self._extend(self._pop_mark()),
            "EMPTY_DICT": lambda arg: self.stack.append({}),
            "SETITEM": lambda arg: self._set_items(self._pop_n(2)),
            "SETITEMS": lambda arg: self._set_items(self._pop_mark()),
            "BINPUT": self._put,
            "LONG_BINPUT": self._put,
            "BINGET": self._get,
            "LONG_BINGET": self._get,
            "REDUCE": self._reduce,
            "NEWOBJ": self._newobj,
            "BUILD": self._build,
            "BINPERSID": lambda arg: self.stack.append(self.loader.storage(self._pop())),
        }
        for op, arg, _ in self._ops():
            if op.name == "STOP":
                value = self._pop()
                if self.stack or self.metastack:
                    raise CheckpointError("the pickle ends with objects left on its stack.")
                return value
            handler = handlers.get(op.name)
            if handler is None:  # a constant: None, True, False, a number, a string
                self.stack.append(arg)
            else:
                handler(arg)
        raise CheckpointError("the pickle has no STOP.")  # genops raises first

    def _pop(self):
        if not self.stack:
            raise CheckpointError("the pickle pops from an empty stack.")
        return self.stack.pop()

    def _top(self):
        if not self.stack:
            raise CheckpointError("the pickle reads from an empty stack.")
        return self.stack[-1]

    def _pop_n(self, n):
        if len(self.stack) < n:
            raise CheckpointError("the pickle pops from an empty stack.")
        items = tuple(self.stack[-n:])
        del self.stack[-n:]
        return items

    def _mark(self, arg):
        self.metastack.append(self.stack)
        self.stack = []

    def _pop_mark(self):
        if not self.metastack:
            raise CheckpointError("the pickle pops a MARK it never set.")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _push_tuple(self, items):
        self.stack.append(tuple(items))

    def _extend(self, items):
        target = self._top()
        if type(target) is not list:
            raise UnsafeCheckpointError(f"the pickle appends to {_short(target)}, not a list.")
        target.extend(items)

    def _set_items(self, items):
        target = self._top()
        if type(target) not in (dict, collections.OrderedDict):
            raise UnsafeCheckpointError(f"the pickle sets items of {_short(target)}, not a dict.")
        if len(items) % 2:
            raise CheckpointError("the pickle sets a key without a value.")
        for i in range(0, len(items), 2):
            _check_key(items[i])
            target[items[i]] = items[i + 1]

    def _put(self, index):
        self.memo[index] = self._top()

    def _get(self, index):
        if index not in self.memo:
            raise CheckpointError(f"the pickle reads memo entry {index}, never written.")
        self.stack.append(self.memo[index])

    def _reduce(self, arg):
        args = self._pop()
        function = self._top()
        if type(function) is not _Global:
            raise UnsafeCheckpointError(f"the pickle calls {_short(function)}, not a global.")
        if type(args) is not tuple:
            raise CheckpointError(f"the pickle calls {function!r} with {_short(args)}.")
        self.stack[-1] = function.call(args)

    def _newobj(self, arg):
        args = self._pop()
        cls = self._top()
        if type(cls) is not _Global or not cls.makes_records or type(args) is not tuple:
            raise UnsafeCheckpointError(f"the pickle constructs {_short(cls)} with NEWOBJ.")
        self.stack[-1] = cls.call(args)

    def _build(self, arg):
        state = self._pop()
        target = self._top()
        # Only a record or OrderedDict this pickle made (a module's state dict
        # carries its `_metadata` this way; nothing here needs it), and a
        # record once: stand-ins and functions are never written to.
        if type(target) is collections.OrderedDict and type(state) is dict:
            return
        if type(target) is not _Record or target.state is not None:
            raise UnsafeCheckpointError(
                f"the pickle sets the state of {_short(target)}; refusing it (nothing from "
                "the file was run)."
            )
        target.state = state


def _unwrap_state_dict(obj):
    """The state dict inside a training checkpoint, or `obj` itself."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"expected the checkpoint to hold a dict, found {type(obj).__name__}."
        )
    for key in _STATE_DICT_KEYS:
        nested = obj.get(key)
        if isinstance(nested, Mapping) and any(type(v) is _LazyTensor for v in nested.values()):
            return nested
    if not any(type(v) is _LazyTensor for v in obj.values()):
        keys = [k for k in obj if type(k) is str]
        raise CheckpointError(
            "no tensors found at the top level of the checkpoint or under "
            f"{' / '.join(repr(k) for k in _STATE_DICT_KEYS)}; top-level keys: "
            f"{_short(sorted(keys))}."
        )
    return obj


def _strip_common_prefix(tensors, prefix):
    if tensors and all(name.startswith(prefix) for name in tensors):
        return {name[len(prefix) :]: value for name, value in tensors.items()}
    return tensors
