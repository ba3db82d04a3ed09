"""Keras 3 CvT (`cvt_tf`): parity with transformers 4.57.6 (PyTorch and TF), weight names, the fixed defects,
PyTorch-exact layers, input validation, checkpoint loading/saving and Keras integration.

transformers' TF classes are never imported here (they switch Keras to the legacy package); the `hf_reference`
fixture runs them in a child process.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from hf_oracle import assert_close  # noqa: E402

from cvt_core.checkpoint import load_pretrained_state, save_pretrained_state  # noqa: E402
from cvt_core.outputs import CvtImageClassifierOutput, CvtModelOutput  # noqa: E402
from cvt_core.shapes import InputTooSmallError, stage_geometry, stage_output_sizes  # noqa: E402
from cvt_core.weights import WeightLoadError, weight_table  # noqa: E402
from cvt_tf import CvtConfig, TFCvtForImageClassification, TFCvtModel  # noqa: E402
from cvt_tf.layers import CeilModeAveragePooling2D, TorchBatchNormalization  # noqa: E402
from cvt_tf.modeling_cvt import TFCvtDropPath, TFCvtIntermediate, TFCvtLayer  # noqa: E402

TINY = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3])


def _two_stage(**overrides) -> dict:
    fields = dict(embed_dim=[8, 16], num_heads=[1, 2], depth=[1, 1], patch_sizes=[7, 3], patch_stride=[4, 2],
                  patch_padding=[2, 1], mlp_ratio=[4.0, 4.0], attention_drop_rate=[0.0, 0.0], drop_rate=[0.0, 0.0],
                  drop_path_rate=[0.0, 0.0], qkv_bias=[True, True], cls_token=[False, True],
                  qkv_projection_method=["dw_bn", "dw_bn"], kernel_qkv=[3, 3], padding_kv=[1, 1], stride_kv=[2, 2],
                  padding_q=[1, 1], stride_q=[1, 1])
    fields.update(overrides)
    return fields


# Configs transformers cannot build (B2, B4, B5, B6) next to ordinary ones.
FLEXIBLE_CONFIGS = {
    "cls-on-stage-0-no-final-cls": _two_stage(cls_token=[True, False], drop_rate=[0.1, 0.1], drop_path_rate=[0.0, 0.2],
                                              num_labels=3),
    "depth-1-1-1": dict(TINY, depth=[1, 1, 1], num_labels=4),
    "avg-and-linear-projections": dict(TINY, qkv_projection_method=["avg", "linear", "avg"], cls_token=[False, True, True],
                                       num_labels=2),
    "no-cls-classifier-quick-gelu": dict(TINY, cls_token=[False, False, False], hidden_act="quick_gelu", num_labels=3),
}


def _nchw(rng, batch, height, width, channels=3):
    return rng.standard_normal((batch, channels, height, width)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ weight names
@pytest.mark.parametrize("with_head", [True, False], ids=["classifier", "bare"])
@pytest.mark.parametrize("name", list(FLEXIBLE_CONFIGS) + ["tiny", "four-stages", "identity-head"])
def test_variable_paths_and_shapes_equal_weight_table(name, with_head):
    fields = {"tiny": dict(TINY), "identity-head": dict(TINY, num_labels=0),
              "four-stages": dict(embed_dim=[8, 16, 24, 32], num_heads=[1, 2, 3, 4], depth=[1, 2, 1, 1],
                                  patch_sizes=[3] * 4, patch_stride=[2] * 4, patch_padding=[1] * 4, mlp_ratio=[4.0] * 4,
                                  attention_drop_rate=[0.0] * 4, drop_rate=[0.0] * 4, drop_path_rate=[0.0] * 4,
                                  qkv_bias=[True, False, True, True], cls_token=[False, True, False, True],
                                  qkv_projection_method=["dw_bn"] * 4, kernel_qkv=[3] * 4, padding_kv=[1] * 4,
                                  stride_kv=[2] * 4, padding_q=[1] * 4, stride_q=[1] * 4)}.get(name)
    config = CvtConfig(**(fields if fields is not None else FLEXIBLE_CONFIGS[name]))
    model = (TFCvtForImageClassification if with_head else TFCvtModel)(config)
    weights = model.canonical_weights()  # builds the model
    scope = model.name + "/"
    entries = [e for e in weight_table(config, with_head) if e.has_keras_twin]
    assert list(weights) == [e.torch_name(with_head) for e in entries]
    for entry in entries:
        variable = weights[entry.torch_name(with_head)]
        path = variable.path[len(scope):] if variable.path.startswith(scope) else variable.path
        assert path == entry.keras_variable_path(), entry.torch_name(with_head)
        assert tuple(variable.shape) == entry.keras_shape, entry.torch_name(with_head)
        assert variable.trainable == entry.trainable, entry.torch_name(with_head)
    assert sorted(v.path for v in model.weights) == sorted(v.path for v in weights.values())
    assert len(model.weights) == len(weights)


def test_variable_paths_hold_no_dot_and_cls_tokens_live_in_their_stage():
    """Keras' torch backend registers each variable as a torch parameter named by its path, where torch refuses
    dots; transformers' TF names (`stages.0`) map to ours through the weight table."""
    config = CvtConfig(**_two_stage(cls_token=[True, True]))
    model = TFCvtModel(config, data_format="channels_first")
    model.build_with_dummy_input()
    assert not [v.path for v in model.weights if "." in v.path]
    tokens = {v.path[len(model.name) + 1:]: tuple(v.shape) for v in model.weights if "cls_token" in v.path}
    assert tokens == {"cvt/encoder/stages_0/cls_token": (1, 1, 8), "cvt/encoder/stages_1/cls_token": (1, 1, 16)}
    entry = next(e for e in weight_table(config, False) if e.leaf == "cls_token")
    assert (entry.keras_path(), entry.keras_variable_path()) == ("cvt.encoder.stages.0.cls_token",
                                                                 "cvt/encoder/stages_0/cls_token")


