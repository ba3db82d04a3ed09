"""The compute kernels behind the CvT modules: each function picks, from cheap facts about its own inputs, between a
fast private CPU kernel and the plain public PyTorch op; the modules call these and have a single `forward`.

On CPUs with AVX-512 (AMD Zen 4/5 in particular) oneDNN's float32 GEMM runs about twice as fast as the MKL sgemm
behind F.linear / torch.matmul. `torch.ops.mkldnn._linear_pointwise` (the op torch.compile's CPU backend emits) is
probed once; without it, on another device or with torch.backends.mkldnn disabled, the public ops run.

Under torch.jit tracing or scripting, torch.compile and torch.export every function takes the public op
(F.linear, F.scaled_dot_product_attention, NCHW grids), so the recorded graphs hold public ops only.

- `linear`: x W^T + b. Float32 with autograd: oneDNN forward and backward (`_OneDnnLinear`). Without autograd:
  oneDNN in float32 and, where the CPU supports it, bfloat16 (under CPU autocast in the autocast dtype).
  `linear_gelu`: the same without autograd, with the exact GELU applied in the matmul's epilogue.
- `attention`: softmax(scale q k^T) v over heads. Without autograd and dropout: blocked oneDNN matmuls for many
  keys, else F.scaled_dot_product_attention (float32) or plain matmuls (bfloat16); otherwise the public SDPA.
- `channels_last`: whether a module should keep its token grid channels-last (no transposes copied) - the
  layout of the inference kernels; autograd and the graph recorders keep PyTorch's default NCHW.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_ONEDNN: dict = {}


def _probe_onednn_linear():
    """(the oneDNN linear op or None, whether its exact-GELU epilogue equals F.gelu(F.linear(...)))."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None, False
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(5, 7, generator=gen), torch.randn(3, 7, generator=gen)
        b = torch.randn(3, generator=gen)
        ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
        ok = ok and torch.allclose(op(x.t().contiguous().t(), w.t().contiguous().t(), None, "none", [], ""),
                                   F.linear(x, w), atol=1e-5)
        if not ok:
            return None, False
    except Exception:  # an old or unusual build: F.linear everywhere
        return None, False
    try:
        return op, torch.allclose(op(x, w, b, "gelu", [], "none"), F.gelu(F.linear(x, w, b)), atol=1e-5)
    except Exception:  # no GELU epilogue in this build: the GELU runs on its own
        return op, False


