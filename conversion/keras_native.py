"""Keras 3 native files: `model.weights.h5` (`save_weights` / `load_weights`) and `model.keras`
(`model.save` / `keras.models.load_model`), written and read by Keras itself through our `cvt_tf` models.

Keras variables are float32 whatever `--dtype` says (a Keras dtype policy would also change the compute dtype);
with a cast the stored values are the cast ones, exactly representable in float32. `model.weights.h5` holds no
config: it is read with the `config.json` beside it (or `--config`), and whether it holds the classification head
is read from its top-level groups. `num_batches_tracked` has no Keras twin and reads back as 0. A file whose
variables do not match the config (cvt_tf's strict loading) is refused in one line.

Reading is safe by construction (`cvt_core.h5_safety`): a `model.weights.h5` is opened as a regular file and walked
whole (hard links only; plain, unfiltered, allocated float datasets stored inside the file) before Keras reads it;
a `.keras` archive has its members bounded (no zip bomb), its config.json parsed strictly, its weights walked, and
must hold one of our classes ("not a CvT model saved by cvt_tf: holds <class>") before Keras builds the model from
that config (`safe_mode=True`) and our model's strict `load_weights` walks the archive again and loads its weights
(the optimizer's state is not read).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from cvt_core.atomic import atomic_write
from cvt_core.checkpoint import KERAS_MODEL_NAME, KERAS_WEIGHTS_NAME, CheckpointError
from cvt_core.config import CvtConfig
from cvt_core.h5_safety import KERAS_KIND, check_h5_file, check_keras_archive, keras_archive_class, open_h5
from cvt_core.untrusted import open_regular_file
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
    """Whether a Keras weights file holds the classification head, from its top-level groups, after the whole file
    is walked (`cvt_core.h5_safety`: hard links only, plain datasets inside the file). One-line
    `ConversionError` for a file that is refused."""
    try:
        with open_h5(path, KERAS_KIND) as checked:
            return any(name in checked.file for name in HEAD_GROUPS)
    except CheckpointError as exc:
        raise ConversionError(None, one_line(str(exc))) from None


def load_keras_weights_model(path: str, config: CvtConfig, with_head: Optional[bool] = None):
    """A fresh Keras model for `config` with `load_weights(path)` applied, once the file passed the walk."""
    if not os.path.exists(path):
        raise ConversionError(path, "no such file")
    if with_head is None:
        with_head = weights_file_has_head(path)  # walks the file
    else:
        try:
            check_h5_file(path, KERAS_KIND)
        except CheckpointError as exc:
            raise ConversionError(None, one_line(str(exc))) from None
    model = new_keras_model(config, with_head)
    try:
        model.load_weights(path)  # strict: a file that does not fit the config raises a WeightLoadError
    except WeightLoadError as exc:
        raise describe(exc, path) from None
    except CheckpointError as exc:
        raise ConversionError(None, one_line(str(exc))) from None
    except Exception as exc:  # Keras raises ValueError / OSError / KeyError with long messages
        raise ConversionError(path, f"cannot be loaded into a model of this config: {_short(exc)}") from None
    return model


CVT_KERAS_CLASSES = ("TFCvtModel", "TFCvtForImageClassification", "TFCvtBackbone")
CVT_KERAS_MODULE = "cvt_tf.modeling_cvt"
KERAS_ARCHIVE_MEMBERS = ("config.json", "metadata.json", "model.weights.h5")  # what Keras writes for our models


def check_cvt_keras_config(config, path: str) -> CvtConfig:
    """The CvT config inside a `.keras` archive's config.json, once it names one of our classes; one line
    ("not a CvT model saved by cvt_tf: holds <class>") for another model, before Keras builds anything."""
    holds = keras_archive_class(config)
    if not (isinstance(config, dict) and config.get("class_name") in CVT_KERAS_CLASSES
            and (config.get("module") == CVT_KERAS_MODULE
                 or config.get("registered_name") == f"cvt_tf>{config.get('class_name')}")):
        raise ConversionError(path, f"not a CvT model saved by cvt_tf: holds {holds}")
    inner = config.get("config")
    cvt = inner.get("config") if isinstance(inner, dict) else None
    if not isinstance(cvt, dict):
        raise ConversionError(path, f"its config.json holds no CvT config for {holds}")
    try:
        return CvtConfig.from_dict(cvt)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConversionError(path, f"its config.json holds an invalid CvT config: {_short(exc)}") from None


def load_keras_model_file(path: str):
    """Our Keras model saved in a `.keras` file, after `cvt_core.h5_safety.check_keras_archive` (bounded zip
    members, strict config.json, the weights walked whole) and a check that it holds one of our classes: built
    from the archive's config (`keras.saving.deserialize_keras_object`, `safe_mode=True`), then its weights loaded
    by the model's strict `load_weights`, which walks the archive again before Keras reads it."""
    if not os.path.exists(path):
        raise ConversionError(path, "no such file")
    try:
        with open_regular_file(path, CheckpointError) as fileobj:
            archive = check_keras_archive(path, fileobj=fileobj)
        check_cvt_keras_config(archive.config, path)
        extra = [name for name in archive.members if name not in KERAS_ARCHIVE_MEMBERS]
        if extra:
            raise ConversionError(path, f"holds zip members a CvT .keras file does not (e.g. {extra[0]!r}); it "
                                        f"holds only {', '.join(KERAS_ARCHIVE_MEMBERS)}")
        keras, _, _ = import_keras_models()
        try:
            with no_random_draws(keras):
                model = keras.saving.deserialize_keras_object(archive.config, safe_mode=True)
            model.load_weights(path)
        except (WeightLoadError, CheckpointError):
            raise
        except Exception as exc:
            raise ConversionError(path, f"cannot be loaded as a Keras model: {_short(exc)}") from None
        return model
    except WeightLoadError as exc:
        raise describe(exc, path) from None
    except CheckpointError as exc:
        raise ConversionError(None, one_line(str(exc))) from None


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

