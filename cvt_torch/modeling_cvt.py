"""PyTorch implementation of CvT (Convolutional vision Transformer, arXiv 2103.15808).

One file holds the whole network: the convolutional token embedding, the attention with convolutional q/k/v
projections, the transformer block, the stages, the bare backbone `CvtModel` and `CvtForImageClassification`.

The module tree mirrors transformers' so `state_dict()` keys and shapes are exactly
`cvt_core.weights.weight_table(config, with_head)`: transformers checkpoints load unchanged and ours load in
transformers. Inference outputs equal transformers 4.57.6 for every config it can build; the behaviours where
transformers departs from the original microsoft/CvT code are fixed here: per-layer drop-path schedule,
drop path on the residual branch only, any depth per stage, a cls token on any stage sized by that stage, the
"avg" projection, a classifier without a final cls token.

Speed (CPU). Two things make this fast without changing results beyond float32 rounding (tests hold it to
transformers at 1e-5 on exactly this code):
- every float32 Linear (`CvtLinear`, an nn.Linear with the same parameters) runs its matmuls, forward and backward,
  on oneDNN, about twice MKL's sgemm rate on AVX-512 AMD CPUs; this serves training and every other mode too;
- in eval mode without autograd (`torch.no_grad()` / `inference_mode()`, float32 or bfloat16, no hooks, see
  `CvtEncoder.can_fuse`) the encoder takes a fused path: the token grid stays channels-last so no transposes are
  copied, the eval BatchNorm is folded into the depthwise kernels (recomputed on each call, never stale), the GELU
  and the residual adds ride on the matmuls, attention over many keys runs as blocked oneDNN matmuls, and the
  classifier's last block is computed for the cls token only (the logits are bit-for-bit those of the full block).
Anything else (training, autograd, attentions, hooks, other devices) runs module by module as before.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvt_core.checkpoint import read_pretrained, save_pretrained_state
from cvt_core.config import CvtConfig
from cvt_core.outputs import CvtImageClassifierOutput, CvtModelOutput
from cvt_core.shapes import check_pixel_values_shape

logger = logging.getLogger(__name__)

# Every LayerNorm of CvT uses 1e-5, as the released weights were trained; `config.layer_norm_eps` is not read.
LAYER_NORM_EPS = 1e-5
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.1
# F.cross_entropy's default ignore_index: a label that adds nothing to the loss (transformers' padding convention)
IGNORE_INDEX = -100


def check_class_labels(labels: torch.Tensor, num_labels: int) -> None:
    """Raise `ValueError` unless every label is a class index in [0, num_labels) or `IGNORE_INDEX`, instead of an
    IndexError on CPU. One reduction; skipped while tracing, scripting, compiling or exporting, where the values are
    not known. On an accelerator the check is queued with the kernels (no host sync per step), so a bad label
    surfaces as a device-side assert carrying the same message."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() or labels.numel() == 0:
        return
    invalid = ((labels < 0) | (labels >= num_labels)) & (labels != IGNORE_INDEX)
    if labels.device.type != "cpu":
        torch._assert_async(~invalid.any(), f"labels must be class indices in [0, num_labels={num_labels})")
        return
    if bool(invalid.any()):
        bad = labels[invalid][0].item()
        raise ValueError(f"labels must be class indices in [0, num_labels={num_labels}); got {bad}")


# ---------------------------------------------------------------------------------------------- fast CPU kernels
# On CPUs with AVX-512 (AMD Zen 4/5 in particular) oneDNN's float32 GEMM runs about twice as fast as the MKL sgemm
# behind F.linear / torch.matmul, and it fuses the bias, the exact (erf) GELU and a residual add into the matmul.
# `torch.ops.mkldnn._linear_pointwise` is the op torch.compile's CPU backend emits for those fusions. It is probed
# once; without it (or on another device, or with torch.backends.mkldnn disabled) everything falls back to F.linear.
_ONEDNN: dict = {}


def _probe_onednn_linear():
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(5, 7, generator=gen), torch.randn(3, 7, generator=gen)
        b, r = torch.randn(3, generator=gen), torch.randn(5, 3, generator=gen)
        ref = F.linear(x, w, b)
        ok = torch.allclose(op(x, w, b, "none", [], ""), ref, atol=1e-5)
        ok = ok and torch.allclose(op(x, w, b, "gelu", [], "none"), F.gelu(ref), atol=1e-5)
        ok = ok and torch.allclose(op.binary(x, r, w, b, "add"), ref + r, atol=1e-5)
        ok = ok and torch.allclose(op(x.t().contiguous().t(), w.t().contiguous().t(), None, "none", [], ""),
                                   F.linear(x, w), atol=1e-5)
        return op if ok else None
    except Exception:  # an old or unusual build: F.linear everywhere
        return None


