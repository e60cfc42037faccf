"""keras_coat.checkpoint: reading torch and safetensors files without torch,
and refusing pickles that would run code."""

import argparse
import builtins
import collections
import subprocess
import zipfile

import numpy as np
import pytest

from keras_coat.checkpoint import CheckpointError, UnsafeCheckpointError, read_state_dict
from tests._weights_fixtures import (
    Hostile,
    HostileCall,
    as_numpy,
    assert_same_tensors,
    run_without_torch,
    write_torch_like_zip,
)

torch = pytest.importorskip("torch")


def _mixed_state_dict():
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    return collections.OrderedDict(
        dense=torch.randn(3, 5),
        transposed=torch.randn(5, 3).t(),  # non-contiguous strides
        sliced=base[1:3, 2:],  # storage offset, shares `base`'s storage
        base=base,
        half=torch.randn(7).half(),
        bfloat=torch.randn(2, 3).bfloat16(),
        double=torch.randn(2).double(),
        long=torch.arange(10, dtype=torch.int64)[3:],
        int=torch.tensor([1, -2, 3], dtype=torch.int32),
        byte=torch.tensor([0, 255], dtype=torch.uint8),
        flag=torch.tensor([True, False]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 4),
        param=torch.nn.Parameter(torch.randn(2, 2)),
        conv=torch.randn(8, 3, 4, 4).permute(0, 2, 3, 1),  # channels-last view
    )


def test_reads_every_dtype_and_layout_exactly(tmp_path):
    state_dict = _mixed_state_dict()
    path = tmp_path / "mixed.pth"
    torch.save(state_dict, path)
    assert_same_tensors(read_state_dict(path), state_dict)


def test_unwraps_the_authors_training_checkpoint(tmp_path):
    state_dict = _mixed_state_dict()
    path = tmp_path / "authors.pth"
    torch.save(
        {
            "model": state_dict,
            "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []},
            "lr_scheduler": {"last_epoch": 3},
            "epoch": 3,
            "model_ema": {"other": torch.zeros(2)},
            "args": argparse.Namespace(model="coat_lite_tiny", lr=5e-4, input_size=224),
            "device": torch.device("cpu"),
            "dtype": torch.float16,
            "size": torch.Size([2, 3]),
            "tags": {"a", "b"},
            "blob": b"\x00\x01",
        },
        path,
    )
    assert_same_tensors(read_state_dict(path), state_dict)


@pytest.mark.parametrize("wrapper", ["state_dict", "module."])
def test_unwraps_state_dict_key_and_ddp_prefix(tmp_path, wrapper):
    state_dict = {"a.weight": torch.randn(2, 2), "b": torch.randn(3)}
    path = tmp_path / "wrapped.pt"
    if wrapper == "state_dict":
        torch.save({"state_dict": state_dict, "epoch": 1}, path)
    else:
        torch.save({"module." + k: v for k, v in state_dict.items()}, path)
    assert_same_tensors(read_state_dict(path), state_dict)


def test_reads_safetensors_including_bfloat16(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "w": torch.randn(3, 4),
        "h": torch.randn(5).half(),
        "bf": torch.randn(2, 2).bfloat16(),
        "i": torch.arange(4),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    assert_same_tensors(read_state_dict(path), tensors)


def test_os_system_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "x": Hostile(f"touch {marker}")}, path)
    with pytest.raises(UnsafeCheckpointError, match="system") as info:
        read_state_dict(path)
    assert not marker.exists()
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [
        HostileCall(builtins.eval, "__import__('os').getcwd()"),
        HostileCall(builtins.exec, "x = 1"),
        HostileCall(getattr, "abc", "upper"),
        HostileCall(subprocess.check_call, ["true"]),
        HostileCall(builtins.__import__, "os"),
        HostileCall(zipfile.ZipFile, "x.zip"),
    ],
    ids=["eval", "exec", "getattr", "subprocess", "import", "other-class"],
)
def test_globals_outside_the_allowlist_are_refused(tmp_path, payload):
    path = write_torch_like_zip(tmp_path / "evil.pth", {"model": {}, "x": payload})
    with pytest.raises(UnsafeCheckpointError) as info:
        read_state_dict(path)
    name = payload.func.__name__
    assert name in str(info.value)


def test_refusal_happens_before_any_earlier_object_is_used(tmp_path):
    # The hostile global sits inside the state dict, after real tensors.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_inside.pth"
    torch.save({"model": {"w": torch.ones(2), "z": Hostile(f"touch {marker}")}}, path)
    with pytest.raises(UnsafeCheckpointError):
        read_state_dict(path)
    assert not marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        read_state_dict(tmp_path / "nothing.pth")


def test_unknown_extension(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"PK")
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        read_state_dict(path)


def test_not_a_zip(tmp_path):
    path = tmp_path / "legacy.pth"
    path.write_bytes(b"\x80\x02}q\x00." * 10)
    with pytest.raises(CheckpointError, match="not a zip-format torch checkpoint"):
        read_state_dict(path)


def test_zip_without_a_pickle(tmp_path):
    path = tmp_path / "other.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        read_state_dict(path)


def test_no_tensors(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match="no tensors"):
        read_state_dict(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "full.pth"
    torch.save({"model": _mixed_state_dict()}, path)
    cut = tmp_path / "cut.pth"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        read_state_dict(cut)


def test_storage_too_small_for_the_tensor_is_an_error(tmp_path):
    path = tmp_path / "lying.pth"
    torch.save({"w": torch.arange(6.0)}, path)
    # Shrink the stored bytes of the storage to 2 floats.
    short = tmp_path / "short.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(short, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data/0"):
                data = data[:8]
            dst.writestr(info, data)
    with pytest.raises(CheckpointError, match=r"should hold 6 x FloatStorage = 24 bytes; its "
                                              r"entry holds 8") as error:
        read_state_dict(short)
    assert str(short) in str(error.value)


@pytest.mark.slow
def test_reader_works_where_torch_cannot_be_imported(tmp_path):
    state_dict = _mixed_state_dict()
    path = tmp_path / "mixed.pth"
    torch.save({"model": state_dict, "args": argparse.Namespace(a=1)}, path)
    expected = tmp_path / "expected.npz"
    np.savez(expected, **{k: as_numpy(v) for k, v in state_dict.items()})
    run_without_torch(f"""
        import numpy as np
        from keras_coat.checkpoint import read_state_dict
        arrays = read_state_dict({str(path)!r})
        expected = np.load({str(expected)!r})
        assert sorted(arrays) == sorted(expected.files), sorted(arrays)
        for name in expected.files:
            np.testing.assert_array_equal(arrays[name], expected[name])
        """)