def test_fresh_weights_are_initialised_like_transformers():
    config = CvtConfig(**TINY, num_labels=3, initializer_range=0.05)
    weights = TFCvtForImageClassification(config, data_format="channels_first").canonical_weights()
    for entry in weight_table(config, True):
        if not entry.has_keras_twin:
            continue
        value = weights[entry.torch_name(True)].numpy()
        if entry.layer_type in ("layer_norm", "batch_norm") and entry.leaf in ("weight", "running_var"):
            np.testing.assert_array_equal(value, 1.0)
        elif entry.leaf in ("bias", "running_mean"):
            np.testing.assert_array_equal(value, 0.0)
        else:  # kernels and cls tokens: truncated normal with std initializer_range, cut at 2 std
            assert np.max(np.abs(value)) <= 2 * 0.05 + 1e-6, entry.name
            if value.size >= 256:
                assert 0.03 < value.std() < 0.05, entry.name


# ------------------------------------------------------------------------------------------------ parity
def _check_against_references(name, actual: dict, ref) -> None:
    for key, expected in ref.torch.items():
        assert key in actual, f"{ref.name}: we produced no {key}"
        assert_close(actual[key], expected, f"{ref.name} {key} vs transformers PyTorch")
    for key, expected in ref.tf.items():  # transformers TF runs only where it can load the cls token (B5)
        assert_close(actual[key], expected, f"{ref.name} {key} vs transformers TF")


def _our_outputs(ref, data_format="channels_first") -> dict:
    x = ref.pixel_values if data_format == "channels_first" else ref.pixel_values.transpose(0, 2, 3, 1)
    back = (lambda t: np.asarray(t)) if data_format == "channels_first" else (lambda t: np.asarray(t).transpose(0, 3, 1, 2))
    out = {}
    backbone_cls = TFCvtForImageClassification if ref.case.with_head else TFCvtModel
    model = backbone_cls.from_pretrained(ref.checkpoint, data_format=data_format)
    base = model.cvt(x, output_hidden_states=True) if ref.case.with_head else model(x, output_hidden_states=True)
    out["last_hidden_state"] = back(base.last_hidden_state)
    if base.cls_token_value is not None:
        out["cls_token_value"] = np.asarray(base.cls_token_value)
    for i, hidden in enumerate(base.hidden_states):
        out[f"hidden_states.{i}"] = back(hidden)
    if ref.case.with_head:
        result = model(x, labels=ref.labels, output_hidden_states=True)
        out["logits"] = np.asarray(result.logits)
        if ref.labels is not None:
            out["loss"] = np.asarray(result.loss)
        for i, hidden in enumerate(result.hidden_states):
            assert_close(back(hidden), out[f"hidden_states.{i}"], f"classifier hidden_states.{i}")
    return out


@pytest.mark.parametrize("case", ["tiny-64", "tiny-384-batch1", "tiny-nonsquare", "tiny-variants",
                                  "tiny-four-stages-bare", "cvt13-224"])
