"""Generated hostile inputs for every reader of untrusted files, and the worker that feeds them to the readers.

docs/security.md states the invariants; this file checks them on generated cases. For each reader (KINDS) a
valid seed file is written with the project's own writers, then case `i` of a run is derived from (kind, seed, i)
alone: either a byte-level mutation of the seed (bit flips, overwritten or deleted ranges, truncation, 32/64-bit
length fields set to huge values) or a structural edit of the format (the HDF5 features that reach other files,
hostile pickles, compressed or mis-sized zip records, JSON type swaps and nesting, image headers declaring huge
sizes, FIFOs and devices in place of files).

The worker (`python tests/fuzz_inputs.py KIND SEED START COUNT`) runs in its own process under a memory cap
(RLIMIT_AS: its size after the imports plus `HEADROOM_BYTES`) and a per-case alarm, and prints one JSON line per
case: `{"case": i, "outcome": "ok" | "refused" | "violation", ...}`. Before each case it prints `{"start": i}`, so
a crash (a signal, the memory cap met inside C code) names its case. Every case must end in `ok` (the reader
returned tensors, none of which holds a byte of the sentinel secret file) or `refused` (one line, of the error
type the reader promises); anything else is a `violation`.
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import traceback
import zipfile
import zlib
from typing import Callable, Dict, List, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TINY_CONFIG = dict(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 2], num_labels=3, image_size=32)
HEADROOM_BYTES = 768 * 1024 * 1024  # every seed is under 1 MB: a reader may use far less than this
CASE_SECONDS = 20
SECRET_UNIT = b"CVT-SENTINEL-SECRET!"  # 20 bytes; any 28-byte window of the secret file holds "SENTINEL"
SECRET_MARK = b"SENTINEL"


# ---------------------------------------------------------------------------------------------------- mutations

def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """One to three byte-level edits of `data`."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if not out:
            break
        kind = rng.randrange(7)
        at = rng.randrange(len(out))
        if kind == 0:  # flip a few bits
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(out))
                out[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # overwrite a range with noise
            n = rng.randint(1, 64)
            out[at: at + n] = bytes(rng.randrange(256) for _ in range(min(n, len(out) - at)))
        elif kind == 2:  # truncate
            del out[at:]
        elif kind == 3:  # delete a range
            del out[at: at + rng.randint(1, 256)]
        elif kind == 4:  # duplicate a range
            n = rng.randint(1, 256)
            out[at:at] = out[at: at + n]
        elif kind == 5:  # a 32-bit length field becomes huge
            out[at: at + 4] = struct.pack("<I", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0x10000000, 0x80000000]))
        else:  # a 64-bit length field becomes huge
            out[at: at + 8] = struct.pack("<Q", rng.choice([2 ** 63 - 1, 2 ** 40, 2 ** 33, 2 ** 62]))
    return bytes(out)


def _json_bytes(value) -> bytes:
    return json.dumps(value).encode()


def deep_json(depth: int, opener: str = "[") -> bytes:
    closer = "]" if opener == "[" else "}"
    if opener == "[":
        return (opener * depth + closer * depth).encode()
    return ('{"a":' * depth + "1" + "}" * depth).encode()


HOSTILE_JSON_VALUES = [True, False, None, 3.7, -1, 0, 2 ** 31, 2 ** 63, 10 ** 30, "false", "1", "", [], [1, 2],
                       [[1]], {}, {"a": 1}, 1e308, -0.0, "x" * 2000, 16384, [16384, 16384, 16384], 8192]


def mutate_json(value, rng: random.Random) -> bytes:
    """A structural edit of a JSON document: a field's value swapped for a hostile one, NaN / Infinity, duplicate
    keys, deep nesting, or a byte-level mutation of its text."""
    choice = rng.randrange(8)
    if choice == 0 and isinstance(value, dict) and value:
        edited = dict(value)
        key = rng.choice(sorted(edited))
        edited[key] = rng.choice(HOSTILE_JSON_VALUES)
        return _json_bytes(edited)
    if choice == 1 and isinstance(value, dict) and value:  # one element of a list field
        edited = json.loads(json.dumps(value))
        lists = [k for k, v in edited.items() if isinstance(v, list) and v]
        if lists:
            key = rng.choice(lists)
            edited[key][rng.randrange(len(edited[key]))] = rng.choice(HOSTILE_JSON_VALUES)
            return _json_bytes(edited)
    if choice == 2 and isinstance(value, dict) and value:
        text = _json_bytes(value).decode()
        key = rng.choice(sorted(value))
        return text.replace(f'"{key}": ', f'"{key}": NaN, "{key}": ', 1).encode()
    if choice == 3:
        return rng.choice([deep_json(100_000), deep_json(100_000, "{"), deep_json(70), deep_json(3000)])
    if choice == 4 and isinstance(value, dict) and value:
        edited = dict(value)
        edited[rng.choice(sorted(edited))] = rng.choice([float("nan"), float("inf"), -float("inf")])
        return json.dumps(edited).encode()
    if choice == 5:
        return rng.choice([b"", b"null", b"[]", b"1", b'"text"', b"\xff\xfe\x00garbage", b"{" * 10,
                           b'{"num_labels": ' + b"9" * 5001 + b"}", b'{"a": 1e999}', b'[-1e400]'])
    return mutate_bytes(_json_bytes(value), rng)


