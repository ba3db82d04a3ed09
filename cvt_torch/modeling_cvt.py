"""PyTorch implementation of CvT (Convolutional vision Transformer, arXiv 2103.15808).

One file holds the whole network: the convolutional token embedding, the attention with convolutional q/k/v
projections, the transformer block, the stages, the bare backbone `CvtModel`, `CvtBackbone` and
`CvtForImageClassification`.

The module tree mirrors transformers' so `state_dict()` keys and shapes are exactly
`cvt_core.weights.weight_table(config, with_head)`: transformers checkpoints load unchanged and ours load in
transformers. Inference outputs equal transformers 4.57.6 for every config it can build; the behaviours where
transformers departs from the original microsoft/CvT code are fixed here: per-layer drop-path schedule,
drop path on the residual branch only, any depth per stage, a cls token on any stage sized by that stage, the
"avg" projection, a classifier without a final cls token.

The model is built from PyTorch's standard modules (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.GELU,
nn.Dropout) computed with public ops, and every module computes the same thing, with the same outputs, in every
grad mode and under tracing, so PyTorch's tools (quantisation, PEFT, hooks, torch.fx, torch.export) see the model
as it runs. The deploy-only faster copy is `cvt_torch.optimize.optimize_for_inference(model)`.
"""

from __future__ import annotations

import os
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cvt_core.checkpoint import read_pretrained, save_pretrained_folder
from cvt_core.hub import split_hub_options
from cvt_core.config import CvtConfig
from cvt_core.backbone import (chosen_channels_and_strides, intermediate_stages, resolve_out_features, stage_names,
                               stage_strides)
from cvt_core.outputs import CvtBackboneOutput, CvtImageClassifierOutput, CvtModelOutput
from cvt_core.shapes import attention_projection
from cvt_core.training import problem_type_for
from cvt_core.weights import check_weight_value

from .inputs import cast_to_model_dtype, check_pixel_values
from .losses import classification_loss
from .outputs import option, returned
from .numpy_bridge import model_with_weights, tensor_to_numpy


# Every LayerNorm of CvT uses 1e-5, as the released weights were trained; `config.layer_norm_eps` is not read.
LAYER_NORM_EPS = 1e-5
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.1


# ---------------------------------------------------------------------------------------------- small pieces
class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation the released CvT weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()  # exact erf GELU, as transformers computes
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"hidden_act={name!r} is unknown; choose 'gelu' or 'quick_gelu'")


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability `drop_prob`, scale the rest by
    1 / keep so the expectation is unchanged."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep_mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
    return x * keep_mask / keep_prob


