"""The fast CPU kernels of cvt_torch (`cvt_torch.kernels`) behind the one `forward` of each module: taken in eager
CPU inference, the public ops under torch.jit tracing and torch.export; same results as the plain ops, never stale
weights, hooks that run and are used, bfloat16 and torch.compile."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvt_torch import CvtConfig, CvtForImageClassification, CvtModel
from cvt_torch import kernels
from hf_oracle import assert_close, randomize_

TINY = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3])

needs_onednn = pytest.mark.skipif(kernels.onednn_op() is None,
                                  reason="oneDNN linear op not available in this torch build")

FUSED_CONFIGS = {
    "tiny": dict(TINY, num_labels=5),
    # 96x96 input: 576 stage-0 tokens and 144 keys, so the blocked oneDNN attention runs (several heads too)
    "blocked-attention": dict(embed_dim=[32, 48], num_heads=[2, 3], depth=[2, 1], patch_sizes=[5, 3],
                              patch_stride=[4, 2], patch_padding=[2, 1], mlp_ratio=[4.0, 4.0],
                              attention_drop_rate=[0.0, 0.0], drop_rate=[0.0, 0.0], drop_path_rate=[0.0, 0.1], qkv_bias=[True, False],
                              cls_token=[False, True], qkv_projection_method=["dw_bn", "dw_bn"], kernel_qkv=[3, 3],
                              padding_kv=[1, 1], stride_kv=[2, 2], padding_q=[1, 1], stride_q=[1, 1], num_labels=7),
    "cls-on-stage-0-quick-gelu": dict(TINY, cls_token=[True, False, True], hidden_act="quick_gelu", num_labels=3),
    "avg-linear-no-cls": dict(TINY, qkv_projection_method=["avg", "linear", "dw_bn"], cls_token=[False, False, False],
                              num_labels=4),
    "stride-kv-1-no-bias": dict(TINY, stride_kv=[1, 1, 1], qkv_bias=[False, False, False], num_labels=2),
}


def random_model(model_class, config_kwargs, seed=0):
    torch.manual_seed(seed)
    model = model_class(CvtConfig(**config_kwargs)).eval()
    randomize_(model, seed)  # non-trivial BatchNorm statistics, so a wrong fold shows
    return model


def pixels(batch=2, side=96, seed=0, dtype=torch.float32):
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed)).to(dtype)


def reference_outputs(model, x, **kwargs):
    """The plain public ops: oneDNN off, so F.linear (MKL), F.scaled_dot_product_attention and NCHW grids."""
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        assert not kernels.onednn_serves(x)
        return model(x, **kwargs)


def model_backbone(model):
    return getattr(model, "cvt", model)


def assert_outputs_close(fast, slow, name, tol=1e-5):
    for field in ("logits", "last_hidden_state", "cls_token_value"):
        if field in slow and slow[field] is not None:
            assert_close(fast[field].float().numpy(), slow[field].float().numpy(), f"{name} {field}", tol)
    if slow.get("hidden_states") is not None:
        assert len(fast["hidden_states"]) == len(slow["hidden_states"])
        for i, (a, b) in enumerate(zip(fast["hidden_states"], slow["hidden_states"])):
            assert_close(a.float().numpy(), b.float().numpy(), f"{name} hidden_states.{i}", tol)


class KernelCalls:
    """Counts the private oneDNN op calls and the blocked attention calls of `cvt_torch.kernels`."""

    def __init__(self, monkeypatch):
        self.onednn = self.blocked = 0
        op, blocked = kernels.onednn_op(), kernels._blocked_attention

        class CountingOp:  # the op and its overloads, counted
            def __call__(_, *args):
                self.onednn += 1
                return op(*args)

        def counting_blocked(*args):
            self.blocked += 1
            return blocked(*args)

        monkeypatch.setitem(kernels._ONEDNN, "op", CountingOp())
        monkeypatch.setattr(kernels, "_blocked_attention", counting_blocked)

    def reset(self):
        self.onednn = self.blocked = 0


class Logits(nn.Module):
    """The classifier's logits as a plain tensor output, as torch.jit.trace wants."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values, return_dict=False)[0]


def public_targets(graph):
    return {str(node.target) for node in graph.nodes if node.op == "call_function"}


