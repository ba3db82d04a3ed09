"""Our two models built from a canonical state, and run the same way for the cross-check.

The frameworks are imported only here and only when needed: converting between the transformers formats needs
neither, the cross-check needs the source's framework and the targets'. Weights are copied tensor by tensor, so a
model costs its own size and no second copy of the checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import Dict, Optional

import numpy as np

from cvt_core.config import CvtConfig

from .errors import ConversionError
from .progress import progress
from .state import CanonicalState


def _import_torch_models():
    try:
        import torch

        from cvt_torch import CvtForImageClassification, CvtModel
        from cvt_torch.numpy_bridge import model_with_weights
    except ImportError as exc:
        raise ConversionError(None, f"the PyTorch side needs torch and cvt_torch ({exc}); pip install 'cvt-dual[torch]'") from None
    return torch, CvtModel, CvtForImageClassification, model_with_weights


@contextlib.contextmanager
def _native_stderr_silenced():
    """Hide what TensorFlow's C++ side prints on import (absl/oneDNN/CUDA notices written straight to fd 2, which
    TF_CPP_MIN_LOG_LEVEL does not reach). Python exceptions are unaffected."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (e.g. captured by a test runner)
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_keras_models():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        if "keras" in sys.modules and "cvt_tf" in sys.modules:
            import keras

            from cvt_tf import TFCvtForImageClassification, TFCvtModel
        else:
            with _native_stderr_silenced():
                import keras

                from cvt_tf import TFCvtForImageClassification, TFCvtModel

                keras.ops.zeros(())  # the first operation probes for GPUs, which logs a CUDA error on a CPU machine
    except ImportError as exc:
        raise ConversionError(None, f"the Keras side needs Keras 3 and its backend (TensorFlow unless KERAS_BACKEND "
                                    f"says otherwise) ({exc}); pip install 'cvt-dual[tf]'") from None
    return keras, TFCvtModel, TFCvtForImageClassification


# ------------------------------------------------------------------------------------------------ PyTorch
def build_torch_model(state: CanonicalState, desc: str = "loading PyTorch model"):
    """Our `CvtModel` / `CvtForImageClassification` holding the state's weights (float32), in eval mode. Built on the
    meta device and allocated without initialising (`model_with_weights`): every tensor is overwritten."""
    _, CvtModel, CvtForImageClassification, model_with_weights = _import_torch_models()
    cls = CvtForImageClassification if state.with_head else CvtModel
    by_name = {state.name(entry): entry for entry in state.entries()}
    model = model_with_weights(cls, state.config, list(by_name), lambda name: state.array(by_name[name]),
                               iterate=lambda names: progress(names, desc=desc, total=len(names)))
    return model.eval()


def run_torch(model, pixel_values: np.ndarray) -> Dict[str, np.ndarray]:
    torch = _import_torch_models()[0]
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(pixel_values, order="C")), output_hidden_states=True)
    return _collect(out, lambda t: t.detach().cpu().float().numpy())


# ------------------------------------------------------------------------------------------------ Keras
def no_random_draws(keras):
    """While building a model whose every variable is overwritten right after, its kernels start at zero
    (`cvt_tf.layers.random_initialization_skipped`): drawing 277M truncated-normal numbers costs seconds for
    nothing. (`keras`: the module `import_keras_models` returned, so cvt_tf is imported.)"""
    from cvt_tf.layers import random_initialization_skipped

    return random_initialization_skipped()


def new_keras_model(config: CvtConfig, with_head: bool, initialize: bool = False):
    """Our Keras model, built. `initialize=False`: the caller overwrites every variable, skip the random draws."""
    keras, TFCvtModel, TFCvtForImageClassification = import_keras_models()
    cls = TFCvtForImageClassification if with_head else TFCvtModel
    with (contextlib.nullcontext() if initialize else no_random_draws(keras)):
        model = cls(config, data_format="channels_first")  # the converter speaks NCHW, as transformers
        model.build_with_dummy_input()
    return model