def _onednn_op():
    """`torch.ops.mkldnn._linear_pointwise`, or None where it is missing or wrong."""
    if "op" not in _ONEDNN:
        _ONEDNN["op"] = _probe_onednn_linear()
        try:
            _ONEDNN["bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:
            _ONEDNN["bf16"] = False
    return _ONEDNN["op"]


def _onednn_ok(x: torch.Tensor) -> bool:
    """Whether oneDNN matmuls serve tensors like `x` (CPU, float32 or bfloat16 where the CPU supports it). Never
    while torch.compile traces: inductor lowers F.linear itself (it cannot lower this op with weights that are
    graph inputs rather than frozen constants)."""
    if (x.device.type != "cpu" or torch.compiler.is_compiling() or _onednn_op() is None
            or not torch._C._get_mkldnn_enabled()):
        return False
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _ONEDNN["bf16"])


def _autocast_dtype(device_type: str = "cpu") -> Optional[torch.dtype]:
    """The autocast dtype where autocast is on for `device_type`, else None."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class _OneDnnLinear(torch.autograd.Function):
    """x W^T + b on oneDNN, forward and backward (float32, CPU). Double backward goes through differentiable matmuls."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_op()(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        grad2d = grad.reshape(-1, grad.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled():  # create_graph: stay differentiable
            if ctx.needs_input_grad[0]:
                grad_x = grad.matmul(weight)
            if ctx.needs_input_grad[1]:
                grad_w = grad2d.t().matmul(x2d)
        else:
            op = _onednn_op()
            if ctx.needs_input_grad[0]:
                grad_x = op(grad2d, weight.t(), None, "none", [], "").view(x.shape)
            if ctx.needs_input_grad[1]:
                grad_w = op(grad2d.t(), x2d.t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2d.sum(0)
        return grad_x, grad_w, grad_b


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear, with float32 CPU matmuls (forward and backward) on oneDNN. Autocast and other dtypes: F.linear."""
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and _onednn_ok(x)
            and _autocast_dtype(x.device.type) is None):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _OneDnnLinear.apply(x, weight, bias)
        return _onednn_op()(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool = False,
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inference only (no autograd): `gelu(x W^T + b)` or `residual + x W^T + b` in one oneDNN call where possible.

    Under CPU autocast the matmul runs in the autocast dtype, as F.linear would."""
    cast = _autocast_dtype(x.device.type)
    if cast is not None:
        x = x.to(cast) if x.is_floating_point() else x
        weight = weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    op = _onednn_op() if _onednn_ok(x) else None
    if op is not None and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
        if residual is not None and not gelu and residual.dtype == x.dtype and residual.shape[:-1] == x.shape[:-1]:
            return op.binary(x, residual.contiguous(), weight, bias, "add")
        out = op(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
    else:
        out = F.linear(x, weight, bias)
        if gelu:
            out = F.gelu(out)
    return out if residual is None else residual + out


# Inference attention, by measurement on a 2-core AVX-512 CPU: with many keys, blocked oneDNN matmuls per image and
# head (the scores of a block of queries stay in L2); with few keys, F.scaled_dot_product_attention in float32 and
# plain matmuls (oneDNN in bfloat16) in bfloat16.
_BLOCKED_ATTENTION_MIN_KEYS = {torch.float32: 128, torch.bfloat16: 512}
_ATTENTION_BLOCK_SCORES = 1 << 19


def _use_blocked_attention(query: torch.Tensor, num_keys: int) -> bool:
    dtype = _autocast_dtype(query.device.type) or query.dtype
    return dtype in _BLOCKED_ATTENTION_MIN_KEYS and num_keys >= _BLOCKED_ATTENTION_MIN_KEYS[dtype] and _onednn_ok(query)


def _inference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int,
                         scale: Optional[float]) -> torch.Tensor:
    """softmax(scale q k^T) v over heads; tokens (B, T, C) in and out; `scale` None: already in `query`."""
    if scale is None:
        return _blocked_attention(query, key, value, num_heads)
    batch, num_queries, channels = query.shape

    def heads(t):
        return t.unflatten(2, (num_heads, channels // num_heads)).transpose(1, 2)

    if query.dtype == torch.float32:
        context = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), scale=scale)
    else:
        probs = torch.softmax(torch.matmul(heads(query), heads(key).transpose(-1, -2)) * scale, dim=-1)
        context = torch.matmul(probs.to(value.dtype), heads(value))
    return context.transpose(1, 2).reshape(batch, num_queries, channels)


def _blocked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q k^T) v per image and head, in blocks of queries, on oneDNN. Tokens (B, T, C) in and out; the scale
    is already in `query`. Inference only."""
    op = _onednn_op()
    batch, num_queries, channels = query.shape
    num_keys = key.shape[1]
    head_dim = channels // num_heads
    if num_heads > 1:  # oneDNN wants dense per-head matrices: (B, heads, T, d)
        query, key, value = (t.unflatten(2, (num_heads, head_dim)).transpose(1, 2).contiguous()
                             for t in (query, key, value))
    else:
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
    rows = max(16, min(num_queries, _ATTENTION_BLOCK_SCORES // num_keys))
    blocks = []
    for b in range(batch):
        for h in range(num_heads):
            keys, values_t = key[b, h], value[b, h].t()
            for start in range(0, num_queries, rows):
                scores = op(query[b, h, start:start + rows], keys, None, "none", [], "")
                probs = torch.softmax(scores, dim=-1).to(values_t.dtype)
                blocks.append(op(probs, values_t, None, "none", [], ""))
    out = torch.cat(blocks)  # (B * heads * T_q, d), in (b, h, t) order
    if num_heads == 1:
        return out.view(batch, num_queries, channels)
    return out.view(batch, num_heads, num_queries, head_dim).transpose(1, 2).reshape(batch, num_queries, channels)


# ---------------------------------------------------------------------------------------------- small pieces
class CvtLinear(nn.Linear):
    """nn.Linear (same parameters and names) whose float32 CPU matmuls, forward and backward, run on oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


