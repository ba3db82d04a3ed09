"""Crafted checkpoints never make a reader touch memory or files outside what they store.

The torch files here are written by hand (zip or legacy layout, protocol-2 pickles with persistent ids exactly as
torch.save writes them), so that every field can be made to lie; the first tests prove the crafting right by
loading a valid hand-made file in torch.load and in our readers with identical values. Then each lie (a view
beyond its storage, a storage record of the wrong length, a shard outside its folder, a safetensors header with
impossible shapes or offsets) is refused by the shared check, and through it by `cvt convert` (exit 2, one line,
nothing written) and by `from_pretrained` (a `CheckpointError`, not a crash).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from conversion_helpers import assert_one_line_error, cli, leftovers, REPO, TINY_CONFIG
from cvt_core import CvtConfig
from cvt_core.checkpoint import (
    CheckpointError,
    read_safetensors,
    read_safetensors_header,
    read_shard_index,
    read_torch_bin,
    read_weights_file,
)
from cvt_core.torch_pickle import tensor_view_problem
from pickle_ops import Op, enc, glob

HEAD = "classifier.weight"  # (3, 24) in TINY_CONFIG


# ------------------------------------------------------------------------------------------ hand-made pickles


def _call(function: Op, *args) -> Op:
    return Op(enc(function) + enc(tuple(args)) + b"R")


_ORDERED_DICT = _call(glob("collections", "OrderedDict"))
_STORAGE_TYPES = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}


def _tensor(key, offset, size, stride, numel, storage="FloatStorage", legacy=False, pid=None) -> Op:
    """torch._utils._rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict())."""
    if pid is None:
        pid = ("storage", glob("torch", storage), key, "cpu", numel) + ((None,) if legacy else ())
    storage_op = Op(enc(pid) + b"Q")  # BINPERSID
    return _call(glob("torch._utils", "_rebuild_tensor_v2"), storage_op, offset, size, stride, False, _ORDERED_DICT)


def _state_pickle(items) -> bytes:
    body = b"\x80\x02" + bytes(_ORDERED_DICT)
    if items:
        body += b"(" + b"".join(enc(k) + enc(v) for k, v in items.items()) + b"u"  # MARK ... SETITEMS
    return body + b"."


def write_torch_zip(path, items, records) -> None:
    """torch.save's zip layout: archive/data.pkl, archive/data/<key> per storage, byteorder and version."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", _state_pickle(items))
        archive.writestr("archive/byteorder", "little")
        for key, data in records.items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")


LITTLE_ENDIAN_SYS_INFO = dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))


def write_torch_legacy(path, items, records, sys_info=LITTLE_ENDIAN_SYS_INFO, magic=0x1950A86A20F9469CFC6C) -> None:
    """torch.save's pre-1.6 layout: magic, protocol and system pickles, the state pickle, the storage keys, then
    each storage as its element count (int64) and bytes. `magic` or `sys_info` may be opcodes (`Op`)."""
    def dump(value, f):
        f.write(b"\x80\x02" + bytes(value) + b"." if isinstance(value, Op) else pickle.dumps(value, protocol=2))

    with open(path, "wb") as f:
        dump(magic, f)
        dump(1001, f)
        dump(sys_info, f)
        f.write(_state_pickle(items))
        pickle.dump(sorted(records), f, protocol=2)
        for key in sorted(records):
            count, data = records[key]
            f.write(struct.pack("<q", count) + data)


def _contiguous(shape):
    return tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))


def state_as_torch_file(path, state, bad=None, legacy=False) -> None:
    """A whole state dict as a hand-made torch file, zip or `legacy` layout; `bad` (name -> (offset, size, stride,
    numel)) replaces one tensor's view and storage length with lies."""
    items, records = {}, {}
    for i, (name, array) in enumerate(state.items()):
        array = np.asarray(array)
        view = (0, tuple(array.shape), _contiguous(array.shape), array.size)
        if bad and name in bad:
            view = bad[name]
            array = array.reshape(-1)[: view[3]]
        items[name] = _tensor(str(i), *view, storage=_STORAGE_TYPES[array.dtype], legacy=legacy)
        records[str(i)] = (array.size, array.tobytes())
    if legacy:
        write_torch_legacy(path, items, records)
    else:
        write_torch_zip(path, items, {key: data for key, (_, data) in records.items()})


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


