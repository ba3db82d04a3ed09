"""The one reader of `torch.save` files (`pytorch_model.bin`, original `.pth`), with no PyTorch and no pickled code.

Both layouts torch.save has written are read here:

- the zip layout (torch >= 1.6): `<prefix>/data.pkl` holds the object, each storage is the record
  `<prefix>/data/<key>`, and `<prefix>/byteorder` says little or big endian;
- the legacy layout (`_use_new_zipfile_serialization=False`, and every file torch < 1.6 wrote): five pickles and
  raw bytes in one stream: the magic number, the protocol version (1001), a dict of system information, the object,
  the list of storage keys; then, per key in that order, the storage's element count (int64) and its bytes.

The object pickle is read by an unpickler that knows only the globals a tensor state dict needs (it rebuilds
tensors, parameters and ordered dicts) and refuses every other one, so nothing in a file can run code; the other
pickles of the legacy layout may hold no global at all. Nothing a file says is trusted: every persistent id must
be well formed, every storage's stored size must equal the size the pickle gives it, and every tensor view must
lie inside its storage (`tensor_view_problem`), all checked while the file is opened, before any view is built.
The storages themselves are read when a tensor is asked for.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Dict, NamedTuple, Optional

import numpy as np

from .dtypes import bfloat16_dtype
from .errors import CheckpointError
from .tensor_file import LazyTensors, is_index, read_exactly, short_repr

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "bool", "BFloat16Storage": "bfloat16",
}
# torch/serialization.py: MAGIC_NUMBER and PROTOCOL_VERSION of the legacy layout
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
# the keys under which training scripts wrap a state dict
STATE_DICT_WRAPPERS = ("state_dict", "model")


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Storage(NamedTuple):
    """A storage the pickle names: `numel` elements of `dtype` from element `start` of the stored record `key`
    (`start` is 0 except for the legacy layout's storage views)."""

    key: str
    type_name: str
    dtype: np.dtype
    numel: int
    start: int = 0


class _TensorRef(NamedTuple):
    """A tensor the pickle rebuilds: a view (offset, size, stride, in elements) that lies inside `storage`."""

    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


def tensor_view_problem(numel: int, offset: Any, size: Any, stride: Any) -> Optional[str]:
    """Why the tensor view (offset, size, stride), in elements, does not lie inside a storage of `numel` elements,
    or None when it does. Every reader of pickled tensors checks this before it makes or uses a view."""
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and all(is_index(v) for v in (offset, *size, *stride))):
        return f"a tensor view has a non-integer offset, size or stride ({short_repr((offset, size, stride))})"
    if len(size) != len(stride):
        return f"a tensor view has {len(size)} sizes but {len(stride)} strides"
    if offset < 0 or any(v < 0 for v in (*size, *stride)):
        return f"a tensor view has a negative offset, size or stride ({short_repr((offset, tuple(size), tuple(stride)))})"
    if 0 in size:
        inside = offset <= numel
    else:
        inside = offset + sum((n - 1) * st for n, st in zip(size, stride)) < numel
    if not inside:
        return (f"a tensor view (offset {offset}, size {short_repr(tuple(size))}, stride {short_repr(tuple(stride))}) "
                f"reaches beyond its storage of {numel} elements")
    return None


