"""The canonical state every reader produces and every writer consumes.

A `CanonicalState` is (CvtConfig, with_head, tensors): `tensors` maps `WeightEntry.torch_name(with_head)` to an
array in PyTorch layout, as the checkpoint stores it (dtype included). Tensors are read lazily, one at a time, so a
conversion streams a checkpoint instead of holding two copies of it: peak memory stays near one tensor plus
whatever the frameworks need for the cross-check.

Every reader goes through `make_state`, which matches the checkpoint against `cvt_core.weights.plan_load` (the one
name table) and refuses missing, unexpected or mis-shaped weights with a one-line error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from cvt_core.checkpoint import CheckpointError, read_safetensors_header, read_shard_index
from cvt_core.config import CvtConfig
from cvt_core.weights import BACKBONE_PREFIX, WeightEntry, WeightLoadError, plan_load, weight_table

from .errors import ConversionError, describe

FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def numpy_dtype(name: str) -> np.dtype:
    """np.dtype for float32 / float16 / bfloat16 (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover - ml_dtypes ships with TensorFlow
            raise ConversionError("--dtype bfloat16", "needs the ml_dtypes package (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


class LazyTensors(Mapping):
    """A read-only mapping whose values are read from the checkpoint on access (a fresh array each time)."""

    def __init__(self, shapes: Mapping[str, Tuple[int, ...]], dtypes: Mapping[str, np.dtype],
                 loader: Callable[[str], np.ndarray], closer: Optional[Callable[[], None]] = None):
        self._shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self._dtypes = {k: np.dtype(v) for k, v in dtypes.items()}
        self._loader = loader
        self._closer = closer

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._shapes:
            raise KeyError(key)
        return self._loader(key)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor to find out
        return key in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> np.dtype:
        return self._dtypes[key]

    @property
    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return dict(self._shapes)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None


@dataclass
class CanonicalState:
    """A checkpoint in canonical form; see the module docstring."""

    config: CvtConfig
    with_head: bool
    tensors: LazyTensors  # keyed by torch_name(with_head) of the entries present in the checkpoint
    source: str  # the file or folder it came from, for messages
    fmt: str  # hf | hf-tf | keras | original
    framework: str  # torch | keras: the framework whose model runs the source side of the cross-check
    cast: Optional[str] = None  # float32 | float16 | bfloat16: cast floating tensors on read; None keeps them
    notes: List[str] = field(default_factory=list)
    keras_model: object = None  # a Keras model the source was read from (`.keras`), reused by the cross-check
    # For Keras-layout sources (tf_model.h5, Keras models): reads a tensor in Keras layout directly, sparing the
    # two transposes of array() + to_keras() when the destination is Keras-layout too.
    keras_loader: Optional[Callable[[str], np.ndarray]] = None

    def entries(self) -> List[WeightEntry]:
        return weight_table(self.config, self.with_head)

    def name(self, entry: WeightEntry) -> str:
        return entry.torch_name(self.with_head)

    def array(self, entry: WeightEntry) -> np.ndarray:
        """The entry's value in PyTorch layout (cast if requested); num_batches_tracked absent -> 0."""
        key = self.name(entry)
        if key not in self.tensors:
            if entry.leaf == "num_batches_tracked":
                return np.zeros(entry.shape, np.int64)
            raise KeyError(key)  # make_state has already refused this
        value = self.tensors[key]
        if self.cast is not None and is_float(value.dtype) and value.dtype.name != self.cast:
            value = value.astype(numpy_dtype(self.cast))
        return value

    def keras_array(self, entry: WeightEntry) -> np.ndarray:
        """The entry's value in Keras layout (cast if requested). Only for entries with a Keras twin."""
        key = self.name(entry)
        if self.keras_loader is None or key not in self.tensors:
            return entry.to_keras(self.array(entry))
        value = self.keras_loader(key)
        if self.cast is not None and is_float(value.dtype) and value.dtype.name != self.cast:
            value = value.astype(numpy_dtype(self.cast))
        return value

    def stored_dtype(self, entry: WeightEntry) -> np.dtype:
        key = self.name(entry)
        if key not in self.tensors:
            return np.dtype(np.int64)
        dtype = self.tensors.dtype(key)
        if self.cast is not None and is_float(dtype):
            return numpy_dtype(self.cast)
        return dtype

    @property
    def float_dtype(self) -> str:
        """Name of the floating dtype of the weights as they will be written (the most common one)."""
        counts: Dict[str, int] = {}
        for entry in self.entries():
            dtype = self.stored_dtype(entry)
            if is_float(dtype):
                counts[dtype.name] = counts.get(dtype.name, 0) + int(np.prod(entry.shape, dtype=np.int64))
        return max(counts, key=counts.get) if counts else "float32"

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(e.shape, dtype=np.int64)) * self.stored_dtype(e).itemsize for e in self.entries())

    @property
    def num_parameters(self) -> int:
        return sum(int(np.prod(e.shape, dtype=np.int64)) for e in self.entries() if e.trainable)

    def close(self) -> None:
        self.tensors.close()