def test_outputs_match_transformers_pytorch_and_tf(hf_reference, case):
    ref = hf_reference[case]
    _check_against_references(case, _our_outputs(ref), ref)


@pytest.mark.parametrize("case", ["tiny-nonsquare", "tiny-four-stages-bare"])
def test_channels_last_models_give_the_same_numbers(hf_reference, case):
    ref = hf_reference[case]
    _check_against_references(case, _our_outputs(ref, data_format="channels_last"), ref)


def test_bare_model_loads_a_classifier_checkpoint(hf_reference):
    ref = hf_reference["tiny-64"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the classifier head is expected baggage, not worth a warning
        model = TFCvtModel.from_pretrained(ref.checkpoint)
    out = model(ref.pixel_values, output_hidden_states=True)
    assert isinstance(out, CvtModelOutput)
    assert_close(out.last_hidden_state, ref.torch["last_hidden_state"], "last_hidden_state")
    assert_close(out.cls_token_value, ref.torch["cls_token_value"], "cls_token_value")


def test_classifier_from_bare_checkpoint_keeps_fresh_head_with_warning(hf_reference):
    ref = hf_reference["tiny-four-stages-bare"]
    with pytest.warns(UserWarning, match="no classification head.*classifier.weight"):
        model = TFCvtForImageClassification.from_pretrained(ref.checkpoint)
    assert_close(model.cvt(ref.pixel_values).last_hidden_state, ref.torch["last_hidden_state"], "backbone")
    np.testing.assert_array_equal(model.layernorm.gamma.numpy(), 1.0)


# ------------------------------------------------------------------------------------------------ flexibility
def test_builds_without_image_size_and_runs_any_input_size():
    config = CvtConfig(**TINY, num_labels=3)
    assert config.image_size is None
    model = TFCvtForImageClassification(config, data_format="channels_first")
    rng = np.random.default_rng(0)
    for height, width in [(64, 64), (33, 95), (16, 16)]:
        out = model(_nchw(rng, 2, height, width), output_hidden_states=True)
        assert out.logits.shape == (2, 3)
        expected = [(2, c, h, w) for c, (h, w) in zip(config.embed_dim, stage_output_sizes(config, height, width))]
        assert [tuple(h.shape) for h in out.hidden_states] == expected
    model.summary(print_fn=lambda *args, **kwargs: None)


def test_explicit_build_creates_every_variable_without_an_input():
    model = TFCvtForImageClassification(CvtConfig(**TINY), data_format="channels_first")
    model.build((None, 3, None, None))
    assert len(model.weights) == sum(e.has_keras_twin for e in weight_table(model.config, True))


@pytest.mark.parametrize("name", list(FLEXIBLE_CONFIGS))
def test_configs_transformers_cannot_build_run_forward_and_train(name):
    config = CvtConfig(**FLEXIBLE_CONFIGS[name])
    keras.utils.set_random_seed(0)  # the zero-gradient check below must not depend on a random initialisation
    model = TFCvtForImageClassification(config, data_format="channels_first")
    rng = np.random.default_rng(1)
    pixel_values = _nchw(rng, 2, 45, 38)
    labels = np.array([0, config.num_labels - 1])
    optimizer = keras.optimizers.SGD(learning_rate=0.05)
    model(pixel_values)  # build
    before = [v.numpy().copy() for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        out = model(pixel_values, labels=labels, output_hidden_states=True, training=True)
    grads = tape.gradient(out.loss, model.trainable_variables)
    missing = [v.path for v, g in zip(model.trainable_variables, grads) if g is None]
    assert not missing, f"no gradient for {missing}"
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    # Exactly zero by construction: a key bias adds the same score to every key of a query, which softmax cancels;
    # and when the head reads only the final cls token, the spatial queries of the very last block feed nothing.
    last_block = f"stages_{config.num_stages - 1}/layers_{config.depth[-1] - 1}/attention/attention/convolution_projection_query/"
    dead = [v.path for v, g in zip(model.trainable_variables, grads)
            if not np.any(g.numpy()) and not v.path.endswith("projection_key/bias")
            and not (config.cls_token[-1] and last_block in v.path)]
    assert not dead, f"zero gradient for {dead}"
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    classifier_kernel = model.classifier.kernel
    assert not np.array_equal(before[[v.path for v in model.trainable_variables].index(classifier_kernel.path)],
                              classifier_kernel.numpy())
    assert out.logits.shape == (2, config.num_labels)
    sizes = stage_output_sizes(config, 45, 38)
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, c, h, w) for c, (h, w) in zip(config.embed_dim, sizes)]
    bare = TFCvtModel(config, data_format="channels_first")(pixel_values)
    assert bare.last_hidden_state.shape == (2, config.embed_dim[-1]) + sizes[-1]
    if config.cls_token[-1]:
        assert bare.cls_token_value.shape == (2, 1, config.embed_dim[-1])
    else:
        assert bare.cls_token_value is None and "cls_token_value" not in bare


