"""The canonical state every reader produces and every writer consumes.

A `CanonicalState` is (CvtConfig, with_head, tensors): `tensors` maps `WeightEntry.torch_name(with_head)` to an
array in PyTorch layout, as the checkpoint stores it (dtype included): the cvt_core reader's `LazyTensors`, renamed.
Tensors are read lazily, one at a time, so a conversion streams a checkpoint instead of holding two copies of it:
peak memory stays near one tensor plus whatever the frameworks need for the cross-check.

Every reader goes through `make_state`, which matches the checkpoint against `cvt_core.weights.plan_load` (the one
name table) and refuses missing, unexpected or mis-shaped weights with a one-line error, and weights of a dtype no
weight may have (`cvt_core.weights.dtype_problem`: a weight is float16, bfloat16, float32 or float64,
`num_batches_tracked` an integer; complex, bool, integer-for-float, object and string tensors are refused, never
cast). Every value read through `array` / `keras_array` is checked as it is read (`cvt_core.weights.value_problem`):
NaN or Inf in a weight, or a `--dtype` cast that overflows, is a one-line `ConversionError` naming the tensor and
the count (exit status 2), never a cross-check to fail later. `check_values` reads them all up front, for sources
held in memory (a loaded `.keras` model) whose tensors a conversion may never read one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from cvt_core.config import CvtConfig
from cvt_core.dtypes import is_float, numpy_dtype
from cvt_core.tensor_file import LazyTensors
from cvt_core.weights import (BACKBONE_PREFIX, WeightEntry, WeightLoadError, dtype_problem, plan_load, value_problem,
                              weight_table)

from .errors import ConversionError, describe

FLOAT_DTYPES = ("float32", "float16", "bfloat16")


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
        return self._checked(key, self.tensors[key])

    def keras_array(self, entry: WeightEntry) -> np.ndarray:
        """The entry's value in Keras layout (cast if requested). Only for entries with a Keras twin."""
        key = self.name(entry)
        if self.keras_loader is None or key not in self.tensors:
            return entry.to_keras(self.array(entry))
        return self._checked(key, self.keras_loader(key))

    def _checked(self, key: str, value: np.ndarray) -> np.ndarray:
        """`value` (the tensor `key` as read) cast if requested, once it passes the rule; else a one-line
        `ConversionError` naming the tensor. Values must be finite and fit the dtype they will be held in: the
        `--dtype` cast's, else float32 (what both frameworks' models, and so the Keras files, hold)."""
        problem = dtype_problem(key, value.dtype)  # make_state checked the declared dtype; this is the array read
        casting = self.cast is not None and is_float(value.dtype) and value.dtype.name != self.cast
        if problem is None:
            problem = value_problem(value, into=self._cast_dtype() if casting else np.float32)
        if problem is not None:
            hint = f"--dtype {self.cast} cannot hold it" if casting and "beyond the range" in problem \
                else "refusing to convert: a trained model's weights are finite floating-point numbers"
            raise ConversionError(self.source, f"weight {key} {problem}; {hint}")
        return value.astype(self._cast_dtype()) if casting else value

    def check_values(self) -> None:
        """Read every tensor once and apply the value rule (see the module docstring)."""
        for entry in self.entries():
            if self.name(entry) in self.tensors:
                self.array(entry)

    def stored_dtype(self, entry: WeightEntry) -> np.dtype:
        key = self.name(entry)
        if key not in self.tensors:
            return np.dtype(np.int64)
        dtype = self.tensors.dtype(key)
        if self.cast is not None and is_float(dtype):
            return self._cast_dtype()
        return dtype

    def _cast_dtype(self) -> np.dtype:
        return numpy_dtype(self.cast, f"--dtype {self.cast}")

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


def make_state(config: CvtConfig, tensors: LazyTensors, source: str, fmt: str, framework: str,
               with_head: Optional[bool] = None) -> CanonicalState:
    """Check transformers-PyTorch-named `tensors` against the table for `config` and wrap them as a state, which
    then owns them (closing the state closes them; so does a refusal here).

    `with_head` defaults to what the names say: a `cvt.` prefix means the classifier.
    """
    try:
        if with_head is None:
            with_head = any(k.startswith(BACKBONE_PREFIX) for k in tensors)
        shapes = tensors.shapes
        plan = plan_load(config, with_head, shapes)
        if plan.fresh_head:
            # a bare checkpoint read as a classifier: keep it bare rather than invent a head
            with_head = False
            plan = plan_load(config, with_head, shapes)
        try:
            plan.check(source, strict=True)
            # keys of the canonical state: target names; plan.assignments maps target -> checkpoint key
            plan.check_dtypes(source, tensors.dtypes)
        except WeightLoadError as exc:
            if exc.bad_dtype and not (exc.missing or exc.unexpected or exc.mismatched):
                raise ConversionError(exc.source, exc.summary()) from None
            raise describe(exc) from None
    except BaseException:
        tensors.close()
        raise
    return CanonicalState(config, with_head, tensors.renamed(plan.assignments), source, fmt, framework)
