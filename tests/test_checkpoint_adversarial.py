"""keras_coat.checkpoint under hostile and broken files.

Every case asserts the exact error type, that the message names the file,
that nothing ran (marker files a live payload would create), that the reader
left nothing behind in the file's folder, and that a good checkpoint read
right after, in the same process, gives exactly the right tensors.

Classes (issue 9): 1 state shared across loads, 2 opcode and global
coverage, 3 memory amplification (run under an address-space limit),
4 every malformed file raises the package's own error.
"""

import argparse
import copyreg
import json
import os
import pickle
import pickletools
import struct
import sys
import zipfile
import zlib

import numpy as np
import pytest

from keras_coat import checkpoint
from keras_coat.checkpoint import CheckpointError, UnsafeCheckpointError, read_state_dict
from tests._weights_fixtures import REPO_ROOT, as_numpy, assert_same_tensors
from tests.conftest import ADDRESS_SPACE_LIMIT

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.adversarial


# ---------------------------------------------------------------------------
# writing pickles by hand


def op(name):
    return _OPS[name].code.encode("latin1")


_OPS = {o.name: o for o in pickletools.opcodes}


def glob(module, name):
    return op("GLOBAL") + f"{module}\n{name}\n".encode()


def text(value):
    data = value.encode("utf-8", "surrogatepass")
    return op("BINUNICODE") + struct.pack("<I", len(data)) + data


def integer(value):
    if 0 <= value < 256:
        return op("BININT1") + bytes([value])
    if -(2**31) <= value < 2**31:
        return op("BININT") + struct.pack("<i", value)
    data = pickle.encode_long(value)
    if len(data) < 256:
        return op("LONG1") + bytes([len(data)]) + data
    return op("LONG4") + struct.pack("<i", len(data)) + data


def tup(*parts):
    return op("MARK") + b"".join(parts) + op("TUPLE")


def call(function, *args):
    return function + tup(*args) + op("REDUCE")


def storage(key="0", numel=4, storage_type="FloatStorage"):
    pid = tup(text("storage"), glob("torch", storage_type), text(key), text("cpu"), integer(numel))
    return pid + op("BINPERSID")


def tensor(key="0", numel=4, offset=0, size=(4,), stride=(1,), storage_type="FloatStorage"):
    return call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        storage(key, numel, storage_type),
        integer(offset),
        tup(*map(integer, size)),
        tup(*map(integer, stride)),
        op("NEWFALSE"),
        call(glob("collections", "OrderedDict")),
    )


def state_dict(*items):
    """A pickle of {name: value} from (name, pickled value) pairs."""
    body = b"".join(text(name) + value for name, value in items)
    return b"\x80\x02" + op("EMPTY_DICT") + op("MARK") + body + op("SETITEMS") + op("STOP")


def write_pth(path, data, storages=None, archive="archive", compression=zipfile.ZIP_STORED):
    """`data` (a pickle) and `storages` ({key: bytes}) in torch's zip layout."""
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr(f"{archive}/data.pkl", data)
        z.writestr(f"{archive}/byteorder", "little")
        for key, raw in (storages or {"0": np.arange(4, dtype="<f4").tobytes()}).items():
            z.writestr(f"{archive}/data/{key}", raw)
    return path


# ---------------------------------------------------------------------------
# fixtures: a real module's state dict saved by torch, and the checks


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 2)
        self.register_buffer("half_buffer", torch.arange(3).half())
        self.register_buffer("bf16_buffer", torch.linspace(-1, 1, 5).bfloat16())


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real torch checkpoint in the authors' layout and its tensors in NumPy."""
    torch.manual_seed(0)
    model = _Small()
    folder = tmp_path_factory.mktemp("good")
    path = folder / "good.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "epoch": 3,
            "args": argparse.Namespace(model="small", lr=5e-4),
        },
        path,
    )
    expected = {name: as_numpy(value) for name, value in model.state_dict().items()}
    return path, expected


def _snapshot(folder):
    return sorted(
        (entry.name, entry.stat().st_size, entry.stat().st_mtime_ns) for entry in os.scandir(folder)
    )


def assert_refused(path, error, match, good, markers=()):
    """`path` raises exactly `error` naming it; nothing ran, nothing was
    written, and the good checkpoint still reads exactly right."""
    folder = os.path.dirname(path)
    before = _snapshot(folder)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert type(info.value) is error, repr(info.value)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None  # the chain is kept
    if match:
        assert match in str(info.value), str(info.value)
    for marker in markers:
        assert not os.path.exists(marker), f"the payload ran: {marker} exists"
    assert _snapshot(folder) == before
    good_path, expected = good
    assert_same_tensors(read_state_dict(good_path), expected)
    return info.value


def test_the_good_checkpoint_reads_exactly(good):
    path, expected = good
    assert_same_tensors(read_state_dict(path), expected)


# ---------------------------------------------------------------------------
# class 1: nothing a pickle touches is shared between loads


_FLOAT_STORAGE = glob("torch", "FloatStorage")
_AS_DOUBLE = op("EMPTY_DICT") + text("dtype") + text("<f8") + op("SETITEM")