def _tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def _grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return grid.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------- embedding
class CvtConvEmbeddings(nn.Module):
    """Strided convolution from the previous grid to this stage's tokens, then LayerNorm over channels."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, stride: int, padding: int):
        super().__init__()
        self.projection = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.normalization = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

    def forward(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        grid = self.projection(pixel_values)
        height, width = grid.shape[-2:]
        return self.normalization(_grid_to_tokens(grid)), height, width


class CvtEmbeddings(nn.Module):
    """Token embedding of one stage; the dropout runs after the stage's cls token is prepended (as the original)."""

    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        self.convolution_embeddings = CvtConvEmbeddings(
            in_channels=config.stage_in_channels(stage),
            embed_dim=config.embed_dim[stage],
            patch_size=config.patch_sizes[stage],
            stride=config.patch_stride[stage],
            padding=config.patch_padding[stage],
        )
        self.dropout = nn.Dropout(config.drop_rate[stage])

    def forward(self, pixel_values: torch.Tensor, cls_token: Optional[torch.Tensor] = None):
        tokens, height, width = self.convolution_embeddings(pixel_values)
        if cls_token is not None:
            tokens = torch.cat((cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return self.dropout(tokens), height, width


# ---------------------------------------------------------------------------------------------- attention
class CvtSelfAttentionConvProjection(nn.Module):
    """Depthwise convolution (no bias) then BatchNorm: the "dw_bn" projection of the released weights."""

    def __init__(self, embed_dim: int, kernel_size: int, padding: int, stride: int):
        super().__init__()
        self.convolution = nn.Conv2d(
            embed_dim, embed_dim, kernel_size=kernel_size, padding=padding, stride=stride, bias=False, groups=embed_dim
        )
        self.normalization = nn.BatchNorm2d(embed_dim, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.convolution(grid))

    def folded_weight_and_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode BatchNorm folded into the depthwise kernel: conv(x, w * s) + (beta - mean * s) with
        s = gamma / sqrt(running_var + eps). Recomputed on every call (a few small ops), so it never goes stale."""
        bn, weight = self.normalization, self.convolution.weight
        scale = torch.rsqrt(bn.running_var.float() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.float()
        shift = -bn.running_mean.float() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        return (weight.float() * scale.view(-1, 1, 1, 1)).to(weight.dtype), shift.to(weight.dtype)

    def fused_forward(self, grid: torch.Tensor) -> torch.Tensor:
        """Eval-mode forward with the BatchNorm folded into the convolution (one op)."""
        weight, bias = self.folded_weight_and_bias()
        conv = self.convolution
        return F.conv2d(grid, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class CvtSelfAttentionProjection(nn.Module):
    """Spatial part of one of the q/k/v projections, returning tokens (B, T, C).

    "dw_bn": depthwise conv + BN. "avg" (keys and values): AvgPool2d with ceil_mode, as the original code.
    "linear" (and the query of "avg"): no spatial operation. Only "dw_bn" has weights.
    """

    def __init__(self, method: str, embed_dim: int, kernel_size: int, padding: int, stride: int):
        super().__init__()
        if method == "dw_bn":
            self.convolution_projection = CvtSelfAttentionConvProjection(embed_dim, kernel_size, padding, stride)
        elif method == "avg":
            self.convolution_projection = nn.AvgPool2d(kernel_size, stride, padding, ceil_mode=True)
        elif method == "linear":
            self.convolution_projection = nn.Identity()
        else:
            raise ValueError(f"qkv_projection_method={method!r} is unknown; choose 'dw_bn', 'avg' or 'linear'")

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return _grid_to_tokens(self.convolution_projection(grid))

    def fused_forward(self, grid: torch.Tensor) -> torch.Tensor:
        projection = self.convolution_projection
        if isinstance(projection, CvtSelfAttentionConvProjection):
            return _grid_to_tokens(projection.fused_forward(grid))
        return _grid_to_tokens(projection(grid))


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
        method, kernel = config.qkv_projection_method[stage], config.kernel_qkv[stage]
        query_method = "linear" if method == "avg" else method
        self.convolution_projection_query = CvtSelfAttentionProjection(
            query_method, self.embed_dim, kernel, config.padding_q[stage], config.stride_q[stage])
        self.convolution_projection_key = CvtSelfAttentionProjection(
            method, self.embed_dim, kernel, config.padding_kv[stage], config.stride_kv[stage])
        self.convolution_projection_value = CvtSelfAttentionProjection(
            method, self.embed_dim, kernel, config.padding_kv[stage], config.stride_kv[stage])
        bias = bool(config.qkv_bias[stage])
        self.projection_query = CvtLinear(self.embed_dim, self.embed_dim, bias=bias)
        self.projection_key = CvtLinear(self.embed_dim, self.embed_dim, bias=bias)
        self.projection_value = CvtLinear(self.embed_dim, self.embed_dim, bias=bias)
        self.dropout = nn.Dropout(config.attention_drop_rate[stage])

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, _ = tokens.shape
        return tokens.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, height: int, width: int, output_attentions: bool = False):
        if self.with_cls_token:
            cls_token, tokens = tokens[:, :1], tokens[:, 1:]
        grid = _tokens_to_grid(tokens, height, width)
        query = self.convolution_projection_query(grid)
        key = self.convolution_projection_key(grid)
        value = self.convolution_projection_value(grid)
        if self.with_cls_token:
            query = torch.cat((cls_token, query), dim=1)
            key = torch.cat((cls_token, key), dim=1)
            value = torch.cat((cls_token, value), dim=1)
        query = self._split_heads(self.projection_query(query))
        key = self._split_heads(self.projection_key(key))
        value = self._split_heads(self.projection_value(value))

        if output_attentions:
            # Explicit path; the returned probabilities are those before attention dropout (as transformers' models
            # return them), the context uses the dropped ones.
            probs = torch.softmax(torch.matmul(query, key.transpose(-2, -1)) * self.scale, dim=-1)
            context = torch.matmul(self.dropout(probs), value)
        else:
            probs = None
            context = F.scaled_dot_product_attention(
                query, key, value, dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale)
        context = context.transpose(1, 2).reshape(context.shape[0], context.shape[2], self.embed_dim)
        return context, probs

    def fused_context(self, tokens: torch.Tensor, height: int, width: int, cls_only: bool = False) -> torch.Tensor:
        """Eval-mode attention context (B, T_q, C) without autograd: BatchNorm folded into the depthwise convs, the
        token grid kept channels-last (no transposes), blocked oneDNN attention for large score matrices.
        With `cls_only` only the cls token queries (the classifier's last layer)."""
        if self.with_cls_token:
            cls_token, tokens = tokens[:, :1], tokens[:, 1:]
        grid = tokens.transpose(1, 2).unflatten(2, (height, width))  # channels-last view of the tokens
        if not grid.is_contiguous(memory_format=torch.channels_last):
            grid = grid.contiguous(memory_format=torch.channels_last)  # once for the three convolutions
        if cls_only:
            query = cls_token
        else:
            query = self.convolution_projection_query.fused_forward(grid)
        key = self.convolution_projection_key.fused_forward(grid)
        value = self.convolution_projection_value.fused_forward(grid)
        if self.with_cls_token:
            if not cls_only:
                query = torch.cat((cls_token, query), dim=1)
            key = torch.cat((cls_token, key), dim=1)
            value = torch.cat((cls_token, value), dim=1)
        blocked = _use_blocked_attention(query, key.shape[1])
        q_weight, q_bias = self.projection_query.weight, self.projection_query.bias
        if blocked:  # the scale rides on the query projection
            q_weight = q_weight * self.scale
            q_bias = None if q_bias is None else q_bias * self.scale
        query = _fused_linear(query, q_weight, q_bias)
        key = _fused_linear(key, self.projection_key.weight, self.projection_key.bias)
        value = _fused_linear(value, self.projection_value.weight, self.projection_value.bias)
        return _inference_attention(query, key, value, self.num_heads, None if blocked else self.scale)


class CvtSelfOutput(nn.Module):
    """Output projection of the attention, then dropout (the residual add lives in `CvtLayer`)."""

    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        self.dense = CvtLinear(config.embed_dim[stage], config.embed_dim[stage])
        self.dropout = nn.Dropout(config.drop_rate[stage])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden))


class CvtAttention(nn.Module):
    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        self.attention = CvtSelfAttention(config, stage)
        self.output = CvtSelfOutput(config, stage)

    def forward(self, tokens: torch.Tensor, height: int, width: int, output_attentions: bool = False):
        context, probs = self.attention(tokens, height, width, output_attentions)
        return self.output(context), probs


# ---------------------------------------------------------------------------------------------- MLP and block
class CvtIntermediate(nn.Module):
    """First MLP layer, activation, and the original's dropout after the activation."""

    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        self.dense = CvtLinear(config.embed_dim[stage], config.mlp_hidden_dim(stage))
        self.activation = make_activation(config.hidden_act)
        self.dropout = nn.Dropout(config.drop_rate[stage])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.activation(self.dense(hidden)))


