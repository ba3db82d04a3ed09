"""The torch.save reader interprets pickles itself, so a crafted `pytorch_model.bin` can neither steer it nor make
it allocate what the file does not hold.

Real torch.save files (zip and legacy layouts) still read equal to torch.load. Then hand-made pickles and zips try
what once worked against a `pickle.Unpickler` subclass and `zipfile`: state given by BUILD to allowed globals,
`_rebuild_parameter` of a non-tensor, a huge memo index, deep nesting, strings declaring more bytes than exist,
opcodes that make objects, compressed records (a zip bomb), records that fail their CRC when read lazily, paths
that are not regular files, complex storages. Each is refused in one `CheckpointError` line naming the file; the
memory cases run in a child process whose address space is limited to 1 GiB.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cvt_core.checkpoint import (
    CheckpointError,
    open_checkpoint,
    read_safetensors,
    read_torch_bin,
    read_weights_file,
)
from cvt_core.untrusted import Limits
from pickle_ops import Op, enc, glob

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ hand-made pickles
def call(function: Op, *args) -> Op:
    return Op(enc(function) + enc(tuple(args)) + b"R")


ORDERED_DICT = call(glob("collections", "OrderedDict"))


def storage(key="0", numel=3, kind="FloatStorage", legacy=False) -> Op:
    """A persistent id as torch.save writes it, loaded (BINPERSID)."""
    pid = ("storage", glob("torch", kind), key, "cpu", numel) + ((None,) if legacy else ())
    return Op(enc(pid) + b"Q")


def tensor(key="0", offset=0, size=(3,), stride=(1,), numel=3, kind="FloatStorage", legacy=False, of=None) -> Op:
    """torch._utils._rebuild_tensor_v2(<storage>, offset, size, stride, False, OrderedDict())."""
    source = of if of is not None else storage(key, numel, kind, legacy)
    return call(glob("torch._utils", "_rebuild_tensor_v2"), source, offset, size, stride, False, ORDERED_DICT)


def state_pickle(items, proto=b"\x80\x02") -> bytes:
    """An OrderedDict of `items` (name -> opcodes or value), as torch.save pickles a state dict."""
    body = proto + bytes(ORDERED_DICT)
    if items:
        body += b"(" + b"".join(enc(k) + enc(v) for k, v in items.items()) + b"u"
    return body + b"."


def write_zip(path, data_pkl: bytes, records=None, prefix="archive/") -> None:
    """torch.save's zip layout written by Python's zipfile (every record stored, as torch.save writes them)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(prefix + "data.pkl", data_pkl)
        archive.writestr(prefix + "byteorder", "little")
        for key, data in (records or {}).items():
            archive.writestr(f"{prefix}data/{key}", data)
        archive.writestr(prefix + "version", "3\n")


def write_legacy(path, state: bytes, records=None, magic=None, sys_info=None, keys=None) -> None:
    """torch.save's pre-1.6 layout: magic, protocol, system information, the state pickle, the storage keys, then
    each storage as its element count (int64) and bytes. The pickles may be given as raw bytes."""
    records = records or {}

    def dump(value):
        return value if isinstance(value, bytes) else pickle.dumps(value, protocol=2)

    info = dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))
    with open(path, "wb") as f:
        f.write(dump(0x1950A86A20F9469CFC6C if magic is None else magic) + dump(1001))
        f.write(dump(info if sys_info is None else sys_info) + state)
        f.write(dump(sorted(records) if keys is None else keys))
        for key in sorted(records):
            count, data = records[key]
            f.write(struct.pack("<q", count) + data)


THREE = np.array([1.5, -2.0, 3.25], np.float32)


def refused(path, *fragments, reader=read_torch_bin) -> str:
    """The one-line CheckpointError `reader(path)` raises, checked to name the file and hold every fragment."""
    with pytest.raises(CheckpointError) as exc:
        reader(str(path))
    text = str(exc.value)
    assert "\n" not in text and text.startswith(str(path)), text
    for fragment in fragments:
        assert fragment in text, text
    return text


# ------------------------------------------------------------------------------------------ hand-made zips
_LOCAL = struct.Struct("<4s5H3L2H")
_CENTRAL = struct.Struct("<4s6H3L5H2L")


def raw_zip(members) -> bytes:
    """A zip built byte by byte: each member is a dict with `name` and `data` and optional lies: `method`, `crc`,
    `csize`, `usize` (in both headers), `local` (False: no local header, only a directory entry at `header`);
    `zip64`: the directory entry gives its sizes and offset in a zip64 extra field, as for records past 4 GiB."""
    out, directory = bytearray(), bytearray()
    for m in members:
        name, data = m["name"].encode(), m["data"]
        method, crc = m.get("method", 0), m.get("crc", zlib.crc32(data))
        csize, usize = m.get("csize", len(data)), m.get("usize", len(data))
        header = m.get("header", len(out))
        if m.get("local", True):
            wide = 0xFFFFFFFF if m.get("zip64") else None
            out += _LOCAL.pack(b"PK\x03\x04", 20, 0, method, 0, 0, crc, wide or csize, wide or usize, len(name), 0) \
                + name + data
        extra = b""
        if m.get("zip64"):
            extra = struct.pack("<HHQQQ", 1, 24, usize, csize, header)
            csize = usize = header = 0xFFFFFFFF
        directory += _CENTRAL.pack(b"PK\x01\x02", 45, 45, 0, method, 0, 0, crc, csize, usize, len(name), len(extra),
                                   0, 0, 0, 0, header) + name + extra
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory), len(out), 0)
    return bytes(out + directory + end)