def test_no_cls_classifier_pools_the_mean_of_normalised_tokens():
    config = CvtConfig(**FLEXIBLE_CONFIGS["no-cls-classifier-quick-gelu"])
    model = TFCvtForImageClassification(config, data_format="channels_last")
    x = np.random.default_rng(2).standard_normal((2, 40, 40, 3)).astype(np.float32)
    logits = model(x).logits.numpy()
    grid = model.cvt(x).last_hidden_state.numpy()
    tokens = grid.reshape(2, -1, grid.shape[-1])
    normalised = (tokens - tokens.mean(-1, keepdims=True)) / np.sqrt(tokens.var(-1, keepdims=True) + 1e-5)
    expected = normalised.mean(1) @ model.classifier.kernel.numpy() + model.classifier.bias.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_identity_head_returns_pooled_features_when_num_labels_is_zero():
    config = CvtConfig(**TINY, num_labels=0)
    model = TFCvtForImageClassification(config, data_format="channels_first")
    x = _nchw(np.random.default_rng(3), 2, 32, 32)
    out = model(x)
    assert out.logits.shape == (2, 48)
    cls = model.cvt(x).cls_token_value.numpy()[:, 0]
    normalised = (cls - cls.mean(-1, keepdims=True)) / np.sqrt(cls.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out.logits.numpy(), normalised, atol=1e-5)
    with pytest.raises(ValueError, match="num_labels is 0"):
        model(x, labels=np.array([0, 1]))


def test_attentions_have_one_entry_per_layer_with_query_and_key_token_counts():
    config = CvtConfig(**dict(TINY, qkv_projection_method=["dw_bn", "avg", "linear"], cls_token=[True, False, True]))
    model = TFCvtModel(config, data_format="channels_first")
    out = model(_nchw(np.random.default_rng(4), 2, 50, 61), output_attentions=True)
    expected = [(2, config.num_heads[g.stage], g.num_query_tokens, g.num_key_tokens)
                for g in stage_geometry(config, 50, 61) for _ in range(config.depth[g.stage])]
    assert [tuple(a.shape) for a in out.attentions] == expected
    for probabilities in out.attentions:
        np.testing.assert_allclose(probabilities.numpy().sum(-1), 1.0, atol=1e-5)
    assert "attentions" not in model(_nchw(np.random.default_rng(4), 2, 50, 61))


def test_return_dict_false_gives_transformers_tuple_order():
    config = CvtConfig(**TINY, num_labels=3)
    x = _nchw(np.random.default_rng(5), 2, 32, 32)
    model = TFCvtForImageClassification(config, data_format="channels_first")
    loss, logits, hidden_states = model(x, labels=np.array([0, 2]), output_hidden_states=True, return_dict=False)
    assert loss.shape == () and logits.shape == (2, 3) and len(hidden_states) == 3
    (logits_only,) = model(x, return_dict=False)
    np.testing.assert_array_equal(logits_only.numpy(), logits.numpy())
    bare = TFCvtModel(config, data_format="channels_first")
    last, cls_token, hidden_states, attentions = bare(x, output_hidden_states=True, output_attentions=True,
                                                      return_dict=False)
    assert last.shape == (2, 48, 2, 2) and cls_token.shape == (2, 1, 48) and len(hidden_states) == 3
    assert len(attentions) == sum(config.depth)


def test_config_flags_are_the_defaults_of_call():
    config = CvtConfig(**TINY, output_hidden_states=True, use_return_dict=False)
    out = TFCvtModel(config, data_format="channels_first")(_nchw(np.random.default_rng(6), 1, 32, 32))
    assert isinstance(out, tuple) and len(out) == 3 and len(out[2]) == 3