# ------------------------------------------------------------------------------------------------ pickle attacks

def _pickle(*parts: bytes) -> bytes:
    return b"\x80\x02" + b"".join(parts) + b"."


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def hostile_pickles() -> List[bytes]:
    """State-dict pickles an attacker would write: code-running globals, allowed globals given state, fake
    tensors, huge memo indexes and declared lengths, deep nesting, opcodes that build arbitrary objects."""
    storage = b"(" + _unicode("storage") + _global("torch", "FloatStorage") + _unicode("0") + _unicode("cpu") \
        + b"K\x04tQ"
    view = b"K\x00" + b"K\x04\x85" + b"K\x01\x85"
    rebuild = _global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + view + b"\x89" \
        + _global("collections", "OrderedDict") + b")R" + b"tR"
    fake_state = b"}(" + _unicode("size") + b"J\x00\x00\x00\x10\x85" + _unicode("stride") + b"K\x01\x85" \
        + _unicode("storage_offset") + b"J\xff\xff\xff\x7fu"
    return [
        _pickle(_global("os", "system"), b"(", _unicode("echo pwned"), b"tR"),
        _pickle(_global("builtins", "eval"), b"(", _unicode("1+1"), b"tR"),
        _pickle(_global("posix", "system"), b"(", _unicode("true"), b"tR"),
        # allowed globals given attacker state by BUILD, passed where a tensor is expected
        _pickle(b"}", _unicode("w"), _global("collections", "OrderedDict"), b")R", fake_state, b"bs"),
        _pickle(b"}", _unicode("w"), _global("builtins", "set"), b")R", fake_state, b"bs"),
        _pickle(b"}", _unicode("w"), _global("torch._utils", "_rebuild_parameter"), b"(",
                _global("collections", "OrderedDict"), b")R", fake_state, b"b\x89}tR", b"s"),
        _pickle(b"}", _unicode("w"), _global("torch._utils", "_rebuild_parameter"), b"(", b"K\x07\x89}tR", b"s"),
        # a memo index of 2**27 and of 2**32 - 1, then a get of it
        _pickle(b"N", b"r" + struct.pack("<I", 2 ** 27), b"0}", _unicode("w"), b"j" + struct.pack("<I", 2 ** 27), b"s"),
        _pickle(b"N", b"r" + struct.pack("<I", 2 ** 32 - 1), b"0", b"j" + struct.pack("<I", 2 ** 32 - 1)),
        _pickle(b"h\x05"),  # a get of a memo entry that does not exist
        # declared lengths far past the end of the file
        b"\x80\x04\x8d" + struct.pack("<Q", 2 ** 60) + b"abc",
        b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 40) + b"abc",
        b"\x80\x02X" + struct.pack("<I", 2 ** 31) + b"abc",
        b"\x80\x04\x95" + struct.pack("<Q", 2 ** 50) + b"}.",  # a FRAME declaring 1 PB
        _pickle(b"(" * 200_000),  # marks without end
        _pickle(b"]" + b"]a" * 0 + b"(" + b"]" * 5000 + b"e" * 1),
        _pickle(b"]" * 100_000),  # a long stack of lists
        # opcodes that build arbitrary objects
        _pickle(_global("collections", "OrderedDict"), b")\x81"),  # NEWOBJ
        b"\x80\x02(ccollections\nOrderedDict\no.",  # OBJ
        b"(icollections\nOrderedDict\n.",  # INST
        _pickle(b"\x82\x01"),  # EXT1
        # a rebuilt tensor whose view reaches beyond its storage, and one whose storage is a string
        _pickle(b"}", _unicode("w"), _global("torch._utils", "_rebuild_tensor_v2"), b"(", storage, b"K\x00",
                b"J\x00\x00\x00\x01\x85K\x01\x85\x89", _global("collections", "OrderedDict"), b")RtR", b"s"),
        _pickle(b"}", _unicode("w"), _global("torch._utils", "_rebuild_tensor_v2"), b"(", _unicode("nope"), view,
                b"\x89", _global("collections", "OrderedDict"), b")RtR", b"s"),
        _pickle(b"}", _unicode("w"), rebuild, b"s"),  # well formed: its storage record may or may not be there
        # a complex storage
        _pickle(b"}", _unicode("w"), _global("torch._utils", "_rebuild_tensor_v2"), b"(",
                storage.replace(b"FloatStorage", b"ComplexFloatStorage"), view, b"\x89",
                _global("collections", "OrderedDict"), b")RtR", b"s"),
    ]