def local_header(name: str, data: bytes) -> bytes:
    return _LOCAL.pack(b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data), len(name), 0) \
        + name.encode()


def torch_members(data_pkl: bytes, records) -> list:
    return [dict(name="archive/data.pkl", data=data_pkl), dict(name="archive/byteorder", data=b"little")] + \
        [dict(name=f"archive/data/{key}", data=data) for key, data in records.items()] + \
        [dict(name="archive/version", data=b"3\n")]


def deflate_zeros(periods: int) -> bytes:
    """A raw deflate stream (one fixed-Huffman block: a zero, then matches of 258 bytes at distance 1) inflating to
    1 + 258 * (32 + 8 * periods) zero bytes: each 13-byte period holds 8 matches, so it is written once and
    repeated, and a stream inflating to 1 GiB costs nothing to make."""
    bits = []

    def value(v, n):  # plain values: least significant bit first
        bits.extend((v >> i) & 1 for i in range(n))

    def code(c, n):  # Huffman codes: most significant bit first
        bits.extend((c >> i) & 1 for i in reversed(range(n)))

    value(1, 1)  # BFINAL
    value(1, 2)  # fixed Huffman codes
    code(0x30, 8)  # literal 0
    for _ in range(32):
        code(0xC5, 8)  # length 258
        code(0, 5)  # distance 1
    code(0, 7)  # end of block
    bits.extend([0] * (-len(bits) % 8))
    small = bytes(sum(b << i for i, b in enumerate(bits[k:k + 8])) for k in range(0, len(bits), 8))
    return small[:15] + small[2:15] * periods + small[15:]


def test_the_crafted_deflate_stream_inflates_to_what_it_says():
    for periods in (0, 3):
        assert zlib.decompress(deflate_zeros(periods), -15) == bytes(1 + 258 * (32 + 8 * periods))


# ------------------------------------------------------------------------------------------ real files still read
def _real_state():
    """What the reader must carry bit for bit: a module's state dict (BatchNorm's int64 num_batches_tracked, the
    OrderedDict's _metadata), bfloat16 and float16, views sharing one storage at offsets, non-contiguous strides."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    module(torch.randn(5, 3))  # training mode: the running statistics and num_batches_tracked move
    state = module.state_dict()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    state.update({
        "transposed": base.t(), "slice": base[1:3, 2:5], "scalar": base[3, 5], "same-storage": base,
        "bf16": (base - 1).bfloat16(), "fp16": (base * 3).half(), "int64": torch.tensor([-(2 ** 40), 0, 7]),
        "bool": torch.tensor([True, False]), "uint8": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 5), "every-other": torch.arange(10.0)[::2],
    })
    return module, state


def _same(ours, expected):
    assert list(ours) == list(expected)
    for key, value in expected.items():
        array = ours[key]
        assert array.shape == tuple(value.shape), key
        if value.dtype == torch.bfloat16:
            np.testing.assert_array_equal(array.astype(np.float32), value.float().numpy(), err_msg=key)
        else:
            assert array.dtype == value.numpy().dtype, key
            np.testing.assert_array_equal(array, value.numpy(), err_msg=key)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("wrapping", ["flat", "parameters", "training-checkpoint"])
def test_real_torch_save_files_read_equal_to_torch_load(tmp_path, layout, wrapping):
    module, state = _real_state()
    if wrapping == "parameters":  # keep_vars: Parameters pickled through torch._utils._rebuild_parameter
        obj = module.state_dict(keep_vars=True)
    elif wrapping == "training-checkpoint":  # plain values, tuples and int keys beside the state dict
        optimizer = torch.optim.Adam(module.parameters())
        module(torch.randn(5, 3)).sum().backward()
        optimizer.step()
        obj = {"epoch": 3, "model": state, "optimizer": optimizer.state_dict(), "best": 0.5, "note": None}
    else:
        obj = state
    path = tmp_path / "weights.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=layout == "zip")
    loaded = torch.load(path, weights_only=True)
    expected = loaded["model"] if wrapping == "training-checkpoint" else loaded
    expected = {k: v.detach() for k, v in expected.items()}
    _same(read_torch_bin(str(path)), expected)
    with open_checkpoint(str(path)) as lazy:
        _same(lazy, expected)


def test_tensors_sharing_a_storage_share_one_read_of_it(tmp_path):
    base = torch.arange(12.0)
    torch.save({"a": base[:6], "b": base[6:], "c": base.reshape(3, 4).t()}, tmp_path / "w.bin")
    with open_checkpoint(str(tmp_path / "w.bin")) as lazy:
        a, b, c = lazy["a"], lazy["b"], lazy["c"]
        assert np.shares_memory(a, c) and np.shares_memory(b, c)
        np.testing.assert_array_equal(c, base.reshape(3, 4).t().numpy())
        assert not a.flags.writeable


# ------------------------------------------------------------------------------------------ steering the machine
def build_steering(legacy: bool) -> dict:
    """name -> (the value of tensor "w", the refusal): each BUILD would give a non-tensor a tensor's attributes."""
    def build(target: bytes, state) -> Op:
        return Op(bytes(target) + enc(state) + b"b")

    fake_view = {"storage": storage(legacy=legacy), "offset": 0, "size": (2 ** 30,), "stride": (1,)}
    return {
        "ordered-dict-given-a-storage-and-a-view": (build(ORDERED_DICT, fake_view),
                                                    "an OrderedDict's state holds a storage, not a plain value"),
        "ordered-dict-given-plain-tensor-attributes": (
            build(ORDERED_DICT, {"offset": 0, "size": (2 ** 30,), "stride": (1,)}), "'w' is dict, not a tensor"),
        "set-given-tensor-attributes": (build(call(glob("builtins", "set"), ()), {"size": (2 ** 30,)}),
                                        "the pickle asks for builtins.set"),
        "empty-dict-given-state": (build(b"}", {"size": (9,)}), "sets the state of dict"),
        "tensor-given-a-new-size": (build(tensor(legacy=legacy), {"size": (2 ** 30,)}), "sets the state of a tensor"),
        "storage-given-a-new-length": (build(storage(legacy=legacy), {"numel": 2 ** 30}),
                                       "sets the state of a storage"),
        "ordered-dict-given-a-tuple-state": (build(ORDERED_DICT, ({"a": 1}, {"b": 2})),
                                             "an OrderedDict's state is tuple, not a dict"),
    }


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("case", sorted(build_steering(False)))
def test_build_cannot_give_an_allowed_object_tensor_attributes(tmp_path, case, layout):
    value, fragment = build_steering(layout == "legacy")[case]
    if layout == "zip":
        write_zip(tmp_path / "bad.bin", state_pickle({"w": value}), {"0": THREE.tobytes()})
    else:
        write_legacy(tmp_path / "bad.bin", state_pickle({"w": value}), {"0": (3, THREE.tobytes())})
    refused(tmp_path / "bad.bin", fragment)


