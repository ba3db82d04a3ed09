"""The one table of CvT weight names, and the layout rules between frameworks.

`weight_table(config)` lists every tensor of a CvT model once, in transformers' PyTorch order. Each entry knows
its module path as transformers names it and as the original microsoft/CvT code names it, the kind of layer it
belongs to, and its PyTorch shape. Every other name is derived from that entry:

- PyTorch (ours and transformers'): `entry.torch_name(with_head)`, e.g. `cvt.encoder.stages.0....weight`.
- Keras (ours): the same canonical name; our Keras layers carry transformers' TF layer names, so the
  variable path is `entry.keras_path()`.
- transformers TF (`tf_model.h5`): `entry.hf_tf_name(with_head, scope)`.
- the original checkpoints: `entry.original_name()`.

Layout: PyTorch conv kernels are (out, in/groups, kh, kw), Keras (kh, kw, in/groups, out); PyTorch dense weights
are (out, in), Keras (in, out), square ones too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .config import CvtConfig

BACKBONE_PREFIX = "cvt."  # transformers' `base_model_prefix`: backbone names inside CvtForImageClassification

# Layer kinds and how each PyTorch leaf name is called in Keras. `None`: no Keras twin (rebuilt on import).
_KERAS_LEAF: Dict[Tuple[str, str], Optional[str]] = {
    ("conv", "weight"): "kernel",
    ("conv", "bias"): "bias",
    ("depthwise_conv", "weight"): "kernel",
    ("dense", "weight"): "kernel",
    ("dense", "bias"): "bias",
    ("layer_norm", "weight"): "gamma",
    ("layer_norm", "bias"): "beta",
    ("batch_norm", "weight"): "gamma",
    ("batch_norm", "bias"): "beta",
    ("batch_norm", "running_mean"): "moving_mean",
    ("batch_norm", "running_var"): "moving_variance",
    ("batch_norm", "num_batches_tracked"): None,
    ("parameter", "cls_token"): "cls_token",
}


@dataclass(frozen=True)
class WeightEntry:
    """One tensor of the model. See the module docstring for the names derived from it."""

    module: Tuple[str, ...]  # transformers module path, relative to the backbone (or to the classifier for the head)
    original_module: Tuple[str, ...]  # the same module in microsoft/CvT's code
    layer_type: str  # conv | depthwise_conv | dense | layer_norm | batch_norm | parameter
    leaf: str  # PyTorch attribute: weight | bias | running_mean | running_var | num_batches_tracked | cls_token
    shape: Tuple[int, ...]  # PyTorch layout
    in_head: bool = False  # final LayerNorm and classifier of CvtForImageClassification
    stage: Optional[int] = None

    # ---------------------------------------------------------------- names
    @property
    def name(self) -> str:
        """Canonical name: transformers' PyTorch name inside the model that owns the entry (no `cvt.` prefix)."""
        return ".".join(self.module + (self.leaf,))

    def torch_name(self, with_head: bool = True) -> str:
        """State-dict key in our PyTorch model and in transformers' (`with_head`: the classifier model)."""
        return (BACKBONE_PREFIX + self.name) if (with_head and not self.in_head) else self.name

    @property
    def keras_leaf(self) -> Optional[str]:
        return _KERAS_LEAF[(self.layer_type, self.leaf)]

    @property
    def has_keras_twin(self) -> bool:
        return self.keras_leaf is not None

    @property
    def trainable(self) -> bool:
        return self.leaf not in ("running_mean", "running_var", "num_batches_tracked")

    def keras_path(self) -> str:
        """Path of the Keras variable below the model: transformers' TF name without scope and `:0`."""
        if self.layer_type == "parameter":
            # transformers names the cls token variable with dots, outside any layer scope.
            return BACKBONE_PREFIX + self.name
        parts = (("cvt",) if not self.in_head else ()) + self.module + (self.keras_leaf,)
        return "/".join(parts)

    def hf_tf_name(self, scope: str = "tf_cvt_for_image_classification") -> str:
        """Variable name in transformers' TF model (and in its `tf_model.h5`), `:0` included."""
        if self.layer_type == "parameter":
            return self.keras_path() + ":0"
        return f"{scope}/{self.keras_path()}:0"

    def original_name(self) -> str:
        """Key in microsoft/CvT's checkpoints (`stage2.blocks.0.attn.proj_q.weight`, `head.bias`, ...)."""
        return ".".join(self.original_module + (self.leaf,))

    # ---------------------------------------------------------------- layouts
    @property
    def keras_shape(self) -> Tuple[int, ...]:
        axes = self._to_keras_axes
        return self.shape if axes is None else tuple(self.shape[a] for a in axes)

    @property
    def _to_keras_axes(self) -> Optional[Tuple[int, ...]]:
        if self.leaf != "weight":
            return None
        if self.layer_type in ("conv", "depthwise_conv"):
            return (2, 3, 1, 0)
        if self.layer_type == "dense":
            return (1, 0)
        return None

    def to_keras(self, array: np.ndarray) -> np.ndarray:
        """PyTorch layout -> Keras layout (a view where possible)."""
        axes = self._to_keras_axes
        return array if axes is None else np.transpose(array, axes)

    def from_keras(self, array: np.ndarray) -> np.ndarray:
        """Keras layout -> PyTorch layout."""
        axes = self._to_keras_axes
        return array if axes is None else np.transpose(array, np.argsort(axes))


