"""Keras weight files (`.weights.h5`, sharded `.weights.json`, `.keras`, legacy `.h5`) loaded into our Keras models
safely and strictly.

Safely: every HDF5 file is walked whole by `cvt_core.h5_safety` (hard links only, plain datasets stored inside the
file, Keras' little-endian dtypes) and refused in one `CheckpointError` line. Strictly: the file must hold exactly
the variables the model would write, with their shapes and kinds of dtype, else `KerasWeightsMismatchError` (a
`cvt_core.WeightLoadError`, one line) lists what is missing, unexpected, mis-shaped or of the wrong dtype. (Keras
alone skips sub-layers the file lacks or holds in excess.)

Where the checks run:

- `model.load_weights(path)` of our models (`checked_load`): the path, and every shard of a sharded index, is
  walked before Keras opens it (`check_keras_weights_path`), then compared with the model before any variable is
  assigned. `skip_mismatch=True`, Keras' opt-out, turns the comparison into a warning; the walk and the dtype
  kinds still refuse.
- Loads that Keras drives itself: `keras.models.load_model`, the `load_weights` of a model that holds ours (a
  backbone under the user's head, `Sequential([Rescaling, model])`, a subclassed wrapper), `BackupAndRestore`.
  Keras calls our model's `load_own_variables(store)` before any of its layers' (`check_store`), with the store of
  the file it has opened: the walk and the comparison run there on the HDF5 file the store holds (`store.h5_file`,
  or for a sharded store every shard of `store.path`), and the model is found in the file by its `cvt/encoder`
  group wherever it is nested. Keras records a failure there and raises it (inside its own ValueError) after its
  walk ends, having read the model's layers' datasets through its own checks; so for a file from a stranger call
  `cvt_core.h5_safety.check_keras_weights_path(path)` first, as `cvt convert` does.

What a model writes (`file_layout`) comes from Keras' public `save_own_variables` of each layer, at the path
Keras' saving gives the layer: attribute names from the model down, a list's items named after their class in
snake case, numbered from the second one of a class (`stages/tf_cvt_stage`, `stages/tf_cvt_stage_1`, ...).
tests/test_keras_ecosystem.py checks the layout against what `save_weights` writes, quantized and LoRA layers
included.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
import zipfile
from typing import Dict, Iterator, List, Optional, Tuple

import keras

from cvt_core.errors import CheckpointError
from cvt_core.h5_safety import (KERAS_KIND, check_h5, check_keras_archive, check_keras_weights_path,
                                keras_shard_paths, open_h5)
from cvt_core.untrusted import open_regular_file
from cvt_core.weights import WeightLoadError

from .layers import public_attributes


KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"  # the weights file inside a .keras archive
Layout = Dict[str, Tuple[tuple, str]]  # {path in the file: (shape, dtype name)}


class KerasWeightsMismatchError(WeightLoadError):
    """A Keras weights file (`.weights.h5`, the weights inside a `.keras`) does not fit the model it is loaded into.
    `missing` and `mismatched` name the model's weights (transformers' PyTorch names), `unexpected` the file's
    variable paths (`<layer path>/vars/<i>`); `str(error)` is one line."""

    def __init__(self, source: str, missing, unexpected, mismatched, bad_dtype=()):
        super().__init__(source, missing, unexpected, mismatched, bad_dtype)
        parts = []
        for label, items in (("missing from the file", self.missing), ("unexpected in the file", self.unexpected),
                             ("mis-shaped (file vs model)",
                              [f"{name} {tuple(got)} vs {tuple(want)}" for name, want, got in self.mismatched]),
                             ("of another dtype (file vs model)", [f"{name} {got}" for name, got in self.bad_dtype])):
            if items:
                shown = ", ".join(items[:3]) + (f", ... ({len(items) - 3} more)" if len(items) > 3 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        self.args = (f"{source}: the Keras weights do not match the model's config: {'; '.join(parts)}; check that "
                     f"the config belongs to these weights",)


# ------------------------------------------------------------------------------------------------ what the model writes
def _snake_case(name: str) -> str:
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _layers_by_file_path(layer: keras.layers.Layer, path: str = "") -> Iterator[Tuple[str, keras.layers.Layer]]:
    yield path, layer
    for attribute, value in sorted(public_attributes(layer).items()):
        if isinstance(value, keras.layers.Layer):
            yield from _layers_by_file_path(value, f"{path}/{attribute}" if path else attribute)
        elif isinstance(value, (list, tuple)) and any(isinstance(item, keras.layers.Layer) for item in value):
            used: Dict[str, int] = {}
            for item in value:
                name = _snake_case(type(item).__name__)
                used[name] = used.get(name, -1) + 1
                name = f"{name}_{used[name]}" if used[name] else name
                yield from _layers_by_file_path(item, f"{path}/{attribute}/{name}" if path else f"{attribute}/{name}")


class _Recorder(dict):
    """A store for `save_own_variables` that keeps each value's shape and dtype name, and which value it was."""

    def __init__(self):
        super().__init__()
        self.values = {}

    def __setitem__(self, key, value):
        self.values[key] = value
        super().__setitem__(key, (tuple(int(d) for d in value.shape), keras.backend.standardize_dtype(value.dtype)))


