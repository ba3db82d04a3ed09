"""Training the PyTorch model: an ordinary loop learns the digits, bf16 autocast and torch.compile train,
`save_pretrained` keeps what training changed, and the helpers of `cvt_torch.training` (schedule, parameter
groups, synchronised-BatchNorm conversion) do what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cvt_torch import CvtForImageClassification
from cvt_torch import training as tt
from training_helpers import digits, small_config, torch_threads


@pytest.fixture(scope="module")
def trained_on_digits():
    """A small CvT trained for 4 epochs on the digits with a plain PyTorch loop (what any user would write)."""
    train_x, train_y, val_x, val_y = digits()
    with torch_threads(1):
        torch.manual_seed(0)
        model = CvtForImageClassification(small_config())
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
        steps = 4 * (len(train_y) // 32)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
        rng = np.random.default_rng(0)
        for _ in range(4):
            model.train()
            order = rng.permutation(len(train_y))
            for start in range(0, len(order) - 31, 32):
                rows = order[start:start + 32]
                outputs = model(torch.from_numpy(train_x[rows]), labels=torch.from_numpy(train_y[rows]))
                optimizer.zero_grad()
                outputs.loss.backward()
                optimizer.step()
                scheduler.step()
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(val_x)).logits.numpy()
    return model, logits


def test_an_ordinary_pytorch_training_loop_learns_the_digits(trained_on_digits):
    _, logits = trained_on_digits
    val_y = digits()[3]
    accuracy = float(np.mean(logits.argmax(1) == val_y))
    assert accuracy >= 0.9, accuracy


def test_save_pretrained_keeps_trained_batchnorm_statistics(trained_on_digits, tmp_path):
    model, logits = trained_on_digits
    running = {k: v for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    assert any(int(v) > 0 for k, v in running.items() if "num_batches" in k)
    assert not all(torch.equal(v, torch.zeros_like(v)) for k, v in running.items() if "running_mean" in k)
    model.save_pretrained(tmp_path)
    reloaded = CvtForImageClassification.from_pretrained(tmp_path)
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(torch.from_numpy(digits()[2])).logits.numpy(), logits)


def test_bfloat16_inference_of_a_trained_model_agrees_with_float32_on_real_digits(trained_on_digits):
    """The speed issue's bf16 promise on weights whose top-1 means something: autocast and model.to(bfloat16)
    give the float32 prediction for >= 99% of the 360 held-out handwritten digits."""
    import copy

    model, logits = trained_on_digits
    val_x = torch.from_numpy(digits()[2])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_logits = model(val_x).logits.float().numpy()
        bf16_logits = copy.deepcopy(model).to(torch.bfloat16)(val_x.to(torch.bfloat16)).logits.float().numpy()
    for name, candidate in (("autocast", autocast_logits), ("model.to(bfloat16)", bf16_logits)):
        agreement = float(np.mean(candidate.argmax(1) == logits.argmax(1)))
        assert agreement >= 0.99, (name, agreement)
        assert 0 < np.abs(candidate - logits).max() < 0.5, name  # really bf16, and close


def _one_step(runner, model, batch, autocast=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return tt.train_step(runner, optimizer, *batch, autocast_dtype=autocast)


def test_bf16_autocast_trains_with_float32_weights_and_a_float32_loss():
    train_x, train_y = digits()[:2]
    batch = (train_x[:64], train_y[:64])
    with torch_threads(1):
        torch.manual_seed(1)
        model = CvtForImageClassification(small_config(drop_path_rate=[0.0] * 3))
        optimizer = tt.make_optimizer(model, 3e-3, 0.0)
        losses = [tt.train_step(model, optimizer, *batch, autocast_dtype=torch.bfloat16)[0] for _ in range(8)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(torch.from_numpy(batch[0])).logits.dtype == torch.bfloat16
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_torch_compile_option_trains_like_eager():
    train_x, train_y = digits()[:2]
    batch = (train_x[:16], train_y[:16])
    config = small_config(drop_path_rate=[0.0] * 3)
    with torch_threads(1):
        torch.manual_seed(2)
        eager = CvtForImageClassification(config)
        compiled = CvtForImageClassification(config)
        compiled.load_state_dict(eager.state_dict())
        runner = tt.prepare_model(compiled, compile=True, compile_backend="aot_eager")
        assert runner is not compiled and tt.unwrap(runner) is compiled
        eager_loss, _ = _one_step(eager, eager, batch)
        compiled_loss, _ = _one_step(runner, compiled, batch)
    assert abs(eager_loss - compiled_loss) < 1e-5
    for name, value in compiled.state_dict().items():
        torch.testing.assert_close(value, eager.state_dict()[name], atol=1e-5, rtol=1e-5, msg=name)


def test_sync_batchnorm_conversion_keeps_every_tensor_and_acts_as_batchnorm_in_one_process():
    torch.manual_seed(3)
    model = CvtForImageClassification(small_config())
    reference = CvtForImageClassification(small_config())
    reference.load_state_dict(model.state_dict())
    tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}
    tt.convert_sync_batchnorm(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, tt.DistributedBatchNorm2d) for m in norms)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == tensors
    x = torch.from_numpy(digits()[0][:8])
    model.train(), reference.train()
    torch.manual_seed(4)
    got = model(x).logits
    torch.manual_seed(4)
    torch.testing.assert_close(got, reference(x).logits)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], msg=name)


def test_weight_decay_skips_biases_and_norms_but_decays_matrices_and_the_cls_token():
    model = CvtForImageClassification(small_config())
    decay, no_decay = tt.parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "cvt.encoder.stages.2.cls_token" in decayed and "classifier.weight" in decayed
    assert not any(n.endswith("bias") or "layernorm" in n or "normalization" in n for n in decayed)
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_cosine_schedule_rises_linearly_then_decays_to_zero():
    factors = [tt.warmup_cosine_factor(step, total_steps=12, warmup_steps=4) for step in range(14)]
    np.testing.assert_allclose(factors[:4], [0.25, 0.5, 0.75, 1.0])
    assert factors[4] == 1.0 and factors[8] == pytest.approx(0.5) and factors[12] == factors[13] == 0.0
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    scheduler = tt.make_scheduler(optimizer, 12, 4)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(seen, [0.2 * f for f in factors[:6]])