# ------------------------------------------------------------------------------------------------ the readers

class Subject:
    """One reader under test: how to write its seed into a folder, how to make case `i`, how to read a case, and
    which exception types count as a refusal."""

    def __init__(self, kind: str, workdir: str):
        self.kind, self.workdir = kind, workdir
        self.secret = os.path.join(workdir, "secret.bin")
        with open(self.secret, "wb") as f:
            f.write(SECRET_UNIT * 512)


def _config():
    from cvt_core import CvtConfig

    return CvtConfig(**TINY_CONFIG)


def _state():
    from conversion.random_weights import random_state

    return random_state(_config(), True, 0)


def _write_safetensors(path: str) -> None:
    from cvt_core.checkpoint import write_safetensors

    write_safetensors(path, _state())


def _write_torch(path: str, legacy: bool) -> None:
    import torch

    torch.save({k: torch.from_numpy(v) for k, v in _state().items()}, path,
               _use_new_zipfile_serialization=not legacy)


def _write_tf_h5(path: str) -> None:
    from conversion.hf_tf_h5 import write_tf_h5
    from conversion.state import make_state
    from cvt_core.tensor_file import LazyTensors

    state_arrays = _state()
    tensors = LazyTensors({k: v.shape for k, v in state_arrays.items()}, {k: v.dtype for k, v in state_arrays.items()},
                          state_arrays.__getitem__)
    write_tf_h5(make_state(_config(), tensors, "seed", "hf-pt", "torch", with_head=True), path)


def _png_header(width: int, height: int, mode: int = 2) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    row = b"\x00" + b"\x00" * 3 * min(width, 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row)) + chunk(b"IEND", b"")


def special_paths(workdir: str, name: str) -> List[Tuple[str, Callable[[str], None]]]:
    """Non-regular files in place of a file: a FIFO (nobody writes to it), /dev/zero, /dev/urandom, a folder."""
    def fifo(path):
        os.mkfifo(path)

    def link_to(target):
        return lambda path: os.symlink(target, path)

    return [("fifo", fifo), ("dev-zero", link_to("/dev/zero")), ("dev-urandom", link_to("/dev/urandom")),
            ("folder", os.mkdir)]


def _h5_structural(seed: str, out: str, secret: str, choice: int, rng: random.Random) -> None:
    """Copy of the seed h5 file with one weight dataset replaced by an HDF5 feature that reaches outside the file
    or cannot be what a weight is."""
    import shutil

    import h5py

    shutil.copyfile(seed, out)
    with h5py.File(out, "r+") as f:
        datasets = []
        f.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
        name = rng.choice(sorted(datasets))
        old = f[name]
        shape, dtype = old.shape, old.dtype
        nbytes = int(np.prod(shape)) * dtype.itemsize
        del f[name]
        if choice == 0:
            f.create_dataset(name, shape=shape, dtype=dtype, external=[(secret, 0, max(nbytes, 1))])
        elif choice == 1:
            f[name] = h5py.ExternalLink(secret, "/data")
        elif choice == 2:
            other = os.path.join(os.path.dirname(out), "other.h5")
            with h5py.File(other, "w") as g:
                g.create_dataset("data", data=np.frombuffer(open(secret, "rb").read(nbytes), dtype=dtype)
                                 .reshape(shape) if nbytes else np.zeros(shape, dtype))
            f[name] = h5py.ExternalLink(other, "/data")
        elif choice == 3:
            f[name] = h5py.SoftLink("/" + rng.choice(sorted(datasets)))
        elif choice == 4:
            other = os.path.join(os.path.dirname(out), "virtual-source.h5")
            with h5py.File(other, "w") as g:
                g.create_dataset("data", data=np.ones(shape, dtype))
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[...] = h5py.VirtualSource(other, "data", shape=shape)
            f.create_virtual_dataset(name, layout)
        elif choice == 5:
            f.create_dataset(name, data=np.ones(shape, dtype), compression="gzip")
        elif choice == 6:
            f.create_dataset(name, data=np.ones(shape, np.int32))
        elif choice == 7:
            f.create_dataset(name, data=np.ones(shape, np.complex64))
        elif choice == 8:
            f.create_dataset(name, data=np.ones(shape, dtype.newbyteorder(">")))
        elif choice == 9:
            f.create_group(name)
        elif choice == 10:  # declared far larger than anything stored, chunked and never written
            f.create_dataset(name, shape=(1 << 20, 1 << 12), dtype=np.float32, chunks=(1024, 64))
        elif choice == 11:
            f.create_dataset(name, data=np.array([b"text"] * max(1, int(np.prod(shape)))).reshape(shape)
                             if shape else np.array(b"text"))
        elif choice == 12:
            f.create_dataset(name, data=np.ones(shape, dtype), chunks=True, shuffle=True)
        else:
            f.create_dataset(name, data=np.ones(shape, dtype), compression="lzf")