def file_layout(model: keras.Model) -> Tuple[Layout, Dict[str, str]]:
    """({path in a Keras weights file, relative to the model: (shape, dtype name)}, {path: the weight's
    transformers PyTorch name, or the path for a value that is no weight of the table}) of what `save_weights`
    writes for the (built) model's layers."""
    names = {}
    with contextlib.suppress(RuntimeError):  # a LoRA layer's kernel is no variable: named by its path instead
        names = {id(variable): name for name, variable in model.canonical_weights().items()}
    layout: Layout = {}
    described: Dict[str, str] = {}
    for path, layer in _layers_by_file_path(model):
        recorder = _Recorder()
        layer.save_own_variables(recorder)
        for key, value in recorder.items():
            file_path = f"{path}/vars/{key}" if path else f"vars/{key}"
            layout[file_path] = value
            described[file_path] = names.get(id(recorder.values[key]), file_path)
    return layout, described


# ------------------------------------------------------------------------------------------------ what the file holds
def _dtype_name(dtype) -> str:
    return "bfloat16" if dtype.kind == "V" else dtype.name  # Keras stores bfloat16 as 2-byte opaque values


def _file_layout(h5_file, source: str, size: Optional[int] = None) -> Layout:
    """The walk (`cvt_core.h5_safety.check_h5`, Keras rules) of an open HDF5 file, and its variables."""
    datasets = check_h5(h5_file, source, KERAS_KIND, size).values()
    return {facts.path.lstrip("/"): (tuple(facts.shape), _dtype_name(facts.dtype))
            for facts in datasets if "/vars/" in f"/{facts.path.lstrip('/')}"}


def _path_layout(path: str) -> Layout:
    """The walk and the variables of a `.weights.h5`, a sharded `.weights.json` (every shard walked, the listed ones
    read) or a `.keras` archive's weights; a legacy `.h5`, which Keras reads by layer names, is walked and gives
    {}."""
    if path.endswith(".keras"):
        import h5py

        with open_regular_file(path) as fileobj:
            check_keras_archive(path, check_weights=False, fileobj=fileobj)
            fileobj.seek(0)
            with zipfile.ZipFile(fileobj) as archive:
                if KERAS_ARCHIVE_WEIGHTS not in archive.namelist():
                    return {}
                data = archive.read(KERAS_ARCHIVE_WEIGHTS)
        with h5py.File(io.BytesIO(data), "r") as h5_file:
            return _file_layout(h5_file, f"{path} ({KERAS_ARCHIVE_WEIGHTS})", len(data))
    check_keras_weights_path(path)
    if path.endswith(".weights.h5"):
        shards = [path]
    elif path.endswith(".weights.json"):
        shards = keras_shard_paths(path, listed_only=True)
    else:
        return {}
    layout: Layout = {}
    for shard in shards:
        with open_h5(shard, KERAS_KIND) as checked:
            layout.update(_file_layout(checked.file, shard))
    return layout


def _store_layout(store) -> Tuple[Layout, str]:
    """(the variables, a name for messages) of the file behind a weights store Keras hands to `load_own_variables`,
    after the walk. Keras' H5 stores (3.0 to 3.15) hold the open file as `h5_file`; a sharded one also the index's
    `path` and its `sharding_config`. A store without either is refused: the file could not be checked."""
    if getattr(store, "sharding_config", None) is not None and getattr(store, "path", None) is not None:
        path = os.fspath(store.path)
        return _path_layout(path), path
    h5_file = getattr(store, "h5_file", None)
    if h5_file is None or not hasattr(h5_file, "id"):
        raise CheckpointError(f"cannot check the Keras weights store {type(store).__name__}: it holds no HDF5 file "
                              f"this version of cvt_tf knows how to walk")
    archive = getattr(store, "archive", None)
    filename = getattr(h5_file, "filename", None)
    if archive is not None and getattr(archive, "filename", None):
        source = f"{os.fspath(archive.filename)} ({KERAS_ARCHIVE_WEIGHTS})"
    elif isinstance(filename, str) and os.path.isfile(filename):
        source = filename
    else:  # load_model reads a .keras archive's weights into memory
        source = KERAS_ARCHIVE_WEIGHTS
    return _file_layout(h5_file, source), source


