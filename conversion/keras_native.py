"""Keras 3 native files: `model.weights.h5` (`save_weights` / `load_weights`) and `model.keras`
(`model.save` / `keras.models.load_model`), written and read by Keras itself through our `cvt_tf` models.

Keras variables are float32 whatever `--dtype` says (a Keras dtype policy would also change the compute dtype);
with a cast the stored values are the cast ones, exactly representable in float32. `model.weights.h5` holds no
config: it is read with the `config.json` beside it (or `--config`), and whether it holds the classification head
is read from its top-level groups. `num_batches_tracked` has no Keras twin and reads back as 0. A file whose
variables do not match the config (cvt_tf's strict loading) is refused in one line.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Optional

import numpy as np

from cvt_core.atomic import atomic_write
from cvt_core.checkpoint import KERAS_MODEL_NAME, KERAS_WEIGHTS_NAME
from cvt_core.config import CvtConfig
from cvt_core.tensor_file import LazyTensors
from cvt_core.weights import WeightLoadError, weight_table

from .errors import ConversionError, describe, one_line
from .models import assign_keras_weights, import_keras_models, new_keras_model, no_random_draws, release
from .state import CanonicalState, make_state

HEAD_GROUPS = ("layernorm", "classifier")


def write_keras(state: CanonicalState, directory: str, weights: bool = True, model_file: bool = True):
    """Build our Keras model from `state` and save it as model.weights.h5 and/or model.keras in `directory`."""
    model = state.keras_model if state.keras_model is not None and state.cast is None else None
    if model is None:
        model = new_keras_model(state.config, state.with_head)
        assign_keras_weights(model, state, desc="building Keras model")
    written = []
    if weights:
        path = os.path.join(directory, KERAS_WEIGHTS_NAME)
        with atomic_write(path) as tmp:  # the temporary name keeps the .weights.h5 ending Keras asks for
            model.save_weights(tmp)
        written.append(path)
    if model_file:
        path = os.path.join(directory, KERAS_MODEL_NAME)
        with atomic_write(path) as tmp:
            model.save(tmp)
        written.append(path)
    if model is not state.keras_model:
        del model
        release(state.nbytes)  # before the cross-check builds the next model
    return written


def weights_file_has_head(path: str) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        return any(name in f for name in HEAD_GROUPS)


def load_keras_weights_model(path: str, config: CvtConfig, with_head: Optional[bool] = None):
    """A fresh Keras model for `config` with `load_weights(path)` applied."""
    if not os.path.exists(path):
        raise ConversionError(path, "no such file")
    try:
        if with_head is None:
            with_head = weights_file_has_head(path)
    except OSError as exc:
        raise ConversionError(path, f"not a readable HDF5 file (truncated or corrupt: {one_line(str(exc))[:200]})") from None
    model = new_keras_model(config, with_head)
    try:
        model.load_weights(path)  # strict: a file that does not fit the config raises a WeightLoadError
    except WeightLoadError as exc:
        raise describe(exc, path) from None
    except Exception as exc:  # Keras raises ValueError / OSError / KeyError with long messages
        raise ConversionError(path, f"cannot be loaded into a model of this config: {_short(exc)}") from None
    return model


def load_keras_model_file(path: str):
    """`keras.models.load_model` of a `.keras` file written with our models."""
    if not os.path.exists(path):
        raise ConversionError(path, "no such file")
    if not zipfile.is_zipfile(path):
        raise ConversionError(path, "not a .keras archive (truncated or corrupt zip file)")
    keras, _, _ = import_keras_models()
    try:
        return keras.models.load_model(path)
    except Exception as exc:
        mismatch = _weights_mismatch(keras, path)
        if mismatch is not None:  # Keras wraps our strict check's error in a long message of its own
            raise describe(mismatch, path) from None
        raise ConversionError(path, f"keras.models.load_model failed: {_short(exc)}") from None


def _weights_mismatch(keras, path: str):
    """The strict check's `WeightLoadError` for a `.keras` file whose weights do not fit its own config, or None
    (also when the config itself does not build)."""
    from cvt_tf.modeling_cvt import check_keras_weights_file

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
        with no_random_draws(keras):
            model = keras.saving.deserialize_keras_object(config, safe_mode=True)
            check_keras_weights_file(model, path)
    except WeightLoadError as exc:
        return exc
    except Exception:
        return None
    return None


def state_from_keras_model(model, source: str) -> CanonicalState:
    """A canonical state over a loaded Keras model's variables, read one at a time (checked against the table like
    every reader). `num_batches_tracked`, which Keras lacks, is left out and reads as 0."""
    variables = model.canonical_weights()
    by_name = {e.torch_name(model.with_head): e for e in weight_table(model.config, model.with_head)}
    shapes = {name: by_name[name].shape if tuple(v.shape) == by_name[name].keras_shape else tuple(v.shape)
              for name, v in variables.items()}
    dtypes = {name: np.dtype(v.dtype) for name, v in variables.items()}

    def load(name: str) -> np.ndarray:
        return np.asarray(by_name[name].from_keras(np.asarray(variables[name].numpy())), order="C")

    state = make_state(model.config, LazyTensors(shapes, dtypes, load), source, "keras", "keras",
                       with_head=model.with_head)
    state.keras_model = model
    state.keras_loader = lambda name: np.asarray(variables[name].numpy())
    return state


def read_keras(path: str, config: Optional[CvtConfig]) -> CanonicalState:
    """`model.keras` (config inside) or `model.weights.h5` (needs `config`)."""
    if path.endswith(".keras"):
        model = load_keras_model_file(path)
    else:
        if config is None:
            raise ConversionError(path, "a Keras weights file holds no config: put config.json beside it or pass --config")
        model = load_keras_weights_model(path, config)
    return state_from_keras_model(model, path)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = one_line(str(exc)) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."

