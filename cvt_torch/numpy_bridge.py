"""PyTorch <-> NumPy for weights: the one tensor/array pair, and the one way to build a model holding given weights.

Checkpoints are read and written as NumPy arrays by `cvt_core`; these functions carry them into and out of torch.
bfloat16, which NumPy has only through ml_dtypes (`cvt_core.dtypes`), crosses as its raw 16-bit pattern, so no value
changes on the way. `model_with_weights` serves both `from_pretrained` and the converter (`conversion.models`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from cvt_core.config import CvtConfig
from cvt_core.dtypes import bfloat16_dtype, has_bfloat16, is_bfloat16
from cvt_core.weights import weight_table


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU copy of `tensor` as NumPy, dtype kept. bfloat16 becomes ml_dtypes' bfloat16; without ml_dtypes it
    becomes float32, which holds every bfloat16 value exactly (and can be written where bfloat16 cannot)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype != torch.bfloat16:
        return tensor.numpy()
    if not has_bfloat16():
        return tensor.float().numpy()
    return tensor.view(torch.int16).numpy().view(bfloat16_dtype("a bfloat16 tensor"))


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """`array` as a CPU tensor of the same dtype (bfloat16 included). It shares the array's memory when that is
    C-contiguous and writable, else it is a copy (checkpoint arrays may be read-only views)."""
    value = np.asarray(array, order="C")
    if not value.flags.writeable:  # torch.from_numpy warns on read-only buffers
        value = value.copy()
    if is_bfloat16(value.dtype):
        return torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(value)


def _allocate_uninitialised(model: nn.Module) -> None:
    """Give every parameter and buffer of a model built on the meta device uninitialised CPU memory. (What
    `Module.to_empty` does, without its first-call cost: its meta-to-CPU `empty_like` imports torch's Python
    reference ops, a few tenths of a second, more than the rest of loading cvt-13.)"""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                               requires_grad=param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, torch.empty(buffer.shape, dtype=buffer.dtype))  # stays registered, persistent


def model_with_weights(cls, config: CvtConfig, names: Sequence[str], fetch: Callable[[str], np.ndarray],
                       iterate: Callable[[Iterable[str]], Iterable[str]] = iter):
    """`cls(config)` (a `CvtPreTrainedModel` class) holding `fetch(name)` for each state_dict name in `names`, read
    and copied one at a time (cast to the model's dtype); `iterate` may wrap that loop, e.g. in a progress bar.

    When `names` cover the whole state_dict the model is built on the meta device and allocated without
    initialising it (cvt-13 then loads in about a quarter of the time: the random initialisation was most of it).
    Otherwise it is built and initialised as `cls(config)` always is, so the weights `names` leave out get exactly
    their usual fresh values, and only the named ones are overwritten.
    """
    entries = weight_table(config, cls.with_head)
    table = {e.torch_name(cls.with_head) for e in entries}
    complete = set(names) == table
    if complete:
        with torch.device("meta"):
            model = cls(config)
        _allocate_uninitialised(model)
    else:
        model = cls(config)
    own = model.state_dict()
    if set(own) != table or len(list(model.buffers())) != sum(1 for e in entries if not e.trainable):
        # every parameter and buffer must be in the table, or the meta build would leave one uninitialised
        raise RuntimeError("cvt_torch's state_dict does not match the cvt_core weight table")  # a library bug
    with torch.no_grad():
        for name in iterate(names):
            own[name].copy_(numpy_to_tensor(fetch(name)))
    return model
