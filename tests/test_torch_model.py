"""Behaviour of the PyTorch backend that transformers cannot check: weight names for every config, the fixed
defects (drop-path schedule and placement, any depth, cls token on any stage, "avg" projection, classifier
without cls token), QuickGELU, attentions, input validation, strict loading, losses and tuple outputs."""

from __future__ import annotations

import re
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvt_core.checkpoint import load_pretrained_state, save_pretrained_state
from cvt_core.shapes import InputTooSmallError, minimum_input_size, stage_geometry
from cvt_core.weights import WeightLoadError, weight_table
from cvt_torch import CvtConfig, CvtForImageClassification, CvtModel
from cvt_torch.modeling_cvt import CvtDropPath, CvtLayer, CvtSelfAttention, QuickGELU
from hf_oracle import assert_close

TINY = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3])
NO_DROPOUT = dict(drop_rate=[0.0] * 3, attention_drop_rate=[0.0] * 3, drop_path_rate=[0.0] * 3)


def tiny_config(**overrides) -> CvtConfig:
    return CvtConfig(**{**TINY, **overrides})


def seeded(model_class, config, seed=0):
    torch.manual_seed(seed)
    return model_class(config).eval()


def images(batch=2, height=48, width=48, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ weight names
WEIGHT_NAME_CONFIGS = {
    "tiny": dict(TINY),
    "cvt-13": dict(),
    "no-qkv-bias-avg-linear": dict(TINY, qkv_bias=[False, True, False], qkv_projection_method=["avg", "linear", "dw_bn"]),
    "cls-on-every-stage": dict(TINY, cls_token=[True, True, True]),
    "depth-1-1-1-no-cls": dict(TINY, depth=[1, 1, 1], cls_token=[False, False, False]),
    "two-stages-no-labels": dict(embed_dim=[8, 24], num_heads=[2, 3], depth=[2, 1], patch_sizes=[3, 3], patch_stride=[2, 2],
                                 patch_padding=[1, 1], mlp_ratio=[1.5, 2.5], attention_drop_rate=[0.0, 0.0], drop_rate=[0.0, 0.0],
                                 drop_path_rate=[0.0, 0.1], qkv_bias=[True, True], cls_token=[False, True],
                                 qkv_projection_method=["dw_bn", "avg"], kernel_qkv=[3, 3], padding_kv=[1, 1],
                                 stride_kv=[2, 2], padding_q=[1, 1], stride_q=[1, 1], num_labels=0),
}


@pytest.mark.parametrize("config_name", sorted(WEIGHT_NAME_CONFIGS))
@pytest.mark.parametrize("model_class", [CvtModel, CvtForImageClassification])
def test_state_dict_names_shapes_and_order_follow_weight_table(config_name, model_class):
    config = CvtConfig(**WEIGHT_NAME_CONFIGS[config_name])
    with_head = model_class is CvtForImageClassification
    expected = [(e.torch_name(with_head), tuple(e.shape)) for e in weight_table(config, with_head)]
    actual = [(name, tuple(t.shape)) for name, t in model_class(config).state_dict().items()]
    assert actual == expected


def test_cls_token_is_sized_by_its_own_stage():
    model = CvtModel(tiny_config(cls_token=[True, False, True]))
    assert model.encoder.stages[0].cls_token.shape == (1, 1, 16)
    assert model.encoder.stages[2].cls_token.shape == (1, 1, 48)
    assert not hasattr(model.encoder.stages[1], "cls_token")


# ------------------------------------------------------------------------------------------------ norms and init
def test_norm_constants_ignore_layer_norm_eps():
    model = CvtForImageClassification(tiny_config(layer_norm_eps=0.1))
    layer_norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(layer_norms) == 3 + 2 * 6 + 1 and len(batch_norms) == 3 * 6
    assert all(m.eps == 1e-5 for m in layer_norms)
    assert all(m.eps == 1e-5 and m.momentum == 0.1 for m in batch_norms)


def test_initialisation_follows_initializer_range():
    config = tiny_config(initializer_range=0.05, embed_dim=[16, 32, 256], num_heads=[1, 2, 4])
    model = seeded(CvtForImageClassification, config)
    fc1 = model.cvt.encoder.stages[2].layers[0].intermediate.dense
    assert abs(fc1.weight.std().item() - 0.05) < 0.005
    assert fc1.weight.abs().max().item() <= 2 * 0.05 * 5  # truncated normal, not uniform
    assert torch.count_nonzero(fc1.bias) == 0
    assert torch.equal(model.layernorm.weight, torch.ones(256)) and torch.count_nonzero(model.layernorm.bias) == 0
    cls_token = model.cvt.encoder.stages[2].cls_token
    assert 0 < cls_token.std().item() < 0.1


# ------------------------------------------------------------------------------------------------ activation
def test_quick_gelu_is_x_times_sigmoid_of_1_702_x():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert torch.allclose(QuickGELU()(x), x * torch.sigmoid(1.702 * x), atol=0, rtol=1e-15)
    assert not torch.allclose(QuickGELU()(x), F.gelu(x), atol=1e-3)


class _ReferenceQuickGELU(nn.Module):
    def forward(self, x):
        return x / (1 + torch.exp(-1.702 * x))


def test_quick_gelu_config_uses_quick_gelu_in_every_mlp_and_changes_outputs():
    gelu_model = seeded(CvtForImageClassification, tiny_config(num_labels=5))
    quick_model = CvtForImageClassification(tiny_config(num_labels=5, hidden_act="quick_gelu")).eval()
    quick_model.load_state_dict(gelu_model.state_dict())
    x = images()
    with torch.no_grad():
        gelu_hidden = gelu_model.cvt(x).last_hidden_state
        quick_hidden = quick_model.cvt(x).last_hidden_state
        assert (gelu_hidden - quick_hidden).abs().max() > 1e-3
        for module in gelu_model.modules():
            if hasattr(module, "activation"):
                module.activation = _ReferenceQuickGELU()
        assert_close(gelu_model.cvt(x).last_hidden_state.numpy(), quick_hidden.numpy(), "hand-made QuickGELU model")
    assert all(isinstance(m.activation, nn.GELU) and m.activation.approximate == "none"
               for m in seeded(CvtModel, tiny_config()).modules() if hasattr(m, "activation"))


# ------------------------------------------------------------------------------------------------ avg / linear projection
def hand_avg_pool_ceil(grid: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """AvgPool2d(ceil_mode=True, count_include_pad=True) written out window by window."""

    def axis(size):
        out = math.ceil((size + 2 * padding - kernel) / stride) + 1
        if (out - 1) * stride >= size + padding:  # a window starting in the right padding is dropped
            out -= 1
        windows = []
        for i in range(out):
            start = i * stride - padding
            end = min(start + kernel, size + padding)  # padding counts, the ceil overhang does not
            windows.append((max(start, 0), min(end, size), end - start))
        return windows

    rows, cols = axis(grid.shape[2]), axis(grid.shape[3])
    out = grid.new_zeros(grid.shape[0], grid.shape[1], len(rows), len(cols))
    for i, (r0, r1, rn) in enumerate(rows):
        for j, (c0, c1, cn) in enumerate(cols):
            out[:, :, i, j] = grid[:, :, r0:r1, c0:c1].sum(dim=(2, 3)) / (rn * cn)
    return out


def hand_attention(module: CvtSelfAttention, tokens, height, width, method, kernel, stride, padding):
    """The attention of the original code for the "avg" and "linear" projections, from the module's weights."""
    if module.with_cls_token:
        cls_token, tokens = tokens[:, :1], tokens[:, 1:]
    batch, _, channels = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, channels, height, width)
    query = grid.flatten(2).transpose(1, 2)
    if method == "avg":
        key_grid = hand_avg_pool_ceil(grid, kernel, stride, padding)
        key = value = key_grid.flatten(2).transpose(1, 2)
    else:
        key = value = query
    if module.with_cls_token:
        query, key, value = (torch.cat((cls_token, t), dim=1) for t in (query, key, value))
    heads = module.num_heads

    def project(linear, t):
        t = linear(t)
        return t.reshape(batch, t.shape[1], heads, channels // heads).permute(0, 2, 1, 3)

    q, k, v = project(module.projection_query, query), project(module.projection_key, key), project(module.projection_value, value)
    probs = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * channels ** -0.5, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v).permute(0, 2, 1, 3).reshape(batch, -1, channels)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (3, 2, 0), (2, 3, 1), (5, 3, 2), (3, 1, 1)])
