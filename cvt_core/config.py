"""`CvtConfig`: the framework-neutral description of a CvT network.

Field names and defaults are those of transformers' `CvtConfig` (4.57.6), so a transformers `config.json`
loads unchanged and ours loads in transformers. Additions: `hidden_act` ("gelu" as transformers computes, or
"quick_gelu" as the released weights were trained), the documented alias `mlp_ratios`, presets, and validation
that names the offending field instead of failing deep inside a layer.

Validation is strict, for files and Python callers alike: `config.json` is read as a regular file of bounded size
and parsed strictly (`cvt_core.untrusted`: nesting depth, no NaN, no duplicate keys); an int field takes an int
(not a bool, not 3.7 nor 3.0), a bool field true or false (not "false", not 0/1), a number field a finite int or
float; `id2label` keys are exactly the class ids 0..num_labels-1 (ints, or "0", "1", ... as JSON writes them) and
`label2id` agrees with it. Last comes a size budget (`check_model_budget`): the parameter count and the activation
elements of one image at `image_size` must stay within `Limits.MODEL_PARAMETERS` / `Limits.ACTIVATION_ELEMENTS`,
so a config that fits every per-field bound but would allocate tens of GB is refused before any model is built.
Every refusal is one line naming the field (or the figure and the limit).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
import reprlib
from typing import Any, Dict, List, Optional, Sequence

from .atomic import atomic_write
from .shapes import DEFAULT_IMAGE_SIZE, ModelTooLargeError, activation_problem
from .shapes import activation_elements  # noqa: F401  (the budget's figure, re-exported beside it)
from .untrusted import Limits, open_regular_file, parse_json

# Per-stage list fields, in transformers' order. Every one must have one entry per stage.
PER_STAGE_FIELDS = (
    "patch_sizes",
    "patch_stride",
    "patch_padding",
    "embed_dim",
    "num_heads",
    "depth",
    "mlp_ratio",
    "attention_drop_rate",
    "drop_rate",
    "drop_path_rate",
    "qkv_bias",
    "cls_token",
    "qkv_projection_method",
    "kernel_qkv",
    "padding_kv",
    "stride_kv",
    "padding_q",
    "stride_q",
)

# "dw_bn": depthwise conv + BatchNorm (released weights); "avg": average pooling for k/v and a plain flatten for
# q, as in the original code; "linear": plain flatten for all three (the original's third option).
PROJECTION_METHODS = ("dw_bn", "avg", "linear")
ACTIVATIONS = ("gelu", "quick_gelu")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Fields written to config.json besides the label maps, in transformers' order. Defaults live in the signature of
# CvtConfig.__init__ only. `layer_norm_eps` is stored and written back for transformers but never read by the
# models: every LayerNorm uses 1e-5, as the released weights and transformers itself do.
_SERIALISED_FIELDS = (
    "num_channels",
    *PER_STAGE_FIELDS,
    "initializer_range",
    "layer_norm_eps",
    "hidden_act",
    "image_size",
    "problem_type",
    "output_hidden_states",
    "output_attentions",
    "use_return_dict",
)

# Architecture presets of the paper. The released weights are evaluated with QuickGELU; transformers computes exact
# GELU. Presets default to "gelu" so a transformers checkpoint of the same name reproduces transformers' numbers;
# pass hidden_act="quick_gelu" to reproduce the original code.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cvt-13": {"embed_dim": [64, 192, 384], "num_heads": [1, 3, 6], "depth": [1, 2, 10], "drop_path_rate": [0.0, 0.0, 0.1]},
    "cvt-21": {"embed_dim": [64, 192, 384], "num_heads": [1, 3, 6], "depth": [1, 4, 16], "drop_path_rate": [0.0, 0.0, 0.1]},
    "cvt-w24": {"embed_dim": [192, 768, 1024], "num_heads": [3, 12, 16], "depth": [2, 2, 20], "drop_path_rate": [0.0, 0.0, 0.3]},
}


# Keys transformers writes into config.json that carry no meaning for the architecture; kept and written back.
_PASSTHROUGH_KEYS = ("architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path")

# Upper bounds far beyond any real CvT that stop a typo (image_size 1e9, a width of 10**7) with one line instead of
# an out-of-memory error or a NumPy traceback deep inside a layer or the preprocessing.
MAX_IMAGE_SIZE = 16384  # image sides, and every kernel, stride and padding (none can usefully exceed the image)
MAX_WIDTH = 1 << 16  # channels: num_channels, embed_dim and the MLP's hidden width
MAX_DEPTH = 1024  # blocks per stage
MAX_LABELS = 1 << 20
MAX_STAGES = 16  # entries of every per-stage list (the released models have 3)
MAX_NAME = 1024  # characters of hidden_act, problem_type and the pass-through strings; labels take Limits.JSON_STRING
MAX_ARCHITECTURES = 64  # entries of `architectures`


class CvtConfig:
    """Configuration of a CvT model; see the module docstring. Unknown keyword arguments raise `TypeError`."""

    model_type = "cvt"

    def __init__(
        self,
        num_channels: int = 3,
        patch_sizes: Sequence[int] = (7, 3, 3),
        patch_stride: Sequence[int] = (4, 2, 2),
        patch_padding: Sequence[int] = (2, 1, 1),
        embed_dim: Sequence[int] = (64, 192, 384),
        num_heads: Sequence[int] = (1, 3, 6),
        depth: Sequence[int] = (1, 2, 10),
        mlp_ratio: Optional[Sequence[float]] = None,
        attention_drop_rate: Sequence[float] = (0.0, 0.0, 0.0),
        drop_rate: Sequence[float] = (0.0, 0.0, 0.0),
        drop_path_rate: Sequence[float] = (0.0, 0.0, 0.1),
        qkv_bias: Sequence[bool] = (True, True, True),
        cls_token: Sequence[bool] = (False, False, True),
        qkv_projection_method: Sequence[str] = ("dw_bn", "dw_bn", "dw_bn"),
        kernel_qkv: Sequence[int] = (3, 3, 3),
        padding_kv: Sequence[int] = (1, 1, 1),
        stride_kv: Sequence[int] = (2, 2, 2),
        padding_q: Sequence[int] = (1, 1, 1),
        stride_q: Sequence[int] = (1, 1, 1),
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        hidden_act: str = "gelu",
        image_size: Optional[int | Sequence[int]] = None,
        num_labels: Optional[int] = None,
        id2label: Optional[Dict[Any, str]] = None,
        label2id: Optional[Dict[str, Any]] = None,
        problem_type: Optional[str] = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        use_return_dict: bool = True,
        mlp_ratios: Optional[Sequence[float]] = None,
        **extra: Any,
    ):
        unknown = sorted(k for k in extra if k not in _PASSTHROUGH_KEYS and k not in ("return_dict", "model_type"))
        if unknown:
            raise TypeError(f"CvtConfig got unknown field(s) {unknown}; known fields: {sorted(self.field_names())}")
        if "return_dict" in extra:
            use_return_dict = extra.pop("return_dict")  # transformers' name; validate() checks it is a bool
        model_type = extra.pop("model_type", "cvt")
        if model_type != "cvt":
            raise ValueError(f"model_type={_show(model_type)}: this is not a CvT config (expected 'cvt')")
        # The documented transformers name is `mlp_ratios` but transformers reads only `mlp_ratio`; accept both,
        # refuse a contradiction.
        if mlp_ratios is not None and mlp_ratio is not None and _as_list(mlp_ratios) != _as_list(mlp_ratio):
            raise ValueError(f"mlp_ratio={_show(mlp_ratio)} and its alias mlp_ratios={_show(mlp_ratios)} disagree; pass one")
        if mlp_ratio is None:
            mlp_ratio = mlp_ratios if mlp_ratios is not None else (4.0, 4.0, 4.0)

        self.num_channels = num_channels
        self.patch_sizes = _as_list(patch_sizes)
        self.patch_stride = _as_list(patch_stride)
        self.patch_padding = _as_list(patch_padding)
        self.embed_dim = _as_list(embed_dim)
        self.num_heads = _as_list(num_heads)
        self.depth = _as_list(depth)
        self.mlp_ratio = _as_list(mlp_ratio)
        self.attention_drop_rate = _as_list(attention_drop_rate)
        self.drop_rate = _as_list(drop_rate)
        self.drop_path_rate = _as_list(drop_path_rate)
        self.qkv_bias = _as_list(qkv_bias)
        self.cls_token = _as_list(cls_token)
        self.qkv_projection_method = _as_list(qkv_projection_method)
        self.kernel_qkv = _as_list(kernel_qkv)
        self.padding_kv = _as_list(padding_kv)
        self.stride_kv = _as_list(stride_kv)
        self.padding_q = _as_list(padding_q)
        self.stride_q = _as_list(stride_q)
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.image_size = image_size
        self.problem_type = problem_type
        # stored as given: validate() refuses anything but true / false (a JSON "false" is a string, not False)
        self.output_hidden_states = output_hidden_states
        self.output_attentions = output_attentions
        self.use_return_dict = use_return_dict
        self.extra = dict(extra)
        self._set_labels(num_labels, id2label, label2id)
        self.validate()

    # ------------------------------------------------------------------ labels
    def _set_labels(self, num_labels, id2label, label2id) -> None:
        """Check and store the label maps: `id2label` keys are exactly the class ids 0..n-1 (ints, or their decimal
        strings as JSON writes them), its values strings; `label2id`, when given, agrees with it."""
        if num_labels is not None:
            _check_num_labels(num_labels)
        if id2label is not None:
            id2label = _checked_id2label(id2label)
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(f"num_labels={num_labels} but id2label has {len(id2label)} entries; make them agree")
        else:
            # transformers' default: two labels named LABEL_0, LABEL_1
            n = 2 if num_labels is None else num_labels
            id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.id2label = id2label
        self.label2id = _checked_label2id(label2id, id2label) if label2id else {v: k for k, v in id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        _check_num_labels(value)
        self._set_labels(value, None, None)

    # ------------------------------------------------------------------ derived facts
    @property
    def num_stages(self) -> int:
        return len(self.depth)

    @property
    def hidden_size(self) -> int:
        """Width of the final stage: the size of `cls_token_value` and of the classifier input."""
        return self.embed_dim[-1]

    def stage_in_channels(self, stage: int) -> int:
        return self.num_channels if stage == 0 else self.embed_dim[stage - 1]

    def mlp_hidden_dim(self, stage: int) -> int:
        # int() truncation, as transformers and the original compute it
        return int(self.embed_dim[stage] * self.mlp_ratio[stage])

    def drop_path_rates(self, stage: int) -> List[float]:
        """One stochastic-depth rate per layer of `stage`: linspace(0, drop_path_rate[stage], depth[stage]).

        This is the original's schedule; transformers 4.57 indexes this list by stage instead of by layer.
        """
        n, top = self.depth[stage], float(self.drop_path_rate[stage])
        if n == 1:
            return [0.0]
        return [top * i / (n - 1) for i in range(n)]

    # ------------------------------------------------------------------ validation
    @classmethod
    def field_names(cls) -> List[str]:
        return list(_SERIALISED_FIELDS) + ["num_labels", "id2label", "label2id", "mlp_ratios"]

    def validate(self) -> None:
        """Raise `ValueError` naming the first wrong field and its value (one line), then `ModelTooLargeError` when
        the model would exceed `Limits.MODEL_PARAMETERS` or one image `Limits.ACTIVATION_ELEMENTS` (see
        `check_model_budget`). Types are strict, as a JSON file states them: an int field takes an int (not a bool, not
        3.0), a bool field true or false (not "false", not 0), a number field a finite int or float."""
        _check_int("num_channels", self.num_channels, minimum=1, maximum=MAX_WIDTH)
        for name in PER_STAGE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, list) or not value:
                raise ValueError(f"{name} must be a non-empty list with one entry per stage, got {_show(value)}")
            if len(value) > MAX_STAGES:
                raise ValueError(f"{name} has {len(value)} entries; at most {MAX_STAGES} stages are accepted")
        lengths = {name: len(getattr(self, name)) for name in PER_STAGE_FIELDS}
        n = lengths["depth"]
        for name, length in lengths.items():
            if length != n:
                raise ValueError(
                    f"{name}={_show(getattr(self, name))} has {length} entries but depth={_show(self.depth)} has {n}: "
                    f"every per-stage list needs one entry per stage"
                )
        for stage in range(n):
            for name in ("patch_sizes", "patch_stride", "kernel_qkv", "stride_kv", "stride_q"):
                _check_int(f"{name}[{stage}]", getattr(self, name)[stage], minimum=1, maximum=MAX_IMAGE_SIZE)
            for name in ("patch_padding", "padding_kv", "padding_q"):
                _check_int(f"{name}[{stage}]", getattr(self, name)[stage], minimum=0, maximum=MAX_IMAGE_SIZE)
            for name in ("embed_dim", "num_heads"):
                _check_int(f"{name}[{stage}]", getattr(self, name)[stage], minimum=1, maximum=MAX_WIDTH)
            _check_int(f"depth[{stage}]", self.depth[stage], minimum=1, maximum=MAX_DEPTH)
            if self.embed_dim[stage] % self.num_heads[stage]:
                raise ValueError(
                    f"embed_dim[{stage}]={self.embed_dim[stage]} is not divisible by num_heads[{stage}]={self.num_heads[stage]}"
                )
            ratio = self.mlp_ratio[stage]
            if not _is_number(ratio) or not math.isfinite(ratio) or ratio <= 0:
                raise ValueError(f"mlp_ratio[{stage}] must be a positive number, got {_show(ratio)}")
            if self.mlp_hidden_dim(stage) < 1:
                raise ValueError(f"mlp_ratio[{stage}]={ratio} gives an MLP of width 0 for embed_dim[{stage}]={self.embed_dim[stage]}")
            if self.mlp_hidden_dim(stage) > MAX_WIDTH:
                raise ValueError(f"mlp_ratio[{stage}]={ratio} gives an MLP of width {self.mlp_hidden_dim(stage)} for "
                                 f"embed_dim[{stage}]={self.embed_dim[stage]}; the most is {MAX_WIDTH}")
            for name in ("attention_drop_rate", "drop_rate", "drop_path_rate"):
                rate = getattr(self, name)[stage]
                if not _is_number(rate):
                    raise ValueError(f"{name}[{stage}] must be a number in [0, 1), got {_show(rate)}")
                if not (0.0 <= rate < 1.0):
                    raise ValueError(f"{name}[{stage}] must be in [0, 1), got {_show(rate)}")
            for name in ("qkv_bias", "cls_token"):
                _check_bool(f"{name}[{stage}]", getattr(self, name)[stage])
            method = self.qkv_projection_method[stage]
            if not isinstance(method, str) or method not in PROJECTION_METHODS:
                raise ValueError(f"qkv_projection_method[{stage}]={_show(method)} is unknown; choose one of {list(PROJECTION_METHODS)}")
            if method == "avg" and 2 * self.padding_kv[stage] > self.kernel_qkv[stage]:
                # average pooling (PyTorch's and the original's) cannot pad more than half its window
                raise ValueError(
                    f"padding_kv[{stage}]={self.padding_kv[stage]} is more than half of kernel_qkv[{stage}]="
                    f"{self.kernel_qkv[stage]}, which qkv_projection_method 'avg' cannot pool; lower padding_kv"
                )
            if method == "dw_bn" and (self.stride_q[stage] != 1 or 2 * self.padding_q[stage] != self.kernel_qkv[stage] - 1):
                # the attention output is added back onto the input tokens, so the query grid must equal the input grid
                raise ValueError(
                    f"stride_q[{stage}]={self.stride_q[stage]}, padding_q[{stage}]={self.padding_q[stage]} with "
                    f"kernel_qkv[{stage}]={self.kernel_qkv[stage]} would change the query grid, which the residual connection "
                    f"cannot add back: use stride_q 1 and padding_q (kernel_qkv - 1) / 2 with an odd kernel_qkv"
                )
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={_show(self.hidden_act)} is unknown; choose one of {list(ACTIVATIONS)}")
        if self.problem_type is not None and (not isinstance(self.problem_type, str) or self.problem_type not in PROBLEM_TYPES):
            raise ValueError(f"problem_type={_show(self.problem_type)} is unknown; choose one of {list(PROBLEM_TYPES)} or None")
        if self.image_size is not None:
            if isinstance(self.image_size, (list, tuple)):
                if len(self.image_size) not in (1, 2) or any(isinstance(side, bool) or not isinstance(side, int)
                                                             for side in self.image_size):
                    raise ValueError(f"image_size must be an int or [height, width] (integers), got "
                                     f"{_show(self.image_size)}")
                for side in self.image_size:
                    _check_int("image_size", side, minimum=1, maximum=MAX_IMAGE_SIZE, accepted="an int or [height, width]")
            else:
                _check_int("image_size", self.image_size, minimum=1, maximum=MAX_IMAGE_SIZE, accepted="an int or [height, width]")
        _check_finite("initializer_range", self.initializer_range)
        if self.initializer_range < 0:
            raise ValueError(f"initializer_range must be a non-negative number, got {_show(self.initializer_range)}")
        _check_finite("layer_norm_eps", self.layer_norm_eps)
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be a positive number, got {_show(self.layer_norm_eps)}")
        for name in ("output_hidden_states", "output_attentions"):
            _check_bool(name, getattr(self, name))
        _check_bool("use_return_dict (return_dict)", self.use_return_dict)
        self._validate_labels()
        self._validate_extra()
        check_model_budget(self)

    def _validate_labels(self) -> None:
        """The label maps again, for attributes set after construction (`config.id2label = {...}`)."""
        id2label = self.id2label
        if not isinstance(id2label, dict):
            raise ValueError(f"id2label must be a mapping from the class ids 0..n-1 to label strings, got {_show(id2label)}")
        if id2label and not all(type(k) is int for k in id2label):
            self.id2label = id2label = _checked_id2label(id2label)
        else:
            _checked_id2label(id2label)
        _checked_label2id(self.label2id, id2label)

    def _validate_extra(self) -> None:
        """The pass-through keys transformers writes: strings (or null), `architectures` a list of strings."""
        for key, value in self.extra.items():
            if key == "architectures":
                if value is None:
                    continue
                if not isinstance(value, (list, tuple)) or len(value) > MAX_ARCHITECTURES:
                    raise ValueError(f"architectures must be a list of at most {MAX_ARCHITECTURES} class names or null, "
                                     f"got {_show(value)}")
                for i, name in enumerate(value):
                    _check_name(f"architectures[{i}]", name)
            elif value is not None:
                _check_name(key, value, "a string or null")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> Dict[str, Any]:
        """The transformers `config.json` content (loadable by transformers 4.57.6)."""
        out: Dict[str, Any] = {k: v for k, v in self.extra.items()}
        out["model_type"] = self.model_type
        for name in _SERIALISED_FIELDS:
            if name == "use_return_dict":
                out["return_dict"] = self.use_return_dict
            else:
                out[name] = copy.deepcopy(getattr(self, name))
        if out["image_size"] is None:
            out.pop("image_size")
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = dict(self.label2id)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Dict[str, Any], **overrides: Any) -> "CvtConfig":
        # transformers writes many generic PretrainedConfig keys; keep only what a CvT model can use. Overrides are
        # typed by the caller, so an unknown one is a misspelling, not a file's baggage: refuse it.
        check_overrides(overrides)
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object (a dict), got {type(data).__name__}")
        known = _accepted_keys()
        data = dict(data)
        data.update(overrides)
        model_type = data.pop("model_type", "cvt")
        if model_type != "cvt":
            raise ValueError(f"model_type={_show(model_type)}: this is not a CvT config (expected 'cvt')")
        kwargs = {k: v for k, v in data.items() if k in known}
        if ("num_labels" in kwargs and isinstance(kwargs.get("id2label"), dict)
                and kwargs["num_labels"] != len(kwargs["id2label"])):
            # A user override of num_labels wins over a stored label map (transformers behaves the same way).
            if "num_labels" in overrides:
                kwargs.pop("id2label")
                kwargs.pop("label2id", None)
        if "id2label" in overrides and "label2id" not in overrides:
            kwargs.pop("label2id", None)  # a new label map alone: its inverse follows it, not the stored one
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "CvtConfig":
        """Read a `config.json`: a regular file of at most `Limits.JSON_BYTES`, strict JSON (see
        `cvt_core.untrusted.parse_json`: nesting, NaN, duplicate keys), holding an object. Every problem is one line
        naming the file: `FileNotFoundError` when it is missing, `ValueError` otherwise."""
        path = os.fspath(path)
        data = parse_json(_read_config_bytes(path), path, ValueError)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config.json must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data, **overrides)
        except ValueError as exc:  # a field's problem, named with the file it is in (same class: ModelTooLargeError)
            raise type(exc)(f"{path}: {exc}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "CvtConfig":
        """Read a transformers `config.json`, given it or the checkpoint directory holding it."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return cls.from_json_file(path, **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "CvtConfig":
        """`cvt-13`, `cvt-21` or `cvt-w24` (as `microsoft/cvt-13` etc.): the architecture only, a model built from it
        has random weights. Keyword arguments override fields."""
        key = preset_key(name)
        if key is None:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = dict(PRESETS[key])
        fields.setdefault("image_size", 384 if _preset_resolution(name) == 384 else 224)
        if "id2label" not in overrides:
            fields.setdefault("num_labels", 1000)  # the released checkpoints are ImageNet-1k classifiers
        fields.update(overrides)
        return cls(**fields)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write `config.json` into `directory` (created if needed), atomically; returns the file's path. The file
        always names `image_size` (224 when unset), which transformers' TF classes need to build."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        written = self if self.image_size is not None else self.copy(image_size=DEFAULT_IMAGE_SIZE)
        with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(written.to_json_string())
        return path

    def copy(self, **overrides: Any) -> "CvtConfig":
        return type(self).from_dict(self.to_dict(), **overrides)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CvtConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"CvtConfig({self.to_json_string()})"