H5_STRUCTURAL_CHOICES = 14


def _zip_structural(seed: bytes, rng: random.Random) -> bytes:
    """The seed torch.save zip with one record rewritten: deflated (a 1 GB bomb under a small declared size, or
    honest), a wrong CRC, a wrong declared size, or data.pkl replaced by a hostile pickle."""
    source = zipfile.ZipFile(io.BytesIO(seed))
    names = source.namelist()
    storages = [n for n in names if "/data/" in n]
    pickle_name = next(n for n in names if n.endswith("data.pkl"))
    choice = rng.randrange(5)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        victim = rng.choice(storages)
        for name in names:
            data = source.read(name)
            if choice == 0 and name == victim:  # a bomb: 1 GB of zeros deflated, declared as the storage's size
                packed = deflated_zeros()
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                target.writestr(info, b"")  # placeholder, patched below
                continue
            if choice == 1 and name == victim:
                target.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
                continue
            if choice == 4 and name == pickle_name:
                data = rng.choice(hostile_pickles())
            target.writestr(zipfile.ZipInfo(name), data)
    raw = bytearray(out.getvalue())
    if choice == 0:
        return _patch_bomb(raw, victim, packed, len(source.read(victim)))
    if choice in (2, 3):  # wrong CRC or wrong declared size in the victim's headers
        raw = _patch_record(raw, victim, crc=choice == 2)
    return bytes(raw)


_DEFLATED_ZEROS: Dict[int, bytes] = {}


def deflated_zeros(mebibytes: int = 1024) -> bytes:
    """`mebibytes` MiB (1 GiB by default) of zero bytes as a raw deflate stream (about 1 KB per MiB), made once per
    process: 1 MiB of zeros deflated and ended by a full flush (byte-aligned, no reference to earlier bytes) is the
    same segment every time, so it is deflated once and repeated, then closed by an empty final block. Deflating
    the whole GiB took most of a worker's start-up (5-20 s)."""
    if mebibytes not in _DEFLATED_ZEROS:
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        segment = packer.compress(b"\0" * (1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
        _DEFLATED_ZEROS[mebibytes] = segment * mebibytes + packer.flush(zlib.Z_FINISH)
    return _DEFLATED_ZEROS[mebibytes]


def _find_headers(raw: bytes, name: str) -> List[int]:
    """Offsets of the local (PK\\3\\4) and central (PK\\1\\2) headers naming `name`."""
    found = []
    encoded = name.encode()
    for signature, name_at in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46)):
        at = raw.find(signature)
        while at >= 0:
            length = struct.unpack_from("<H", raw, at + (26 if signature == b"PK\x03\x04" else 28))[0]
            if raw[at + name_at: at + name_at + length] == encoded:
                found.append(at)
            at = raw.find(signature, at + 4)
    return found


def _patch_record(raw: bytearray, name: str, crc: bool) -> bytearray:
    for at in _find_headers(raw, name):
        local = raw[at: at + 4] == b"PK\x03\x04"
        crc_at, size_at = (at + 14, at + 22) if local else (at + 16, at + 24)
        if crc:
            struct.pack_into("<I", raw, crc_at, struct.unpack_from("<I", raw, crc_at)[0] ^ 0x5A5A5A5A)
        else:
            struct.pack_into("<I", raw, size_at, struct.unpack_from("<I", raw, size_at)[0] + 4096)
    return raw


def _patch_bomb(raw: bytearray, name: str, packed: bytes, declared: int) -> bytes:
    """Replace the (empty, deflated) record `name` by `packed` with a declared size of `declared` bytes."""
    local = _find_headers(raw, name)[0]
    name_len, extra_len = struct.unpack_from("<HH", raw, local + 26)
    data_at = local + 30 + name_len + extra_len
    old_size = struct.unpack_from("<I", raw, local + 18)[0]
    tail = bytes(raw[data_at + old_size:])
    head = bytearray(raw[:data_at])
    struct.pack_into("<III", head, local + 14, zlib.crc32(b"\0" * min(declared, 1 << 20)), len(packed), declared)
    shift = len(packed) - old_size
    tail = bytearray(tail)
    central = tail.find(b"PK\x01\x02")
    while central >= 0:
        length = struct.unpack_from("<H", tail, central + 28)[0]
        offset = struct.unpack_from("<I", tail, central + 42)[0]
        if tail[central + 46: central + 46 + length] == name.encode():
            struct.pack_into("<III", tail, central + 16, zlib.crc32(b"\0" * min(declared, 1 << 20)), len(packed),
                             declared)
        elif offset > local:
            struct.pack_into("<I", tail, central + 42, offset + shift)
        central = tail.find(b"PK\x01\x02", central + 4)
    end = tail.find(b"PK\x05\x06")
    if end >= 0:
        struct.pack_into("<I", tail, end + 16, struct.unpack_from("<I", tail, end + 16)[0] + shift)
    return bytes(head) + packed + bytes(tail)


