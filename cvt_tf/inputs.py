"""What the Keras models accept: `pixel_values` as a floating-point tensor of a size the config can take, in the
model's data format, or transformers' TF convention of a dict holding it with the other call arguments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict

import keras

from cvt_core.config import CvtConfig
from cvt_core.shapes import check_pixel_values_shape

from .backend import TF

DATA_FORMATS = ("channels_first", "channels_last")
INPUT_KEYS = ("pixel_values", "labels", "output_hidden_states", "output_attentions", "return_dict")


def check_data_format(data_format: str) -> str:
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {list(DATA_FORMATS)}, got {data_format!r}")
    return data_format


def unpack_inputs(pixel_values, **arguments) -> Dict[str, Any]:
    """transformers' TF convention: the first argument may be a dict holding `pixel_values` and any other call
    argument (`labels`, ...); its entries win over the keyword arguments. Returns every argument by name."""
    if isinstance(pixel_values, Mapping):
        inputs = dict(pixel_values)
        unknown = sorted(set(inputs) - set(INPUT_KEYS))
        if unknown or "pixel_values" not in inputs:
            raise ValueError(f"an input dict needs the key 'pixel_values' and may hold {list(INPUT_KEYS[1:])}; "
                             f"got keys {sorted(inputs)}")
        for key, value in inputs.items():
            if key in arguments or key == "pixel_values":
                arguments[key] = value
        pixel_values = inputs["pixel_values"]
    arguments["pixel_values"] = pixel_values
    return arguments


def call_arguments(config: CvtConfig, pixel_values, **arguments) -> Dict[str, Any]:
    """`unpack_inputs`, then the output flags left None (`output_hidden_states`, `output_attentions`, `return_dict`)
    set from the config, as transformers' models read them."""
    arguments = unpack_inputs(pixel_values, **arguments)
    defaults = {"output_hidden_states": config.output_hidden_states, "output_attentions": config.output_attentions,
                "return_dict": config.use_return_dict}
    for name, default in defaults.items():
        arguments[name] = default if arguments.get(name) is None else bool(arguments[name])
    return arguments


def validate_pixel_values(config: CvtConfig, pixel_values, data_format: str) -> None:
    """Refuse non-float dtypes (TypeError) and wrong rank, channels or too small images (ValueError)."""
    dtype = keras.backend.standardize_dtype(pixel_values.dtype)
    if not dtype.startswith(("float", "bfloat")):
        raise TypeError(
            f"pixel_values must be a floating-point tensor (float32, float16, bfloat16 or float64), got dtype "
            f"{dtype}: convert and normalise the images first (e.g. x.astype('float32') / 255, then the "
            f"checkpoint's mean/std)")
    shape = pixel_values.shape
    if TF and not isinstance(shape, tuple):  # a tf.TensorShape, whose rank may be unknown in a graph
        if shape.rank is None:
            return
        shape = shape.as_list()
    check_pixel_values_shape(config, list(shape), channels_last=data_format == "channels_last")
