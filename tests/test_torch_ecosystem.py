"""PyTorch's tools on the model as loaded: dynamic quantisation replaces every Linear, PEFT LoRA trains, evaluates,
merges and saves, forward hooks (per module and global) see every module with the same outputs in every grad mode,
and torch.fx, torch.export and torch.jit.trace record the model as eager runs it."""

from __future__ import annotations

import re
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from cvt_torch import CvtConfig, CvtForImageClassification, CvtModel
from hf_oracle import assert_close, randomize_

TINY = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 1, 2], num_labels=3)
NO_DROPOUT = dict(drop_rate=[0.0] * 3, attention_drop_rate=[0.0] * 3, drop_path_rate=[0.0] * 3)
GRAD_MODES = {"grad": nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def random_model(model_class=CvtForImageClassification, seed=0, **overrides):
    torch.manual_seed(seed)
    model = model_class(CvtConfig(**{**TINY, **overrides})).eval()
    randomize_(model, seed)
    return model


def pixels(batch=2, height=48, width=40, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def assert_outputs_equal(got, want, name, tol=1e-5):
    assert list(got.keys()) == list(want.keys()), name
    for key in want:
        assert_close(got[key].detach().numpy(), want[key].detach().numpy(), f"{name} {key}", tol)


# ------------------------------------------------------------------------------------------------ quantisation
def test_dynamic_quantization_replaces_every_linear_and_keeps_the_logits_close():
    model = random_model()
    linears = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    assert len(linears) == 6 * sum(TINY["depth"]) + 1  # q, k, v, attention output, two MLP layers; the classifier
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    replaced = [name for name, module in quantized.named_modules()
                if isinstance(module, torch.ao.nn.quantized.dynamic.Linear)]
    assert replaced == linears
    assert not any(type(module) is nn.Linear for module in quantized.modules())
    x = pixels()
    with torch.no_grad():
        reference, logits = model(x).logits, quantized(x).logits
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


# ------------------------------------------------------------------------------------------------ PEFT LoRA
# Every matmul of the blocks (q/k/v projections, the attention output, both MLP layers) and, separately, the depthwise
# q/k/v convolutions. PEFT gives a grouped convolution a LoRA rank that the groups divide (64: every stage width
# here divides it) and cannot merge it back, so the merge is checked on the Linear layers and the (ungrouped)
# token-embedding convolutions.
LORA_WIDTHS = dict(embed_dim=[16, 32, 64], num_heads=[1, 2, 4])
LINEAR_TARGETS = r".*\.(projection_query|projection_key|projection_value|dense)"
DEPTHWISE_TARGETS = r".*\.convolution_projection\.convolution"
EMBEDDING_TARGETS = r".*\.convolution_embeddings\.projection"


def _lora_model(target_modules, seed=1, **config):
    peft = pytest.importorskip("peft")
    model = random_model(seed=seed, **LORA_WIDTHS, **NO_DROPOUT, **config).train()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, rank_pattern={"convolution": 64},
                           modules_to_save=["classifier"], init_lora_weights="gaussian")
    return model, peft.get_peft_model(model, lora)


def _train(peft_model, x, labels, steps=3):
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = peft_model(x, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    return losses


def test_lora_on_the_projections_mlp_and_depthwise_convolutions_trains_and_runs_in_eval():
    _, peft_model = _lora_model(f"({LINEAR_TARGETS}|{DEPTHWISE_TARGETS})")
    names = [name for name, _ in peft_model.named_modules()]
    wrapped = {re.sub(r"\.lora_[AB].*", "", name) for name in names if ".lora_A" in name}
    depthwise = {name for name in wrapped if name.endswith("convolution_projection.convolution")}
    assert len(depthwise) == 3 * 4 and len(wrapped) == 6 * 4 + 12  # every block: 6 Linear, 3 depthwise convs
    x, labels = pixels(batch=4), torch.tensor([0, 1, 2, 1])
    losses = _train(peft_model, x, labels)
    assert losses[-1] < losses[0]
    lora_grads = {name: p.grad for name, p in peft_model.named_parameters() if "lora_" in name}
    # the last block's query convolution feeds no logit: the classifier reads the final cls token, whose query skips
    # the convolution
    unread = {name for name in lora_grads if "stages.2.layers.1.attention.attention.convolution_projection_query" in name}
    assert len(unread) == 2 and all(lora_grads[name].abs().sum() == 0 for name in unread)
    assert all(g.abs().sum() > 0 for name, g in lora_grads.items() if name not in unread)
    peft_model.eval()
    for mode in GRAD_MODES.values():
        with mode():
            logits = peft_model(x).logits
        assert logits.shape == (4, 3) and torch.isfinite(logits).all()


def test_merged_lora_model_equals_the_adapted_one_and_saves_and_reloads_equal(tmp_path):
    model, peft_model = _lora_model(f"({LINEAR_TARGETS}|{EMBEDDING_TARGETS})", seed=2)
    x, labels = pixels(batch=4, seed=1), torch.tensor([2, 1, 0, 1])
    _train(peft_model, x, labels)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(x)
    merged = peft_model.merge_and_unload()
    assert type(merged) is CvtForImageClassification
    assert not any("lora" in name for name, _ in merged.named_modules())
    assert all(type(m) is nn.Linear for name, m in merged.named_modules() if name.endswith("dense"))
    with torch.no_grad():
        assert_outputs_equal(merged(x), adapted, "merged")
    merged.save_pretrained(tmp_path)
    reloaded = CvtForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        assert_outputs_equal(reloaded(x), adapted, "reloaded")


# ------------------------------------------------------------------------------------------------ forward hooks
def _describe(output):
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, dict):
        return {key: _describe(value) for key, value in output.items()}
    if isinstance(output, (tuple, list)):
        return tuple(_describe(value) for value in output)
    return output


def _hooked_calls(model, x, mode, **options):
    """({module name: [described output of each call]} from hooks on every module, the same from one global hook)
    of one forward."""
    names = {module: name for name, module in model.named_modules()}
    per_module, global_ = {}, {}

    def recorder(calls):
        return lambda module, args, output: calls.setdefault(names[module], []).append(_describe(output))

    handles = [module.register_forward_hook(recorder(per_module)) for module in model.modules()]
    handles.append(torch.nn.modules.module.register_module_forward_hook(recorder(global_)))
    try:
        with mode():
            model(x, **options)
    finally:
        for handle in handles:
            handle.remove()
    return per_module, global_


def _attention_dropouts(model):
    return {name for name, _ in model.named_modules() if name.endswith("attention.attention.dropout")}


@pytest.mark.parametrize("model_class", [CvtForImageClassification, CvtModel])
@pytest.mark.parametrize("output_attentions", [False, True])
def test_forward_hooks_see_every_module_with_the_same_outputs_in_every_grad_mode(model_class, output_attentions):
    model = random_model(model_class, cls_token=[True, False, True], qkv_projection_method=["dw_bn", "avg", "linear"])
    x = pixels()
    seen = {mode: _hooked_calls(model, x, context, output_attentions=output_attentions)
            for mode, context in GRAD_MODES.items()}
    assert seen["grad"] == seen["no_grad"] == seen["inference_mode"]
    calls, global_calls = seen["grad"]
    assert calls == global_calls
    wanted = {name for name, module in model.named_modules()
              if next(module.children(), None) is None or any(True for _ in module.parameters(recurse=False))}
    # The attention dropout is applied inside F.scaled_dot_product_attention (dropout_p), as timm's fused attention
    # does; it runs as a module of its own on the explicit path that returns the attention probabilities.
    skipped = set() if output_attentions else _attention_dropouts(model)
    assert wanted - skipped <= set(calls), sorted(wanted - skipped - set(calls))
    assert not skipped & set(calls)
    assert all(len(outputs) == 1 for name, outputs in calls.items() if not name.endswith("drop_path"))
    backbone = "cvt" if model_class is CvtForImageClassification else ""
    last_layer = f"{backbone}.encoder.stages.2.layers.1".lstrip(".")
    assert calls[last_layer][0][0] == (2, 1 + 3 * 3, 48)  # the whole block: cls token and every grid token
    assert calls[backbone][0]["last_hidden_state"] == (2, 48, 3, 3)


# ------------------------------------------------------------------------------------------------ graph recorders
@pytest.mark.parametrize("model_class", [CvtForImageClassification, CvtModel])
def test_fx_symbolic_trace_records_the_call_with_pixel_values_alone_and_equals_eager(model_class):
    model = random_model(model_class)
    graph_module = torch.fx.symbolic_trace(model)
    assert not [n for n in graph_module.graph.nodes if n.op == "call_function" and "mkldnn" in str(n.target)]
    x = pixels(batch=3, height=64, width=56, seed=2)
    with torch.no_grad():
        assert_outputs_equal(graph_module(x), model(x), "fx", tol=0)


def test_torch_export_and_jit_trace_equal_eager():
    model = random_model()
    x = pixels(batch=2, height=64, width=56, seed=3)
    with torch.no_grad():
        eager = model(x)
    program = torch.export.export(model, (x,))
    assert type(program.module()(x)) is type(eager)
    assert_outputs_equal(program.module()(x), eager, "torch.export")
    traced = torch.jit.trace(model, (x,), strict=False)  # its check reruns the model under no_grad
    with torch.no_grad():
        assert_outputs_equal(traced(x), eager, "torch.jit.trace")
