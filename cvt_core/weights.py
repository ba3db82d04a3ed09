"""The one table of CvT weight names, and the layout rules between frameworks.

`weight_table(config)` lists every tensor of a CvT model once, in transformers' PyTorch order. Each entry knows
its module path as transformers names it and as the original microsoft/CvT code names it, the kind of layer it
belongs to, and its PyTorch shape. Every other name is derived from that entry:

- PyTorch (ours and transformers'): `entry.torch_name(with_head)`, e.g. `cvt.encoder.stages.0....weight`.
- transformers TF (`tf_model.h5`): `entry.hf_tf_name(scope)`, the variable path `entry.keras_path()`.
- Keras (ours): our Keras layers carry transformers' TF layer names with "_" for "." (Keras' torch backend
  refuses dots in parameter names), so the variable path is `entry.keras_variable_path()`.
- the original checkpoints: `entry.original_name()`.

Layout: PyTorch conv kernels are (out, in/groups, kh, kw), Keras (kh, kw, in/groups, out); PyTorch dense weights
are (out, in), Keras (in, out), square ones too.

Loading (`plan_load`, `LoadPlan`, `WeightLoadError`) is strict everywhere: both frameworks' `from_pretrained` and the
converter (`conversion.state`) refuse missing, unexpected and mis-shaped weights, and apply one rule to what a
tensor may hold:

- dtype (`dtype_problem`): a weight is float16, bfloat16, float32 or float64; `num_batches_tracked` an integer.
  Complex, bool, integer-for-float, other floats (float8, float128), object and string tensors are refused, never
  cast, whatever `strict` says; they are listed in `WeightLoadError.bad_dtype` (name and dtype).
- values (`value_problem`): every float weight is checked as it is loaded (one min and one max per tensor): NaN or
  Inf, or a value beyond the dtype the model holds it in (float32; the `--dtype` of a conversion), is a one-line
  refusal naming the tensor and the count (`NonFiniteWeightError` in `from_pretrained`).
- a classifier checkpoint loaded into the bare model drops its head (`layernorm.*`, `classifier.*`, as transformers
  does) and nothing else: any other tensor the bare model lacks is unexpected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .config import CvtConfig
from .errors import CheckpointError

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
        """Path of the variable below transformers' TF model: its TF name without scope and `:0`."""
        if self.layer_type == "parameter":
            # transformers names the cls token variable with dots, outside any layer scope.
            return BACKBONE_PREFIX + self.name
        parts = (("cvt",) if not self.in_head else ()) + self.module + (self.keras_leaf,)
        return "/".join(parts)

    def keras_variable_path(self) -> str:
        """Path of the variable below our Keras model (`cvt_tf`): `keras_path()` with "_" for "." and the cls
        token inside its stage (`cvt/encoder/stages_0/cls_token`)."""
        parts = (("cvt",) if not self.in_head else ()) + self.module + (self.keras_leaf,)
        return "/".join(part.replace(".", "_") for part in parts)

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


# ------------------------------------------------------------------------------------------------ weight values
# The one rule on what a checkpoint tensor may hold, applied by every loader: both frameworks' `from_pretrained`
# (through `LoadPlan.check_dtypes` and `check_weight_value`) and the converter (`conversion.state`).
FLOAT_WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64")  # what a weight may be stored as
COUNTER_LEAF = "num_batches_tracked"  # BatchNorm's batch counter: an integer (any width, signed or not)
FLOAT_WEIGHT_RULE = "a weight is float16, bfloat16, float32 or float64; num_batches_tracked an integer"


def dtype_label(dtype) -> str:
    """A dtype's name as messages show it (`complex64`, `bool`, `object`, `bfloat16`)."""
    return np.dtype(dtype).name


def dtype_problem(name: str, dtype) -> Optional[str]:
    """None when a checkpoint tensor of `dtype` may fill the weight `name` (a state-dict name or just its leaf);
    else what is wrong, e.g. `complex64, expected a floating-point weight`.

    Floating-point weights must be stored as one of FLOAT_WEIGHT_DTYPES, `num_batches_tracked` as an integer.
    Everything else (complex, whose imaginary part a cast would drop; bool; integers where a float is expected;
    float8 and other exotic floats; object or string arrays) is refused, never cast."""
    dtype = np.dtype(dtype)
    if name.rsplit(".", 1)[-1] == COUNTER_LEAF:
        return None if dtype.kind in "iu" else f"{dtype_label(dtype)}, expected an integer counter"
    if dtype.name in FLOAT_WEIGHT_DTYPES:
        return None
    return f"{dtype_label(dtype)}, expected a floating-point weight (float16, bfloat16, float32 or float64)"