# ---------------------------------------------------------------------------------------- case construction

def _seed_bytes(kind: str, workdir: str) -> Tuple[str, bytes]:
    """(file name, content) of the valid seed of a byte-mutated kind."""
    path = os.path.join(workdir, "seed")
    os.makedirs(path, exist_ok=True)
    if kind == "safetensors":
        name = "model.safetensors"
        _write_safetensors(os.path.join(path, name))
    elif kind == "torch-zip":
        name = "pytorch_model.bin"
        _write_torch(os.path.join(path, name), legacy=False)
    elif kind == "torch-legacy":
        name = "pytorch_model.bin"
        _write_torch(os.path.join(path, name), legacy=True)
    elif kind == "tf-h5":
        name = "tf_model.h5"
        _write_tf_h5(os.path.join(path, name))
    elif kind == "config":
        name = "config.json"
        _config().save_pretrained(path)
    elif kind == "preprocessor":
        from cvt_core import CvtImageProcessor

        name = "preprocessor_config.json"
        CvtImageProcessor.for_resolution(32).save_pretrained(path)
    elif kind == "shard-index":
        from cvt_core.checkpoint import write_safetensors

        name = "model.safetensors.index.json"
        state = _state()
        names = sorted(state)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        weight_map = {}
        for shard, members in halves.items():
            write_safetensors(os.path.join(path, shard), {k: state[k] for k in members})
            weight_map.update({k: shard for k in members})
        with open(os.path.join(path, name), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    elif kind in ("keras-weights", "keras-file"):
        from conversion.keras_native import write_keras
        from conversion.state import make_state
        from cvt_core.tensor_file import LazyTensors

        arrays = _state()
        tensors = LazyTensors({k: v.shape for k, v in arrays.items()}, {k: v.dtype for k, v in arrays.items()},
                              arrays.__getitem__)
        state = make_state(_config(), tensors, "seed", "hf-pt", "torch", with_head=True)
        weights = kind == "keras-weights"
        write_keras(state, path, weights=weights, model_file=not weights)
        name = "model.weights.h5" if weights else "model.keras"
    elif kind == "image":
        from PIL import Image

        name = "image.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(os.path.join(path, name))
    else:
        raise ValueError(kind)
    with open(os.path.join(path, name), "rb") as f:
        return name, f.read()


def make_case(kind: str, workdir: str, seed_name: str, seed_data: bytes, index: int, run_seed: int) -> str:
    """Write case `index` of `kind` into a fresh folder under `workdir`; returns the path the reader is given."""
    rng = random.Random(f"{kind}/{run_seed}/{index}")
    folder = os.path.join(workdir, f"case-{index}")
    os.makedirs(folder)
    path = os.path.join(folder, seed_name)
    secret = os.path.join(workdir, "secret.bin")
    specials = special_paths(folder, seed_name)
    roll = rng.random()
    if roll < 0.04:
        _, make = specials[index % len(specials)]
        make(path)
        return path
    if kind == "keras-file" and roll < 0.5:
        _keras_structural(os.path.join(workdir, "seed", seed_name), path, secret, rng)
        return path
    if kind in ("tf-h5", "keras-weights") and roll < 0.45:
        seed_path = os.path.join(workdir, "seed", seed_name)
        _h5_structural(seed_path, path, secret, index % H5_STRUCTURAL_CHOICES, rng)
        return path
    if kind == "torch-zip" and roll < 0.5:
        data = _zip_structural(seed_data, rng)
    elif kind == "torch-legacy" and roll < 0.3:
        data = rng.choice(hostile_pickles())
    elif kind in ("config", "preprocessor"):
        data = mutate_json(json.loads(seed_data), rng)
    elif kind == "shard-index":
        for shard in os.listdir(os.path.join(workdir, "seed")):
            if shard != seed_name:
                os.symlink(os.path.join(workdir, "seed", shard), os.path.join(folder, shard))
        data = _index_structural(json.loads(seed_data), rng, secret)
    elif kind == "image" and 0.35 <= roll < 0.6:
        data = _odd_valid_image(rng)
    elif kind == "image" and roll < 0.35:
        data = _png_header(*rng.choice([(30000, 30000), (1, 60000), (60000, 1), (70000, 2), (2 ** 31 - 1, 2),
                                         (0, 10), (10, 0), (9000, 9000)]))
        if rng.random() < 0.3:  # inside an icon container whose directory says 16x16
            data = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(data), 22) + data
    elif kind == "safetensors" and roll < 0.35:
        data = _safetensors_structural(seed_data, rng)
    else:
        data = mutate_bytes(seed_data, rng)
    with open(path, "wb") as f:
        f.write(data)
    return path