class CvtDropPath(nn.Module):
    """Stochastic depth for one residual branch; applied to the branch output before the residual add."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return drop_path(hidden_state, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


def tokens_to_grid(tokens: torch.Tensor, height, width) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W), contiguous."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return grid.flatten(2).transpose(1, 2)


def split_cls_token(tokens: torch.Tensor, with_cls_token: bool):
    """(B, [1 +] T, C) -> (the cls token (B, 1, C) or None, the grid's tokens (B, T, C))."""
    return (tokens[:, :1], tokens[:, 1:]) if with_cls_token else (None, tokens)


def split_heads(tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, C) -> (B, heads, T, C / heads)."""
    return tokens.unflatten(2, (num_heads, tokens.shape[2] // num_heads)).transpose(1, 2)


def merge_heads(heads: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, d) -> (B, T, heads * d)."""
    return heads.transpose(1, 2).flatten(2)


# ---------------------------------------------------------------------------------------------- embedding
class CvtConvEmbeddings(nn.Module):
    """Strided convolution from the previous grid to this stage's tokens, then LayerNorm over channels."""

    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        embed_dim = config.embed_dim[stage]
        self.projection = nn.Conv2d(config.stage_in_channels(stage), embed_dim, kernel_size=config.patch_sizes[stage],
                                    stride=config.patch_stride[stage], padding=config.patch_padding[stage])
        self.normalization = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

    def forward(self, pixel_values: torch.Tensor):
        """Returns (tokens (B, H'*W', C), H', W')."""
        grid = self.projection(pixel_values)
        height, width = grid.shape[2], grid.shape[3]
        return self.normalization(grid_to_tokens(grid)), height, width


class CvtEmbeddings(nn.Module):
    """Token embedding of one stage; the dropout runs after the stage's cls token is prepended (as the original)."""

    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        self.convolution_embeddings = CvtConvEmbeddings(config, stage)
        self.dropout = nn.Dropout(config.drop_rate[stage])

    def forward(self, pixel_values: torch.Tensor, cls_token: Optional[torch.Tensor] = None):
        tokens, height, width = self.convolution_embeddings(pixel_values)
        if cls_token is not None:
            tokens = torch.cat((cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return self.dropout(tokens), height, width


# ---------------------------------------------------------------------------------------------- attention
class CvtSelfAttentionConvProjection(nn.Module):
    """Depthwise convolution (no bias) then BatchNorm: the "dw_bn" projection of the released weights."""

    def __init__(self, config: CvtConfig, stage: int, role: str):
        super().__init__()
        embed_dim, projection = config.embed_dim[stage], attention_projection(config, stage, role)
        self.convolution = nn.Conv2d(
            embed_dim, embed_dim, kernel_size=projection.kernel_size, padding=projection.padding,
            stride=projection.stride, bias=False, groups=embed_dim
        )
        self.normalization = nn.BatchNorm2d(embed_dim, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.convolution(hidden_state))


class CvtSelfAttentionProjection(nn.Module):
    """Spatial part of one of the q/k/v projections (`role`), returning tokens (B, T, C).

    "dw_bn": depthwise conv + BN. "avg" (keys and values): AvgPool2d with ceil_mode, as the original code.
    "linear" (and the query of "avg"): no spatial operation. Only "dw_bn" has weights.
    """

    def __init__(self, config: CvtConfig, stage: int, role: str):
        super().__init__()
        projection = attention_projection(config, stage, role)
        if projection.method == "dw_bn":
            self.convolution_projection = CvtSelfAttentionConvProjection(config, stage, role)
        elif projection.method == "avg":
            self.convolution_projection = nn.AvgPool2d(projection.kernel_size, projection.stride, projection.padding,
                                                       ceil_mode=True)
        elif projection.method == "linear":
            self.convolution_projection = nn.Identity()
        else:
            raise ValueError(f"qkv_projection_method={projection.method!r} is unknown; choose 'dw_bn', 'avg' or "
                             f"'linear'")

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return grid_to_tokens(self.convolution_projection(hidden_state))


class CvtSelfAttention(nn.Module):
    """Multi-head attention whose q, k, v come from convolutional projections of the token grid.

    A cls token, when the stage has one, skips the spatial projection and is prepended to q, k and v before the
    Linear projections.
    """

    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        self.embed_dim = config.embed_dim[stage]
        self.num_heads = config.num_heads[stage]
        self.head_dim = self.embed_dim // self.num_heads
        self.with_cls_token = bool(config.cls_token[stage])
        # The scale uses the whole stage width, not the head width: the original code does so and the released
        # weights were trained with it (transformers too), so changing it would change every pretrained output.
        self.scale = self.embed_dim ** -0.5
        self.convolution_projection_query = CvtSelfAttentionProjection(config, stage, "query")
        self.convolution_projection_key = CvtSelfAttentionProjection(config, stage, "key")
        self.convolution_projection_value = CvtSelfAttentionProjection(config, stage, "value")
        bias = bool(config.qkv_bias[stage])
        self.projection_query = nn.Linear(self.embed_dim, self.embed_dim, bias=bias)
        self.projection_key = nn.Linear(self.embed_dim, self.embed_dim, bias=bias)
        self.projection_value = nn.Linear(self.embed_dim, self.embed_dim, bias=bias)
        self.dropout = nn.Dropout(config.attention_drop_rate[stage])

    def forward(self, hidden_state: torch.Tensor, height, width, output_attentions: bool = False):
        """Returns (context (B, T, C), attention probabilities (B, heads, T, T_kv) or None)."""
        cls_token, hidden_state = split_cls_token(hidden_state, self.with_cls_token)
        grid = tokens_to_grid(hidden_state, height, width)
        query = self.convolution_projection_query(grid)
        key = self.convolution_projection_key(grid)
        value = self.convolution_projection_value(grid)
        if self.with_cls_token:
            query, key, value = (torch.cat((cls_token, t), dim=1) for t in (query, key, value))
        query, key, value = (split_heads(projection(t), self.num_heads) for projection, t in
                             ((self.projection_query, query), (self.projection_key, key),
                              (self.projection_value, value)))
        if output_attentions:
            # The returned probabilities are those before attention dropout (as transformers' models return them);
            # the context uses the dropped ones.
            probs = torch.softmax(torch.matmul(query, key.transpose(-2, -1)) * self.scale, dim=-1)
            return merge_heads(torch.matmul(self.dropout(probs), value)), probs
        dropout_p = self.dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, scale=self.scale)
        return merge_heads(context), None


class CvtSelfOutput(nn.Module):
    """Output projection of the attention, then dropout (the residual add lives in `CvtLayer`)."""

    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        self.dense = nn.Linear(config.embed_dim[stage], config.embed_dim[stage])
        self.dropout = nn.Dropout(config.drop_rate[stage])

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_state))


