"""Speed as an explicit step: `optimize_for_inference(model)`, a deploy-only copy of a CvT model that computes the
same outputs faster on CPU, and `optimize_for_training(model)`, a copy that trains the model's own parameters with
oneDNN matmuls. The model itself (`cvt_torch.modeling_cvt`) uses PyTorch's standard modules and public ops only;
every fast kernel lives here.

`optimize_for_inference` (in the spirit of timm's `reparameterize_model`) returns a copy in eval mode, the original
untouched, in which
- each eval-mode BatchNorm is folded into the depthwise convolution before it (the BatchNorm becomes nn.Identity);
- each nn.Linear runs `torch.ops.mkldnn._linear_pointwise` (oneDNN) where it serves, and the first MLP layer with
  the exact GELU becomes one oneDNN matmul with the GELU in its epilogue (the activation becomes nn.Identity);
- token grids stay channels-last and attention over many keys runs as blocked oneDNN matmuls;
- the classifier computes its last block for the cls token only (the one token its logits read), unless hidden
  states or attentions are asked for.
Where oneDNN does not serve (another device or dtype, oneDNN disabled) and under torch.jit tracing or scripting,
torch.compile and torch.export, the public ops run, so an exported copy holds no BatchNorm and no private op. The
copy equals the model to float32 rounding (tests hold it to 1e-5) and refuses training, saving and gradients.

`optimize_for_training` returns a copy whose modules are new but whose parameters and buffers are the model's own:
its nn.Linear layers run the oneDNN matmul forward and backward in float32 (`_OneDnnLinear`), the rest is the
model's code, and the gradients are the model's to float32 rounding. Training it trains the model.

`torch.ops.mkldnn._linear_pointwise` (the op torch.compile's CPU backend emits) is probed once; without it the
public ops run everywhere.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cvt_core.outputs import CvtImageClassifierOutput, CvtModelOutput

from .modeling_cvt import (CvtAttention, CvtBackbone, CvtEncoder, CvtForImageClassification, CvtIntermediate,
                           CvtLayer, CvtModel, CvtSelfAttention, CvtSelfAttentionConvProjection, CvtStage,
                           merge_heads, split_cls_token, split_heads, tokens_to_grid)
from .inputs import cast_to_model_dtype, check_pixel_values
from .outputs import option, returned

DEPLOY_ONLY = "this model was optimised for inference by optimize_for_inference"
REFUSED_TRAINING = f"{DEPLOY_ONLY}: it cannot train; train the original model (optimize_for_inference leaves it as is)"
REFUSED_SAVING = f"{DEPLOY_ONLY} (BatchNorm folded, modules fused): save the original model"
REFUSED_GRADIENTS = (f"{DEPLOY_ONLY} and computes no gradients: run it under torch.no_grad() or "
                     f"torch.inference_mode(), and take gradients or train with the original model")


# ---------------------------------------------------------------------------------------------- oneDNN probe
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


# ---------------------------------------------------------------------------------------------- matmuls
def _refuse_autograd(*tensors: Optional[torch.Tensor]) -> None:
    """The inference kernels have no backward: refuse where autograd would record them (a submodule of an optimised
    copy called on an input that requires grad), instead of returning a result whose gradient is wrong."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(REFUSED_GRADIENTS)


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


def inference_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear's result without autograd: oneDNN in float32 or bfloat16 (under CPU autocast in the autocast dtype,
    as F.linear would) where it serves, else F.linear."""
    _refuse_autograd(x, weight, bias)
    operands = _inference_operands(x, weight, bias) if onednn_serves(x) else None
    if operands is None:
        return F.linear(x, weight, bias)
    return onednn_op()(*operands, "none", [], "")


def inference_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.gelu(F.linear(x, weight, bias)) (exact GELU) without autograd: one oneDNN matmul with the GELU in its
    epilogue, which saves a pass over the MLP's widest tensor, where oneDNN serves; else the two ops."""
    _refuse_autograd(x, weight, bias)
    operands = _inference_operands(x, weight, bias) if onednn_serves(x) and _ONEDNN["gelu"] else None
    if operands is None:
        return F.gelu(inference_linear(x, weight, bias))
    return onednn_op()(*operands, "gelu", [], "none")


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


