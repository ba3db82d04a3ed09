"""The explicit speed steps of `cvt_torch.optimize`: `optimize_for_inference` returns a deploy-only copy that runs
the fast kernels (BatchNorm folded, oneDNN matmuls, the MLP's GELU fused, blocked attention, a cls-only last block),
equals the model to float32 rounding on any config, stays close in bfloat16, records public ops only under tracing
and export, and refuses training, saving and gradients; `optimize_for_training` trains the model's own parameters
with the same gradients. The model itself never runs them."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from cvt_core.shapes import minimum_input_size
from cvt_torch import CvtBackbone, CvtConfig, CvtForImageClassification, CvtModel
from cvt_torch import optimize
from cvt_torch.optimize import (REFUSED_GRADIENTS, REFUSED_SAVING, REFUSED_TRAINING, optimize_for_inference,
                                optimize_for_training)
from generated_configs import generated_config
from hf_oracle import assert_close, randomize_

TINY = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3])

needs_onednn = pytest.mark.skipif(optimize.onednn_op() is None,
                                  reason="oneDNN linear op not available in this torch build")

CONFIGS = {
    "tiny": dict(TINY, num_labels=5),
    # 96x96 input: 576 stage-0 tokens and 144 keys, so the blocked oneDNN attention runs (several heads too)
    "blocked-attention": dict(embed_dim=[32, 48], num_heads=[2, 3], depth=[2, 1], patch_sizes=[5, 3],
                              patch_stride=[4, 2], patch_padding=[2, 1], mlp_ratio=[4.0, 4.0],
                              attention_drop_rate=[0.0, 0.0], drop_rate=[0.0, 0.0], drop_path_rate=[0.0, 0.1],
                              qkv_bias=[True, False], cls_token=[False, True], qkv_projection_method=["dw_bn", "dw_bn"],
                              kernel_qkv=[3, 3], padding_kv=[1, 1], stride_kv=[2, 2], padding_q=[1, 1],
                              stride_q=[1, 1], num_labels=7),
    "stride-kv-1-no-bias": dict(TINY, stride_kv=[1, 1, 1], qkv_bias=[False, False, False], num_labels=2),
}


def random_model(model_class, config_kwargs, seed=0):
    torch.manual_seed(seed)
    model = model_class(CvtConfig(**config_kwargs)).eval()
    randomize_(model, seed)  # non-trivial BatchNorm statistics, so a wrong fold shows
    return model


def pixels(batch=2, height=96, width=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width or height, generator=generator)


def assert_outputs_close(fast, plain, name, tol=1e-5):
    for field in ("logits", "last_hidden_state", "cls_token_value"):
        if plain.get(field) is not None:
            assert_close(fast[field].float().numpy(), plain[field].float().numpy(), f"{name} {field}", tol)
    for field in ("hidden_states", "attentions", "feature_maps"):
        if plain.get(field) is not None:
            assert len(fast[field]) == len(plain[field]), (name, field)
            for i, (a, b) in enumerate(zip(fast[field], plain[field])):
                assert_close(a.float().numpy(), b.float().numpy(), f"{name} {field}.{i}", tol)


class KernelCalls:
    """Counts the oneDNN matmul calls and the blocked attention calls of `cvt_torch.optimize`."""

    def __init__(self, monkeypatch):
        self.onednn = self.blocked = 0
        op, blocked = optimize.onednn_op(), optimize._blocked_attention

        def counting_op(*args):
            self.onednn += 1
            return op(*args)

        def counting_blocked(*args):
            self.blocked += 1
            return blocked(*args)

        monkeypatch.setitem(optimize._ONEDNN, "op", counting_op)
        monkeypatch.setattr(optimize, "_blocked_attention", counting_blocked)


def ops_run(model, x):
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    return {event.key for event in prof.key_averages()}


# ------------------------------------------------------------------------------------------------ which kernels run
@needs_onednn
def test_the_copy_runs_the_fast_kernels_and_the_model_only_public_ops(monkeypatch):
    model = random_model(CvtForImageClassification, CONFIGS["blocked-attention"])
    fast = optimize_for_inference(model)
    x = pixels(height=96)
    with torch.no_grad():
        model(x), fast(x)  # first calls: one-time set-up stays out of the profiles below
    plain_ops, fast_ops = ops_run(model, x), ops_run(fast, x)
    assert "aten::native_batch_norm" in plain_ops or "aten::_native_batch_norm_legit_no_training" in plain_ops
    assert "aten::gelu" in plain_ops and not any("mkldnn::_linear" in op for op in plain_ops)
    assert not any("batch_norm" in op for op in fast_ops)  # folded into the depthwise convolutions
    assert "aten::gelu" not in fast_ops  # in the epilogue of the MLP's first matmul
    assert "mkldnn::_linear_pointwise" in fast_ops
    calls = KernelCalls(monkeypatch)
    with torch.no_grad():
        fast(x)
    assert calls.onednn > 0 and calls.blocked > 0
    calls.onednn = calls.blocked = 0
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        out = fast(x)
    assert calls.onednn == 0 and calls.blocked == 0  # oneDNN disabled: the public ops
    with torch.no_grad():
        assert_close(out.logits.numpy(), model(x).logits.numpy(), "public-op path of the copy")


def test_the_copy_folds_and_fuses_modules_and_leaves_the_original_as_it_was():
    model = random_model(CvtForImageClassification, CONFIGS["tiny"]).train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    types_before = [type(module) for module in model.modules()]
    fast = optimize_for_inference(model)
    assert model.training and not fast.training
    assert [type(module) for module in model.modules()] == types_before
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert not any(isinstance(module, nn.BatchNorm2d) for module in fast.modules())
    assert not any(type(module) is nn.Linear for module in fast.modules())
    layer = fast.cvt.encoder.stages[2].layers[0]
    assert isinstance(layer.intermediate.activation, nn.Identity)
    projection = layer.attention.attention.convolution_projection_key.convolution_projection
    assert isinstance(projection.normalization, nn.Identity) and projection.convolution.bias is not None
    assert not any(p.requires_grad for p in fast.parameters())


def test_modules_of_other_types_are_kept_and_run_as_they_are():
    model = random_model(CvtForImageClassification, CONFIGS["tiny"], seed=1)
    layer = model.cvt.encoder.stages[2].layers[1]
    layer.intermediate.activation = nn.SiLU()
    layer.output.dense = nn.Sequential(layer.output.dense)
    fast = optimize_for_inference(model)
    fast_layer = fast.cvt.encoder.stages[2].layers[1]
    assert isinstance(fast_layer.intermediate.activation, nn.SiLU)
    assert type(fast_layer.intermediate.dense) is optimize.OneDnnLinear  # a plain Linear, not fused with SiLU
    x = pixels(height=48)
    with torch.no_grad():
        assert_close(fast(x).logits.numpy(), model(x).logits.numpy(), "SiLU model")


# ------------------------------------------------------------------------------------------------ same results
@pytest.mark.parametrize("seed", range(8))
def test_the_copy_equals_the_model_on_generated_configs(seed):
    config_kwargs = generated_config(seed)
    config = CvtConfig(**config_kwargs)
    rng = random.Random(seed)
    side = minimum_input_size(config)
    height, width = side + rng.randrange(1, 40, 2), side + rng.randrange(0, 40, 2)
    x = pixels(batch=rng.choice([1, 3]), height=height, width=width, seed=seed)
    for model_class in (CvtForImageClassification, CvtModel, CvtBackbone):
        model = random_model(model_class, config_kwargs, seed=seed)
        fast = optimize_for_inference(model)
        name = f"{config_kwargs} {model_class.__name__} at {tuple(x.shape)}"
        with torch.no_grad():
            assert_outputs_close(fast(x), model(x), name)
            asked = dict(output_hidden_states=True, output_attentions=True)
            assert_outputs_close(fast(x, **asked), model(x, **asked), f"{name} with hidden states and attentions")
        if model_class is CvtForImageClassification:
            with torch.inference_mode():
                assert_close(fast.forward_features(x).numpy(), model.forward_features(x).numpy(), f"{name} features")


@needs_onednn
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_the_copy_equals_the_model_where_the_blocked_attention_and_fused_kernels_run(config_name):
    model = random_model(CvtForImageClassification, CONFIGS[config_name], seed=3)
    fast = optimize_for_inference(model)
    x = pixels(batch=3, height=96, seed=1)
    with torch.no_grad():
        assert_outputs_close(fast(x, output_hidden_states=True), model(x, output_hidden_states=True), config_name)
        assert_outputs_close(fast(x), model(x), f"{config_name} logits only (cls-only last block)")


@needs_onednn
def test_the_copy_equals_cvt13():
    model = random_model(CvtForImageClassification, dict(num_labels=1000), seed=5)
    x = pixels(batch=2, height=224, seed=2)
    with torch.no_grad():
        assert_outputs_close(optimize_for_inference(model)(x), model(x), "cvt-13")


@pytest.mark.parametrize("height", [48, 96])  # 96: enough keys for the blocked attention
def test_an_empty_batch_gives_empty_outputs_as_the_model_does(height):
    model = random_model(CvtForImageClassification, CONFIGS["blocked-attention"], seed=3)
    fast = optimize_for_inference(model)
    x = pixels(batch=0, height=height)
    with torch.no_grad():
        assert_outputs_close(fast(x, output_hidden_states=True), model(x, output_hidden_states=True), "empty batch")
        assert fast(x).logits.shape == model(x).logits.shape == (0, 7)


def test_optimising_an_optimised_copy_copies_it_and_other_modules_are_refused():
    fast = optimize_for_inference(random_model(CvtModel, CONFIGS["tiny"]))
    again = optimize_for_inference(fast)
    assert again is not fast and type(again) is type(fast)
    with pytest.raises(TypeError, match="CvtModel, CvtBackbone or CvtForImageClassification"):
        optimize_for_inference(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------ bfloat16
@pytest.mark.parametrize("config_name", ["blocked-attention", "stride-kv-1-no-bias"])
def test_bfloat16_copy_and_autocast_stay_close_to_float32(config_name):
    model = random_model(CvtForImageClassification, CONFIGS[config_name], seed=11)
    fast = optimize_for_inference(model)
    x = pixels(batch=4, height=96, seed=4)
    with torch.no_grad():
        reference = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = fast(x).logits
        bf16_model = copy.deepcopy(model).to(torch.bfloat16)
        plain_bf16 = bf16_model(x.to(torch.bfloat16)).logits
        converted_after = fast.to(torch.bfloat16)  # optimise, then convert
        converted_before = optimize_for_inference(bf16_model)  # convert, then optimise
        after, before = converted_after(x.to(torch.bfloat16)).logits, converted_before(x).logits
    assert after.dtype == before.dtype == torch.bfloat16
    scale = reference.abs().max().item()
    plain_error = (plain_bf16.float() - reference).abs().max().item()
    for name, out in (("autocast", autocast), ("optimised then bfloat16", after), ("bfloat16 then optimised", before)):
        assert out.shape == reference.shape
        error = (out.float() - reference).abs().max().item()
        assert error < 0.05 * scale, name
        assert error <= 2 * plain_error + 1e-3, name  # no less accurate than the bfloat16 model itself


# ------------------------------------------------------------------------------------------------ refusals
def test_the_copy_refuses_training_saving_and_gradients_each_in_one_line(tmp_path):
    fast = optimize_for_inference(random_model(CvtForImageClassification, CONFIGS["tiny"]))
    x, labels = pixels(height=48), torch.tensor([0, 3])
    for call in (fast.train, lambda: fast.train(True), lambda: fast.cvt.train()):
        with pytest.raises(RuntimeError, match="optimize_for_inference: it cannot train") as error:
            call()
        assert str(error.value) == REFUSED_TRAINING and "\n" not in REFUSED_TRAINING
    with pytest.raises(RuntimeError) as error:
        fast.save_pretrained(tmp_path / "out")
    assert str(error.value) == REFUSED_SAVING and not (tmp_path / "out").exists()
    for call in (lambda: fast(x, labels=labels), lambda: fast(x.clone().requires_grad_())):
        with pytest.raises(RuntimeError) as error:
            call()
        assert str(error.value) == REFUSED_GRADIENTS and "torch.no_grad()" in REFUSED_GRADIENTS
    fast.classifier.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="computes no gradients"):
        fast(x)
    fast.classifier.weight.requires_grad_(False)
    assert fast.eval() is fast and not fast.training
    with torch.no_grad():
        assert fast(x, labels=labels).loss.ndim == 0  # an evaluation loss needs no gradient
    assert fast(x).logits.grad_fn is None


def test_every_submodule_of_the_copy_that_runs_a_fast_kernel_refuses_an_input_that_wants_gradients():
    """The refusal sits in the kernels, so calling a submodule directly (past the model's forward) cannot return
    a result whose gradient is wrong."""
    fast = optimize_for_inference(random_model(CvtForImageClassification, CONFIGS["blocked-attention"]))
    x = pixels(batch=1, height=96).requires_grad_()
    recorded = {}

    def record(name):
        def hook(module, args, kwargs):
            recorded.setdefault(name, (args, kwargs))
        return hook

    handles = [m.register_forward_pre_hook(record(n), with_kwargs=True) for n, m in fast.named_modules() if n]
    with torch.no_grad():
        fast(x.detach(), output_hidden_states=True)
    for handle in handles:
        handle.remove()
    kernel_types = (optimize.OneDnnLinear, optimize.OneDnnLinearGELU, optimize.OptimizedCvtSelfAttention)
    refused = 0
    for name, module in fast.named_modules():
        if name not in recorded or not any(isinstance(m, kernel_types) for m in module.modules()):
            continue
        args, kwargs = recorded[name]
        args = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a for a in args)
        with pytest.raises(RuntimeError) as error:
            module(*args, **kwargs)
        assert str(error.value) == REFUSED_GRADIENTS, name
        refused += 1
    assert refused > 10


# ------------------------------------------------------------------------------------------------ graph recorders
@needs_onednn
def test_torch_jit_trace_and_export_of_the_copy_hold_public_ops_and_no_batch_norm(monkeypatch):
    model = random_model(CvtForImageClassification, CONFIGS["blocked-attention"], seed=2)
    fast = optimize_for_inference(model)
    x = pixels(height=96, seed=2)
    with torch.no_grad():
        eager = model(x).logits
    calls = KernelCalls(monkeypatch)
    exported = torch.export.export(fast, (x,))
    with torch.no_grad():
        traced = torch.jit.trace(fast, (x,), strict=False, check_trace=False)
    assert calls.onednn == 0 and calls.blocked == 0
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "aten.linear.default" in targets
    assert not any("mkldnn" in t or "batch_norm" in t for t in targets), targets
    assert not any("mkldnn" in node.kind() or "batch_norm" in node.kind() for node in traced.graph.nodes())
    with torch.no_grad():
        assert_close(exported.module()(x).logits.numpy(), eager.numpy(), "exported copy")
        assert_close(traced(x)["logits"].numpy(), eager.numpy(), "traced copy")


# ------------------------------------------------------------------------------------------------ training
def test_training_through_optimize_for_training_gives_the_models_gradients_and_trains_its_parameters():
    config = dict(CONFIGS["blocked-attention"], drop_path_rate=[0.0, 0.0])
    model = random_model(CvtForImageClassification, config, seed=6).train()
    reference = copy.deepcopy(model)
    variant = optimize_for_training(model)
    assert type(variant) is type(model) and optimize.uses_training_kernels(variant)
    assert not optimize.uses_training_kernels(model)
    assert all(a is b for a, b in zip(variant.parameters(), model.parameters()))
    bn = model.cvt.encoder.stages[0].layers[0].attention.attention.convolution_projection_key \
        .convolution_projection.normalization
    tracked = bn.num_batches_tracked.item()
    x, labels = pixels(batch=2, height=96, seed=3), torch.tensor([1, 5])
    loss = variant(x, labels=labels).loss
    loss.backward()
    reference(x, labels=labels).loss.backward()
    if optimize.onednn_op() is not None:
        assert "OneDnn" in type(variant.classifier(torch.ones(1, 48, requires_grad=True)).grad_fn).__name__
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():  # the model's own parameters got the variant's gradients
        assert_close(p.grad.numpy(), grads[name].grad.numpy(), name)
    assert bn.num_batches_tracked.item() == tracked + 1  # the variant's BatchNorm updated the model's statistics
    torch.optim.SGD(variant.parameters(), lr=0.1).step()
    assert not torch.equal(model.classifier.weight, reference.classifier.weight)


@needs_onednn
def test_the_training_matmul_supports_double_backward():
    torch.manual_seed(0)
    x = torch.randn(5, 6, requires_grad=True)
    w = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    out = optimize.training_linear(x, w, b)
    assert out.grad_fn is not None and "OneDnn" in type(out.grad_fn).__name__
    grad_x, = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    second, = torch.autograd.grad(grad_x.sum(), w)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ref_grad_x, = torch.autograd.grad(torch.nn.functional.linear(x2, w2, b2).pow(2).sum(), x2, create_graph=True)
    ref_second, = torch.autograd.grad(ref_grad_x.sum(), w2)
    assert torch.allclose(grad_x, ref_grad_x, atol=1e-5) and torch.allclose(second, ref_second, atol=1e-5)


def test_fit_trains_a_model_built_through_optimize_for_training_and_says_so():
    import numpy as np

    from cvt_torch.training import fit

    rng = np.random.default_rng(0)
    train_pixels = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    train_labels = rng.integers(0, 3, size=16)
    lines = []
    result = fit(lambda: optimize_for_training(CvtForImageClassification(CvtConfig(**TINY, num_labels=3))),
                 train_pixels, train_labels, epochs=1, batch_size=8, learning_rate=1e-3, threads=1,
                 echo=lines.append)
    assert "oneDNN training matmuls" in lines[0] and optimize.uses_training_kernels(result.model)
    assert np.isfinite(result.train_loss)


def test_cvt_train_takes_fast_kernels_for_pytorch_only(tmp_path):
    from conversion_helpers import assert_one_line_error, cli

    assert_one_line_error(*cli("train", "--framework", "keras", "--fast-kernels", "--out", tmp_path / "run"),
                          "--fast-kernels applies to --framework torch only")
    assert not (tmp_path / "run").exists()