def make_state(config: CvtConfig, shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, np.dtype],
               loader: Callable[[str], np.ndarray], source: str, fmt: str, framework: str,
               with_head: Optional[bool] = None, closer: Optional[Callable[[], None]] = None) -> CanonicalState:
    """Check transformers-PyTorch-named `shapes` against the table for `config` and wrap them as a state.

    `with_head` defaults to what the names say: a `cvt.` prefix means the classifier.
    """
    if with_head is None:
        with_head = any(k.startswith(BACKBONE_PREFIX) for k in shapes)
    plan = plan_load(config, with_head, shapes)
    if plan.fresh_head:
        # a bare checkpoint read as a classifier: keep it bare rather than invent a head
        with_head = False
        plan = plan_load(config, with_head, shapes)
    try:
        plan.check(source, strict=True)
    except WeightLoadError as exc:
        raise describe(exc) from None
    # keys of the canonical state: target names; plan.assignments maps target -> checkpoint key
    renamed = {target: key for target, key in plan.assignments.items()}
    canon_shapes = {t: tuple(shapes[k]) for t, k in renamed.items()}
    canon_dtypes = {t: dtypes[k] for t, k in renamed.items()}

    def load(target: str) -> np.ndarray:
        return loader(renamed[target])

    for target, dtype in canon_dtypes.items():
        if not (is_float(np.dtype(dtype)) or target.endswith("num_batches_tracked")):
            raise ConversionError(source, f"tensor {renamed[target]} has dtype {np.dtype(dtype).name}, expected a "
                                          f"floating-point weight")
    tensors = LazyTensors(canon_shapes, canon_dtypes, load, closer)
    return CanonicalState(config, with_head, tensors, source, fmt, framework)


# ---------------------------------------------------------------------------------------- streamed safetensors
class SafetensorsReader:
    """Tensors of one `.safetensors` file, each read with one positioned read (no memory map kept around, so the
    resident memory of a conversion does not grow with the file). The header is cvt_core's validated one
    (`read_safetensors_header`), so every read lies inside the file."""

    def __init__(self, path: str):
        self.path = path
        header = read_safetensors_header(path)
        self.shapes = {k: shape for k, (_, shape, _, _) in header.tensors.items()}
        self.dtypes = {k: dtype for k, (dtype, _, _, _) in header.tensors.items()}
        self.offsets = {k: begin for k, (_, _, begin, _) in header.tensors.items()}
        self.metadata = header.metadata
        self._fd: Optional[int] = None

    def read(self, key: str) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty(self.shapes[key], dtype=self.dtypes[key])
        view = out.reshape(-1).view(np.uint8)
        done, offset = 0, self.offsets[key]
        while done < view.size:
            chunk = os.preadv(self._fd, [memoryview(view[done:])], offset + done)
            if chunk <= 0:
                raise ConversionError(self.path, "truncated while reading (the file changed during conversion?)")
            done += chunk
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_safetensors_lazy(path: str) -> Tuple[Dict[str, tuple], Dict[str, np.dtype], Callable[[str], np.ndarray],
                                              Callable[[], None]]:
    """(shapes, dtypes, loader, closer) of a `.safetensors` file or a sharded `*.safetensors.index.json`."""
    if not path.endswith(".index.json"):
        reader = SafetensorsReader(path)
        return reader.shapes, reader.dtypes, reader.read, reader.close
    readers: Dict[str, SafetensorsReader] = {}
    shapes: Dict[str, tuple] = {}
    dtypes: Dict[str, np.dtype] = {}
    owner: Dict[str, SafetensorsReader] = {}
    try:
        shards = read_shard_index(path)
    except CheckpointError as exc:
        raise describe(exc) from None
    for shard_path, expected in shards.items():
        try:
            reader = readers[shard_path] = SafetensorsReader(shard_path)
        except CheckpointError as exc:
            raise describe(exc) from None
        absent = [k for k in expected if k not in reader.shapes]
        if absent:
            raise ConversionError(shard_path, f"shard lacks {len(absent)} tensors its index lists, e.g. {absent[0]}")
        for key in expected:
            shapes[key], dtypes[key], owner[key] = reader.shapes[key], reader.dtypes[key], reader

    def close() -> None:
        for reader in readers.values():
            reader.close()

    return shapes, dtypes, (lambda key: owner[key].read(key)), close