# ------------------------------------------------------------------------------------------------ which kernels run
@needs_onednn
def test_onednn_kernels_run_in_cpu_inference_and_blocked_attention_only_without_autograd(monkeypatch):
    model = random_model(CvtForImageClassification, FUSED_CONFIGS["blocked-attention"])
    x = pixels(side=96)
    calls = KernelCalls(monkeypatch)
    with torch.no_grad():
        model(x)
    assert calls.onednn > 0 and calls.blocked > 0
    calls.reset()
    with torch.inference_mode():
        model(x)
    assert calls.onednn > 0 and calls.blocked > 0
    calls.reset()
    model(x).logits.sum().backward()  # autograd: oneDNN Linear forward and backward, the public SDPA
    assert calls.onednn > 0 and calls.blocked == 0
    calls.reset()
    model.requires_grad_(False)
    model(x)  # a frozen model: nothing to differentiate, the inference kernels run
    assert calls.blocked > 0
    calls.reset()
    with torch.no_grad():
        copy.deepcopy(model).double()(x.double())
        with torch.backends.mkldnn.flags(enabled=False):
            model(x)
    assert calls.onednn == 0 and calls.blocked == 0


@needs_onednn
def test_torch_jit_trace_records_only_public_ops_and_matches_eager(monkeypatch):
    model = random_model(CvtForImageClassification, FUSED_CONFIGS["blocked-attention"], seed=1)
    x = pixels(side=96, seed=1)
    with torch.no_grad():
        eager = model(x).logits
    calls = KernelCalls(monkeypatch)
    with torch.no_grad():
        traced = torch.jit.trace(Logits(model), (x,), check_trace=False)  # the check reruns eager
    assert calls.onednn == 0 and calls.blocked == 0
    assert not any("mkldnn" in str(node.kind()) for node in traced.graph.nodes())
    with torch.no_grad():
        assert_close(traced(x).numpy(), eager.numpy(), "traced logits")


@needs_onednn
def test_torch_export_of_a_classifier_holds_only_public_ops_and_matches_eager(monkeypatch):
    model = random_model(CvtForImageClassification, FUSED_CONFIGS["blocked-attention"], seed=2)
    x = pixels(side=96, seed=2)
    with torch.no_grad():
        eager = model(x)
    calls = KernelCalls(monkeypatch)
    exported = torch.export.export(model, (x,))
    assert calls.onednn == 0 and calls.blocked == 0
    targets = public_targets(exported.graph)
    assert "aten.linear.default" in targets and not any("mkldnn" in t for t in targets)
    with torch.no_grad():
        out = exported.module()(x)
    assert type(out) is type(eager)
    assert_close(out.logits.numpy(), eager.logits.numpy(), "exported logits")


def test_torch_jit_script_is_refused_by_torchscript_not_by_a_private_op():
    """TorchScript cannot compile the model's Python (output containers, keyword options, config objects); the
    failure must come from the TorchScript frontend, not from a private op or a missing kernel."""
    model = random_model(CvtForImageClassification, FUSED_CONFIGS["tiny"])
    with pytest.raises((torch.jit.frontend.NotSupportedError, RuntimeError)) as error:
        torch.jit.script(model)
    assert "mkldnn" not in str(error.value)


@needs_onednn
def test_forward_hook_on_an_inner_module_fires_in_inference_and_its_output_is_used():
    model = random_model(CvtForImageClassification, FUSED_CONFIGS["tiny"])
    x = pixels(side=48)
    dense = model.cvt.encoder.stages[2].layers[1].intermediate.dense
    seen = []

    def zero_output(module, args, output):
        seen.append(output.shape)
        return torch.zeros_like(output)

    handle = dense.register_forward_hook(zero_output)
    with torch.no_grad():
        hooked = model(x).logits
    handle.remove()
    assert seen == [(2, 10, 192)]
    zeroed = copy.deepcopy(model)
    zeroed.cvt.encoder.stages[2].layers[1].intermediate.dense.weight.data.zero_()
    zeroed.cvt.encoder.stages[2].layers[1].intermediate.dense.bias.data.zero_()
    with torch.no_grad():
        assert torch.allclose(hooked, zeroed(x).logits, atol=1e-6)
        assert (hooked - model(x).logits).abs().max() > 1e-4


@needs_onednn
def test_replaced_modules_and_patched_forwards_run_in_inference():
    model = random_model(CvtForImageClassification, FUSED_CONFIGS["tiny"])
    x = pixels(side=48)
    layer = model.cvt.encoder.stages[2].layers[1]
    with torch.no_grad():
        plain = model(x).logits
        original = layer.intermediate.activation
        layer.intermediate.activation = nn.SiLU()
        silu = model(x).logits
        layer.intermediate.activation = original
        assert (silu - plain).abs().max() > 1e-4
        layer.output.forward = lambda hidden: torch.zeros(hidden.shape[:-1] + (48,))
        patched = model(x).logits
        del layer.output.forward
        assert (patched - plain).abs().max() > 1e-4
        assert torch.equal(model(x).logits, plain)