def _assert_convert_refuses(folder, tmp_path, *fragments):
    """`cvt convert FOLDER DST --no-check` exits 2 with one line holding every fragment, and writes nothing."""
    dst = tmp_path / "dst"
    assert_one_line_error(*cli("convert", folder, dst, "--to", "torch", "--no-check"), *fragments)
    assert not os.path.exists(dst)
    assert leftovers(os.path.dirname(dst)) == []


def _assert_from_pretrained_refuses(folder, fragment):
    from cvt_torch import CvtForImageClassification

    with pytest.raises(CheckpointError) as exc:
        CvtForImageClassification.from_pretrained(folder)
    assert fragment in _one_line(exc)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder with config.json and model.safetensors, its state dict as NumPy arrays)."""
    from conversion.pipeline import make_random_checkpoint

    root = tmp_path_factory.mktemp("safety") / "src"
    make_random_checkpoint(str(root), CvtConfig(**TINY_CONFIG), seed=3)
    state = {k: np.array(v) for k, v in read_safetensors(str(root / "model.safetensors")).items()}
    return root, state


def _folder_with(tmp_path, tiny, name, writer):
    """A checkpoint folder: tiny's config.json plus the file `writer(path)` writes under `name`."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(tiny[0] / "config.json", folder / "config.json")
    writer(folder / name)
    return folder


# ------------------------------------------------------------------------------------------ the crafting is right
def test_hand_made_torch_files_load_identically_in_torch_and_our_readers(tmp_path):
    def items(legacy):
        return {
            "strided": _tensor("0", 1, (3, 2), (1, 3), 12, legacy=legacy),  # a transposed view at an offset
            "shares-storage": _tensor("0", 11, (), (), 12, legacy=legacy),  # a scalar, the storage's last element
            "broadcast": _tensor("0", 4, (2, 3), (0, 1), 12, legacy=legacy),  # stride 0
            "empty": _tensor("1", 0, (0, 5), (5, 1), 0, legacy=legacy),
            "long": _tensor("2", 0, (2,), (1,), 2, storage="LongStorage", legacy=legacy),
        }

    data, longs = np.arange(12, dtype=np.float32), np.array([7, -9], np.int64)
    write_torch_zip(tmp_path / "ok.bin", items(False), {"0": data.tobytes(), "1": b"", "2": longs.tobytes()})
    write_torch_legacy(tmp_path / "ok.pt", items(True),
                       {"0": (12, data.tobytes()), "1": (0, b""), "2": (2, longs.tobytes())})
    expected = torch.load(tmp_path / "ok.bin", weights_only=True)
    assert list(expected) == list(items(False))
    legacy = torch.load(tmp_path / "ok.pt", weights_only=True)
    for key, tensor in expected.items():
        np.testing.assert_array_equal(legacy[key].numpy(), tensor.numpy(), err_msg=key)
    for ours in (read_torch_bin(str(tmp_path / "ok.bin")), read_torch_bin(str(tmp_path / "ok.pt"))):
        assert list(ours) == list(expected)
        for key, tensor in expected.items():
            assert ours[key].dtype == tensor.numpy().dtype and ours[key].shape == tuple(tensor.shape), key
            np.testing.assert_array_equal(ours[key], tensor.numpy(), err_msg=key)
    np.testing.assert_array_equal(expected["strided"].numpy(), data[1:7].reshape(2, 3).T)


def test_hand_made_state_dict_converts_like_the_original(tiny, tmp_path):
    folder = _folder_with(tmp_path, tiny, "pytorch_model.bin", lambda p: state_as_torch_file(p, tiny[1]))
    loaded = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert {k: v.numpy().tolist() for k, v in loaded.items()} == {k: v.tolist() for k, v in tiny[1].items()}
    code, out, err = cli("convert", folder, tmp_path / "dst", "--to", "torch", "--no-check")
    assert code == 0, err
    written = read_safetensors(str(tmp_path / "dst" / "model.safetensors"))
    for key, value in tiny[1].items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


