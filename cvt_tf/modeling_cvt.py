"""CvT in Keras 3, layer for layer the structure of the PyTorch model in `cvt_torch`, on the TensorFlow, JAX and
PyTorch backends (`KERAS_BACKEND`, see `cvt_tf.backend`).

Keras layer names are transformers' TF layer names, so every variable path below the model is
`WeightEntry.keras_path()` of `cvt_core.weights`. The numbers equal transformers 4.57.6 in inference; the
defects listed in the project's facts (drop path by stage and after the residual add, `depth[s] <= s`, cls token
off the last stage, the `avg` projection, a classifier without cls token, building without `image_size`) are
not reproduced.

Layers compute channels-last (NHWC). `pixel_values` are NCHW by default, as in transformers; a model built with
`data_format="channels_last"` takes NHWC images and returns NHWC spatial outputs.

Keras training: `compile(optimizer, loss=..., metrics=...)` then `fit(images, labels)` applies the loss and metrics
to the logits; `compile(optimizer)` without a loss trains on the model's own loss (transformers' rule), from labels
given as `y` or inside the input dict `{"pixel_values": ..., "labels": ...}`. `predict` returns the logits (float32);
calling the model returns the whole output container. Out-of-range class labels are refused with a message naming
`num_labels` and the label. An empty batch gives empty outputs in inference, as in PyTorch.

Keras weight files load strictly: `load_weights` and `keras.models.load_model` refuse a `.weights.h5` / `.keras`
that does not hold exactly the model's variables with their shapes (`KerasWeightsMismatchError`, a
`cvt_core.WeightLoadError`, listing what is missing, unexpected and mis-shaped), where Keras alone skips them.

Backends. The layers are `keras.ops`, so the same model, weights and files (`.keras`, `model.weights.h5`,
`tf_model.h5`, safetensors) serve every backend, with the same variable paths. Under JAX and PyTorch TensorFlow is
not imported; what only TensorFlow has (SavedModel/LiteRT `export`, `tf.distribute` strategies) says so. On JAX,
`fit`/`predict` compile with XLA (Keras' default there), calling the model eagerly in inference runs the encoder
as one `jax.jit` function (one compile per input shape), and `keras.distribution.DataParallel` shards the batch.

Speed (CPU, TensorFlow backend; `cvt_tf.backend.TF` guards each of these). The default path is the fast one:
- every Dense runs as one 2-D MatMul + BiasAdd (+ exact GELU in the MLP), which TensorFlow fuses into a single oneDNN
  kernel; LayerNorm takes fewer element-wise passes; the attention scale is folded into the query projection;
- in inference the `dw_bn` BatchNorm is folded into the depthwise kernel plus a bias, computed inside the graph
  from the current variables on every call, so assigning weights, `set_weights` or training never leaves it stale.
  Training (`training=True`, BatchNorm trainable) normalises with the batch statistics and updates the moving ones;
- calling the model eagerly in inference (`model(x)`) runs the encoder as one traced `tf.function` (one trace per
  input dtype, any batch and image size), so it costs about what a graph call costs.
The fastest calls for a batch are `model.predict_on_batch(x)` (logits, float32) and `model(x)`; `predict` for
datasets. `keras.mixed_precision.set_global_policy("mixed_bfloat16")` before building the model runs the matmuls and
convolutions in bfloat16 (much faster on CPUs with AVX512-BF16/AMX), with float32 weights, statistics and logits.
On TensorFlow, XLA (`jit_compile=True`) is slower than its oneDNN kernels on CPU (about 3x for this model) and is
left off there, as Keras' `jit_compile="auto"` does; on JAX XLA is the compiler and always on.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import h5py
import keras
import numpy as np
from keras import ops
from keras.src import backend as keras_backend  # (the backend's ops without keras.ops' argument checks)
from keras.src.saving import saving_lib  # (Keras' own saving walk and stores)

from cvt_core.atomic import atomic_write
from cvt_core.checkpoint import read_pretrained, save_pretrained_folder
from cvt_core.config import CvtConfig
from cvt_core.hub import is_preset_name, resolve_pretrained, split_hub_options
from cvt_core.backbone import chosen_channels_and_strides, resolve_out_features, stage_names
from cvt_core.outputs import CvtBackboneOutput, CvtImageClassifierOutput, CvtModelOutput
from cvt_core.shapes import (attention_projection, check_pixel_values_shape, default_input_size,
                             minimum_input_size)
from cvt_core.training import announce_inferred_problem_type
from cvt_core.weights import WeightLoadError, check_weight_value, weight_table

from .backend import BACKEND, JAX, TF, tensorflow
from .layers import CeilModeAveragePooling2D, GroupedDepthwiseConv2D, TorchBatchNormalization, depthwise_conv

if TF:
    import tensorflow as tf

DATA_FORMATS = ("channels_first", "channels_last")
LAYER_NORM_EPSILON = 1e-5  # every LayerNorm of CvT, whatever config.layer_norm_eps says
KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"  # the weights file inside a .keras archive


def _kernel_initializer(config: CvtConfig) -> keras.initializers.Initializer:
    if JAX:
        return _HostTruncatedNormal(stddev=config.initializer_range)
    return keras.initializers.TruncatedNormal(mean=0.0, stddev=config.initializer_range)


class _HostTruncatedNormal(keras.initializers.Initializer):
    """Keras' TruncatedNormal (mean 0, values beyond 2 stddev redrawn), drawn by NumPy's global generator (which
    `keras.utils.set_random_seed` seeds). For JAX: its truncated normal compiles one XLA program per weight shape,
    about 0.3 s each on a CPU, which made building a CvT take tens of seconds."""

    def __init__(self, stddev: float):
        self.stddev = float(stddev)

    def __call__(self, shape, dtype=None):
        values = np.random.standard_normal(shape)
        outside = np.abs(values) > 2.0
        while outside.any():
            values[outside] = np.random.standard_normal(int(outside.sum()))
            outside = np.abs(values) > 2.0
        return ops.convert_to_tensor(values * self.stddev, dtype=dtype or keras.config.floatx())

    def get_config(self):
        return {"stddev": self.stddev}


def _layer_norm(name: str) -> keras.layers.LayerNormalization:
    return keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=name)


def _dense(config: CvtConfig, units: int, name: str, use_bias: bool = True) -> keras.layers.Dense:
    return keras.layers.Dense(units, use_bias=use_bias, kernel_initializer=_kernel_initializer(config),
                              bias_initializer="zeros", name=name)


def _shape_list(tensor) -> List[Any]:
    """Static sizes where known, scalar tensors where not (only TensorFlow graphs leave sizes unknown)."""
    return list(ops.shape(tensor))


def _is_float32(tensor) -> bool:
    return keras.backend.standardize_dtype(tensor.dtype) == "float32"


def _apply_dense(dense: keras.layers.Dense, tokens, activation: Optional[str] = None, scale: Optional[float] = None):
    """`dense(tokens)` from the layer's own variables; `scale` multiplies the output, folded into the kernel and
    bias (a (C_in, C_out) product instead of one over every token). The variables stay the only weights.

    On TensorFlow it runs as one 2-D MatMul + BiasAdd (+ exact GELU), which TensorFlow's graph optimiser fuses into
    a single oneDNN kernel (`_FusedMatMul`) that Keras' `Dense` (a tensordot followed by an add) never gets. XLA
    (JAX) fuses the plain matmul and add itself.
    """
    kernel = ops.cast(dense.kernel, tokens.dtype)
    bias = ops.cast(dense.bias, tokens.dtype) if dense.use_bias else None
    if scale is not None:
        kernel = kernel * scale
        bias = None if bias is None else bias * scale
    if not TF:
        outputs = ops.matmul(tokens, kernel)
        if bias is not None:
            outputs = outputs + bias
        return outputs if activation is None else _activation(activation)(outputs)
    shape = _shape_list(tokens)
    outputs = tf.matmul(tf.reshape(tokens, (-1, shape[-1])), kernel)
    if bias is not None:
        outputs = tf.nn.bias_add(outputs, bias)
    if activation is not None:
        outputs = _activation(activation)(outputs)
    return tf.reshape(outputs, shape[:-1] + [kernel.shape[-1]])


def _grid_to_tokens(grid):
    """(B, H, W, C) -> (B, H*W, C)."""
    batch, height, width, channels = _shape_list(grid)
    return ops.reshape(grid, (batch, height * width, channels))


def _squared_difference(a, b):
    return tf.math.squared_difference(a, b) if TF else ops.square(a - b)  # TensorFlow: one kernel, no temporary


def _apply_layer_norm(norm: keras.layers.LayerNormalization, tokens):
    """`norm(tokens)` (LayerNorm over the last axis) in fewer element-wise passes than Keras' implementation:
    float32 statistics, per-row normalisation as one multiply and one subtract with (rows, 1) factors, then the
    per-channel scale and shift. Full-size temporaries are what cost here (measured: folding gamma into the per-row
    factor first makes every factor full-size and is ~10% slower). Same variables."""
    dtype = tokens.dtype
    values = tokens if _is_float32(tokens) else ops.cast(tokens, "float32")
    mean = ops.mean(values, axis=-1, keepdims=True)
    variance = ops.mean(_squared_difference(values, mean), axis=-1, keepdims=True)
    inverse = ops.rsqrt(variance + norm.epsilon)
    outputs = values * inverse - mean * inverse
    if norm.scale:
        outputs = outputs * ops.cast(norm.gamma, "float32")
    if norm.center:
        outputs = outputs + ops.cast(norm.beta, "float32")
    return outputs if _is_float32(tokens) else ops.cast(outputs, dtype)


def _activation(name: str):
    if name == "gelu":
        return lambda x: ops.gelu(x, approximate=False)  # Keras defaults to the tanh approximation
    if name == "quick_gelu":
        return lambda x: x * ops.sigmoid(1.702 * x)
    raise ValueError(f"hidden_act={name!r} is unknown")


def _check_data_format(data_format: str) -> str:
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {list(DATA_FORMATS)}, got {data_format!r}")
    return data_format


INPUT_KEYS = ("pixel_values", "labels", "output_hidden_states", "output_attentions", "return_dict")


def unpack_inputs(pixel_values, **arguments) -> Dict[str, Any]:
    """transformers' TF convention: the first argument may be a dict holding `pixel_values` and any other call
    argument (`labels`, ...); its entries win over the keyword arguments. Returns every argument by name."""
    if isinstance(pixel_values, Mapping):
        inputs = dict(pixel_values)
        unknown = sorted(set(inputs) - set(INPUT_KEYS))
        if unknown or "pixel_values" not in inputs:
            raise ValueError(f"an input dict needs the key 'pixel_values' and may hold {list(INPUT_KEYS[1:])}; "
                             f"got keys {sorted(inputs)}")
        for key, value in inputs.items():
            if key in arguments or key == "pixel_values":
                arguments[key] = value
        pixel_values = inputs["pixel_values"]
    arguments["pixel_values"] = pixel_values
    return arguments


def validate_pixel_values(config: CvtConfig, pixel_values, data_format: str) -> None:
    """Refuse non-float dtypes (TypeError) and wrong rank, channels or too small images (ValueError)."""
    dtype = keras.backend.standardize_dtype(pixel_values.dtype)
    if not dtype.startswith(("float", "bfloat")):
        raise TypeError(
            f"pixel_values must be a floating-point tensor (float32, float16, bfloat16 or float64), got dtype "
            f"{dtype}: convert and normalise the images first (e.g. x.astype('float32') / 255, then the "
            f"checkpoint's mean/std)")
    shape = pixel_values.shape
    if TF and not isinstance(shape, tuple):  # a tf.TensorShape, whose rank may be unknown in a graph
        if shape.rank is None:
            return
        shape = shape.as_list()
    check_pixel_values_shape(config, list(shape), channels_last=data_format == "channels_last")


# ------------------------------------------------------------------------------------------------ outputs
def _register_outputs_with_keras_tree() -> None:
    """Make the output containers nodes of `keras.tree` (optree), not leaves, so Keras' `predict`, `fit` and
    structure utilities see the tensors inside. Registered in Keras' optree namespace only; under JAX also as JAX
    pytrees, which is what lets them cross `jax.jit` and `jax.grad` (Keras' compiled train and predict steps)."""
    import optree

    def flatten(output):
        keys = tuple(output.keys())
        return tuple(output[k] for k in keys), keys, keys

    for output_type in (CvtModelOutput, CvtImageClassifierOutput, CvtBackboneOutput):
        def unflatten(keys, children, output_type=output_type):
            return output_type(**dict(zip(keys, children)))

        try:
            optree.register_pytree_node(output_type, flatten, unflatten, namespace="keras")
        except ValueError:
            pass  # already registered (module re-imported)
        if JAX:
            import jax

            try:
                jax.tree_util.register_pytree_node(
                    output_type, lambda output: flatten(output)[:2], unflatten)
            except ValueError:
                pass


_register_outputs_with_keras_tree()


# ------------------------------------------------------------------------------------------------ building blocks
class TFCvtDropPath(keras.layers.Layer):
    """Stochastic depth: in training, zero a sample's residual branch with probability `drop_prob`, else scale it
    by 1 / (1 - drop_prob). Identity in inference."""

    def __init__(self, drop_prob: float, seed: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.drop_prob = float(drop_prob)
        self.seed_generator = keras.random.SeedGenerator(seed) if self.drop_prob > 0.0 else None

    def call(self, branch, training=False):
        if not training or self.drop_prob == 0.0:
            return branch
        keep = 1.0 - self.drop_prob
        mask_shape = [ops.shape(branch)[0]] + [1] * (len(branch.shape) - 1)
        uniform = keras.random.uniform(mask_shape, dtype=branch.dtype, seed=self.seed_generator)
        return branch / keep * ops.floor(keep + uniform)


class TFCvtConvEmbeddings(keras.layers.Layer):
    """Convolutional token embedding: padded strided Conv2D, then LayerNorm over channels. NHWC in and out."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.in_channels = config.stage_in_channels(stage)
        self.embed_dim = config.embed_dim[stage]
        # the layers compute NHWC whatever keras.config.image_data_format() says
        self.padding = keras.layers.ZeroPadding2D(config.patch_padding[stage], data_format="channels_last",
                                                  name="padding")
        self.projection = keras.layers.Conv2D(
            self.embed_dim, config.patch_sizes[stage], strides=config.patch_stride[stage], padding="valid",
            data_format="channels_last", kernel_initializer=_kernel_initializer(config), bias_initializer="zeros",
            name="projection")
        self.normalization = _layer_norm("normalization")

    def build(self, input_shape=None):
        self.projection.build((None, None, None, self.in_channels))
        self.normalization.build((None, None, None, self.embed_dim))

    def call(self, pixel_values):
        return _apply_layer_norm(self.normalization, self.projection(self.padding(pixel_values)))


class TFCvtEmbeddings(keras.layers.Layer):
    """Token embedding of one stage: NHWC grid in, (tokens (B, [1 +] H*W, C), H, W) out. The embedding dropout
    runs after the stage's cls token is prepended, as in the original."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.convolution_embeddings = TFCvtConvEmbeddings(config, stage, name="convolution_embeddings")
        self.dropout = keras.layers.Dropout(config.drop_rate[stage], name="dropout")

    def build(self, input_shape=None):
        self.convolution_embeddings.build(input_shape)

    def call(self, pixel_values, cls_token=None, training=False):
        grid = self.convolution_embeddings(pixel_values)
        batch, height, width, channels = _shape_list(grid)
        tokens = ops.reshape(grid, (batch, height * width, channels))
        if cls_token is not None:
            tokens = ops.concatenate([ops.tile(ops.cast(cls_token, tokens.dtype), [batch, 1, 1]), tokens], axis=1)
        return self.dropout(tokens, training=training), height, width


class TFCvtSelfAttentionConvProjection(keras.layers.Layer):
    """`dw_bn` projection of `role`: padded depthwise convolution (no bias), then BatchNorm. NHWC in and out."""

    def __init__(self, config: CvtConfig, stage: int, role: str, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = config.embed_dim[stage]
        projection = attention_projection(config, stage, role)
        self.padding = keras.layers.ZeroPadding2D(projection.padding, data_format="channels_last", name="padding")
        self.convolution = GroupedDepthwiseConv2D(
            self.embed_dim, projection.kernel_size, strides=projection.stride, padding="valid", use_bias=False,
            data_format="channels_last", kernel_initializer=_kernel_initializer(config), name="convolution")
        self.normalization = TorchBatchNormalization(name="normalization")

    def build(self, input_shape=None):
        self.convolution.build((None, None, None, self.embed_dim))
        self.normalization.build((None, None, None, self.embed_dim))

    def call(self, hidden_state, training=False):
        normalization, convolution = self.normalization, self.convolution
        if training and normalization.trainable:  # batch statistics, moving averages updated
            return normalization(convolution(self.padding(hidden_state)), training=training)
        kernel, shift = self.folded_weight_and_bias()
        dtype = hidden_state.dtype
        kernel, shift = ops.cast(kernel, dtype), ops.cast(shift, dtype)
        if not TF:
            return depthwise_conv(self.padding(hidden_state), kernel, convolution.strides,
                                  convolution.dilation_rate) + shift
        stride_h, stride_w = convolution.strides
        # (explicit padding inside the convolution crashes grappler's shape inference: pad first)
        outputs = tf.nn.depthwise_conv2d(
            self.padding(hidden_state), kernel, strides=(1, stride_h, stride_w, 1), padding="VALID",
            dilations=convolution.dilation_rate)
        return tf.nn.bias_add(outputs, shift)

    def folded_weight_and_bias(self):
        """Inference: the BatchNorm folded into the depthwise kernel, (kernel (kh, kw, C, 1), bias (C,)) in float32,
        computed in-graph from the current variables on every call (never stale)."""
        normalization, convolution = self.normalization, self.convolution
        variance = ops.cast(normalization.moving_variance, "float32")
        mean = ops.cast(normalization.moving_mean, "float32")
        scale = ops.rsqrt(variance + normalization.epsilon)
        if normalization.scale:
            scale = scale * ops.cast(normalization.gamma, "float32")
        shift = -mean * scale
        if normalization.center:
            shift = shift + ops.cast(normalization.beta, "float32")
        kh, kw = convolution.kernel_size
        kernel = ops.reshape(ops.cast(convolution.kernel, "float32") * scale, (kh, kw, self.embed_dim, 1))
        return kernel, shift


class TFCvtSelfAttentionProjection(keras.layers.Layer):
    """The spatial part of one of q, k, v (`role`), returning tokens (B, T, C): `dw_bn` (depthwise conv + BN),
    `avg` (ceil-mode average pooling for k and v, nothing for q) or `linear` (nothing). Only `dw_bn` has weights."""

    def __init__(self, config: CvtConfig, stage: int, role: str, **kwargs):
        super().__init__(**kwargs)
        projection = attention_projection(config, stage, role)
        if projection.method == "dw_bn":
            self.convolution_projection = TFCvtSelfAttentionConvProjection(
                config, stage, role, name="convolution_projection")
        elif projection.method == "avg":
            self.convolution_projection = CeilModeAveragePooling2D(
                projection.kernel_size, projection.stride, projection.padding, name="convolution_projection")
        elif projection.method == "linear":
            self.convolution_projection = keras.layers.Identity(name="convolution_projection")
        else:
            raise ValueError(f"qkv_projection_method={projection.method!r} is unknown; choose 'dw_bn', 'avg' or "
                             f"'linear'")

    def build(self, input_shape=None):
        if isinstance(self.convolution_projection, TFCvtSelfAttentionConvProjection):
            self.convolution_projection.build(input_shape)

    def call(self, hidden_state, training=False):
        return _grid_to_tokens(self.convolution_projection(hidden_state, training=training))


def _scores(query, key):
    """query @ key^T over the last two axes (TensorFlow: one MatMul with transpose_b, no transposed copy)."""
    return tf.matmul(query, key, transpose_b=True) if TF else ops.matmul(query, ops.swapaxes(key, -1, -2))


def _softmax(scores):
    """Softmax over the last axis. The backend's own, not `keras.ops.softmax`, which warns on every call over an
    axis of size 1: the key tokens of a 1x1 grid, as the smallest input (the build) gives."""
    return tf.nn.softmax(scores, axis=-1) if TF else keras_backend.nn.softmax(scores, axis=-1)


class TFCvtSelfAttention(keras.layers.Layer):
    """Multi-head attention over convolutionally projected q, k, v.

    The cls token skips the spatial projection and is prepended to q, k and v before the Dense projections.
    Scores are scaled by embed_dim ** -0.5 (the stage width, as in the original and transformers).
    """

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = config.embed_dim[stage]
        self.num_heads = config.num_heads[stage]
        self.head_dim = self.embed_dim // self.num_heads
        self.with_cls_token = bool(config.cls_token[stage])
        self.scale = self.embed_dim ** -0.5
        self.convolution_projection_query = TFCvtSelfAttentionProjection(
            config, stage, "query", name="convolution_projection_query")
        self.convolution_projection_key = TFCvtSelfAttentionProjection(
            config, stage, "key", name="convolution_projection_key")
        self.convolution_projection_value = TFCvtSelfAttentionProjection(
            config, stage, "value", name="convolution_projection_value")
        use_bias = bool(config.qkv_bias[stage])
        self.projection_query = _dense(config, self.embed_dim, "projection_query", use_bias)
        self.projection_key = _dense(config, self.embed_dim, "projection_key", use_bias)
        self.projection_value = _dense(config, self.embed_dim, "projection_value", use_bias)
        self.dropout = keras.layers.Dropout(config.attention_drop_rate[stage], name="dropout")

    def build(self, input_shape=None):
        grid = (None, None, None, self.embed_dim)
        tokens = (None, None, self.embed_dim)
        for projection in (self.convolution_projection_query, self.convolution_projection_key,
                           self.convolution_projection_value):
            projection.build(grid)
        for dense in (self.projection_query, self.projection_key, self.projection_value):
            dense.build(tokens)

    def _split_heads(self, tokens):
        batch, length, _ = _shape_list(tokens)
        tokens = ops.reshape(tokens, (batch, length, self.num_heads, self.head_dim))
        return ops.transpose(tokens, (0, 2, 1, 3))

    def call(self, hidden_state, height, width, training=False):
        if self.with_cls_token:
            cls_token, hidden_state = hidden_state[:, :1], hidden_state[:, 1:]
        batch, _, channels = _shape_list(hidden_state)
        grid = ops.reshape(hidden_state, (batch, height, width, channels))
        query = self.convolution_projection_query(grid, training=training)
        key = self.convolution_projection_key(grid, training=training)
        value = self.convolution_projection_value(grid, training=training)
        if self.with_cls_token:
            query = ops.concatenate([cls_token, query], axis=1)
            key = ops.concatenate([cls_token, key], axis=1)
            value = ops.concatenate([cls_token, value], axis=1)
        # the score scale is folded into the query projection's kernel and bias
        query = _apply_dense(self.projection_query, query, scale=self.scale)
        key = _apply_dense(self.projection_key, key)
        value = _apply_dense(self.projection_value, value)
        if self.num_heads == 1:  # no head axis to move
            attention_probs = _softmax(_scores(query, key))
            context = ops.matmul(self.dropout(attention_probs, training=training), value)
            return context, attention_probs[:, None]
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        attention_probs = _softmax(_scores(query, key))
        context = ops.matmul(self.dropout(attention_probs, training=training), value)
        context = ops.transpose(context, (0, 2, 1, 3))
        context = ops.reshape(context, (batch, ops.shape(context)[1], self.embed_dim))
        return context, attention_probs


class TFCvtSelfOutput(keras.layers.Layer):
    """Attention output projection, then dropout."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = config.embed_dim[stage]
        self.dense = _dense(config, self.embed_dim, "dense")
        self.dropout = keras.layers.Dropout(config.drop_rate[stage], name="dropout")

    def build(self, input_shape=None):
        self.dense.build((None, None, self.embed_dim))

    def call(self, hidden_state, training=False):
        return self.dropout(_apply_dense(self.dense, hidden_state), training=training)


class TFCvtAttention(keras.layers.Layer):
    """Self-attention and its output projection; returns (output tokens, attention probabilities)."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.attention = TFCvtSelfAttention(config, stage, name="attention")
        self.dense_output = TFCvtSelfOutput(config, stage, name="output")  # `output` is a keras.layers.Layer property

    def build(self, input_shape=None):
        self.attention.build(input_shape)
        self.dense_output.build(input_shape)

    def call(self, hidden_state, height, width, training=False):
        context, attention_probs = self.attention(hidden_state, height=height, width=width, training=training)
        return self.dense_output(context, training=training), attention_probs


class TFCvtIntermediate(keras.layers.Layer):
    """First MLP layer: Dense to int(embed_dim * mlp_ratio), activation (exact GELU or QuickGELU), dropout."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = config.embed_dim[stage]
        self.dense = _dense(config, config.mlp_hidden_dim(stage), "dense")
        self.hidden_act = config.hidden_act
        self.dropout = keras.layers.Dropout(config.drop_rate[stage], name="dropout")

    def build(self, input_shape=None):
        self.dense.build((None, None, self.embed_dim))

    def call(self, hidden_state, training=False):
        return self.dropout(_apply_dense(self.dense, hidden_state, activation=self.hidden_act), training=training)


class TFCvtOutput(keras.layers.Layer):
    """Second MLP layer: Dense back to embed_dim, then dropout (the residual add is the layer's)."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = config.mlp_hidden_dim(stage)
        self.dense = _dense(config, config.embed_dim[stage], "dense")
        self.dropout = keras.layers.Dropout(config.drop_rate[stage], name="dropout")

    def build(self, input_shape=None):
        self.dense.build((None, None, self.hidden_dim))

    def call(self, hidden_state, training=False):
        return self.dropout(_apply_dense(self.dense, hidden_state), training=training)


class TFCvtLayer(keras.layers.Layer):
    """Pre-norm transformer block: x + drop_path(attention(LN(x))), then x + drop_path(mlp(LN(x)))."""

    def __init__(self, config: CvtConfig, stage: int, index: int, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = config.embed_dim[stage]
        self.attention = TFCvtAttention(config, stage, name="attention")
        self.intermediate = TFCvtIntermediate(config, stage, name="intermediate")
        self.dense_output = TFCvtOutput(config, stage, name="output")  # `output` is a keras.layers.Layer property
        self.drop_path = TFCvtDropPath(config.drop_path_rates(stage)[index], name="drop_path")
        self.layernorm_before = _layer_norm("layernorm_before")
        self.layernorm_after = _layer_norm("layernorm_after")

    def build(self, input_shape=None):
        tokens = (None, None, self.embed_dim)
        self.attention.build(tokens)
        self.intermediate.build(tokens)
        self.dense_output.build(tokens)
        self.layernorm_before.build(tokens)
        self.layernorm_after.build(tokens)

    def call(self, hidden_state, height, width, training=False):
        attention_output, attention_probs = self.attention(
            _apply_layer_norm(self.layernorm_before, hidden_state), height=height, width=width, training=training)
        hidden_state = hidden_state + self.drop_path(attention_output, training=training)
        mlp_hidden = self.intermediate(_apply_layer_norm(self.layernorm_after, hidden_state), training=training)
        mlp_output = self.dense_output(mlp_hidden, training=training)
        hidden_state = hidden_state + self.drop_path(mlp_output, training=training)
        return hidden_state, attention_probs


class TFCvtStage(keras.layers.Layer):
    """One stage: token embedding with the optional cls token, then `depth[stage]` blocks. NHWC in and out."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.stage = stage
        self.embed_dim = config.embed_dim[stage]
        self.in_channels = config.stage_in_channels(stage)
        self.with_cls_token = bool(config.cls_token[stage])
        self.cls_token = None
        if self.with_cls_token:
            # Created directly (add_weight would open this layer's name scope) and while the model is being
            # constructed, outside any scope, so its path is transformers' TF variable name exactly.
            self.cls_token = keras.Variable(
                initializer=_kernel_initializer(config), shape=(1, 1, self.embed_dim), dtype=self.variable_dtype,
                trainable=True, name=f"cvt.encoder.stages.{stage}.cls_token")
        self.embedding = TFCvtEmbeddings(config, stage, name="embedding")
        # torch's `layers`: the attribute name is part of the paths in .keras / .weights.h5 files, kept so they load
        self.blocks = [TFCvtLayer(config, stage, index, name=f"layers.{index}") for index in range(config.depth[stage])]

    def build(self, input_shape=None):
        self.embedding.build((None, None, None, self.in_channels))
        for block in self.blocks:
            block.build((None, None, self.embed_dim))

    def call(self, hidden_state, training=False):
        tokens, height, width = self.embedding(hidden_state, cls_token=self.cls_token, training=training)
        attentions = []
        for block in self.blocks:
            tokens, attention_probs = block(tokens, height=height, width=width, training=training)
            attentions.append(attention_probs)
        cls_token = None
        if self.cls_token is not None:
            cls_token, tokens = tokens[:, :1], tokens[:, 1:]
        grid = ops.reshape(tokens, (ops.shape(tokens)[0], height, width, self.embed_dim))
        return grid, cls_token, tuple(attentions)


class TFCvtEncoder(keras.layers.Layer):
    """All stages in order; NHWC in, (last NHWC grid, cls token or None, per-stage NHWC grids, attentions) out."""

    def __init__(self, config: CvtConfig, **kwargs):
        super().__init__(**kwargs)
        self.stages = [TFCvtStage(config, s, name=f"stages.{s}") for s in range(config.num_stages)]

    def build(self, input_shape=None):
        for stage in self.stages:
            stage.build(None)

    def call(self, hidden_state, training=False):
        cls_token = None
        hidden_states, attentions = [], []
        for stage in self.stages:
            hidden_state, cls_token, stage_attentions = stage(hidden_state, training=training)
            hidden_states.append(hidden_state)
            attentions.extend(stage_attentions)
        return hidden_state, cls_token, tuple(hidden_states), tuple(attentions)


class _EmptyBatchGuard:
    """Inference on an empty batch, which TensorFlow's convolutions cannot take (they fail inside the graph): the
    encoder runs on one blank image instead and every output is cut back to the batch's 0 rows, as PyTorch returns
    them. With a batch size known only when the graph runs, the swap is a `tf.cond` and the cut a slice to the
    batch size, which TensorFlow forwards without a copy when it covers the whole tensor."""

    def __init__(self, images):
        size = tf.shape(images)[0]
        blank = tf.zeros(tf.concat([[1], tf.shape(images)[1:]], axis=0), images.dtype)
        if images.shape[0] == 0:
            self.input, self.size = blank, 0
        else:
            self.input = tf.cond(size > 0, lambda: images, lambda: blank)
            self.size = size

    def restore(self, tensor):
        return tensor if tensor is None else tensor[:self.size]


def _empty_batch_guard(images) -> Optional[_EmptyBatchGuard]:
    """None when the batch is known to be non-empty (always in eager execution), else the guard. TensorFlow only:
    JAX's and PyTorch's convolutions take an empty batch."""
    if not TF:
        return None
    size = images.shape[0]
    return None if size is not None and size > 0 else _EmptyBatchGuard(images)


class TFCvtMainLayer(keras.layers.Layer):
    """The backbone (`cvt`): validates `pixel_values`, runs the encoder, returns a `CvtModelOutput`."""

    def __init__(self, config: CvtConfig, data_format: str = "channels_first", **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.data_format = _check_data_format(data_format)
        self.encoder = TFCvtEncoder(config, name="encoder")

    def build(self, input_shape=None):
        self.encoder.build(None)

    def _graph_encoder(self, hidden_state):
        """Eager inference runs the encoder as one traced graph: calling the model eagerly then costs what a graph
        call costs, not a Python dispatch per operation. One trace per input dtype, with batch, height and width
        left unknown, so the same graph (and the same numbers) serves every size and every model instance. The
        graph reads the variables when it runs, so it always sees the current weights."""
        functions = self.__dict__.get("_encoder_functions")
        if functions is None:
            functions = {}
            object.__setattr__(self, "_encoder_functions", functions)  # a plain attribute, not tracked by Keras
        dtype = tf.as_dtype(hidden_state.dtype)
        function = functions.get(dtype)
        if function is None:
            encoder = self.encoder
            signature = [tf.TensorSpec((None, None, None, self.config.num_channels), dtype)]
            function = tf.function(lambda x: encoder(x, training=False), input_signature=signature)
            functions[dtype] = function
        return function(hidden_state)

    def _compiled_encoder(self, hidden_state):
        """JAX's twin of `_graph_encoder`: eager inference runs the encoder as one `jax.jit`-compiled function of
        the variables' current values and the image, where op-by-op JAX would compile and dispatch every operation
        on its own (tens of seconds for a first call). One compile per input shape and dtype; the values are
        passed in on every call, so the function always sees the current weights."""
        import jax

        encoder = self.encoder
        function = self.__dict__.get("_jax_encoder")
        if function is None:
            def run(trainable, non_trainable, images):
                return encoder.stateless_call(trainable, non_trainable, images, training=False)[0]

            function = jax.jit(run)
            object.__setattr__(self, "_jax_encoder", function)  # a plain attribute, not tracked by Keras
        with keras_backend.AutocastScope(None):  # the stored values: the layers cast them as they compute
            trainable = [v.value for v in encoder.trainable_variables]
            non_trainable = [v.value for v in encoder.non_trainable_variables]
        return function(trainable, non_trainable, hidden_state)

    def _to_output_layout(self, grid):
        return ops.transpose(grid, (0, 3, 1, 2)) if self.data_format == "channels_first" else grid

    def call(self, pixel_values, output_hidden_states=False, output_attentions=False, training=False):
        validate_pixel_values(self.config, pixel_values, self.data_format)
        hidden_state = pixel_values
        if self.data_format == "channels_first":
            hidden_state = ops.transpose(hidden_state, (0, 2, 3, 1))
        batch = None if training else _empty_batch_guard(hidden_state)
        if batch is not None:
            hidden_state = batch.input
        if TF and not training and self.built and tf.executing_eagerly() and not tf.distribute.has_strategy():
            outputs = self._graph_encoder(tf.convert_to_tensor(hidden_state))
        elif JAX and not training and self.built and not _is_placeholder(hidden_state):
            outputs = self._compiled_encoder(hidden_state)
        else:
            outputs = self.encoder(hidden_state, training=training)
        if batch is not None:
            outputs = keras.tree.map_structure(batch.restore, outputs)
        last, cls_token, hidden_states, attentions = outputs
        return CvtModelOutput(
            last_hidden_state=self._to_output_layout(last),
            cls_token_value=cls_token,
            hidden_states=tuple(self._to_output_layout(h) for h in hidden_states) if output_hidden_states else None,
            attentions=attentions if output_attentions else None,
        )


# ------------------------------------------------------------------------------------------------ Keras weight files
class KerasWeightsMismatchError(WeightLoadError):
    """A Keras weights file (`.weights.h5`, the weights inside a `.keras`) does not fit the model it is loaded into.
    `missing` and `mismatched` name the model's weights (transformers' PyTorch names), `unexpected` the file's
    variable paths (`<layer path>/vars/<i>`); `str(error)` is one line."""

    def __init__(self, source: str, missing, unexpected, mismatched):
        super().__init__(source, missing, unexpected, mismatched)
        parts = []
        for label, items in (("missing from the file", self.missing), ("unexpected in the file", self.unexpected),
                             ("mis-shaped (file vs model)",
                              [f"{name} {tuple(got)} vs {tuple(want)}" for name, want, got in self.mismatched])):
            if items:
                shown = ", ".join(items[:3]) + (f", ... ({len(items) - 3} more)" if len(items) > 3 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        self.args = (f"{source}: the Keras weights do not match the model's config: {'; '.join(parts)}; check that "
                     f"the config belongs to these weights",)


class _VariableLayout(saving_lib.H5IOStore):
    """Stands in for Keras' weights store while Keras' own saving walk visits a model: records the path and shape
    each variable would be written under, writes and allocates nothing."""

    def __init__(self):  # no file behind it
        self.entries: Dict[str, Any] = {}
        self._inner_path = ""

    def __bool__(self):
        return True

    def make(self, path, metadata=None):
        self._inner_path = path
        return self

    def __setitem__(self, key, value):
        self.entries[f"{self._inner_path}/vars/{key}" if self._inner_path else f"vars/{key}"] = value

    def close(self):
        pass


def keras_variable_layout(model: keras.Model) -> Dict[str, keras.Variable]:
    """{path in a Keras weights file: variable} of `model`, from the walk `save_weights` itself makes (the optimizer
    left out: its state is not the model's weights)."""
    layout = _VariableLayout()
    optimizer = getattr(model, "optimizer", None)
    skip = {id(optimizer)} if optimizer is not None else set()
    saving_lib._save_state(model, weights_store=layout, assets_store=None, inner_path="", visited_saveables=skip)
    return layout.entries


def _stored_shapes(h5_file) -> Dict[str, tuple]:
    shapes: Dict[str, tuple] = {}

    def visit(name, item):
        parts = name.split("/")
        if isinstance(item, h5py.Dataset) and len(parts) >= 2 and parts[-2] == "vars" and parts[0] != "optimizer":
            shapes[name] = tuple(item.shape)

    h5_file.visititems(visit)
    return shapes


def keras_store_shapes(store, source: Optional[str] = None) -> Optional[Dict[str, tuple]]:
    """{variable path: shape} of everything a Keras weights store holds (every shard of a sharded one), the
    optimizer's state left out; None for a store kind this does not read (`.npz`). Each HDF5 file is walked whole
    first (`cvt_core.h5_safety.check_h5`, Keras rules: hard links only, plain datasets stored inside the file),
    so Keras reads nothing from a file that would pull bytes from elsewhere or expand in memory."""
    from cvt_core.h5_safety import KERAS_KIND, check_h5, open_h5

    if isinstance(store, saving_lib.ShardedH5IOStore):
        shards = set()
        for files in store.sharding_config["weight_map"].values():
            shards.update(files if isinstance(files, list) else [files])
        shapes: Dict[str, tuple] = {}
        for shard in sorted(shards):
            with open_h5(os.fspath(store.path.with_name(shard)), KERAS_KIND) as checked:
                shapes.update(_stored_shapes(checked.file))
        return shapes
    if isinstance(store, saving_lib.H5IOStore):
        check_h5(store.h5_file, source or _store_source(store), KERAS_KIND)
        return _stored_shapes(store.h5_file)
    return None


def _store_source(store) -> str:
    archive = getattr(store, "archive", None)
    if archive is not None and getattr(archive, "filename", None):
        return os.fspath(archive.filename)
    path = getattr(store, "path_or_io", None)
    # load_model reads the weights of a .keras archive into memory (or a temporary folder): name them as inside it
    return os.fspath(path) if isinstance(path, str) else KERAS_ARCHIVE_WEIGHTS


def check_keras_weights(model: keras.Model, store, source: Optional[str] = None) -> None:
    """The one check before a Keras weights store is loaded into `model`: every variable of the model is in the
    store with its shape, and the store holds nothing else. Raises `KerasWeightsMismatchError` listing what is
    missing, unexpected and mis-shaped. (Keras alone loads such files silently: a variable it finds nowhere and
    sub-layers it never visits are skipped, and a layer that fails under one path is retried, and passes, under
    another.)"""
    stored = keras_store_shapes(store, source)
    if stored is None:
        return
    names = {}
    if isinstance(model, TFCvtPreTrainedModel):  # (builds the model if needed)
        names = {id(variable): name for name, variable in model.canonical_weights().items()}
    expected = keras_variable_layout(model)

    def described(path: str) -> str:  # the model's weight name (transformers' PyTorch name) where it has one
        return names.get(id(expected[path]), path)

    missing = [described(p) for p in sorted(expected) if p not in stored]
    unexpected = [p for p in sorted(stored) if p not in expected]
    mismatched = [(described(p), tuple(v.shape), stored[p]) for p, v in sorted(expected.items())
                  if p in stored and tuple(v.shape) != stored[p]]
    if missing or unexpected or mismatched:
        raise KerasWeightsMismatchError(source or _store_source(store), missing, unexpected, mismatched)


def check_keras_weights_file_safety(path: str) -> None:
    """The whole-file safety checks of `cvt_core.h5_safety` on any path `load_weights` takes (`.keras`,
    `.weights.h5`, sharded `.weights.json` and every shard, legacy `.h5`), one-line `CheckpointError`, with no
    comparison against a model."""
    from cvt_core.h5_safety import check_keras_weights_path

    check_keras_weights_path(path)


def check_keras_weights_file(model: keras.Model, path: str) -> None:
    """`check_keras_weights` on a `.weights.h5`, sharded `.weights.json` or `.keras` file (the weights inside);
    other files are left to Keras. Each file is first opened as a regular file and checked whole
    (`cvt_core.h5_safety`: a `.keras` archive's members bounded, its config.json strict JSON, every HDF5 file
    walked), raising a one-line `CheckpointError` before Keras reads a byte of it."""
    path = os.fspath(path)
    check_keras_weights_file_safety(path)
    if path.endswith(".keras"):
        with zipfile.ZipFile(path, "r") as archive:
            if KERAS_ARCHIVE_WEIGHTS not in archive.namelist():
                return
            store = saving_lib.H5IOStore(KERAS_ARCHIVE_WEIGHTS, archive=archive, mode="r")
            try:
                check_keras_weights(model, store, path)
            finally:
                store.close()
        return
    if path.endswith(".weights.h5"):
        store = saving_lib.H5IOStore(path, mode="r")
    elif path.endswith(".weights.json"):
        store = saving_lib.ShardedH5IOStore(path, mode="r")
    else:
        return
    try:
        check_keras_weights(model, store, path)
    finally:
        store.close()


# ------------------------------------------------------------------------------------------------ models
class TFCvtPreTrainedModel(keras.Model):
    """Shared by both models: construction from a `CvtConfig`, Keras (de)serialisation, the canonical weight map
    and transformers-compatible `from_pretrained` / `save_pretrained`."""

    with_head = False
    architecture = "CvtModel"

    def __init__(self, config: CvtConfig, data_format: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(config, CvtConfig):
            raise TypeError(f"config must be a cvt_core.CvtConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.data_format = _check_data_format(keras.config.image_data_format() if data_format is None else data_format)
        self.cvt = TFCvtMainLayer(config, data_format=self.data_format, name="cvt")
        # The preprocessing the weights expect (a cvt_core CvtImageProcessor): read by from_pretrained, written by
        # save_pretrained; None means the released checkpoints' preprocessing at the config's resolution.
        self.image_processor = None

    def _resolve_flags(self, output_hidden_states, output_attentions, return_dict):
        config = self.config
        return (config.output_hidden_states if output_hidden_states is None else bool(output_hidden_states),
                config.output_attentions if output_attentions is None else bool(output_attentions),
                config.use_return_dict if return_dict is None else bool(return_dict))

    # ---------------------------------------------------------------- Keras serialisation
    def get_config(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.saving.serialize_keras_object(self.dtype_policy),
            "config": self.config.to_dict(),
            "data_format": self.data_format,
        }

    @classmethod
    def from_config(cls, config: Dict[str, Any], custom_objects=None):
        config = dict(config)
        cvt_config = config.pop("config")
        if isinstance(cvt_config, dict):
            cvt_config = CvtConfig.from_dict(cvt_config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.saving.deserialize_keras_object(config["dtype"])
        return cls(cvt_config, **config)

    # ---------------------------------------------------------------- MultiWorkerMirroredStrategy
    # Keras 3 (3.15 included) cannot `fit` under MultiWorkerMirroredStrategy (keras-team/keras#20585): it reduces
    # the first distributed batch with `strategy.reduce`, which that strategy cannot apply to a nested structure,
    # and it averages each step's scalar metrics with `strategy.reduce("MEAN", value, axis=0)`, which needs an
    # axis. The methods below work around both, for this strategy only.
    # (TensorFlow only: the other backends have no tf.distribute strategies, and their steps other signatures)
    if TF:
        def _in_multi_worker_strategy(self) -> bool:
            return isinstance(getattr(self, "_distribute_strategy", None), tf.distribute.MultiWorkerMirroredStrategy)

        def _step_logs(self, logs):
            if not self._in_multi_worker_strategy():
                return logs
            return keras.tree.map_structure(
                lambda value: tf.reshape(value, [1]) if tf.is_tensor(value) and value.shape.rank == 0 else value, logs)

        def train_step(self, data):
            return self._step_logs(super().train_step(data))

        def test_step(self, data):
            return self._step_logs(super().test_step(data))

        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            # The build only needs shapes: take this worker's first replica's batch instead of reducing it.
            strategy = getattr(self, "_distribute_strategy", None)
            if iterator is None or not self._in_multi_worker_strategy():
                return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(
                    lambda value: (strategy.experimental_local_results(value)[0]
                                   if isinstance(value, tf.distribute.DistributedValues) else value),
                    next(batches))
                break
            with strategy.scope():
                self._symbolic_build(data_batch=data_batch)

    def predict(self, x, *args, **kwargs):
        """Keras' `predict`; an empty array (or input dict) gives empty outputs, where Keras' loop has no batch to
        run and fails."""
        images = x.get("pixel_values") if isinstance(x, Mapping) else x
        if getattr(images, "shape", None) is not None and len(images.shape) > 0 and images.shape[0] == 0:
            return self.predict_on_batch(x)
        return super().predict(x, *args, **kwargs)

    # ---------------------------------------------------------------- export
    def serving_input_signature(self, height: Optional[int] = None, width: Optional[int] = None) -> List[keras.InputSpec]:
        """What `export` serves unless told otherwise: `pixel_values` float32 of any batch, in the model's data
        format, of any height and width (None) or of the given ones."""
        channels = self.config.num_channels
        shape = ((None, channels, height, width) if self.data_format == "channels_first"
                 else (None, height, width, channels))
        return [keras.InputSpec(shape=shape, dtype="float32", name="pixel_values")]

    def serving_outputs(self, pixel_values) -> Dict[str, Any]:
        """What the exported artifacts return: the output container's tensors by name, floating ones in float32
        whatever the dtype policy (under `mixed_bfloat16` the model computes in bfloat16 inside)."""
        outputs = self(pixel_values, training=False, return_dict=True)
        return {name: ops.cast(value, "float32") if _is_floating(value) else value
                for name, value in outputs.items() if ops.is_tensor(value)}

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Keras' `export`. Without `input_signature` the artifact takes `pixel_values` float32 with a dynamic batch,
        height and width (Keras would fix the sizes and the dtype of the first call); `format="litert"` fixes height
        and width at the config's image_size (default 224), as TFLite's built-in kernels need. Both serve
        `serving_outputs`: float32 outputs under every dtype policy. The SavedModel's endpoint is `serve` (signature
        `serving_default`), its variables stored once; the LiteRT file holds TFLite built-in operators only (the
        weights frozen in), so the plain interpreter runs it. With other formats, or Keras' own export options in
        `kwargs`, Keras exports."""
        if not self.built:
            self.build_with_dummy_input()
        if input_signature is None:
            sizes = default_input_size(self.config) if format == "litert" else (None, None)
            input_signature = self.serving_input_signature(*sizes)
        if format not in ("tf_saved_model", "litert") or kwargs:
            return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)
        tf = tensorflow(f"export(format={format!r})")
        spec, = input_signature
        spec = tf.TensorSpec(tuple(spec.shape), spec.dtype or tf.float32, name=spec.name or "pixel_values")
        if format == "tf_saved_model":
            self._export_saved_model(os.fspath(filepath), spec)
        else:
            self._export_litert(os.fspath(filepath), spec)
        if verbose or verbose is None:
            print(f"Saved {'SavedModel' if format == 'tf_saved_model' else 'LiteRT model'} at {os.fspath(filepath)}")

    def _export_saved_model(self, filepath: str, spec) -> None:
        """A SavedModel whose `serve` (signature `serving_default`) is `serving_outputs`. Written from a tf.Module
        holding the model: Keras' ExportArchive (3.15) stores every variable twice, once per wrapper."""
        tf = tensorflow("a SavedModel export")
        serving = tf.Module(name="cvt_serving")
        serving.model = self
        serving.serve = tf.function(self.serving_outputs, input_signature=[spec])
        tf.saved_model.save(serving, filepath, signatures={"serving_default": serving.serve})

    def _export_litert(self, filepath: str, spec) -> None:
        """A `.tflite` file of `serving_outputs` with the variables frozen into constants: Keras' own LiteRT export
        keeps them as variables, so its convolutions (whose kernels fold the BatchNorm at run time) need TensorFlow's
        select ops, which the plain interpreter lacks."""
        tf = tensorflow("a LiteRT export")
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        concrete = tf.function(self.serving_outputs).get_concrete_function(spec)
        converter = tf.lite.TFLiteConverter.from_concrete_functions([convert_variables_to_constants_v2(concrete)])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        flatbuffer = converter.convert()
        with atomic_write(filepath) as tmp:
            with open(tmp, "wb") as f:
                f.write(flatbuffer)

    # ---------------------------------------------------------------- weights
    def build_with_dummy_input(self) -> None:
        """Build every variable by running the smallest input the config accepts."""
        side = minimum_input_size(self.config)
        channels = self.config.num_channels
        shape = (1, channels, side, side) if self.data_format == "channels_first" else (1, side, side, channels)
        self(np.zeros(shape, np.float32), training=False)

    def canonical_weights(self) -> Dict[str, keras.Variable]:
        """Every variable keyed by its transformers PyTorch name (`WeightEntry.torch_name`), found by walking the
        layers by name; builds the model first if needed."""
        if not self.built:
            self.build_with_dummy_input()
        weights: Dict[str, keras.Variable] = {}
        for entry in weight_table(self.config, self.with_head):
            if not entry.has_keras_twin:
                continue
            layer = self if entry.in_head else _child_layer(self, "cvt")
            for part in entry.module:
                layer = _child_layer(layer, part)
            variable = getattr(layer, entry.keras_leaf, None)
            if not isinstance(variable, keras.Variable):
                raise RuntimeError(f"layer {layer.path!r} has no variable {entry.keras_leaf!r} for {entry.name}")
            weights[entry.torch_name(self.with_head)] = variable
        return weights

    def load_weights(self, filepath, skip_mismatch: bool = False, **kwargs):
        """Keras' `load_weights`, strict: a `.weights.h5` / `.keras` file that does not hold exactly this model's
        variables with their shapes raises `KerasWeightsMismatchError` before any variable is assigned (the model
        keeps its weights). `skip_mismatch=True` is Keras' opt-out: the mismatch becomes a warning and what fits
        is loaded."""
        if not self.built:
            self.build_with_dummy_input()
        if skip_mismatch:  # the opt-out skips the strict comparison, never the file's safety checks
            check_keras_weights_file_safety(filepath)
            return super().load_weights(filepath, skip_mismatch=True, **kwargs)
        check_keras_weights_file(self, filepath)
        object.__setattr__(self, "_keras_weights_checked", True)  # a plain attribute, not tracked by Keras
        try:
            return super().load_weights(filepath, skip_mismatch=False, **kwargs)
        finally:
            object.__setattr__(self, "_keras_weights_checked", False)

    def load_own_variables(self, store):
        """Keras calls this on the model first, with the whole weights store, when it loads a file into it
        (`keras.models.load_model`, `load_weights`): the whole-file check runs here, so no Keras entry point loads
        a file that does not fit. Under `load_model` Keras reports the error in its own ValueError."""
        if not self.__dict__.get("_keras_weights_checked"):
            check_keras_weights(self, store)
        super().load_own_variables(store)

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: Optional[CvtConfig] = None, strict: bool = True,
                        ignore_mismatched_sizes: bool = False, data_format: str = "channels_first", **kwargs: Any):
        """Load a transformers checkpoint: a local folder (config.json + model.safetensors or pytorch_model.bin, or
        tf_model.h5, transformers' TF weights, in a folder without PyTorch weights) or a hub repository (`org/name`
        or `hf://org/name`), fetched and cached by huggingface_hub: `revision=`, `cache_dir=`, `local_files_only=`,
        `token=`, `force_download=` and `HF_HUB_OFFLINE` work as in transformers. Other keyword arguments override
        config fields. `data_format` defaults to NCHW, as transformers' TF classes take (`from_preset` and the
        constructor follow `keras.config.image_data_format()` instead). The folder's preprocessor_config.json
        becomes `model.image_processor`, which `save_pretrained` writes back.

        `strict`: missing or unexpected weights raise `WeightLoadError` (else they are reported and missing ones
        keep their initial values); `ignore_mismatched_sizes`: mis-shaped weights are re-initialised instead of
        raising. A classifier checkpoint loads into the bare model; a bare checkpoint loads into the classifier
        with a fresh head (with a warning). Weights of a dtype no weight may have (complex, bool, integers;
        `cvt_core.weights.dtype_problem`) raise `WeightLoadError` whatever `strict` says, and NaN or Inf in a weight
        raises `cvt_core.weights.NonFiniteWeightError`.
        """
        hub_options = split_hub_options(kwargs)
        directory, config, state, plan, image_processor = read_pretrained(
            name_or_path, cls.with_head, config, strict, ignore_mismatched_sizes, hub_options, **kwargs)
        try:
            plan.check_dtypes(directory, state.dtypes)  # never cast complex, bool or integer tensors into weights
            model = cls(config, data_format=data_format)
            model.build_with_dummy_input()
            by_name = {e.torch_name(cls.with_head): e for e in weight_table(config, cls.with_head)}
            for name, variable in model.canonical_weights().items():
                source = plan.assignments.get(name)
                if source is None:
                    continue
                value = check_weight_value(directory, name, np.asarray(state[source]))  # NaN / Inf refused
                value = by_name[name].to_keras(value)
                variable.assign(np.asarray(value, dtype=variable.dtype))
        finally:
            state.close()
        model.image_processor = image_processor
        if plan.fresh_head:
            warnings.warn(f"{directory}: the checkpoint has no classification head; newly initialised: "
                          f"{', '.join(plan.fresh_head)}. Train the model before using its predictions.", stacklevel=2)
        if plan.mismatched:
            warnings.warn(f"{directory}: re-initialised because their shapes differ from the checkpoint: "
                          f"{', '.join(f'{n} {got} vs model {want}' for n, want, got in plan.mismatched)}",
                          stacklevel=2)
        if plan.missing or plan.unexpected:
            warnings.warn(f"{directory}: loaded non-strictly; missing (initialised): {plan.missing or 'none'}; "
                          f"unexpected (ignored): {plan.unexpected or 'none'}", stacklevel=2)
        return model

    def save_pretrained(self, directory: str, push_to_hub: bool = False, repo_id: Optional[str] = None,
                        **push_options: Any) -> str:
        """Write config.json, model.safetensors (transformers' PyTorch layout and names) and preprocessor_config.json
        (`self.image_processor`, else the released checkpoints' preprocessing); a warning says when transformers
        cannot build or reproduce the config. `push_to_hub=True` then uploads the folder to `repo_id` (default: the
        folder's name) with huggingface_hub (`token=`, `private=`, `commit_message=`, `revision=`). Returns
        `directory`. BatchNorm `num_batches_tracked` is written as 0: a Keras model does not count batches.
        """
        weights = self.canonical_weights()
        tensors: Dict[str, np.ndarray] = {}
        for entry in weight_table(self.config, self.with_head):
            name = entry.torch_name(self.with_head)
            if entry.has_keras_twin:
                tensors[name] = np.ascontiguousarray(entry.from_keras(ops.convert_to_numpy(weights[name])))
            else:
                tensors[name] = np.zeros(entry.shape, np.int64)
        return save_pretrained_folder(directory, self.config, self.with_head, self.architecture, tensors,
                                      self.image_processor, push_to_hub, repo_id, **push_options)

    # ---------------------------------------------------------------- keras-hub's names
    @classmethod
    def from_preset(cls, preset: str, load_weights: bool = True, **kwargs: Any):
        """keras-hub's entry point. `preset`: a local preset folder (what `save_to_preset` or `save_pretrained`
        writes), `hf://org/name` or `org/name` on the hub, loaded as `from_pretrained` loads them; or an
        architecture name (`cvt-13`, `cvt-21`, `cvt-w24`, `cvt-13-384`), which has no weights: it needs
        `load_weights=False` and gives random weights. The data format follows `keras.config.image_data_format()`
        unless `data_format=` is given; other keyword arguments go to `from_pretrained` (or, for an architecture
        name, override config fields)."""
        data_format = kwargs.pop("data_format", None)
        # the backbone's stage choice is the model's, not the config's
        model_arguments = {key: kwargs.pop(key) for key in ("out_features", "out_indices") if key in kwargs}
        name = os.fspath(preset)
        if is_preset_name(name):
            if load_weights:
                raise ValueError(f"{name!r} names an architecture only, with no weights: pass load_weights=False for "
                                 f"random weights, or from_preset('hf://microsoft/{name.lower()}') for the released ones")
            return cls(CvtConfig.from_preset(name, **kwargs), data_format=data_format, **model_arguments)
        if not load_weights:
            directory = resolve_pretrained(name, **split_hub_options(kwargs))
            return cls(CvtConfig.from_pretrained(directory, **kwargs), data_format=data_format, **model_arguments)
        return cls.from_pretrained(name, data_format=data_format or keras.config.image_data_format(),
                                   **model_arguments, **kwargs)

    def summary(self, *args, **kwargs):
        """Keras' `summary`, after building the variables (with the smallest input the config accepts) if the model
        was never called, so that every row shows its parameters."""
        if not self.built:
            self.build_with_dummy_input()
        return super().summary(*args, **kwargs)

    def save_to_preset(self, preset_dir: str) -> str:
        """keras-hub's name for `save_pretrained`: the folder `from_preset` (and transformers) loads."""
        return self.save_pretrained(preset_dir)

    def num_parameters(self, only_trainable: bool = False) -> int:
        """The number of parameters, as PyTorch counts them (BatchNorm moving statistics are state, not parameters);
        `only_trainable`: the trainable ones. As transformers' `num_parameters()`; builds the model if needed."""
        if not self.built:
            self.build_with_dummy_input()
        statistics = {id(v) for layer in self._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)
                      for v in (layer.moving_mean, layer.moving_variance)}
        variables = self.trainable_weights if only_trainable else self.weights
        return int(sum(np.prod(v.shape) for v in variables if id(v) not in statistics))


def _is_floating(tensor) -> bool:
    return keras.backend.standardize_dtype(tensor.dtype).startswith(("float", "bfloat"))


def _child_layer(layer: keras.layers.Layer, name: str) -> keras.layers.Layer:
    for child in layer._flatten_layers(include_self=False, recursive=False):
        if child.name == name:
            return child
    raise KeyError(f"layer {layer.name!r} has no sub-layer named {name!r}")


@keras.saving.register_keras_serializable(package="cvt_tf")
class TFCvtModel(TFCvtPreTrainedModel):
    """The bare CvT backbone. Returns `CvtModelOutput` (or its tuple with `return_dict=False`)."""

    with_head = False
    architecture = "CvtModel"

    def build(self, input_shape=None):
        self.cvt.build(None)

    def call(self, pixel_values, output_hidden_states=None, output_attentions=None, return_dict=None,
             training=False):
        arguments = unpack_inputs(pixel_values, output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions, return_dict=return_dict)
        pixel_values = arguments["pixel_values"]
        output_hidden_states, output_attentions, return_dict = self._resolve_flags(
            arguments["output_hidden_states"], arguments["output_attentions"], arguments["return_dict"])
        outputs = self.cvt(pixel_values, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions, training=training)
        return outputs if return_dict else outputs.to_tuple()


@keras.saving.register_keras_serializable(package="cvt_tf")
class TFCvtBackbone(TFCvtModel):
    """CvT as a dense-task backbone, as `cvt_torch.CvtBackbone`: the outputs of the stages named in
    `out_features` (or numbered by `out_indices` in `stage_names`, "stem" being the pixel input) as
    `feature_maps` in the model's data format, and as `pyramid_outputs` keyed "P<log2 stride>" ("P2", "P3", "P4"
    for the released configs), as keras-hub's pyramid backbones key them. The weights are `TFCvtModel`'s."""

    def __init__(self, config: CvtConfig, out_features: Optional[List[str]] = None,
                 out_indices: Optional[List[int]] = None, data_format: Optional[str] = None, **kwargs):
        super().__init__(config, data_format=data_format, **kwargs)
        self._choose_stages(out_features, out_indices)

    def _choose_stages(self, out_features, out_indices) -> None:
        features, indices = resolve_out_features(self.config, out_features, out_indices)
        # plain lists as in PyTorch, set past Keras' attribute tracking (they are configuration, not layer state)
        object.__setattr__(self, "stage_names", stage_names(self.config))
        object.__setattr__(self, "out_features", features)
        object.__setattr__(self, "out_indices", indices)

    @property
    def channels(self) -> List[int]:
        return chosen_channels_and_strides(self.config, self.out_indices)[0]

    @property
    def strides(self) -> List[int]:
        return chosen_channels_and_strides(self.config, self.out_indices)[1]

    def get_config(self) -> Dict[str, Any]:
        return {**super().get_config(), "out_features": list(self.out_features)}

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: Optional[CvtConfig] = None, strict: bool = True,
                        ignore_mismatched_sizes: bool = False, out_features: Optional[List[str]] = None,
                        out_indices: Optional[List[int]] = None, data_format: str = "channels_first", **kwargs: Any):
        """`TFCvtModel.from_pretrained` (a classifier checkpoint's head is left out), then the chosen stages."""
        model = super().from_pretrained(name_or_path, config, strict, ignore_mismatched_sizes, data_format=data_format,
                                        **kwargs)
        model._choose_stages(out_features, out_indices)
        return model

    def call(self, pixel_values, output_hidden_states=None, output_attentions=None, return_dict=None,
             training=False):
        arguments = unpack_inputs(pixel_values, output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions, return_dict=return_dict)
        pixel_values = arguments["pixel_values"]
        output_hidden_states, output_attentions, return_dict = self._resolve_flags(
            arguments["output_hidden_states"], arguments["output_attentions"], arguments["return_dict"])
        outputs = self.cvt(pixel_values, output_hidden_states=True, output_attentions=output_attentions,
                           training=training)
        maps = (pixel_values,) + tuple(outputs.hidden_states)
        feature_maps = tuple(maps[i] for i in self.out_indices)
        pyramid = {f"P{stride.bit_length() - 1}": feature for stride, feature in zip(self.strides, feature_maps)}
        result = CvtBackboneOutput(feature_maps=feature_maps, pyramid_outputs=pyramid,
                                   hidden_states=outputs.hidden_states if output_hidden_states else None,
                                   attentions=outputs.attentions)
        return result if return_dict else result.to_tuple()


@keras.saving.register_keras_serializable(package="cvt_tf")
class TFCvtForImageClassification(TFCvtPreTrainedModel):
    """CvT with the classification head: LayerNorm of the final cls token (or of every final token, then their
    mean, when the last stage has none) and a Dense classifier (identity when num_labels is 0)."""

    with_head = True
    architecture = "CvtForImageClassification"

    def __init__(self, config: CvtConfig, data_format: Optional[str] = None, **kwargs):
        super().__init__(config, data_format=data_format, **kwargs)
        self.layernorm = _layer_norm("layernorm")
        if config.num_labels > 0:
            self.classifier = _dense(config, config.num_labels, "classifier")
        else:
            self.classifier = keras.layers.Identity(name="classifier")

    def build(self, input_shape=None):
        self.cvt.build(None)
        self.layernorm.build((None, None, self.config.hidden_size))
        self.classifier.build((None, self.config.hidden_size))

    def call(self, pixel_values, labels=None, output_hidden_states=None, output_attentions=None,
             return_dict=None, training=False):
        arguments = unpack_inputs(pixel_values, labels=labels, output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions, return_dict=return_dict)
        pixel_values, labels = arguments["pixel_values"], arguments["labels"]
        output_hidden_states, output_attentions, return_dict = self._resolve_flags(
            arguments["output_hidden_states"], arguments["output_attentions"], arguments["return_dict"])
        outputs = self.cvt(pixel_values, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions, training=training)
        logits = self.forward_head(self._normalised_tokens(outputs))
        loss = None if labels is None else self.compute_classification_loss(labels, logits)
        result = CvtImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                              attentions=outputs.attentions)
        return result if return_dict else result.to_tuple()

    def forward_features(self, pixel_values, training=False):
        """Normalised final tokens: (B, 1, C_last) with a final cls token, else (B, H'*W', C_last)."""
        if not self.built:
            self.build_with_dummy_input()
        return self._normalised_tokens(self.cvt(pixel_values, training=training))

    def forward_head(self, features, pre_logits: bool = False):
        """Mean over the tokens of `forward_features`' output, then the classifier (skipped with `pre_logits`)."""
        pooled = ops.mean(features, axis=1)
        return pooled if pre_logits else self.classifier(pooled)

    def _normalised_tokens(self, outputs: CvtModelOutput):
        if self.config.cls_token[-1]:
            return _apply_layer_norm(self.layernorm, outputs.cls_token_value)
        grid = outputs.last_hidden_state
        if self.data_format == "channels_first":
            grid = ops.transpose(grid, (0, 2, 3, 1))
        return _apply_layer_norm(self.layernorm, _grid_to_tokens(grid))

    def problem_type_for(self, labels) -> str:
        """config.problem_type, or transformers' inference from num_labels and the labels' dtype (the config is not
        changed). An inferred pick is announced once per model (`announce_inferred_problem_type`): a multi-label
        pick, where one-hot single-label targets land, with a UserWarning."""
        if self.config.problem_type is not None:
            return self.config.problem_type
        if self.config.num_labels == 1:
            problem_type = "regression"
        elif "int" in keras.backend.standardize_dtype(labels.dtype):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
        announce_inferred_problem_type(self, problem_type)
        return problem_type

    def compute_classification_loss(self, labels, logits, sample_weight=None):
        """MSE (regression), softmax cross-entropy ignoring label -100 (single label) or sigmoid BCE (multi label),
        each a mean over the batch, as transformers' PyTorch model computes it. Computed in float32 whatever the
        logits' dtype (mixed precision). With `sample_weight` the loss is sum(w * loss) / n over the n samples that
        count (label -100 does not), 0 when none does: how Keras reduces its compiled losses (`sum_over_batch_size`),
        so `compile(loss=...)` and the model's own loss weigh samples alike."""
        if self.config.num_labels == 0:
            raise ValueError("num_labels is 0 (identity head): there are no logits to compute a loss from")
        labels = ops.convert_to_tensor(labels)
        logits = ops.cast(logits, "float32")
        problem_type = self.problem_type_for(labels)
        if problem_type == "regression":
            labels = ops.cast(labels, logits.dtype)
            if self.config.num_labels == 1:
                per_sample = ops.square(ops.reshape(logits, [-1]) - ops.reshape(labels, [-1]))
            else:
                per_sample = ops.mean(ops.square(logits - labels), axis=-1)
            valid = ops.ones_like(per_sample)
        elif problem_type == "single_label_classification":
            labels = ops.reshape(ops.cast(labels, "int32"), [-1])
            logits = ops.reshape(logits, (-1, self.config.num_labels))
            valid = ops.not_equal(labels, -100)  # torch CrossEntropyLoss's default ignore_index
            labels = self._checked_class_indices(labels, valid)
            per_sample = ops.sparse_categorical_crossentropy(
                ops.where(valid, labels, ops.zeros_like(labels)), logits, from_logits=True)
            valid = ops.cast(valid, per_sample.dtype)
        else:
            labels = ops.cast(labels, logits.dtype)
            per_sample = ops.mean(ops.binary_crossentropy(labels, logits, from_logits=True), axis=-1)
            valid = ops.ones_like(per_sample)
        count = ops.sum(valid)
        if sample_weight is not None:
            valid = valid * ops.reshape(ops.cast(sample_weight, per_sample.dtype), [-1])
        return ops.divide_no_nan(ops.sum(per_sample * valid), count)

    def _checked_class_indices(self, labels, valid):
        """`labels`, refused unless each is a class index in [0, num_labels) or the ignored -100: a ValueError
        eagerly, an assertion with the same message inside a TensorFlow graph (`fit`) and an error raised from
        inside a compiled JAX step, before the cross-entropy (which on CPU fails with TensorFlow's own message, on
        GPU silently gives NaN, and on JAX silently gives a wrong loss)."""
        n = self.config.num_labels
        bad = ops.logical_and(valid, ops.logical_or(labels < 0, labels >= n))
        message = f"labels must be class indices in [0, num_labels={n}); got"
        if not TF:
            return _refuse_bad_labels(labels, bad, message)
        if tf.executing_eagerly():
            if bool(tf.reduce_any(bad)):
                raise ValueError(f"{message} {int(tf.boolean_mask(labels, bad)[0])}")
            return labels
        first_bad = tf.boolean_mask(labels, bad)[:1]
        check = tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [message, first_bad])
        with tf.control_dependencies([check]):
            return tf.identity(labels)

    # ---------------------------------------------------------------- Keras fit / evaluate / predict
    @staticmethod
    def _labels_inside(x):
        return x.get("labels") if isinstance(x, Mapping) else None

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Keras' loss hook (`fit`, `evaluate`). A loss given to `compile` is applied to (y, float32 logits); with
        none, the model's own loss is used, from labels passed inside the input dict or as `y`. The result is
        scaled for the replicas of a `tf.distribute` strategy as Keras' own losses are."""
        logits, model_loss = y_pred, None
        if isinstance(y_pred, CvtImageClassifierOutput):
            logits, model_loss = y_pred.logits, y_pred.loss
        if y is None:
            y = self._labels_inside(x)
        if getattr(self, "_compile_loss", None) is not None:
            if y is None:
                raise ValueError("fit/evaluate got no labels: pass them as y, or inside the input dict as 'labels'")
            return super().compute_loss(x, y, ops.cast(logits, "float32"), sample_weight, training=training)
        if model_loss is None or sample_weight is not None:
            if y is None:
                raise ValueError("no loss to train on: compile with a loss, or pass labels (as y, or inside the input "
                                 "dict as 'labels') so the model computes its own")
            model_loss = self.compute_classification_loss(y, logits, sample_weight)
        total = ops.cast(model_loss, "float32")
        for extra in self.losses:  # add_loss / regularisers, as Keras adds them
            total = total + ops.sum(ops.cast(extra, "float32"))
        # Each replica's gradients are summed across replicas, so each contributes its mean / replicas (JAX's
        # keras.distribution computes one loss over the global batch instead).
        replicas = tf.distribute.get_strategy().num_replicas_in_sync if TF else 1
        return total / replicas if replicas > 1 else total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Compiled metrics see (labels, logits); labels come from `y` or from the input dict."""
        if isinstance(y_pred, CvtImageClassifierOutput):
            y_pred = y_pred.logits
        if y is None:
            y = self._labels_inside(x)
        if y is None:
            return self.get_metrics_result()
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def predict_step(self, *step):
        """`predict` returns the logits, as float32 (the output container is what calling the model returns).
        (`step` is `data`, or `state, data` on JAX, whose steps are pure functions of the variables.)"""
        outputs = super().predict_step(*step)
        if JAX:  # (outputs, non-trainable variables)
            return _float32_logits(outputs[0]), outputs[1]
        return _float32_logits(outputs)


def _float32_logits(outputs):
    if isinstance(outputs, CvtImageClassifierOutput):
        outputs = outputs.logits
    return ops.cast(outputs, "float32")


def _is_placeholder(tensor) -> bool:
    """A tensor without values: a JAX tracer (inside jax.jit or Keras' shape inference) or a torch "meta" tensor
    (Keras' shape inference on the torch backend)."""
    if JAX:
        import jax

        return isinstance(tensor, jax.core.Tracer)
    return getattr(getattr(tensor, "device", None), "type", None) == "meta"


def _refuse_bad_labels(labels, bad, message: str):
    """`labels`, after raising ValueError(`message` + the first bad label) where any is `bad`: at once for eager
    tensors (PyTorch, eager JAX); from inside a compiled JAX step through a host callback (the step then fails
    with that message); not at all for shape inference."""

    def check(labels, bad):
        labels, bad = np.asarray(labels), np.asarray(bad)
        if bad.any():
            raise ValueError(f"{message} {int(labels[bad][0])}")

    if _is_placeholder(labels):
        if JAX:  # (shape inference, jax.eval_shape, never runs the callback)
            import jax

            jax.debug.callback(check, labels, bad)
        return labels
    check(ops.convert_to_numpy(labels), ops.convert_to_numpy(bad))
    return labels