def _linear(module, original, c_out, c_in, bias, stage=None, in_head=False) -> List[WeightEntry]:
    entries = [WeightEntry(module, original, "dense", "weight", (c_out, c_in), in_head, stage)]
    if bias:
        entries.append(WeightEntry(module, original, "dense", "bias", (c_out,), in_head, stage))
    return entries


def _layer_norm(module, original, c, stage=None, in_head=False) -> List[WeightEntry]:
    return [WeightEntry(module, original, "layer_norm", leaf, (c,), in_head, stage) for leaf in ("weight", "bias")]


def _batch_norm(module, original, c, stage) -> List[WeightEntry]:
    leaves = [("weight", (c,)), ("bias", (c,)), ("running_mean", (c,)), ("running_var", (c,)), ("num_batches_tracked", ())]
    return [WeightEntry(module, original, "batch_norm", leaf, shape, False, stage) for leaf, shape in leaves]


def weight_table(config: CvtConfig, with_head: bool = True) -> List[WeightEntry]:
    """Every tensor of `CvtModel` (or, `with_head`, of `CvtForImageClassification`) in transformers' order."""
    entries: List[WeightEntry] = []
    for s in range(config.num_stages):
        c, c_in, k = config.embed_dim[s], config.stage_in_channels(s), config.patch_sizes[s]
        stage, orig_stage = ("encoder", f"stages.{s}"), (f"stage{s}",)
        emb = stage + ("embedding", "convolution_embeddings")
        if config.cls_token[s]:
            # Sized by the stage's own width (transformers uses the last stage's width for every stage).
            entries.append(WeightEntry(stage, orig_stage, "parameter", "cls_token", (1, 1, c), False, s))
        entries += [
            WeightEntry(emb + ("projection",), orig_stage + ("patch_embed", "proj"), "conv", "weight", (c, c_in, k, k), False, s),
            WeightEntry(emb + ("projection",), orig_stage + ("patch_embed", "proj"), "conv", "bias", (c,), False, s),
        ]
        entries += _layer_norm(emb + ("normalization",), orig_stage + ("patch_embed", "norm"), c, s)
        for j in range(config.depth[s]):
            layer, orig_block = stage + (f"layers.{j}",), orig_stage + (f"blocks.{j}",)
            attn, orig_attn = layer + ("attention", "attention"), orig_block + ("attn",)
            if config.qkv_projection_method[s] == "dw_bn":
                kq = config.kernel_qkv[s]
                for role, short in (("query", "q"), ("key", "k"), ("value", "v")):
                    proj = attn + (f"convolution_projection_{role}", "convolution_projection")
                    orig_proj = orig_attn + (f"conv_proj_{short}",)
                    entries.append(WeightEntry(proj + ("convolution",), orig_proj + ("conv",), "depthwise_conv", "weight", (c, 1, kq, kq), False, s))
                    entries += _batch_norm(proj + ("normalization",), orig_proj + ("bn",), c, s)
            for role, short in (("query", "q"), ("key", "k"), ("value", "v")):
                entries += _linear(attn + (f"projection_{role}",), orig_attn + (f"proj_{short}",), c, c, config.qkv_bias[s], s)
            entries += _linear(layer + ("attention", "output", "dense"), orig_attn + ("proj",), c, c, True, s)
            hidden = config.mlp_hidden_dim(s)
            entries += _linear(layer + ("intermediate", "dense"), orig_block + ("mlp", "fc1"), hidden, c, True, s)
            entries += _linear(layer + ("output", "dense"), orig_block + ("mlp", "fc2"), c, hidden, True, s)
            entries += _layer_norm(layer + ("layernorm_before",), orig_block + ("norm1",), c, s)
            entries += _layer_norm(layer + ("layernorm_after",), orig_block + ("norm2",), c, s)
    if with_head:
        entries += _layer_norm(("layernorm",), ("norm",), config.hidden_size, in_head=True)
        if config.num_labels > 0:
            entries += _linear(("classifier",), ("head",), config.num_labels, config.hidden_size, True, in_head=True)
    return entries


