"""The TensorFlow artifacts of `cvt export`: `saved_model/` and `model.tflite`, written from our Keras models, and run
back with `tf.saved_model.load` and the TFLite interpreter.

Both serve `serving_outputs`: `pixel_values` float32 in (the model's data format; NCHW for the models `cvt export`
builds), the output container's tensors out by name (`{"logits": float32}` for the classifier), floating ones in
float32 whatever the model's dtype policy (under `mixed_bfloat16` the model casts the input to bfloat16 itself and
the logits are cast back).

- `write_saved_model`: batch, height and width unknown by default; the endpoint `serve` (signature
  `serving_default`), written from a `tf.Module` holding the model, so each variable is stored once (Keras'
  ExportArchive, as of 3.15, stores every variable twice, once per wrapper).
- `write_tflite`: height and width fixed (the converter's kernels need them; default the config's image size),
  batch dynamic, the variables frozen into constants and TFLite's built-in operators only, so the plain interpreter
  runs it (Keras' own LiteRT export keeps variables).

TensorFlow backend only (`cvt_tf.backend.tensorflow` names the backend otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Callable, Dict, Iterator, Optional

import numpy as np

from cvt_core.atomic import atomic_write
from cvt_core.shapes import default_input_size

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


def tensorflow(feature: str):
    """TensorFlow, for `feature`, under Keras' TensorFlow backend (else one RuntimeError naming it)."""
    import_keras_models()
    from cvt_tf.backend import tensorflow as backend_tensorflow

    return backend_tensorflow(feature)


def serving_input_signature(model, height: Optional[int] = None, width: Optional[int] = None):
    """The `tf.TensorSpec` of `pixel_values` the artifacts serve: float32 of any batch, in the model's data format,
    of any height and width (None) or of the given ones."""
    tf = tensorflow("a SavedModel or LiteRT export")
    channels = model.config.num_channels
    shape = ((None, channels, height, width) if model.data_format == "channels_first"
             else (None, height, width, channels))
    return tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)


def serving_outputs(model, pixel_values) -> Dict[str, object]:
    """What the artifacts return: the output container's tensors by name, floating ones in float32 whatever the
    dtype policy."""
    import keras

    outputs = model(pixel_values, training=False, return_dict=True)
    return {name: keras.ops.cast(value, "float32") if _is_floating(value) else value
            for name, value in outputs.items() if keras.ops.is_tensor(value)}


def _is_floating(tensor) -> bool:
    import keras

    return keras.backend.standardize_dtype(tensor.dtype).startswith(("float", "bfloat"))


def write_saved_model(model, path: str, input_signature=None) -> str:
    """`saved_model/` serving `serving_outputs` (float32 `pixel_values` of any size in, float32 logits out unless
    `input_signature`, a `tf.TensorSpec`, says otherwise)."""
    tf = tensorflow("a SavedModel export")
    if not model.built:
        model.build_with_dummy_input()
    spec = input_signature if input_signature is not None else serving_input_signature(model)
    serving = tf.Module(name="cvt_serving")
    serving.model = model
    serving.serve = tf.function(lambda pixel_values: serving_outputs(model, pixel_values), input_signature=[spec])
    tf.saved_model.save(serving, os.fspath(path), signatures={SERVING_SIGNATURE: serving.serve})
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


def write_tflite(model, path: str, height: Optional[int] = None, width: Optional[int] = None) -> str:
    """`model.tflite` for height x width images (default: the config's image size) and any batch, serving
    `serving_outputs` with the variables frozen into constants, TFLite's built-in operators only."""
    tf = tensorflow("a LiteRT export")
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    if not model.built:
        model.build_with_dummy_input()
    if height is None or width is None:
        height, width = default_input_size(model.config)
    spec = serving_input_signature(model, height, width)
    concrete = tf.function(lambda pixel_values: serving_outputs(model, pixel_values)).get_concrete_function(spec)
    with _converter_notices_silenced():
        converter = tf.lite.TFLiteConverter.from_concrete_functions([convert_variables_to_constants_v2(concrete)])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        flatbuffer = converter.convert()
    with atomic_write(os.fspath(path)) as tmp:
        with open(tmp, "wb") as f:
            f.write(flatbuffer)
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

