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

The model's variables by transformers' PyTorch names (`canonical_variables`), assigned from a transformers
checkpoint (`assign_checkpoint`) and written as one (`checkpoint_arrays`), for `from_pretrained` and
`save_pretrained`.

A `.keras` file's config.json is untrusted too: the model's `dtype` entry is deserialised only when it is a dtype
policy (`dtype_policy_from_config`), so it cannot make Keras build another object.

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
import numpy as np

from cvt_core.errors import CheckpointError
from cvt_core.h5_safety import (KERAS_KIND, check_h5, check_keras_archive, check_keras_weights_path,
                                keras_shard_index, keras_shard_paths, open_h5)
from cvt_core.untrusted import open_regular_file
from cvt_core.weights import WeightLoadError, check_weight_value, weight_table

from .layers import public_attributes, sublayers


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


# ------------------------------------------------------------------------------------------------ transformers' names
def _weight_owner(layer: keras.layers.Layer, module: str) -> keras.layers.Layer:
    """The sub-layer of `layer` that transformers' module name `module` (`stages.0`, `layers.1`, `output`, ...)
    stands for."""
    name, _, index = module.partition(".")
    attribute = {"layers": "blocks", "output": "dense_output"}.get(name, name)
    child = getattr(layer, attribute)
    return child[int(index)] if index else child


def canonical_variables(model: keras.Model) -> Dict[str, keras.Variable]:
    """Every variable of a built model keyed by its transformers PyTorch name (`WeightEntry.torch_name`), found
    by walking the sub-layers the weight table names."""
    weights: Dict[str, keras.Variable] = {}
    for entry in weight_table(model.config, model.with_head):
        if not entry.has_keras_twin:
            continue
        layer = model if entry.in_head else model.cvt
        for module in entry.module:
            layer = _weight_owner(layer, module)
        variable = getattr(layer, entry.keras_leaf, None)
        if not isinstance(variable, keras.Variable):
            raise RuntimeError(f"layer {layer.path!r} has no variable {entry.keras_leaf!r} for {entry.name}")
        weights[entry.torch_name(model.with_head)] = variable
    return weights


def assign_checkpoint(model: keras.Model, source: str, state, assignments: Dict[str, str]) -> None:
    """Assign each weight `assignments` names (model name -> checkpoint key) from the checkpoint `state`, in the
    Keras layout; NaN, Inf or values float32 cannot hold are refused (`check_weight_value`)."""
    by_name = {entry.torch_name(model.with_head): entry for entry in weight_table(model.config, model.with_head)}
    for name, variable in model.canonical_weights().items():
        key = assignments.get(name)
        if key is not None:
            value = by_name[name].to_keras(check_weight_value(source, name, np.asarray(state[key])))
            variable.assign(np.asarray(value, dtype=variable.dtype))


def checkpoint_arrays(model: keras.Model) -> Dict[str, np.ndarray]:
    """The model's weights as transformers' PyTorch state dict (names and layouts); BatchNorm `num_batches_tracked`
    is 0: a Keras model does not count batches."""
    weights = model.canonical_weights()
    arrays: Dict[str, np.ndarray] = {}
    for entry in weight_table(model.config, model.with_head):
        name = entry.torch_name(model.with_head)
        if entry.has_keras_twin:
            arrays[name] = np.ascontiguousarray(entry.from_keras(keras.ops.convert_to_numpy(weights[name])))
        else:
            arrays[name] = np.zeros(entry.shape, np.int64)
    return arrays


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
    weight_map = None
    if path.endswith(".weights.h5"):
        shards = [path]
    elif path.endswith(".weights.json"):
        weight_map = keras_shard_index(path)
        shards = keras_shard_paths(path, listed_only=True, weight_map=weight_map)
    else:
        return {}
    layout: Layout = {}
    holders: Dict[str, str] = {}
    for shard in shards:
        with open_h5(shard, KERAS_KIND) as checked:
            for variable, facts in _file_layout(checked.file, shard).items():
                if variable in holders:
                    raise CheckpointError(f"{path}: variable {variable} is stored in two shards "
                                          f"({os.path.basename(holders[variable])} and {os.path.basename(shard)}); "
                                          f"a sharded index stores each variable once")
                holders[variable], layout[variable] = shard, facts
    if weight_map is not None:
        _check_shard_map(path, weight_map, holders)
    return layout


def _check_shard_map(path: str, weight_map: Dict[str, List[str]], holders: Dict[str, str]) -> None:
    """Keras reads a layer's variables from the first shard the index names for it: that must be the shard that
    holds them, or what was checked would not be what Keras reads."""
    for variable, shard in holders.items():
        layer = variable.rsplit("/vars/", 1)[0] if "/vars/" in variable else ""
        named = weight_map.get(layer or "/vars") or weight_map.get(f"/{layer}/vars")
        if named and named[0] != os.path.basename(shard):
            raise CheckpointError(f"{path}: the index names shard {named[0]} for layer {layer or '(top)'}, whose "
                                  f"variables are in {os.path.basename(shard)}")


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