FOREIGN_KERAS_CONFIGS = [
    {"module": "keras", "class_name": "Sequential", "config": {"name": "s", "layers": [
        {"module": "keras.layers", "class_name": "Dense", "config": {"units": 2}}]}, "registered_name": None},
    {"module": "keras.layers", "class_name": "Lambda", "config": {"function": {"class_name": "__lambda__", "config": {
        "code": "4wEAAAAAAAAAAAAAAAEAAAADAAAAQwAAAHMEAAAAfABTAKkBTqkAqQHaAXhyAgAAAHICAAAA+gc8c3RkaW4+2gg8bGFtYmRhPgEAAADzAAAAAA==",
        "defaults": None, "closure": None}}}, "registered_name": None},
    {"module": "os", "class_name": "system", "config": {}, "registered_name": None},
    {"module": "cvt_tf.modeling_cvt", "class_name": "TFCvtForImageClassification", "config": {"config": "x"},
     "registered_name": "cvt_tf>TFCvtForImageClassification"},
    [], "text", None,
]


def _keras_structural(seed: str, out: str, secret: str, rng: random.Random) -> None:
    """The seed .keras archive with one member edited: its config.json swapped for another model's or mutated, its
    weights file given an HDF5 feature that reaches outside it, a member deflated into a bomb, or an extra member."""
    with zipfile.ZipFile(seed) as source:
        members = {name: source.read(name) for name in source.namelist()}
    choice = rng.randrange(5)
    if choice == 0:
        members["config.json"] = _json_bytes(rng.choice(FOREIGN_KERAS_CONFIGS))
    elif choice == 1:
        members["config.json"] = mutate_json(json.loads(members["config.json"]), rng)
    elif choice == 2:
        folder = os.path.dirname(out)
        plain = os.path.join(folder, "inner.weights.h5")
        with open(plain, "wb") as f:
            f.write(members["model.weights.h5"])
        edited = os.path.join(folder, "edited.weights.h5")
        _h5_structural(plain, edited, secret, rng.randrange(H5_STRUCTURAL_CHOICES), rng)
        with open(edited, "rb") as f:
            members["model.weights.h5"] = f.read()
    bomb = None
    if choice == 3:
        bomb = "model.weights.h5"
    elif choice == 4:
        bomb = "assets/extra.bin"
        members[bomb] = b""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for name, data in members.items():
            if name == bomb:
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                target.writestr(info, b"")
            else:
                target.writestr(name, data)
    raw = buffer.getvalue()
    if bomb is not None:  # declared as 1 GiB (or as the honest weights' size), inflating to 1 GiB
        raw = _patch_bomb(bytearray(raw), bomb, deflated_zeros(),
                          len(members[bomb]) if bomb == "model.weights.h5" and rng.random() < 0.5 else 1 << 30)
    with open(out, "wb") as f:
        f.write(raw)


def _index_structural(index: dict, rng: random.Random, secret: str) -> bytes:
    """A shard index whose weight map names a file outside its folder, the secret, itself, or hostile JSON."""
    if rng.random() < 0.4:
        return mutate_json(index, rng)
    edited = json.loads(json.dumps(index))
    name = rng.choice(sorted(edited["weight_map"]))
    edited["weight_map"][name] = rng.choice([
        "../seed/model-00001-of-00002.safetensors", secret, "/etc/passwd", "/dev/zero", ".", "..", "",
        "model.safetensors.index.json", "x.index.json", "sub/model.safetensors", "..\\secret.bin", "a\0b", 7, None,
        ["model-00001-of-00002.safetensors"], "missing.safetensors"])
    return _json_bytes(edited)


def _odd_valid_image(rng: random.Random) -> bytes:
    """A well-formed image of an unusual mode, format or size (16-bit, palette, CMYK, 1-bit, alpha, 1x1 ...)."""
    from PIL import Image

    mode = rng.choice(["RGB", "L", "LA", "RGBA", "P", "1", "I;16", "I", "F", "CMYK", "YCbCr"])
    size = rng.choice([(1, 1), (3, 200), (200, 3), (64, 48), (17, 31)])
    fmt = rng.choice(["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "TGA", "QOI", "ICO"])
    pixels = np.random.default_rng(rng.randrange(2 ** 32)).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode if mode not in ("I;16", "I", "F") else "L")
    if mode in ("I;16", "I", "F"):
        image = image.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(image, np.uint16) * 257)
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt)
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode: TIFF holds them all (and is refused)
        buffer = io.BytesIO()
        image.save(buffer, "TIFF")
    data = buffer.getvalue()
    return mutate_bytes(data, rng) if rng.random() < 0.3 else data


