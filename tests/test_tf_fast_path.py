"""The explicit speed step of the Keras model (`cvt_tf.optimize.optimize_for_inference`): fused Dense (one MatMul +
BiasAdd + GELU), the attention scale folded into the query projection, the BatchNorm folded into the depthwise
convolution and fewer LayerNorm passes, in one traced graph. Its outputs equal the plain model's at 1e-5 on every
projection method, with and without cls tokens, both activations, both data formats and the bare model; its folds
are never stale; it refuses quantized models; under mixed_bfloat16 it stays close to float32. Also the plain model's
BatchNorm in training (batch statistics used and moving ones updated; frozen layers use the moving ones).

Parity of the plain model with transformers is tested in test_tf_model.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hf_oracle import assert_close  # noqa: E402

from cvt_tf import CvtConfig, TFCvtBackbone, TFCvtForImageClassification, TFCvtModel  # noqa: E402
from cvt_tf.layers import sublayers  # noqa: E402
from cvt_tf.optimize import optimize_for_inference  # noqa: E402

TINY = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], drop_path_rate=[0.0, 0.0, 0.0])
SIDE = 64
CONFIGS = {
    "final-cls-token": {},
    "no-cls-token-quick-gelu": dict(cls_token=[False, False, False], hidden_act="quick_gelu"),
    "avg-linear-no-qkv-bias": dict(qkv_projection_method=["avg", "linear", "dw_bn"], qkv_bias=[False, True, False]),
    "stride-1-key-values": dict(stride_kv=[1, 1, 2], cls_token=[True, False, True]),
}


def _randomize(model, seed: int) -> None:
    """Distinct random weights and BatchNorm statistics (positive variances)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = rng.standard_normal(variable.shape).astype(np.float32) * 0.3
        if "moving_variance" in variable.path:
            value = np.abs(value) + 0.5
        variable.assign(value)


def _model(seed: int = 0, cls=TFCvtForImageClassification, data_format="channels_first", **overrides):
    model = cls(CvtConfig(**{**TINY, "num_labels": 5, **overrides}), data_format=data_format)
    model.build_with_dummy_input()
    _randomize(model, seed)
    return model


def _images(batch: int = 2, seed: int = 1, height: int = SIDE, width: int = SIDE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fast_function_equals_the_model_at_every_size(name):
    model = _model(**CONFIGS[name])
    fast = optimize_for_inference(model)
    for images in (_images(2), _images(1, 2, 45, 38), _images(3, 3, 80, 96)):
        assert_close(fast(images), model(images, training=False).logits, f"{name} {images.shape}", tol=1e-5)
    assert np.asarray(fast(_images(0))).shape == (0, 5)


def test_fast_function_equals_the_model_for_channels_last_and_the_bare_model():
    images = _images(2)
    nhwc = _model(data_format="channels_last")
    assert_close(optimize_for_inference(nhwc)(images.transpose(0, 2, 3, 1)),
                 nhwc(images.transpose(0, 2, 3, 1)).logits, "channels_last", tol=1e-5)
    bare = _model(cls=TFCvtModel)
    assert_close(optimize_for_inference(bare)(images), bare(images).last_hidden_state, "bare model", tol=1e-5)


def test_fast_function_is_never_stale():
    model = _model()
    fast = optimize_for_inference(model)
    x = _images()
    before = np.asarray(fast(x))
    for variable in model.weights:  # BatchNorm statistics (folded) and a Dense kernel (fused)
        if "moving_mean" in variable.path or "moving_variance" in variable.path or "projection_key" in variable.path:
            variable.assign(variable.numpy() * 1.5 + 0.1)
    assert np.abs(np.asarray(fast(x)) - before).max() > 1e-3
    assert_close(fast(x), model(x).logits, "after assign", tol=1e-5)
    model.set_weights(_model(seed=9).get_weights())
    assert_close(fast(x), model(x).logits, "after set_weights", tol=1e-5)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=0.01))
    model.train_on_batch(_images(4), np.array([0, 1, 2, 3]))
    assert_close(fast(x), model(x).logits, "after a training step", tol=1e-5)


def test_fast_function_refuses_a_quantized_model():
    model = _model()
    model.quantize("int8")
    with pytest.raises(ValueError, match="quantized"):
        optimize_for_inference(model)


def test_fast_function_refuses_a_backbone_whose_outputs_it_does_not_compute():
    backbone = TFCvtBackbone(CvtConfig(**TINY), out_features=["stage1", "stage3"])
    with pytest.raises(TypeError, match="TFCvtBackbone's feature maps come from calling the model"):
        optimize_for_inference(backbone)


def test_fast_function_validates_its_input():
    fast = optimize_for_inference(_model())
    with pytest.raises(TypeError, match="floating-point"):
        fast(np.zeros((1, 3, SIDE, SIDE), np.int32))
    with pytest.raises(ValueError, match="too small"):
        fast(np.zeros((1, 3, 2, 2), np.float32))


def test_mixed_bfloat16_fast_function_is_close_to_float32():
    reference = _model()
    x = _images()
    expected = reference.predict_on_batch(x)
    model = TFCvtForImageClassification(reference.config, data_format="channels_first", dtype="mixed_bfloat16")
    model.build_with_dummy_input()
    model.set_weights(reference.get_weights())
    predicted = np.asarray(optimize_for_inference(model)(x))
    assert predicted.dtype == np.float32
    scale = np.abs(expected).max()
    assert np.abs(predicted - expected).max() <= 0.05 * scale
    assert np.abs(predicted - model.predict_on_batch(x)).max() <= 0.05 * scale


# ------------------------------------------------------------------------------------------------ BatchNorm in training
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
    for layer in sublayers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    stats = [v.numpy().copy() for v in model.non_trainable_weights]
    assert_close(model(x, training=True).logits, model(x, training=False).logits, "frozen BN", tol=1e-5)
    assert all(np.array_equal(v.numpy(), s) for v, s in zip(model.non_trainable_weights, stats))