def _view(data: np.ndarray, ref: _TensorRef) -> np.ndarray:
    """The tensor `ref` over its storage's elements `data`; `tensor_view_problem` has passed."""
    size, stride, offset = tuple(ref.size), tuple(ref.stride), ref.offset
    if 0 in size:
        return np.zeros(size, data.dtype)
    if not size:
        return data[offset: offset + 1].reshape(())
    byte_strides = tuple(s * data.dtype.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(data[offset:], shape=size, strides=byte_strides, writeable=False)


def _rebuild_parameter(data, *unused):
    return data


class _StateDict(dict):
    """Stands in for OrderedDict: torch pickles state dicts with a `_metadata` attribute, which a plain dict refuses."""


def _refuse_global(path: str, module: str, name: str) -> CheckpointError:
    return CheckpointError(f"{path}: refusing to load: the pickle asks for {module}.{name}, which could run code; "
                           f"only plain tensors are accepted (convert the file to safetensors with a trusted tool)")


class _PlainUnpickler(pickle.Unpickler):
    """For the legacy layout's other pickles (magic number, versions, storage keys): plain values only."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        raise _refuse_global(self._path, module, name)

    def persistent_load(self, pid):
        raise CheckpointError(f"{self._path}: unsupported persistent id {short_repr(pid)} in the pickle")


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds a state dict of tensors and refuses any other global. `check_storage(storage)` is asked about each
    storage when the pickle first names it (the zip layout checks its record there; the legacy layout's storages
    come after the pickle and are checked by the caller)."""

    _ALLOWED = {
        ("collections", "OrderedDict"): _StateDict,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("builtins", "set"): set,
    }

    def __init__(self, file, path: str, legacy: bool, check_storage: Callable[[_Storage], None]):
        super().__init__(file)
        self._path, self._legacy, self._check_storage = path, legacy, check_storage
        self.storages: Dict[str, _Storage] = {}  # by key, as the pickle first named them (legacy views: their root)

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
        raise _refuse_global(self._path, module, name)

    def _rebuild_tensor(self, storage=None, offset=None, size=None, stride=None, *unused, **unused_keywords):
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"{self._path}: refusing to load: a tensor is rebuilt from "
                                  f"{type(storage).__name__}, not from a storage")
        problem = tensor_view_problem(storage.numel, offset, size, stride)
        if problem is not None:
            raise CheckpointError(f"{self._path}: refusing to load: {problem}")
        return _TensorRef(storage, offset, tuple(size), tuple(stride))

    def persistent_load(self, pid):
        # torch.save writes ('storage', storage type, key, location, number of elements), and in the legacy layout
        # a sixth item: None, or (view key, offset, number of elements) for a view into the storage
        length = 6 if self._legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == length and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unsupported persistent id {short_repr(pid)} in the pickle")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._path}: unsupported storage type {short_repr(storage_type)} in the pickle")
        if not (isinstance(key, str) and key and "/" not in key and "\\" not in key
                and is_index(numel) and numel >= 0):
            raise CheckpointError(f"{self._path}: corrupt persistent id {short_repr(pid)} in the pickle")
        code = _TORCH_STORAGE_DTYPES[storage_type.name]
        dtype = bfloat16_dtype(self._path) if code == "bfloat16" else np.dtype(code)
        storage = self.storages.get(key)
        if storage is not None:
            if storage.dtype != dtype or storage.numel != numel:
                raise CheckpointError(f"{self._path}: corrupt: storage {key} is named as {storage_type.name} of "
                                      f"{numel} elements and as {storage.dtype} of {storage.numel}")
        else:
            storage = self.storages[key] = _Storage(key, storage_type.name, dtype, numel)
            self._check_storage(storage)
        view = pid[5] if self._legacy else None
        if view is None:
            return storage
        if not (isinstance(view, tuple) and len(view) == 3 and is_index(view[1]) and is_index(view[2])
                and 0 <= view[1] and 0 <= view[2] and view[1] + view[2] <= numel):
            raise CheckpointError(f"{self._path}: refusing to load: storage view {short_repr(view)} does not lie "
                                  f"inside storage {key} of {numel} elements")
        return storage._replace(numel=view[2], start=view[1])


def _state_dict_of(obj: Any, path: str) -> Dict[str, _TensorRef]:
    if isinstance(obj, dict):
        for wrapper in STATE_DICT_WRAPPERS:
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, _TensorRef) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a flat dictionary of tensors")
    return {str(k): v for k, v in obj.items()}


def _lazy(refs: Dict[str, _TensorRef], read_storage: Callable[[_Storage], np.ndarray],
          closer: Callable[[], None]) -> LazyTensors:
    return LazyTensors({k: r.size for k, r in refs.items()}, {k: r.storage.dtype for k, r in refs.items()},
                       lambda key: _view(read_storage(refs[key].storage), refs[key]), closer)