class CvtOutput(nn.Module):
    """Second MLP layer and dropout (the residual add lives in `CvtLayer`)."""

    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        self.dense = CvtLinear(config.mlp_hidden_dim(stage), config.embed_dim[stage])
        self.dropout = nn.Dropout(config.drop_rate[stage])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden))


class CvtLayer(nn.Module):
    """Pre-norm transformer block: x + drop_path(attn(LN(x))), then x + drop_path(mlp(LN(x)))."""

    def __init__(self, config: CvtConfig, stage: int, drop_path_rate: float):
        super().__init__()
        self.attention = CvtAttention(config, stage)
        self.intermediate = CvtIntermediate(config, stage)
        self.output = CvtOutput(config, stage)
        self.drop_path = CvtDropPath(drop_path_rate)
        self.layernorm_before = nn.LayerNorm(config.embed_dim[stage], eps=LAYER_NORM_EPS)
        self.layernorm_after = nn.LayerNorm(config.embed_dim[stage], eps=LAYER_NORM_EPS)

    def forward(self, tokens: torch.Tensor, height: int, width: int, output_attentions: bool = False):
        attention_output, probs = self.attention(self.layernorm_before(tokens), height, width, output_attentions)
        tokens = tokens + self.drop_path(attention_output)
        mlp_output = self.output(self.intermediate(self.layernorm_after(tokens)))
        tokens = tokens + self.drop_path(mlp_output)
        return tokens, probs

    def fused_forward(self, tokens: torch.Tensor, height: int, width: int, cls_only: bool = False) -> torch.Tensor:
        """Eval-mode block without autograd: the residual adds and the GELU ride on the oneDNN matmuls. With
        `cls_only` it returns only the cls token (B, 1, C), all the classifier reads from the last block."""
        norm = self.layernorm_before
        hidden = F.layer_norm(tokens, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        context = self.attention.attention.fused_context(hidden, height, width, cls_only)
        dense = self.attention.output.dense
        tokens = _fused_linear(context, dense.weight, dense.bias, residual=tokens[:, :1] if cls_only else tokens)
        norm = self.layernorm_after
        hidden = F.layer_norm(tokens, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        fc1, activation = self.intermediate.dense, self.intermediate.activation
        if type(activation) is nn.GELU and activation.approximate == "none":
            hidden = _fused_linear(hidden, fc1.weight, fc1.bias, gelu=True)
        else:
            hidden = activation(_fused_linear(hidden, fc1.weight, fc1.bias))
        fc2 = self.output.dense
        return _fused_linear(hidden, fc2.weight, fc2.bias, residual=tokens)


# ---------------------------------------------------------------------------------------------- stages
class CvtStage(nn.Module):
    """Token embedding, optional cls token, and `depth[stage]` blocks with a per-layer drop-path schedule."""

    def __init__(self, config: CvtConfig, stage: int):
        super().__init__()
        self.stage = stage
        self.with_cls_token = bool(config.cls_token[stage])
        if self.with_cls_token:
            # Registered first so the state_dict order matches transformers'; sized by this stage's width.
            self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim[stage]))
        self.embedding = CvtEmbeddings(config, stage)
        self.layers = nn.ModuleList(
            CvtLayer(config, stage, rate) for rate in config.drop_path_rates(stage)
        )

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False):
        tokens, height, width = self.embedding(pixel_values, self.cls_token if self.with_cls_token else None)
        attentions: List[torch.Tensor] = []
        for layer in self.layers:
            tokens, probs = layer(tokens, height, width, output_attentions)
            if output_attentions:
                attentions.append(probs)
        cls_token = None
        if self.with_cls_token:
            cls_token, tokens = tokens[:, :1], tokens[:, 1:]
        return _tokens_to_grid(tokens, height, width), cls_token, attentions

    def fused_forward(self, grid: torch.Tensor, cls_only: bool = False, final: bool = False):
        """Eval-mode stage without autograd on a channels-last grid; returns (grid or None, cls token or None).

        In the `final` stage the returned cls token always comes from the last block run for the cls token alone,
        so the logits are bit-for-bit the same whether the rest of that block is computed (hidden states asked
        for) or skipped (`cls_only`, grid None)."""
        embeddings = self.embedding.convolution_embeddings
        conv, norm = embeddings.projection, embeddings.normalization
        grid = F.conv2d(grid, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        height, width = grid.shape[-2:]
        tokens = F.layer_norm(_grid_to_tokens(grid), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        if self.with_cls_token:
            tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        split_last = final and self.with_cls_token and len(self.layers) > 0
        layers = self.layers[:-1] if split_last else self.layers
        for layer in layers:
            tokens = layer.fused_forward(tokens, height, width)
        if split_last:
            cls_token = self.layers[-1].fused_forward(tokens, height, width, cls_only=True)
            if cls_only:
                return None, cls_token
            tokens = self.layers[-1].fused_forward(tokens, height, width)[:, 1:]
        else:
            cls_token = None
            if self.with_cls_token:
                cls_token, tokens = tokens[:, :1], tokens[:, 1:]
        return tokens.transpose(1, 2).unflatten(2, (height, width)), cls_token


class CvtEncoder(nn.Module):
    def __init__(self, config: CvtConfig):
        super().__init__()
        self.stages = nn.ModuleList(CvtStage(config, s) for s in range(config.num_stages))

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False,
                cls_only: bool = False):
        """`cls_only` (the classifier's request, honoured on the fast path only): the last stage computes just the
        cls token in its last block, and `last_hidden_state` is None."""
        if self.can_fuse(pixel_values, output_attentions):
            return self.fused_forward(pixel_values, output_hidden_states, cls_only)
        hidden = pixel_values
        cls_token = None
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

    def can_fuse(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> bool:
        """Whether this call may take the fused inference path: eval mode everywhere, no autograd needed, CPU float32
        or bfloat16 with oneDNN, no attentions asked for, and the standard modules without hooks (a hook, a
        replaced module or a patched forward sends the call down the module-by-module path, which runs them).
        Under torch.compile the fused path runs with inductor's own matmul kernels instead of oneDNN calls."""
        if (output_attentions or pixel_values.device.type != "cpu"
                or pixel_values.dtype not in (torch.float32, torch.bfloat16)):
            return False
        grad = torch.is_grad_enabled()
        if grad and pixel_values.requires_grad:
            return False
        compiling = torch.compiler.is_compiling()
        if compiling:
            return not grad and not any(module.training for module in self.modules())
        if not _onednn_ok(pixel_values):
            return False
        if (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
                or nn.modules.module._global_backward_hooks or nn.modules.module._global_backward_pre_hooks):
            return False
        for module in self.modules():
            if (module.training or type(module) not in _FUSABLE_MODULES or module._forward_hooks
                    or module._forward_pre_hooks or "forward" in module.__dict__):
                return False
            if grad and any(p is not None and p.requires_grad for p in module._parameters.values()):
                return False
        return True

    def fused_forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False, cls_only: bool = False):
        hidden = pixel_values.contiguous(memory_format=torch.channels_last)
        cls_token = None
        all_hidden_states = [] if output_hidden_states else None
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            hidden, cls_token = stage.fused_forward(hidden, cls_only=cls_only and i == last, final=i == last)
            if output_hidden_states:
                all_hidden_states.append(hidden)
        return CvtModelOutput(
            last_hidden_state=hidden,
            cls_token_value=cls_token,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=None,
        )


# Modules the fused path knows how to run; any other type in the tree (a replaced submodule) disables it.
_FUSABLE_MODULES = {
    CvtEncoder, CvtStage, CvtEmbeddings, CvtConvEmbeddings, CvtLayer, CvtAttention, CvtSelfAttention,
    CvtSelfAttentionProjection, CvtSelfAttentionConvProjection, CvtSelfOutput, CvtIntermediate, CvtOutput,
    CvtDropPath, CvtLinear, QuickGELU, nn.GELU, nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.Dropout,
    nn.AvgPool2d, nn.Identity, nn.ModuleList,
}


def register_fusable_module(module_class: type) -> type:
    """Declare that `module_class`, in eval mode, computes exactly what the standard module it subclasses computes
    (e.g. a synchronised BatchNorm2d that differs only in training), so models holding it keep the fused inference
    path. Usable as a class decorator."""
    _FUSABLE_MODULES.add(module_class)
    return module_class


# ---------------------------------------------------------------------------------------------- base class
def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        try:
            import ml_dtypes

            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        except ImportError:  # safetensors' BF16 cannot be written without ml_dtypes; keep the values in float32
            tensor = tensor.float()
    return tensor.numpy()


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.array(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))  # a writable copy: checkpoint arrays are read-only memory maps