def value_problem(array: np.ndarray, into=np.float32) -> Optional[str]:
    """None when a floating-point weight holds only finite values that fit `into` (the dtype the model holds it
    in, float32 for both frameworks' models; None: no such limit); else what is wrong, e.g. `holds 3 non-finite
    values (NaN or Inf) of 1,024`. Integer and empty tensors pass. Cheap: one min and one max over the tensor;
    the non-finite values are counted only when there are some."""
    array = np.asarray(array)
    if array.size == 0 or not (array.dtype.kind == "f" or array.dtype.name == "bfloat16"):
        return None
    low, high = array.min(), array.max()  # NaN propagates through both
    if not (np.isfinite(low) and np.isfinite(high)):
        count = int(np.count_nonzero(~np.isfinite(array)))
        nans = int(np.count_nonzero(np.isnan(array)))
        kinds = "NaN" if nans == count else "Inf" if nans == 0 else "NaN or Inf"
        return f"holds {count:,} non-finite value{'s' if count != 1 else ''} ({kinds}) of {array.size:,}"
    if into is not None:
        limit = _largest(np.dtype(into))
        peak = max(abs(float(low)), abs(float(high)))
        if limit is not None and peak > limit:
            return f"holds values up to {peak:.3g}, beyond the range of {np.dtype(into).name} (max {limit:.3g})"
    return None


def _largest(dtype: np.dtype) -> Optional[float]:
    """The largest finite value of a floating dtype (bfloat16 through ml_dtypes), None for any other."""
    if dtype.kind == "f":
        return float(np.finfo(dtype).max)
    if dtype.name == "bfloat16":
        import ml_dtypes  # present wherever NumPy holds bfloat16

        return float(ml_dtypes.finfo(dtype).max)
    return None


class NonFiniteWeightError(CheckpointError):
    """A weight holds NaN or Inf (or values its model's dtype cannot hold): one line naming the checkpoint, the
    tensor and the count. A `CheckpointError`, so the command line reports it as any unreadable checkpoint."""

    def __init__(self, source: str, name: str, problem: str):
        self.source, self.name, self.problem = source, name, problem
        super().__init__(f"{source}: weight {name} {problem}; refusing to load: a trained model's weights are finite")


def check_weight_value(source: str, name: str, array: np.ndarray, into=np.float32) -> np.ndarray:
    """`array`, after `value_problem` found nothing wrong with it; else a `NonFiniteWeightError`."""
    problem = value_problem(array, into)
    if problem is not None:
        raise NonFiniteWeightError(source, name, problem)
    return array