def _safetensors_structural(seed: bytes, rng: random.Random) -> bytes:
    (length,) = struct.unpack("<Q", seed[:8])
    header = json.loads(seed[8: 8 + length])
    body = seed[8 + length:]
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[name]
    choice = rng.randrange(6)
    if choice == 0:
        entry["dtype"] = rng.choice(["C64", "C128", "BOOL", "I32", "U8", "F8_E4M3", "X", 5, None])
    elif choice == 1:
        entry["shape"] = rng.choice([[-1], [2 ** 40], [1.5], [True], "4", [2 ** 31, 2 ** 31], None])
    elif choice == 2:
        entry["data_offsets"] = rng.choice([[0, 2 ** 62], [-8, 0], [len(body), len(body) + 4], [0], None, [0.0, 4.0]])
    elif choice == 3:
        header["__metadata__"] = rng.choice([[1], {"a": {"b": 1}}, "x", {"format": "pt" * 100000}])
    elif choice == 4:
        text = json.dumps(header).encode()
        return struct.pack("<Q", 2 ** 63 + len(text)) + text + body
    else:
        text = deep_json(rng.choice([100_000, 5000]))
        return struct.pack("<Q", len(text)) + text + body
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


# ------------------------------------------------------------------------------------------------- reading

def read_case(kind: str, path: str) -> Dict[str, np.ndarray]:
    """What the library's reader of `kind` gives for `path`: its tensors, or the arrays the input becomes."""
    if kind in ("safetensors", "torch-zip", "torch-legacy", "shard-index"):
        from cvt_core.checkpoint import open_checkpoint

        with open_checkpoint(path) as tensors:
            return {k: tensors[k] for k in tensors}
    if kind == "tf-h5":
        from cvt_core.tf_h5 import open_tf_h5

        with open_tf_h5(path, _config()) as tensors:
            out = {k: tensors[k] for k in tensors}
            out.update({f"keras:{k}": tensors.load_keras(k) for k in tensors})
            return out
    if kind in ("keras-weights", "keras-file"):
        from conversion.keras_native import read_keras

        state = read_keras(path, _config() if kind == "keras-weights" else None)
        with state.tensors:
            return {k: state.keras_loader(k) for k in state.tensors}
    if kind == "config":
        from cvt_core import CvtConfig

        config = CvtConfig.from_json_file(path)
        from cvt_core.weights import count_parameters

        return {"parameters": np.asarray(count_parameters(config))}
    if kind == "preprocessor":
        from cvt_core import CvtImageProcessor

        processor = CvtImageProcessor.from_pretrained(os.path.dirname(path))
        image = np.zeros((8, 8, 3), np.uint8)
        return {"pixel_values": processor(image)["pixel_values"]}
    if kind == "image":
        from cvt_core import CvtImageProcessor

        return {"pixel_values": CvtImageProcessor.for_resolution(32)(path)["pixel_values"]}
    raise ValueError(kind)


def refusal_types(kind: str) -> tuple:
    """The exception types a reader of `kind` promises for input it refuses (docs/security.md)."""
    from cvt_core.errors import CheckpointError

    if kind in ("config", "preprocessor", "image"):
        return (ValueError, TypeError)
    if kind in ("keras-weights", "keras-file"):
        from conversion.errors import ConversionError

        return (ConversionError, CheckpointError)
    return (CheckpointError,)


KINDS = ("safetensors", "torch-zip", "torch-legacy", "shard-index", "tf-h5", "keras-weights", "keras-file", "config",
         "preprocessor", "image")


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _alarm(signum, frame):
    raise TimeoutError("the reader did not finish in time")


# `cvt convert` on a checkpoint folder holding one generated file: the command line's promises (exit 0 or 2, one
# stderr line on a refusal, no traceback, nothing left behind) on the same cases as the readers
CLI_KINDS = ("cli:safetensors", "cli:torch-zip", "cli:tf-h5", "cli:keras-weights", "cli:config")


def _cli_folder(base: str, path: str) -> str:
    """The checkpoint folder of a command-line case: the generated file, and a valid rest (config or weights)."""
    folder = os.path.dirname(path)
    if base == "config":
        _write_safetensors(os.path.join(folder, "model.safetensors"))
    else:
        _config().save_pretrained(folder)
    return folder