class CvtPreTrainedModel(nn.Module):
    """Shared by `CvtModel` and `CvtForImageClassification`: input checks, initialisation, checkpoint I/O."""

    # Whether the state_dict holds the classification head (and the `cvt.` backbone prefix).
    with_head: bool = False

    def __init__(self, config: CvtConfig):
        super().__init__()
        if not isinstance(config, CvtConfig):
            raise TypeError(f"config must be a cvt_core CvtConfig, got {type(config).__name__}")
        config.validate()
        self.config = config

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

    # ------------------------------------------------------------------ input checks
    def _check_pixel_values(self, pixel_values) -> None:
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
        check_pixel_values_shape(self.config, tuple(int(d) for d in pixel_values.shape))

    def _cast_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.encoder.stages[0].embedding.convolution_embeddings.projection.weight
        if pixel_values.dtype != weight.dtype and _autocast_dtype(pixel_values.device.type) is None:
            return pixel_values.to(weight.dtype)
        return pixel_values

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], config: Optional[CvtConfig] = None,
                        strict: bool = True, ignore_mismatched_sizes: bool = False, **config_overrides):
        """Build the model from a transformers-format folder: config.json + model.safetensors / pytorch_model.bin, or
        tf_model.h5 (transformers' TF weights) in a folder without PyTorch weights.

        A classifier checkpoint loads into `CvtModel` (its head is ignored); a bare checkpoint loads into
        `CvtForImageClassification` with a freshly initialised head (logged as a warning). Missing, unexpected or
        mis-shaped weights raise `WeightLoadError` unless `strict=False` / `ignore_mismatched_sizes=True`, in which
        case the affected weights keep their fresh initialisation and a warning is logged.
        """
        directory = os.fspath(directory)
        config, state, plan = read_pretrained(directory, cls.with_head, config, strict, ignore_mismatched_sizes,
                                              **config_overrides)

        model = cls(config)
        own_state = model.state_dict()
        with torch.no_grad():
            for target, source in plan.assignments.items():
                destination = own_state[target]
                destination.copy_(_to_tensor(state[source]).to(dtype=destination.dtype))
        if plan.fresh_head:
            logger.warning("%s: the checkpoint has no classification head; newly initialised: %s",
                           directory, ", ".join(plan.fresh_head))
        if plan.missing:
            logger.warning("%s: weights missing from the checkpoint, left freshly initialised: %s",
                           directory, ", ".join(plan.missing))
        if plan.unexpected:
            logger.warning("%s: checkpoint weights not used by %s: %s", directory, cls.__name__, ", ".join(plan.unexpected))
        if plan.mismatched:
            logger.warning("%s: weights with a different shape in the checkpoint, left freshly initialised: %s",
                           directory, ", ".join(f"{n} {got} vs {want}" for n, want, got in plan.mismatched))
        return model.eval()

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write config.json and model.safetensors, loadable by `from_pretrained` here and in transformers."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        config = copy.deepcopy(self.config)
        config.extra["architectures"] = [type(self).__name__]
        config.save_pretrained(directory)
        save_pretrained_state(directory, {name: _to_numpy(t) for name, t in self.state_dict().items()})

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------- public models
class CvtModel(CvtPreTrainedModel):
    """The CvT backbone: stages of convolutional token embedding + transformer blocks."""

    with_head = False

    def __init__(self, config: CvtConfig):
        super().__init__(config)
        self.encoder = CvtEncoder(config)
        self.init_weights()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: Optional[bool] = None,
                output_attentions: Optional[bool] = None, return_dict: Optional[bool] = None,
                _cls_token_only: bool = False):
        """`pixel_values` (B, C, H, W) float. Returns `CvtModelOutput` (or its tuple with `return_dict=False`):
        last_hidden_state (B, C_last, H', W'), cls_token_value (B, 1, C_last) or None, hidden_states (one NCHW
        tensor per stage), attentions (one (B, heads, query_tokens, key_tokens) tensor per layer).

        Float input of another dtype than the model's (float32 pixels into a bfloat16 model) is cast to the
        model's dtype, except under autocast. In eval mode without autograd the call takes the fused fast path
        (see `CvtEncoder.can_fuse`); the outputs are the same to float32 rounding."""
        config = self.config
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        return_dict = config.use_return_dict if return_dict is None else return_dict
        self._check_pixel_values(pixel_values)
        pixel_values = self._cast_pixel_values(pixel_values)
        outputs = self.encoder(pixel_values, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions,
                               cls_only=_cls_token_only and not output_hidden_states)
        return outputs if return_dict else outputs.to_tuple()


