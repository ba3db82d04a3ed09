"""The TensorFlow artifacts of `cvt export`: `saved_model/` and `model.tflite`, written from our Keras
`TFCvtForImageClassification`, and run back with `tf.saved_model.load` and the TFLite interpreter.

Both serve the model's `serving_outputs`: `pixel_values` (N, C, H, W) float32 in, `{"logits": float32}` out,
whatever the model's dtype policy (under `mixed_bfloat16` the model casts the input to bfloat16 itself and the
logits are cast back). The SavedModel is the model's own `export` and keeps batch, height and width unknown; the
TFLite file (the model's own `export(format="litert")`) fixes height and width (the converter's kernels need them),
keeps the batch dynamic and uses TFLite's built-in operators only.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Callable, Iterator

import numpy as np

from .models import _native_stderr_silenced, build_keras_model, import_keras_models
from .state import CanonicalState

SERVING_SIGNATURE = "serving_default"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
KERAS_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy set to `name` while models are built in this block (restored after)."""
    keras = import_keras_models()[0]
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_served_model(state: CanonicalState, dtype: str):
    """Our Keras classifier holding the state's weights, computing in `dtype` (bfloat16: `mixed_bfloat16`, float32
    variables)."""
    with dtype_policy(KERAS_POLICIES[dtype]):
        return build_keras_model(state, desc="loading Keras model")


def _tf():
    import_keras_models()  # sets the Keras backend and quiets TensorFlow's import first
    import tensorflow as tf

    return tf


def write_saved_model(model, path: str) -> str:
    """`saved_model/` through the model's own `export` (float32 `pixel_values` of any size in, float32 logits out)."""
    model.export(path, verbose=False)
    return path


def open_saved_model(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """`saved_model/` loaded with tf.saved_model.load, its serving signature: pixels -> logits."""
    tf = _tf()
    serve = tf.saved_model.load(path).signatures[SERVING_SIGNATURE]
    return lambda pixels: serve(**{INPUT_NAME: tf.constant(pixels)})[OUTPUT_NAME].numpy()


@contextlib.contextmanager
def _converter_notices_silenced() -> Iterator[None]:
    """The TFLite converter and interpreter log deprecation notices (through absl and warnings) about their own
    API, not about the model."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def write_tflite(model, path: str, height: int, width: int) -> str:
    """`model.tflite` for height x width images and any batch, through the model's own LiteRT export (built-in
    operators only, the weights frozen in)."""
    with _converter_notices_silenced():
        model.export(path, format="litert", verbose=False,
                     input_signature=model.serving_input_signature(height, width))
    return path


def open_tflite(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """`model.tflite` in TensorFlow's TFLite interpreter (its default XNNPACK delegate): pixels -> logits, the input
    resized to each batch."""
    tf = _tf()
    with _converter_notices_silenced(), _native_stderr_silenced():  # "Created TensorFlow Lite XNNPACK delegate"
        interpreter = tf.lite.Interpreter(model_path=path)
    source, = interpreter.get_input_details()
    result, = interpreter.get_output_details()

    def run(pixels: np.ndarray) -> np.ndarray:
        with _native_stderr_silenced():
            interpreter.resize_tensor_input(source["index"], pixels.shape)
            interpreter.allocate_tensors()
            interpreter.set_tensor(source["index"], pixels)
            interpreter.invoke()
        return interpreter.get_tensor(result["index"])
    return run


def tflite_input_shape(path: str):
    """The input's shape signature in the TFLite file (-1 for a dynamic axis)."""
    tf = _tf()
    with _converter_notices_silenced():
        interpreter = tf.lite.Interpreter(model_path=path)
    return [int(d) for d in interpreter.get_input_details()[0]["shape_signature"]]