def run_cli_case(base: str, path: str) -> Dict[str, object]:
    """`cvt convert FOLDER DST --to torch` in this process; the outcome record of the case."""
    import contextlib

    from cvt_cli.app import main

    folder = _cli_folder(base, path)
    dst = os.path.join(os.path.dirname(folder), "converted-" + os.path.basename(folder))
    source = ["--from", "keras"] if base == "keras-weights" else []
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["convert", folder, dst, "--to", "torch", "--quiet", *source])
    errors = err.getvalue()
    leftovers = [n for n in os.listdir(os.path.dirname(folder)) if ".partial-" in n or ".old-" in n]
    if code not in (0, 1, 2) or "Traceback" in errors:
        return {"outcome": "violation", "detail": f"exit {code}: {errors[-500:]}"}
    if code == 2 and not (errors.startswith("cvt: error: ") and errors.count("\n") == 1):
        return {"outcome": "violation", "detail": f"a refusal that is not one line: {errors[-500:]!r}"}
    if code != 0 and (os.path.exists(dst) or leftovers):
        return {"outcome": "violation", "detail": f"exit {code} left {dst if os.path.exists(dst) else leftovers}"}
    if code == 0:
        for name in os.listdir(dst):
            with open(os.path.join(dst, name), "rb") as f:
                if SECRET_MARK in f.read():
                    return {"outcome": "violation", "detail": f"secret bytes in the converted {name}"}
        return {"outcome": "ok"}
    return {"outcome": "refused", "detail": (errors or out.getvalue()).strip()[-300:]}


def run_worker(kind: str, run_seed: int, start: int, count: int) -> None:
    """Run cases start..start+count-1 of `kind`, printing one JSON line each (see the module docstring)."""
    cli = kind.startswith("cli:")
    base = kind[len("cli:"):] if cli else kind
    workdir = tempfile.mkdtemp(prefix=f"cvt-fuzz-{base}-", dir=os.environ.get("CVT_FUZZ_TMP"))
    Subject(base, workdir)
    seed_name, seed_data = _seed_bytes(base, workdir)
    if cli:
        os.makedirs(os.path.join(workdir, "seed-case"))
        shutil_copy = __import__("shutil").copyfile
        shutil_copy(os.path.join(workdir, "seed", seed_name), os.path.join(workdir, "seed-case", seed_name))
        assert run_cli_case(base, os.path.join(workdir, "seed-case", seed_name))["outcome"] == "ok"
    else:
        read_case(kind, os.path.join(workdir, "seed", seed_name))  # the seed reads, and every import is done
    hostile_pickles()
    deflated_zeros()
    limit = _vm_size() + HEADROOM_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _alarm)
    accepted = refusal_types(kind)
    for index in range(start, start + count):
        print(json.dumps({"start": index}), flush=True)
        record: Dict[str, object] = {"case": index}
        try:
            path = make_case(base, workdir, seed_name, seed_data, index, run_seed)
        except Exception as exc:  # the generator itself failed: not a finding about the reader
            record.update(outcome="skipped", detail=f"{type(exc).__name__}: {exc}"[:300])
            print(json.dumps(record), flush=True)
            continue
        signal.alarm(CASE_SECONDS * (3 if cli else 1))
        if cli:
            try:
                record.update(run_cli_case(base, path))
            except BaseException as exc:  # noqa: BLE001 - main() itself let something through
                record.update(outcome="violation", detail=f"{type(exc).__name__}: {str(exc)[:300]}")
            signal.alarm(0)
            print(json.dumps(record), flush=True)
            _remove_tree(os.path.join(workdir, f"case-{index}"))
            _remove_tree(os.path.join(workdir, f"converted-case-{index}"))
            continue
        try:
            arrays = read_case(kind, path)
            signal.alarm(0)
            leaked = [k for k, v in arrays.items() if SECRET_MARK in np.ascontiguousarray(v).tobytes()]
            not_finite = [k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
            if leaked:
                record.update(outcome="violation", detail=f"secret bytes in {leaked[:3]}")
            elif not_finite and kind in ("preprocessor", "image"):
                record.update(outcome="violation", detail=f"preprocessing produced NaN or infinity in {not_finite}")
            else:
                record.update(outcome="ok")
        except accepted as exc:
            signal.alarm(0)
            message = str(exc)
            if "\n" in message or not message.strip() or len(message) > 2000:
                record.update(outcome="violation", detail=f"refusal is not one line: {message[:500]!r}")
            elif SECRET_MARK.decode() in message:
                record.update(outcome="violation", detail=f"secret bytes in the message: {message[:300]!r}")
            else:
                record.update(outcome="refused", detail=message[:300])
        except BaseException as exc:  # noqa: BLE001 - every other outcome is the finding
            signal.alarm(0)
            tail = traceback.format_exc().strip().splitlines()[-4:]
            record.update(outcome="violation", detail=f"{type(exc).__name__}: {str(exc)[:300]}", traceback=tail)
        print(json.dumps(record), flush=True)
        _remove_tree(os.path.join(workdir, f"case-{index}"))
    _remove_tree(workdir)


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    run_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