@pytest.mark.parametrize("with_cls", [False, True])
def test_avg_projection_pools_keys_and_values_in_ceil_mode(kernel, stride, padding, with_cls):
    height, width = 7, 5
    assert torch.allclose(hand_avg_pool_ceil(torch.ones(1, 1, 9, 9), 3, 2, 1), nn.AvgPool2d(3, 2, 1, ceil_mode=True)(torch.ones(1, 1, 9, 9)))
    config = CvtConfig(embed_dim=[8], num_heads=[2], depth=[1], patch_sizes=[1], patch_stride=[1], patch_padding=[0],
                       mlp_ratio=[2.0], attention_drop_rate=[0.0], drop_rate=[0.0], drop_path_rate=[0.0], qkv_bias=[True],
                       cls_token=[with_cls], qkv_projection_method=["avg"], kernel_qkv=[kernel], padding_kv=[padding],
                       stride_kv=[stride], padding_q=[0], stride_q=[1], image_size=[height, width])
    torch.manual_seed(0)
    attention = CvtSelfAttention(config, 0).eval()
    for linear in (attention.projection_query, attention.projection_key, attention.projection_value):
        nn.init.normal_(linear.bias)
    tokens = torch.randn(2, height * width + int(with_cls), 8)
    grid = torch.randn(2, 8, height, width)
    pooled_tokens = attention.convolution_projection_key(grid)
    expected = hand_avg_pool_ceil(grid, kernel, stride, padding)
    assert torch.allclose(pooled_tokens, expected.flatten(2).transpose(1, 2), atol=1e-6)
    assert torch.allclose(attention.convolution_projection_value(grid), pooled_tokens)
    assert torch.equal(attention.convolution_projection_query(grid), grid.flatten(2).transpose(1, 2))
    geometry = stage_geometry(config, height, width)[0]
    assert (geometry.key_height, geometry.key_width) == tuple(expected.shape[2:])

    with torch.no_grad():
        context, probs = attention(tokens, height, width, output_attentions=True)
        fast_context, _ = attention(tokens, height, width)
        reference = hand_attention(attention, tokens, height, width, "avg", kernel, stride, padding)
    assert probs.shape == (2, 2, geometry.num_query_tokens, geometry.num_key_tokens)
    assert torch.allclose(context, reference, atol=1e-5)
    assert torch.allclose(fast_context, reference, atol=1e-5)


