"""Reading and writing transformers PyTorch checkpoints as NumPy arrays, with no framework and no pickle execution.

Both backends load `model.safetensors`, sharded `*.safetensors.index.json` and `pytorch_model.bin` (also
sharded) through this module, so the Keras side needs no PyTorch and no checkpoint can run code on load:
`.bin` files are read by an unpickler that only rebuilds tensors and refuses every other global. Nothing a file
says is trusted: every tensor view must lie inside its stored bytes, every safetensors entry inside the file, and
every shard of an index must be a plain file in the index's folder; anything else is one `CheckpointError` line.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import tempfile
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .errors import CheckpointError

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_BIN_NAME = "pytorch_model.bin"
PYTORCH_BIN_INDEX_NAME = "pytorch_model.bin.index.json"
# a folder's PyTorch weights, in the order from_pretrained prefers them
PYTORCH_WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_BIN_NAME, PYTORCH_BIN_INDEX_NAME)
TF_WEIGHTS_NAME = "tf_model.h5"  # transformers' TF weights (Keras 2 HDF5); read by conversion.hf_tf_h5
# what from_pretrained reads, in order of preference: PyTorch weights first, transformers' TF weights last
PRETRAINED_WEIGHT_NAMES = PYTORCH_WEIGHT_NAMES + (TF_WEIGHTS_NAME,)
KERAS_WEIGHTS_NAME = "model.weights.h5"  # Keras 3's own files, written and read by conversion.keras_native
KERAS_MODEL_NAME = "model.keras"
CONFIG_NAME = "config.json"


def _bfloat16():
    try:
        import ml_dtypes  # shipped with TensorFlow and JAX; optional otherwise

        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:  # pragma: no cover - depends on the environment
        return None


_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("bool"),
}


def _safetensors_dtype(code: str, path: str) -> np.dtype:
    if code == "BF16":
        bf16 = _bfloat16()
        if bf16 is None:
            raise CheckpointError(f"{path}: holds bfloat16 tensors; install ml_dtypes (pip install ml_dtypes) to read them")
        return bf16
    if code not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor dtype {_short(code)} is not supported")
    return _SAFETENSORS_DTYPES[code]


def safetensors_dtype_code(dtype: np.dtype) -> str:
    """The safetensors name of a NumPy dtype (`F32`, `BF16`, ...)."""
    if dtype.name == "bfloat16":
        return "BF16"
    for code, known in _SAFETENSORS_DTYPES.items():
        if known == dtype.newbyteorder("<") or known == dtype:
            return code
    raise CheckpointError(f"cannot store dtype {dtype} in safetensors")


class SafetensorsHeader(NamedTuple):
    """A validated safetensors header: every tensor's dtype, shape and absolute byte range in the file."""

    tensors: Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int]]  # name -> (dtype, shape, begin, end)
    metadata: Dict[str, Any]


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_safetensors_header(path: str) -> SafetensorsHeader:
    """The header of a `.safetensors` file, checked so that every tensor lies inside the file's data: a JSON
    object whose entries have a known dtype, a shape of non-negative integers and `data_offsets` whose length is
    exactly the shape's size. Raises `CheckpointError` (one line) on anything else."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated (no safetensors header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > 100 * 1024 * 1024:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header (declares {header_len} bytes)")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors file") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + header_len
    data_len = size - data_start
    tensors: Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r} (needs dtype, shape and data_offsets)")
        dtype = _safetensors_dtype(info["dtype"], path)
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_index(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}: shape {_short(shape)} is not a list of "
                                  f"non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(x) for x in offsets)):
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}: data_offsets {_short(offsets)} is not two "
                                  f"integers")
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= data_len or end - begin != expected:
            raise CheckpointError(f"{path}: truncated or corrupt: tensor {name!r} ({info['dtype']}{_short(shape)}, "
                                  f"{expected} bytes) claims bytes {begin}..{end} of {data_len}")
        tensors[name] = (dtype, tuple(shape), data_start + begin, data_start + end)
    return SafetensorsHeader(tensors, metadata)


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file as read-only, memory-mapped NumPy arrays."""
    header = read_safetensors_header(path)
    if not any(end > begin for _, _, begin, end in header.tensors.values()):
        return {name: np.zeros(shape, dtype) for name, (dtype, shape, _, _) in header.tensors.items()}
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: raw[begin:end].view(dtype).reshape(shape) for name, (dtype, shape, begin, end) in header.tensors.items()}


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write `tensors` to `path` atomically (a temporary file in the same folder, then a rename)."""
    arrays = {name: np.asarray(array) for name, array in tensors.items()}
    write_safetensors_streaming(path, [(name, a.shape, a.dtype) for name, a in arrays.items()], arrays.__getitem__, metadata)


def write_safetensors_streaming(path: str, layout: Sequence[Tuple[str, Sequence[int], np.dtype]],
                                fetch: Callable[[str], np.ndarray], metadata: Optional[Dict[str, str]] = None,
                                iterate: Callable[[Iterable], Iterable] = iter) -> None:
    """Write tensors named in `layout` (name, shape, dtype), asking `fetch(name)` for one at a time, so a
    conversion never holds more than one tensor in memory. Atomic: a temporary file beside `path`, then a rename;
    the file gets the usual permissions (umask applied). `iterate` may wrap the loop, e.g. in a progress bar."""
    metadata = {"format": "pt", **(metadata or {})}
    header: Dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in layout:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": safetensors_dtype_code(dtype), "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint should be readable like any file
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for name, shape, dtype in iterate(layout):
                array = np.asarray(fetch(name))
                begin, end = header[name]["data_offsets"]
                if tuple(array.shape) != tuple(int(d) for d in shape) or array.nbytes != end - begin or \
                        array.dtype != np.dtype(dtype):
                    raise CheckpointError(f"{path}: tensor {name!r} is {array.dtype}{tuple(array.shape)}, "
                                          f"expected {np.dtype(dtype)}{tuple(shape)}")
                f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------ pytorch_model.bin
_TORCH_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "bool", "BFloat16Storage": "bfloat16",
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Storage:
    def __init__(self, dtype: np.dtype, data: np.ndarray):
        self.dtype, self.data = dtype, data


def tensor_view_problem(numel: int, offset: Any, size: Any, stride: Any) -> Optional[str]:
    """Why the tensor view (offset, size, stride), in elements, does not lie inside a storage of `numel` elements,
    or None when it does. Every reader of pickled tensors checks this before it makes or uses a view."""
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and all(_is_index(v) for v in (offset, *size, *stride))):
        return f"a tensor view has a non-integer offset, size or stride ({_short((offset, size, stride))})"
    if len(size) != len(stride):
        return f"a tensor view has {len(size)} sizes but {len(stride)} strides"
    if offset < 0 or any(v < 0 for v in (*size, *stride)):
        return f"a tensor view has a negative offset, size or stride ({_short((offset, tuple(size), tuple(stride)))})"
    if 0 in size:
        inside = offset <= numel
    else:
        inside = offset + sum((n - 1) * st for n, st in zip(size, stride)) < numel
    if not inside:
        return (f"a tensor view (offset {offset}, size {_short(tuple(size))}, stride {_short(tuple(stride))}) "
                f"reaches beyond its storage of {numel} elements")
    return None


def _rebuild_tensor(storage: _Storage, offset: int, size, stride) -> np.ndarray:
    """The view; `tensor_view_problem` must have passed."""
    if 0 in size:
        return np.zeros(tuple(size), storage.dtype)
    if not size:
        return storage.data[offset: offset + 1].reshape(())
    byte_strides = tuple(s * storage.dtype.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(storage.data[offset:], shape=tuple(size), strides=byte_strides, writeable=False)


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
    return data


class _StateDict(dict):
    """Stands in for OrderedDict: torch pickles state dicts with a `_metadata` attribute, which a plain dict refuses."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors from PyTorch's zip format and refuses any other global: nothing in the file can run code."""

    _ALLOWED = {
        ("collections", "OrderedDict"): _StateDict,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("builtins", "set"): set,
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self._archive, self._prefix, self._path = archive, prefix, path
        self._storages: Dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name.endswith("Storage"):
            raise CheckpointError(f"{self._path}: storage type torch.{name} is not supported (only "
                                  f"{', '.join(_TORCH_STORAGE_DTYPES)}); convert the file to safetensors")
        raise CheckpointError(
            f"{self._path}: refusing to load: the pickle asks for {module}.{name}, which could run code; "
            f"only plain tensors are accepted (convert the file to safetensors with a trusted tool)"
        )

    def _rebuild_tensor(self, storage=None, offset=None, size=None, stride=None, *unused, **unused_keywords):
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"{self._path}: refusing to load: a tensor is rebuilt from "
                                  f"{type(storage).__name__}, not from a storage")
        problem = tensor_view_problem(storage.data.size, offset, size, stride)
        if problem is not None:
            raise CheckpointError(f"{self._path}: refusing to load: {problem}")
        return _rebuild_tensor(storage, offset, size, stride)

    def persistent_load(self, pid):
        # torch.save writes ('storage', storage type, key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unsupported persistent id {_short(pid)} in the pickle")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._path}: unsupported storage type {_short(storage_type)} in the pickle")
        if not (isinstance(key, str) and key and "/" not in key and "\\" not in key
                and _is_index(numel) and numel >= 0):
            raise CheckpointError(f"{self._path}: corrupt persistent id {_short(pid)} in the pickle")
        code = _TORCH_STORAGE_DTYPES[storage_type.name]
        dtype = _bfloat16() if code == "bfloat16" else np.dtype(code)
        if dtype is None:
            raise CheckpointError(f"{self._path}: holds bfloat16 tensors; install ml_dtypes to read them")
        if key in self._storages:
            known = self._storages[key]
            if known.dtype != dtype or known.data.size != numel:
                raise CheckpointError(f"{self._path}: corrupt: storage {key} is named as {storage_type.name} of "
                                      f"{numel} elements and as {known.dtype} of {known.data.size}")
            return known
        record = f"{self._prefix}data/{key}"
        try:
            stored = self._archive.getinfo(record).file_size
        except KeyError:
            raise CheckpointError(f"{self._path}: truncated or corrupt: storage {key} is missing") from None
        if stored != numel * dtype.itemsize:
            raise CheckpointError(f"{self._path}: truncated or corrupt: storage {key} holds {stored} bytes, but the "
                                  f"pickle says {numel} {storage_type.name} elements ({numel * dtype.itemsize} bytes)")
        raw = self._archive.read(record)
        if len(raw) != stored:  # zipfile checks this too; a short read must never become a short storage
            raise CheckpointError(f"{self._path}: truncated or corrupt: storage {key} is shorter than its record")
        self._storages[key] = _Storage(dtype, np.frombuffer(raw, dtype=dtype))
        return self._storages[key]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_torch_bin(path: str) -> Dict[str, np.ndarray]:
    """Tensors of a `torch.save` zip file (`pytorch_model.bin`) without executing pickled code."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a PyTorch zip checkpoint (truncated, corrupt, or the legacy pre-1.6 format); "
            f"re-save it with torch.save or convert it to safetensors"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not pickles:
                raise CheckpointError(f"{path}: no data.pkl inside: not a torch.save checkpoint")
            prefix = pickles[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder").strip() != b"little":
                raise CheckpointError(f"{path}: stored in big-endian byte order, which is not supported; re-save it "
                                      f"with torch.save on a little-endian machine or convert it to safetensors")
            with archive.open(pickles[0]) as f:
                obj = _RestrictedUnpickler(f, archive, prefix, path).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, OSError, ValueError, TypeError, struct.error,
            AttributeError, KeyError, IndexError, OverflowError, RecursionError) as exc:
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise CheckpointError(f"{path}: truncated or corrupt ({type(exc).__name__}: {reason})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a flat dictionary of tensors")
    return {str(k): v for k, v in obj.items()}


# ------------------------------------------------------------------------------------------ checkpoint folders
def pretrained_weights_file(directory: str) -> Optional[str]:
    """The weights file `from_pretrained` reads in a checkpoint folder (the first of `PRETRAINED_WEIGHT_NAMES`
    present), or None."""
    for name in PRETRAINED_WEIGHT_NAMES:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def read_shard_index(path: str) -> Dict[str, List[str]]:
    """The shards a `*.index.json` names, as {shard path: names of the tensors it holds}, in shard-name order.

    Each shard must be a plain file name in the index's own folder (no path, no `..`, not an index itself) that
    exists there (a symlink is fine, as in Hugging Face caches); anything else is refused with one line."""
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, IsADirectoryError):
        raise CheckpointError(f"{path}: corrupt shard index (not a JSON file)") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: corrupt shard index (needs a 'weight_map' object)")
    folder = os.path.dirname(path)
    own_name = os.path.basename(path)
    shards: Dict[str, List[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{path}: corrupt shard index: tensor {name!r} names shard {_short(shard)}, not a "
                                  f"file name")
        if shard == own_name or shard.endswith(".index.json"):
            raise CheckpointError(f"{path}: corrupt shard index: tensor {name!r} names the index file {shard!r} as "
                                  f"its shard")
        if (not shard or shard in (".", "..") or "/" in shard or "\\" in shard or "\0" in shard
                or os.path.isabs(shard)):
            raise CheckpointError(f"{path}: refusing shard {_short(shard)} (for tensor {name!r}): a shard must be "
                                  f"a plain file name in the index's folder")
        shards.setdefault(shard, []).append(name)
    out: Dict[str, List[str]] = {}
    for shard in sorted(shards):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"{shard_path}: no such file, though the shard index {own_name} lists it for "
                                  f"{len(shards[shard])} tensors (e.g. {shards[shard][0]})")
        out[shard_path] = shards[shard]
    return out


def read_weights_file(path: str) -> Dict[str, np.ndarray]:
    """A `.safetensors`, `.bin` or sharded `*.index.json` file as a flat dict of NumPy arrays."""
    if path.endswith(".index.json"):
        out: Dict[str, np.ndarray] = {}
        for shard_path, names in read_shard_index(path).items():
            tensors = read_weights_file(shard_path)
            expected = set(names)
            absent = expected - set(tensors)
            if absent:
                raise CheckpointError(f"{shard_path}: shard lacks {len(absent)} tensors its index lists, e.g. {sorted(absent)[0]}")
            out.update({k: tensors[k] for k in expected})
        return out
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return read_torch_bin(path)


def load_pretrained_state(directory: str) -> Dict[str, np.ndarray]:
    """The state dict (transformers PyTorch names and layouts) of a checkpoint folder: its PyTorch weights, or, in
    a folder that holds only transformers' TF weights (`tf_model.h5`, as `save_pretrained` of transformers' TF
    classes or `cvt convert --to hf-tf` write it), those."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory (expected a checkpoint folder with config.json and weights)")
    path = pretrained_weights_file(directory)
    if path is None:
        present = sorted(os.listdir(directory))
        hint = ""
        if {KERAS_MODEL_NAME, KERAS_WEIGHTS_NAME} & set(present):
            hint = ("; Keras 3 files load with keras.models.load_model / model.load_weights, or convert the folder "
                    "with `cvt convert DIR OUT --to torch`")
        raise CheckpointError(f"{directory}: no weights found (looked for {', '.join(PRETRAINED_WEIGHT_NAMES)}); the "
                              f"folder holds {present or 'nothing'}{hint}")
    if os.path.basename(path) == TF_WEIGHTS_NAME:
        return _read_tf_weights(directory, path)
    return read_weights_file(path)


