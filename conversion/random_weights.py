"""Random but meaningful CvT weights: every tensor distinct, BatchNorm statistics away from 0/1, biases non-zero,
so that a naming, layout or statistics slip shows in the outputs. Used by `cvt demo` and the benchmark."""

from __future__ import annotations

from typing import Dict

import numpy as np

from cvt_core.config import CvtConfig
from cvt_core.weights import weight_table


def random_state(config: CvtConfig, with_head: bool = True, seed: int = 0, dtype=np.float32) -> Dict[str, np.ndarray]:
    """{torch name: PyTorch-layout array} for `config`."""
    rng = np.random.default_rng(seed)
    out: Dict[str, np.ndarray] = {}
    for entry in weight_table(config, with_head):
        shape = entry.shape
        if entry.leaf == "num_batches_tracked":
            value = np.asarray(rng.integers(1, 1000), dtype=np.int64)
        elif entry.leaf == "running_var":
            value = rng.random(shape, dtype=np.float32) * 1.5 + 0.25
        elif entry.leaf in ("running_mean", "bias"):
            value = rng.standard_normal(shape, dtype=np.float32) * 0.1
        elif entry.layer_type in ("layer_norm", "batch_norm"):
            value = 1.0 + rng.standard_normal(shape, dtype=np.float32) * 0.1
        elif entry.leaf == "cls_token":
            value = rng.standard_normal(shape, dtype=np.float32) * 0.5
        else:
            fan_in = max(1, int(np.prod(shape[1:])))
            value = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
        out[entry.torch_name(with_head)] = value if entry.leaf == "num_batches_tracked" else value.astype(dtype)
    return out


def randomize_torch_model_(model, seed: int = 0) -> None:
    """Load `random_state` into a PyTorch CvT, ours or transformers' (their state-dict names are the table's)."""
    import torch

    from cvt_core.config import CvtConfig

    config = model.config if isinstance(model.config, CvtConfig) else CvtConfig.from_dict(model.config.to_dict())
    with_head = any(name.startswith("cvt.") for name in model.state_dict())
    state = random_state(config, with_head, seed)
    model.load_state_dict({name: torch.from_numpy(value) for name, value in state.items()}, strict=True)