# ------------------------------------------------------------------------------------------ the view check
def test_tensor_view_problem_allows_exactly_the_views_inside_the_storage():
    inside = [(0, (3, 4), (4, 1)), (11, (), ()), (0, (12,), (1,)), (1, (3, 2), (1, 3)), (12, (0, 5), (5, 1)),
              (5, (1000, 1000), (0, 0)), (0, (2, 2), (10, 1))]
    outside = [(0, (13,), (1,)), (12, (), ()), (1, (12,), (1,)), (13, (0,), (1,)), (0, (2, 2), (11, 1)),
               (0, (2,), (2 ** 62,)), (-1, (2,), (1,)), (4, (2,), (-1,)), (0, (2, -1), (1, 1)), (0, (2, 2), (1,)),
               (0, (True,), (1,)), (0.0, (2,), (1,)), (0, (2.0,), (1,)), (0, 2, 1), ("0", (2,), (1,))]
    for view in inside:
        assert tensor_view_problem(12, *view) is None, view
    for view in outside:
        assert tensor_view_problem(12, *view) is not None, view


BAD_VIEWS = {
    # name -> (offset, size, stride, storage numel) for the (3, 24) classifier weight, and the error it gives
    "view-larger-than-storage": ((0, (3, 24), (24, 1), 8), "reaches beyond its storage of 8 elements"),
    "huge-stride": ((0, (3, 24), (2 ** 40, 1), 72), "reaches beyond its storage"),
    "offset-past-the-end": ((70, (3, 24), (24, 1), 72), "reaches beyond its storage"),
    "negative-offset": ((-24, (3, 24), (24, 1), 72), "negative offset"),
    "negative-stride": ((48, (3, 24), (-24, 1), 72), "negative offset, size or stride"),
    "size-stride-length-mismatch": ((0, (3, 24), (24,), 72), "2 sizes but 1 strides"),
    "bool-size": ((0, (3, True), (24, 1), 72), "non-integer"),
    "float-offset": ((0.0, (3, 24), (24, 1), 72), "non-integer"),
}


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("case", sorted(BAD_VIEWS))
def test_tensor_view_outside_its_storage_is_refused(tiny, tmp_path, case, layout):
    view, fragment = BAD_VIEWS[case]
    state_as_torch_file(tmp_path / "bad.bin", tiny[1], bad={HEAD: view}, legacy=layout == "legacy")
    with pytest.raises(CheckpointError, match="refusing to load") as exc:
        read_torch_bin(str(tmp_path / "bad.bin"))
    assert fragment in _one_line(exc) and str(tmp_path / "bad.bin") in str(exc.value)


_FLOAT = glob("torch", "FloatStorage")
STORAGE_LIES = {
    # name -> (persistent ids of the tensors, each viewed as (3,); the zip's records; the error it gives)
    "record-shorter-than-numel": ([("storage", _FLOAT, "0", "cpu", 12)], {"0": b"\0" * 20},
                                  "storage 0 holds 20 bytes, but the pickle says 12 FloatStorage elements"),
    "record-longer-than-numel": ([("storage", _FLOAT, "0", "cpu", 3)], {"0": b"\0" * 48}, "storage 0 holds 48 bytes"),
    "missing-record": ([("storage", _FLOAT, "7", "cpu", 3)], {"0": b"\0" * 12}, "storage 7 is missing"),
    "unknown-storage-type": ([("storage", glob("torch", "ComplexFloatStorage"), "0", "cpu", 3)], {"0": b"\0" * 24},
                             "storage type torch.ComplexFloatStorage is not supported"),
    "negative-numel": ([("storage", _FLOAT, "0", "cpu", -3)], {"0": b"\0" * 12}, "corrupt persistent id"),
    "bool-numel": ([("storage", _FLOAT, "0", "cpu", True)], {"0": b"\0" * 4}, "corrupt persistent id"),
    "non-string-key": ([("storage", _FLOAT, 0, "cpu", 3)], {"0": b"\0" * 12}, "corrupt persistent id"),
    "key-with-a-path": ([("storage", _FLOAT, "../0", "cpu", 3)], {"0": b"\0" * 12}, "corrupt persistent id"),
    "short-persistent-id": ([("storage", _FLOAT)], {"0": b"\0" * 12}, "unsupported persistent id"),
    "storage-type-not-a-type": ([("storage", "FloatStorage", "0", "cpu", 3)], {"0": b"\0" * 12},
                                "unsupported storage type"),
    "same-storage-two-lengths": ([("storage", _FLOAT, "0", "cpu", 3), ("storage", _FLOAT, "0", "cpu", 4)],
                                 {"0": b"\0" * 12}, "storage 0 is named as FloatStorage of 4 elements"),
}