# ------------------------------------------------------------------------------------------------ exact layers
def test_quick_gelu_is_x_times_sigmoid_of_1702x_and_gelu_is_exact():
    x = np.random.default_rng(7).standard_normal((2, 5, 8)).astype(np.float32) * 3
    for act in ("quick_gelu", "gelu"):
        layer = TFCvtIntermediate(CvtConfig(**TINY, hidden_act=act, mlp_ratio=[1.0, 1.0, 1.0]), 0, name="intermediate")
        layer.build((None, None, 16))
        x16 = np.concatenate([x, x], -1)
        layer.dense.kernel.assign(np.eye(16, dtype=np.float32))
        got = layer(x16).numpy()
        if act == "quick_gelu":
            expected = x16 / (1 + np.exp(-1.702 * x16))
        else:
            import torch

            expected = torch.nn.functional.gelu(torch.from_numpy(x16)).numpy()  # erf form
        np.testing.assert_allclose(got, expected, atol=2e-6, err_msg=act)


@pytest.mark.parametrize("height,width,kernel,stride,padding", [
    (7, 9, 3, 2, 1), (6, 5, 3, 2, 0), (8, 8, 2, 2, 1), (5, 7, 3, 3, 1), (11, 4, 5, 2, 2), (9, 9, 3, 2, 1)])
def test_ceil_mode_average_pooling_matches_torch_avgpool2d(height, width, kernel, stride, padding):
    import torch

    x = np.random.default_rng(8).standard_normal((2, height, width, 4)).astype(np.float32)
    expected = torch.nn.AvgPool2d(kernel, stride, padding, ceil_mode=True, count_include_pad=True)(
        torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    layer = CeilModeAveragePooling2D(kernel, stride, padding)
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-6, err_msg="static shapes")
    dynamic = tf.function(layer, input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32)])
    np.testing.assert_allclose(dynamic(x).numpy(), expected, atol=1e-6, err_msg="unknown spatial sizes")