@pytest.mark.parametrize("argument, fragment", [
    (5, "a parameter is rebuilt from int, not from a tensor"),
    (ORDERED_DICT, "a parameter is rebuilt from dict, not from a tensor"),
    (storage(), "a parameter is rebuilt from a storage, not from a tensor"),
    ((storage(), 0, (2 ** 30,), (1,)), "a parameter is rebuilt from tuple, not from a tensor"),
    (glob("torch", "FloatStorage"), "rebuilt from the global torch.FloatStorage"),
])
def test_rebuild_parameter_of_anything_but_a_tensor_is_refused(tmp_path, argument, fragment):
    parameter = call(glob("torch._utils", "_rebuild_parameter"), argument, True, ORDERED_DICT)
    write_zip(tmp_path / "bad.bin", state_pickle({"w": parameter}), {"0": THREE.tobytes()})
    refused(tmp_path / "bad.bin", fragment)


def test_rebuild_parameter_of_a_tensor_reads_the_tensor(tmp_path):
    parameter = call(glob("torch._utils", "_rebuild_parameter"), tensor(), True, ORDERED_DICT)
    write_zip(tmp_path / "ok.bin", state_pickle({"w": parameter}), {"0": THREE.tobytes()})
    np.testing.assert_array_equal(read_torch_bin(str(tmp_path / "ok.bin"))["w"], THREE)
    np.testing.assert_array_equal(torch.load(tmp_path / "ok.bin", weights_only=True)["w"].detach().numpy(), THREE)


NOT_A_STATE_DICT = {
    "a-storage-as-a-tensor": ({"w": storage()}, "'w' is a storage, not a tensor"),
    "a-global-as-a-tensor": ({"w": glob("torch", "FloatStorage")}, "'w' is the global torch.FloatStorage"),
    "a-number-as-a-tensor": ({"w": 3}, "'w' is int, not a tensor"),
    "a-tuple-of-tensors": ({"w": (tensor(),)}, "'w' is tuple, not a tensor"),
    "an-integer-name": ({7: tensor()}, "a key is int 7, not a name"),
}


@pytest.mark.parametrize("case", sorted(NOT_A_STATE_DICT))
def test_anything_but_a_dict_of_names_to_tensors_is_refused_by_exact_type(tmp_path, case):
    items, fragment = NOT_A_STATE_DICT[case]
    write_zip(tmp_path / "bad.bin", state_pickle(items), {"0": THREE.tobytes()})
    refused(tmp_path / "bad.bin", "does not hold a flat dictionary of tensors", fragment)


def test_a_list_as_the_whole_object_is_refused(tmp_path):
    write_zip(tmp_path / "bad.bin", b"\x80\x02]" + bytes(tensor()) + b"a.", {"0": THREE.tobytes()})
    refused(tmp_path / "bad.bin", "does not hold a flat dictionary of tensors (it holds list)")


def test_tensor_with_backward_hooks_or_odd_flags_is_refused(tmp_path):
    rebuild = glob("torch._utils", "_rebuild_tensor_v2")
    hooks = Op(bytes(ORDERED_DICT) + b"(K\x01K\x02u")
    for value, fragment in ((call(rebuild, storage(), 0, (3,), (1,), False, hooks), "backward hooks"),
                            (call(rebuild, storage(), 0, (3,), (1,), 1, ORDERED_DICT), "requires_grad is int"),
                            (call(rebuild, storage(), 0, (3,), (1,)), "with 4 arguments"),
                            (call(rebuild, storage(), 0, Op(b"]K\x03a"), Op(b"]K\x01a"), False, ORDERED_DICT),
                             "not tuples")):
        write_zip(tmp_path / "bad.bin", state_pickle({"w": value}), {"0": THREE.tobytes()})
        refused(tmp_path / "bad.bin", fragment)