@pytest.mark.parametrize("case", sorted(STORAGE_LIES))
def test_storage_record_that_disagrees_with_the_pickle_is_refused(tmp_path, case):
    pids, records, fragment = STORAGE_LIES[case]
    items = {f"w{i}": _tensor(None, 0, (3,), (1,), None, pid=pid) for i, pid in enumerate(pids)}
    write_torch_zip(tmp_path / "bad.bin", items, records)
    with pytest.raises(CheckpointError) as exc:
        read_torch_bin(str(tmp_path / "bad.bin"))
    assert fragment in _one_line(exc)


LEGACY_STORAGE_LIES = {
    # name -> (persistent ids of the tensors, each viewed as (3,); the stored (count, bytes) per key; the error)
    "count-disagrees-with-the-pickle": ([("storage", _FLOAT, "0", "cpu", 12, None)], {"0": (8, b"\0" * 32)},
                                        "storage 0 holds 8 elements, but the pickle says 12 FloatStorage elements"),
    "bytes-shorter-than-the-count": ([("storage", _FLOAT, "0", "cpu", 12, None)], {"0": (12, b"\0" * 20)},
                                     "truncated or corrupt: storage 0 needs bytes"),
    "storage-missing-from-the-list": ([("storage", _FLOAT, "7", "cpu", 3, None)], {}, "storage 7 is missing"),
    "storage-no-tensor-uses": ([("storage", _FLOAT, "0", "cpu", 3, None)], {"0": (3, b"\0" * 12), "1": (1, b"\0" * 4)},
                               "the storage list names '1', which no tensor uses"),
    "storage-view-past-the-end": ([("storage", _FLOAT, "0", "cpu", 4, ("9", 2, 3))], {"0": (4, b"\0" * 16)},
                                  "storage view ('9', 2, 3) does not lie inside storage 0 of 4 elements"),
    "storage-view-not-a-triple": ([("storage", _FLOAT, "0", "cpu", 4, ("9", 0))], {"0": (4, b"\0" * 16)},
                                  "does not lie inside storage 0"),
    "zip-style-persistent-id": ([("storage", _FLOAT, "0", "cpu", 3)], {"0": (3, b"\0" * 12)},
                                "unsupported persistent id"),
    "same-storage-two-lengths": ([("storage", _FLOAT, "0", "cpu", 3, None), ("storage", _FLOAT, "0", "cpu", 4, None)],
                                 {"0": (3, b"\0" * 12)}, "storage 0 is named as FloatStorage of 4 elements"),
    "negative-numel": ([("storage", _FLOAT, "0", "cpu", -3, None)], {"0": (3, b"\0" * 12)}, "corrupt persistent id"),
}


@pytest.mark.parametrize("case", sorted(LEGACY_STORAGE_LIES))
def test_legacy_storage_that_disagrees_with_the_pickle_is_refused(tmp_path, case):
    pids, records, fragment = LEGACY_STORAGE_LIES[case]
    items = {f"w{i}": _tensor(None, 0, (3,), (1,), None, pid=pid) for i, pid in enumerate(pids)}
    write_torch_legacy(tmp_path / "bad.pt", items, records)
    with pytest.raises(CheckpointError) as exc:
        read_torch_bin(str(tmp_path / "bad.pt"))
    assert fragment in _one_line(exc) and str(tmp_path / "bad.pt") in str(exc.value)


def test_legacy_view_into_a_storage_reads_only_its_elements(tmp_path):
    # old torch versions pickled views into a storage: (view key, offset, size) after the root storage's id
    data = np.arange(6, dtype=np.float32)
    items = {"w": _tensor(None, 1, (2,), (1,), None, pid=("storage", _FLOAT, "0", "cpu", 6, ("9", 2, 3)))}
    write_torch_legacy(tmp_path / "view.pt", items, {"0": (6, data.tobytes())})
    np.testing.assert_array_equal(read_torch_bin(str(tmp_path / "view.pt"))["w"], data[3:5])


def test_legacy_file_whose_pickles_ask_for_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "PWNED"
    touch = _call(glob("os", "system"), f"touch {marker}")
    write_torch_legacy(tmp_path / "object.pt", {"w": touch}, {})
    write_torch_legacy(tmp_path / "sys-info.pt", {}, {}, sys_info=touch)
    write_torch_legacy(tmp_path / "magic.pt", {}, {}, magic=touch)
    for name, fragment in (("object.pt", "refusing to load: the pickle asks for os.system"),
                           ("sys-info.pt", "refusing to load: the pickle asks for os.system"),
                           ("magic.pt", "not a PyTorch checkpoint")):
        with pytest.raises(CheckpointError) as exc:
            read_torch_bin(str(tmp_path / name))
        assert fragment in _one_line(exc), name
    assert not marker.exists()