def _ops_run(model, x):
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits = model(x).logits
    return logits, {event.key for event in prof.key_averages()}


@needs_onednn
def test_mlp_matmul_and_exact_gelu_run_as_one_kernel_in_inference_unless_either_module_is_hooked():
    model = random_model(CvtForImageClassification, FUSED_CONFIGS["tiny"], seed=21)
    x = pixels(side=48)
    _ops_run(model, x)  # a first call, so that one-time set-up stays out of the profile below
    fused, ops = _ops_run(model, x)
    assert "aten::gelu" not in ops  # every MLP's GELU ran inside its matmul
    intermediate = model.cvt.encoder.stages[2].layers[1].intermediate
    seen = {}
    intermediate.dense.register_forward_pre_hook(lambda module, args: seen.setdefault("dense input", args[0]))
    intermediate.activation.register_forward_hook(
        lambda module, args, output: seen.update(pre=args[0], post=output))
    hooked, ops = _ops_run(model, x)
    assert "aten::gelu" in ops and set(seen) == {"dense input", "pre", "post"}
    assert torch.allclose(seen["post"], torch.nn.functional.gelu(seen["pre"]), atol=0, rtol=0)
    assert torch.allclose(hooked, fused, atol=1e-5)  # the two paths agree


@needs_onednn
def test_replaced_or_patched_mlp_activation_runs_as_given_in_inference():
    model = random_model(CvtForImageClassification, FUSED_CONFIGS["tiny"], seed=22)
    x = pixels(side=48)
    intermediate = model.cvt.encoder.stages[2].layers[1].intermediate
    with torch.no_grad():
        exact = model(x).logits
        intermediate.activation.approximate = "tanh"  # the same module, another GELU: not the fused exact one
        tanh = model(x).logits
        intermediate.activation.approximate = "none"
        intermediate.activation = nn.GELU(approximate="tanh")  # a plain torch GELU in its place
        assert torch.equal(model(x).logits, tanh)
        intermediate.activation.forward = lambda hidden: torch.zeros_like(hidden)
        zeroed = model(x).logits
    assert (tanh - exact).abs().max() > 1e-6 and (zeroed - exact).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ same results
@needs_onednn
@pytest.mark.parametrize("config_name", sorted(FUSED_CONFIGS))
def test_inference_kernels_equal_the_public_ops(config_name, monkeypatch):
    config_kwargs = FUSED_CONFIGS[config_name]
    classifier = random_model(CvtForImageClassification, config_kwargs, seed=3)
    x = pixels(batch=3, side=96, seed=1)
    blocked_calls = []
    blocked = kernels._blocked_attention
    monkeypatch.setattr(kernels, "_blocked_attention", lambda *a: blocked_calls.append(a[0].shape) or blocked(*a))
    with torch.no_grad():
        fast = classifier(x, output_hidden_states=True)
        fast_logits_only = classifier(x).logits
    if config_name == "blocked-attention":
        assert blocked_calls and blocked_calls[0] == (3, 576, 32)
    slow = reference_outputs(classifier, x, output_hidden_states=True)
    assert_outputs_close(fast, slow, config_name)
    # skipping the rest of the last block (logits only) gives bit-for-bit the logits of the full computation
    assert torch.equal(fast_logits_only, fast.logits)
    backbone = random_model(CvtModel, config_kwargs, seed=4)
    with torch.no_grad():
        fast = backbone(x, output_hidden_states=True)
        features_fast = backbone(x)
    slow = reference_outputs(backbone, x, output_hidden_states=True)
    assert_outputs_close(fast, slow, f"{config_name} backbone")
    assert torch.equal(features_fast.last_hidden_state, fast.last_hidden_state)


@needs_onednn
def test_inference_kernels_equal_the_public_ops_on_cvt13():
    model = random_model(CvtForImageClassification, dict(num_labels=1000), seed=5)
    x = pixels(batch=2, side=224, seed=2)
    with torch.no_grad():
        fast = model(x, output_hidden_states=True)
        logits = model(x).logits
    slow = reference_outputs(model, x, output_hidden_states=True)
    assert_outputs_close(fast, slow, "cvt-13")
    assert torch.equal(logits, fast.logits)