def test_linear_projection_attends_over_all_tokens_without_spatial_op():
    config = tiny_config(qkv_projection_method=["linear", "linear", "linear"], cls_token=[True, False, True])
    attention = CvtSelfAttention(config, 0).eval()
    assert [n for n, _ in attention.named_parameters() if "convolution" in n] == []
    tokens = torch.randn(2, 1 + 6 * 5, 16)
    with torch.no_grad():
        context, probs = attention(tokens, 6, 5, output_attentions=True)
        reference = hand_attention(attention, tokens, 6, 5, "linear", None, None, None)
    assert probs.shape == (2, 1, 31, 31)
    assert torch.allclose(context, reference, atol=1e-5)


def test_dw_bn_attention_scales_by_stage_width_not_head_width():
    config = tiny_config(num_heads=[1, 4, 3], cls_token=[False, False, False])
    attention = CvtSelfAttention(config, 1).eval()
    tokens = torch.randn(1, 36, 32)
    with torch.no_grad():
        _, probs = attention(tokens, 6, 6, output_attentions=True)
        grid = tokens.transpose(1, 2).reshape(1, 32, 6, 6)
        q = attention.projection_query(attention.convolution_projection_query(grid)).reshape(1, 36, 4, 8).transpose(1, 2)
        k = attention.projection_key(attention.convolution_projection_key(grid)).reshape(1, 9, 4, 8).transpose(1, 2)
        expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1)
    assert torch.allclose(probs, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------ unusual configs
UNUSUAL_CONFIGS = {
    "cls-on-stage-0": dict(TINY, cls_token=[True, False, True]),
    "depth-1-1-1": dict(TINY, depth=[1, 1, 1]),
    "no-cls-classifier": dict(TINY, cls_token=[False, False, False]),
    "avg-and-linear": dict(TINY, qkv_projection_method=["avg", "linear", "avg"], drop_path_rate=[0.1, 0.1, 0.2]),
}


@pytest.mark.parametrize("config_name", sorted(UNUSUAL_CONFIGS))
def test_configs_transformers_cannot_build_train_forward_and_backward(config_name):
    config = CvtConfig(**UNUSUAL_CONFIGS[config_name], num_labels=4)
    model = seeded(CvtForImageClassification, config).train()
    x = images(batch=3, height=40, width=56)
    out = model(x, labels=torch.tensor([0, 3, 1]), output_hidden_states=True)
    sizes = [(g.height, g.width) for g in stage_geometry(config, 40, 56)]
    assert out.logits.shape == (3, 4)
    assert [tuple(h.shape) for h in out.hidden_states] == [(3, c, h, w) for c, (h, w) in zip(config.embed_dim, sizes)]
    out.loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    model.eval()
    with torch.no_grad():
        backbone = model.cvt(x)
    assert backbone.last_hidden_state.shape == (3, 48) + sizes[-1]
    assert (backbone.cls_token_value is None) == (not config.cls_token[-1])


def test_classifier_without_cls_token_pools_mean_of_normalised_final_tokens():
    model = seeded(CvtForImageClassification, tiny_config(cls_token=[False, False, False], num_labels=3))
    nn.init.normal_(model.layernorm.bias)
    x = images()
    with torch.no_grad():
        last = model.cvt(x).last_hidden_state
        tokens = last.flatten(2).transpose(1, 2)
        expected = model.classifier(F.layer_norm(tokens, (48,), model.layernorm.weight, model.layernorm.bias, 1e-5).mean(1))
        assert torch.allclose(model(x).logits, expected, atol=1e-6)


def test_forward_features_and_forward_head_compose_to_logits():
    model = seeded(CvtForImageClassification, tiny_config(num_labels=3))
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 1, 48)
        assert torch.allclose(model.forward_head(features), model(x).logits)
        assert model.forward_head(features, pre_logits=True).shape == (2, 48)