# ------------------------------------------------------------------------------------------------ loading plans
class WeightLoadError(ValueError):
    """A checkpoint does not fit the model: lists missing, unexpected, mis-shaped weights and weights of a dtype no
    weight may have (`bad_dtype`: (name, dtype name); see `dtype_problem`)."""

    def __init__(self, source: str, missing: Sequence[str], unexpected: Sequence[str],
                 mismatched: Sequence[Tuple[str, tuple, tuple]], bad_dtype: Sequence[Tuple[str, str]] = ()):
        self.source, self.missing, self.unexpected, self.mismatched = source, list(missing), list(unexpected), list(mismatched)
        self.bad_dtype = list(bad_dtype)
        fits = self.missing or self.unexpected or self.mismatched
        lines = [f"{source}: the checkpoint does not match the model's config" if fits
                 else f"{source}: the checkpoint holds weights of a dtype no weight may have"]

        def _block(title: str, items: List[str]) -> None:
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {item}" for item in shown)

        _block("missing weights", self.missing)
        _block("unexpected weights", self.unexpected)
        _block("mis-shaped weights (name: checkpoint shape vs model shape)",
               [f"{name}: {tuple(got)} vs {tuple(want)}" for name, want, got in self.mismatched])
        _block(f"weights of a wrong dtype (name: checkpoint dtype; {FLOAT_WEIGHT_RULE})",
               [f"{name}: {dtype}" for name, dtype in self.bad_dtype])
        if fits:
            lines.append("Check that config.json belongs to these weights, or pass strict=False / "
                         "ignore_mismatched_sizes=True to re-initialise what does not fit.")
        if self.bad_dtype:
            lines.append("Weights of a wrong dtype are never cast (a cast would drop an imaginary part or turn "
                         "integers into weights); strict=False does not load them.")
        super().__init__("\n".join(lines))

    def summary(self) -> str:
        """One line: the counts and the first example of each kind (the command line's form of this error)."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing (e.g. {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (e.g. {self.unexpected[0]})")
        if self.mismatched:
            name, want, got = self.mismatched[0]
            parts.append(f"{len(self.mismatched)} mis-shaped (e.g. {name}: weights {tuple(got)} vs config {tuple(want)})")
        if self.bad_dtype:
            name, dtype = self.bad_dtype[0]
            parts.append(f"{len(self.bad_dtype)} of a wrong dtype (e.g. {name}: {dtype})")
        if self.missing or self.unexpected or self.mismatched:
            return ("the weights do not match the config: " + "; ".join(parts)
                    + "; check that the config belongs to these weights")
        return f"refusing weights of a wrong dtype, never cast: {parts[0]}; {FLOAT_WEIGHT_RULE}"


# A classifier checkpoint's head, which loading it into the bare model drops as transformers does. Only these: any
# other tensor of the checkpoint that the bare model does not use is unexpected.
HEAD_PREFIXES = ("layernorm.", "classifier.")


@dataclass
class LoadPlan:
    """How a checkpoint's tensors map onto a model's weight table."""

    assignments: Dict[str, str]  # canonical torch_name in the target -> key in the checkpoint
    missing: List[str]
    unexpected: List[str]
    mismatched: List[Tuple[str, tuple, tuple]]  # (target name, model shape, checkpoint shape)
    fresh_head: List[str]  # head weights absent from a backbone-only checkpoint: initialised, not loaded
    bad_dtype: List[Tuple[str, str]] = field(default_factory=list)  # (target name, checkpoint dtype): never loaded

    def check(self, source: str, strict: bool = True, ignore_mismatched_sizes: bool = False) -> None:
        """Raise `WeightLoadError` for what does not fit. A wrong dtype is refused whatever `strict` and
        `ignore_mismatched_sizes` say."""
        problems_missing = self.missing if strict else []
        problems_unexpected = self.unexpected if strict else []
        problems_mismatched = [] if ignore_mismatched_sizes else self.mismatched
        if problems_missing or problems_unexpected or problems_mismatched or self.bad_dtype:
            raise WeightLoadError(source, problems_missing, problems_unexpected, problems_mismatched, self.bad_dtype)

    def check_dtypes(self, source: str, checkpoint_dtypes: Mapping[str, object]) -> None:
        """Apply the dtype rule (`dtype_problem`) to every tensor the plan loads: a `WeightLoadError` listing each
        one of a wrong dtype. For a plan made without `checkpoint_dtypes`."""
        bad = [(target, dtype_label(checkpoint_dtypes[key])) for target, key in self.assignments.items()
               if dtype_problem(target, checkpoint_dtypes[key]) is not None]
        if bad:
            raise WeightLoadError(source, [], [], [], bad)

    def warn_about_what_was_not_loaded(self, source: str, model_name: str) -> None:
        """One UserWarning per kind of weight a non-strict load left at its initial value (a fresh head, missing or
        mis-shaped weights) or did not use, naming them; both frameworks' `from_pretrained` say it this way."""
        import warnings

        if self.fresh_head:
            warnings.warn(f"{source}: the checkpoint has no classification head; newly initialised: "
                          f"{', '.join(self.fresh_head)}. Train the model before using its predictions.", stacklevel=3)
        if self.missing:
            warnings.warn(f"{source}: weights missing from the checkpoint, left freshly initialised: "
                          f"{', '.join(self.missing)}", stacklevel=3)
        if self.unexpected:
            warnings.warn(f"{source}: checkpoint weights not used by {model_name}: {', '.join(self.unexpected)}",
                          stacklevel=3)
        if self.mismatched:
            mismatched = ", ".join(f"{name} {got} vs model {want}" for name, want, got in self.mismatched)
            warnings.warn(f"{source}: weights with a different shape in the checkpoint, re-initialised: "
                          f"{mismatched}", stacklevel=3)


def plan_load(config: CvtConfig, with_head: bool, checkpoint_shapes: Mapping[str, Sequence[int]],
              checkpoint_dtypes: Optional[Mapping[str, object]] = None) -> LoadPlan:
    """Match checkpoint keys (transformers PyTorch names, classifier or bare model) against the model's table.

    A classifier checkpoint loads into a bare model (its head, `layernorm.*` and `classifier.*`, is ignored, as in
    transformers; any other tensor the bare model lacks is unexpected); a bare checkpoint loads into a classifier
    with a freshly initialised head (reported in `fresh_head`). `num_batches_tracked` may be absent (older
    checkpoints); it then starts at 0. With `checkpoint_dtypes`, tensors of a dtype no weight may have
    (`dtype_problem`) go to `bad_dtype` instead of `assignments`.
    """
    keys = set(checkpoint_shapes)
    source_has_prefix = any(k.startswith(BACKBONE_PREFIX) for k in keys)
    assignments: Dict[str, str] = {}
    missing: List[str] = []
    mismatched: List[Tuple[str, tuple, tuple]] = []
    fresh_head: List[str] = []
    bad_dtype: List[Tuple[str, str]] = []
    used = set()
    for entry in weight_table(config, with_head):
        target = entry.torch_name(with_head)
        source_key = (BACKBONE_PREFIX + entry.name) if (source_has_prefix and not entry.in_head) else entry.name
        if source_key not in keys:
            if entry.leaf == COUNTER_LEAF:
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
        if checkpoint_dtypes is not None and dtype_problem(target, checkpoint_dtypes[source_key]) is not None:
            bad_dtype.append((target, dtype_label(checkpoint_dtypes[source_key])))
            continue
        assignments[target] = source_key
    unexpected = sorted(keys - used)
    if not with_head and source_has_prefix:
        # transformers' classifier head is expected extra baggage when loading into the bare model; nothing else is.
        unexpected = [k for k in unexpected if not k.startswith(HEAD_PREFIXES)]
    return LoadPlan(assignments, missing, unexpected, mismatched, fresh_head, bad_dtype)
