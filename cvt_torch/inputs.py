"""What the PyTorch models accept as `pixel_values`: a floating-point NCHW tensor of a size the config can take,
refused in one line otherwise, and cast to the model's dtype (except under autocast)."""

from __future__ import annotations

import torch
from torch import nn

from cvt_core.config import CvtConfig
from cvt_core.shapes import check_pixel_values_shape


def check_pixel_values(config: CvtConfig, pixel_values) -> None:
    """TypeError for anything but a float tensor, ValueError for a 3-D tensor or a shape the config cannot take
    (`cvt_core.shapes.check_pixel_values_shape`); nothing to check under torch.fx, and no shapes under tracing."""
    if isinstance(pixel_values, torch.fx.Proxy):
        return  # torch.fx.symbolic_trace: no values, dtype or shape to check
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; convert it with "
            f"torch.as_tensor(...), as float and normalised (e.g. ImageNet mean/std)")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values has dtype {pixel_values.dtype}, but the model needs floating-point input: convert it to "
            f"float (e.g. pixel_values.float() / 255) and normalise it as the model was trained (e.g. ImageNet mean/std)")
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return  # shapes may be symbolic here; the eager call has checked them
    if pixel_values.ndim == 3:
        raise ValueError(
            f"pixel_values must be 4-D (batch, channels, height, width), got a 3-D tensor of shape "
            f"{tuple(pixel_values.shape)}; for a single image add the batch axis with pixel_values.unsqueeze(0)")
    check_pixel_values_shape(config, tuple(int(d) for d in pixel_values.shape))


def cast_to_model_dtype(pixel_values: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """`pixel_values` in the dtype of the model's first convolution (float32 pixels into a bfloat16 model), as
    they are under autocast, which casts per op."""
    if isinstance(pixel_values, torch.fx.Proxy):
        return pixel_values  # torch.fx.symbolic_trace: the dtype is not known
    weight = model.encoder.stages[0].embedding.convolution_embeddings.projection.weight
    if pixel_values.dtype != weight.dtype and not torch.is_autocast_enabled(pixel_values.device.type):
        return pixel_values.to(weight.dtype)
    return pixel_values
