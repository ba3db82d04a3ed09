"""Reading and writing transformers PyTorch checkpoints as NumPy arrays, with no framework and no pickle execution.

Both backends load `model.safetensors`, sharded `*.safetensors.index.json` and `pytorch_model.bin` (also
sharded) through this module, so the Keras side needs no PyTorch and no checkpoint can run code on load:
`.bin` files are read by an unpickler that only rebuilds tensors and refuses every other global.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
import zipfile
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np

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


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or unsafe; the message names the file and the problem."""


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
        raise CheckpointError(f"{path}: tensor dtype {code} is not supported")
    return _SAFETENSORS_DTYPES[code]


def safetensors_dtype_code(dtype: np.dtype) -> str:
    """The safetensors name of a NumPy dtype (`F32`, `BF16`, ...)."""
    if dtype.name == "bfloat16":
        return "BF16"
    for code, known in _SAFETENSORS_DTYPES.items():
        if known == dtype.newbyteorder("<") or known == dtype:
            return code
    raise CheckpointError(f"cannot store dtype {dtype} in safetensors")


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file as read-only, memory-mapped NumPy arrays."""
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
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    data_start = 8 + header_len
    data_len = size - data_start
    tensors: Dict[str, np.ndarray] = {}
    raw = np.memmap(path, dtype=np.uint8, mode="r") if data_len > 0 else np.zeros(0, np.uint8)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _safetensors_dtype(info["dtype"], path)
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}") from None
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end > data_len or end - begin != expected or begin < 0:
            raise CheckpointError(f"{path}: truncated or corrupt: tensor {name!r} needs bytes {begin}..{end} of {data_len}")
        tensors[name] = raw[data_start + begin: data_start + end].view(dtype).reshape(shape)
    return tensors


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


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *unused) -> np.ndarray:
    itemsize = storage.dtype.itemsize
    if not size:
        return storage.data[offset: offset + 1].reshape(())
    byte_strides = tuple(int(s) * itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(storage.data[offset:], shape=tuple(size), strides=byte_strides, writeable=False)


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
    return data


class _StateDict(dict):
    """Stands in for OrderedDict: torch pickles state dicts with a `_metadata` attribute, which a plain dict refuses."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors from PyTorch's zip format and refuses any other global: nothing in the file can run code."""

    _ALLOWED = {
        ("collections", "OrderedDict"): _StateDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("builtins", "set"): set,
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self._archive, self._prefix, self._path = archive, prefix, path
        self._storages: Dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(
            f"{self._path}: refusing to load: the pickle asks for {module}.{name}, which could run code; "
            f"only plain tensors are accepted (convert the file to safetensors with a trusted tool)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unsupported persistent id in the pickle")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._path}: unsupported storage type in the pickle")
        if key not in self._storages:
            code = _TORCH_STORAGE_DTYPES[storage_type.name]
            dtype = _bfloat16() if code == "bfloat16" else np.dtype(code)
            if dtype is None:
                raise CheckpointError(f"{self._path}: holds bfloat16 tensors; install ml_dtypes to read them")
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise CheckpointError(f"{self._path}: truncated or corrupt: storage {key} is missing") from None
            data = np.frombuffer(raw, dtype=np.uint8)
            usable = len(data) - len(data) % dtype.itemsize
            self._storages[key] = _Storage(dtype, data[:usable].view(dtype))
        return self._storages[key]


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
            with archive.open(pickles[0]) as f:
                obj = _RestrictedUnpickler(f, archive, prefix, path).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, OSError, ValueError, TypeError, struct.error) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt ({type(exc).__name__}: {exc})") from None
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


def read_weights_file(path: str) -> Dict[str, np.ndarray]:
    """A `.safetensors`, `.bin` or sharded `*.index.json` file as a flat dict of NumPy arrays."""
    if path.endswith(".index.json"):
        try:
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
            weight_map = index["weight_map"]
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{path}: corrupt shard index (needs a 'weight_map' object)") from None
        out: Dict[str, np.ndarray] = {}
        folder = os.path.dirname(path)
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(folder, shard)
            tensors = read_weights_file(shard_path)
            expected = {k for k, v in weight_map.items() if v == shard}
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
    # The tf_model.h5 reader (NumPy and h5py, no TensorFlow) lives with the other foreign formats in `conversion`;
    # it reads the file against the folder's own config, so a model built with other sizes (a new head, say) still
    # gets its strict / ignore_mismatched_sizes report from the load plan, as with PyTorch weights.
    from conversion.errors import ConversionError
    from conversion.hf_tf_h5 import read_tf_h5

    from .config import CvtConfig

    try:
        state = read_tf_h5(path, CvtConfig.from_pretrained(directory))
        try:
            return {state.name(e): state.array(e) for e in state.entries() if state.name(e) in state.tensors}
        finally:
            state.close()
    except ConversionError as exc:
        raise CheckpointError(str(exc)) from None


def read_pretrained(directory: str, with_head: bool, config=None, strict: bool = True,
                    ignore_mismatched_sizes: bool = False, **config_overrides: Any):
    """What both models' `from_pretrained` start from: the config (read from the folder unless given, with
    overrides applied), the folder's state dict, and the checked plan mapping it onto the model's weight table.
    Raises `WeightLoadError` as `LoadPlan.check` does."""
    from .config import CvtConfig
    from .weights import plan_load

    directory = os.fspath(directory)
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


def iter_state_shapes(state: Mapping[str, np.ndarray]) -> Iterable[tuple]:
    return ((k, tuple(v.shape)) for k, v in state.items())
