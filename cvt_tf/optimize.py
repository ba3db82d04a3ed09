"""The explicit speed step for deployment: `optimize_for_inference(model)` returns a function that computes what
the model computes in inference, from the model's own variables, with TensorFlow's fastest CPU kernels.

The model's layers stay plain Keras layers (one `call` each, every backend, every Keras tool); this function is the
one place where the same math is arranged for TensorFlow's graph optimiser instead:

- every Dense is one 2-D MatMul + BiasAdd (+ exact GELU in the MLP), which TensorFlow fuses into one oneDNN
  kernel (`_FusedMatMul`), where Keras' `Dense` is a tensordot and an add; the attention scale is folded into the
  query projection's kernel and bias;
- the `dw_bn` BatchNorm is folded into the depthwise kernel plus a bias;
- LayerNorm takes fewer element-wise passes (float32 statistics, per-row factors applied in one multiply and one
  subtract);
- attention scores are one MatMul with a transposed operand, and the whole forward pass is one traced
  `tf.function` (batch, height and width left unknown), so an eager call costs what a graph call costs.

The folds are computed inside the graph from the current variables on every call, so assigning weights,
`set_weights`, `load_weights` or training never leaves the function stale. It is inference only (BatchNorm uses
its moving statistics, dropout and drop path are off). Under `mixed_bfloat16` it computes in bfloat16 with float32
statistics, as the model does. tests/test_tf_fast_path.py pins its outputs to the model's at 1e-5.

On JAX, XLA already fuses the plain layers when Keras compiles `predict`, and on PyTorch there is no such kernel:
there the function is the model's own compiled `predict_on_batch`.
"""

from __future__ import annotations

from typing import Callable

import keras

from .backend import TF
from .layers import sublayers
from .inputs import validate_pixel_values
from .modeling_cvt import TFCvtBackbone, TFCvtForImageClassification, TFCvtPreTrainedModel

if TF:
    import tensorflow as tf


def optimize_for_inference(model: TFCvtPreTrainedModel) -> Callable:
    """A function of `pixel_values` (the model's data format, any batch and size) returning what the model returns
    in inference: the logits of `TFCvtForImageClassification` (float32), the last hidden state of `TFCvtModel`
    (in the model's data format; float32). Builds the model if needed."""
    if isinstance(model, TFCvtBackbone):
        raise TypeError("optimize_for_inference takes TFCvtForImageClassification or TFCvtModel; a TFCvtBackbone's "
                        "feature maps come from calling the model itself")
    if not model.built:
        model.build_with_dummy_input()
    quantized = [layer.name for layer in sublayers(model) if layer.quantization_mode is not None]
    if quantized:
        raise ValueError(f"optimize_for_inference takes a float model; {len(quantized)} layers are quantized "
                         f"(e.g. {quantized[0]!r}): call the model itself")
    if not TF:
        def predict(pixel_values):
            outputs = model.predict_on_batch(pixel_values)
            return outputs if isinstance(model, TFCvtForImageClassification) else outputs["last_hidden_state"]

        return predict
    forward = _FusedForward(model)
    channels = model.config.num_channels
    shape = ((None, channels, None, None) if model.data_format == "channels_first" else (None, None, None, channels))
    graph = tf.function(forward, input_signature=[tf.TensorSpec(shape, tf.float32, name="pixel_values")])

    def run(pixel_values):
        pixel_values = tf.convert_to_tensor(pixel_values)
        validate_pixel_values(model.config, pixel_values, model.data_format)
        return graph(tf.cast(pixel_values, tf.float32))

    return run


def _weight(variable, dtype):
    """A variable's current value (or a computed weight, such as a LoRA layer's kernel) in `dtype`."""
    return tf.cast(variable.value if isinstance(variable, keras.Variable) else variable, dtype)