def _preset_resolution(name: str) -> int:
    return 384 if "-384" in name.lower() else 224


def preset_key(name: str) -> Optional[str]:
    """The `PRESETS` key `name` names (`cvt-13`, `microsoft/cvt-13-384-22k`, ...), or None."""
    key = str(name).lower().split("/")[-1]
    for suffix in ("-384-22k", "-384", "-22k"):
        if key.endswith(suffix) and key[: -len(suffix)] in PRESETS:
            key = key[: -len(suffix)]
    return key if key in PRESETS else None


def transformers_differences(config: CvtConfig, with_head: bool) -> List[str]:
    """Why transformers (4.57.6, and 5.x for PyTorch) cannot build this config or computes other outputs from it
    in inference; empty when it reproduces the model. docs/conversion.md lists the same reasons."""
    reasons = []
    short = [s for s, depth in enumerate(config.depth) if depth <= s]
    if short:
        reasons.append(f"depth {config.depth}: transformers cannot build a stage s with depth[s] <= s (stage {short[0]})")
    if "avg" in config.qkv_projection_method:
        reasons.append("qkv_projection_method 'avg': transformers cannot build it")
    early = [s for s, on in enumerate(config.cls_token[:-1]) if on]
    if early:
        reasons.append(f"cls_token on stage {early[0]}: transformers supports a cls token on the last stage only")
    if with_head and not config.cls_token[-1]:
        reasons.append("a classifier without a cls token on the last stage: transformers' forward fails")
    if config.hidden_act == "quick_gelu":
        reasons.append("hidden_act 'quick_gelu': transformers always computes exact GELU, so its logits differ "
                       "(about 0.15 on the released weights)")
    return reasons