def build_keras_model(state: CanonicalState, desc: str = "loading Keras model"):
    """Our `TFCvtModel` / `TFCvtForImageClassification` (float32 variables) holding the state's weights."""
    model = new_keras_model(state.config, state.with_head)
    assign_keras_weights(model, state, desc)
    return model


def assign_keras_weights(model, state: CanonicalState, desc: str = "loading Keras model") -> None:
    variables = model.canonical_weights()
    entries = [e for e in state.entries() if e.has_keras_twin]
    if set(variables) != {e.torch_name(state.with_head) for e in entries}:
        raise RuntimeError("cvt_tf's canonical_weights() does not match the cvt_core weight table")  # a library bug
    import keras

    tf = None
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

    for entry in progress(entries, desc=desc, total=len(entries)):
        variable = variables[entry.torch_name(state.with_head)]
        value = np.asarray(state.keras_array(entry), dtype=variable.dtype, order="C")
        if tf is None:  # JAX and PyTorch copy the array into the variable
            variable.assign(value)
            continue
        # TensorFlow may wrap a NumPy array's memory instead of copying it, and assign then adopts that buffer as the
        # variable's, returning the variable's old buffer to its oneDNN pool, which keeps it: up to one model size
        # of extra resident memory, depending on how the arrays happen to be aligned. A DeepCopy gives the value a
        # buffer from that pool, which the pool then reuses tensor by tensor. (Not x * 1: TensorFlow flushes
        # subnormal numbers to zero in arithmetic, and the copy must be bit-exact.)
        tensor = tf.raw_ops.DeepCopy(x=tf.convert_to_tensor(value))
        variable.assign(tensor)
        del tensor, value


def run_keras(model, pixel_values: np.ndarray) -> Dict[str, np.ndarray]:
    out = model(np.asarray(pixel_values, order="C"), output_hidden_states=True, training=False)
    return _collect(out, lambda t: np.asarray(t, dtype=np.float32))


# ------------------------------------------------------------------------------------------------ shared
def _collect(out, to_numpy) -> Dict[str, np.ndarray]:
    """logits, cls_token_value and hidden_states.{i} of a model output, as float32 NumPy."""
    result: Dict[str, np.ndarray] = {}
    logits = getattr(out, "logits", None)
    if logits is not None:
        result["logits"] = to_numpy(logits)
    cls_token = getattr(out, "cls_token_value", None)
    if cls_token is not None:
        result["cls_token_value"] = to_numpy(cls_token)
    for i, hidden in enumerate(getattr(out, "hidden_states", None) or ()):
        result[f"hidden_states.{i}"] = to_numpy(hidden)
    return result


def build_model(state: CanonicalState, framework: Optional[str] = None, desc: Optional[str] = None):
    framework = framework or state.framework
    if framework == "torch":
        return build_torch_model(state, desc or "loading PyTorch model")
    return build_keras_model(state, desc or "loading Keras model")


def run_model(model, framework: str, pixel_values: np.ndarray) -> Dict[str, np.ndarray]:
    """The outputs on `pixel_values`. Keras computes one image at a time and the results are stacked: the
    activations then stay small beside a big model's weights (its memory pool keeps whatever it once held, and the
    Keras side runs last, at the peak); PyTorch, whose freed memory goes back, takes the batch in one call."""
    if framework == "torch":
        return run_torch(model, pixel_values)
    parts = [run_keras(model, pixel_values[i:i + 1]) for i in range(pixel_values.shape[0])]
    return {key: np.concatenate([p[key] for p in parts], axis=0) for key in parts[0]}


GC_THRESHOLD_BYTES = 64 * 2**20


def release(nbytes: int = GC_THRESHOLD_BYTES) -> None:
    """Give a dropped model's memory back before the next one is built. Keras models hold reference cycles, so a
    big one needs a garbage collection (which costs about half a second with TensorFlow loaded: skipped for small
    models)."""
    if nbytes >= GC_THRESHOLD_BYTES:
        gc.collect()
        _malloc_trim()


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: a released model's tensors would still
    count in the process's resident memory while the next model is built)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
