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

Reading matches names like transformers' loader does: the name minus its first '/' component (names without '/'
-- the cls token -- as they are).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from cvt_core.checkpoint import TF_WEIGHTS_NAME
from cvt_core.config import CvtConfig
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


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency of the tf extra
        raise ConversionError(TF_WEIGHTS_NAME, "reading or writing it needs h5py (pip install h5py)") from None
    return h5py


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


def load_attributes_from_hdf5_group(group, name: str) -> List[str]:
    """Inverse of `save_attributes_to_hdf5_group`."""
    def _decode(values) -> List[str]:
        return [v.decode("utf8") if hasattr(v, "decode") else str(v) for v in values]

    if name in group.attrs:
        return _decode(group.attrs[name])
    out: List[str] = []
    chunk_id = 0
    while "%s%d" % (name, chunk_id) in group.attrs:
        out.extend(_decode(group.attrs["%s%d" % (name, chunk_id)]))
        chunk_id += 1
    return out


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
    """Write `state` as transformers' `tf_model.h5` at `path` (the caller makes the folder atomic)."""
    h5py = _h5py()
    scope = SCOPES[state.with_head]
    layer_names, groups = layout(state.config, state.with_head)
    total = sum(len(v) for v in groups.values())
    upcast_bf16 = False
    with h5py.File(path, "w") as f:
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
            if value.dtype.name == "bfloat16":  # HDF5 has no bfloat16: store the same values as float32
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


def _strip_scope(name: str) -> str:
    return "/".join(name.split("/")[1:]) if "/" in name else name


def read_tf_h5(path: str, config: CvtConfig, with_head: Optional[bool] = None) -> CanonicalState:
    """Read a `tf_model.h5` (ours or transformers') into a canonical state, checked against `config`."""
    h5py = _h5py()
    if not os.path.exists(path):
        raise ConversionError(path, "no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ConversionError(path, f"not a readable HDF5 file (truncated or corrupt: {_h5_reason(exc)})") from None
    try:
        if "layer_names" not in f.attrs and "layer_names0" not in f.attrs:
            if "vars" in f or "layers" in f or any(k in f for k in ("cvt", "classifier")):
                raise ConversionError(path, "this is a Keras 3 weights file (model.weights.h5), not transformers' "
                                            "tf_model.h5; use --from keras")
            raise ConversionError(path, "not a transformers tf_model.h5 (no layer_names attribute)")
        layer_names = load_attributes_from_hdf5_group(f, "layer_names")
        if with_head is None:
            with_head = any(n != "cvt" for n in layer_names)
        by_path = {e.keras_path() + ":0": e for e in weight_table(config, with_head) if e.has_keras_twin}
        datasets: Dict[str, object] = {}  # torch name (or raw h5 name when unknown) -> h5 dataset
        shapes: Dict[str, tuple] = {}
        dtypes: Dict[str, np.dtype] = {}
        for layer in layer_names:
            if layer not in f:
                raise ConversionError(path, f"truncated or corrupt: layer group {layer!r} listed in layer_names is missing")
            group = f[layer]
            for weight_name in load_attributes_from_hdf5_group(group, "weight_names"):
                if weight_name not in group:
                    raise ConversionError(path, f"truncated or corrupt: dataset {layer}/{weight_name} is missing")
                dataset = group[weight_name]
                entry = by_path.get(_strip_scope(weight_name))
                if entry is None:
                    key = weight_name  # reported as unexpected by the plan
                    shape = tuple(dataset.shape)
                else:
                    key = entry.torch_name(with_head)
                    shape = _torch_shape(entry, tuple(dataset.shape))
                if key in datasets:
                    raise ConversionError(path, f"variable {weight_name} appears twice")
                datasets[key], shapes[key], dtypes[key] = dataset, shape, dataset.dtype
        by_torch = {e.torch_name(with_head): e for e in weight_table(config, with_head)}

        def load_keras(key: str) -> np.ndarray:
            dataset = datasets[key]
            try:
                return np.asarray(dataset[()])
            except OSError as exc:
                raise ConversionError(path, f"truncated or corrupt: cannot read {dataset.name} ({_h5_reason(exc)})") from None

        def load(key: str) -> np.ndarray:
            return np.asarray(by_torch[key].from_keras(load_keras(key)), order="C")

        state = make_state(config, shapes, dtypes, load, path, "hf-tf", "keras", with_head=with_head, closer=f.close)
        state.keras_loader = load_keras
    except BaseException:
        f.close()
        raise
    return state


def _torch_shape(entry: WeightEntry, keras_shape: tuple) -> tuple:
    """PyTorch shape of a Keras-layout tensor of this entry (any rank mismatch is left for the plan to report)."""
    if len(keras_shape) != len(entry.keras_shape):
        return keras_shape
    return tuple(entry.from_keras(np.broadcast_to(np.uint8(0), keras_shape)).shape)  # a view: no memory


def _h5_reason(exc: BaseException) -> str:
    text = str(exc)
    if "(" in text and ")" in text:
        text = text[text.find("(") + 1: text.rfind(")")]
    return text.splitlines()[0] if text else type(exc).__name__