def training_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear's result; in float32 on CPU outside autocast, oneDNN forward and backward (`_OneDnnLinear`), and
    without autograd oneDNN as `inference_linear` runs it."""
    if not onednn_serves(x):
        return F.linear(x, weight, bias)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return inference_linear(x, weight, bias)
    if autocast_dtype(x.device.type) is None and x.dtype == torch.float32 and weight.dtype == torch.float32:
        return _OneDnnLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


# Inference attention, by measurement on a 2-core AVX-512 CPU: with many keys, blocked oneDNN matmuls per image and
# head (the scores of a block of queries stay in L2); with few keys, F.scaled_dot_product_attention in float32 and
# plain matmuls (oneDNN in bfloat16) in bfloat16.
_BLOCKED_ATTENTION_MIN_KEYS = {torch.float32: 128, torch.bfloat16: 512}
_ATTENTION_BLOCK_SCORES = 1 << 19


def inference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int,
                        scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v over `num_heads` heads without autograd or dropout; tokens (B, T, C) in and out."""
    _refuse_autograd(query, key, value)
    if query.shape[0] == 0:
        return query.new_zeros(query.shape)
    if onednn_serves(query):
        dtype = autocast_dtype(query.device.type) or query.dtype
        if dtype in _BLOCKED_ATTENTION_MIN_KEYS and key.shape[1] >= _BLOCKED_ATTENTION_MIN_KEYS[dtype]:
            return _blocked_attention(query * scale, key, value, num_heads)
        if query.dtype != torch.float32:
            q, k, v = (split_heads(t, num_heads) for t in (query, key, value))
            probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
            return merge_heads(torch.matmul(probs.to(v.dtype), v))
    q, k, v = (split_heads(t, num_heads) for t in (query, key, value))
    return merge_heads(F.scaled_dot_product_attention(q, k, v, scale=scale))


def _blocked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q k^T) v per image and head, in blocks of queries, on oneDNN. Tokens (B, T, C) in and out; the scale
    is already in `query`."""
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


def _channels_last_grid(tokens: torch.Tensor, height, width) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W): channels-last (one copy at most) where oneDNN serves, else contiguous NCHW."""
    if not onednn_serves(tokens):
        return tokens_to_grid(tokens, height, width)
    return tokens.transpose(1, 2).unflatten(2, (height, width)).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------- inference modules
class OneDnnLinear(nn.Linear):
    """nn.Linear (same parameters) computed by `inference_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return inference_linear(x, self.weight, self.bias)


class OneDnnLinearGELU(nn.Linear):
    """An nn.Linear followed by the exact GELU, computed by `inference_linear_gelu`: the first MLP layer of the
    optimised copy, whose activation is then nn.Identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return inference_linear_gelu(x, self.weight, self.bias)


class TrainingLinear(nn.Linear):
    """nn.Linear (same parameters) computed by `training_linear`: the Linear of `optimize_for_training`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return training_linear(x, self.weight, self.bias)


class OptimizedCvtSelfAttention(CvtSelfAttention):
    def forward(self, hidden_state: torch.Tensor, height, width, output_attentions: bool = False,
                cls_only: bool = False):
        """`CvtSelfAttention.forward` on channels-last grids with `inference_attention`. `cls_only` (a stage with a
        cls token): only the cls token queries, so the context is (B, 1, C); keys and values come from every token."""
        if output_attentions:
            return super().forward(hidden_state, height, width, output_attentions=True)
        cls_token, hidden_state = split_cls_token(hidden_state, self.with_cls_token)
        grid = _channels_last_grid(hidden_state, height, width)  # once for the three projections
        query = cls_token if cls_only else self.convolution_projection_query(grid)
        key = self.convolution_projection_key(grid)
        value = self.convolution_projection_value(grid)
        if self.with_cls_token:
            if not cls_only:
                query = torch.cat((cls_token, query), dim=1)
            key, value = torch.cat((cls_token, key), dim=1), torch.cat((cls_token, value), dim=1)
        context = inference_attention(self.projection_query(query), self.projection_key(key),
                                      self.projection_value(value), self.num_heads, self.scale)
        return context, None


class OptimizedCvtAttention(CvtAttention):
    def forward(self, hidden_state: torch.Tensor, height, width, output_attentions: bool = False,
                cls_only: bool = False):
        context, probs = self.attention(hidden_state, height, width, output_attentions, cls_only)
        return self.output(context), probs


class OptimizedCvtLayer(CvtLayer):
    def forward(self, hidden_state: torch.Tensor, height, width, output_attentions: bool = False,
                cls_only: bool = False):
        """`CvtLayer.forward`; with `cls_only` the block is computed for the cls token alone and returns it."""
        attention_output, probs = self.attention(self.layernorm_before(hidden_state), height, width,
                                                 output_attentions, cls_only)
        if cls_only:
            hidden_state = hidden_state[:, :1]
        hidden_state = hidden_state + self.drop_path(attention_output)
        mlp_output = self.output(self.intermediate(self.layernorm_after(hidden_state)))
        return hidden_state + self.drop_path(mlp_output), probs


class OptimizedCvtStage(CvtStage):
    def forward(self, hidden_state: torch.Tensor, output_attentions: bool = False, cls_only: bool = False):
        """`CvtStage.forward` with channels-last grids. `cls_only` (a stage with a cls token, no attentions asked):
        the last block runs for the cls token alone and the grid is None."""
        tokens, height, width = self.embedding(hidden_state, self.cls_token if self.with_cls_token else None)
        attentions = []
        last = len(self.layers) - 1 if cls_only and self.with_cls_token and not output_attentions else None
        for i, layer in enumerate(self.layers):
            if i == last:
                return None, layer(tokens, height, width, cls_only=True)[0], ()
            tokens, probs = layer(tokens, height, width, output_attentions)
            if output_attentions:
                attentions.append(probs)
        cls_token, tokens = split_cls_token(tokens, self.with_cls_token)
        return _channels_last_grid(tokens, height, width), cls_token, tuple(attentions)


class OptimizedCvtEncoder(CvtEncoder):
    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False, cls_only: bool = False):
        """`CvtEncoder.forward` on channels-last grids; `cls_only` (the classifier, without hidden states): the last
        stage's last block runs for its cls token alone and `last_hidden_state` is None."""
        hidden = pixel_values
        if onednn_serves(pixel_values):
            hidden = pixel_values.contiguous(memory_format=torch.channels_last)
        cls_token, all_hidden_states, all_attentions = None, [], []
        for i, stage in enumerate(self.stages):
            hidden, cls_token, attentions = stage(hidden, output_attentions,
                                                  cls_only=cls_only and i == len(self.stages) - 1)
            all_hidden_states.append(hidden)
            all_attentions.extend(attentions)
        return CvtModelOutput(last_hidden_state=hidden, cls_token_value=cls_token,
                              hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
                              attentions=tuple(all_attentions) if output_attentions else None)