def test_expanded_view_with_more_elements_than_its_storage_is_refused(tmp_path):
    torch.save({"w": torch.zeros(1).expand(1000, 1000)}, tmp_path / "expanded.bin")
    refused(tmp_path / "expanded.bin", "a tensor view of 1000000 elements", "over a storage of 1 elements")
    # stride 0 within the storage's own element count still reads as torch.load reads it
    torch.save({"w": torch.arange(6.0)[:2].reshape(2, 1).expand(2, 3)}, tmp_path / "small.bin")
    np.testing.assert_array_equal(read_torch_bin(str(tmp_path / "small.bin"))["w"], [[0, 0, 0], [1, 1, 1]])


# ------------------------------------------------------------------------------------------ opcodes and globals
REFUSED_OPCODES = {
    # name -> pickle body after PROTO 2 (each would make an object; the allowed global comes first on purpose)
    "NEWOBJ": b"ccollections\nOrderedDict\n)\x81",
    "NEWOBJ_EX": b"ccollections\nOrderedDict\n)}\x92",
    "INST": b"(icollections\nOrderedDict\n",
    "OBJ": b"(ccollections\nOrderedDict\no",
    "EXT1": b"\x82\x01",
    "EXT2": b"\x83\x01\x00",
    "EXT4": b"\x84\x01\x00\x00\x00",
    "LONG4": b"\x8b\x01\x00\x00\x00\x01",
    "EMPTY_SET": b"\x8f",
    "FROZENSET": b"(\x91",
    "BYTEARRAY8": b"\x96\x01\x00\x00\x00\x00\x00\x00\x00a",
    "NEXT_BUFFER": b"\x97",
    "READONLY_BUFFER": b"\x98",
}


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("opcode", sorted(REFUSED_OPCODES))
def test_opcodes_torch_save_does_not_write_are_refused(tmp_path, opcode, layout):
    body = b"\x80\x02" + REFUSED_OPCODES[opcode] + b"."
    if layout == "zip":
        write_zip(tmp_path / "bad.bin", body)
    else:
        write_legacy(tmp_path / "bad.bin", body)
    refused(tmp_path / "bad.bin", f"the pickle uses the opcode {opcode}, which torch.save does not write")


def test_code_asked_for_by_any_opcode_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    command = f"touch {marker}".encode()
    attempts = {
        "reduce": bytes(call(glob("os", "system"), f"touch {marker}")),
        "stack-global": b"X\x02\x00\x00\x00osX\x06\x00\x00\x00system\x93" + enc((f"touch {marker}",)) + b"R",
        "inst": b"(X" + struct.pack("<I", len(command)) + command + b"ios\nsystem\n",
        "obj": b"(cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"o",
        "build-setstate": bytes(ORDERED_DICT) + b"cos\nsystem\nb",
    }
    for name, body in attempts.items():
        write_zip(tmp_path / f"{name}.bin", b"\x80\x02" + body + b".")
        write_legacy(tmp_path / f"{name}.pt", b"\x80\x02" + body + b".")
        for path in (tmp_path / f"{name}.bin", tmp_path / f"{name}.pt"):
            refused(path, "refusing to load")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["ComplexFloatStorage", "ComplexDoubleStorage"])
def test_complex_storages_are_refused(tmp_path, kind):
    write_zip(tmp_path / "bad.bin", state_pickle({"w": tensor(kind=kind)}), {"0": bytes(48)})
    refused(tmp_path / "bad.bin", f"storage type torch.{kind} is not supported", "complex numbers")


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_complex_tensors_saved_by_torch_are_refused(tmp_path, layout):
    torch.save({"w": torch.ones(3, dtype=torch.complex64)}, tmp_path / "c.bin",
               _use_new_zipfile_serialization=layout == "zip")
    refused(tmp_path / "c.bin", "complex numbers")


def test_safetensors_entries_claiming_the_same_bytes_are_refused(tmp_path):
    header = {f"w{i}": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]} for i in range(3)}
    header["empty"] = {"dtype": "F32", "shape": [0, 7], "data_offsets": [8, 8]}  # an empty tensor takes no bytes
    raw = json.dumps(header).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    refused(tmp_path / "w.safetensors", "tensors 'w0' and 'w1' claim overlapping bytes", reader=read_safetensors)
    del header["w1"], header["w2"]
    raw = json.dumps(header).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    assert read_safetensors(str(tmp_path / "w.safetensors"))["empty"].shape == (0, 7)


def test_complex_safetensors_are_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "c.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    refused(tmp_path / "c.safetensors", "tensor dtype 'C64' is not supported", "complex numbers",
            reader=read_safetensors)


# ------------------------------------------------------------------------------------------ structure limits
def _nested_tuples(depth):
    return Op(b"N" + b"\x85" * depth)


def _nested_lists(depth):
    return Op(b"]" * depth + b"a" * (depth - 1))


