"""Reading transformers' TF checkpoint `tf_model.h5` with h5py and NumPy (no TensorFlow).

`open_tf_h5` lists the file's variables under our PyTorch-side names, in PyTorch layout, and reads each one when
asked: a `LazyTensors`, like every reader in `cvt_core`. It is the one reader of the format: `from_pretrained`
(through `cvt_core.checkpoint`) and the converter (`conversion.hf_tf_h5`, which also writes the format and
documents its layout) both use it.

Names are matched as transformers' loader matches them: the variable name minus its first '/' component (the
model's scope); names without '/' (the cls token) as they are. A variable the config's table does not know keeps
its name in the file, so the caller's load plan reports it as unexpected.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Mapping, Optional

import numpy as np

from .errors import CheckpointError
from .config import CvtConfig
from .tensor_file import LazyTensors
from .weights import WeightEntry, weight_table


class TfH5Weights(LazyTensors):
    """The variables of an open `tf_model.h5`, keyed by PyTorch-side name (or the file's name when unknown), with
    PyTorch-layout shapes and values; `load_keras(key)` reads one as stored (Keras layout), sparing two transposes
    when it goes to a Keras model; `with_head` is whether the file holds the classification head."""

    def __init__(self, with_head: bool, shapes: Mapping[str, tuple], dtypes: Mapping[str, np.dtype],
                 load: Callable[[str], np.ndarray], load_keras: Callable[[str], np.ndarray], close: Callable[[], None]):
        super().__init__(shapes, dtypes, load, close)
        self.with_head = with_head
        self.load_keras = load_keras


def h5py_module(path: str):
    """h5py, or a one-line CheckpointError saying that reading or writing `path` needs it."""
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency of the tf extra
        raise CheckpointError(f"{path}: reading or writing it needs h5py (pip install h5py)") from None
    return h5py


def load_attributes_from_hdf5_group(group, name: str) -> List[str]:
    """A string-list attribute as tf_keras stores it: whole, or split into `name0`, `name1`, ... chunks."""
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


def _strip_scope(name: str) -> str:
    return "/".join(name.split("/")[1:]) if "/" in name else name


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


def open_tf_h5(path: str, config: CvtConfig, with_head: Optional[bool] = None) -> TfH5Weights:
    """Open a `tf_model.h5` (ours or transformers') whose names follow `config`'s table; `with_head` defaults to
    what its layer names say. Raises `CheckpointError` (one line) for a file that is not one."""
    h5py = h5py_module(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"{path}: not a readable HDF5 file (truncated or corrupt: {_h5_reason(exc)})") from None
    try:
        if "layer_names" not in f.attrs and "layer_names0" not in f.attrs:
            if "vars" in f or "layers" in f or any(k in f for k in ("cvt", "classifier")):
                raise CheckpointError(f"{path}: this is a Keras 3 weights file (model.weights.h5), not transformers' "
                                      f"tf_model.h5; use --from keras")
            raise CheckpointError(f"{path}: not a transformers tf_model.h5 (no layer_names attribute)")
        layer_names = load_attributes_from_hdf5_group(f, "layer_names")
        if with_head is None:
            with_head = any(n != "cvt" for n in layer_names)
        by_path = {e.keras_path() + ":0": e for e in weight_table(config, with_head) if e.has_keras_twin}
        datasets: Dict[str, object] = {}  # torch name (or raw h5 name when unknown) -> h5 dataset
        shapes: Dict[str, tuple] = {}
        dtypes: Dict[str, np.dtype] = {}
        for layer in layer_names:
            if layer not in f:
                raise CheckpointError(f"{path}: truncated or corrupt: layer group {layer!r} listed in layer_names is "
                                      f"missing")
            group = f[layer]
            for weight_name in load_attributes_from_hdf5_group(group, "weight_names"):
                if weight_name not in group:
                    raise CheckpointError(f"{path}: truncated or corrupt: dataset {layer}/{weight_name} is missing")
                dataset = group[weight_name]
                entry = by_path.get(_strip_scope(weight_name))
                if entry is None:
                    key = weight_name  # reported as unexpected by the plan
                    shape = tuple(dataset.shape)
                else:
                    key = entry.torch_name(with_head)
                    shape = _torch_shape(entry, tuple(dataset.shape))
                if key in datasets:
                    raise CheckpointError(f"{path}: variable {weight_name} appears twice")
                datasets[key], shapes[key], dtypes[key] = dataset, shape, dataset.dtype
    except BaseException:
        f.close()
        raise
    by_torch = {e.torch_name(with_head): e for e in weight_table(config, with_head)}

    def load_keras(key: str) -> np.ndarray:
        dataset = datasets[key]
        try:
            return np.asarray(dataset[()])
        except OSError as exc:
            raise CheckpointError(f"{path}: truncated or corrupt: cannot read {dataset.name} "
                                  f"({_h5_reason(exc)})") from None

    def load(key: str) -> np.ndarray:
        value = load_keras(key)
        return np.asarray(by_torch[key].from_keras(value), order="C") if key in by_torch else value

    return TfH5Weights(with_head, shapes, dtypes, load, load_keras, f.close)