@pytest.mark.parametrize("case, fragment", [
    ("wrong-magic", "not a PyTorch checkpoint"),
    ("big-endian", "big-endian byte order, which is not supported"),
    ("sys-info-not-a-dict", "the system information is [1]"),
])
def test_legacy_header_that_is_not_torch_save_s_is_refused(tmp_path, case, fragment):
    items, records = {"w": _tensor("0", 0, (3,), (1,), 3, legacy=True)}, {"0": (3, b"\0" * 12)}
    options = {"wrong-magic": dict(magic=12345), "big-endian": dict(sys_info=dict(LITTLE_ENDIAN_SYS_INFO,
               little_endian=False)), "sys-info-not-a-dict": dict(sys_info=[1])}[case]
    write_torch_legacy(tmp_path / "bad.pt", items, records, **options)
    with pytest.raises(CheckpointError) as exc:
        read_torch_bin(str(tmp_path / "bad.pt"))
    assert fragment in _one_line(exc)


def test_legacy_file_cut_anywhere_is_refused_in_one_line(tmp_path):
    data = np.arange(12, dtype=np.float32)
    write_torch_legacy(tmp_path / "ok.pt", {"a": _tensor("0", 1, (3, 2), (1, 3), 12, legacy=True),
                                            "b": _tensor("1", 0, (2,), (1,), 2, storage="LongStorage", legacy=True)},
                       {"0": (12, data.tobytes()), "1": (2, np.array([3, 4], np.int64).tobytes())})
    whole = (tmp_path / "ok.pt").read_bytes()
    assert set(read_torch_bin(str(tmp_path / "ok.pt"))) == {"a", "b"}
    for cut in range(1, len(whole)):
        (tmp_path / "cut.pt").write_bytes(whole[:cut])
        with pytest.raises(CheckpointError) as exc:
            read_torch_bin(str(tmp_path / "cut.pt"))
        text = _one_line(exc)
        assert "truncated or corrupt" in text or "not a PyTorch checkpoint" in text, (cut, text)


def test_rebuilding_a_tensor_from_something_that_is_not_a_storage_is_refused(tmp_path):
    fake = _call(glob("torch._utils", "_rebuild_tensor_v2"), 5, 0, (3,), (1,), False, _ORDERED_DICT)
    write_torch_zip(tmp_path / "bad.bin", {"w": fake}, {})
    with pytest.raises(CheckpointError, match="rebuilt from int, not from a storage") as exc:
        read_torch_bin(str(tmp_path / "bad.bin"))
    _one_line(exc)


# ------------------------------------------------------------------------------------------ through the commands
@pytest.mark.parametrize("case", ["view-larger-than-storage", "negative-offset"])
def test_convert_refuses_a_view_outside_its_storage_and_writes_nothing(tiny, tmp_path, case):
    view, fragment = BAD_VIEWS[case]
    folder = _folder_with(tmp_path, tiny, "pytorch_model.bin", lambda p: state_as_torch_file(p, tiny[1], {HEAD: view}))
    _assert_convert_refuses(folder, tmp_path, "pytorch_model.bin", fragment)


def test_from_pretrained_raises_checkpoint_error_for_a_view_outside_its_storage(tiny, tmp_path):
    # a stride of 2**40 elements used to crash the process (segmentation fault); hence the child process
    view, fragment = BAD_VIEWS["huge-stride"]
    folder = _folder_with(tmp_path, tiny, "pytorch_model.bin", lambda p: state_as_torch_file(p, tiny[1], {HEAD: view}))
    script = ("import sys\n"
              "from cvt_core.checkpoint import CheckpointError\n"
              "from cvt_torch import CvtForImageClassification\n"
              "try:\n"
              "    CvtForImageClassification.from_pretrained(sys.argv[1])\n"
              "except CheckpointError as exc:\n"
              "    print('CheckpointError:', exc)\n"
              "else:\n"
              "    print('loaded')\n")
    run = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert run.stdout.startswith("CheckpointError:") and fragment in run.stdout, run.stdout


