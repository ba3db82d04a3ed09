"""transformers' TF checkpoint `tf_model.h5`, read and written with h5py and NumPy only (no TensorFlow).

Layout written, exactly as transformers 4.57.6 (`TFPreTrainedModel.save_pretrained` -> tf_keras
`save_weights_to_hdf5_group`) writes it:

- root attributes `backend` = "tensorflow", `keras_version` (tf_keras' version, "2.21.0" style) and
  `layer_names` = ["cvt", "layernorm", "classifier"] for the classifier, ["cvt"] for the bare model;
- one group per top-level layer, created in sorted order, with attribute `weight_names` (full variable names,
  scope and ":0" included; trainable variables first, then the BatchNorm moving statistics, each in table order)
  split into `weight_names0`, `weight_names1`, ... when it would pass HDF5's 64 KiB attribute limit, as
  `save_attributes_to_hdf5_group` splits it; each variable is a dataset at `<group>/<full variable name>`;
- an empty group `top_level_model_weights`.

Variable names and layouts come from the `cvt_core` table (`WeightEntry.hf_tf_name`, `to_keras`): scope
`tf_cvt_for_image_classification` (classifier) or `tf_cvt_model` (bare model); the cls token is named
`cvt.encoder.stages.<s>.cls_token:0` with no scope.

BatchNorm statistics travel both ways: PyTorch running_mean/var <-> TF moving_mean/moving_variance
(transformers itself drops them TF -> PT). `num_batches_tracked` has no TF twin: it is not written, and reads
back as 0.

Reading goes through `cvt_core.tf_h5` (the one reader of the format, also behind `from_pretrained`); names match
as transformers' loader matches them, and the file is walked whole first (`cvt_core.h5_safety`).

Writing checks the free space first (`shutil.disk_usage`: the data plus a margin for HDF5's metadata) and writes
through `_StickyErrorFile`, so that a disk that fills up anyway is one `ConversionError` line: HDF5 itself does not
survive write errors (its failed close leaves h5py objects that crash the interpreter when released).
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np

from cvt_core.atomic import atomic_write
from cvt_core.checkpoint import TF_WEIGHTS_NAME, CheckpointError
from cvt_core.config import CvtConfig
from cvt_core.dtypes import is_bfloat16
from cvt_core.h5_safety import h5_reason, h5py_module
from cvt_core.tf_h5 import open_tf_h5
from cvt_core.weights import WeightEntry, weight_table

from .errors import ConversionError
from .progress import progress
from .state import CanonicalState, make_state

TF_WEIGHTS_INDEX_NAME = "tf_model.h5.index.json"
HDF5_OBJECT_HEADER_LIMIT = 64512  # tf_keras' limit for one attribute
SCOPES = {True: "tf_cvt_for_image_classification", False: "tf_cvt_model"}
DEFAULT_KERAS_VERSION = "2.21.0"


def _keras_version() -> str:
    """tf_keras' version string when it is installed (read without importing TensorFlow), else 2.21.0."""
    try:
        from importlib.metadata import version

        return version("tf-keras")
    except Exception:
        return DEFAULT_KERAS_VERSION


def save_attributes_to_hdf5_group(group, name: str, data: List[bytes]) -> None:
    """tf_keras' `save_attributes_to_hdf5_group`: one attribute, or `name0`, `name1`, ... chunks under 64 KiB."""
    bad = [x for x in data if len(x) > HDF5_OBJECT_HEADER_LIMIT]
    if bad:
        raise ConversionError(None, f"HDF5 attribute {name} has an item longer than {HDF5_OBJECT_HEADER_LIMIT} bytes")
    data_npy = np.asarray(data)
    num_chunks = 1
    chunked = np.array_split(data_npy, num_chunks)
    while any(x.nbytes > HDF5_OBJECT_HEADER_LIMIT for x in chunked):
        num_chunks += 1
        chunked = np.array_split(data_npy, num_chunks)
    if num_chunks > 1:
        for chunk_id, chunk in enumerate(chunked):
            group.attrs["%s%d" % (name, chunk_id)] = chunk
    else:
        group.attrs[name] = data


