"""The Keras model's fast path (`cvt_tf`): fused Dense (one MatMul + BiasAdd + GELU), LayerNorm, the BatchNorm folded
into the depthwise convolution in inference, the attention scale folded into the query projection and the traced
graph behind eager inference calls. Each is pinned to the plain Keras layers' math at 1e-5 (fp32); folded weights
are never stale; training still uses (and updates) the BatchNorm batch statistics; mixed_bfloat16 works.

Parity of the whole model with transformers is tested in test_tf_model.py (the fast path is the default path).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from hf_oracle import assert_close  # noqa: E402

from cvt_tf import CvtConfig, TFCvtForImageClassification, TFCvtModel  # noqa: E402
from cvt_tf.modeling_cvt import (  # noqa: E402
    TFCvtSelfAttentionConvProjection,
    _apply_dense,
    _apply_layer_norm,
)

TINY = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], drop_path_rate=[0.0, 0.0, 0.0])
SIDE = 64


def _randomize(model, seed: int) -> None:
    """Distinct random weights and BatchNorm statistics (positive variances)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = rng.standard_normal(variable.shape).astype(np.float32) * 0.3
        if "moving_variance" in variable.path:
            value = np.abs(value) + 0.5
        variable.assign(value)


def _model(seed: int = 0, **overrides) -> TFCvtForImageClassification:
    model = TFCvtForImageClassification(CvtConfig(**{**TINY, "num_labels": 5, **overrides}), data_format="channels_first")
    model.build_with_dummy_input()
    _randomize(model, seed)
    return model


def _images(batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, SIDE, SIDE)).astype(np.float32)


def _fresh_copy(model) -> TFCvtForImageClassification:
    """A new model holding `model`'s current weights: nothing cached can exist in it."""
    copy = TFCvtForImageClassification(model.config, data_format="channels_first")
    copy.build_with_dummy_input()
    copy.set_weights(model.get_weights())
    return copy


def _graph_logits(model, x) -> np.ndarray:
    """Graph mode through the layers' ordinary call (no eager wrapper): the reference for the eager fast path."""
    return tf.function(lambda images: model(images, training=False).logits)(tf.constant(x)).numpy()


# ------------------------------------------------------------------------------------------------ building blocks
@pytest.mark.parametrize("activation", [None, "gelu", "quick_gelu"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_fused_dense_equals_keras_dense(activation, use_bias):
    dense = keras.layers.Dense(24, use_bias=use_bias, bias_initializer="random_normal")
    dense.build((None, None, 16))
    x = np.random.default_rng(0).standard_normal((3, 7, 16)).astype(np.float32)
    expected = dense(x)
    if activation == "gelu":
        expected = keras.ops.gelu(expected, approximate=False)
    elif activation == "quick_gelu":
        expected = expected * keras.ops.sigmoid(1.702 * expected)
    assert_close(_apply_dense(dense, tf.constant(x), activation=activation), expected, "dense", tol=1e-5)
    assert_close(_apply_dense(dense, tf.constant(x), scale=0.125), dense(x) * 0.125, "scaled dense", tol=1e-5)
    # inside a graph with an unknown token count
    fn = tf.function(lambda t: _apply_dense(dense, t, activation=activation),
                     input_signature=[tf.TensorSpec((None, None, 16), tf.float32)])
    assert_close(fn(tf.constant(x)), expected, "dense (graph)", tol=1e-5)


def test_layer_norm_equals_keras_layer_norm():
    norm = keras.layers.LayerNormalization(epsilon=1e-5, gamma_initializer="random_normal",
                                           beta_initializer="random_normal")
    norm.build((None, None, 32))
    x = (np.random.default_rng(0).standard_normal((2, 9, 32)) * 4 + 3).astype(np.float32)
    assert_close(_apply_layer_norm(norm, tf.constant(x)), norm(x), "layer norm", tol=1e-5)
    grid = x.reshape(2, 3, 3, 32)
    assert_close(_apply_layer_norm(norm, tf.constant(grid)), norm(grid), "layer norm (NHWC)", tol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_folded_batch_norm_equals_convolution_then_batch_norm(stride):
    config = CvtConfig(**TINY, stride_kv=[2, stride, 2], padding_kv=[1, 1, 1])
    projection = TFCvtSelfAttentionConvProjection(config, 1, "key")
    projection.build(None)
    _randomize(projection, 3)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 32)).astype(np.float32)
    expected = projection.normalization(projection.convolution(projection.padding(x)), training=False)
    assert_close(projection(x, training=False), expected, "folded projection", tol=1e-5)
    assert_close(tf.function(lambda t: projection(t))(tf.constant(x)), expected, "folded (graph)", tol=1e-5)


# ------------------------------------------------------------------------------------------------ whole model
def test_eager_call_equals_graph_and_predict():
    model = _model()
    x = _images()
    eager = model(x)
    assert_close(eager.logits, _graph_logits(model, x), "eager vs graph", tol=1e-5)
    assert_close(model.predict_on_batch(x), eager.logits, "predict_on_batch vs eager", tol=1e-5)
    assert_close(model.predict(x, verbose=0), eager.logits, "predict vs eager", tol=1e-5)
    # several sizes through the same traced eager function; output flags honoured
    for side in (64, 80, 96):
        images = np.random.default_rng(side).standard_normal((1, 3, side, side)).astype(np.float32)
        out = model(images, output_hidden_states=True, output_attentions=True)
        assert_close(out.logits, _graph_logits(model, images), f"eager {side}", tol=1e-5)
        assert len(out.hidden_states) == 3 and len(out.attentions) == sum(TINY["depth"])
        assert out.attentions[0].shape[1] == 1  # one head: (batch, heads, queries, keys)
    assert model(x).hidden_states is None


def test_bare_model_eager_equals_graph():
    model = TFCvtModel(CvtConfig(**TINY), data_format="channels_first")
    model.build_with_dummy_input()
    _randomize(model, 5)
    x = _images()
    graph = tf.function(lambda images: model(images).last_hidden_state)(tf.constant(x))
    assert_close(model(x).last_hidden_state, graph, "bare model", tol=1e-5)


def test_no_stale_weights_after_assignment():
    model = _model()
    x = _images()
    before_eager, before_predict = model(x).logits.numpy(), model.predict_on_batch(x)
    # change BatchNorm statistics (folded into the depthwise kernels) and a Dense kernel (fused)
    for variable in model.weights:
        if "moving_mean" in variable.path or "moving_variance" in variable.path or "projection_key" in variable.path:
            variable.assign(variable.numpy() * 1.5 + 0.1)
    reference = _fresh_copy(model)
    expected = _graph_logits(reference, x)
    assert np.abs(expected - before_eager).max() > 1e-3
    assert_close(model(x).logits, expected, "eager after assign", tol=1e-5)
    assert_close(model.predict_on_batch(x), expected, "predict_on_batch after assign", tol=1e-5)
    # set_weights (what from_pretrained-like code and checkpoints use)
    model.set_weights(_fresh_copy(_model(seed=9)).get_weights())
    assert_close(model.predict_on_batch(x), _graph_logits(_model(seed=9), x), "after set_weights", tol=1e-5)
    assert np.abs(model.predict_on_batch(x) - before_predict).max() > 1e-3


def test_no_stale_weights_after_training_steps():
    model = _model()
    x, y = _images(4), np.array([0, 1, 2, 3])
    model.predict_on_batch(x)
    model(x)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=0.01))
    for _ in range(2):
        model.train_on_batch(x, y)
    expected = _graph_logits(_fresh_copy(model), x)
    assert_close(model.predict_on_batch(x), expected, "predict after training", tol=1e-5)
    assert_close(model(x).logits, expected, "eager after training", tol=1e-5)