def open_torch_bin(path: str) -> LazyTensors:
    """The tensors of a `torch.save` file (zip or legacy layout), checked whole and read on access; see the module
    docstring. A dict wrapping the state dict under `state_dict` or `model` is unwrapped."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a PyTorch checkpoint file")
    opener = _open_zip if zipfile.is_zipfile(path) else _open_legacy
    try:
        return opener(path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, OSError, ValueError, TypeError, struct.error,
            AttributeError, KeyError, IndexError, OverflowError, RecursionError, MemoryError) as exc:
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise CheckpointError(f"{path}: truncated or corrupt ({type(exc).__name__}: {reason})") from None


def _open_zip(path: str) -> LazyTensors:
    archive = zipfile.ZipFile(path)
    try:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pickles:
            raise CheckpointError(f"{path}: no data.pkl inside: not a torch.save checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise CheckpointError(f"{path}: stored in big-endian byte order, which is not supported; re-save it "
                                  f"with torch.save on a little-endian machine or convert it to safetensors")

        def check_storage(storage: _Storage) -> None:
            try:
                stored = archive.getinfo(f"{prefix}data/{storage.key}").file_size
            except KeyError:
                raise CheckpointError(f"{path}: truncated or corrupt: storage {storage.key} is missing") from None
            if stored != storage.numel * storage.dtype.itemsize:
                raise CheckpointError(f"{path}: truncated or corrupt: storage {storage.key} holds {stored} bytes, but "
                                      f"the pickle says {storage.numel} {storage.type_name} elements "
                                      f"({storage.numel * storage.dtype.itemsize} bytes)")

        with archive.open(pickles[0]) as f:
            refs = _state_dict_of(_RestrictedUnpickler(f, path, False, check_storage).load(), path)
    except BaseException:
        archive.close()
        raise

    def read_storage(storage: _Storage) -> np.ndarray:
        raw = archive.read(f"{prefix}data/{storage.key}")
        if len(raw) != storage.numel * storage.dtype.itemsize:  # zipfile checks this too; never a short storage
            raise CheckpointError(f"{path}: truncated or corrupt: storage {storage.key} is shorter than its record")
        return np.frombuffer(raw, dtype=storage.dtype)

    return _lazy(refs, read_storage, archive.close)


def _open_legacy(path: str) -> LazyTensors:
    f = open(path, "rb")
    try:
        refs, offsets = _read_legacy_layout(f, path)
    except BaseException:
        f.close()
        raise

    def read_storage(storage: _Storage) -> np.ndarray:
        out = np.empty(storage.numel, storage.dtype)
        return read_exactly(f.fileno(), offsets[storage.key] + storage.start * storage.dtype.itemsize, out, path)

    return _lazy(refs, read_storage, f.close)


def _read_legacy_layout(f, path: str):
    """(tensor refs, {storage key: byte offset of its data}) of a legacy-layout file, every size checked."""
    try:
        magic = _PlainUnpickler(f, path).load()
    except Exception:
        magic = None
    if not (is_index(magic) and magic == LEGACY_MAGIC_NUMBER):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (truncated or corrupt: not a PyTorch zip checkpoint, "
                              f"nor the legacy pre-1.6 format); re-save it with torch.save or convert it to safetensors")
    protocol = _PlainUnpickler(f, path).load()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise CheckpointError(f"{path}: legacy torch.save file of protocol version {short_repr(protocol)}, not "
                              f"{LEGACY_PROTOCOL_VERSION}; re-save it with torch.save or convert it to safetensors")
    sys_info = _PlainUnpickler(f, path).load()
    if not isinstance(sys_info, dict):
        raise CheckpointError(f"{path}: truncated or corrupt: the system information is {short_repr(sys_info)}")
    if sys_info.get("little_endian") is not True:
        raise CheckpointError(f"{path}: stored in big-endian byte order, which is not supported; re-save it "
                              f"with torch.save on a little-endian machine or convert it to safetensors")
    unpickler = _RestrictedUnpickler(f, path, True, lambda storage: None)
    refs = _state_dict_of(unpickler.load(), path)
    keys = _PlainUnpickler(f, path).load()
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)) or len(set(keys)) != len(keys):
        raise CheckpointError(f"{path}: truncated or corrupt: the storage list is {short_repr(keys)}")
    size = os.fstat(f.fileno()).st_size
    position = f.tell()
    offsets: Dict[str, int] = {}
    for key in keys:
        storage = unpickler.storages.get(key)
        if storage is None:
            raise CheckpointError(f"{path}: truncated or corrupt: the storage list names {short_repr(key)}, which "
                                  f"no tensor uses")
        f.seek(position)
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated or corrupt: storage {key} is missing")
        (count,) = struct.unpack("<q", head)
        if count != storage.numel:
            raise CheckpointError(f"{path}: truncated or corrupt: storage {key} holds {count} elements, but the "
                                  f"pickle says {storage.numel} {storage.type_name} elements")
        begin = position + 8
        position = begin + count * storage.dtype.itemsize
        if position > size:
            raise CheckpointError(f"{path}: truncated or corrupt: storage {key} needs bytes {begin}..{position}, but "
                                  f"the file ends at {size}")
        offsets[key] = begin
    absent = sorted(set(unpickler.storages) - set(offsets))
    if absent:
        raise CheckpointError(f"{path}: truncated or corrupt: storage {absent[0]} is missing")
    return refs, offsets
