"""The one reader of `torch.save` files (`pytorch_model.bin`, original `.pth`), with no PyTorch and no unpickler.

Both layouts torch.save has written are read here:

- the zip layout (torch >= 1.6): `<prefix>/data.pkl` holds the object, each storage is the record
  `<prefix>/data/<key>`, and `<prefix>/byteorder` says little or big endian. torch.save writes every record
  uncompressed (ZIP_STORED); a compressed or encrypted record is refused, so nothing is ever inflated;
- the legacy layout (`_use_new_zipfile_serialization=False`, and every file torch < 1.6 wrote): five pickles and
  raw bytes in one stream: the magic number, the protocol version (1001), a dict of system information, the object,
  the list of storage keys; then, per key in that order, the storage's element count (int64) and its bytes.

No pickle is given to `pickle.Unpickler`. `_Machine` interprets the opcode stream itself (decoded by
`pickletools.genops` from a `_PickleSource` that refuses any read past the pickle's end or its size limit), and
knows exactly the opcodes torch.save writes for a state dict. Globals are inert markers (`_Global`), and only three
may be called (REDUCE): `collections.OrderedDict()` makes a plain dict, `torch._utils._rebuild_tensor_v2` makes a
`TensorRecord` and `torch._utils._rebuild_parameter` passes a `TensorRecord` through; a persistent id makes a
`StorageRecord`. Both records are immutable and checked by their one constructor (a view inside its storage, see
`tensor_view_problem`). BUILD is allowed only on a dict made by OrderedDict() and only with plain state, which is
dropped. Memo, stack, containers, nesting and the estimated bytes of the objects built are bounded (`Limits`), and
the result is checked by exact type: a dict (or one wrapped under `STATE_DICT_WRAPPERS`) of str -> TensorRecord.
The legacy layout's other pickles go through the same machine with no global and no persistent id allowed.

Nothing a file says is trusted: every storage's record must be stored, lie inside the file, not overlap another
and hold exactly the bytes the pickle gives it; its CRC-32 is checked when it is read. Every refusal is one
`CheckpointError` line naming the file, also for storages read lazily. Memory: opening a file reads its zip
directory and pickle (each bounded by the file and `Limits.PICKLE_BYTES`) and builds objects bounded by
`Limits.PICKLE_OBJECTS` plus the pickle's length; each storage is read whole when a tensor viewing it is asked
for, and shared (weakly cached) while any tensor read from it is alive, and no tensor view has more elements than
its storage, so the arrays held at once never exceed the file's storage bytes.
"""

from __future__ import annotations

import dataclasses
import os
import pickletools
import struct
import sys
import weakref
import zlib
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from .dtypes import bfloat16_dtype
from .errors import CheckpointError
from .tensor_file import MAX_DIMENSIONS, LazyTensors, is_index, read_exactly, shape_problem, short_repr
from .untrusted import Limits, open_regular_file

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "bool", "BFloat16Storage": "bfloat16",
}
_COMPLEX_STORAGES = ("ComplexFloatStorage", "ComplexDoubleStorage", "ComplexHalfStorage", "ComplexChalfStorage")
# torch/serialization.py: MAGIC_NUMBER and PROTOCOL_VERSION of the legacy layout
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
# the keys under which training scripts wrap a state dict
STATE_DICT_WRAPPERS = ("state_dict", "model")

_ORDERED_DICT = ("collections", "OrderedDict")
_REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")
_REBUILD_PARAMETER = ("torch._utils", "_rebuild_parameter")
_INT64 = 2 ** 63


class _Refused(Exception):
    """A refusal whose message does not name the file yet; `_file_errors` adds the path."""


# ------------------------------------------------------------------------------------------ the records
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


def _storage_dtype(type_name: str, path: str) -> np.dtype:
    code = _TORCH_STORAGE_DTYPES[type_name]
    return bfloat16_dtype(path) if code == "bfloat16" else np.dtype(code)


def _storage_key_problem(key: Any) -> Optional[str]:
    if not (type(key) is str and 0 < len(key) <= 256 and key.isascii() and key.isprintable()
            and "/" not in key and "\\" not in key):
        return f"storage key {short_repr(key)} is not a plain name"
    return None