class _DeployOnly:
    """The refusals of an optimised copy: training, saving, and a forward whose result could be differentiated."""

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(REFUSED_TRAINING)
        return super().train(False)

    def save_pretrained(self, *args, **kwargs):
        raise RuntimeError(REFUSED_SAVING)

    def _refuse_gradients(self, pixel_values, labels=None) -> None:
        if not torch.is_grad_enabled():
            return
        wants_input_gradient = isinstance(pixel_values, torch.Tensor) and pixel_values.requires_grad
        if labels is not None or wants_input_gradient or any(p.requires_grad for p in self.parameters()):
            raise RuntimeError(REFUSED_GRADIENTS)


class OptimizedCvtModel(_DeployOnly, CvtModel):
    """`CvtModel` as `optimize_for_inference` returns it."""

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: Optional[bool] = None,
                output_attentions: Optional[bool] = None, return_dict: Optional[bool] = None, cls_only: bool = False):
        """`CvtModel.forward`; `cls_only=True` (what the optimised classifier passes) computes the last block of a
        final stage with a cls token for that token alone, and `last_hidden_state` is then None."""
        self._refuse_gradients(pixel_values)
        config = self.config
        output_hidden_states = option(output_hidden_states, config.output_hidden_states)
        output_attentions = option(output_attentions, config.output_attentions)
        return_dict = option(return_dict, config.use_return_dict)
        check_pixel_values(config, pixel_values)
        outputs = self.encoder(cast_to_model_dtype(pixel_values, self), output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions,
                               cls_only=cls_only and not (output_hidden_states or output_attentions))
        return returned(outputs, return_dict)


class OptimizedCvtBackbone(_DeployOnly, CvtBackbone):
    """`CvtBackbone` as `optimize_for_inference` returns it."""

    def forward(self, pixel_values: torch.Tensor, *args, **kwargs):
        self._refuse_gradients(pixel_values)
        return super().forward(pixel_values, *args, **kwargs)


class OptimizedCvtForImageClassification(_DeployOnly, CvtForImageClassification):
    """`CvtForImageClassification` as `optimize_for_inference` returns it: the last block runs for the cls token
    alone unless hidden states or attentions are asked for."""

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._refuse_gradients(pixel_values)
        return self._normalised_tokens(self.cvt(pixel_values, output_hidden_states=False, output_attentions=False,
                                                return_dict=True, cls_only=True))

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                return_dict: Optional[bool] = None):
        return_dict, labels = option(return_dict, self.config.use_return_dict), option(labels, None)
        self._refuse_gradients(pixel_values, labels)
        outputs = self.cvt(pixel_values, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions, return_dict=True, cls_only=True)
        logits = self.forward_head(self._normalised_tokens(outputs))
        loss = self.compute_classification_loss(labels, logits) if labels is not None else None
        result = CvtImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.get("hidden_states"),
                                          attentions=outputs.get("attentions"))
        return returned(result, return_dict)