def _nested_marks(depth):
    return Op(b"(" * depth + b"N" + b"t" * depth)


@pytest.mark.parametrize("build, what", [(_nested_tuples, "nests containers"), (_nested_lists, "nests containers"),
                                         (_nested_marks, "nests MARKs")])
def test_nesting_deeper_than_the_limit_is_refused(tmp_path, build, what):
    deep = Limits.PICKLE_DEPTH + 1
    write_zip(tmp_path / "deep.bin", state_pickle({"w": tensor(), "x": build(deep)}), {"0": THREE.tobytes()})
    refused(tmp_path / "deep.bin", f"{what} more than {Limits.PICKLE_DEPTH} deep")
    write_zip(tmp_path / "very-deep.bin", b"\x80\x02N" + b"\x85" * 200_000 + b".")
    refused(tmp_path / "very-deep.bin", "nests containers")


def test_containers_cannot_be_changed_once_inside_another_nor_hold_themselves(tmp_path):
    # a list memoized, put in a tuple, then grown: its depth would no longer be known
    grown = b"\x80\x02]q\x00\x85h\x00Na."
    write_zip(tmp_path / "grown.bin", grown)
    refused(tmp_path / "grown.bin", "APPEND changes a list that is already inside another container")
    itself = b"\x80\x02]q\x00h\x00a."
    write_zip(tmp_path / "itself.bin", itself)
    refused(tmp_path / "itself.bin", "puts a container inside itself")


def test_dict_keys_that_could_be_made_to_collide_are_refused(tmp_path):
    write_zip(tmp_path / "bad.bin", state_pickle({})[:-1] + b"(" + enc((1, 2)) + b"Nu.")
    refused(tmp_path / "bad.bin", "a dict key of type tuple")
    write_zip(tmp_path / "huge.bin", b"\x80\x02}" + enc(2 ** 64) + b"Ns.")
    refused(tmp_path / "huge.bin", "a dict key of type int")


@pytest.mark.parametrize("limit, value, pickle_body, fragment", [
    ("PICKLE_MEMO", 3, b"Nq\x01q\x02q\x03q\x04.", "memoizes more than 3 values"),
    ("PICKLE_CONTAINER", 5, b"](NNNe(NNNe.", "a pickled list of more than 5 items"),
    ("PICKLE_CONTAINER", 5, b"NNNNNN.", "more than 5 values on the pickle's stack"),
    ("PICKLE_OBJECTS", 1000, b"(" + b"]" * 200 + b"l.", "builds more than 1000 bytes of objects"),
    ("PICKLE_BYTES", 250, b"X\x2c\x01\x00\x00" + b"a" * 300 + b".", "data.pkl of 308 bytes (at most 250)"),
])
def test_each_pickle_limit_is_enforced(tmp_path, monkeypatch, limit, value, pickle_body, fragment):
    monkeypatch.setattr(Limits, limit, value)
    write_zip(tmp_path / "bad.bin", b"\x80\x02" + pickle_body)
    refused(tmp_path / "bad.bin", fragment)


def test_legacy_pickle_longer_than_the_limit_is_refused(tmp_path, monkeypatch):
    write_legacy(tmp_path / "long.pt", b"\x80\x02X\x00\x01\x00\x00" + b"a" * 256 + b".")
    monkeypatch.setattr(Limits, "PICKLE_BYTES", 200)
    refused(tmp_path / "long.pt", "reads 256 bytes", "of the 200 bytes a pickle may have")


# ------------------------------------------------------------------------------------------ memory
_LIMITED_READER = """
import resource, sys
from cvt_core.checkpoint import CheckpointError, read_weights_file
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
for path in sys.argv[1:]:
    try:
        tensors = read_weights_file(path)
    except CheckpointError as exc:
        print("refused", exc)
    else:
        print("read", sorted(tensors))
"""


