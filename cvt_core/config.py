"""`CvtConfig`: the framework-neutral description of a CvT network.

Field names and defaults are those of transformers' `CvtConfig` (4.57.6), so a transformers `config.json`
loads unchanged and ours loads in transformers. Additions: `hidden_act` ("gelu" as transformers computes, or
"quick_gelu" as the released weights were trained), the documented alias `mlp_ratios`, presets, and validation
that names the offending field instead of failing deep inside a layer.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

from .atomic import atomic_write

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

DEFAULT_IMAGE_SIZE = 224  # the released CvT models' resolution, for configs that name none

# Keys transformers writes into config.json that carry no meaning for the architecture; kept and written back.
_PASSTHROUGH_KEYS = ("architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path")

# Upper bounds far beyond any real CvT that stop a typo (image_size 1e9, a width of 10**7) with one line instead of
# an out-of-memory error or a NumPy traceback deep inside a layer or the preprocessing.
MAX_IMAGE_SIZE = 16384  # image sides, and every kernel, stride and padding (none can usefully exceed the image)
MAX_WIDTH = 1 << 16  # channels: num_channels, embed_dim and the MLP's hidden width
MAX_DEPTH = 1024  # blocks per stage
MAX_LABELS = 1 << 20


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
            use_return_dict = bool(extra.pop("return_dict"))
        extra.pop("model_type", None)
        # The documented transformers name is `mlp_ratios` but transformers reads only `mlp_ratio`; accept both,
        # refuse a contradiction.
        if mlp_ratios is not None and mlp_ratio is not None and list(mlp_ratios) != list(mlp_ratio):
            raise ValueError(f"mlp_ratio={list(mlp_ratio)} and its alias mlp_ratios={list(mlp_ratios)} disagree; pass one")
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
        self.output_hidden_states = bool(output_hidden_states)
        self.output_attentions = bool(output_attentions)
        self.use_return_dict = bool(use_return_dict)
        self.extra = dict(extra)
        self._set_labels(num_labels, id2label, label2id)
        self.validate()

    # ------------------------------------------------------------------ labels
    def _set_labels(self, num_labels, id2label, label2id) -> None:
        if id2label is not None:
            id2label = {int(k): str(v) for k, v in dict(id2label).items()}
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(f"num_labels={num_labels} but id2label has {len(id2label)} entries; make them agree")
        else:
            # transformers' default: two labels named LABEL_0, LABEL_1
            n = 2 if num_labels is None else int(num_labels)
            if n < 0:
                raise ValueError(f"num_labels must be >= 0, got {num_labels}")
            if n > MAX_LABELS:
                raise ValueError(f"num_labels must be at most {MAX_LABELS}, got {num_labels}")
            id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.id2label = id2label
        self.label2id = {str(k): int(v) for k, v in dict(label2id).items()} if label2id else {v: k for k, v in id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        self._set_labels(int(value), None, None)

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
        """Raise `ValueError` naming the first inconsistent field and its value."""
        _check_int("num_channels", self.num_channels, minimum=1, maximum=MAX_WIDTH)
        for name in PER_STAGE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, list) or not value:
                raise ValueError(f"{name} must be a non-empty list with one entry per stage, got {value!r}")
        lengths = {name: len(getattr(self, name)) for name in PER_STAGE_FIELDS}
        n = lengths["depth"]
        for name, length in lengths.items():
            if length != n:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} has {length} entries but depth={self.depth!r} has {n}: every per-stage "
                    f"list needs one entry per stage"
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
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
                raise ValueError(f"mlp_ratio[{stage}] must be a positive number, got {ratio!r}")
            if self.mlp_hidden_dim(stage) < 1:
                raise ValueError(f"mlp_ratio[{stage}]={ratio} gives an MLP of width 0 for embed_dim[{stage}]={self.embed_dim[stage]}")
            if self.mlp_hidden_dim(stage) > MAX_WIDTH:
                raise ValueError(f"mlp_ratio[{stage}]={ratio} gives an MLP of width {self.mlp_hidden_dim(stage)} for "
                                 f"embed_dim[{stage}]={self.embed_dim[stage]}; the most is {MAX_WIDTH}")
            for name in ("attention_drop_rate", "drop_rate", "drop_path_rate"):
                rate = getattr(self, name)[stage]
                if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0.0 <= rate < 1.0):
                    raise ValueError(f"{name}[{stage}] must be in [0, 1), got {rate!r}")
            for name in ("qkv_bias", "cls_token"):
                if not isinstance(getattr(self, name)[stage], bool):
                    raise ValueError(f"{name}[{stage}] must be true or false, got {getattr(self, name)[stage]!r}")
            method = self.qkv_projection_method[stage]
            if method not in PROJECTION_METHODS:
                raise ValueError(f"qkv_projection_method[{stage}]={method!r} is unknown; choose one of {list(PROJECTION_METHODS)}")
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
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is unknown; choose one of {list(ACTIVATIONS)}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={self.problem_type!r} is unknown; choose one of {list(PROBLEM_TYPES)} or None")
        if self.image_size is not None:
            sizes = self.image_size if isinstance(self.image_size, (list, tuple)) else [self.image_size]
            if len(sizes) not in (1, 2):
                raise ValueError(f"image_size must be an int or [height, width], got {self.image_size!r}")
            for side in sizes:
                _check_int("image_size", side, minimum=1, maximum=MAX_IMAGE_SIZE)
        if not isinstance(self.initializer_range, (int, float)) or self.initializer_range < 0:
            raise ValueError(f"initializer_range must be a non-negative number, got {self.initializer_range!r}")

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
        known = _accepted_keys()
        data = dict(data)
        data.update(overrides)
        model_type = data.pop("model_type", "cvt")
        if model_type != "cvt":
            raise ValueError(f"model_type={model_type!r}: this is not a CvT config (expected 'cvt')")
        kwargs = {k: v for k, v in data.items() if k in known}
        if "num_labels" in kwargs and "id2label" in kwargs and kwargs["num_labels"] != len(kwargs["id2label"]):
            # A user override of num_labels wins over a stored label map (transformers behaves the same way).
            if "num_labels" in overrides:
                kwargs.pop("id2label")
                kwargs.pop("label2id", None)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "CvtConfig":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a config.json (binary content, e.g. a weights file); pass the folder "
                             f"that holds config.json") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config.json must hold a JSON object")
        return cls.from_dict(data, **overrides)

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


def _check_int(name: str, value: Any, minimum: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {kind}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