def test_zero_labels_gives_identity_classifier_returning_pooled_features():
    model = seeded(CvtForImageClassification, tiny_config(num_labels=0))
    assert isinstance(model.classifier, nn.Identity)
    x = images()
    with torch.no_grad():
        logits = model(x).logits
        assert torch.allclose(logits, model.layernorm(model.cvt(x).cls_token_value)[:, 0])
    with pytest.raises(ValueError, match="num_labels=0"):
        model(x, labels=torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------------ attentions
def test_attentions_have_one_probability_map_per_layer_and_match_fast_path():
    config = tiny_config(cls_token=[True, False, True])
    model = seeded(CvtModel, config)
    x = images(height=40, width=56)
    with torch.no_grad():
        explicit = model(x, output_attentions=True, output_hidden_states=True)
        fast = model(x, output_hidden_states=True)
    expected_shapes = [(2, config.num_heads[g.stage], g.num_query_tokens, g.num_key_tokens)
                       for g in stage_geometry(config, 40, 56) for _ in range(config.depth[g.stage])]
    assert [tuple(a.shape) for a in explicit.attentions] == expected_shapes
    assert expected_shapes[0] == (2, 1, 1 + 10 * 14, 1 + 5 * 7)
    for probs in explicit.attentions:
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert fast.attentions is None
    assert torch.allclose(explicit.last_hidden_state, fast.last_hidden_state, atol=1e-5)
    for a, b in zip(explicit.hidden_states, fast.hidden_states):
        assert torch.allclose(a, b, atol=1e-5)


def test_output_flags_default_to_config():
    model = seeded(CvtModel, tiny_config(output_attentions=True, output_hidden_states=True))
    with torch.no_grad():
        out = model(images())
    assert len(out.attentions) == 6 and len(out.hidden_states) == 3
    with torch.no_grad():
        out = model(images(), output_attentions=False, output_hidden_states=False)
    assert out.attentions is None and out.hidden_states is None


# ------------------------------------------------------------------------------------------------ drop path and dropout
def test_drop_path_rate_grows_linearly_over_the_layers_of_each_stage():
    config = tiny_config(depth=[1, 2, 5], drop_path_rate=[0.3, 0.2, 0.4])
    model = CvtModel(config)
    rates = [[layer.drop_path.drop_prob for layer in stage.layers] for stage in model.encoder.stages]
    assert rates[0] == [0.0]
    assert np.allclose(rates[1], [0.0, 0.2])
    assert np.allclose(rates[2], np.linspace(0.0, 0.4, 5))


def test_drop_path_drops_whole_samples_and_rescales_the_kept_ones():
    drop = CvtDropPath(0.5).train()
    torch.manual_seed(0)
    out = drop(torch.ones(256, 3, 4))
    per_sample = out.reshape(256, -1)
    assert torch.all(per_sample == per_sample[:, :1])
    assert set(per_sample[:, 0].tolist()) == {0.0, 2.0}
    assert torch.equal(drop.eval()(torch.ones(4, 3)), torch.ones(4, 3))


def test_dropped_layer_passes_its_input_through_unchanged():
    # With drop path on the residual branch a dropped sample keeps its input; transformers zeroes it instead.
    config = CvtConfig(**TINY, **dict(NO_DROPOUT, drop_path_rate=[0.0, 0.0, 0.999]))
    torch.manual_seed(0)
    layer = CvtLayer(config, 2, 2).train()  # the last block of stage 2 gets the stage's full rate
    tokens = torch.randn(8, 1 + 4 * 4, 48)
    out, _ = layer(tokens, 4, 4)
    dropped = [i for i in range(8) if torch.equal(out[i], tokens[i])]
    assert len(dropped) >= 6  # keep probability 0.001 per branch and sample
    layer.eval()
    with torch.no_grad():
        kept, _ = layer(tokens, 4, 4)
    assert not torch.allclose(kept, tokens, atol=1e-3)


def test_dropouts_sit_where_the_original_code_puts_them():
    config = tiny_config(drop_rate=[0.1, 0.2, 0.3], attention_drop_rate=[0.0, 0.0, 0.25])
    model = seeded(CvtModel, config)
    stage = model.encoder.stages[2]
    layer = stage.layers[0]
    assert stage.embedding.dropout.p == 0.3 and layer.attention.attention.dropout.p == 0.25
    assert layer.attention.output.dropout.p == layer.intermediate.dropout.p == layer.output.dropout.p == 0.3
    seen = {}

    def record(key):
        def hook(module, args):
            seen[key] = args[0]
        return hook

    stage.embedding.dropout.register_forward_pre_hook(record("embedding"))
    layer.intermediate.dropout.register_forward_pre_hook(record("mlp"))
    with torch.no_grad():
        model(images(height=64, width=64))
    assert seen["embedding"].shape == (2, 1 + 4 * 4, 48)  # the cls token is in the embedding dropout
    assert seen["mlp"].shape == (2, 17, 4 * 48) and torch.all(seen["mlp"] >= -0.2)  # after the GELU


def test_training_mode_is_stochastic_and_eval_mode_deterministic():
    model = seeded(CvtModel, tiny_config(attention_drop_rate=[0.0, 0.0, 0.3]))
    x = images()
    for output_attentions in (False, True):
        model.train()
        a = model(x, output_attentions=output_attentions).last_hidden_state
        b = model(x, output_attentions=output_attentions).last_hidden_state
        assert not torch.allclose(a, b)
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)