def compare(model: keras.Model, stored: Layout, source: str, nested: bool,
            at: Optional[str] = None) -> Optional[KerasWeightsMismatchError]:
    """The error listing how the file's variables differ from the model's, or None when they match. `nested`:
    a load Keras drives for an enclosing model, the model's variables being below `at` in the file; where that
    path is not known or holds nothing, every place in the file that holds a CvT must match."""
    expected, described = file_layout(model)
    tops = {path.split("/")[0] for path in expected} if nested else None
    if nested and at is not None and not _below(stored, at.strip("/"), tops):
        at = None  # nothing there: Keras retries a refused model at another of its paths (its `layers` list)
    if not nested:
        prefixes = [""]
    else:
        prefixes = [at.strip("/")] if at is not None else (_model_prefixes(stored) or [""])
    for prefix in prefixes:
        found = _differences(expected, described, _below(stored, prefix, tops))
        if any(found):
            return KerasWeightsMismatchError(source, *found)
    return None


# ------------------------------------------------------------------------------------------------ dtype policies
_POLICY_MODULES = ("keras", "keras.dtype_policies")
# `shared_object_id`: Keras numbers an object serialised more than once (a policy shared by nested models)
_POLICY_KEYS = {"module", "class_name", "config", "registered_name", "shared_object_id"}


def _check_policy_config(value, where: str) -> None:
    if value is None or isinstance(value, str):
        return
    described = (f"{value.get('module')}.{value.get('class_name')}"[:80] if isinstance(value, dict)
                 else type(value).__name__)
    refusal = f"{where}: {described} is not a Keras dtype policy (a name or a serialised DTypePolicy)"
    if (not isinstance(value, dict) or set(value) - _POLICY_KEYS
            or not isinstance(value.get("shared_object_id", 0), int)):
        raise ValueError(refusal)
    class_name, config = value.get("class_name"), value.get("config")
    known = getattr(keras.dtype_policies, str(class_name), None)
    if (value.get("module") not in _POLICY_MODULES or not str(class_name).endswith(("DTypePolicy", "DTypePolicyMap"))
            or not isinstance(known, type) or not isinstance(config, dict) or value.get("registered_name") is not None):
        raise ValueError(refusal)
    if class_name == "DTypePolicyMap":
        if set(config) - {"default_policy", "policy_map"} or not isinstance(config.get("policy_map", {}), dict):
            raise ValueError(f"{refusal}: a DTypePolicyMap holds only default_policy and policy_map")
        _check_policy_config(config.get("default_policy"), where)
        for path, policy in config.get("policy_map", {}).items():
            _check_policy_config(policy, f"{where} [{path!r:.60}]")
    elif not all(isinstance(v, (str, int, float, bool, type(None))) for v in config.values()):
        raise ValueError(f"{refusal}: its config holds only names and numbers")


def dtype_policy_from_config(value):
    """A model's `dtype` as `get_config` wrote it (a policy name, or Keras' serialised `DTypePolicy`,
    `DTypePolicyMap` or quantized policy), deserialised; anything else raises ValueError before Keras builds it."""
    _check_policy_config(value, "the model's dtype")
    return keras.saving.deserialize_keras_object(value) if isinstance(value, dict) else value


# ------------------------------------------------------------------------------------------------ the entry points
@contextlib.contextmanager
def checked_load(model: keras.Model, filepath, skip_mismatch: bool = False):
    """Around Keras' `load_weights(filepath)` of our model: the walk and the comparison first (see the module);
    inside the block the model's `load_own_variables` does not check the same file again."""
    path = os.fspath(filepath)
    _release_layers(model)
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


def _store_entry_path(store) -> Optional[str]:
    """Where in the file Keras reads the model's variables: the path it handed to the store's `get`, which Keras'
    H5 stores (3.10 to 3.15.1) keep as `_h5_entry_path` and earlier H5Entry objects as `path` (a str). None when
    this Keras keeps it elsewhere; the comparison then holds every CvT in the file to the model."""
    for attribute in ("_h5_entry_path", "path"):
        value = getattr(store, attribute, None)
        if isinstance(value, str):
            return value
    return None


def _keep_values(store) -> None:
    """A layer's `load_own_variables` while its model refused the file Keras is loading: the layer keeps its
    values."""


def _hold_layers(model: keras.Model) -> None:
    """After our model refused a file, Keras still visits its layers (and, with skip_mismatch, only warns): each
    layer keeps its values instead of taking the refused file's, until the model's next load."""
    for layer in sublayers(model):
        object.__setattr__(layer, "load_own_variables", _keep_values)  # on the instance, not the class


def _release_layers(model: keras.Model) -> None:
    for layer in sublayers(model):
        layer.__dict__.pop("load_own_variables", None)


def check_store(model: keras.Model, store) -> None:
    """In our model's `load_own_variables`: the walk and the comparison of the file behind Keras' store below the
    path Keras reads the model from (see the module), unless `checked_load` already checked it. A refusal holds
    the model's layers at their values (`_hold_layers`)."""
    _release_layers(model)
    if model.__dict__.get("_cvt_file_checked"):
        return
    try:
        stored, source = _store_layout(store)
        error = compare(model, stored, source, nested=True, at=_store_entry_path(store))
    except Exception:
        _hold_layers(model)
        raise
    if error is not None:
        _hold_layers(model)
        raise error


def check_keras_weights_file(model: keras.Model, path: str) -> None:
    """The walk and the comparison of a `.weights.h5`, sharded `.weights.json` or `.keras` file against `model`,
    as `load_weights` runs them: one-line `CheckpointError` or `KerasWeightsMismatchError`."""
    error = compare(model, _path_layout(os.fspath(path)), os.fspath(path), nested=False)
    if error is not None:
        raise error