@needs_onednn
def test_onednn_matmuls_with_autograd_equal_the_public_ops_and_gradients_match():
    """With autograd the float32 Linear matmuls, forward and backward, run on oneDNN and agree with F.linear / MKL."""
    model = random_model(CvtForImageClassification, FUSED_CONFIGS["blocked-attention"], seed=6)
    reference = copy.deepcopy(model)
    x, labels = pixels(batch=2, side=96, seed=3), torch.tensor([1, 5])
    loss = model(x, labels=labels).loss
    loss.backward()
    with torch.backends.mkldnn.flags(enabled=False):
        ref_loss = reference(x, labels=labels).loss
        ref_loss.backward()
    assert_close(loss.detach().numpy(), ref_loss.detach().numpy(), "loss")
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        g, ref_g = p.grad, grads[name].grad
        scale = max(1.0, float(ref_g.abs().max()))
        assert (g - ref_g).abs().max().item() <= 1e-4 * scale, name


@needs_onednn
def test_onednn_linear_supports_double_backward():
    torch.manual_seed(0)
    x = torch.randn(5, 6, requires_grad=True)
    w = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    out = kernels.linear(x, w, b)
    assert out.grad_fn is not None and "OneDnn" in type(out.grad_fn).__name__
    grad_x, = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    second, = torch.autograd.grad(grad_x.sum(), w)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ref_grad_x, = torch.autograd.grad(F.linear(x2, w2, b2).pow(2).sum(), x2, create_graph=True)
    ref_second, = torch.autograd.grad(ref_grad_x.sum(), w2)
    assert torch.allclose(grad_x, ref_grad_x, atol=1e-5) and torch.allclose(second, ref_second, atol=1e-5)


# ------------------------------------------------------------------------------------------------ never stale
def _fast_vs_reference(model, x, name):
    with torch.no_grad():
        fast = model(x, output_hidden_states=True)
    assert_outputs_close(fast, reference_outputs(model, x, output_hidden_states=True), name)
    return fast


@needs_onednn
@pytest.mark.parametrize("fused_optimizer", [False, True])
def test_fast_path_sees_optimizer_steps_and_batch_norm_updates(fused_optimizer):
    """A fused AdamW step does not bump the parameters' version counters, and a training forward changes the
    BatchNorm running statistics: the eval path after either must use the new values."""
    model = random_model(CvtForImageClassification, FUSED_CONFIGS["tiny"], seed=7)
    x = pixels(side=48)
    before = _fast_vs_reference(model, x, "before").logits
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused_optimizer)
    bn = model.cvt.encoder.stages[2].layers[0].attention.attention.convolution_projection_value
    running_var = bn.convolution_projection.normalization.running_var.clone()
    model.train()
    model(x, labels=torch.tensor([0, 3])).loss.backward()
    optimizer.step()
    model.eval()
    assert not torch.equal(running_var, bn.convolution_projection.normalization.running_var)
    after = _fast_vs_reference(model, x, "after step").logits
    assert (after - before).abs().max() > 1e-3


@needs_onednn
def test_fast_path_sees_load_state_dict_and_in_place_edits():
    model = random_model(CvtForImageClassification, FUSED_CONFIGS["blocked-attention"], seed=8)
    other = random_model(CvtForImageClassification, FUSED_CONFIGS["blocked-attention"], seed=9)
    x = pixels(side=96)
    first = _fast_vs_reference(model, x, "first").logits
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x).logits, other(x).logits)
    assert (model(x).logits - first).abs().max() > 1e-3
    norm = model.cvt.encoder.stages[0].layers[0].attention.attention.convolution_projection_query \
        .convolution_projection.normalization
    conv = model.cvt.encoder.stages[0].layers[0].attention.attention.convolution_projection_query \
        .convolution_projection.convolution
    norm.running_mean.data.add_(0.5)  # through .data: no version counter sees this
    conv.weight.data.mul_(1.5)
    model.cvt.encoder.stages[1].layers[0].intermediate.dense.weight.data.mul_(0.5)
    edited = _fast_vs_reference(model, x, "edited through .data").logits
    with torch.no_grad():
        assert (edited - other(x).logits).abs().max() > 1e-3