def test_returned_attentions_are_the_probabilities_before_dropout():
    model = seeded(CvtModel, tiny_config(attention_drop_rate=[0.5, 0.5, 0.5])).train()
    for probs in model(images(), output_attentions=True).attentions:
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.all(probs > 0)


# ------------------------------------------------------------------------------------------------ input validation
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_integer_pixels_raise_type_error_asking_for_normalised_float(dtype):
    model = CvtModel(tiny_config())
    with pytest.raises(TypeError, match=rf"{dtype}.*float.*normalise"):
        model(torch.zeros(1, 3, 48, 48, dtype=dtype))


def test_non_tensor_pixels_raise_type_error():
    with pytest.raises(TypeError, match="torch.Tensor.*ndarray"):
        CvtModel(tiny_config())(np.zeros((1, 3, 48, 48), np.float32))


def test_chw_image_raises_value_error_suggesting_unsqueeze():
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        CvtModel(tiny_config())(torch.zeros(3, 48, 48))


def test_wrong_channel_count_raises_value_error_naming_channels():
    with pytest.raises(ValueError, match="4 channels.*num_channels=3"):
        CvtForImageClassification(tiny_config())(torch.zeros(1, 4, 48, 48))
    with pytest.raises(ValueError, match="channels-last"):
        CvtModel(tiny_config())(torch.zeros(1, 48, 48, 3))