def test_avg_projection_pools_keys_and_values_but_only_flattens_queries():
    import torch

    config = CvtConfig(**dict(TINY, qkv_projection_method=["avg"] * 3, kernel_qkv=[3] * 3, stride_kv=[2] * 3))
    model = TFCvtModel(config, data_format="channels_last")
    model.build_with_dummy_input()
    attention = model.cvt.encoder.stages[0].blocks[0].attention.attention
    grid = np.random.default_rng(9).standard_normal((1, 7, 5, 16)).astype(np.float32)
    pooled = torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True)(torch.from_numpy(grid.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(attention.convolution_projection_key(grid).numpy(),
                               pooled.transpose(0, 2, 3, 1).reshape(1, -1, 16), atol=1e-6)
    np.testing.assert_array_equal(attention.convolution_projection_query(grid).numpy(), grid.reshape(1, -1, 16))


def test_batchnorm_training_step_matches_torch_including_unbiased_running_variance():
    import torch

    rng = np.random.default_rng(10)
    channels = 5
    gamma, beta = rng.standard_normal(channels).astype(np.float32), rng.standard_normal(channels).astype(np.float32)
    mean, var = rng.standard_normal(channels).astype(np.float32), rng.uniform(0.5, 2, channels).astype(np.float32)
    x = rng.standard_normal((3, channels, 4, 6)).astype(np.float32) * 2 + 1
    torch_bn = torch.nn.BatchNorm2d(channels).train()
    with torch.no_grad():
        for tensor, value in zip((torch_bn.weight, torch_bn.bias, torch_bn.running_mean, torch_bn.running_var),
                                 (gamma, beta, mean, var)):
            tensor.copy_(torch.from_numpy(value))
        expected = torch_bn(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    keras_bn = TorchBatchNormalization()
    keras_bn.build((None, None, None, channels))
    for variable, value in zip((keras_bn.gamma, keras_bn.beta, keras_bn.moving_mean, keras_bn.moving_variance),
                               (gamma, beta, mean, var)):
        variable.assign(value)
    got = keras_bn(x.transpose(0, 2, 3, 1), training=True).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(keras_bn.moving_mean.numpy(), torch_bn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(keras_bn.moving_variance.numpy(), torch_bn.running_var.numpy(), rtol=1e-6, atol=1e-6)
    # inference uses the moving statistics, unchanged
    torch_bn.eval()
    with torch.no_grad():
        expected_eval = torch_bn(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(keras_bn(x.transpose(0, 2, 3, 1), training=False).numpy(), expected_eval, atol=1e-5)


def test_batchnorm_statistics_only_change_in_training():
    model = TFCvtModel(CvtConfig(**TINY), data_format="channels_first")
    x = _nchw(np.random.default_rng(11), 2, 32, 32)
    model(x)
    bn = model.cvt.encoder.stages[1].blocks[0].attention.attention.convolution_projection_key.convolution_projection.normalization
    before = bn.moving_variance.numpy().copy()
    model(x, training=False)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), before)
    model(x, training=True)
    assert not np.array_equal(bn.moving_variance.numpy(), before)


# ------------------------------------------------------------------------------------------------ drop path
def test_drop_path_rate_follows_the_per_layer_linspace_of_each_stage():
    config = CvtConfig(**dict(TINY, depth=[1, 2, 5], drop_path_rate=[0.0, 0.1, 0.4]))
    model = TFCvtModel(config, data_format="channels_first")
    rates = [[block.drop_path.drop_prob for block in stage.blocks] for stage in model.cvt.encoder.stages]
    assert rates == [config.drop_path_rates(s) for s in range(3)]
    np.testing.assert_allclose(rates[2], [0.0, 0.1, 0.2, 0.3, 0.4])


def test_drop_path_drops_whole_samples_and_rescales_the_kept_ones():
    layer = TFCvtDropPath(0.25, seed=3)
    x = np.ones((400, 3, 2), np.float32)
    y = layer(x, training=True).numpy()
    per_sample = y.reshape(400, -1)
    assert np.all((per_sample == 0).all(1) | np.isclose(per_sample, 1 / 0.75).all(1))
    assert 0.15 < (per_sample[:, 0] == 0).mean() < 0.35
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x)


def test_dropped_residual_branches_leave_the_input_unchanged_not_zero():
    keras.utils.set_random_seed(0)
    config = CvtConfig(**dict(TINY, depth=[2, 2, 3], drop_path_rate=[0.999, 0.0, 0.0]))
    layer = TFCvtLayer(config, 0, 1, name="layers_1")
    assert layer.drop_path.drop_prob == pytest.approx(0.999)
    tokens = np.random.default_rng(12).standard_normal((4, 6 * 5, 16)).astype(np.float32)
    trained = layer(tokens, height=6, width=5, training=True)[0].numpy()
    np.testing.assert_array_equal(trained, tokens)  # both branches dropped: the residual stream passes through
    inference = layer(tokens, height=6, width=5, training=False)[0].numpy()
    assert not np.allclose(inference, tokens)


def test_dropout_is_only_active_in_training():
    config = CvtConfig(**dict(TINY, drop_rate=[0.3] * 3, attention_drop_rate=[0.3] * 3, drop_path_rate=[0.0] * 3))
    model = TFCvtModel(config, data_format="channels_first")
    x = _nchw(np.random.default_rng(13), 2, 32, 32)
    np.testing.assert_array_equal(model(x).last_hidden_state.numpy(), model(x).last_hidden_state.numpy())
    assert not np.allclose(model(x, training=True).last_hidden_state.numpy(), model(x).last_hidden_state.numpy())


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.int64])
def test_integer_pixel_values_raise_type_error_naming_the_dtype(dtype):
    model = TFCvtModel(CvtConfig(**TINY), data_format="channels_first")
    with pytest.raises(TypeError, match=np.dtype(dtype).name):
        model(np.zeros((1, 3, 32, 32), dtype))


@pytest.mark.parametrize("shape,data_format,match", [
    ((3, 32, 32), "channels_first", "4-D"),
    ((1, 4, 32, 32), "channels_first", "4 channels"),
    ((1, 32, 32, 3), "channels_first", "channels_last"),
    ((1, 3, 32, 32), "channels_last", "channels_first"),
    ((1, 3, 2, 2), "channels_first", "too small"),
])
def test_malformed_pixel_values_raise_value_error(shape, data_format, match):
    model = TFCvtModel(CvtConfig(**TINY), data_format=data_format)
    with pytest.raises(ValueError, match=match):
        model(np.zeros(shape, np.float32))


def test_too_small_input_raises_input_too_small_error():
    with pytest.raises(InputTooSmallError):
        TFCvtForImageClassification(CvtConfig(**TINY), data_format="channels_first")(np.zeros((1, 3, 2, 2), np.float32))


def test_unknown_data_format_is_refused():
    with pytest.raises(ValueError, match="data_format"):
        TFCvtModel(CvtConfig(**TINY), data_format="NCHW")


# ------------------------------------------------------------------------------------------------ checkpoints
def _copy_checkpoint(ref, tmp_path, edit=None) -> str:
    target = str(tmp_path / "checkpoint")
    os.makedirs(target)
    shutil.copy(os.path.join(ref.checkpoint, "config.json"), target)
    state = {k: np.array(v) for k, v in load_pretrained_state(ref.checkpoint).items()}
    if edit is not None:
        edit(state)
    save_pretrained_state(target, state)
    return target


