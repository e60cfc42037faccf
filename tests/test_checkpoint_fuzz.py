"""Fuzzing keras_coat.checkpoint: mutated .pth (zip and legacy) and
.safetensors files either read exactly as the reference reads them or raise
the package's CheckpointError; never any other exception.

The reference is the original tensors for byte-level mutations of zip files
(every entry is CRC-checked), and torch's own readers (``torch.load`` with
``weights_only=True``, ``safetensors.torch.load``) where a mutation leaves a
file that legitimately holds other values.
"""

import argparse
import io
import os
import pickletools
import warnings
import zipfile

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from keras_coat.checkpoint import CheckpointError, read_state_dict
from tests._weights_fixtures import assert_same_tensors

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.adversarial

# CI runs 120 examples per test; set KERAS_COAT_FUZZ_EXAMPLES for a longer run.
FUZZ = settings(
    max_examples=int(os.environ.get("KERAS_COAT_FUZZ_EXAMPLES", "120")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _state_dict():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    state = module.state_dict()
    state["half"] = torch.arange(3).half()
    state["bf16"] = torch.linspace(-1, 1, 3).bfloat16()
    state["long"] = torch.arange(4)[1:]
    state["flag"] = torch.tensor([True, False])
    state["t"] = torch.arange(6.0).reshape(2, 3).t()
    return state


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Valid files to mutate, by format, and the folder mutated copies go to."""
    folder = tmp_path_factory.mktemp("fuzz")
    state = _state_dict()
    zip_path, legacy_path = folder / "seed.pth", folder / "legacy.pth"
    authors_path = folder / "authors.pth"
    torch.save(state, zip_path)
    torch.save(state, legacy_path, _use_new_zipfile_serialization=False)
    # The authors' training layout: NEWOBJ + BUILD of a Namespace, nested dicts.
    authors = {"model": state, "epoch": 3, "args": argparse.Namespace(lr=5e-4, size=(224, 224))}
    torch.save(authors, authors_path)
    from safetensors.torch import save

    safetensors = save({name: value.contiguous() for name, value in state.items()})
    return _Seeds(
        folder=folder,
        state=state,
        zip=zip_path.read_bytes(),
        authors=authors_path.read_bytes(),
        legacy=legacy_path.read_bytes(),
        safetensors=safetensors,
    )


class _Seeds(dict):
    def __init__(self, **items):
        super().__init__(items)

    def __repr__(self):  # Hypothesis prints the fixtures of a failing example
        return "<seed files>"


def _read(path):
    """The reader's result, or None when it raised CheckpointError."""
    try:
        arrays = read_state_dict(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        event(f"refused: {type(e).__name__}")
        return None
    event("read")
    return arrays


# Byte-level edits: (kind, position as a fraction of the length, argument).
EDITS = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
        st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 64)),
    ),
    min_size=1,
    max_size=3,
)


def _edit(data, edits):
    data = bytearray(data)
    for kind, where, arg in edits:
        at = min(int(where * len(data)), max(len(data) - 1, 0))
        if kind == "flip" and data:
            data[at] ^= arg
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = arg
        elif kind == "delete":
            del data[at : at + arg]
    return bytes(data)


@FUZZ
@given(kind=st.sampled_from(["zip", "authors", "legacy"]), edits=EDITS)
def test_byte_edits_of_pth_files(seeds, kind, edits):
    path = seeds["folder"] / f"mutated_{kind}.pth"
    path.write_bytes(_edit(seeds[kind], edits))
    arrays = _read(path)
    if arrays is not None:  # every zip entry is CRC-checked: only the original reads
        assert kind != "legacy"
        assert_same_tensors(arrays, seeds["state"])


def _pickle_op_starts(data):
    return [pos for _, _, pos in pickletools.genops(data)]


# Member-level edits, written back with correct CRCs: byte edits of one
# entry, opcode-level edits of the pickle, renamed or dropped entries.
MEMBER_EDITS = st.one_of(
    st.tuples(st.just("bytes"), st.integers(0, 100), EDITS),
    st.tuples(
        st.just("opcodes"),
        st.sampled_from(["delete", "duplicate", "swap"]),
        st.tuples(st.floats(0, 1), st.floats(0, 1)),
    ),
    st.tuples(st.just("rename"), st.integers(0, 100), st.sampled_from(["data/9", "x", "data.pkl"])),
    st.tuples(st.just("drop"), st.integers(0, 100), st.none()),
)


def _is_used(name):
    return name.endswith(("/data.pkl", "/byteorder")) or "/data/" in name


def _edit_members(data, edit):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = [(info.filename, z.read(info)) for info in z.infolist()]
    kind, which, arg = edit
    if kind == "opcodes":
        index = next(i for i, (name, _) in enumerate(members) if name.endswith("data.pkl"))
        pickle = members[index][1]
        starts = _pickle_op_starts(pickle) + [len(pickle)]
        i, j = (min(int(f * (len(starts) - 1)), len(starts) - 2) for f in arg)
        op_i, op_j = pickle[starts[i] : starts[i + 1]], pickle[starts[j] : starts[j + 1]]
        if which == "delete":
            pickle = pickle[: starts[i]] + pickle[starts[i + 1] :]
        elif which == "duplicate":
            pickle = pickle[: starts[i]] + op_i + pickle[starts[i] :]
        elif i < j:
            pickle = (
                pickle[: starts[i]]
                + op_j
                + pickle[starts[i + 1] : starts[j]]
                + op_i
                + pickle[starts[j + 1] :]
            )
        members[index] = (members[index][0], pickle)
    else:
        # Entries the reader uses; torch alone needs "version" and the like.
        used = [i for i, (name, _) in enumerate(members) if _is_used(name)]
        index = used[which % len(used)]
        name, content = members[index]
        if kind == "bytes":
            members[index] = (name, _edit(content, arg))
        elif kind == "rename":
            members[index] = (name.rsplit("/", 1)[0] + "/" + arg, content)
        else:
            del members[index]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a renamed entry may duplicate a name
        for name, content in members:
            z.writestr(name, content)
    return out.getvalue()


@FUZZ
@given(kind=st.sampled_from(["zip", "authors"]), edit=MEMBER_EDITS)
def test_member_edits_of_zip_pth_files_agree_with_torch(seeds, kind, edit):
    path = seeds["folder"] / "members.pth"
    path.write_bytes(_edit_members(seeds[kind], edit))
    arrays = _read(path)
    if arrays is not None:
        # The file may now legitimately hold other values: torch's own
        # restricted loader must read it too, and read the same.
        with torch.serialization.safe_globals([argparse.Namespace]):
            reference = torch.load(path, weights_only=True)
        assert_same_tensors(arrays, _tensors_of(reference))


def _tensors_of(checkpoint):
    """The tensors read_state_dict returns for what torch loaded."""
    for key in ("model", "state_dict"):
        nested = checkpoint.get(key) if isinstance(checkpoint, dict) else None
        if isinstance(nested, dict) and any(torch.is_tensor(v) for v in nested.values()):
            checkpoint = nested
            break
    return {name: value for name, value in checkpoint.items() if torch.is_tensor(value)}


@FUZZ
@given(edits=EDITS)
def test_byte_edits_of_safetensors_files_agree_with_the_library(seeds, edits):
    from safetensors.torch import load

    data = _edit(seeds["safetensors"], edits)
    path = seeds["folder"] / "mutated.safetensors"
    path.write_bytes(data)
    arrays = _read(path)
    if arrays is not None:
        assert_same_tensors(arrays, load(data))