@needs_onednn
def test_train_eval_switching_keeps_real_batch_norm_in_training():
    model = random_model(CvtModel, FUSED_CONFIGS["tiny"], seed=10)
    bn = model.encoder.stages[0].layers[0].attention.attention.convolution_projection_key \
        .convolution_projection.normalization
    x = pixels(side=48)
    tracked = int(bn.num_batches_tracked)
    with torch.no_grad():
        model.train()
        train_out = model(x).last_hidden_state  # batch statistics, running stats updated
        model.eval()
        eval_out = model(x).last_hidden_state
    assert int(bn.num_batches_tracked) == tracked + 1
    assert (train_out - eval_out).abs().max() > 1e-3
    _fast_vs_reference(model, x, "after train/eval")


# ------------------------------------------------------------------------------------------------ bfloat16
@needs_onednn
@pytest.mark.parametrize("config_name", ["blocked-attention", "stride-kv-1-no-bias"])  # 576 keys: blocked in bf16
def test_bfloat16_model_and_autocast_on_the_inference_kernels_stay_close_to_float32(config_name):
    model = random_model(CvtForImageClassification, FUSED_CONFIGS[config_name], seed=11)
    x = pixels(batch=4, side=96, seed=4)
    with torch.no_grad():
        reference = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(x).logits
        bf16_model = copy.deepcopy(model).to(torch.bfloat16)
        bf16 = bf16_model(x.to(torch.bfloat16)).logits
        from_fp32_pixels = bf16_model(x).logits  # float32 pixels are cast to the model's dtype
        bf16_slow = reference_outputs(bf16_model, x.to(torch.bfloat16))["logits"]
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, from_fp32_pixels)
    scale = reference.abs().max().item()
    for name, out in (("autocast", autocast), ("bfloat16 model", bf16), ("bfloat16 module path", bf16_slow)):
        assert out.shape == reference.shape
        assert (out.float() - reference).abs().max().item() < 0.05 * scale, name
    # the bfloat16 inference kernels are no less accurate than the bfloat16 public ops
    fused_error = (bf16.float() - reference).abs().max().item()
    slow_error = (bf16_slow.float() - reference).abs().max().item()
    assert fused_error <= 2 * slow_error + 1e-3


# ------------------------------------------------------------------------------------------------ torch.compile
@needs_onednn
@pytest.mark.slow
def test_torch_compile_of_the_model_matches_eager():
    model = random_model(CvtForImageClassification, FUSED_CONFIGS["blocked-attention"], seed=12)
    x = pixels(batch=2, side=96, seed=5)
    compiled = torch.compile(model)
    start = time.perf_counter()
    with torch.no_grad():
        eager = model(x).logits
        out = compiled(x).logits
    assert_close(out.numpy(), eager.numpy(), "compiled logits")
    model.train()
    loss = compiled(x, labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert time.perf_counter() - start < 600


def test_batch_norm_subclass_is_folded_in_eval_like_batch_norm():
    class SyncLikeBatchNorm(nn.BatchNorm2d):  # e.g. a BatchNorm2d that only differs when training
        pass

    model = random_model(CvtForImageClassification, FUSED_CONFIGS["tiny"], seed=13)
    x = pixels(side=48)
    with torch.no_grad():
        expected = model(x).logits
    projection = model.cvt.encoder.stages[1].layers[0].attention.attention.convolution_projection_query
    old = projection.convolution_projection.normalization
    new = SyncLikeBatchNorm(old.num_features, eps=old.eps, momentum=old.momentum)
    new.load_state_dict(old.state_dict())
    projection.convolution_projection.normalization = new.eval()
    ran = []
    new.register_forward_hook(lambda *args: ran.append(1))
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected)
    assert not ran  # folded into the depthwise kernel: the module itself does not run in eval
    model.train()
    model(x)
    assert ran


@needs_onednn
def test_model_with_synchronised_batch_norm_takes_the_inference_kernels_in_eval(monkeypatch):
    from cvt_torch import training

    model = random_model(CvtForImageClassification, FUSED_CONFIGS["tiny"], seed=14)
    x = pixels(side=48)
    expected = reference_outputs(model, x)
    training.convert_sync_batchnorm(model).eval()
    assert any(isinstance(m, training.DistributedBatchNorm2d) for m in model.modules())
    calls = KernelCalls(monkeypatch)
    with torch.no_grad():
        assert_outputs_close(model(x), expected, "synchronised BatchNorm, eval")
    assert calls.onednn > 0
    model.train()
    train_logits = model(x).logits
    assert (train_logits - expected["logits"]).abs().max() > 1e-4  # batch statistics in training