def test_strict_loading_lists_missing_and_unexpected_names(hf_reference, tmp_path):
    ref = hf_reference["tiny-64"]
    dropped = "cvt.encoder.stages.1.layers.1.layernorm_before.weight"

    def edit(state):
        del state[dropped]
        state["cvt.encoder.stages.1.layers.1.surprise.weight"] = np.zeros(3, np.float32)

    checkpoint = _copy_checkpoint(ref, tmp_path, edit)
    with pytest.raises(WeightLoadError) as error:
        TFCvtForImageClassification.from_pretrained(checkpoint)
    assert dropped in str(error.value) and "surprise.weight" in str(error.value)
    assert error.value.missing == [dropped]
    with pytest.warns(UserWarning) as warned:
        model = TFCvtForImageClassification.from_pretrained(checkpoint, strict=False)
    messages = [str(w.message) for w in warned]
    assert any("missing from the checkpoint" in m and dropped in m for m in messages)
    assert any("not used by TFCvtForImageClassification" in m and "surprise.weight" in m for m in messages)
    np.testing.assert_array_equal(model.canonical_weights()[dropped].numpy(), 1.0)  # fresh LayerNorm weight


def test_mis_shaped_weights_raise_unless_ignored(hf_reference):
    ref = hf_reference["tiny-64"]
    with pytest.raises(WeightLoadError, match=r"classifier.weight: \(5, 48\) vs \(7, 48\)"):
        TFCvtForImageClassification.from_pretrained(ref.checkpoint, num_labels=7)
    with pytest.warns(UserWarning, match="re-initialised"):
        model = TFCvtForImageClassification.from_pretrained(ref.checkpoint, num_labels=7, ignore_mismatched_sizes=True)
    assert model(ref.pixel_values).logits.shape == (2, 7)
    assert_close(model.cvt(ref.pixel_values).last_hidden_state, ref.torch["last_hidden_state"], "backbone")