def _read_tf_weights(directory: str, path: str) -> Dict[str, np.ndarray]:
    # Read against the folder's own config, so that a model built with other sizes (a new head, say) still gets
    # its strict / ignore_mismatched_sizes report from the load plan, as with PyTorch weights.
    from .config import CvtConfig
    from .tf_h5 import open_tf_h5

    weights = open_tf_h5(path, CvtConfig.from_pretrained(directory))
    try:
        return {key: weights.load(key) for key in weights.shapes}
    finally:
        weights.close()


def check_pretrained_folder(directory: str, needs_config: bool = True) -> None:
    """Raise `CheckpointError` in one line unless `directory` is a folder (holding config.json if `needs_config`):
    what `from_pretrained` is given instead, a weights file or config.json itself, would otherwise be read as JSON."""
    if os.path.isfile(directory):
        raise CheckpointError(f"{directory}: is a file; pass the folder that holds config.json")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such folder; pass the folder that holds config.json and the weights "
                              f"(hub names are not downloaded)")
    if needs_config and not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        present = sorted(os.listdir(directory))
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} in this folder (it holds {present or 'nothing'}); pass "
                              f"the folder that holds config.json, or give config=")


def read_pretrained(directory: str, with_head: bool, config=None, strict: bool = True,
                    ignore_mismatched_sizes: bool = False, **config_overrides: Any):
    """What both models' `from_pretrained` start from: the config (read from the folder unless given, with
    overrides applied), the folder's state dict, and the checked plan mapping it onto the model's weight table.
    Raises `WeightLoadError` as `LoadPlan.check` does."""
    from .config import CvtConfig
    from .weights import plan_load

    directory = os.fspath(directory)
    check_pretrained_folder(directory, needs_config=config is None)
    if config is None:
        config = CvtConfig.from_pretrained(directory, **config_overrides)
    elif config_overrides:
        config = config.copy(**config_overrides)
    state = load_pretrained_state(directory)
    plan = plan_load(config, with_head, {k: v.shape for k, v in state.items()})
    plan.check(directory, strict=strict, ignore_mismatched_sizes=ignore_mismatched_sizes)
    return config, state, plan


def save_pretrained_state(directory: str, tensors: Mapping[str, np.ndarray]) -> str:
    """Write `model.safetensors` into `directory` atomically; removes a stale `pytorch_model.bin` twin."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SAFETENSORS_NAME)
    write_safetensors(path, tensors)
    for stale in (PYTORCH_BIN_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_BIN_INDEX_NAME):
        # a leftover older-format file would shadow or contradict the new weights
        stale_path = os.path.join(directory, stale)
        if os.path.exists(stale_path):
            os.unlink(stale_path)
    return path