def test_too_small_image_raises_before_any_layer():
    model = CvtModel(tiny_config())
    model.encoder.register_forward_pre_hook(lambda *args: pytest.fail("a layer ran on an invalid input"))
    side = minimum_input_size(model.config) - 1
    with pytest.raises(InputTooSmallError, match="too small"):
        model(torch.zeros(1, 3, side, side))


# ------------------------------------------------------------------------------------------------ loading
@pytest.fixture
def saved_classifier(tmp_path):
    model = seeded(CvtForImageClassification, tiny_config(num_labels=3))
    model.save_pretrained(tmp_path)
    return model, tmp_path


def _rewrite_checkpoint(directory, edit):
    state = {k: np.array(v) for k, v in load_pretrained_state(str(directory)).items()}
    edit(state)
    save_pretrained_state(str(directory), state)


def test_strict_loading_lists_missing_unexpected_and_misshaped_weights(saved_classifier):
    _, directory = saved_classifier
    missing = "cvt.encoder.stages.1.layers.0.attention.output.dense.bias"
    misshaped = "cvt.encoder.stages.0.embedding.convolution_embeddings.projection.bias"

    def edit(state):
        del state[missing]
        state["cvt.encoder.stages.1.extra.weight"] = np.zeros(3, np.float32)
        state[misshaped] = np.zeros(17, np.float32)

    _rewrite_checkpoint(directory, edit)
    with pytest.raises(WeightLoadError) as caught:
        CvtForImageClassification.from_pretrained(directory)
    message = str(caught.value)
    assert missing in message and "cvt.encoder.stages.1.extra.weight" in message
    assert f"{misshaped}: (17,) vs (16,)" in message
    assert caught.value.missing == [missing]


def test_lenient_loading_keeps_initialisation_for_missing_weights_and_warns(saved_classifier):
    original, directory = saved_classifier
    missing = "cvt.encoder.stages.2.layers.1.output.dense.bias"
    _rewrite_checkpoint(directory, lambda state: state.pop(missing))
    with pytest.warns(UserWarning, match=re.escape(missing)):
        loaded = CvtForImageClassification.from_pretrained(directory, strict=False)
    loaded_state = loaded.state_dict()
    assert torch.count_nonzero(loaded_state[missing]) == 0
    for name, tensor in original.state_dict().items():
        if name != missing:
            assert torch.equal(tensor, loaded_state[name]), name


def test_changing_num_labels_needs_ignore_mismatched_sizes(saved_classifier):
    original, directory = saved_classifier
    with pytest.raises(WeightLoadError, match="classifier.weight"):
        CvtForImageClassification.from_pretrained(directory, num_labels=7)
    model = CvtForImageClassification.from_pretrained(directory, num_labels=7, ignore_mismatched_sizes=True)
    assert model.classifier.weight.shape == (7, 48)
    assert torch.equal(model.layernorm.weight, original.layernorm.weight)
    with torch.no_grad():
        assert model(images()).logits.shape == (2, 7)


def test_loading_casts_to_the_model_dtype(saved_classifier):
    original, directory = saved_classifier
    _rewrite_checkpoint(directory, lambda state: state.update(
        {k: v.astype(np.float16) for k, v in state.items() if v.dtype == np.float32}))
    loaded = CvtForImageClassification.from_pretrained(directory)
    weight = loaded.classifier.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, original.classifier.weight.half().float())
    assert loaded.cvt.encoder.stages[0].layers[0].attention.attention.convolution_projection_key.convolution_projection.normalization.num_batches_tracked.dtype == torch.int64