_OPTIMIZED_CLASSES = {CvtModel: OptimizedCvtModel, CvtBackbone: OptimizedCvtBackbone,
                      CvtForImageClassification: OptimizedCvtForImageClassification,
                      CvtSelfAttention: OptimizedCvtSelfAttention, CvtAttention: OptimizedCvtAttention,
                      CvtLayer: OptimizedCvtLayer, CvtStage: OptimizedCvtStage, CvtEncoder: OptimizedCvtEncoder}


# ---------------------------------------------------------------------------------------------- the two steps
def _folded_convolution(projection: CvtSelfAttentionConvProjection) -> Optional[nn.Conv2d]:
    """The depthwise convolution with its eval-mode BatchNorm folded in: conv(x, w * s) + (beta - mean * s), with
    s = gamma / sqrt(running_var + eps), computed in float32; None where the two are not a plain nn.Conv2d and a
    BatchNorm with running statistics."""
    conv, norm = projection.convolution, projection.normalization
    if type(conv) is not nn.Conv2d or not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.running_var is None:
        return None
    scale = torch.rsqrt(norm.running_var.float() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.float()
    shift = -norm.running_mean.float() * scale
    if conv.bias is not None:
        shift = shift + conv.bias.float() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.float()
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    folded.weight.copy_(conv.weight.float() * scale.view(-1, 1, 1, 1))
    folded.bias.copy_(shift)
    return folded


@torch.no_grad()
def optimize_for_inference(model: nn.Module) -> nn.Module:
    """A deploy-only copy of `model` (`CvtModel`, `CvtBackbone` or `CvtForImageClassification`) in eval mode that
    computes the same outputs faster: see the module docstring for what changes. The original is left untouched.
    The copy refuses `train()`, `save_pretrained` and any call whose result could be differentiated, each with one
    line; convert dtypes (`.to(torch.bfloat16)`) before or after, as on the model. Modules of other types than the
    model's own (a LoRA wrapper, a quantised Linear, a patched activation) are kept and run as they are."""
    if isinstance(model, _DeployOnly):
        return copy.deepcopy(model)
    if type(model) not in (CvtModel, CvtBackbone, CvtForImageClassification):
        raise TypeError(f"optimize_for_inference takes a cvt_torch CvtModel, CvtBackbone or "
                        f"CvtForImageClassification, got {type(model).__name__}")
    optimized = copy.deepcopy(model).eval()
    optimized.requires_grad_(False)
    onednn_op()  # the one-time probe, outside the first timed call
    for module in list(optimized.modules()):
        if isinstance(module, CvtSelfAttentionConvProjection):
            folded = _folded_convolution(module)
            if folded is not None:
                module.convolution, module.normalization = folded.requires_grad_(False), nn.Identity()
        if isinstance(module, CvtIntermediate) and type(module.dense) is nn.Linear and type(
                module.activation) is nn.GELU and module.activation.approximate == "none":
            module.dense.__class__, module.activation = OneDnnLinearGELU, nn.Identity()
        if type(module) is nn.Linear:
            module.__class__ = OneDnnLinear
        elif type(module) in _OPTIMIZED_CLASSES:
            module.__class__ = _OPTIMIZED_CLASSES[type(module)]
    return optimized


def optimize_for_training(model: nn.Module) -> nn.Module:
    """A copy of `model` whose modules are new but whose parameters and buffers are `model`'s own tensors, with every
    nn.Linear computed by `training_linear`: float32 matmuls, forward and backward, on oneDNN on the CPU (the same
    gradients to float32 rounding; faster where oneDNN's GEMM outruns PyTorch's BLAS, as on AVX-512 CPUs). It is a
    model of the same class: train it in place of `model` (training one trains the other) and save either, the
    checkpoint is the same. Move `model` to its device before: moving the copy would leave `model`'s buffers behind."""
    shared = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    variant = copy.deepcopy(model, memo=shared)
    for module in variant.modules():
        if type(module) is nn.Linear:
            module.__class__ = TrainingLinear
    onednn_op()
    return variant


def uses_training_kernels(model: nn.Module) -> bool:
    """Whether `model` came from `optimize_for_training`."""
    return any(isinstance(module, TrainingLinear) for module in model.modules())