def _accepted_keys() -> set:
    """The config.json keys a CvtConfig keeps: its fields, the pass-through keys and `return_dict`."""
    return set(CvtConfig.field_names()) | set(_PASSTHROUGH_KEYS) | {"return_dict"}


def check_overrides(overrides: Dict[str, Any]) -> None:
    """Raise `TypeError` naming keyword arguments that are no config field (with the nearest field, if any)."""
    known = _accepted_keys() | {"model_type"}
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise TypeError(f"unknown config field(s) {', '.join(hints)}; known fields: {sorted(CvtConfig.field_names())}")


def _as_list(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return list(value)
    return value  # validate() reports non-lists with the field's name


# ------------------------------------------------------------------------------------------------ field checks
_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = 6
_REPR.maxdict = 4
_REPR.maxlevel = 3


def _show(value: Any) -> str:
    """A value as a message shows it: its repr, shortened (a label list or a 1 MB string stays one short line)."""
    try:
        return _REPR.repr(value)
    except Exception:  # pragma: no cover - a repr that fails
        return f"<{type(value).__name__}>"


def _is_number(value: Any) -> bool:
    """An int or a float, not a bool (JSON true is no number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int, maximum: int, accepted: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        also = f" ({accepted})" if accepted else ""
        raise ValueError(f"{name} must be an integer{also}, got {_show(value)}")
    if value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {kind}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {_show(value)}")


def _check_finite(name: str, value: Any) -> None:
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, got {_show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {_show(value)}")


def _check_name(name: str, value: Any, accepted: str = "a string") -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be {accepted}, got {_show(value)}")
    if len(value) > MAX_NAME:
        raise ValueError(f"{name} is a string of {len(value)} characters; at most {MAX_NAME} are accepted")


def _check_num_labels(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"num_labels must be an integer, got {_show(value)}")
    if value < 0:
        raise ValueError(f"num_labels must be >= 0, got {value}")
    if value > MAX_LABELS:
        raise ValueError(f"num_labels must be at most {MAX_LABELS}, got {value}")


_CLASS_ID = re.compile(r"0|[1-9][0-9]{0,8}")


def _class_id(field: str, key: Any) -> int:
    """A label map's class id: an int, or its decimal string as JSON object keys hold it ("0", "1", ...; not "01",
    " 1" or "1.0", which transformers' int() would also read)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and _CLASS_ID.fullmatch(key):
        return int(key)
    raise ValueError(f"{field} has the class id {_show(key)}; class ids are the integers 0..num_labels-1 "
                     f"(written \"0\", \"1\", ... in config.json)")


def _checked_id2label(id2label: Any) -> Dict[int, str]:
    """`id2label` with int keys in class order, after checking its keys are exactly 0..n-1 (once each) and its
    values label strings."""
    if not isinstance(id2label, dict):
        raise ValueError(f"id2label must be a mapping from the class ids 0..n-1 to label strings, got {_show(id2label)}")
    if len(id2label) > MAX_LABELS:
        raise ValueError(f"id2label has {len(id2label)} entries; at most {MAX_LABELS} classes are accepted")
    n = len(id2label)
    out: Dict[int, str] = {}
    for key, value in id2label.items():
        index = _class_id("id2label", key)
        if index in out:
            raise ValueError(f"id2label names class {index} twice (key {_show(key)}); each class id 0..{n - 1} needs "
                             f"exactly one label")
        if not 0 <= index < n:
            raise ValueError(f"id2label has the class id {_show(key)} but {n} labels are class ids 0..{n - 1}: each "
                             f"class id 0..{n - 1} needs exactly one label")
        if not isinstance(value, str):
            raise ValueError(f"id2label[{_show(key)}] must be a label string, got {_show(value)}")
        if len(value) > Limits.JSON_STRING:
            raise ValueError(f"id2label[{_show(key)}] is a label of {len(value)} characters; at most "
                             f"{Limits.JSON_STRING} are accepted")
        out[index] = value
    return {i: out[i] for i in range(n)}  # n distinct ids within 0..n-1: every id is present


def _checked_label2id(label2id: Any, id2label: Dict[int, str]) -> Dict[str, int]:
    """`label2id` with int values, after checking each entry agrees with `id2label` (a label named twice in
    id2label, like ImageNet's "crane", maps to one of its ids; labels may be left out)."""
    if not isinstance(label2id, dict):
        raise ValueError(f"label2id must be a mapping from label strings to class ids, got {_show(label2id)}")
    if len(label2id) > len(id2label):
        raise ValueError(f"label2id has {len(label2id)} entries but there are {len(id2label)} classes; it must agree "
                         f"with id2label (leave label2id out to derive it)")
    out: Dict[str, int] = {}
    for name, value in label2id.items():
        if not isinstance(name, str):
            raise ValueError(f"label2id keys must be label strings, got {_show(name)}")
        index = _class_id(f"label2id[{_show(name)}]", value)
        if id2label.get(index) != name:
            shown = "no class" if index not in id2label else f"id2label[{index}]={_show(id2label[index])}"
            raise ValueError(f"label2id[{_show(name)}]={_show(value)} disagrees with id2label ({shown}); the two "
                             f"maps must agree (leave label2id out to derive it from id2label)")
        out[name] = index
    return out


def _read_config_bytes(path: str) -> bytes:
    """The bytes of a config file: a regular file (a FIFO or device is refused without blocking) of at most
    `Limits.JSON_BYTES`; a binary file (a weights file given by mistake) is named as such from its first bytes."""
    import codecs

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such config file")
    with open_regular_file(path, ValueError) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(4096)
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
            binary = b"\0" in head
        except UnicodeDecodeError:
            binary = True
        if binary:
            raise ValueError(f"{path}: not a config.json (binary content, e.g. a weights file); pass the folder that "
                             f"holds config.json")
        if size > Limits.JSON_BYTES:
            raise ValueError(f"{path}: a config file of {size} bytes is larger than the {Limits.JSON_BYTES} accepted")
        data = head + f.read(Limits.JSON_BYTES + 1 - len(head))
    if len(data) > Limits.JSON_BYTES:
        raise ValueError(f"{path}: the config file grew past the {Limits.JSON_BYTES} bytes accepted while it was read")
    return data


# ------------------------------------------------------------------------------------------------ model budget
def parameter_count(config: CvtConfig, with_head: bool = True) -> int:
    """Trainable parameters of the model `config` describes, in closed form (no weight table is built): equal to
    `cvt_core.weights.count_parameters`, e.g. 19,997,480 for cvt-13 with 1000 labels."""
    total = 0
    for s in range(config.num_stages):
        c, c_in, k = config.embed_dim[s], config.stage_in_channels(s), config.patch_sizes[s]
        hidden, kq = config.mlp_hidden_dim(s), config.kernel_qkv[s]
        total += (c if config.cls_token[s] else 0) + c * c_in * k * k + c + 2 * c
        layer = 3 * (c * c + (c if config.qkv_bias[s] else 0)) + (c * c + c) + (hidden * c + hidden) + (c * hidden + c)
        layer += 4 * c  # two LayerNorms
        if config.qkv_projection_method[s] == "dw_bn":
            layer += 3 * (c * kq * kq + 2 * c)  # depthwise kernels and BatchNorm weight / bias
        total += config.depth[s] * layer
    if with_head:
        total += 2 * config.hidden_size
        labels = config.num_labels
        if labels > 0:
            total += labels * config.hidden_size + labels
    return total


def check_model_budget(config: CvtConfig) -> None:
    """Raise `ModelTooLargeError` (one line, the figure and the limit) when the model would hold more than
    `Limits.MODEL_PARAMETERS` parameters or `Limits.MODEL_BLOCKS` blocks, or one image would need more than
    `Limits.ACTIVATION_ELEMENTS` activation elements; called by `validate`, so before any model allocates a weight."""
    parameters = parameter_count(config)
    if parameters > Limits.MODEL_PARAMETERS:
        raise ModelTooLargeError(
            f"the model would have {parameters:,} parameters ({parameters * 4 / 1e9:.1f} GB in float32); at most "
            f"{Limits.MODEL_PARAMETERS:,} are accepted (lower embed_dim, depth, mlp_ratio or num_labels)")
    blocks = sum(config.depth)
    if blocks > Limits.MODEL_BLOCKS:  # building a block costs time and memory whatever its width (Keras: ~1 s each)
        raise ModelTooLargeError(
            f"the model would have {blocks:,} transformer blocks (depth {list(config.depth)}); at most "
            f"{Limits.MODEL_BLOCKS} are accepted (the released CvT-W24 has 24)")
    problem = activation_problem(config)
    if problem:
        raise ModelTooLargeError(problem)