def onednn_op():
    """`torch.ops.mkldnn._linear_pointwise`, or None where it is missing or wrong."""
    if "op" not in _ONEDNN:
        _ONEDNN["op"], _ONEDNN["gelu"] = _probe_onednn_linear()
        try:
            _ONEDNN["bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:
            _ONEDNN["bf16"] = False
    return _ONEDNN["op"]


def recording() -> bool:
    """Whether a graph is being recorded (torch.jit trace/script, torch.compile, torch.export): public ops only."""
    return (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting())


def autocast_dtype(device_type: str = "cpu") -> Optional[torch.dtype]:
    """The autocast dtype where autocast is on for `device_type`, else None."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def onednn_serves(x: torch.Tensor) -> bool:
    """Whether oneDNN matmuls serve tensors like `x`: eager, CPU, float32 or bfloat16 where the CPU supports it."""
    if x.device.type != "cpu" or recording() or onednn_op() is None or not torch._C._get_mkldnn_enabled():
        return False
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _ONEDNN["bf16"])


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd must record an op on `tensors`."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def channels_last(x: torch.Tensor, *weights: Optional[torch.Tensor]) -> bool:
    """Whether the grid of `x` (and the ops using `weights` on it) should stay channels-last: the inference
    kernels' layout (eager CPU oneDNN dtypes, no autograd)."""
    return onednn_serves(x) and not needs_grad(x, *weights)


class _OneDnnLinear(torch.autograd.Function):
    """x W^T + b on oneDNN, forward and backward (float32, CPU). Double backward goes through differentiable matmuls."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_op()(x, weight, bias, "none", [], "")

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
            op = onednn_op()
            if ctx.needs_input_grad[0]:
                grad_x = op(grad2d, weight.t(), None, "none", [], "").view(x.shape)
            if ctx.needs_input_grad[1]:
                grad_w = op(grad2d.t(), x2d.t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2d.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear's result. With autograd: oneDNN (forward and backward) for float32 outside autocast, else F.linear.
    Without: oneDNN in float32 or bfloat16 (under CPU autocast in the autocast dtype, as F.linear would)."""
    if not onednn_serves(x):
        return F.linear(x, weight, bias)
    if needs_grad(x, weight, bias):
        if autocast_dtype(x.device.type) is None and x.dtype == torch.float32 and weight.dtype == torch.float32:
            return _OneDnnLinear.apply(x, weight, bias)
        return F.linear(x, weight, bias)
    operands = _inference_operands(x, weight, bias)
    if operands is None:
        return F.linear(x, weight, bias)  # under autocast F.linear casts as it always does
    return onednn_op()(*operands, "none", [], "")


def _inference_operands(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """(x, weight, bias) as oneDNN computes them without autograd: in the autocast dtype under CPU autocast, else as
    they are; None where oneDNN does not serve that dtype or the dtypes differ."""
    cast = autocast_dtype(x.device.type)
    if cast is not None:
        x, weight = x.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
        if not onednn_serves(x):
            return None
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return None
    return x, weight, bias


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """F.gelu(F.linear(x, weight, bias)) (exact GELU) as one oneDNN matmul with the GELU in its epilogue, which
    saves a pass over the output: without autograd, where `linear` would run oneDNN. None where it would not (the
    caller then runs the two ops)."""
    if not onednn_serves(x) or not _ONEDNN["gelu"] or needs_grad(x, weight, bias):
        return None  # (onednn_serves ran the probes)
    operands = _inference_operands(x, weight, bias)
    return None if operands is None else onednn_op()(*operands, "gelu", [], "none")


# Inference attention, by measurement on a 2-core AVX-512 CPU: with many keys, blocked oneDNN matmuls per image and
# head (the scores of a block of queries stay in L2); with few keys, F.scaled_dot_product_attention in float32 and
# plain matmuls (oneDNN in bfloat16) in bfloat16.
_BLOCKED_ATTENTION_MIN_KEYS = {torch.float32: 128, torch.bfloat16: 512}
_ATTENTION_BLOCK_SCORES = 1 << 19


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int, scale: float,
              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(scale q k^T) v over `num_heads` heads, with attention dropout `dropout_p`; tokens (B, T, C) in and
    out. Without autograd or dropout on oneDNN's CPU dtypes the inference kernels run; otherwise the public SDPA."""
    if dropout_p == 0.0 and onednn_serves(query) and not needs_grad(query, key, value):
        dtype = autocast_dtype(query.device.type) or query.dtype
        if dtype in _BLOCKED_ATTENTION_MIN_KEYS and key.shape[1] >= _BLOCKED_ATTENTION_MIN_KEYS[dtype]:
            return _blocked_attention(query * scale, key, value, num_heads)
        if query.dtype != torch.float32:
            q, k, v = (split_heads(t, num_heads) for t in (query, key, value))
            probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
            return merge_heads(torch.matmul(probs.to(v.dtype), v))
    q, k, v = (split_heads(t, num_heads) for t in (query, key, value))
    return merge_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale))


def split_heads(tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, C) -> (B, heads, T, C / heads)."""
    return tokens.unflatten(2, (num_heads, tokens.shape[2] // num_heads)).transpose(1, 2)


def merge_heads(heads: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, d) -> (B, T, heads * d)."""
    return heads.transpose(1, 2).flatten(2)


def _blocked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q k^T) v per image and head, in blocks of queries, on oneDNN. Tokens (B, T, C) in and out; the scale
    is already in `query`. Inference only."""
    op = onednn_op()
    batch, num_queries, channels = query.shape
    num_keys = key.shape[1]
    # oneDNN wants dense per-head matrices: (B, heads, T, d) (no copy with one head)
    query, key, value = (split_heads(t, num_heads).contiguous() for t in (query, key, value))
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
    return merge_heads(out.view(batch, num_heads, num_queries, channels // num_heads))