def test_training_uses_and_updates_batch_statistics():
    model = _model()
    x = _images(4)
    projection = model.cvt.encoder.stages[1].blocks[0].attention.attention.convolution_projection_query \
        .convolution_projection
    normalization = projection.normalization
    mean_before = normalization.moving_mean.numpy().copy()
    variance_before = normalization.moving_variance.numpy().copy()

    grid = np.random.default_rng(2).standard_normal((4, 8, 8, 32)).astype(np.float32)
    convolved = projection.convolution(projection.padding(grid)).numpy()
    mean, variance = convolved.mean(axis=(0, 1, 2)), convolved.var(axis=(0, 1, 2))
    gamma, beta = normalization.gamma.numpy(), normalization.beta.numpy()
    expected = (convolved - mean) / np.sqrt(variance + 1e-5) * gamma + beta
    assert_close(projection(grid, training=True), expected, "batch statistics", tol=1e-5)
    n = convolved.size // convolved.shape[-1]
    np.testing.assert_allclose(normalization.moving_mean.numpy(), 0.9 * mean_before + 0.1 * mean, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(normalization.moving_variance.numpy(),
                               0.9 * variance_before + 0.1 * variance * n / (n - 1), rtol=1e-5, atol=1e-6)

    # through the whole model, in training mode the output differs from inference (batch statistics)
    stats = [v.numpy().copy() for v in model.non_trainable_weights]
    training_logits = model(x, training=True).logits.numpy()
    assert np.abs(training_logits - model(x, training=False).logits.numpy()).max() > 1e-4
    assert any(np.abs(v.numpy() - s).max() > 0 for v, s in zip(model.non_trainable_weights, stats))


def test_frozen_batch_norm_in_training_uses_moving_statistics():
    model = _model()
    x = _images()
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    stats = [v.numpy().copy() for v in model.non_trainable_weights]
    assert_close(model(x, training=True).logits, model(x, training=False).logits, "frozen BN", tol=1e-5)
    assert all(np.array_equal(v.numpy(), s) for v, s in zip(model.non_trainable_weights, stats))


def test_mixed_bfloat16_inference_close_to_float32():
    reference = _model()
    x = _images()
    expected = reference.predict_on_batch(x)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = TFCvtForImageClassification(reference.config, data_format="channels_first")
        model.build_with_dummy_input()
        model.set_weights(reference.get_weights())
        assert all(v.dtype == "float32" for v in model.weights)
        predicted = model.predict_on_batch(x)
        eager = model(x).logits
        assert predicted.dtype == np.float32
    finally:
        keras.mixed_precision.set_global_policy(previous)
    scale = np.abs(expected).max()
    assert np.abs(predicted - expected).max() <= 0.05 * scale
    assert np.abs(eager.numpy().astype(np.float32) - expected).max() <= 0.05 * scale
    assert (predicted.argmax(-1) == expected.argmax(-1)).mean() >= 0.5