def read_in_one_gib(*paths) -> list:
    """What `read_weights_file` gives for each path in a child process limited to 1 GiB of address space: a line
    'read [names]' or 'refused <message>' each."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _LIMITED_READER, *map(str, paths)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])
    lines = run.stdout.splitlines()
    assert len(lines) == len(paths), run.stdout
    return lines


def test_huge_memo_index_costs_no_memory(tmp_path):
    # C pickle's memo is an array indexed by the memo index: 2**27 took 2 GB, 2**32 - 1 would take 32 GB
    for index in (2 ** 27, 2 ** 32 - 1):
        put, get = b"r" + struct.pack("<I", index), b"j" + struct.pack("<I", index)
        body = b"\x80\x02" + bytes(ORDERED_DICT) + b"X\x01\x00\x00\x00w" + bytes(tensor()) + put + b"0" + get + b"s."
        assert len(body) < 256
        write_zip(tmp_path / f"memo-{index}.bin", body, {"0": THREE.tobytes()})
    write_zip(tmp_path / "memo-text.bin", b"\x80\x02Np" + str(10 ** 30).encode() + b"\n.")
    lines = read_in_one_gib(tmp_path / f"memo-{2 ** 27}.bin", tmp_path / f"memo-{2 ** 32 - 1}.bin",
                            tmp_path / "memo-text.bin")
    assert lines[:2] == ["read ['w']", "read ['w']"]
    assert lines[2].startswith("refused") and "memo index 1000000000000000000000000000000" in lines[2]


GIANT_LENGTHS = {
    "BINBYTES8": b"\x8e" + struct.pack("<Q", 2 ** 60),
    "BINUNICODE8": b"\x8d" + struct.pack("<Q", 2 ** 60),
    "BINBYTES8-of-8-GiB": b"\x8e" + struct.pack("<Q", 2 ** 33),
    "BINUNICODE": b"X" + struct.pack("<I", 2 ** 32 - 1),
    "BINBYTES": b"B" + struct.pack("<I", 2 ** 32 - 1),
    "BINSTRING": b"T" + struct.pack("<i", 2 ** 31 - 1),
}


def test_declared_lengths_beyond_the_pickle_are_refused_before_reading(tmp_path):
    paths = []
    for name, opcode in sorted(GIANT_LENGTHS.items()):
        write_zip(tmp_path / f"{name}.bin", b"\x80\x02" + opcode + b"abc.")
        write_legacy(tmp_path / f"{name}.pt", b"\x80\x02" + opcode + b"abc.")
        write_legacy(tmp_path / f"{name}-in-the-key-list.pt", state_pickle({}), keys=b"\x80\x02" + opcode + b"abc.")
        paths += [tmp_path / f"{name}.bin", tmp_path / f"{name}.pt", tmp_path / f"{name}-in-the-key-list.pt"]
    for path, line in zip(paths, read_in_one_gib(*paths)):
        assert line.startswith(f"refused {path}: truncated or corrupt: the pickle reads"), line
        assert "MemoryError" not in line


@pytest.fixture(scope="module")
def zip_bombs(tmp_path_factory):
    """torch-like zips whose records are deflated: 6.7 MB inflating to 1 GiB (honestly declared, or declared as 12
    bytes), as data.pkl or as a storage."""
    root = tmp_path_factory.mktemp("bombs")
    bomb = deflate_zeros((1 << 30) // (258 * 8))
    data_pkl = state_pickle({"w": tensor(numel=3)})
    paths = {}
    for where in ("data.pkl", "storage"):
        for declared in ("honest", "12-bytes"):
            usize = 12 if declared == "12-bytes" else 1 + 258 * (32 + 8 * ((1 << 30) // (258 * 8)))
            members = torch_members(data_pkl, {"0": THREE.tobytes()})
            target = members[0] if where == "data.pkl" else members[2]
            target.update(data=bomb, method=8, usize=usize, crc=0)
            path = root / f"{where}-{declared}.bin"
            path.write_bytes(raw_zip(members))
            paths[where, declared] = path
    return paths


def test_compressed_records_are_refused_without_inflating_them(zip_bombs):
    paths = [zip_bombs[key] for key in sorted(zip_bombs)]
    for path, line in zip(paths, read_in_one_gib(*paths)):
        assert line.startswith(f"refused {path}: refusing to load: record "), line
        assert "compressed records are not written by torch.save" in line, line


def test_python_zipfile_deflated_checkpoint_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "deflated.bin", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", state_pickle({}))
    refused(tmp_path / "deflated.bin", "record 'archive/data.pkl' is compressed (method 8)")


# ------------------------------------------------------------------------------------------ zip records
def _valid_members():
    return torch_members(state_pickle({"w": tensor()}), {"0": THREE.tobytes()})


def test_hand_made_zip_reads(tmp_path):
    (tmp_path / "ok.bin").write_bytes(raw_zip(_valid_members()))
    np.testing.assert_array_equal(read_torch_bin(str(tmp_path / "ok.bin"))["w"], THREE)
    np.testing.assert_array_equal(torch.load(tmp_path / "ok.bin", weights_only=True)["w"].detach().numpy(), THREE)


def test_zip64_directory_entries_read(tmp_path):
    members = _valid_members()
    for member in members:
        member["zip64"] = True
    (tmp_path / "zip64.bin").write_bytes(raw_zip(members))
    np.testing.assert_array_equal(read_torch_bin(str(tmp_path / "zip64.bin"))["w"], THREE)
    members[2]["usize"] = 2 ** 40  # a zip64 size is checked as any other
    (tmp_path / "lie.bin").write_bytes(raw_zip(members))
    refused(tmp_path / "lie.bin", "declares 12 stored and 1099511627776 uncompressed bytes")


def test_stored_record_whose_sizes_disagree_is_refused(tmp_path):
    members = _valid_members()
    members[2].update(csize=8)
    (tmp_path / "bad.bin").write_bytes(raw_zip(members))
    refused(tmp_path / "bad.bin", "declares 8 stored and 12 uncompressed bytes")


def test_record_reaching_beyond_the_data_is_refused(tmp_path):
    # the storage's record claims 1200 bytes (300 elements, as the pickle says) where 12 are stored
    members = torch_members(state_pickle({"w": tensor(numel=300)}), {"0": THREE.tobytes()})
    members[2].update(csize=1200, usize=1200)
    (tmp_path / "bad.bin").write_bytes(raw_zip(members))
    refused(tmp_path / "bad.bin", "record 'archive/data/0' declares 1200 bytes")


def test_overlapping_storage_records_are_refused(tmp_path):
    # record 1's local header and bytes lie inside record 0's bytes: both would read the same file bytes
    inner = THREE.tobytes()
    hidden = local_header("archive/data/1", inner) + inner
    assert len(hidden) % 4 == 0
    members = torch_members(state_pickle({"a": tensor("0", numel=len(hidden) // 4), "b": tensor("1")}),
                            {"0": hidden})
    start = sum(_LOCAL.size + len(m["name"]) + len(m["data"]) for m in members[:2])  # record 0's local header
    members.append(dict(name="archive/data/1", data=inner, local=False,
                        header=start + _LOCAL.size + len("archive/data/0")))
    (tmp_path / "bad.bin").write_bytes(raw_zip(members))
    refused(tmp_path / "bad.bin", "the records of storages 0 and 1 overlap")


def test_zip_directory_that_disagrees_with_its_end_record_is_refused(tmp_path):
    raw = bytearray(raw_zip(_valid_members()))
    end = raw.rfind(b"PK\x05\x06")
    count = raw[:]
    struct.pack_into("<2H", count, end + 8, 9, 9)
    (tmp_path / "count.bin").write_bytes(bytes(count))
    refused(tmp_path / "count.bin", "the zip end record counts 9 records")
    offset = raw[:]
    struct.pack_into("<L", offset, end + 16, struct.unpack_from("<L", raw, end + 16)[0] - 1)
    (tmp_path / "offset.bin").write_bytes(bytes(offset))
    refused(tmp_path / "offset.bin", "does not end where the end record begins")
    (tmp_path / "cut.bin").write_bytes(bytes(raw[: end + 10]))
    refused(tmp_path / "cut.bin", "no zip end-of-directory record")


def test_two_data_pkl_records_are_refused(tmp_path):
    members = _valid_members() + [dict(name="other/data.pkl", data=state_pickle({}))]
    (tmp_path / "two.bin").write_bytes(raw_zip(members))
    refused(tmp_path / "two.bin", "2 data.pkl records")


def test_storage_that_fails_its_crc_is_refused_when_read_lazily(tmp_path):
    torch.save({"a": torch.arange(4.0), "b": torch.full((3,), 7.0)}, tmp_path / "w.bin")
    raw = bytearray((tmp_path / "w.bin").read_bytes())
    at = raw.find(np.full(3, 7.0, np.float32).tobytes())
    raw[at] ^= 0xFF
    (tmp_path / "w.bin").write_bytes(bytes(raw))
    with open_checkpoint(str(tmp_path / "w.bin")) as lazy:  # the directory and pickle are sound: it opens
        np.testing.assert_array_equal(lazy["a"], np.arange(4.0))
        with pytest.raises(CheckpointError) as exc:
            lazy["b"]
    text = str(exc.value)
    assert "\n" not in text and text.startswith(str(tmp_path / "w.bin")), text
    assert "fails its CRC-32 check" in text, text
    refused(tmp_path / "w.bin", "fails its CRC-32 check", reader=read_weights_file)


def test_data_pkl_that_fails_its_crc_is_refused_on_opening(tmp_path):
    members = _valid_members()
    members[0]["crc"] = 1234
    (tmp_path / "bad.bin").write_bytes(raw_zip(members))
    refused(tmp_path / "bad.bin", "record 'archive/data.pkl' fails its CRC-32 check", reader=open_checkpoint)


@pytest.mark.parametrize("name", ["w.bin", "w.pt", "w.safetensors"])
def test_tensor_asked_for_after_closing_is_refused_in_one_line(tmp_path, name):
    if name.endswith(".safetensors"):
        from cvt_core.checkpoint import write_safetensors

        write_safetensors(str(tmp_path / name), {"w": np.ones(2, np.float32)})
    else:
        torch.save({"w": torch.ones(2)}, tmp_path / name, _use_new_zipfile_serialization=name.endswith(".bin"))
    lazy = open_checkpoint(str(tmp_path / name))
    lazy.close()
    with pytest.raises(CheckpointError, match="tensor 'w' asked for after the checkpoint was closed"):
        lazy["w"]


def test_file_truncated_after_opening_is_refused_in_one_line_when_read(tmp_path):
    torch.save({"w": torch.arange(1000.0)}, tmp_path / "w.bin")
    lazy = open_checkpoint(str(tmp_path / "w.bin"))
    with open(tmp_path / "w.bin", "r+b") as f:
        f.truncate(600)
    with pytest.raises(CheckpointError, match="truncated while reading"):
        lazy["w"]
    lazy.close()


# ------------------------------------------------------------------------------------------ paths
_PATH_READERS = """
import sys
from cvt_core.checkpoint import (CheckpointError, open_checkpoint, open_safetensors, open_torch_bin,
                                 read_safetensors_header, read_shard_index)