@dataclasses.dataclass(frozen=True, eq=False)
class StorageRecord:
    """A storage the pickle names: `numel` elements of `dtype` from element `start` of the stored record `key`
    (`start` is 0 except for the legacy layout's storage views). Made only through this constructor, which checks
    every field; immutable."""

    __slots__ = ("key", "type_name", "dtype", "numel", "start")
    key: str
    type_name: str
    dtype: np.dtype
    numel: int
    start: int

    def __post_init__(self):
        problem = _storage_key_problem(self.key)
        if problem is not None:
            raise _Refused(f"truncated or corrupt: {problem}")
        if type(self.type_name) is not str or self.type_name not in _TORCH_STORAGE_DTYPES:
            raise _Refused(f"unsupported storage type {short_repr(self.type_name)}")
        if not isinstance(self.dtype, np.dtype) or self.dtype.itemsize < 1:
            raise _Refused(f"unsupported storage dtype {short_repr(self.dtype)}")
        if not all(type(v) is int and 0 <= v < 2 ** 62 // self.dtype.itemsize for v in (self.numel, self.start)):
            raise _Refused(f"truncated or corrupt: storage {self.key} has {short_repr(self.numel)} elements from "
                           f"{short_repr(self.start)}")


@dataclasses.dataclass(frozen=True, eq=False)
class TensorRecord:
    """A tensor the pickle rebuilds: a view (offset, size, stride, in elements) of `storage`. Made only through this
    constructor, which checks that the view lies inside the storage (`tensor_view_problem`), has at most
    `MAX_DIMENSIONS` dimensions and no more elements than the storage (an expanded view would be read as more
    memory than the file holds); immutable."""

    __slots__ = ("storage", "offset", "size", "stride")
    storage: StorageRecord
    offset: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]

    def __post_init__(self):
        if type(self.storage) is not StorageRecord:
            raise _Refused(f"refusing to load: a tensor is rebuilt from {_describe(self.storage)}, not from a storage")
        size, stride = self.size, self.stride
        if type(size) is not tuple or type(stride) is not tuple:
            raise _Refused(f"refusing to load: a tensor's size and stride are {_describe(size)} and "
                           f"{_describe(stride)}, not tuples")
        if len(size) > MAX_DIMENSIONS or len(stride) > MAX_DIMENSIONS:
            raise _Refused(f"refusing to load: a tensor of {max(len(size), len(stride))} dimensions (at most "
                           f"{MAX_DIMENSIONS} are read)")
        problem = tensor_view_problem(self.storage.numel, self.offset, size, stride)
        if problem is None and not all(type(v) is int and v < _INT64 for v in (self.offset, *size, *stride)):
            problem = f"a tensor view's offset, size or stride is not a 64-bit integer ({short_repr((size, stride))})"
        if problem is None:
            problem = shape_problem(size, self.storage.dtype.itemsize)
        if problem is None:
            elements = 1
            for n in size:
                elements *= n
            if elements > self.storage.numel:
                problem = (f"a tensor view of {elements} elements (size {short_repr(size)}, stride "
                           f"{short_repr(stride)}) over a storage of {self.storage.numel} elements is an expanded "
                           f"view, not read (it would take more memory than the file holds; save it .contiguous())")
        if problem is not None:
            raise _Refused(f"refusing to load: {problem}")


@dataclasses.dataclass(frozen=True, eq=False)
class _Global:
    """What a pickle's GLOBAL gives: an inert name, which the machine alone knows how to call."""

    __slots__ = ("module", "name")
    module: str
    name: str


def _describe(value: Any) -> str:
    kind = type(value)
    if kind is _Global:
        return f"the global {value.module}.{value.name}"
    if kind is StorageRecord:
        return "a storage"
    if kind is TensorRecord:
        return "a tensor"
    return kind.__name__


def _view(data: np.ndarray, ref: TensorRecord) -> np.ndarray:
    """The tensor `ref` over its storage's elements `data`; its constructor's checks have passed."""
    size, stride, offset = ref.size, ref.stride, ref.offset
    if 0 in size:
        return np.zeros(size, data.dtype)
    if not size:
        return data[offset: offset + 1].reshape(())
    byte_strides = tuple(s * data.dtype.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(data[offset:], shape=size, strides=byte_strides, writeable=False)


# ------------------------------------------------------------------------------------------ the pickle machine
class _PickleSource:
    """What `pickletools.genops` reads a pickle from: bytes [start, stop) fetched by `fetch(position, count)`.
    `read(n)` and `readline()` never go past `stop` (the pickle's record, or its size limit): a declared length
    beyond it is refused before anything is read or allocated. `position` is where the next pickle would begin."""

    _CHUNK = 1 << 20

    def __init__(self, fetch: Callable[[int, int], bytes], start: int, stop: int, limited: bool):
        self._fetch, self.start, self.position, self._stop, self._limited = fetch, start, start, stop, limited
        self._buffer, self._buffer_at = b"", start

    def _past_the_end(self, count: int) -> _Refused:
        remaining = self._stop - self.position
        if self._limited:
            return _Refused(f"refusing to load: the pickle reads {count} bytes at byte {self.tell()} where "
                            f"{remaining} remain of the {Limits.PICKLE_BYTES} bytes a pickle may have")
        return _Refused(f"truncated or corrupt: the pickle reads {count} bytes at byte {self.tell()}, but only "
                        f"{remaining} remain")

    def _take(self, count: int) -> bytes:
        at = self.position - self._buffer_at
        if 0 <= at and at + count <= len(self._buffer):
            data = self._buffer[at: at + count]
        elif count >= self._CHUNK:
            data = self._fetch(self.position, count)
        else:
            self._buffer = self._fetch(self.position, min(self._CHUNK, self._stop - self.position))
            self._buffer_at = self.position
            data = self._buffer[:count]
        if len(data) != count:
            raise _Refused("truncated while reading the pickle (did the file change while it was read?)")
        self.position += count
        return data

    def read(self, count: int = -1) -> bytes:
        if type(count) is not int or count < 0 or count > self._stop - self.position:
            raise self._past_the_end(count)
        at = self.position - self._buffer_at
        if at + count <= len(self._buffer):  # the usual case, inline: an opcode or a short argument
            self.position += count
            return self._buffer[at: at + count]
        return self._take(count)

    def readline(self, limit: int = -1) -> bytes:
        window = min(self._stop - self.position, self._CHUNK)
        at = self.position - self._buffer_at
        if not (0 <= at and at + window <= len(self._buffer)):
            self._buffer = self._fetch(self.position, window)
            self._buffer_at, at = self.position, 0
        end = self._buffer.find(b"\n", at, at + window)
        # without a newline, genops reports the line unterminated
        return self._take(end + 1 - at if end >= 0 else window)

    def tell(self) -> int:
        return self.position - self.start


def _pread(fd: int, position: int, count: int) -> bytes:
    parts: List[bytes] = []
    while count > 0:
        part = os.pread(fd, min(count, 1 << 30), position)
        if not part:
            break
        parts.append(part)
        position += len(part)
        count -= len(part)
    return b"".join(parts)


# opcodes torch.save writes (protocol 2), and the few harmless forms of the same values other protocols use
_ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "LIST", "DICT",
    "APPEND", "APPENDS", "SETITEM", "SETITEMS",
    "BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE", "BINGET", "LONG_BINGET", "GET",
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "INT", "LONG1", "LONG", "BINFLOAT", "FLOAT",
    "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID", "PERSID",
})
_SCALARS = (str, bytes, int, float, bool, type(None))
_CONTAINERS = (tuple, list, dict)
# estimated bytes held per reference, dict item, memo entry and container bookkeeping (charged to the budget)
_REF, _DICT_ITEM, _MEMO_ITEM, _CONTAINER, _GLOBAL = 8, 48, 64, 120, 64


