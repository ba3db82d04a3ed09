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
as transformers' loader matches them.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from cvt_core.atomic import atomic_write
from cvt_core.checkpoint import TF_WEIGHTS_NAME, CheckpointError
from cvt_core.config import CvtConfig
from cvt_core.dtypes import is_bfloat16
from cvt_core.tf_h5 import h5py_module, open_tf_h5
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


def write_tf_h5(state: CanonicalState, path: str) -> str:
    """Write `state` as transformers' `tf_model.h5` at `path`, atomically (`atomic_write`)."""
    h5py = h5py_module(path)
    scope = SCOPES[state.with_head]
    layer_names, groups = layout(state.config, state.with_head)
    total = sum(len(v) for v in groups.values())
    upcast_bf16 = False
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
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
        top = f.create_group("top_level_model_weights")
        save_attributes_to_hdf5_group(top, "weight_names", [])
    if upcast_bf16:
        state.notes.append(f"{TF_WEIGHTS_NAME}: HDF5 cannot store bfloat16; the bfloat16 values are stored exactly "
                           f"as float32")
    return path


def read_tf_h5(path: str, config: CvtConfig, with_head: Optional[bool] = None) -> CanonicalState:
    """Read a `tf_model.h5` (ours or transformers') into a canonical state, checked against `config`."""
    try:
        weights = open_tf_h5(path, config, with_head)
    except CheckpointError as exc:
        raise ConversionError(None, str(exc)) from None
    state = make_state(config, weights, path, "hf-tf", "keras", with_head=weights.with_head)
    state.keras_loader = weights.load_keras
    return state