def test_save_pretrained_loads_in_transformers_pytorch_with_same_outputs(hf_reference, tmp_path):
    import torch
    import transformers

    for case, hf_cls in (("tiny-nonsquare", transformers.CvtForImageClassification),
                         ("tiny-four-stages-bare", transformers.CvtModel)):
        ref = hf_reference[case]
        ours_cls = TFCvtForImageClassification if ref.case.with_head else TFCvtModel
        model = ours_cls.from_pretrained(ref.checkpoint)
        directory = str(tmp_path / case)
        model.config.extra.pop("architectures", None)
        config_before = model.config.to_dict()
        model.save_pretrained(directory)
        assert model.config.to_dict() == config_before, "save_pretrained must not change the model's config"
        with open(os.path.join(directory, "config.json")) as f:
            assert json.load(f)["architectures"] == [hf_cls.__name__]
        hf_model, info = hf_cls.from_pretrained(directory, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        with torch.no_grad():
            hf_out = hf_model.eval()(torch.from_numpy(ref.pixel_values))
        key = "logits" if ref.case.with_head else "last_hidden_state"
        assert_close(getattr(hf_out, key).numpy(), ref.torch[key], f"{case}: transformers on our save")
        original = load_pretrained_state(ref.checkpoint)
        saved = load_pretrained_state(directory)
        assert set(saved) == set(original)
        for name, value in saved.items():
            if name.endswith("num_batches_tracked"):
                assert value.dtype == np.int64 and value.shape == () and value == 0
            else:
                np.testing.assert_array_equal(value, original[name], err_msg=name)
        reloaded = ours_cls.from_pretrained(directory)
        ours = reloaded(ref.pixel_values)
        assert_close(getattr(ours, key), ref.torch[key], f"{case}: our reload")


# ------------------------------------------------------------------------------------------------ Keras integration
def test_get_config_from_config_round_trip_rebuilds_an_equal_model():
    config = CvtConfig(**dict(TINY, hidden_act="quick_gelu", cls_token=[True, False, False]), num_labels=4)
    model = TFCvtForImageClassification(config, data_format="channels_last", name="my_cvt")
    x = np.random.default_rng(14).standard_normal((2, 32, 32, 3)).astype(np.float32)
    expected = model(x).logits.numpy()
    serialised = json.loads(json.dumps(keras.saving.serialize_keras_object(model)))
    clone = keras.saving.deserialize_keras_object(serialised)
    assert type(clone) is TFCvtForImageClassification
    assert clone.config == config and clone.data_format == "channels_last" and clone.name == "my_cvt"
    clone_weights = clone.canonical_weights()
    for name, variable in model.canonical_weights().items():
        clone_weights[name].assign(variable)
    np.testing.assert_allclose(clone(x).logits.numpy(), expected, atol=1e-6)
    direct = TFCvtModel.from_config(TFCvtModel(config, data_format="channels_first").get_config())
    assert isinstance(direct, TFCvtModel) and direct.config == config and direct.data_format == "channels_first"


def test_tf_function_returns_the_same_output_container():
    config = CvtConfig(**dict(TINY, qkv_projection_method=["avg", "dw_bn", "linear"]), num_labels=3)
    model = TFCvtForImageClassification(config, data_format="channels_first")
    x = _nchw(np.random.default_rng(15), 2, 37, 29)
    labels = np.array([1, 2])
    eager = model(x, labels=labels, output_hidden_states=True, output_attentions=True)
    graph = tf.function(lambda pixels: model(pixels, labels=tf.constant(labels), output_hidden_states=True,
                                             output_attentions=True))(x)
    assert isinstance(graph, CvtImageClassifierOutput) and list(graph) == list(eager)
    for key in ("loss", "logits"):
        np.testing.assert_allclose(graph[key].numpy(), eager[key].numpy(), atol=1e-5)
    for a, b in zip(keras.tree.flatten(graph.hidden_states + graph.attentions),
                    keras.tree.flatten(eager.hidden_states + eager.attentions)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    plain = tf.function(model)(x)
    assert isinstance(plain, CvtImageClassifierOutput) and list(plain) == ["logits"]
    dynamic = tf.function(model, input_signature=[tf.TensorSpec([None, 3, None, None], tf.float32)])
    np.testing.assert_allclose(dynamic(x).logits.numpy(), eager.logits.numpy(), atol=1e-5)
    bare = TFCvtModel(config, data_format="channels_first")
    out = tf.function(bare)(x)
    assert isinstance(out, CvtModelOutput) and out.cls_token_value.shape == (2, 1, 48)


def test_keras_tree_and_predict_see_inside_the_outputs():
    config = CvtConfig(**TINY, num_labels=3)
    model = TFCvtForImageClassification(config, data_format="channels_first")
    x = _nchw(np.random.default_rng(16), 4, 32, 32)
    out = model(x, output_hidden_states=True)
    leaves = keras.tree.flatten(out)
    assert len(leaves) == 4 and all(tf.is_tensor(leaf) for leaf in leaves)
    rebuilt = keras.tree.map_structure(lambda t: t * 2, out)
    assert isinstance(rebuilt, CvtImageClassifierOutput)
    np.testing.assert_allclose(rebuilt.logits.numpy(), 2 * out.logits.numpy())
    predicted = model.predict(x, batch_size=2, verbose=0)  # the logits array, as Keras users expect
    np.testing.assert_allclose(predicted, out.logits.numpy(), atol=1e-5)


def test_loss_follows_transformers_rules_without_mutating_the_config():
    import torch

    rng = np.random.default_rng(17)
    x = _nchw(rng, 3, 32, 32)
    config = CvtConfig(**TINY, num_labels=4)
    model = TFCvtForImageClassification(config, data_format="channels_first")
    logits = model(x).logits.numpy()
    t_logits = torch.from_numpy(logits)
    labels = np.array([1, -100, 3])  # -100 is ignored, as torch's CrossEntropyLoss does
    loss = model(x, labels=labels).loss.numpy()
    np.testing.assert_allclose(loss, torch.nn.functional.cross_entropy(t_logits, torch.from_numpy(labels)).item(),
                               rtol=1e-5)
    multi = (rng.random((3, 4)) > 0.5).astype(np.float32)
    np.testing.assert_allclose(model(x, labels=multi).loss.numpy(), torch.nn.functional.binary_cross_entropy_with_logits(
        t_logits, torch.from_numpy(multi)).item(), rtol=1e-5)
    assert config.problem_type is None
    regression = TFCvtForImageClassification(config.copy(problem_type="regression"), data_format="channels_first")
    regression_logits = regression(x).logits.numpy()
    targets = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(regression(x, labels=targets).loss.numpy(), np.mean((regression_logits - targets) ** 2),
                               rtol=1e-5)