# ------------------------------------------------------------------------------------------------ tuples and losses
def test_return_dict_false_gives_transformers_tuple_order_without_nones():
    x = images()
    with_cls = seeded(CvtModel, tiny_config())
    without_cls = seeded(CvtModel, tiny_config(cls_token=[False, False, False]))
    classifier = seeded(CvtForImageClassification, tiny_config(num_labels=3))
    with torch.no_grad():
        full = with_cls(x, output_hidden_states=True, output_attentions=True)
        as_tuple = with_cls(x, output_hidden_states=True, output_attentions=True, return_dict=False)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 4
        assert torch.equal(as_tuple[0], full.last_hidden_state) and torch.equal(as_tuple[1], full.cls_token_value)
        assert len(as_tuple[2]) == 3 and len(as_tuple[3]) == 6
        plain = without_cls(x, return_dict=False, output_hidden_states=True)
        assert len(plain) == 2 and plain[0].shape == (2, 48, 3, 3) and len(plain[1]) == 3
        logits_only = classifier(x, return_dict=False)
        assert len(logits_only) == 1 and logits_only[0].shape == (2, 3)
        loss, logits, hidden = classifier(x, labels=torch.tensor([0, 2]), output_hidden_states=True, return_dict=False)
        assert loss.ndim == 0 and torch.equal(logits, logits_only[0]) and len(hidden) == 3
    default_tuple = seeded(CvtModel, tiny_config(use_return_dict=False))
    with torch.no_grad():
        assert isinstance(default_tuple(x), tuple)


def test_loss_type_is_inferred_per_call_without_changing_the_config():
    model = seeded(CvtForImageClassification, tiny_config(num_labels=3))
    x = images()
    with torch.no_grad():
        logits = model(x).logits
        class_loss = model(x, labels=torch.tensor([2, 0])).loss
        assert torch.allclose(class_loss, F.cross_entropy(logits, torch.tensor([2, 0])))
        assert model.config.problem_type is None
        multi = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
        assert torch.allclose(model(x, labels=multi).loss, F.binary_cross_entropy_with_logits(logits, multi))
        assert model.config.problem_type is None
        model.config.problem_type = "regression"
        assert torch.allclose(model(x, labels=multi).loss, F.mse_loss(logits, multi))
    regression = seeded(CvtForImageClassification, tiny_config(num_labels=1))
    with torch.no_grad():
        targets = torch.tensor([0.5, -1.0])
        out = regression(x, labels=targets)
        assert torch.allclose(out.loss, F.mse_loss(out.logits[:, 0], targets))
        assert regression.config.problem_type is None


# ------------------------------------------------------------------------------------------------ activation checkpointing
def _saved_for_backward_bytes(model, x, labels) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one training forward (then runs it)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x, labels=labels).loss
    loss.backward()
    return sum(storages.values())


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations():
    config = tiny_config(**NO_DROPOUT, num_labels=4)
    model = seeded(CvtForImageClassification, config).train()
    checkpointed = seeded(CvtForImageClassification, config).train()
    checkpointed.gradient_checkpointing_enable()
    x, labels = images(batch=3, height=64, width=56), torch.tensor([0, 3, 1])
    plain_bytes = _saved_for_backward_bytes(model, x, labels)
    checkpointed_bytes = _saved_for_backward_bytes(checkpointed, x, labels)
    assert checkpointed_bytes < 0.5 * plain_bytes
    grads = dict(model.named_parameters())
    for name, p in checkpointed.named_parameters():
        assert_close(p.grad.numpy(), grads[name].grad.numpy(), name)


def test_gradient_checkpointing_is_switched_by_transformers_and_timm_names_and_only_acts_in_training():
    model = seeded(CvtForImageClassification, tiny_config(num_labels=3))
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert model.is_gradient_checkpointing
    assert all(stage.checkpoint_options == {"use_reentrant": True} for stage in model.cvt.encoder.stages)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    model.set_grad_checkpointing()
    assert model.is_gradient_checkpointing and model.cvt.is_gradient_checkpointing
    assert model.cvt.encoder.stages[0].checkpoint_options == {"use_reentrant": False}
    runs = []
    model.cvt.encoder.stages[2].layers[0].intermediate.register_forward_hook(lambda *args: runs.append(1))
    with torch.no_grad():
        model(images())  # eval: each block runs once, as without checkpointing
    assert len(runs) == 1
    model.train()
    model(images()).logits.sum().backward()  # the forward, then its recomputation in the backward
    assert len(runs) == 3
    model.set_grad_checkpointing(False)
    assert not model.is_gradient_checkpointing
    model(images()).logits.sum().backward()
    assert len(runs) == 4