# ------------------------------------------------------------------------------------------------ the comparison
def _model_prefixes(stored: Layout) -> List[str]:
    """Where models like ours sit in a file: the path before each `cvt/encoder` group ("" at the top)."""
    prefixes = set()
    for path in stored:
        parts = path.split("/")
        for i in range(len(parts) - 1):
            if parts[i] == "cvt" and parts[i + 1] == "encoder":
                prefixes.add("/".join(parts[:i]))
    return sorted(prefixes, key=len)


def _below(stored: Layout, prefix: str, tops: Optional[set]) -> Layout:
    """The file's variables below `prefix`, those of the optimizer left out. `tops`: the model's own top-level
    entries (its layers' attribute names); with them, only what lies below those counts (the enclosing model's
    other layers, or a nested model's own optimizer, are not the model's weights)."""
    start = f"{prefix}/" if prefix else ""
    below = {path[len(start):]: value for path, value in stored.items() if path.startswith(start)}
    return {path: value for path, value in below.items()
            if path.split("/")[0] != "optimizer" and (tops is None or path.split("/")[0] in tops)}


def _dtype_kind(name: str) -> str:
    return "float" if name.startswith(("float", "bfloat")) else name


def _differences(expected: Layout, described: Dict[str, str], stored: Layout):
    missing = [described[p] for p in sorted(expected) if p not in stored]
    unexpected = [p for p in sorted(stored) if p not in expected]
    mismatched = [(described[p], shape, stored[p][0]) for p, (shape, _) in sorted(expected.items())
                  if p in stored and shape != stored[p][0]]
    bad_dtype = [(described[p], f"{stored[p][1]} vs {dtype}") for p, (_, dtype) in sorted(expected.items())
                 if p in stored and _dtype_kind(dtype) != _dtype_kind(stored[p][1])]
    return missing, unexpected, mismatched, bad_dtype


def compare(model: keras.Model, stored: Layout, source: str, nested: bool) -> Optional[KerasWeightsMismatchError]:
    """The error listing how the file's variables differ from the model's, or None when they match. `nested`:
    the model may sit anywhere in the file (a load Keras drives for an enclosing model); it matches when any place
    that holds a CvT matches, and is reported against the closest one."""
    expected, described = file_layout(model)
    tops = {path.split("/")[0] for path in expected} if nested else None
    prefixes = _model_prefixes(stored) if nested else [""]
    best = None
    for prefix in prefixes or [""]:
        found = _differences(expected, described, _below(stored, prefix, tops))
        if not any(found):
            return None
        if best is None or sum(map(len, found)) < sum(map(len, best)):
            best = found
    return KerasWeightsMismatchError(source, *best)


# ------------------------------------------------------------------------------------------------ the entry points
@contextlib.contextmanager
def checked_load(model: keras.Model, filepath, skip_mismatch: bool = False):
    """Around Keras' `load_weights(filepath)` of our model: the walk and the comparison first (see the module);
    inside the block the model's `load_own_variables` does not check the same file again."""
    path = os.fspath(filepath)
    stored = _path_layout(path)
    if stored or path.endswith((".weights.h5", ".weights.json", ".keras")):
        error = compare(model, stored, path, nested=False)
        if error is not None:
            if error.bad_dtype or not skip_mismatch:
                raise error
            warnings.warn(str(error), stacklevel=3)
    object.__setattr__(model, "_cvt_file_checked", True)  # a plain attribute, not tracked by Keras
    try:
        yield
    finally:
        object.__setattr__(model, "_cvt_file_checked", False)


def check_store(model: keras.Model, store) -> None:
    """In our model's `load_own_variables`: the walk and the comparison of the file behind Keras' store (see the
    module), unless `checked_load` already checked it."""
    if model.__dict__.get("_cvt_file_checked"):
        return
    stored, source = _store_layout(store)
    error = compare(model, stored, source, nested=True)
    if error is not None:
        raise error


def check_keras_weights_file(model: keras.Model, path: str) -> None:
    """The walk and the comparison of a `.weights.h5`, sharded `.weights.json` or `.keras` file against `model`,
    as `load_weights` runs them: one-line `CheckpointError` or `KerasWeightsMismatchError`."""
    error = compare(model, _path_layout(os.fspath(path)), os.fspath(path), nested=False)
    if error is not None:
        raise error