class _FusedForward:
    """The model's inference forward pass in TensorFlow ops arranged for its graph optimiser (module docstring)."""

    def __init__(self, model: TFCvtPreTrainedModel):
        self.model = model
        self.dtype = tf.as_dtype(model.compute_dtype)

    def __call__(self, pixel_values):
        model = self.model
        hidden = tf.cast(pixel_values, self.dtype)
        if model.data_format == "channels_first":
            hidden = tf.transpose(hidden, (0, 2, 3, 1))
        batch = tf.shape(hidden)[0]
        hidden = tf.cond(batch > 0, lambda: hidden, lambda: tf.zeros_like(hidden[:1]))  # (the empty-batch guard)
        cls_token = None
        for stage in model.cvt.encoder.stages:
            hidden, cls_token = self.stage(stage, hidden)
        if not isinstance(model, TFCvtForImageClassification):
            output = tf.transpose(hidden, (0, 3, 1, 2)) if model.data_format == "channels_first" else hidden
            return tf.cast(output[:batch], tf.float32)
        if model.config.cls_token[-1]:
            tokens = cls_token
        else:
            shape = tf.shape(hidden)
            tokens = tf.reshape(hidden, (shape[0], shape[1] * shape[2], shape[3]))
        pooled = tf.reduce_mean(self.layer_norm(model.layernorm, tokens), axis=1)
        if model.config.num_labels > 0:
            pooled = self.dense(model.classifier, pooled)
        return tf.cast(pooled[:batch], tf.float32)

    # ---------------------------------------------------------------- blocks
    def stage(self, stage, grid):
        embeddings = stage.embedding.convolution_embeddings
        padding = embeddings.padding.padding
        grid = tf.pad(grid, [[0, 0], list(padding[0]), list(padding[1]), [0, 0]])
        projection = embeddings.projection
        grid = tf.nn.conv2d(grid, _weight(projection.kernel, self.dtype), projection.strides, "VALID")
        grid = tf.nn.bias_add(grid, _weight(projection.bias, self.dtype))
        grid = self.layer_norm(embeddings.normalization, grid)
        shape = tf.shape(grid)
        batch, height, width, channels = shape[0], shape[1], shape[2], grid.shape[-1]
        tokens = tf.reshape(grid, (batch, height * width, channels))
        if stage.with_cls_token:
            cls_token = tf.tile(_weight(stage.cls_token, self.dtype), [batch, 1, 1])
            tokens = tf.concat([cls_token, tokens], axis=1)
        for block in stage.blocks:
            tokens = self.block(block, tokens, height, width)
        cls_token = None
        if stage.with_cls_token:
            cls_token, tokens = tokens[:, :1], tokens[:, 1:]
        return tf.reshape(tokens, (batch, height, width, channels)), cls_token

    def block(self, block, tokens, height, width):
        tokens = tokens + self.attention(block.attention, self.layer_norm(block.layernorm_before, tokens), height,
                                         width)
        intermediate = block.intermediate
        hidden = self.dense(intermediate.dense, self.layer_norm(block.layernorm_after, tokens),
                            activation=intermediate.activation.activation)
        return tokens + self.dense(block.dense_output.dense, hidden)

    def attention(self, attention, tokens, height, width):
        inner = attention.attention
        if inner.with_cls_token:
            cls_token, tokens = tokens[:, :1], tokens[:, 1:]
        shape = tf.shape(tokens)
        grid = tf.reshape(tokens, (shape[0], height, width, inner.embed_dim))
        projected = []
        for role in ("query", "key", "value"):
            values = self.spatial_projection(getattr(inner, f"convolution_projection_{role}").convolution_projection,
                                             grid)
            if inner.with_cls_token:
                values = tf.concat([cls_token, values], axis=1)
            projected.append(values)
        query = self.dense(inner.projection_query, projected[0], scale=inner.scale)
        key = self.dense(inner.projection_key, projected[1])
        value = self.dense(inner.projection_value, projected[2])
        heads, head_dim = inner.num_heads, inner.head_dim

        def split(values):
            size = tf.shape(values)
            return tf.transpose(tf.reshape(values, (size[0], size[1], heads, head_dim)), (0, 2, 1, 3))

        probabilities = tf.nn.softmax(tf.matmul(split(query), split(key), transpose_b=True), axis=-1)
        context = tf.transpose(tf.matmul(probabilities, split(value)), (0, 2, 1, 3))
        context = tf.reshape(context, (shape[0], -1, inner.embed_dim))
        return self.dense(attention.dense_output.dense, context)

    def spatial_projection(self, projection, grid):
        """The `dw_bn` projection with the BatchNorm folded into the depthwise kernel, average pooling, or nothing;
        returns tokens."""
        if hasattr(projection, "normalization"):  # dw_bn
            kernel, shift = self.folded_depthwise(projection)
            padding = projection.padding.padding
            grid = tf.pad(grid, [[0, 0], list(padding[0]), list(padding[1]), [0, 0]])
            stride_h, stride_w = projection.convolution.strides
            grid = tf.nn.depthwise_conv2d(grid, kernel, strides=(1, stride_h, stride_w, 1), padding="VALID",
                                          dilations=projection.convolution.dilation_rate)
            grid = tf.nn.bias_add(grid, shift)
        elif isinstance(projection, keras.layers.Layer) and hasattr(projection, "pool_size"):
            grid = projection(grid)
        shape = tf.shape(grid)
        return tf.reshape(grid, (shape[0], shape[1] * shape[2], grid.shape[-1]))

    def folded_depthwise(self, projection):
        """(kernel (kh, kw, C, 1), bias (C,)): the depthwise convolution followed by the BatchNorm's inference
        transform, folded in float32 from the current variables."""
        normalization, convolution = projection.normalization, projection.convolution
        scale = tf.math.rsqrt(_weight(normalization.moving_variance, tf.float32) + normalization.epsilon)
        if normalization.scale:
            scale = scale * _weight(normalization.gamma, tf.float32)
        shift = -_weight(normalization.moving_mean, tf.float32) * scale
        if normalization.center:
            shift = shift + _weight(normalization.beta, tf.float32)
        kh, kw = convolution.kernel_size
        kernel = tf.reshape(_weight(convolution.kernel, tf.float32) * scale, (kh, kw, convolution.filters, 1))
        return tf.cast(kernel, self.dtype), tf.cast(shift, self.dtype)

    # ---------------------------------------------------------------- kernels
    def dense(self, dense, tokens, activation=None, scale=None):
        """`dense(tokens)` as one 2-D MatMul + BiasAdd (+ activation); `scale` multiplies the output, folded into
        the kernel and bias."""
        kernel = _weight(dense.kernel, self.dtype)
        bias = _weight(dense.bias, self.dtype) if dense.use_bias else None
        if scale is not None:
            kernel = kernel * scale
            bias = None if bias is None else bias * scale
        shape = tf.shape(tokens)
        outputs = tf.matmul(tf.reshape(tokens, (-1, tokens.shape[-1])), kernel)
        if bias is not None:
            outputs = tf.nn.bias_add(outputs, bias)
        if activation is not None:
            outputs = activation(outputs)
        return tf.reshape(outputs, tf.concat([shape[:-1], [kernel.shape[-1]]], axis=0))

    def layer_norm(self, norm, values):
        """LayerNorm over the last axis with float32 statistics: one multiply and one subtract with per-row factors,
        then the per-channel scale and shift. (Folding gamma into the per-row factor first makes every factor
        full-size, which measured ~10% slower.)"""
        dtype = values.dtype
        values = tf.cast(values, tf.float32)
        mean = tf.reduce_mean(values, axis=-1, keepdims=True)
        variance = tf.reduce_mean(tf.math.squared_difference(values, mean), axis=-1, keepdims=True)
        inverse = tf.math.rsqrt(variance + norm.epsilon)
        outputs = values * inverse - mean * inverse
        if norm.scale:
            outputs = outputs * _weight(norm.gamma, tf.float32)
        if norm.center:
            outputs = outputs + _weight(norm.beta, tf.float32)
        return tf.cast(outputs, dtype)