class CvtAttention(nn.Module):
    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        self.attention = CvtSelfAttention(config, stage)
        self.output = CvtSelfOutput(config, stage)

    def forward(self, hidden_state: torch.Tensor, height, width, output_attentions: bool = False):
        context, probs = self.attention(hidden_state, height, width, output_attentions)
        return self.output(context), probs


# ---------------------------------------------------------------------------------------------- MLP and block
class CvtIntermediate(nn.Module):
    """First MLP layer, activation, and the original's dropout after the activation."""

    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        self.dense = nn.Linear(config.embed_dim[stage], config.mlp_hidden_dim(stage))
        self.activation = make_activation(config.hidden_act)
        self.dropout = nn.Dropout(config.drop_rate[stage])

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.activation(self.dense(hidden_state)))


class CvtOutput(nn.Module):
    """Second MLP layer and dropout (the residual add lives in `CvtLayer`)."""

    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        self.dense = nn.Linear(config.mlp_hidden_dim(stage), config.embed_dim[stage])
        self.dropout = nn.Dropout(config.drop_rate[stage])

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_state))


class CvtLayer(nn.Module):
    """Pre-norm transformer block `index` of `stage`: x + drop_path(attn(LN(x))), then x + drop_path(mlp(LN(x))),
    with the block's rate of the per-layer drop-path schedule (`CvtConfig.drop_path_rates`)."""

    def __init__(self, config: CvtConfig, stage: int, index: int):
        super().__init__()
        self.attention = CvtAttention(config, stage)
        self.intermediate = CvtIntermediate(config, stage)
        self.output = CvtOutput(config, stage)
        self.drop_path = CvtDropPath(config.drop_path_rates(stage)[index])
        self.layernorm_before = nn.LayerNorm(config.embed_dim[stage], eps=LAYER_NORM_EPS)
        self.layernorm_after = nn.LayerNorm(config.embed_dim[stage], eps=LAYER_NORM_EPS)

    def forward(self, hidden_state: torch.Tensor, height, width, output_attentions: bool = False):
        """Returns (tokens, attention probabilities or None)."""
        attention_output, probs = self.attention(self.layernorm_before(hidden_state), height, width,
                                                 output_attentions)
        hidden_state = hidden_state + self.drop_path(attention_output)
        mlp_output = self.output(self.intermediate(self.layernorm_after(hidden_state)))
        return hidden_state + self.drop_path(mlp_output), probs