for reader in (open_checkpoint, open_torch_bin, open_safetensors, read_safetensors_header, read_shard_index):
    for path in sys.argv[1:]:
        try:
            reader(path)
        except CheckpointError as exc:
            print(reader.__name__, exc)
        else:
            print(reader.__name__, "read", path)
"""


def test_fifo_and_device_paths_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "pytorch_model.bin"
    os.mkfifo(fifo)
    index_fifo = tmp_path / "model.safetensors.index.json"
    os.mkfifo(index_fifo)
    paths = [str(fifo), "/dev/zero", str(index_fifo), str(tmp_path)]
    run = subprocess.run([sys.executable, "-c", _PATH_READERS, *paths], cwd=REPO, capture_output=True, text=True,
                         timeout=120)  # a FIFO opened for reading would block here; /dev/zero would fill memory
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 5 * len(paths), run.stdout
    for line in lines:
        assert " read " not in line, line
    for reader in ("open_checkpoint", "open_torch_bin", "open_safetensors", "read_safetensors_header"):
        assert f"{reader} {fifo}: is a named pipe (FIFO); only regular files are read" in lines, reader
        assert f"{reader} /dev/zero: is a device; only regular files are read" in lines, reader
    assert f"open_checkpoint {index_fifo}: is a named pipe (FIFO); only regular files are read" in lines
    assert f"read_shard_index {index_fifo}: is a named pipe (FIFO); only regular files are read" in lines


def test_shard_index_naming_a_fifo_shard_is_refused(tmp_path):
    os.mkfifo(tmp_path / "part-1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "part-1.safetensors"}}))
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(str(tmp_path / "model.safetensors.index.json"))
    assert str(exc.value) == f"{tmp_path / 'part-1.safetensors'}: is a named pipe (FIFO); only regular files are read"


def test_shard_index_is_strict_json(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"w": "a.safetensors"}, "weight_map": {"w": "b.safetensors"}}')
    with pytest.raises(CheckpointError, match="appears twice"):
        open_checkpoint(str(index))
    index.write_text('{"metadata": {"total_size": NaN}, "weight_map": {}}')
    with pytest.raises(CheckpointError, match="NaN"):
        open_checkpoint(str(index))


def test_the_file_told_apart_is_the_one_read(tmp_path):
    # open_checkpoint opens the path once: what it reads is the inode it opened, even if the name is replaced
    torch.save({"w": torch.ones(2)}, tmp_path / "w.bin")
    lazy = open_checkpoint(str(tmp_path / "w.bin"))
    os.replace(tmp_path / "w.bin", tmp_path / "moved.bin")
    (tmp_path / "w.bin").write_bytes(b"not a checkpoint at all")
    np.testing.assert_array_equal(lazy["w"], [1.0, 1.0])
    lazy.close()


# ------------------------------------------------------------------------------------------ the legacy layout
def test_legacy_layout_runs_each_of_its_pickles_through_the_same_machine(tmp_path):
    ok_state = state_pickle({"w": tensor(legacy=True)})
    cases = {
        "sys-info-with-an-object": (dict(sys_info=b"\x80\x02" + bytes(ORDERED_DICT) + b"."),
                                    "asks for collections.OrderedDict"),
        "key-list-with-newobj": (dict(keys=b"\x80\x02ccollections\nOrderedDict\n)\x81."), "the pickle asks for"),
        "key-list-with-a-persistent-id": (dict(keys=b"\x80\x02" + enc(("storage",)) + b"Q."),
                                          "unsupported persistent id"),
        "protocol-as-a-bool": (dict(), "protocol version"),
    }
    for name, (options, fragment) in cases.items():
        path = tmp_path / f"{name}.pt"
        write_legacy(path, ok_state, {"0": (3, THREE.tobytes())}, **options)
        if name == "protocol-as-a-bool":  # 1001 written as True: the exact type is checked
            raw = path.read_bytes().replace(pickle.dumps(1001, protocol=2), b"\x80\x02\x88.", 1)
            path.write_bytes(raw)
        refused(path, fragment)
    write_legacy(tmp_path / "ok.pt", ok_state, {"0": (3, THREE.tobytes())})
    np.testing.assert_array_equal(read_torch_bin(str(tmp_path / "ok.pt"))["w"], THREE)


def test_pickles_made_by_python_for_plain_values_read_as_torch_load_reads_them(tmp_path):
    # every plain value form a wrapper may hold beside the state dict, in protocols 0 to 2 (torch.save writes 2)
    extra = {"text": "ünïcode", "float": 1.5, "big": 2 ** 80, "neg": -7, "none": None,
             "list": [1, (2, 3)], "nested": {"a": {"b": [True, False]}}, 4: "int key"}
    for protocol in (0, 1, 2):
        body = pickle.dumps(collections.OrderedDict(extra), protocol=protocol)
        model = state_pickle({"w": tensor()})[2:-1]  # the state dict's opcodes, without PROTO and STOP
        wrapper = b"\x80\x02}(X\x05\x00\x00\x00model" + model + b"X\x05\x00\x00\x00extra" + \
            body[2 if protocol == 2 else 0:-1] + b"u."
        write_zip(tmp_path / f"p{protocol}.bin", wrapper, {"0": THREE.tobytes()})
        np.testing.assert_array_equal(read_torch_bin(str(tmp_path / f"p{protocol}.bin"))["w"], THREE)
        if protocol == 2:  # torch.load's own restricted unpickler reads no text memo opcodes (protocols 0 and 1)
            assert torch.load(tmp_path / f"p{protocol}.bin", weights_only=True)["extra"] == extra


def test_pickle_cut_anywhere_is_refused_in_one_line(tmp_path):
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(3.0), "n": torch.tensor(5)}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        data_pkl = archive.read("archive/data.pkl")
    for cut in range(len(data_pkl)):
        write_zip(tmp_path / "cut.bin", data_pkl[:cut], {"0": bytes(12), "1": bytes(8)})
        text = refused(tmp_path / "cut.bin")
        assert "truncated or corrupt" in text or "does not hold" in text, (cut, text)