MUTATIONS = {
    # BUILD onto the storage-type stand-in: the next load would read float32
    # tensors as float64.
    "build-storage-type": _FLOAT_STORAGE + _AS_DOUBLE + op("BUILD"),
    # BUILD with slot state: setattr on the stand-in.
    "build-slots-storage-type": _FLOAT_STORAGE + tup(op("NONE"), _AS_DOUBLE) + op("BUILD"),
    "build-dtype": glob("torch", "float32") + _AS_DOUBLE + op("BUILD"),
    # Rebuilder defaults would change every later tensor.
    "build-function-defaults": glob("torch._utils", "_rebuild_tensor_v2")
    + tup(op("NONE"), op("EMPTY_DICT") + text("__defaults__") + tup(op("NONE")) + op("SETITEM"))
    + op("BUILD"),
    "build-class": glob("collections", "OrderedDict") + _AS_DOUBLE + op("BUILD"),
    "build-record-twice": glob("argparse", "Namespace")
    + op("EMPTY_TUPLE")
    + op("NEWOBJ")
    + op("EMPTY_DICT")
    + op("BUILD")
    + op("EMPTY_DICT")
    + op("BUILD"),
    "setitem-on-stand-in": _FLOAT_STORAGE + text("dtype") + text("<f8") + op("SETITEM"),
    "append-on-global": glob("collections", "OrderedDict") + op("NONE") + op("APPEND"),
    "reduce-a-stand-in": _FLOAT_STORAGE + op("EMPTY_TUPLE") + op("REDUCE"),
    "newobj-of-a-function": glob("torch._utils", "_rebuild_tensor_v2")
    + op("EMPTY_TUPLE")
    + op("NEWOBJ"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_refused_mutation_of_a_stand_in_leaves_the_next_load_exact(tmp_path, good, mutation):
    # The mutation comes after a real tensor and before another, in one file.
    data = state_dict(
        ("w", tensor()),
        ("x", MUTATIONS[mutation]),
        ("v", tensor()),
    )
    path = write_pth(tmp_path / "mutate.pth", data)
    assert_refused(path, UnsafeCheckpointError, "refus" if "build" in mutation else "", good)


def test_stand_ins_are_fresh_per_load_and_read_only():
    first, second = checkpoint._fresh_globals(), checkpoint._fresh_globals()
    for name, value in first.items():
        assert value is not second[name], name
    with pytest.raises(AttributeError):
        first["torch.FloatStorage"].dtype = "<f8"
    with pytest.raises(AttributeError):
        first["torch.float32"].__dict__  # noqa: B018 (no instance dict to write)


# ---------------------------------------------------------------------------
# class 2: only the opcodes and globals torch.save writes


class TouchOnNew:
    """Creating this (by any route) creates the file it is given."""

    def __new__(cls, marker):
        with open(marker, "w"):
            pass
        return super().__new__(cls)

    def __setstate__(self, state):
        with open(state, "w"):
            pass


# Extension code -> a shell-running callable (one code per callable).
_EXTENSION_CODES = {
    "EXT1": (0xF1, "os", "system"),
    "EXT2": (0x1F2, "posix", "system"),
    "EXT4": (0x1F4F4, "subprocess", "getoutput"),
}


@pytest.fixture
def os_system_extension():
    """Registers shell-running callables as copyreg extension codes, as other
    code in the process might; EXT1/2/4 fetch them without any name lookup."""
    for code, module, name in _EXTENSION_CODES.values():
        copyreg.add_extension(module, name, code)
    yield
    for code, module, name in _EXTENSION_CODES.values():
        copyreg.remove_extension(module, name, code)


def _live_payloads(marker):
    """Opcode -> a protocol-2 pickle that runs `touch marker` under pickle.loads."""
    command = text(f"touch {marker}")
    touch_class = ("tests.test_checkpoint_adversarial", "TouchOnNew")
    ext = {
        "EXT1": op("EXT1") + bytes([_EXTENSION_CODES["EXT1"][0]]),
        "EXT2": op("EXT2") + struct.pack("<H", _EXTENSION_CODES["EXT2"][0]),
        "EXT4": op("EXT4") + struct.pack("<i", _EXTENSION_CODES["EXT4"][0]),
    }
    payloads = {name: code + tup(command) + op("REDUCE") for name, code in ext.items()}
    payloads["INST"] = op("MARK") + command + op("INST") + b"os\nsystem\n"
    payloads["OBJ"] = op("MARK") + glob("os", "system") + command + op("OBJ")
    payloads["STACK_GLOBAL"] = text("os") + text("system") + op("STACK_GLOBAL") + tup(command)
    payloads["STACK_GLOBAL"] += op("REDUCE")
    payloads["NEWOBJ_EX"] = (
        text(touch_class[0])
        + text(touch_class[1])
        + op("STACK_GLOBAL")
        + tup(text(str(marker)))
        + op("EMPTY_DICT")
        + op("NEWOBJ_EX")
    )
    payloads["GLOBAL+REDUCE"] = glob("posix", "system") + tup(command) + op("REDUCE")
    payloads["GLOBAL+BUILD"] = (
        glob(*touch_class)
        + tup(text(f"{marker}-new"))
        + op("NEWOBJ")
        + text(str(marker))
        + op("BUILD")
    )
    return {name: b"\x80\x02" + body + op("STOP") for name, body in payloads.items()}


# What each refusal names: the first thing outside the allowlist.
LIVE_REFUSALS = {
    "EXT1": "opcode EXT1",
    "EXT2": "opcode EXT2",
    "EXT4": "opcode EXT4",
    "INST": "opcode INST",
    "OBJ": "'os.system'",
    "STACK_GLOBAL": "opcode STACK_GLOBAL",
    "NEWOBJ_EX": "opcode STACK_GLOBAL",
    "GLOBAL+REDUCE": "'posix.system'",
    "GLOBAL+BUILD": "TouchOnNew",
}
LIVE = sorted(LIVE_REFUSALS)


@pytest.mark.parametrize("opcode", LIVE)
def test_live_payloads_are_refused_before_anything_runs(
    tmp_path, good, os_system_extension, opcode
):
    marker = tmp_path / f"ran-{opcode}"
    payload = _live_payloads(marker)[opcode]
    # Wrapped in a state dict after a real tensor, so the refusal must come
    # before anything is built, not at the end.
    path = write_pth(tmp_path / "live.pth", _in_state_dict(payload))
    markers = [marker, f"{marker}-new"]
    assert_refused(path, UnsafeCheckpointError, LIVE_REFUSALS[opcode], good, markers=markers)


def _in_state_dict(payload):
    """`payload` (a whole pickle) as the value of "x" after a real tensor."""
    return state_dict(("w", tensor()), ("x", payload[2:-1]))


def test_live_payloads_do_run_under_pickle(tmp_path, os_system_extension, monkeypatch):
    # The control: each payload above is live, so a reader that let it
    # through would create the marker.
    monkeypatch.syspath_prepend(REPO_ROOT)
    for opcode in LIVE:
        marker = tmp_path / f"ran-{opcode}"
        try:
            pickle.loads(_live_payloads(marker)[opcode])
        except Exception:  # noqa: BLE001 (the payload's own result may not unpickle)
            pass
        assert marker.exists(), opcode


def _minimal_argument(opcode):
    arg = opcode.arg
    if arg is None:
        return b""
    by_name = {
        "decimalnl_short": b"0\n",
        "decimalnl_long": b"0L\n",
        "stringnl": b"'a'\n",
        "stringnl_noescape": b"a\n",
        "stringnl_noescape_pair": b"a\nb\n",
        "unicodestringnl": b"a\n",
        "floatnl": b"0.0\n",
    }
    if arg.name in by_name:
        return by_name[arg.name]
    if arg.n > 0:
        return b"\x00" * arg.n
    # Length-prefixed: a zero length of 1, 4 or 8 bytes.
    return b"\x00" * {-2: 1, -3: 4, -4: 4, -5: 8}[arg.n]


REFUSED_OPCODES = sorted(
    o.name for o in pickletools.opcodes if o.name not in checkpoint._ALLOWED_OPCODES | {"PROTO"}
)


@pytest.mark.parametrize("name", REFUSED_OPCODES)
def test_every_opcode_torch_does_not_write_is_refused(tmp_path, good, name):
    opcode = _OPS[name]
    payload = b"\x80\x02" + opcode.code.encode("latin1") + _minimal_argument(opcode) + b"N."
    path = write_pth(tmp_path / "opcode.pth", _in_state_dict(payload))
    assert_refused(path, UnsafeCheckpointError, f"opcode {name}", good)


@pytest.mark.parametrize("protocol", [0, 1, 3, 4, 5])
def test_other_pickle_protocols_are_refused(tmp_path, good, protocol):
    data = pickle.dumps({"w": 1}, protocol=protocol)
    path = write_pth(tmp_path / "protocol.pth", data)
    assert_refused(path, UnsafeCheckpointError, "not protocol 2", good)


@pytest.mark.parametrize(
    "qualname",
    [
        ("builtins", "eval"),
        ("__builtin__", "getattr"),
        ("os", "system"),
        ("subprocess", "Popen"),
        ("torch", "load"),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("copyreg", "_reconstructor"),
        ("collections", "deque"),
        ("builtins", "__import__"),
    ],
    ids=".".join,
)
def test_globals_outside_the_allowlist_are_refused_by_name(tmp_path, good, qualname):
    payload = b"\x80\x02" + glob(*qualname) + b"."
    path = write_pth(tmp_path / "global.pth", _in_state_dict(payload))
    error = assert_refused(path, UnsafeCheckpointError, "", good)
    assert qualname[1] in str(error)


def test_everything_torch_save_writes_is_accepted(tmp_path):
    # The allowlist's other side: a training checkpoint holding every kind of
    # harmless object found beside state dicts reads, opcode for opcode.
    model_state = _Small().state_dict()
    model_state["u16"] = torch.tensor([1, 65535], dtype=torch.uint16)  # _rebuild_tensor_v3
    model_state["param"] = torch.nn.Parameter(torch.ones(2))
    path = tmp_path / "everything.pth"
    torch.save(
        {
            "model": model_state,
            "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1}]},
            "args": argparse.Namespace(lr=5e-4, sizes=(1, 2), names=["a"]),
            "device": torch.device("cpu"),
            "dtype": torch.float16,
            "size": torch.Size([2, 3]),
            "set": {1, 2},
            "frozenset": frozenset({"a"}),
            "bytes": b"\x00\xff",
            "bytearray": bytearray(b"xy"),
            "complex": 1 + 2j,
            "slice": slice(1, None, 2),
            "numpy": np.float32(1.5),
            "big": 2**70,
            "float": float("inf"),
        },
        path,
    )
    assert_same_tensors(read_state_dict(path), model_state)


# ---------------------------------------------------------------------------
# editing zip archives in place


def _central_entry(data, member):
    """Offset of `member`'s central-directory record in the zip bytes `data`."""
    name = member.encode()
    start = 0
    while True:
        start = data.index(b"PK\x01\x02", start)
        (name_length,) = struct.unpack_from("<H", data, start + 28)
        if data[start + 46 : start + 46 + name_length] == name:
            return start
        start += 4


# Central-directory fields: (offset in the record, struct format).
_CENTRAL_FIELDS = {
    "flag_bits": (8, "<H"),
    "compress_type": (10, "<H"),
    "crc": (16, "<I"),
    "compress_size": (20, "<I"),
    "file_size": (24, "<I"),
}


def patch_zip(path, member, **fields):
    """Overwrites central-directory fields of `member` in the file at `path`."""
    data = bytearray(open(path, "rb").read())
    entry = _central_entry(bytes(data), member)
    for field, value in fields.items():
        offset, fmt = _CENTRAL_FIELDS[field]
        struct.pack_into(fmt, data, entry + offset, value)
    with open(path, "wb") as f:
        f.write(data)
    return path


def good_pickle():
    return state_dict(("w", tensor()))


# ---------------------------------------------------------------------------
# class 3: every allocation is bounded by bytes present in the file


def _bomb_bytearray(folder):
    bomb = call(glob("__builtin__", "bytearray"), integer(2**31))
    data = state_dict(("w", tensor()), ("x", bomb))
    return write_pth(folder / "bytearray.pth", data), "bytearray called with"


def _bomb_deflate(folder):
    # 512 MiB of zeros deflate to half a MiB; the pickle claims all of them.
    path = folder / "deflate.pth"
    numel = 2**27
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", state_dict(("w", tensor(numel=numel, size=(numel,)))))
        with z.open("archive/data/0", "w", force_zip64=True) as f:
            zeros = bytes(2**22)
            for _ in range(4 * numel // len(zeros)):
                f.write(zeros)
    return path, "more than 16 times"


def _bomb_declared_size(folder):
    # A small stored entry whose directory record claims 2.5 GiB.
    path = write_pth(folder / "declared.pth", good_pickle())
    return patch_zip(path, "archive/data/0", compress_size=0xA0000000, file_size=0xA0000000), (
        "compressed bytes in a"
    )


def _bomb_declared_deflated_size(folder):
    path = folder / "declared_deflated.pth"
    write_pth(path, good_pickle(), compression=zipfile.ZIP_DEFLATED)
    return patch_zip(path, "archive/data/0", file_size=0xA0000000), "more than 16 times"


def _bomb_zero_stride(folder):
    data = state_dict(("w", tensor(size=(10**6, 10**6), stride=(0, 0))))
    return write_pth(folder / "zero_stride.pth", data), "overlap"


def _bomb_overlapping_strides(folder):
    numel = 2**11
    data = state_dict(("w", tensor(numel=numel, size=(2**10, 2**10), stride=(1, 1))))
    storages = {"0": bytes(4 * numel)}
    return write_pth(folder / "overlap.pth", data, storages), "overlap"


def _bomb_interleaved_strides(folder):
    data = state_dict(("w", tensor(size=(2, 2, 10**5), stride=(2, 1, 1))))
    return write_pth(folder / "interleaved.pth", data), "overlap"


def _bomb_negative_stride(folder):
    data = state_dict(("w", tensor(offset=3, size=(4,), stride=(-1,))))
    return write_pth(folder / "negative.pth", data), "overlap"


def _bomb_shape_product_overflow(folder):
    data = state_dict(("w", tensor(size=(2**40, 2**40), stride=(1, 2**40))))
    return write_pth(folder / "product.pth", data), "reaches past its storage"


def _bomb_size_beyond_int64(folder):
    data = state_dict(("w", tensor(size=(2**70,), stride=(1,))))
    return write_pth(folder / "int64.pth", data), "64-bit integer"


def _bomb_empty_tensor_shape(folder):
    data = state_dict(("w", tensor(size=(0, 2**62, 2**62), stride=(1, 1, 1))))
    return write_pth(folder / "empty_shape.pth", data), "absurd shape"


def _bomb_storage_numel(folder):
    data = state_dict(("w", tensor(numel=10**12, size=(10**6,))))
    return write_pth(folder / "numel.pth", data), "its entry holds 16"


def _bomb_many_views(folder):
    # 500 names for the whole of one 1 MiB storage: 500 MiB of copies.
    numel = 2**18
    items = [(f"w{i}", tensor(numel=numel, size=(numel,))) for i in range(500)]
    return write_pth(folder / "views.pth", state_dict(*items), {"0": bytes(4 * numel)}), (
        "more memory than the storages"
    )


def _bomb_big_pickle(folder):
    data = state_dict(("w", tensor()))
    data = data[:-1] + op("EMPTY_LIST") + op("MARK") + op("NONE") * (17 * 2**20) + op("APPENDS")
    return write_pth(folder / "big_pickle.pth", data + op("STOP")), "at most 16777216"


def _bomb_many_opcodes(folder):
    data = state_dict(("w", tensor()))[:-2] + text("x") + op("EMPTY_LIST")
    data += op("MARK") + op("NONE") * (checkpoint.MAX_PICKLE_OPCODES + 1) + op("APPENDS")
    return write_pth(folder / "opcodes.pth", data + op("SETITEMS") + op("STOP")), "opcodes"


def _bomb_string_length(folder):
    # A string claiming 4 GiB in a small pickle.
    data = state_dict(("w", tensor()))[:-1] + op("BINUNICODE") + b"\xff\xff\xff\xff" + b"x" * 64
    return write_pth(folder / "string.pth", data), "damaged"


def _safetensors_bytes(header, data=b""):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _bomb_safetensors_header_size(folder):
    path = folder / "header_size.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    return path, "header claims"


def _bomb_safetensors_big_header(folder):
    path = folder / "big_header.safetensors"
    header = b"{" + b" " * checkpoint.MAX_SAFETENSORS_HEADER_BYTES + b"}"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path, "header claims"


def _bomb_safetensors_shape(folder):
    path = folder / "shape.safetensors"
    header = {"w": {"dtype": "F32", "shape": [2**31, 2**31, 2**31], "data_offsets": [0, 4]}}
    path.write_bytes(_safetensors_bytes(header, bytes(4)))
    return path, "overflow"


def _bomb_safetensors_offsets(folder):
    path = folder / "offsets.safetensors"
    header = {"w": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}}
    path.write_bytes(_safetensors_bytes(header, bytes(4)))
    return path, "safetensors"


BOMBS = {
    name[len("_bomb_") :]: builder
    for name, builder in globals().items()
    if name.startswith("_bomb_")
}
# Address space the reader may add, in MiB, beyond what the interpreter and
# its imports already hold; each bomb asks for 1 GiB or more.
_MEMORY_HEADROOM_MIB = 384

_LIMITED_READER = ADDRESS_SPACE_LIMIT + """
import importlib.util, json, os, sys
import numpy as np
import safetensors  # loaded before the limit, as any import

spec = importlib.util.spec_from_file_location("checkpoint", sys.argv[1])
checkpoint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checkpoint)
cases, good, expected = json.loads(sys.argv[2]), sys.argv[3], np.load(sys.argv[4])
limit_address_space(sys.argv[5])
results = {}
for name, path in cases.items():
    try:
        checkpoint.read_state_dict(path)
        outcome = ["returned", ""]
    except BaseException as e:
        outcome = [type(e).__name__, str(e)]
    arrays = checkpoint.read_state_dict(good)
    outcome.append(
        sorted(arrays) == sorted(expected.files)
        and all(np.array_equal(arrays[k], expected[k]) for k in expected.files)
    )
    results[name] = outcome
try:  # the control: a 1 GiB allocation fails under the same limit
    np.ones(2**30, np.uint8)
    results["control"] = "allocated"
except MemoryError:
    results["control"] = "MemoryError"
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory, good):
    """Reads every bomb in one subprocess under an address-space limit."""
    import subprocess

    folder = tmp_path_factory.mktemp("bombs")
    cases, matches = {}, {}
    for name, builder in BOMBS.items():
        path, match = builder(folder)
        cases[name], matches[name] = str(path), match
    good_path, expected = good
    expected_npz = tmp_path_factory.mktemp("expected") / "expected.npz"
    np.savez(expected_npz, **expected)
    before = _snapshot(folder)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _LIMITED_READER,
            checkpoint.__file__,
            json.dumps(cases),
            str(good_path),
            str(expected_npz),
            str(_MEMORY_HEADROOM_MIB),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert _snapshot(folder) == before
    return cases, matches, json.loads(result.stdout)


_LINUX_ONLY = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status"
)


@_LINUX_ONLY
@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_memory_bombs_are_refused_under_an_address_space_limit(bomb_results, bomb):
    cases, matches, results = bomb_results
    error, message, good_ok = results[bomb]
    assert error == "CheckpointError", (error, message)
    assert cases[bomb] in message
    assert matches[bomb] in message, message
    assert good_ok


@_LINUX_ONLY
def test_the_memory_limit_stops_what_a_bomb_asks_for(bomb_results):
    # So a reader that allocated what any bomb above claims would fail.
    assert bomb_results[2]["control"] == "MemoryError"


# ---------------------------------------------------------------------------
# class 4: every malformed file raises the package's own error, naming it


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__


def _pth(name, data, storages=None, **kwargs):
    return lambda folder: write_pth(folder / f"{name}.pth", data, storages, **kwargs)


def _safetensors(name, header, data=b"", raw_header=None):
    def build(folder):
        path = folder / f"{name}.safetensors"
        if raw_header is None:
            path.write_bytes(_safetensors_bytes(header, data))
        else:
            path.write_bytes(struct.pack("<Q", len(raw_header)) + raw_header + data)
        return path

    return build


def _one_tensor(name, dtype, shape, end, data):
    header = {"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, end]}}
    return _safetensors(name, header, data)


def _patched(name, member, compression=zipfile.ZIP_STORED, **fields):
    def build(folder):
        path = write_pth(folder / f"{name}.pth", good_pickle(), compression=compression)
        return patch_zip(path, member, **fields)

    return build


def _corrupt_deflate(folder):
    path = folder / "corrupt_deflate.pth"
    storages = {"0": np.linspace(0, 1, 4096, dtype="<f4").tobytes()}
    write_pth(path, state_dict(("w", tensor(numel=4096, size=(4096,)))), storages,
              compression=zipfile.ZIP_DEFLATED)  # fmt: skip
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("archive/data/0")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + 10 : start + 200] = bytes(range(190))
    path.write_bytes(data)
    return path


def _bad_utf8_member_name(folder):
    path = write_pth(folder / "utf8_name.pth", good_pickle())
    data = bytearray(path.read_bytes())
    entry = _central_entry(bytes(data), "archive/byteorder")
    struct.pack_into("<H", data, entry + 8, 0x800)  # names are UTF-8
    data[entry + 46 : entry + 48] = b"\xff\xfe"
    path.write_bytes(data)
    return path


def _legacy(folder):
    path = folder / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    return path


def _truncated(folder):
    path = folder / "truncated.pth"
    torch.save({"w": torch.ones(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return path


def _multi_disk(folder):
    # torch.save writes a zip64 end record; one naming two disks made
    # zipfile.is_zipfile itself raise BadZipFile (found by the fuzz test).
    path = folder / "multi_disk.pth"
    torch.save({"w": torch.ones(2)}, path)
    data = bytearray(path.read_bytes())
    locator = data.rindex(b"PK\x06\x07")
    struct.pack_into("<I", data, locator + 16, 2)
    path.write_bytes(data)
    return path


def _duplicate_entry(folder):
    path = write_pth(folder / "duplicate.pth", good_pickle())
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a") as z:
        z.writestr("archive/data/0", bytes(16))
    return path


def _two_pickles(folder):
    path = write_pth(folder / "two_pickles.pth", good_pickle())
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("other/data.pkl", good_pickle())
    return path


def _huge_int_key(folder):
    # A key whose str() Python refuses (> 4300 digits).
    key = pickle.encode_long(10**5000)
    data = b"\x80\x02" + op("EMPTY_DICT") + op("LONG4") + struct.pack("<i", len(key)) + key
    return write_pth(folder / "huge_key.pth", data + op("NONE") + op("SETITEM") + op("STOP"))


_TENSOR_V2 = glob("torch._utils", "_rebuild_tensor_v2")
_EMPTY_HOOKS = call(glob("collections", "OrderedDict"))


def _tensor_with(*args, rebuild=_TENSOR_V2):
    return call(rebuild, *args)


def _colliding_keys(key):
    """A state dict beside {key(k): None for k in 1..20000}."""
    items = b"".join(key(k) + op("NONE") for k in range(1, 20_001))
    nested = op("EMPTY_DICT") + op("MARK") + items + op("SETITEMS")
    return state_dict(("w", tensor()), ("x", nested))


MALFORMED = {
    # TypeError inside the pickle.
    "rebuild-arity": (_pth("arity", state_dict(("w", _tensor_with(storage())))), "bad arguments"),
    "unhashable-key": (
        _pth("unhashable", state_dict(("w", tensor()))[:-1] + op("EMPTY_LIST") + op("NONE")
             + op("SETITEM") + op("STOP")),  # fmt: skip
        "of type list",
    ),
    "set-of-lists": (
        _pth("set_of_lists", state_dict(("w", tensor()), ("s", call(glob("__builtin__", "set"),
             op("EMPTY_LIST") + op("EMPTY_LIST") + op("APPEND"))))),  # fmt: skip
        "of type list",
    ),
    "size-as-list": (
        _pth("size_list", state_dict(("w", _tensor_with(storage(), integer(0),
             op("EMPTY_LIST"), tup(), op("NEWFALSE"), _EMPTY_HOOKS)))),  # fmt: skip
        "not two tuples",
    ),
    "bool-size": (
        _pth("bool_size", state_dict(("w", _tensor_with(storage(), integer(0),
             tup(op("NEWTRUE")), tup(integer(1)), op("NEWFALSE"), _EMPTY_HOOKS)))),  # fmt: skip
        "64-bit integer",
    ),
    "metadata-not-dict": (
        _pth("metadata", state_dict(("w", _tensor_with(storage(), integer(0), tup(integer(4)),
             tup(integer(1)), op("NEWFALSE"), _EMPTY_HOOKS, op("EMPTY_LIST"))))),  # fmt: skip
        "bad tensor metadata",
    ),
    "v3-dtype-not-a-dtype": (
        _pth("v3_dtype", state_dict(("w", _tensor_with(storage(), integer(0), tup(integer(4)),
             tup(integer(1)), op("NEWFALSE"), _EMPTY_HOOKS, glob("torch", "FloatStorage"),
             rebuild=glob("torch._utils", "_rebuild_tensor_v3"))))),  # fmt: skip
        "unknown tensor dtype",
    ),
    "from-type-not-a-tensor": (
        _pth("from_type", state_dict(("w", call(glob("torch._tensor", "_rebuild_from_type_v2"),
             _TENSOR_V2, glob("argparse", "Namespace"), tup(), op("NONE"))))),  # fmt: skip
        "refusing to rebuild",
        UnsafeCheckpointError,
    ),
    # RecursionError: hashing a deeply nested tuple.
    "deep-tuple-key": (
        _pth("deep_tuple", state_dict(("w", tensor()))[:-1] + op("EMPTY_TUPLE")
             + op("TUPLE1") * 20_000 + op("NONE") + op("SETITEM") + op("STOP")),  # fmt: skip
        "of type tuple",
    ),
    # Hash flooding: keys crafted to share one hash make each insertion scan
    # all earlier ones (hours for the 1M opcodes a pickle may hold).
    "colliding-int-keys": (_pth("colliding_ints", _colliding_keys(
        lambda k: integer(k * (2**61 - 1)))), "out of range"),  # fmt: skip
    "tuple-keys": (_pth("tuple_keys", _colliding_keys(
        lambda k: tup(integer(k), integer(0)))), "of type tuple"),  # fmt: skip
    "frozenset-of-tuples": (
        _pth("frozenset", state_dict(("w", tensor()), ("s", call(glob("__builtin__", "frozenset"),
             op("EMPTY_LIST") + tup(integer(1)) + op("APPEND"))))),  # fmt: skip
        "of type tuple",
    ),
    # zipfile: zlib.error / bad CRC, encryption (RuntimeError), unknown
    # methods (NotImplementedError), bad UTF-8 names (UnicodeDecodeError).
    "corrupt-deflate": (_corrupt_deflate, "damaged"),
    "encrypted-entry": (_patched("encrypted", "archive/data/0", flag_bits=1), "encrypted"),
    "strong-encryption": (_patched("strong", "archive/data.pkl", flag_bits=0x41), "encrypted"),
    "compression-99": (_patched("method99", "archive/data/0", compress_type=99), "method 99"),
    "compression-lzma": (_patched("lzma", "archive/data/0", compress_type=14), "method 14"),
    "stored-sizes-differ": (
        _patched("stored_sizes", "archive/data/0", compress_size=8),
        "two sizes differ",
    ),
    "bad-crc": (_patched("crc", "archive/data.pkl", crc=0), "damaged"),
    "bad-utf8-member-name": (_bad_utf8_member_name, "damaged zip archive"),
    # UnicodeDecodeError / EOFError / IndexError / KeyError inside the pickle.
    "bad-utf8-string": (
        _pth("utf8", state_dict(("w", tensor()))[:-1] + op("BINUNICODE")
             + struct.pack("<I", 2) + b"\xff\xfe" + op("NONE") + op("SETITEM")
             + op("STOP")),  # fmt: skip
        "damaged",
    ),
    "no-stop": (_pth("no_stop", good_pickle()[:-1]), "damaged"),
    "after-stop": (_pth("after_stop", good_pickle() + b"N."), "after its end"),
    "empty-stack": (_pth("empty_stack", b"\x80\x02" + op("REDUCE") + op("STOP")), "empty stack"),
    "tuple2-short": (_pth("tuple2", b"\x80\x02" + op("NONE") + op("TUPLE2") + op("STOP")),
                     "empty stack"),  # fmt: skip
    "appends-no-mark": (
        _pth("no_mark", b"\x80\x02" + op("EMPTY_LIST") + op("APPENDS") + op("STOP")),
        "MARK",
    ),
    "left-on-stack": (_pth("left", b"\x80\x02" + op("NONE") + good_pickle()[2:]), "left on"),
    "memo-miss": (_pth("memo", b"\x80\x02" + op("BINGET") + b"\x05" + op("STOP")), "memo entry 5"),
    "missing-storage": (_pth("missing", state_dict(("w", tensor(key="7")))), "missing"),
    "bad-storage-key": (_pth("bad_key", state_dict(("w", tensor(key="../0")))), "bad storage key"),
    "bad-persistent-id": (
        _pth("pid", state_dict(("w", tensor()))[:-1] + text("s") + text("0")
             + op("BINPERSID") + op("SETITEM") + op("STOP")),  # fmt: skip
        "unknown persistent id",
    ),
    "storage-size-mismatch": (
        _pth("size_mismatch", good_pickle(), {"0": bytes(15)}),
        "its entry holds 15",
    ),
    "past-the-storage": (_pth("past", state_dict(("w", tensor(offset=3)))), "past its storage"),
    "offset-overflow": (_pth("offset", state_dict(("w", tensor(offset=2**64)))), "64-bit"),
    "bad-byteorder": (
        lambda folder: _with_entry(folder / "byteorder.pth", "archive/byteorder", b"\xff\xfe"),
        "unknown byte order",
    ),
    # Not a checkpoint at all, or not a state dict.
    "legacy-format": (_legacy, "legacy format"),
    "junk": (lambda folder: _write(folder / "junk.pth", os.urandom(300)), "not a zip-format"),
    "empty-file": (lambda folder: _write(folder / "empty.pth", b""), "not a zip-format"),
    "truncated": (_truncated, ""),
    "multi-disk-zip64": (_multi_disk, "multiple disks"),
    "duplicate-entry": (_duplicate_entry, "twice"),
    "two-pickles": (_two_pickles, "found 2"),
    "no-pickle": (lambda folder: _zip(folder / "nopickle.pth", {"a/b": b"x"}), "found 0"),
    "top-level-list": (_pth("list", b"\x80\x02" + op("EMPTY_LIST") + op("STOP")), "hold a dict"),
    "no-tensors": (_pth("no_tensors", state_dict(("epoch", integer(3)))), "no tensors"),
    "huge-int-key": (_huge_int_key, "out of range"),
    # An integer str() refuses (> 4300 digits) must not break the message.
    "huge-int-size": (_pth("huge_size", state_dict(("w", tensor(size=(10**5000,))))), "<int>"),
    # safetensors: struct.error for short files, JSON errors, and the
    # library's own layout checks (dtypes NumPy lacks: below).
    "st-short": (lambda folder: _write(folder / "short.safetensors", b"\x05\x00"), "no header"),
    "st-header-past-file": (
        lambda folder: _write(folder / "past.safetensors", struct.pack("<Q", 64) + b"{}"),
        "header claims",
    ),
    "st-not-json": (_safetensors("not_json", None, raw_header=b"{not json}"), "bad header"),
    "st-bad-utf8": (_safetensors("utf8", None, raw_header=b'{"\xff": 1}'), "bad header"),
    "st-deep-json": (
        _safetensors("deep", None, raw_header=b"[" * 100_000 + b"]" * 100_000),
        "bad header",
    ),
    "st-duplicate-names": (
        _safetensors("dup", None, b"\x01",
                     raw_header=b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
                     b' "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'),  # fmt: skip
        "duplicate names",
    ),
    "st-gap": (_one_tensor("gap", "U8", [1], 1, b"12"), "not fully covered"),
    "st-overlap": (
        _safetensors("overlap", {
            "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
            "b": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"12"),  # fmt: skip
        "invalid offset",
    ),
    "st-size-mismatch": (_one_tensor("size", "F32", [2], 4, b"1234"), "not a valid safetensors"),
    "st-negative-shape": (_one_tensor("negative", "U8", [-1], 1, b"1"), "not a valid safetensors"),
    "st-entry-not-object": (_safetensors("entry", {"w": 5}), "not a valid safetensors file"),
    "st-metadata-not-text": (
        _safetensors("metadata", {"__metadata__": {"a": 1}}),
        "not a valid safetensors file",
    ),
    "st-no-tensors": (_safetensors("none", {}), "no tensors"),
}


# AttributeError before: dtypes NumPy lacks.
MALFORMED.update(
    {
        f"st-{dtype}": (
            _one_tensor(dtype, dtype, [2], 2, b"\x01\x02"),
            f"dtype {dtype}, which NumPy",
        )
        for dtype in ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ")
    }
)


def _write(path, data):
    path.write_bytes(data)
    return path


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _with_entry(path, member, data):
    write_pth(path, good_pickle())
    with zipfile.ZipFile(path) as src:
        members = {n: (data if n == member else src.read(n)) for n in src.namelist()}
    return _zip(path, members)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_raise_the_packages_error(tmp_path, good, case):
    build, match, *error = MALFORMED[case]
    path = build(tmp_path)
    assert_refused(path, error[0] if error else CheckpointError, match, good)


def test_zip_and_json_errors_keep_their_cause(tmp_path):
    for build, cause in [
        (_corrupt_deflate, (zipfile.BadZipFile, zlib.error)),
        (_bad_utf8_member_name, UnicodeDecodeError),
        (MALFORMED["st-deep-json"][0], RecursionError),
        (MALFORMED["st-not-json"][0], json.JSONDecodeError),
    ]:
        with pytest.raises(CheckpointError) as info:
            read_state_dict(build(tmp_path))
        assert any(isinstance(e, cause) for e in _chain(info.value)), repr(info.value)


def test_nesting_that_needs_no_hashing_still_reads(tmp_path):
    # 20k nested lists and tuples (20 times the recursion limit) as values.
    lists = op("EMPTY_LIST") * 20_000 + op("APPEND") * 19_999
    tuples = op("EMPTY_TUPLE") + op("TUPLE1") * 20_000
    data = state_dict(("w", tensor()), ("x", lists), ("y", tuples))
    path = write_pth(tmp_path / "deep.pth", data)
    assert_same_tensors(read_state_dict(path), {"w": np.arange(4, dtype=np.float32)})


def test_big_endian_archives_read_right(tmp_path):
    values = np.linspace(-2, 2, 4, dtype=">f4")
    path = tmp_path / "big.pth"
    _zip(path, {"a/data.pkl": good_pickle(), "a/byteorder": b"big", "a/data/0": values.tobytes()})
    arrays = read_state_dict(path)
    assert arrays["w"].dtype == np.float32 and arrays["w"].dtype.isnative
    np.testing.assert_array_equal(arrays["w"], values.astype(np.float32))