def _group_of(entry: WeightEntry) -> str:
    """Top-level Keras layer holding the entry: `cvt`, or the head layer (`layernorm`, `classifier`)."""
    return entry.module[0] if entry.in_head else "cvt"


def layout(config: CvtConfig, with_head: bool) -> Tuple[List[str], Dict[str, List[WeightEntry]]]:
    """(layer_names, {layer: entries in weight_names order}) of the h5 file for this model."""
    entries = [e for e in weight_table(config, with_head) if e.has_keras_twin]
    layer_names: List[str] = []
    groups: Dict[str, List[WeightEntry]] = {}
    for entry in entries:
        group = _group_of(entry)
        if group not in groups:
            layer_names.append(group)
            groups[group] = []
    for group in layer_names:
        members = [e for e in entries if _group_of(e) == group]
        # tf_keras lists a layer's trainable weights first, then its non-trainable ones
        groups[group] = [e for e in members if e.trainable] + [e for e in members if not e.trainable]
    return layer_names, groups


# bytes of HDF5 metadata allowed for beside the data when checking the free space: a constant, plus this per dataset
WRITE_MARGIN = 4 * 1024 * 1024
WRITE_MARGIN_PER_DATASET = 4096


class _StickyErrorFile(io.RawIOBase):
    """The file object h5py writes `tf_model.h5` through (its "fileobj" driver): a real file, except that a failed
    write (a full disk, a quota) never reaches HDF5. HDF5 does not survive I/O errors while writing: the failed
    flush leaves its file half-closed, and h5py's objects still alive then (the traceback holds them) crash the
    interpreter when they are released (a segfault, seen with a full disk). So the first error is recorded and
    every later write is kept in memory instead (metadata HDF5 may read back; raw data above `KEEP` bytes, which
    it does not need, is dropped); HDF5 finishes and closes normally, and the writer then raises the recorded
    error in one line. The half-written file is removed by `atomic_write`."""

    KEEP = 1024 * 1024

    def __init__(self, path: str):
        super().__init__()
        self._file = open(path, "r+b")
        self._pos = 0
        self.error: Optional[OSError] = None
        self._kept: List[Tuple[int, bytes]] = []  # (offset, bytes) written after the error
        self._end = 0  # the file's logical size, including what was kept in memory or dropped

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = offset
        elif whence == 1:
            self._pos += offset
        else:
            self._pos = max(self._end, self._disk_size()) + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _disk_size(self) -> int:
        return os.fstat(self._file.fileno()).st_size

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = os.pread(self._file.fileno(), len(view), self._pos)
        view[:len(data)] = data
        count = len(data)
        if self._kept:
            count = max(count, min(len(view), max(0, self._end - self._pos)))
            view[len(data):count] = bytes(count - len(data))
            for offset, kept in self._kept:  # later writes win: applied in order
                lo, hi = max(offset, self._pos), min(offset + len(kept), self._pos + len(view))
                if lo < hi:
                    view[lo - self._pos:hi - self._pos] = kept[lo - offset:hi - offset]
        self._pos += count
        return count

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if self.error is None:
            try:
                written = 0
                while written < len(data):
                    written += os.pwrite(self._file.fileno(), data[written:], self._pos + written)
            except OSError as exc:
                self.error = exc
        if self.error is not None and len(data) <= self.KEEP:
            self._kept.append((self._pos, bytes(data)))
        self._pos += len(data)
        self._end = max(self._end, self._pos)
        return len(data)

    def truncate(self, size: Optional[int] = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                self._file.truncate(size)
            except OSError as exc:
                self.error = exc
        self._end = size
        return size

    def flush(self) -> None:
        if self.error is None and not self._file.closed:
            try:
                self._file.flush()
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        if self.closed:
            return
        super().close()  # flushes first
        try:
            self._file.close()
        except OSError as exc:
            self.error = self.error or exc


def _bytes_to_write(state: CanonicalState, entries: List[WeightEntry]) -> int:
    total = 0
    for entry in entries:
        dtype = state.stored_dtype(entry)
        itemsize = 4 if is_bfloat16(dtype) else dtype.itemsize  # bfloat16 is stored as float32
        total += int(np.prod(entry.keras_shape, dtype=np.int64)) * itemsize
    return total + WRITE_MARGIN + WRITE_MARGIN_PER_DATASET * len(entries)


def _check_free_space(path: str, needed: int) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # not measurable here: the write itself reports a full disk
    if free < needed:
        raise ConversionError(path, f"not enough free disk space to write it: about {needed / 1e6:.1f} MB needed, "
                                    f"{free / 1e6:.1f} MB free in {directory}")


def _disk_error(path: str, exc: BaseException) -> ConversionError:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConversionError(path, f"cannot be written: the disk is full ({os.strerror(exc.errno)})")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else h5_reason(exc)
    return ConversionError(path, f"cannot be written ({reason})")


def write_tf_h5(state: CanonicalState, path: str) -> str:
    """Write `state` as transformers' `tf_model.h5` at `path`, atomically (`atomic_write`). The free space is
    checked first; a disk that fills up anyway, or any other write error, is one `ConversionError` line (HDF5 never
    sees the error: `_StickyErrorFile`)."""
    h5py = h5py_module(path)
    layer_names, groups = layout(state.config, state.with_head)
    _check_free_space(path, _bytes_to_write(state, [e for g in layer_names for e in groups[g]]))
    with atomic_write(path) as tmp:
        target = _StickyErrorFile(tmp)
        try:
            try:
                with h5py.File(target, "w") as f:
                    upcast_bf16 = _write_layers(h5py, f, state, layer_names, groups)
            except (OSError, RuntimeError):
                if target.error is None:
                    raise  # not a write error (reading the source, say): as it is
                raise _disk_error(path, target.error) from None
        finally:
            target.close()
        if target.error is not None:
            raise _disk_error(path, target.error)
    if upcast_bf16:
        state.notes.append(f"{TF_WEIGHTS_NAME}: HDF5 cannot store bfloat16; the bfloat16 values are stored exactly "
                           f"as float32")
    return path


def _write_layers(h5py, f, state: CanonicalState, layer_names: List[str], groups: Dict[str, List[WeightEntry]]) -> bool:
    """The file's content (see the module docstring); True when bfloat16 values were stored as float32."""
    scope = SCOPES[state.with_head]
    total = sum(len(v) for v in groups.values())
    upcast_bf16 = False
    save_attributes_to_hdf5_group(f, "layer_names", [n.encode("utf8") for n in layer_names])
    f.attrs["backend"] = "tensorflow".encode("utf8")
    f.attrs["keras_version"] = _keras_version().encode("utf8")
    bar = progress(((g, e) for g in sorted(layer_names) for e in groups[g]), desc=f"writing {TF_WEIGHTS_NAME}",
                   total=total)
    created = {}
    for group_name, entry in bar:
        if group_name not in created:
            group = created[group_name] = f.create_group(group_name)
            save_attributes_to_hdf5_group(group, "weight_names",
                                          [e.hf_tf_name(scope).encode("utf8") for e in groups[group_name]])
        value = np.asarray(state.keras_array(entry), order="C")
        if is_bfloat16(value.dtype):  # HDF5 has no bfloat16: store the same values as float32
            value = value.astype(np.float32)
            upcast_bf16 = True
        dataset = created[group_name].create_dataset(entry.hf_tf_name(scope), value.shape, dtype=value.dtype)
        if value.shape:
            dataset[...] = value
        else:
            dataset[()] = value
        del dataset, value
    top = f.create_group("top_level_model_weights")
    save_attributes_to_hdf5_group(top, "weight_names", [])
    return upcast_bf16


def read_tf_h5(path: str, config: CvtConfig, with_head: Optional[bool] = None) -> CanonicalState:
    """Read a `tf_model.h5` (ours or transformers') into a canonical state, checked against `config`."""
    try:
        weights = open_tf_h5(path, config, with_head)
    except CheckpointError as exc:
        raise ConversionError(None, str(exc)) from None
    state = make_state(config, weights, path, "hf-tf", "keras", with_head=weights.with_head)
    state.keras_loader = weights.load_keras
    return state
