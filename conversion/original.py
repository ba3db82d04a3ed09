"""The original microsoft/CvT checkpoints (`CvT-13-224x224-IN-1k.pth`, ...): flat state dicts in the original
naming (`stage2.blocks.0.attn.conv_proj_q.bn.running_var`, `head.weight`), sometimes under `state_dict`.

They carry no config: it comes from `--config` (a preset or a config.json). The original code evaluates with
QuickGELU, so an imported config gets `hidden_act="quick_gelu"` (override with `--hidden-act`). With a preset,
the number of labels is taken from the `head.weight` shape. Names come from `WeightEntry.original_name()`.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from cvt_core.config import PRESETS, CvtConfig
from cvt_core.tensor_file import LazyTensors
from cvt_core.weights import weight_table

from .errors import ConversionError
from .state import CanonicalState, make_state

ORIGINAL_ACTIVATION = "quick_gelu"
HEAD_WEIGHT = "head.weight"


def strip_wrapper_prefix(keys: Sequence[str]) -> str:
    """`module.` (DataParallel) when every key has it, else ''."""
    keys = list(keys)
    if keys and all(k.startswith("module.") for k in keys):
        return "module."
    return ""


def looks_original(keys: Sequence[str]) -> bool:
    """Whether the names are microsoft/CvT's (`stage0.patch_embed.proj.weight`, ...)."""
    prefix = strip_wrapper_prefix(keys)
    return any(k[len(prefix):].startswith("stage0.patch_embed.") for k in keys)


def num_labels_of(shapes: Mapping[str, Sequence[int]]) -> Optional[int]:
    prefix = strip_wrapper_prefix(list(shapes))
    shape = shapes.get(prefix + HEAD_WEIGHT)
    if shape is not None and len(shape) == 2:
        return int(shape[0])
    if prefix + "norm.weight" in shapes:
        return 0  # a norm without a classifier: the original built with num_classes=0
    return None


def guess_presets(shapes: Mapping[str, Sequence[int]]) -> list:
    """Preset names whose weight table matches these original-named shapes exactly (for error messages)."""
    prefix = strip_wrapper_prefix(list(shapes))
    plain = {k[len(prefix):]: tuple(v) for k, v in shapes.items()}
    labels = num_labels_of(shapes)
    found = []
    for name in PRESETS:
        config = CvtConfig.from_preset(name, num_labels=labels if labels is not None else 1000)
        table = {e.original_name(): tuple(e.shape) for e in weight_table(config, True)}
        required = {k: v for k, v in table.items() if not k.endswith("num_batches_tracked")}
        if all(plain.get(k) == v for k, v in required.items()) and set(plain) <= set(table):
            found.append(name)
    return found


def original_config(config: CvtConfig, shapes: Mapping[str, Sequence[int]], from_preset: bool,
                    hidden_act: Optional[str]) -> CvtConfig:
    """The config an original checkpoint is imported with: QuickGELU (unless overridden), labels from the head."""
    overrides = {"hidden_act": hidden_act or ORIGINAL_ACTIVATION}
    labels = num_labels_of(shapes)
    if from_preset and labels is not None and labels != config.num_labels:
        overrides["num_labels"] = labels
    return config.copy(**overrides)


def read_original(path: str, tensors: LazyTensors, config: CvtConfig) -> CanonicalState:
    """Wrap an original-named state dict (opened by cvt_core's reader) as a canonical state for `config`."""
    prefix = strip_wrapper_prefix(list(tensors))
    by_original = {e.original_name(): e for e in weight_table(config, True)}
    renamed: Dict[str, str] = {}  # torch name (or the original key when unknown) -> key in `tensors`
    for key in tensors:
        entry = by_original.get(key[len(prefix):])
        name = entry.torch_name(True) if entry is not None else key
        if name in renamed:
            tensors.close()
            raise ConversionError(path, f"weight {key} appears twice")
        renamed[name] = key
    return make_state(config, tensors.renamed(renamed), path, "original", "torch", with_head=True)


def to_original_names(state_dict: Mapping[str, np.ndarray], config: CvtConfig, with_head: bool = True) -> Dict[str, np.ndarray]:
    """A transformers-named state dict renamed to the original naming (used to build test checkpoints)."""
    out = {}
    for entry in weight_table(config, with_head):
        key = entry.torch_name(with_head)
        if key in state_dict:
            out[entry.original_name()] = state_dict[key]
    return out