# ---------------------------------------------------------------------------------------------- stages
class CvtStage(nn.Module):
    """Token embedding, optional cls token, and `depth[stage]` blocks with a per-layer drop-path schedule.

    With gradient checkpointing on (`CvtPreTrainedModel.gradient_checkpointing_enable`) each block runs under
    `torch.utils.checkpoint` while training: its activations are recomputed in the backward pass instead of kept."""

    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        self.stage = stage
        self.with_cls_token = bool(config.cls_token[stage])
        if self.with_cls_token:
            # Registered first so the state_dict order matches transformers'; sized by this stage's width.
            self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim[stage]))
        self.embedding = CvtEmbeddings(config, stage)
        self.layers = nn.ModuleList(CvtLayer(config, stage, index) for index in range(config.depth[stage]))
        self.gradient_checkpointing = False
        self.checkpoint_options = {"use_reentrant": False}

    def forward(self, hidden_state: torch.Tensor, output_attentions: bool = False):
        """The previous grid (B, C_in, H, W) -> (grid (B, C, H', W'), cls token (B, 1, C) or None, a tuple of the
        layers' attention probabilities, empty unless asked)."""
        tokens, height, width = self.embedding(hidden_state, self.cls_token if self.with_cls_token else None)
        attentions: List[torch.Tensor] = []
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointed:
                tokens, probs = checkpoint(layer, tokens, height, width, output_attentions,
                                           **self.checkpoint_options)
            else:
                tokens, probs = layer(tokens, height, width, output_attentions)
            if output_attentions:
                attentions.append(probs)
        cls_token, tokens = split_cls_token(tokens, self.with_cls_token)
        return tokens_to_grid(tokens, height, width), cls_token, tuple(attentions)


class CvtEncoder(nn.Module):
    def __init__(self, config: CvtConfig):
        super().__init__()
        self.stages = nn.ModuleList(CvtStage(config, s) for s in range(config.num_stages))

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False) -> CvtModelOutput:
        hidden, cls_token = pixel_values, None
        all_hidden_states = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for stage in self.stages:
            hidden, cls_token, attentions = stage(hidden, output_attentions)
            if output_hidden_states:
                all_hidden_states.append(hidden)
            if output_attentions:
                all_attentions.extend(attentions)
        return CvtModelOutput(
            last_hidden_state=hidden,
            cls_token_value=cls_token,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )


# ---------------------------------------------------------------------------------------------- base class
class CvtPreTrainedModel(nn.Module):
    """Shared by `CvtModel` and `CvtForImageClassification`: input checks, initialisation, checkpoint I/O."""

    # Whether the state_dict holds the classification head (and the `cvt.` backbone prefix).
    with_head: bool = False
    # The transformers class config.json names (`architectures`): the one that loads these weights.
    architecture: str = "CvtModel"

    def __init__(self, config: CvtConfig):
        super().__init__()
        if not isinstance(config, CvtConfig):
            raise TypeError(f"config must be a cvt_core CvtConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        # The preprocessing the weights expect (a cvt_core CvtImageProcessor): read by from_pretrained, written by
        # save_pretrained; None means the released checkpoints' preprocessing at the config's resolution.
        self.image_processor = None

    # ------------------------------------------------------------------ initialisation
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
        elif isinstance(module, CvtStage) and module.with_cls_token:
            nn.init.trunc_normal_(module.cls_token, mean=0.0, std=std)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Re-initialise every weight as transformers does (truncated normal, unit norms, zero biases)."""
        self.apply(self._init_weights)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike], config: Optional[CvtConfig] = None,
                        strict: bool = True, ignore_mismatched_sizes: bool = False, **kwargs):
        """Build the model from a transformers-format checkpoint: a local folder (config.json + model.safetensors /
        pytorch_model.bin, or tf_model.h5, transformers' TF weights, in a folder without PyTorch weights) or a hub
        repository (`org/name` or `hf://org/name`), fetched and cached by huggingface_hub: `revision=`, `cache_dir=`,
        `local_files_only=`, `token=`, `force_download=` and `HF_HUB_OFFLINE` work as in transformers. Other keyword
        arguments override config fields (`num_labels=10`). The folder's preprocessor_config.json becomes
        `model.image_processor`, which `save_pretrained` writes back.

        A classifier checkpoint loads into `CvtModel` (its head is ignored); a bare checkpoint loads into
        `CvtForImageClassification` with a freshly initialised head (with a UserWarning). Missing, unexpected or
        mis-shaped weights raise `WeightLoadError` unless `strict=False` / `ignore_mismatched_sizes=True`, in which
        case the affected weights keep their fresh initialisation and a UserWarning names them. Weights of a dtype no
        weight may have (complex, bool, integers; `cvt_core.weights.dtype_problem`) raise `WeightLoadError` whatever
        `strict` says, and NaN or Inf in a weight raises `cvt_core.weights.NonFiniteWeightError`.
        """
        hub_options = split_hub_options(kwargs)
        directory, config, state, plan, image_processor = read_pretrained(
            name_or_path, cls.with_head, config, strict, ignore_mismatched_sizes, hub_options, **kwargs)
        try:
            plan.check_dtypes(directory, state.dtypes)  # never cast complex, bool or integer tensors into weights
            model = model_with_weights(cls, config, list(plan.assignments), lambda target: check_weight_value(
                directory, target, state[plan.assignments[target]]))  # NaN / Inf: NonFiniteWeightError
        finally:
            state.close()
        model.image_processor = image_processor
        plan.warn_about_what_was_not_loaded(directory, cls.__name__)
        return model.eval()

    def save_pretrained(self, directory: Union[str, os.PathLike], push_to_hub: bool = False,
                        repo_id: Optional[str] = None, **push_options) -> str:
        """Write config.json, model.safetensors and preprocessor_config.json (`self.image_processor`, else the
        released checkpoints' preprocessing), loadable by `from_pretrained` here and in transformers (a warning says
        when transformers cannot build or reproduce the config); returns `directory`. `push_to_hub=True` then
        uploads the folder to `repo_id` (default: the folder's name) with huggingface_hub (`token=`, `private=`,
        `commit_message=`, `revision=`)."""
        return save_pretrained_folder(directory, self.config, self.with_head, self.architecture,
                                      {name: tensor_to_numpy(t) for name, t in self.state_dict().items()},
                                      self.image_processor, push_to_hub, repo_id, **push_options)

    # ------------------------------------------------------------------ activation checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """transformers' name: while training, run each transformer block under `torch.utils.checkpoint.checkpoint`
        (`use_reentrant=False` unless `gradient_checkpointing_kwargs` says otherwise), so its activations are
        recomputed in the backward pass instead of kept: less memory for about one more forward pass of time."""
        options = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in self.modules():
            if isinstance(module, CvtStage):
                module.gradient_checkpointing, module.checkpoint_options = True, options

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, CvtStage):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(module, "gradient_checkpointing", False) for module in self.modules())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's name for `gradient_checkpointing_enable()` / `gradient_checkpointing_disable()`."""
        if enable:
            self.gradient_checkpointing_enable()
        else:
            self.gradient_checkpointing_disable()

    # ------------------------------------------------------------------ timm's feature API
    @property
    def feature_info(self) -> List[dict]:
        """timm's `feature_info`: per stage its width (`num_chs`), total stride (`reduction`) and module name."""
        prefix = "cvt.encoder.stages" if self.with_head else "encoder.stages"
        strides = stage_strides(self.config)[1:]  # [0] is the stem's
        return [dict(num_chs=width, reduction=stride, module=f"{prefix}.{stage}")
                for stage, (width, stride) in enumerate(zip(self.config.embed_dim, strides))]

    def forward_intermediates(self, pixel_values: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's `forward_intermediates`: the outputs of the stages at `indices` (None: every stage; an int n: the
        last n; a list: those stages, counted from 0, negative from the end) as NCHW (or NHWC) maps, and unless
        `intermediates_only` the final features first: `(features, intermediates)`, the features being what
        `forward_features` returns (the classifier) or `last_hidden_state` (`CvtModel`). `norm`: the classifier's
        final LayerNorm is applied to the last stage's map, over channels (`CvtModel` has none)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        if norm and not self.with_head:
            raise ValueError("norm=True applies the classifier's final LayerNorm, which CvtModel does not have")
        count = self.config.num_stages
        chosen = intermediate_stages(count, indices)
        backbone = self.cvt if self.with_head else self
        outputs = backbone(pixel_values, output_hidden_states=True, return_dict=True)
        maps = []
        for stage in chosen:
            grid = outputs["hidden_states"][stage]
            if norm and stage == count - 1:
                grid = self.layernorm(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            maps.append(grid.permute(0, 2, 3, 1) if output_fmt == "NHWC" else grid)
        if intermediates_only:
            return maps
        features = self._normalised_tokens(outputs) if self.with_head else outputs["last_hidden_state"]
        return features, maps

    def num_parameters(self, only_trainable: bool = False) -> int:
        """The number of parameters (BatchNorm statistics are buffers, not counted); `only_trainable`: those with
        `requires_grad`. As transformers' `num_parameters()`."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)


# ---------------------------------------------------------------------------------------------- public models
class CvtModel(CvtPreTrainedModel):
    """The CvT backbone: stages of convolutional token embedding + transformer blocks."""

    with_head = False

    def __init__(self, config: CvtConfig):
        super().__init__(config)
        self.encoder = CvtEncoder(config)
        self.init_weights()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: Optional[bool] = None,
                output_attentions: Optional[bool] = None, return_dict: Optional[bool] = None):
        """`pixel_values` (B, C, H, W) float. Returns `CvtModelOutput` (or its tuple with `return_dict=False`):
        last_hidden_state (B, C_last, H', W'), cls_token_value (B, 1, C_last) or None, hidden_states (one NCHW
        tensor per stage), attentions (one (B, heads, query_tokens, key_tokens) tensor per layer).

        Float input of another dtype than the model's (float32 pixels into a bfloat16 model) is cast to the
        model's dtype, except under autocast."""
        config = self.config
        output_hidden_states = option(output_hidden_states, config.output_hidden_states)
        output_attentions = option(output_attentions, config.output_attentions)
        return_dict = option(return_dict, config.use_return_dict)
        check_pixel_values(self.config, pixel_values)
        outputs = self.encoder(cast_to_model_dtype(pixel_values, self), output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions)
        return returned(outputs, return_dict)


class CvtBackbone(CvtModel):
    """CvT as a dense-task backbone, as transformers' backbones are: the outputs of the stages named in
    `out_features` (or numbered by `out_indices` in `stage_names`, "stem" being the pixel input), as NCHW
    `feature_maps`; the last stage when neither is given. `channels` and `strides` describe the chosen maps. The
    weights are `CvtModel`'s, so a classifier checkpoint loads strictly below its head."""

    def __init__(self, config: CvtConfig, out_features: Optional[List[str]] = None,
                 out_indices: Optional[List[int]] = None):
        super().__init__(config)
        self.stage_names = stage_names(config)
        self.out_features, self.out_indices = resolve_out_features(config, out_features, out_indices)

    @property
    def channels(self) -> List[int]:
        return chosen_channels_and_strides(self.config, self.out_indices)[0]

    @property
    def strides(self) -> List[int]:
        return chosen_channels_and_strides(self.config, self.out_indices)[1]

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike], config: Optional[CvtConfig] = None,
                        strict: bool = True, ignore_mismatched_sizes: bool = False,
                        out_features: Optional[List[str]] = None, out_indices: Optional[List[int]] = None, **kwargs):
        """`CvtModel.from_pretrained` (a classifier checkpoint's head is left out), then the chosen stages."""
        model = super().from_pretrained(name_or_path, config, strict, ignore_mismatched_sizes, **kwargs)
        model.out_features, model.out_indices = resolve_out_features(model.config, out_features, out_indices)
        return model

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: Optional[bool] = None,
                output_attentions: Optional[bool] = None, return_dict: Optional[bool] = None):
        """Returns `CvtBackboneOutput` (or its tuple with `return_dict=False`): `feature_maps`, one contiguous
        (B, C_s, H_s, W_s) tensor per chosen stage; `hidden_states` (every stage) and `attentions` when asked."""
        config = self.config
        output_hidden_states = option(output_hidden_states, config.output_hidden_states)
        return_dict = option(return_dict, config.use_return_dict)
        outputs = super().forward(pixel_values, output_hidden_states=True, output_attentions=output_attentions,
                                  return_dict=True)
        maps = (pixel_values,) + tuple(outputs["hidden_states"])
        result = CvtBackboneOutput(feature_maps=tuple(maps[i].contiguous() for i in self.out_indices),
                                   hidden_states=outputs["hidden_states"] if output_hidden_states else None,
                                   attentions=outputs.get("attentions"))
        return returned(result, return_dict)