class CvtForImageClassification(CvtPreTrainedModel):
    """CvT backbone, final LayerNorm and a linear classifier.

    The pooled feature is the normalised cls token of the last stage, or (without one) the mean of the normalised
    final tokens. `num_labels == 0` leaves the classifier an identity, so the logits are the pooled features.
    """

    with_head = True

    def __init__(self, config: CvtConfig):
        super().__init__(config)
        self.cvt = CvtModel(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.classifier = CvtLinear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        with torch.no_grad():  # the backbone initialised itself; only the head is new
            self.layernorm.apply(self._init_weights)
            self.classifier.apply(self._init_weights)

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised final tokens: (B, 1, C_last) with a final cls token, else (B, H'*W', C_last)."""
        return self._normalised_tokens(self.cvt(pixel_values, output_hidden_states=False, output_attentions=False,
                                                return_dict=True, _cls_token_only=True))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mean over the tokens of `forward_features`' output, then the classifier (skipped with `pre_logits`)."""
        pooled = features.mean(dim=1)
        return pooled if pre_logits else self.classifier(pooled)

    def _normalised_tokens(self, outputs: CvtModelOutput) -> torch.Tensor:
        if outputs.cls_token_value is not None:
            return self.layernorm(outputs.cls_token_value)
        return self.layernorm(_grid_to_tokens(outputs.last_hidden_state))

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                return_dict: Optional[bool] = None):
        """Returns `CvtImageClassifierOutput` (loss when `labels` are given, logits (B, num_labels), hidden_states,
        attentions) or its tuple with `return_dict=False`."""
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        # Only the final cls token reaches the logits: the fast path skips the rest of the last block (exact).
        outputs = self.cvt(pixel_values, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions, return_dict=True, _cls_token_only=True)
        logits = self.forward_head(self._normalised_tokens(outputs))
        loss = self.compute_loss(logits, labels) if labels is not None else None
        result = CvtImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                          attentions=outputs.attentions)
        return result if return_dict else result.to_tuple()

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' rule: `config.problem_type`, or else inferred for this call only (the config is not
        changed): one label -> MSE regression; integer labels -> cross-entropy; otherwise multi-label BCE."""
        num_labels = self.config.num_labels
        if num_labels == 0:
            raise ValueError("this model has num_labels=0 (no classifier), so it cannot compute a loss from labels")
        problem_type = self.config.problem_type
        if problem_type is None:
            if num_labels == 1:
                problem_type = "regression"
            elif not labels.is_floating_point() and labels.dtype != torch.bool:
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        if problem_type == "regression":
            labels = labels.to(logits.dtype)
            if num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if problem_type == "single_label_classification":
            labels = labels.reshape(-1).long()
            check_class_labels(labels, num_labels)
            return F.cross_entropy(logits.view(-1, num_labels), labels)
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
