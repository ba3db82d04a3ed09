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

from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .errors import CheckpointError
from .config import CvtConfig
from .h5_safety import TF_KIND, H5Dataset, h5py_module, open_h5  # noqa: F401  (h5py_module: for the writer)
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


def load_attributes_from_hdf5_group(group, name: str) -> List[str]:
    """A string-list attribute as tf_keras stores it: whole, or split into `name0`, `name1`, ... chunks. For files
    that are trusted (written here); untrusted ones are read through `CheckedH5.read_name_list`, which bounds it."""
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


def open_tf_h5(path: str, config: CvtConfig, with_head: Optional[bool] = None) -> TfH5Weights:
    """Open a `tf_model.h5` (ours or transformers') whose names follow `config`'s table; `with_head` defaults to
    what its layer names say. The file is opened as a regular file and walked whole first (`cvt_core.h5_safety`:
    hard links only, plain float datasets stored inside the file); raises `CheckpointError` (one line) for a file
    that is not one, or is refused."""
    checked = open_h5(path, TF_KIND)
    try:
        f = checked.file
        if "layer_names" not in f.attrs and "layer_names0" not in f.attrs:
            if "vars" in f or "layers" in f or any(k in f for k in ("cvt", "classifier")):
                raise CheckpointError(f"{path}: this is a Keras 3 weights file (model.weights.h5), not transformers' "
                                      f"tf_model.h5; use --from keras")
            raise CheckpointError(f"{path}: not a transformers tf_model.h5 (no layer_names attribute)")
        layer_names = checked.read_name_list(f, "layer_names")
        if with_head is None:
            with_head = any(n != "cvt" for n in layer_names)
        by_path = {e.keras_path() + ":0": e for e in weight_table(config, with_head) if e.has_keras_twin}
        datasets: Dict[str, Tuple[object, H5Dataset]] = {}  # torch name (or raw h5 name when unknown) -> dataset
        shapes: Dict[str, tuple] = {}
        dtypes: Dict[str, np.dtype] = {}
        for layer in layer_names:
            group, facts = checked.get(f, layer)
            if group is None:
                raise CheckpointError(f"{path}: truncated or corrupt: layer group {layer!r} listed in layer_names is "
                                      f"missing")
            if facts is not None or not isinstance(group, checked.h5py.Group):
                raise CheckpointError(f"{path}: layer {layer!r} listed in layer_names is a dataset, not a group")
            for weight_name in checked.read_name_list(group, "weight_names"):
                dataset, facts = checked.dataset(group, weight_name, f"layer {layer!r} weight")
                entry = by_path.get(_strip_scope(weight_name))
                if entry is None:
                    key = weight_name  # reported as unexpected by the plan
                    shape = facts.shape
                else:
                    key = entry.torch_name(with_head)
                    shape = _torch_shape(entry, facts.shape)
                if key in datasets:
                    raise CheckpointError(f"{path}: variable {weight_name!r} appears twice")
                datasets[key], shapes[key], dtypes[key] = (dataset, facts), shape, facts.dtype
    except BaseException:
        checked.close()
        raise
    by_torch = {e.torch_name(with_head): e for e in weight_table(config, with_head)}

    def load_keras(key: str) -> np.ndarray:
        dataset, facts = datasets[key]
        return checked.read(dataset, facts)  # native byte order, checked again first

    def load(key: str) -> np.ndarray:
        value = load_keras(key)
        return np.asarray(by_torch[key].from_keras(value), order="C") if key in by_torch else value

    return TfH5Weights(with_head, shapes, dtypes, load, load_keras, checked.close)