def test_convert_refuses_a_legacy_format_file_with_a_view_outside_its_storage(tiny, tmp_path):
    # the pre-1.6 layout goes through the same unpickler and the same view check as the zip layout
    def write(path):
        write_torch_legacy(path, {HEAD: _tensor("0", 0, (3, 24), (24, 1), 8, legacy=True)},
                           {"0": (8, np.zeros(8, np.float32).tobytes())})

    folder = _folder_with(tmp_path, tiny, "pytorch_model.bin", write)
    _assert_convert_refuses(folder, tmp_path, "pytorch_model.bin", "refusing to load",
                            "reaches beyond its storage of 8 elements")


# ------------------------------------------------------------------------------------------ shard indexes
def _index_folder(tmp_path, tiny, shard_name, index_name="model.safetensors.index.json"):
    """A checkpoint folder whose index maps every tensor to `shard_name`; a valid copy of the weights lies one
    level up (`../outside.safetensors`) and in the folder itself (`model-00001.safetensors`)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(tiny[0] / "config.json", folder / "config.json")
    shutil.copy(tiny[0] / "model.safetensors", tmp_path / "outside.safetensors")
    shutil.copy(tiny[0] / "model.safetensors", folder / "model-00001.safetensors")
    shard = shard_name(tmp_path) if callable(shard_name) else shard_name
    weight_map = {name: shard for name in tiny[1]}
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, folder / index_name


BAD_SHARDS = {
    "absolute-path": (lambda root: str(root / "outside.safetensors"), "a shard must be a plain file name"),
    "dot-dot": ("../outside.safetensors", "a shard must be a plain file name"),
    "sub-folder": ("sub/model-00001.safetensors", "a shard must be a plain file name"),
    "backslash": ("..\\outside.safetensors", "a shard must be a plain file name"),
    "empty-name": ("", "a shard must be a plain file name"),
    "non-string": (5, "names shard 5, not a file name"),
    "the-index-itself": ("model.safetensors.index.json", "names the index file"),
    "another-index": ("other.safetensors.index.json", "names the index file"),
    "missing-shard": ("model-00002.safetensors", "no such file, though the shard index"),
}


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_shard_index_naming_anything_but_a_file_in_its_folder_is_refused(tiny, tmp_path, case):
    shard, fragment = BAD_SHARDS[case]
    _, index = _index_folder(tmp_path, tiny, shard)
    for reader in (read_weights_file, read_shard_index):
        with pytest.raises(CheckpointError) as exc:
            reader(str(index))
        assert fragment in _one_line(exc), reader


@pytest.mark.parametrize("index", [[], {"weight_map": ["a"]}, {"weight_map": None}, {"metadata": {}}])
def test_shard_index_that_is_not_an_object_with_a_weight_map_is_refused(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for reader in (read_weights_file, read_shard_index):
        with pytest.raises(CheckpointError, match="needs a 'weight_map' object") as exc:
            reader(str(tmp_path / "model.safetensors.index.json"))
        _one_line(exc)


def test_shard_index_accepts_a_symlinked_shard_as_in_hugging_face_caches(tiny, tmp_path):
    folder, index = _index_folder(tmp_path, tiny, "model-00001-of-00001.safetensors")
    os.symlink(tmp_path / "outside.safetensors", folder / "model-00001-of-00001.safetensors")
    assert read_shard_index(str(index)) == {str(folder / "model-00001-of-00001.safetensors"): list(tiny[1])}
    state = read_weights_file(str(index))
    assert set(state) == set(tiny[1])


@pytest.mark.parametrize("case", ["absolute-path", "dot-dot", "the-index-itself", "non-string"])
def test_convert_and_from_pretrained_refuse_a_shard_outside_the_folder(tiny, tmp_path, case):
    shard, fragment = BAD_SHARDS[case]
    folder, _ = _index_folder(tmp_path, tiny, shard)
    _assert_convert_refuses(folder, tmp_path, "index.json", fragment)
    _assert_from_pretrained_refuses(folder, fragment)


def test_convert_refuses_a_bin_shard_index_naming_a_file_outside_the_folder(tiny, tmp_path):
    folder, _ = _index_folder(tmp_path, tiny, "../outside.bin", index_name="pytorch_model.bin.index.json")
    state_as_torch_file(tmp_path / "outside.bin", tiny[1])
    _assert_convert_refuses(folder, tmp_path, "a shard must be a plain file name")


# ------------------------------------------------------------------------------------------ safetensors headers
def _write_raw_safetensors(path, header, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


BAD_HEADERS = {
    # name -> (entry for tensor "w" over 16 data bytes, error fragment)
    "negative-shape": ({"dtype": "F32", "shape": [-1, 2], "data_offsets": [8, 0]}, "non-negative integers"),
    "float-shape": ({"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 16]}, "non-negative integers"),
    "bool-shape": ({"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}, "non-negative integers"),
    "shape-not-a-list": ({"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}, "non-negative integers"),
    "end-beyond-data": ({"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}, "claims bytes 0..32 of 16"),
    "begin-after-end": ({"dtype": "F32", "shape": [0], "data_offsets": [16, 8]}, "claims bytes 16..8 of 16"),
    "negative-begin": ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "claims bytes -8..0"),
    "length-disagrees": ({"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}, "12 bytes) claims bytes 0..16"),
    "float-offsets": ({"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16]}, "is not two integers"),
    "three-offsets": ({"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}, "is not two integers"),
    "size-overflows-int64": ({"dtype": "F32", "shape": [2 ** 32, 2 ** 32], "data_offsets": [0, 0]}, "claims bytes"),
    "unknown-dtype": ({"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}, "tensor dtype 'C64' is not supported"),
    "entry-not-an-object": ([1, 2], "corrupt entry for tensor 'w'"),
    "dtype-not-a-string": ({"dtype": 4, "shape": [4], "data_offsets": [0, 16]}, "corrupt entry for tensor 'w'"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_safetensors_header_with_impossible_shape_or_offsets_is_refused(tmp_path, case):
    entry, fragment = BAD_HEADERS[case]
    path = tmp_path / "model.safetensors"
    _write_raw_safetensors(path, {"__metadata__": {"format": "pt"}, "w": entry}, b"\0" * 16)
    for reader in (read_safetensors, read_safetensors_header):
        with pytest.raises(CheckpointError) as exc:
            reader(str(path))
        assert fragment in _one_line(exc), reader


@pytest.mark.parametrize("header", [[1, 2], "text", {"__metadata__": [1]}])
def test_safetensors_header_that_is_not_an_object_is_refused(tmp_path, header):
    path = tmp_path / "model.safetensors"
    _write_raw_safetensors(path, header, b"")
    for reader in (read_safetensors, read_safetensors_header):
        with pytest.raises(CheckpointError, match="corrupt safetensors header") as exc:
            reader(str(path))
        _one_line(exc)


def test_valid_safetensors_header_gives_absolute_byte_ranges(tmp_path):
    path = tmp_path / "model.safetensors"
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "e": {"dtype": "I64", "shape": [0, 3], "data_offsets": [8, 8]},
              "b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]}}
    _write_raw_safetensors(path, header, np.arange(2, dtype=np.float32).tobytes() + np.ones(4, np.float16).tobytes())
    start = 8 + len(json.dumps(header).encode())
    parsed = read_safetensors_header(str(path))
    assert parsed.tensors == {"a": (np.dtype("<f4"), (2,), start, start + 8),
                              "e": (np.dtype("<i8"), (0, 3), start + 8, start + 8),
                              "b": (np.dtype("<f2"), (2, 2), start + 8, start + 16)}
    arrays = read_safetensors(str(path))
    np.testing.assert_array_equal(arrays["b"], np.ones((2, 2), np.float16))
    assert arrays["e"].shape == (0, 3) and math.prod(arrays["e"].shape) == 0


@pytest.mark.parametrize("case", ["negative-shape", "float-shape"])
def test_convert_and_from_pretrained_refuse_a_safetensors_header_with_impossible_shapes(tiny, tmp_path, case):
    # the classifier weight's shape (3, 24) stored as [3.0, 24.0] (which int() would accept) or [-3, -24] (whose
    # product is still 72); its data_offsets stay right
    fragment = BAD_HEADERS[case][1]
    raw = (tiny[0] / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + header_len])
    header[HEAD]["shape"] = [float(d) if case == "float-shape" else -d for d in header[HEAD]["shape"]]
    data_start = 8 + header_len
    folder = _folder_with(tmp_path, tiny, "model.safetensors",
                          lambda p: _write_raw_safetensors(p, header, raw[data_start:]))
    _assert_convert_refuses(folder, tmp_path, "model.safetensors", fragment)
    _assert_from_pretrained_refuses(folder, fragment)