def _refuse_global(module: str, name: str) -> _Refused:
    return _Refused(f"refusing to load: the pickle asks for {module}.{name}, which could run code; only plain "
                    f"tensors are accepted (convert the file to safetensors with a trusted tool)")


class _Machine:
    """Runs one pickle's opcodes (see the module docstring). `tensors`: whether the globals, calls and persistent
    ids of a state dict are allowed (else only plain values); `legacy`: persistent ids of the legacy layout."""

    def __init__(self, source: _PickleSource, path: str, tensors: bool, legacy: bool):
        self._source, self._path, self._tensors, self._legacy = source, path, tensors, legacy
        self.storages: Dict[str, StorageRecord] = {}  # by key, as the pickle first named them (legacy views: root)
        self._memo: Dict[int, Any] = {}
        # id -> [container, nesting depth, sealed (inside another container: no longer changed), checked plain]
        self._containers: Dict[int, list] = {}
        self._from_ordered_dict: Dict[int, dict] = {}  # dicts OrderedDict() made (BUILD applies to them only)
        self._charged = 0

    # -------------------------------------------------------------------- bookkeeping
    def _charge(self, nbytes: int) -> None:
        self._charged += nbytes
        source = self._source
        if self._charged > Limits.PICKLE_OBJECTS + source.position - source.start:
            raise _Refused(f"refusing to load: the pickle builds more than {Limits.PICKLE_OBJECTS} bytes of objects "
                           f"beyond its own {self._source.tell()} bytes read so far")

    def _new_container(self, value, depth: int):
        if depth > Limits.PICKLE_DEPTH:
            raise _Refused(f"refusing to load: the pickle nests containers more than {Limits.PICKLE_DEPTH} deep")
        self._containers[id(value)] = [value, depth, False, False]
        self._charge(sys.getsizeof(value) + _CONTAINER)
        return value

    def _depth(self, value) -> int:
        return self._containers[id(value)][1] if type(value) in _CONTAINERS else 0

    def _seal(self, value) -> None:
        if type(value) in _CONTAINERS:
            self._containers[id(value)][2] = True

    def _make_tuple(self, items: list) -> tuple:
        if len(items) > Limits.PICKLE_CONTAINER:
            raise _Refused(f"refusing to load: a pickled tuple of more than {Limits.PICKLE_CONTAINER} items")
        for item in items:
            self._seal(item)
        return self._new_container(tuple(items), 1 + max(map(self._depth, items), default=0))

    def _mutable(self, target, kind: type, op: str):
        if type(target) is not kind:
            raise _Refused(f"truncated or corrupt: {op} on {_describe(target)}, not a {kind.__name__}")
        info = self._containers[id(target)]
        if info[2]:
            raise _Refused(f"refusing to load: {op} changes a {kind.__name__} that is already inside another "
                           f"container (torch.save fills each container before using it)")
        return info

    def _insert(self, info: list, item) -> None:
        if item is info[0]:
            raise _Refused("refusing to load: the pickle puts a container inside itself")
        if type(item) in _CONTAINERS:
            self._seal(item)
            depth = self._depth(item) + 1
            if depth > info[1]:
                if depth > Limits.PICKLE_DEPTH:
                    raise _Refused(f"refusing to load: the pickle nests containers more than {Limits.PICKLE_DEPTH} "
                                   f"deep")
                info[1] = depth

    def _extend(self, target: list, items: list) -> None:
        info = self._mutable(target, list, "APPEND")
        if len(target) + len(items) > Limits.PICKLE_CONTAINER:
            raise _Refused(f"refusing to load: a pickled list of more than {Limits.PICKLE_CONTAINER} items")
        for item in items:
            self._insert(info, item)
        self._charge(_REF * len(items))
        target.extend(items)

    def _set_items(self, target: dict, items: list) -> None:
        info = self._mutable(target, dict, "SETITEM")
        if len(items) % 2:
            raise _Refused("truncated or corrupt: SETITEMS with a key and no value")
        if len(target) + len(items) // 2 > Limits.PICKLE_CONTAINER:
            raise _Refused(f"refusing to load: a pickled dict of more than {Limits.PICKLE_CONTAINER} items")
        for key, value in zip(items[::2], items[1::2]):
            # str and bytes hash randomly, an integer to itself modulo 2**61 - 1 (at most 8 64-bit integers share
            # a hash): no pickle can make its keys collide
            if not (type(key) in (str, bytes, bool, type(None)) or (type(key) is int and -_INT64 <= key < _INT64)):
                raise _Refused(f"refusing to load: a dict key of type {_describe(key)} (only strings and 64-bit "
                               f"integers)")
            self._insert(info, value)
            self._charge(_DICT_ITEM)
            target[key] = value

    def _require_plain(self, value, what: str) -> None:
        """Refuse unless `value` holds only str, bytes, int, float, bool, None, tuples, lists and dicts; each container
        is looked into once (a checked container is sealed, so it stays plain)."""
        pending, checked = [value], []
        while pending:
            item = pending.pop()
            kind = type(item)
            if kind in _SCALARS:
                continue
            if kind not in _CONTAINERS:
                raise _Refused(f"refusing to load: {what} holds {_describe(item)}, not a plain value")
            info = self._containers[id(item)]
            if info[3]:
                continue
            info[3] = True
            checked.append(info)
            pending.extend(item.keys() if kind is dict else ())
            pending.extend(item.values() if kind is dict else item)
        for info in checked:
            info[2] = True

    # -------------------------------------------------------------------- globals, calls and persistent ids
    def _global(self, module: Any, name: Any) -> _Global:
        if type(module) is not str or type(name) is not str:
            raise _Refused(f"truncated or corrupt: a global named by {_describe(module)} and {_describe(name)}")
        if not self._tensors:
            raise _refuse_global(module, name)
        if (module, name) in (_ORDERED_DICT, _REBUILD_TENSOR, _REBUILD_PARAMETER):
            return _Global(module, name)
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _Global(module, name)
        if module == "torch" and name in _COMPLEX_STORAGES:
            raise _Refused(f"storage type torch.{name} is not supported: complex numbers are not weights of a CvT "
                           f"model (only {', '.join(_TORCH_STORAGE_DTYPES)})")
        if module == "torch" and name.endswith("Storage"):
            raise _Refused(f"storage type torch.{name} is not supported (only {', '.join(_TORCH_STORAGE_DTYPES)}); "
                           f"convert the file to safetensors")
        raise _refuse_global(module, name)

    def _reduce(self, function: Any, args: Any):
        if type(function) is not _Global:
            raise _Refused(f"refusing to load: the pickle calls {_describe(function)}")
        if type(args) is not tuple:
            raise _Refused(f"refusing to load: the pickle calls {function.module}.{function.name} with "
                           f"{_describe(args)}, not a tuple of arguments")
        target = (function.module, function.name)
        if target == _ORDERED_DICT and not args:
            made = self._new_container({}, 1)
            self._from_ordered_dict[id(made)] = made
            return made
        if target == _REBUILD_TENSOR and len(args) in (6, 7):
            storage, offset, size, stride, requires_grad, hooks = args[:6]
            self._check_tensor_flags(requires_grad, hooks)
            if len(args) == 7:
                self._require_plain(args[6], "a tensor's metadata")
            record = TensorRecord(storage, offset, size, stride)
            self._charge(sys.getsizeof(record))
            return record
        if target == _REBUILD_PARAMETER and len(args) == 3:
            if type(args[0]) is not TensorRecord:
                raise _Refused(f"refusing to load: a parameter is rebuilt from {_describe(args[0])}, not from a "
                               f"tensor")
            self._check_tensor_flags(args[1], args[2])
            return args[0]
        raise _Refused(f"refusing to load: the pickle calls {function.module}.{function.name} with "
                       f"{len(args)} arguments, which torch.save does not write for a state dict")

    @staticmethod
    def _check_tensor_flags(requires_grad: Any, hooks: Any) -> None:
        if type(requires_grad) is not bool:
            raise _Refused(f"refusing to load: a tensor's requires_grad is {_describe(requires_grad)}, not a bool")
        if type(hooks) is not dict or hooks:
            raise _Refused(f"refusing to load: a tensor carries backward hooks ({_describe(hooks)})")

    def _build(self, target: Any, state: Any) -> None:
        if type(target) is not dict or self._from_ordered_dict.get(id(target)) is not target:
            raise _Refused(f"refusing to load: the pickle sets the state of {_describe(target)}; torch.save does so "
                           f"only for a state dict's OrderedDict")
        if type(state) is not dict:
            raise _Refused(f"refusing to load: an OrderedDict's state is {_describe(state)}, not a dict")
        self._require_plain(state, "an OrderedDict's state")  # then dropped: the dict stays a plain dict

    def _persistent(self, pid: Any) -> StorageRecord:
        # torch.save writes ('storage', storage type, key, location, number of elements), and in the legacy layout
        # a sixth item: None, or (view key, offset, number of elements) for a view into the storage
        length = 6 if self._legacy else 5
        if not (self._tensors and type(pid) is tuple and len(pid) == length and type(pid[0]) is str
                and pid[0] == "storage"):
            raise _Refused(f"unsupported persistent id {short_repr(pid)} in the pickle")
        _, storage_type, key, location, numel = pid[:5]
        if type(storage_type) is not _Global or storage_type.module != "torch" \
                or storage_type.name not in _TORCH_STORAGE_DTYPES:
            raise _Refused(f"unsupported storage type {short_repr(storage_type)} in the pickle")
        if _storage_key_problem(key) is not None or type(location) is not str or type(numel) is not int \
                or numel < 0:
            raise _Refused(f"corrupt persistent id {short_repr(pid)} in the pickle")
        dtype = _storage_dtype(storage_type.name, self._path)
        storage = self.storages.get(key)
        if storage is not None:
            if storage.dtype != dtype or storage.numel != numel:
                raise _Refused(f"corrupt: storage {key} is named as {storage_type.name} of {numel} elements and as "
                               f"{storage.dtype} of {storage.numel}")
        else:
            storage = StorageRecord(key, storage_type.name, dtype, numel, 0)
            self.storages[key] = storage
            self._charge(sys.getsizeof(storage) + _DICT_ITEM)
        view = pid[5] if self._legacy else None
        if view is None:
            return storage
        if not (type(view) is tuple and len(view) == 3 and type(view[1]) is int and type(view[2]) is int
                and 0 <= view[1] and 0 <= view[2] and view[1] + view[2] <= numel):
            raise _Refused(f"refusing to load: storage view {short_repr(view)} does not lie inside storage {key} of "
                           f"{numel} elements")
        self._charge(sys.getsizeof(storage))
        return StorageRecord(key, storage.type_name, dtype, view[2], view[1])

    # -------------------------------------------------------------------- the loop
    def run(self) -> Any:
        stack: List[Any] = []
        marks: List[List[Any]] = []
        memo = self._memo
        ops = pickletools.genops(self._source)

        def push(value, cost: int = _REF) -> None:
            if len(stack) >= Limits.PICKLE_CONTAINER:
                raise _Refused(f"refusing to load: more than {Limits.PICKLE_CONTAINER} values on the pickle's stack")
            self._charge(cost)
            stack.append(value)

        def pop() -> Any:
            if not stack:
                raise _Refused("truncated or corrupt: the pickle pops from an empty stack")
            return stack.pop()

        def pop_mark() -> List[Any]:
            nonlocal stack
            if not marks:
                raise _Refused("truncated or corrupt: the pickle closes a MARK it never opened")
            items, stack = stack, marks.pop()
            return items

        def scalar(value) -> None:
            push(value, sys.getsizeof(value) + _REF)

        while True:
            try:
                opcode, arg, _ = next(ops)
            except StopIteration:  # pragma: no cover - genops raises before it ends without STOP
                raise _Refused("truncated or corrupt: the pickle ends before its STOP opcode") from None
            except ValueError as exc:
                text = " ".join(str(exc).split())[:200]
                if "exhausted" in text:
                    raise _Refused("truncated or corrupt: the pickle ends before its STOP opcode") from None
                raise _Refused(f"truncated or corrupt pickle ({text})") from None
            name = opcode.name
            if name not in _ALLOWED_OPCODES:
                raise _Refused(f"refusing to load: the pickle uses the opcode {name}, which torch.save does not "
                               f"write for a state dict")
            if name in ("BININT", "BININT1", "BININT2", "INT", "LONG1", "LONG", "BINFLOAT", "FLOAT", "BINUNICODE",
                        "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"):
                scalar(arg)
            elif name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):  # Python 2 str, read as torch.load does (UTF-8)
                try:
                    scalar(arg.encode("latin-1").decode("utf-8"))
                except UnicodeError:
                    raise _Refused("truncated or corrupt: a pickled string is not UTF-8") from None
            elif name == "NONE":
                push(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                push(name == "NEWTRUE")
            elif name == "EMPTY_DICT":
                push(self._new_container({}, 1))
            elif name == "EMPTY_LIST":
                push(self._new_container([], 1))
            elif name == "EMPTY_TUPLE":
                push(self._new_container((), 1))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(name[-1])
                if len(stack) < count:
                    raise _Refused(f"truncated or corrupt: {name} with {len(stack)} values on the stack")
                items = stack[-count:]
                del stack[-count:]
                push(self._make_tuple(items))
            elif name == "TUPLE":
                push(self._make_tuple(pop_mark()))
            elif name == "LIST":
                items = pop_mark()
                made = self._new_container([], 1)
                self._extend(made, items)
                push(made)
            elif name == "DICT":
                items = pop_mark()
                made = self._new_container({}, 1)
                self._set_items(made, items)
                push(made)
            elif name == "APPEND":
                item = pop()
                self._extend(stack[-1] if stack else None, [item])
            elif name == "APPENDS":
                items = pop_mark()
                self._extend(stack[-1] if stack else None, items)
            elif name == "SETITEM":
                value = pop()
                key = pop()
                self._set_items(stack[-1] if stack else None, [key, value])
            elif name == "SETITEMS":
                items = pop_mark()
                self._set_items(stack[-1] if stack else None, items)
            elif name == "MARK":
                if len(marks) >= Limits.PICKLE_DEPTH:
                    raise _Refused(f"refusing to load: the pickle nests MARKs more than {Limits.PICKLE_DEPTH} deep")
                marks.append(stack)
                stack = []
            elif name == "POP":
                pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                if not stack:
                    raise _Refused("truncated or corrupt: DUP on an empty stack")
                push(stack[-1])
            elif name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                index = len(memo) if name == "MEMOIZE" else arg
                if type(index) is not int or not 0 <= index < 2 ** 32:
                    raise _Refused(f"truncated or corrupt: memo index {short_repr(index)}")
                if not stack:
                    raise _Refused("truncated or corrupt: the pickle memoizes from an empty stack")
                if index not in memo:
                    if len(memo) >= Limits.PICKLE_MEMO:
                        raise _Refused(f"refusing to load: the pickle memoizes more than {Limits.PICKLE_MEMO} values")
                    self._charge(_MEMO_ITEM)
                memo[index] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                if type(arg) is not int or arg not in memo:
                    raise _Refused(f"truncated or corrupt: the pickle reads memo index {short_repr(arg)}, which it "
                                   f"never stored")
                push(memo[arg])
            elif name == "GLOBAL":
                module, _, attribute = arg.partition(" ")
                push(self._global(module, attribute), _GLOBAL)
            elif name == "STACK_GLOBAL":
                attribute = pop()
                module = pop()
                push(self._global(module, attribute), _GLOBAL)
            elif name == "REDUCE":
                args = pop()
                function = pop()
                push(self._reduce(function, args))
            elif name == "BUILD":
                state = pop()
                self._build(stack[-1] if stack else None, state)
            elif name in ("BINPERSID", "PERSID"):
                push(self._persistent(pop() if name == "BINPERSID" else arg))
            elif name == "PROTO":
                if not 0 <= arg <= 5:
                    raise _Refused(f"truncated or corrupt: pickle protocol {arg}")
            elif name == "FRAME":
                pass  # a length hint: the opcodes within are read as any others
            elif name == "STOP":
                if marks or len(stack) != 1:
                    raise _Refused("truncated or corrupt: the pickle stops with an open MARK or more than one value")
                return stack[0]
            else:  # pragma: no cover - every allowed opcode is handled above
                raise _Refused(f"refusing to load: the opcode {name}")


def _run_pickle(source: _PickleSource, path: str, tensors: bool, legacy: bool) -> Tuple[Any, Dict[str, StorageRecord]]:
    machine = _Machine(source, path, tensors, legacy)
    value = machine.run()
    return value, machine.storages


def _state_dict_of(obj: Any) -> Dict[str, TensorRecord]:
    """The state dict a pickle's result holds, checked by exact type: a dict of str -> `TensorRecord`, possibly
    wrapped under one of `STATE_DICT_WRAPPERS` in an outer dict."""
    if type(obj) is dict:
        for wrapper in STATE_DICT_WRAPPERS:
            if type(obj.get(wrapper)) is dict:
                obj = obj[wrapper]
                break
    if type(obj) is not dict:
        raise _Refused(f"does not hold a flat dictionary of tensors (it holds {_describe(obj)})")
    for key, value in obj.items():
        if type(key) is not str:
            raise _Refused(f"does not hold a flat dictionary of tensors (a key is {_describe(key)} "
                           f"{short_repr(key)}, not a name)")
        if type(value) is not TensorRecord:
            raise _Refused(f"does not hold a flat dictionary of tensors ({key!r} is {_describe(value)}, not a tensor)")
    return obj


# ------------------------------------------------------------------------------------------ opening files
def _file_errors(path: str, action: Callable[[], Any]) -> Any:
    """`action()`, with every failure turned into one `CheckpointError` line naming `path`."""
    try:
        return action()
    except CheckpointError:
        raise
    except _Refused as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (EOFError, OSError, ValueError, TypeError, struct.error, AttributeError, KeyError, IndexError,
            OverflowError, RecursionError, MemoryError, zlib.error) as exc:
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise CheckpointError(f"{path}: truncated or corrupt ({type(exc).__name__}: {reason})") from None


def _lazy(path: str, refs: Dict[str, TensorRecord], read_root: Callable[[StorageRecord], np.ndarray],
          f: BinaryIO) -> LazyTensors:
    """The tensors `refs`, each read on access from its storage's elements `read_root(storage)`; a storage read for
    one tensor is shared by the others read from it while any of them is alive (it is read only once then). The
    result owns the open file `f`."""
    alive: "weakref.WeakValueDictionary[str, np.ndarray]" = weakref.WeakValueDictionary()

    def load(name: str) -> np.ndarray:
        ref = refs[name]
        storage = ref.storage
        root = alive.get(storage.key)
        if root is None:
            if f.closed:
                raise CheckpointError(f"{path}: tensor {name!r} asked for after the checkpoint was closed")
            root = _file_errors(path, lambda: read_root(storage))
            alive[storage.key] = root
        return _view(root[storage.start: storage.start + storage.numel], ref)

    return LazyTensors({k: r.size for k, r in refs.items()}, {k: r.storage.dtype for k, r in refs.items()},
                       load, f.close)


def open_torch_bin(path: str) -> LazyTensors:
    """The tensors of a `torch.save` file (zip or legacy layout), checked whole and read on access; see the module
    docstring. A dict wrapping the state dict under `state_dict` or `model` is unwrapped."""
    f = open_regular_file(path)
    try:
        return open_torch_file(f, path)
    except BaseException:
        f.close()
        raise


def open_torch_file(f: BinaryIO, path: str) -> LazyTensors:
    """`open_torch_bin` of the regular file `f` (opened by `untrusted.open_regular_file`), read by positioned reads
    of its descriptor; the result owns `f` and closes it. On an error `f` is left to the caller."""
    def open_layout() -> LazyTensors:
        head = os.pread(f.fileno(), 4, 0)
        return (_open_zip if head in (b"PK\x03\x04", b"PK\x05\x06") else _open_legacy)(f, path)

    return _file_errors(path, open_layout)


# ------------------------------------------------------------------------------------------ zip layout
class _ZipEntry(NamedTuple):
    name: bytes
    flags: int
    method: int
    crc: int
    size: int  # stored bytes (checked equal to the compressed size: nothing is compressed)
    header: int  # offset of the local header


_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")


class _Zip:
    """The central directory of a zip file, read and checked by hand (no member is ever inflated)."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        tail_at = max(0, size - _EOCD.size - 0xFFFF)
        tail = os.pread(fd, size - tail_at, tail_at)
        at = tail.rfind(b"PK\x05\x06")
        # the end record is the one whose comment reaches exactly to the end of the file
        while at >= 0 and not (at + _EOCD.size <= len(tail)
                               and at + _EOCD.size + _EOCD.unpack_from(tail, at)[7] == len(tail)):
            at = tail.rfind(b"PK\x05\x06", 0, at)
        if at < 0:
            raise _Refused("truncated or corrupt: no zip end-of-directory record")
        end = tail_at + at
        _, disk, cd_disk, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
        directory_end = end
        locator = end - _EOCD64_LOCATOR.size
        if locator >= 0 and os.pread(fd, 4, locator) == b"PK\x06\x07":
            _, _, record, _ = _EOCD64_LOCATOR.unpack(os.pread(fd, _EOCD64_LOCATOR.size, locator))
            if record + _EOCD64.size > locator:
                raise _Refused("truncated or corrupt: the zip64 end record lies outside the file")
            sig, record_size, _, _, disk, cd_disk, _, entries, cd_size, cd_offset = _EOCD64.unpack(
                os.pread(fd, _EOCD64.size, record))
            if sig != b"PK\x06\x06" or record + 12 + record_size != locator:
                raise _Refused("truncated or corrupt: bad zip64 end record")
            directory_end = record
        if disk or cd_disk:
            raise _Refused("refusing to load: a multi-disk zip archive")
        if cd_offset + cd_size != directory_end:
            raise _Refused(f"truncated or corrupt: the zip directory ({cd_size} bytes at {cd_offset}) does not end "
                           f"where the end record begins ({directory_end})")
        if cd_size > Limits.PICKLE_BYTES:
            raise _Refused(f"refusing to load: a zip directory of {cd_size} bytes (at most {Limits.PICKLE_BYTES})")
        self.data_end = cd_offset
        self.directory = _pread(fd, cd_offset, cd_size)
        if len(self.directory) != cd_size:
            raise _Refused("truncated while reading the zip directory")
        if sum(1 for _ in self.entries()) != entries:
            raise _Refused(f"truncated or corrupt: the zip end record counts {entries} records, the directory holds "
                           f"others")

    def entries(self) -> Iterator[_ZipEntry]:
        cd, at = self.directory, 0
        while at < len(cd):
            if at + _CENTRAL.size > len(cd):
                raise _Refused("truncated or corrupt: a cut zip directory entry")
            (sig, _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len, comment_len, disk, _, _,
             header) = _CENTRAL.unpack_from(cd, at)
            if sig != b"PK\x01\x02":
                raise _Refused("truncated or corrupt: bad zip directory entry")
            name = cd[at + _CENTRAL.size: at + _CENTRAL.size + name_len]
            extra = cd[at + _CENTRAL.size + name_len: at + _CENTRAL.size + name_len + extra_len]
            at += _CENTRAL.size + name_len + extra_len + comment_len
            if at > len(cd):
                raise _Refused("truncated or corrupt: a cut zip directory entry")
            usize, csize, header, disk = self._zip64(extra, usize, csize, header, disk)
            if disk:
                raise _Refused("refusing to load: a multi-disk zip archive")
            shown = short_repr(name.decode("utf-8", "replace"))
            if flags & 0x1:
                raise _Refused(f"refusing to load: record {shown} is encrypted, which torch.save never does")
            if method != 0:
                raise _Refused(f"refusing to load: record {shown} is compressed (method {method}): compressed "
                               f"records are not written by torch.save; re-save the file with torch.save or convert "
                               f"it to safetensors")
            if csize != usize:
                raise _Refused(f"truncated or corrupt: record {shown} is stored uncompressed but declares {csize} "
                               f"stored and {usize} uncompressed bytes")
            yield _ZipEntry(name, flags, method, crc, usize, header)

    @staticmethod
    def _zip64(extra: bytes, usize: int, csize: int, header: int, disk: int) -> Tuple[int, int, int, int]:
        at = 0
        while at + 4 <= len(extra):
            tag, length = struct.unpack_from("<HH", extra, at)
            body = extra[at + 4: at + 4 + length]
            at += 4 + length
            if tag != 1:
                continue
            values, used = [], 0
            for wide, width, fmt in ((usize == 0xFFFFFFFF, 8, "<Q"), (csize == 0xFFFFFFFF, 8, "<Q"),
                                     (header == 0xFFFFFFFF, 8, "<Q"), (disk == 0xFFFF, 4, "<L")):
                if wide:
                    if used + width > len(body):
                        raise _Refused("truncated or corrupt: a cut zip64 extra field")
                    values.append(struct.unpack_from(fmt, body, used)[0])
                    used += width
                else:
                    values.append(None)
            usize, csize, header, disk = (v if v is not None else old
                                          for v, old in zip(values, (usize, csize, header, disk)))
        return usize, csize, header, disk

    def data_range(self, entry: _ZipEntry) -> Tuple[int, int]:
        """[begin, end) of the record's stored bytes, checked to lie in the file before the zip directory."""
        shown = short_repr(entry.name.decode("utf-8", "replace"))
        if entry.header + _LOCAL.size > self.data_end:
            raise _Refused(f"truncated or corrupt: record {shown} has its header outside the file")
        sig, _, _, method, _, _, _, _, _, name_len, extra_len = _LOCAL.unpack(
            os.pread(self.fd, _LOCAL.size, entry.header))
        begin = entry.header + _LOCAL.size + name_len + extra_len
        if sig != b"PK\x03\x04" or method != entry.method or begin > self.data_end \
                or os.pread(self.fd, name_len, entry.header + _LOCAL.size) != entry.name:
            raise _Refused(f"truncated or corrupt: record {shown} has a bad local header")
        if begin + entry.size > self.data_end:
            raise _Refused(f"truncated or corrupt: record {shown} declares {entry.size} bytes at byte {begin}, beyond "
                           f"the {self.data_end} bytes of data the file holds")
        return begin, begin + entry.size

    def read(self, entry: _ZipEntry, begin: int, out: np.ndarray, path: str) -> np.ndarray:
        """The record's bytes read into `out` (exactly its size), CRC-32 checked."""
        read_exactly(self.fd, begin, out, path)
        if zlib.crc32(out.reshape(-1).view(np.uint8)) != entry.crc:
            raise _Refused(f"truncated or corrupt: record {short_repr(entry.name.decode('utf-8', 'replace'))} fails "
                           f"its CRC-32 check")
        return out


def _open_zip(f: BinaryIO, path: str) -> LazyTensors:
    archive = _Zip(f.fileno(), os.fstat(f.fileno()).st_size)
    pickles = [e for e in archive.entries()
               if e.name == b"data.pkl" or (e.name.endswith(b"/data.pkl") and e.name.count(b"/") == 1)]
    if not pickles:
        raise _Refused("no data.pkl inside: not a torch.save checkpoint")
    if len(pickles) > 1:
        raise _Refused(f"refusing to load: {len(pickles)} data.pkl records (torch.save writes one)")
    prefix = pickles[0].name[: -len(b"data.pkl")]
    if pickles[0].size > Limits.PICKLE_BYTES:
        raise _Refused(f"refusing to load: data.pkl of {pickles[0].size} bytes (at most {Limits.PICKLE_BYTES})")

    byteorder = [e for e in archive.entries() if e.name == prefix + b"byteorder"]
    if len(byteorder) > 1 or (byteorder and byteorder[0].size > 16):
        raise _Refused("truncated or corrupt: byteorder record")
    if byteorder:
        begin, _ = archive.data_range(byteorder[0])
        order = archive.read(byteorder[0], begin, np.empty(byteorder[0].size, np.uint8), path).tobytes().strip()
        if order != b"little":
            raise _Refused("stored in big-endian byte order, which is not supported; re-save it with torch.save on a "
                           "little-endian machine or convert it to safetensors")

    begin, _ = archive.data_range(pickles[0])
    data = archive.read(pickles[0], begin, np.empty(pickles[0].size, np.uint8), path)
    source = _PickleSource(lambda at, count: data[at: at + count].tobytes(), 0, data.size, False)
    obj, storages = _run_pickle(source, path, tensors=True, legacy=False)
    refs = _state_dict_of(obj)
    del data, source, obj

    wanted = {prefix + b"data/" + key.encode("ascii"): key for key in storages}
    records: Dict[str, Tuple[_ZipEntry, int]] = {}
    for entry in archive.entries():
        key = wanted.get(entry.name)
        if key is None:
            continue
        if key in records:
            raise _Refused(f"truncated or corrupt: storage {key} is stored twice")
        records[key] = (entry, archive.data_range(entry)[0])
    spans = []
    for key, storage in storages.items():
        if key not in records:
            raise _Refused(f"truncated or corrupt: storage {key} is missing")
        entry, begin = records[key]
        nbytes = storage.numel * storage.dtype.itemsize
        if entry.size != nbytes:
            raise _Refused(f"truncated or corrupt: storage {key} holds {entry.size} bytes, but the pickle says "
                           f"{storage.numel} {storage.type_name} elements ({nbytes} bytes)")
        spans.append((begin, begin + nbytes, key))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise _Refused(f"truncated or corrupt: the records of storages {first} and {second} overlap")

    def read_root(storage: StorageRecord) -> np.ndarray:
        entry, begin = records[storage.key]
        return archive.read(entry, begin, np.empty(storage.numel, storage.dtype), path)

    return _lazy(path, refs, read_root, f)


# ------------------------------------------------------------------------------------------ legacy layout
def _open_legacy(f: BinaryIO, path: str) -> LazyTensors:
    fd = f.fileno()
    size = os.fstat(fd).st_size
    position = 0

    def next_pickle(tensors: bool):
        nonlocal position
        stop = min(size, position + Limits.PICKLE_BYTES)
        source = _PickleSource(lambda at, count: _pread(fd, at, count), position, stop, stop < size)
        value, storages = _run_pickle(source, path, tensors, legacy=True)
        position = source.position
        return value, storages

    try:
        magic, _ = next_pickle(False)
    except (_Refused, CheckpointError):
        magic = None
    if not (type(magic) is int and magic == LEGACY_MAGIC_NUMBER):
        raise _Refused("not a PyTorch checkpoint (truncated or corrupt: not a PyTorch zip checkpoint, nor the legacy "
                       "pre-1.6 format); re-save it with torch.save or convert it to safetensors")
    protocol, _ = next_pickle(False)
    if not (type(protocol) is int and protocol == LEGACY_PROTOCOL_VERSION):
        raise _Refused(f"legacy torch.save file of protocol version {short_repr(protocol)}, not "
                       f"{LEGACY_PROTOCOL_VERSION}; re-save it with torch.save or convert it to safetensors")
    sys_info, _ = next_pickle(False)
    if type(sys_info) is not dict:
        raise _Refused(f"truncated or corrupt: the system information is {short_repr(sys_info)}")
    if sys_info.get("little_endian") is not True:
        raise _Refused("stored in big-endian byte order, which is not supported; re-save it with torch.save on a "
                       "little-endian machine or convert it to safetensors")
    obj, storages = next_pickle(True)
    refs = _state_dict_of(obj)
    del obj
    keys, _ = next_pickle(False)
    if not (type(keys) is list and all(type(k) is str for k in keys)) or len(set(keys)) != len(keys):
        raise _Refused(f"truncated or corrupt: the storage list is {short_repr(keys)}")
    offsets: Dict[str, int] = {}
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise _Refused(f"truncated or corrupt: the storage list names {short_repr(key)}, which no tensor uses")
        head = os.pread(fd, 8, position)
        if len(head) < 8:
            raise _Refused(f"truncated or corrupt: storage {key} is missing")
        (count,) = struct.unpack("<q", head)
        if count != storage.numel:
            raise _Refused(f"truncated or corrupt: storage {key} holds {count} elements, but the pickle says "
                           f"{storage.numel} {storage.type_name} elements")
        begin = position + 8
        position = begin + count * storage.dtype.itemsize
        if position > size:
            raise _Refused(f"truncated or corrupt: storage {key} needs bytes {begin}..{position}, but the file ends "
                           f"at {size}")
        offsets[key] = begin
    absent = sorted(set(storages) - set(offsets))
    if absent:
        raise _Refused(f"truncated or corrupt: storage {absent[0]} is missing")

    def read_root(storage: StorageRecord) -> np.ndarray:
        root = storages[storage.key]
        return read_exactly(fd, offsets[root.key], np.empty(root.numel, root.dtype), path)

    return _lazy(path, refs, read_root, f)