class CvtForImageClassification(CvtPreTrainedModel):
    """CvT backbone, final LayerNorm and a linear classifier.

    The pooled feature is the normalised cls token of the last stage, or (without one) the mean of the normalised
    final tokens. `num_labels == 0` leaves the classifier an identity, so the logits are the pooled features.
    """

    with_head = True
    architecture = "CvtForImageClassification"

    def __init__(self, config: CvtConfig):
        super().__init__(config)
        self.cvt = CvtModel(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        with torch.no_grad():  # the backbone initialised itself; only the head is new
            self.layernorm.apply(self._init_weights)
            self.classifier.apply(self._init_weights)

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised final tokens: (B, 1, C_last) with a final cls token, else (B, H'*W', C_last)."""
        return self._normalised_tokens(self.cvt(pixel_values, output_hidden_states=False, output_attentions=False,
                                                return_dict=True))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mean over the tokens of `forward_features`' output, then the classifier (skipped with `pre_logits`)."""
        pooled = features.mean(dim=1)
        return pooled if pre_logits else self.classifier(pooled)

    def _normalised_tokens(self, outputs: CvtModelOutput) -> torch.Tensor:
        # key access: under torch.jit.trace `self.cvt` returns a plain dict of the set fields (see _returned)
        if outputs.get("cls_token_value") is not None:
            return self.layernorm(outputs["cls_token_value"])
        return self.layernorm(grid_to_tokens(outputs["last_hidden_state"]))

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                return_dict: Optional[bool] = None):
        """Returns `CvtImageClassifierOutput` (loss when `labels` are given, logits (B, num_labels), hidden_states,
        attentions) or its tuple with `return_dict=False`."""
        return_dict, labels = option(return_dict, self.config.use_return_dict), option(labels, None)
        outputs = self.cvt(pixel_values, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions, return_dict=True)
        logits = self.forward_head(self._normalised_tokens(outputs))
        loss = self.compute_classification_loss(labels, logits) if labels is not None else None
        result = CvtImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.get("hidden_states"),
                                          attentions=outputs.get("attentions"))
        return returned(result, return_dict)

    def problem_type_for(self, labels: torch.Tensor) -> str:
        """`config.problem_type`, or transformers' inference from num_labels and the labels' dtype
        (`cvt_core.training.problem_type_for`)."""
        return problem_type_for(self, not labels.is_floating_point() and labels.dtype != torch.bool)

    def compute_classification_loss(self, labels: torch.Tensor, logits: torch.Tensor,
                                    sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """transformers' loss for `problem_type_for(labels)`: MSE (regression), cross-entropy ignoring label
        `IGNORE_INDEX` (single label) or BCE with logits (multi label), each a mean over the batch. With
        `sample_weight` (one weight per sample) the loss is sum(w * loss) / n over the n samples that count (label
        `IGNORE_INDEX` does not), 0 when none does: Keras' rule for its compiled losses, which the Keras model's own
        loss follows too."""
        num_labels = self.config.num_labels
        if num_labels == 0:
            raise ValueError("this model has num_labels=0 (no classifier), so it cannot compute a loss from labels")
        return classification_loss(self.problem_type_for(labels), labels, logits, num_labels, sample_weight)