def count_parameters(config: CvtConfig, with_head: bool = True) -> int:
    """Trainable parameters (BatchNorm statistics excluded), e.g. 19,997,480 for cvt-13 with 1000 labels."""
    return sum(int(np.prod(e.shape)) for e in weight_table(config, with_head) if e.trainable)


# ------------------------------------------------------------------------------------------------ loading plans
class WeightLoadError(ValueError):
    """A checkpoint does not fit the model: lists missing, unexpected and mis-shaped weights."""

    def __init__(self, source: str, missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[Tuple[str, tuple, tuple]]):
        self.source, self.missing, self.unexpected, self.mismatched = source, list(missing), list(unexpected), list(mismatched)
        lines = [f"{source}: the checkpoint does not match the model's config"]

        def _block(title: str, items: List[str]) -> None:
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {item}" for item in shown)

        _block("missing weights", self.missing)
        _block("unexpected weights", self.unexpected)
        _block("mis-shaped weights (name: checkpoint shape vs model shape)",
               [f"{name}: {tuple(got)} vs {tuple(want)}" for name, want, got in self.mismatched])
        lines.append("Check that config.json belongs to these weights, or pass strict=False / "
                     "ignore_mismatched_sizes=True to re-initialise what does not fit.")
        super().__init__("\n".join(lines))


@dataclass
class LoadPlan:
    """How a checkpoint's tensors map onto a model's weight table."""

    assignments: Dict[str, str]  # canonical torch_name in the target -> key in the checkpoint
    missing: List[str]
    unexpected: List[str]
    mismatched: List[Tuple[str, tuple, tuple]]  # (target name, model shape, checkpoint shape)
    fresh_head: List[str]  # head weights absent from a backbone-only checkpoint: initialised, not loaded

    def check(self, source: str, strict: bool = True, ignore_mismatched_sizes: bool = False) -> None:
        problems_missing = self.missing if strict else []
        problems_unexpected = self.unexpected if strict else []
        problems_mismatched = [] if ignore_mismatched_sizes else self.mismatched
        if problems_missing or problems_unexpected or problems_mismatched:
            raise WeightLoadError(source, problems_missing, problems_unexpected, problems_mismatched)


def plan_load(config: CvtConfig, with_head: bool, checkpoint_shapes: Mapping[str, Sequence[int]]) -> LoadPlan:
    """Match checkpoint keys (transformers PyTorch names, classifier or bare model) against the model's table.

    A classifier checkpoint loads into a bare model (its head is ignored, as in transformers); a bare checkpoint
    loads into a classifier with a freshly initialised head (reported in `fresh_head`). `num_batches_tracked`
    may be absent (older checkpoints); it then starts at 0.
    """
    keys = set(checkpoint_shapes)
    source_has_prefix = any(k.startswith(BACKBONE_PREFIX) for k in keys)
    assignments: Dict[str, str] = {}
    missing: List[str] = []
    mismatched: List[Tuple[str, tuple, tuple]] = []
    fresh_head: List[str] = []
    used = set()
    for entry in weight_table(config, with_head):
        target = entry.torch_name(with_head)
        source_key = (BACKBONE_PREFIX + entry.name) if (source_has_prefix and not entry.in_head) else entry.name
        if source_key not in keys:
            if entry.leaf == "num_batches_tracked":
                continue
            if entry.in_head and not source_has_prefix:
                fresh_head.append(target)
                continue
            missing.append(target)
            continue
        used.add(source_key)
        got = tuple(int(d) for d in checkpoint_shapes[source_key])
        if got != tuple(entry.shape):
            mismatched.append((target, tuple(entry.shape), got))
            continue
        assignments[target] = source_key
    unexpected = sorted(keys - used)
    if not with_head and source_has_prefix:
        # transformers' classifier head is expected extra baggage when loading into the bare model.
        unexpected = [k for k in unexpected if k.startswith(BACKBONE_PREFIX)]
    return LoadPlan(assignments, missing, unexpected, mismatched, fresh_head)

