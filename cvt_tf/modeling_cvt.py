"""CvT in Keras 3, layer for layer the structure of the PyTorch model in `cvt_torch`, on the TensorFlow, JAX and
PyTorch backends (`KERAS_BACKEND`, see `cvt_tf.backend`).

Every block is a Keras layer made of Keras layers, called as layers (`self.dense(x)`, `self.layernorm(x)`, the
depthwise convolution then its BatchNorm) and written with `keras.ops`, so the backends, dtype policies
(`dtype="mixed_bfloat16"` reaches every layer and is saved in `.keras` files), `quantize`, LoRA, rematerialisation
and Keras' saving see an ordinary model. Each variable's path below the model is transformers' TF name with "_"
for "." (`WeightEntry.keras_variable_path()` of `cvt_core.weights`; the torch backend refuses dots in parameter
names). The numbers equal transformers 4.57.6 in inference; the defects listed in the project's facts (drop path
by stage and after the residual add, `depth[s] <= s`, cls token off the last stage, the `avg` projection, a
classifier without cls token, building without `image_size`) are not reproduced.

Layers compute channels-last (NHWC). `pixel_values` are NCHW by default, as in transformers; a model built with
`data_format="channels_last"` takes NHWC images and returns NHWC spatial outputs. An empty batch gives empty
outputs in inference, as in PyTorch.

Around the model, each in its own module: Keras weight files load strictly (`cvt_tf.keras_weights`); `compile`/`fit`
on the model's own loss or a compiled one (`cvt_tf.training`, the loss in `cvt_tf.losses`); the faster inference
function for deployment and benchmarks (`cvt_tf.optimize`); SavedModel and LiteRT files (`conversion.export_keras`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import keras
import numpy as np
from keras import ops

from cvt_core.backbone import chosen_channels_and_strides, resolve_out_features, stage_names
from cvt_core.checkpoint import read_pretrained, save_pretrained_folder
from cvt_core.config import CvtConfig
from cvt_core.hub import is_preset_name, resolve_pretrained, split_hub_options
from cvt_core.outputs import CvtBackboneOutput, CvtImageClassifierOutput, CvtModelOutput
from cvt_core.shapes import attention_projection, minimum_input_size
from cvt_core.training import problem_type_for

from . import keras_weights
from .backend import MultiWorkerFitFixes, empty_batch_guard, jax_compiled_inference
from .inputs import call_arguments, check_data_format, validate_pixel_values
from .layers import (CeilModeAveragePooling2D, GroupedDepthwiseConv2D, TorchBatchNormalization, block_name,
                     sublayers, truncated_normal)
from .losses import classification_loss
from .outputs import register_outputs_with_keras_tree
from .training import ClassifierFitHooks

POLICY_MAP = getattr(keras.dtype_policies, "DTypePolicyMap", ())  # (Keras 3.4 and later)
LAYER_NORM_EPSILON = 1e-5  # every LayerNorm of CvT, whatever config.layer_norm_eps says


def _kernel_initializer(config: CvtConfig) -> keras.initializers.Initializer:
    return truncated_normal(config.initializer_range)


def _layer_norm(name: str, dtype) -> keras.layers.LayerNormalization:
    return keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


def _dense(config: CvtConfig, units: int, name: str, dtype, use_bias: bool = True) -> keras.layers.Dense:
    return keras.layers.Dense(units, use_bias=use_bias, kernel_initializer=_kernel_initializer(config),
                              bias_initializer="zeros", dtype=dtype, name=name)


def quick_gelu(x):
    """x * sigmoid(1.702 x), the original CvT's activation."""
    return x * ops.sigmoid(1.702 * x)


def _activation(name: str, dtype) -> keras.layers.Activation:
    if name == "gelu":  # keras.activations.gelu is the exact (erf) form
        return keras.layers.Activation("gelu", dtype=dtype, name="activation")
    if name == "quick_gelu":
        return keras.layers.Activation(quick_gelu, dtype=dtype, name="activation")
    raise ValueError(f"hidden_act={name!r} is unknown")


def _grid_to_tokens(grid):
    """(B, H, W, C) -> (B, H*W, C)."""
    batch, height, width, channels = ops.shape(grid)
    return ops.reshape(grid, (batch, height * width, channels))


def _softmax(scores):
    """Softmax over the last axis, as keras.ops.softmax computes it, without its warning for an axis of size 1 (the
    key tokens of a 1x1 grid, which the smallest input, the build, gives)."""
    if scores.shape[-1] == 1:
        return ops.ones_like(scores)
    return ops.softmax(scores, axis=-1)


register_outputs_with_keras_tree()


# ------------------------------------------------------------------------------------------------ building blocks
class TFCvtDropPath(keras.layers.Layer):
    """Stochastic depth: in training, zero a sample's residual branch with probability `drop_prob`, else scale it
    by 1 / (1 - drop_prob). Identity in inference."""

    def __init__(self, drop_prob: float, seed: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.drop_prob = float(drop_prob)
        self.seed_generator = keras.random.SeedGenerator(seed) if self.drop_prob > 0.0 else None

    def call(self, hidden_state, training=False):
        if not training or self.drop_prob == 0.0:
            return hidden_state
        keep = 1.0 - self.drop_prob
        mask_shape = [ops.shape(hidden_state)[0]] + [1] * (len(hidden_state.shape) - 1)
        uniform = keras.random.uniform(mask_shape, dtype=hidden_state.dtype, seed=self.seed_generator)
        return hidden_state / keep * ops.floor(keep + uniform)


class TFCvtConvEmbeddings(keras.layers.Layer):
    """Convolutional token embedding: padded strided Conv2D, then LayerNorm over channels. NHWC grid in,
    (tokens (B, H'*W', C), H', W') out."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        self.in_channels = config.stage_in_channels(stage)
        self.embed_dim = config.embed_dim[stage]
        # the layers compute NHWC whatever keras.config.image_data_format() says
        self.padding = keras.layers.ZeroPadding2D(config.patch_padding[stage], data_format="channels_last",
                                                  dtype=policy, name="padding")
        self.projection = keras.layers.Conv2D(
            self.embed_dim, config.patch_sizes[stage], strides=config.patch_stride[stage], padding="valid",
            data_format="channels_last", kernel_initializer=_kernel_initializer(config), bias_initializer="zeros",
            dtype=policy, name="projection")
        self.normalization = _layer_norm("normalization", policy)

    def build(self, input_shape=None):
        self.projection.build((None, None, None, self.in_channels))
        self.normalization.build((None, None, None, self.embed_dim))

    def call(self, pixel_values):
        grid = self.projection(self.padding(pixel_values))
        batch, height, width, channels = ops.shape(grid)
        return self.normalization(ops.reshape(grid, (batch, height * width, channels))), height, width


class TFCvtEmbeddings(keras.layers.Layer):
    """Token embedding of one stage: NHWC grid in, (tokens (B, [1 +] H*W, C), H, W) out. The embedding dropout
    runs after the stage's cls token is prepended, as in the original."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.convolution_embeddings = TFCvtConvEmbeddings(config, stage, dtype=self.dtype_policy,
                                                          name="convolution_embeddings")
        self.dropout = keras.layers.Dropout(config.drop_rate[stage], dtype=self.dtype_policy, name="dropout")

    def build(self, input_shape=None):
        self.convolution_embeddings.build(input_shape)

    def call(self, pixel_values, cls_token=None, training=False):
        tokens, height, width = self.convolution_embeddings(pixel_values)
        if cls_token is not None:
            batch = ops.shape(tokens)[0]
            tokens = ops.concatenate([ops.tile(ops.cast(cls_token, tokens.dtype), [batch, 1, 1]), tokens], axis=1)
        return self.dropout(tokens, training=training), height, width


class TFCvtSelfAttentionConvProjection(keras.layers.Layer):
    """`dw_bn` projection of `role`: padded depthwise convolution (no bias), then BatchNorm. NHWC in and out."""

    def __init__(self, config: CvtConfig, stage: int, role: str, **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        self.embed_dim = config.embed_dim[stage]
        projection = attention_projection(config, stage, role)
        self.padding = keras.layers.ZeroPadding2D(projection.padding, data_format="channels_last", dtype=policy,
                                                  name="padding")
        self.convolution = GroupedDepthwiseConv2D(
            self.embed_dim, projection.kernel_size, strides=projection.stride, padding="valid", use_bias=False,
            data_format="channels_last", kernel_initializer=_kernel_initializer(config), dtype=policy,
            name="convolution")
        self.normalization = TorchBatchNormalization(dtype=policy, name="normalization")

    def build(self, input_shape=None):
        self.convolution.build((None, None, None, self.embed_dim))
        self.normalization.build((None, None, None, self.embed_dim))

    def call(self, hidden_state, training=False):
        return self.normalization(self.convolution(self.padding(hidden_state)), training=training)


class TFCvtSelfAttentionProjection(keras.layers.Layer):
    """The spatial part of one of q, k, v (`role`), returning tokens (B, T, C): `dw_bn` (depthwise conv + BN),
    `avg` (ceil-mode average pooling for k and v, nothing for q) or `linear` (nothing). Only `dw_bn` has weights."""

    def __init__(self, config: CvtConfig, stage: int, role: str, **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        projection = attention_projection(config, stage, role)
        if projection.method == "dw_bn":
            self.convolution_projection = TFCvtSelfAttentionConvProjection(
                config, stage, role, dtype=policy, name="convolution_projection")
        elif projection.method == "avg":
            self.convolution_projection = CeilModeAveragePooling2D(
                projection.kernel_size, projection.stride, projection.padding, dtype=policy,
                name="convolution_projection")
        elif projection.method == "linear":
            self.convolution_projection = keras.layers.Identity(dtype=policy, name="convolution_projection")
        else:
            raise ValueError(f"qkv_projection_method={projection.method!r} is unknown; choose 'dw_bn', 'avg' or "
                             f"'linear'")

    def build(self, input_shape=None):
        if isinstance(self.convolution_projection, TFCvtSelfAttentionConvProjection):
            self.convolution_projection.build(input_shape)

    def call(self, hidden_state, training=False):
        return _grid_to_tokens(self.convolution_projection(hidden_state, training=training))


class TFCvtSelfAttention(keras.layers.Layer):
    """Multi-head attention over convolutionally projected q, k, v.

    The cls token skips the spatial projection and is prepended to q, k and v before the Dense projections.
    Scores are scaled by embed_dim ** -0.5 (the stage width, as in the original and transformers).
    """

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        self.embed_dim = config.embed_dim[stage]
        self.num_heads = config.num_heads[stage]
        self.head_dim = self.embed_dim // self.num_heads
        self.with_cls_token = bool(config.cls_token[stage])
        self.scale = self.embed_dim ** -0.5
        self.convolution_projection_query = TFCvtSelfAttentionProjection(
            config, stage, "query", dtype=policy, name="convolution_projection_query")
        self.convolution_projection_key = TFCvtSelfAttentionProjection(
            config, stage, "key", dtype=policy, name="convolution_projection_key")
        self.convolution_projection_value = TFCvtSelfAttentionProjection(
            config, stage, "value", dtype=policy, name="convolution_projection_value")
        use_bias = bool(config.qkv_bias[stage])
        self.projection_query = _dense(config, self.embed_dim, "projection_query", policy, use_bias)
        self.projection_key = _dense(config, self.embed_dim, "projection_key", policy, use_bias)
        self.projection_value = _dense(config, self.embed_dim, "projection_value", policy, use_bias)
        self.dropout = keras.layers.Dropout(config.attention_drop_rate[stage], dtype=policy, name="dropout")

    def build(self, input_shape=None):
        for projection in (self.convolution_projection_query, self.convolution_projection_key,
                           self.convolution_projection_value):
            projection.build((None, None, None, self.embed_dim))
        for dense in (self.projection_query, self.projection_key, self.projection_value):
            dense.build((None, None, self.embed_dim))

    def _split_heads(self, tokens):
        batch, length, _ = ops.shape(tokens)
        tokens = ops.reshape(tokens, (batch, length, self.num_heads, self.head_dim))
        return ops.transpose(tokens, (0, 2, 1, 3))

    def call(self, hidden_state, height, width, output_attentions=False, training=False):
        """Returns (context (B, T, C), attention probabilities (B, heads, T, T_kv) or None)."""
        if self.with_cls_token:
            cls_token, hidden_state = hidden_state[:, :1], hidden_state[:, 1:]
        batch, _, channels = ops.shape(hidden_state)
        grid = ops.reshape(hidden_state, (batch, height, width, channels))
        query = self.convolution_projection_query(grid, training=training)
        key = self.convolution_projection_key(grid, training=training)
        value = self.convolution_projection_value(grid, training=training)
        if self.with_cls_token:
            query = ops.concatenate([cls_token, query], axis=1)
            key = ops.concatenate([cls_token, key], axis=1)
            value = ops.concatenate([cls_token, value], axis=1)
        query = self._split_heads(self.projection_query(query) * ops.cast(self.scale, query.dtype))
        key = self._split_heads(self.projection_key(key))
        value = self._split_heads(self.projection_value(value))
        attention_probs = _softmax(ops.matmul(query, ops.swapaxes(key, -1, -2)))
        context = ops.matmul(self.dropout(attention_probs, training=training), value)
        context = ops.transpose(context, (0, 2, 1, 3))
        context = ops.reshape(context, (batch, ops.shape(context)[1], self.embed_dim))
        return context, attention_probs if output_attentions else None


class TFCvtSelfOutput(keras.layers.Layer):
    """Attention output projection, then dropout."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = config.embed_dim[stage]
        self.dense = _dense(config, self.embed_dim, "dense", self.dtype_policy)
        self.dropout = keras.layers.Dropout(config.drop_rate[stage], dtype=self.dtype_policy, name="dropout")

    def build(self, input_shape=None):
        self.dense.build((None, None, self.embed_dim))

    def call(self, hidden_state, training=False):
        return self.dropout(self.dense(hidden_state), training=training)


class TFCvtAttention(keras.layers.Layer):
    """Self-attention and its output projection; returns (output tokens, attention probabilities)."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.attention = TFCvtSelfAttention(config, stage, dtype=self.dtype_policy, name="attention")
        # `output` is a keras.layers.Layer property
        self.dense_output = TFCvtSelfOutput(config, stage, dtype=self.dtype_policy, name="output")

    def build(self, input_shape=None):
        self.attention.build(input_shape)
        self.dense_output.build(input_shape)

    def call(self, hidden_state, height, width, output_attentions=False, training=False):
        context, attention_probs = self.attention(hidden_state, height=height, width=width,
                                                  output_attentions=output_attentions, training=training)
        return self.dense_output(context, training=training), attention_probs


class TFCvtIntermediate(keras.layers.Layer):
    """First MLP layer: Dense to int(embed_dim * mlp_ratio), activation (exact GELU or QuickGELU), dropout."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = config.embed_dim[stage]
        self.dense = _dense(config, config.mlp_hidden_dim(stage), "dense", self.dtype_policy)
        self.activation = _activation(config.hidden_act, self.dtype_policy)
        self.dropout = keras.layers.Dropout(config.drop_rate[stage], dtype=self.dtype_policy, name="dropout")

    def build(self, input_shape=None):
        self.dense.build((None, None, self.embed_dim))

    def call(self, hidden_state, training=False):
        return self.dropout(self.activation(self.dense(hidden_state)), training=training)


class TFCvtOutput(keras.layers.Layer):
    """Second MLP layer: Dense back to embed_dim, then dropout (the residual add is the layer's)."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = config.mlp_hidden_dim(stage)
        self.dense = _dense(config, config.embed_dim[stage], "dense", self.dtype_policy)
        self.dropout = keras.layers.Dropout(config.drop_rate[stage], dtype=self.dtype_policy, name="dropout")

    def build(self, input_shape=None):
        self.dense.build((None, None, self.hidden_dim))

    def call(self, hidden_state, training=False):
        return self.dropout(self.dense(hidden_state), training=training)


class TFCvtLayer(keras.layers.Layer):
    """Pre-norm transformer block: x + drop_path(attention(LN(x))), then x + drop_path(mlp(LN(x)))."""

    def __init__(self, config: CvtConfig, stage: int, index: int, **kwargs):
        super().__init__(**kwargs)
        policy = self.dtype_policy
        self.embed_dim = config.embed_dim[stage]
        self.attention = TFCvtAttention(config, stage, dtype=policy, name="attention")
        self.intermediate = TFCvtIntermediate(config, stage, dtype=policy, name="intermediate")
        self.dense_output = TFCvtOutput(config, stage, dtype=policy, name="output")  # `output`: a Layer property
        self.drop_path = TFCvtDropPath(config.drop_path_rates(stage)[index], dtype=policy, name="drop_path")
        self.layernorm_before = _layer_norm("layernorm_before", policy)
        self.layernorm_after = _layer_norm("layernorm_after", policy)

    def build(self, input_shape=None):
        tokens = (None, None, self.embed_dim)
        for layer in (self.attention, self.intermediate, self.dense_output, self.layernorm_before,
                      self.layernorm_after):
            layer.build(tokens)

    def call(self, hidden_state, height, width, output_attentions=False, training=False):
        """Returns (tokens, attention probabilities or None)."""
        attention_output, attention_probs = self.attention(
            self.layernorm_before(hidden_state), height=height, width=width, output_attentions=output_attentions,
            training=training)
        hidden_state = hidden_state + self.drop_path(attention_output, training=training)
        mlp_output = self.dense_output(self.intermediate(self.layernorm_after(hidden_state), training=training),
                                       training=training)
        hidden_state = hidden_state + self.drop_path(mlp_output, training=training)
        return hidden_state, attention_probs

    def rematerialized_call(self, layer_call, *args, **kwargs):
        """Keras' hook for rematerialisation (`cvt_tf.training.block_remat_scope`): `keras.remat` recomputes
        tensors, so the None of attention probabilities not asked for is added back outside it."""
        if kwargs.get("output_attentions"):
            return super().rematerialized_call(layer_call, *args, **kwargs)
        tokens_only = super().rematerialized_call(lambda *a, **k: layer_call(*a, **k)[0], *args, **kwargs)
        return lambda *a, **k: (tokens_only(*a, **k), None)


class TFCvtStage(keras.layers.Layer):
    """One stage: token embedding with the optional cls token, then `depth[stage]` blocks. NHWC in and out."""

    def __init__(self, config: CvtConfig, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.stage = stage
        self.embed_dim = config.embed_dim[stage]
        self.in_channels = config.stage_in_channels(stage)
        self.with_cls_token = bool(config.cls_token[stage])
        self.cls_token_initializer = _kernel_initializer(config)
        self.cls_token = None  # a variable once built, when the stage has a cls token
        self.embedding = TFCvtEmbeddings(config, stage, dtype=self.dtype_policy, name="embedding")
        # torch's `layers`: the attribute name is part of the paths in .keras / .weights.h5 files, kept so they load
        self.blocks = [TFCvtLayer(config, stage, index, dtype=self.dtype_policy, name=block_name(index))
                       for index in range(config.depth[stage])]

    def build(self, input_shape=None):
        if self.with_cls_token and self.cls_token is None:
            self.cls_token = self.add_weight(shape=(1, 1, self.embed_dim), initializer=self.cls_token_initializer,
                                             trainable=True, name="cls_token")
        self.embedding.build((None, None, None, self.in_channels))
        for block in self.blocks:
            block.build((None, None, self.embed_dim))

    def call(self, hidden_state, output_attentions=False, training=False):
        """The previous grid (B, H, W, C_in) -> (grid (B, H', W', C), cls token (B, 1, C) or None, a tuple of the
        blocks' attention probabilities, empty unless asked)."""
        tokens, height, width = self.embedding(hidden_state, cls_token=self.cls_token, training=training)
        attentions = []
        for block in self.blocks:
            tokens, attention_probs = block(tokens, height=height, width=width, output_attentions=output_attentions,
                                            training=training)
            if output_attentions:
                attentions.append(attention_probs)
        cls_token = None
        if self.with_cls_token:
            cls_token, tokens = tokens[:, :1], tokens[:, 1:]
        grid = ops.reshape(tokens, (ops.shape(tokens)[0], height, width, self.embed_dim))
        return grid, cls_token, tuple(attentions)


class TFCvtEncoder(keras.layers.Layer):
    """All stages in order: NHWC pixels in, a `CvtModelOutput` of NHWC grids out."""

    def __init__(self, config: CvtConfig, **kwargs):
        super().__init__(**kwargs)
        self.stages = [TFCvtStage(config, s, dtype=self.dtype_policy, name=f"stages_{s}")
                       for s in range(config.num_stages)]

    def build(self, input_shape=None):
        for stage in self.stages:
            stage.build(None)

    def call(self, pixel_values, output_hidden_states=False, output_attentions=False, training=False):
        hidden_state, cls_token = pixel_values, None
        hidden_states, attentions = [], []
        for stage in self.stages:
            hidden_state, cls_token, stage_attentions = stage(hidden_state, output_attentions=output_attentions,
                                                              training=training)
            hidden_states.append(hidden_state)
            attentions.extend(stage_attentions)
        return CvtModelOutput(last_hidden_state=hidden_state, cls_token_value=cls_token,
                              hidden_states=tuple(hidden_states) if output_hidden_states else None,
                              attentions=tuple(attentions) if output_attentions else None)


class TFCvtMainLayer(keras.layers.Layer):
    """The backbone (`cvt`): validates `pixel_values`, runs the encoder, returns a `CvtModelOutput`."""

    def __init__(self, config: CvtConfig, data_format: str = "channels_first", **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.data_format = check_data_format(data_format)
        self.encoder = TFCvtEncoder(config, dtype=self.dtype_policy, name="encoder")

    def build(self, input_shape=None):
        self.encoder.build(None)

    def _to_output_layout(self, grid):
        return ops.transpose(grid, (0, 3, 1, 2)) if self.data_format == "channels_first" else grid

    def call(self, pixel_values, output_hidden_states=False, output_attentions=False, training=False):
        validate_pixel_values(self.config, pixel_values, self.data_format)
        hidden_state = pixel_values
        if self.data_format == "channels_first":
            hidden_state = ops.transpose(hidden_state, (0, 2, 3, 1))
        guard = None if training else empty_batch_guard(hidden_state)
        if guard is not None:
            hidden_state = guard.input
        flags = dict(output_hidden_states=bool(output_hidden_states), output_attentions=bool(output_attentions))
        outputs = None if training else jax_compiled_inference(self.encoder, hidden_state, **flags)
        if outputs is None:
            outputs = self.encoder(hidden_state, training=training, **flags)
        if guard is not None:
            outputs = keras.tree.map_structure(guard.restore, outputs)
        hidden_states = outputs.hidden_states
        return CvtModelOutput(
            last_hidden_state=self._to_output_layout(outputs.last_hidden_state),
            cls_token_value=outputs.cls_token_value,
            hidden_states=None if hidden_states is None else tuple(self._to_output_layout(h) for h in hidden_states),
            attentions=outputs.attentions,
        )


# ------------------------------------------------------------------------------------------------ models
class TFCvtPreTrainedModel(MultiWorkerFitFixes, keras.Model):
    """Shared by both models: construction from a `CvtConfig`, Keras (de)serialisation, the canonical weight map
    and transformers-compatible `from_pretrained` / `save_pretrained`.

    `dtype` (a dtype policy or its name, e.g. "mixed_bfloat16") is every layer's policy. After `quantize(mode)`,
    `get_config` holds a `keras.dtype_policies.DTypePolicyMap` naming each quantized layer's policy by its path, so
    that `keras.models.load_model` rebuilds the quantized layers before it loads their weights."""

    with_head = False
    architecture = "CvtModel"

    def __init__(self, config: CvtConfig, data_format: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(config, CvtConfig):
            raise TypeError(f"config must be a cvt_core.CvtConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.data_format = check_data_format(keras.config.image_data_format() if data_format is None else data_format)
        self.cvt = TFCvtMainLayer(config, data_format=self.data_format, dtype=self.layer_policy, name="cvt")
        # The preprocessing the weights expect (a cvt_core CvtImageProcessor): read by from_pretrained, written by
        # save_pretrained; None means the released checkpoints' preprocessing at the config's resolution.
        self.image_processor = None

    @property
    def layer_policy(self) -> keras.DTypePolicy:
        """The dtype policy the layers are built with: the model's, or the default of its policy map (the layers a
        map names are quantized once built, `_quantize_configured_layers`)."""
        policy = self.dtype_policy
        return policy.default_policy if isinstance(policy, POLICY_MAP) else policy

    def _quantize_configured_layers(self) -> None:
        """Quantize each layer the policy map names (a `.keras` file of a quantized model), at the end of `build`,
        so that its variables have the quantized shapes and dtypes when weights are loaded. (Each layer gets its own
        policy: Keras' Dense does not save a quantized kernel's scale when it reads its mode from a shared map.)"""
        policy = self.dtype_policy
        if not isinstance(policy, POLICY_MAP):
            return
        for layer in sublayers(self):
            mode = policy[layer.path].quantization_mode if layer.path in policy else None
            if mode is not None and layer.quantization_mode is None:
                layer.quantize(mode)

    # ---------------------------------------------------------------- Keras serialisation
    def get_config(self) -> Dict[str, Any]:
        policy = self.dtype_policy
        if POLICY_MAP and not isinstance(policy, POLICY_MAP):
            quantized = {layer.path: layer.dtype_policy for layer in sublayers(self)
                         if getattr(layer, "quantization_mode", None) is not None}
            if quantized:
                policy = POLICY_MAP(default_policy=policy, policy_map=quantized)
        return {"name": self.name, "trainable": self.trainable, "dtype": keras.saving.serialize_keras_object(policy),
                "config": self.config.to_dict(), "data_format": self.data_format}

    @classmethod
    def from_config(cls, config: Dict[str, Any], custom_objects=None):
        config = dict(config)
        cvt_config = config.pop("config")
        if isinstance(cvt_config, dict):
            cvt_config = CvtConfig.from_dict(cvt_config)
        config["dtype"] = keras_weights.dtype_policy_from_config(config.get("dtype"))
        return cls(cvt_config, **config)

    def predict(self, x, *args, **kwargs):
        """Keras' `predict`; an empty array (or input dict) gives empty outputs, where Keras' loop has no batch to
        run and fails."""
        images = x.get("pixel_values") if isinstance(x, Mapping) else x
        if getattr(images, "shape", None) is not None and len(images.shape) > 0 and images.shape[0] == 0:
            return self.predict_on_batch(x)
        return super().predict(x, *args, **kwargs)

    # ---------------------------------------------------------------- weights
    def build_with_dummy_input(self) -> None:
        """Build every variable by running the smallest input the config accepts."""
        side = minimum_input_size(self.config)
        channels = self.config.num_channels
        shape = (1, channels, side, side) if self.data_format == "channels_first" else (1, side, side, channels)
        self(np.zeros(shape, np.float32), training=False)

    def canonical_weights(self) -> Dict[str, keras.Variable]:
        """Every variable keyed by its transformers PyTorch name (`WeightEntry.torch_name`), found by walking the
        sub-layers the weight table names; builds the model first if needed."""
        if not self.built:
            self.build_with_dummy_input()
        return keras_weights.canonical_variables(self)

    def load_weights(self, filepath, skip_mismatch: bool = False, **kwargs):
        """Keras' `load_weights`, strict and checked (`cvt_tf.keras_weights.load_weights_checked`): the file is
        walked whole for safety first, and a file that does not hold exactly this model's variables raises
        `KerasWeightsMismatchError` before any variable is assigned. `skip_mismatch=True` is Keras' opt-out of the
        comparison (a warning instead), never of the safety checks."""
        if not self.built:
            self.build_with_dummy_input()
        with keras_weights.checked_load(self, filepath, skip_mismatch):
            return super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)

    def load_own_variables(self, store):
        """Keras calls this on the model, before its layers, with the weights store of any file it loads into it
        (`keras.models.load_model`, an enclosing model's `load_weights`, `BackupAndRestore`): the file is walked and
        compared with this model there (`cvt_tf.keras_weights.check_store`)."""
        keras_weights.check_store(self, store)
        super().load_own_variables(store)

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: Optional[CvtConfig] = None, strict: bool = True,
                        ignore_mismatched_sizes: bool = False, data_format: str = "channels_first", **kwargs: Any):
        """Load a transformers checkpoint: a local folder (config.json + model.safetensors or pytorch_model.bin, or
        tf_model.h5, transformers' TF weights, in a folder without PyTorch weights) or a hub repository (`org/name`
        or `hf://org/name`), fetched and cached by huggingface_hub: `revision=`, `cache_dir=`, `local_files_only=`,
        `token=`, `force_download=` and `HF_HUB_OFFLINE` work as in transformers. `dtype=` sets the model's dtype
        policy; other keyword arguments override config fields. `data_format` defaults to NCHW, as transformers' TF
        classes take (`from_preset` and the constructor follow `keras.config.image_data_format()` instead). The
        folder's preprocessor_config.json becomes `model.image_processor`, which `save_pretrained` writes back.

        `strict`: missing or unexpected weights raise `WeightLoadError` (else they are reported and missing ones
        keep their initial values); `ignore_mismatched_sizes`: mis-shaped weights are re-initialised instead of
        raising. A classifier checkpoint loads into the bare model; a bare checkpoint loads into the classifier
        with a fresh head (with a warning). Weights of a dtype no weight may have (complex, bool, integers;
        `cvt_core.weights.dtype_problem`) raise `WeightLoadError` whatever `strict` says, and NaN or Inf in a weight
        raises `cvt_core.weights.NonFiniteWeightError`.
        """
        dtype = kwargs.pop("dtype", None)
        hub_options = split_hub_options(kwargs)
        directory, config, state, plan, image_processor = read_pretrained(
            name_or_path, cls.with_head, config, strict, ignore_mismatched_sizes, hub_options, **kwargs)
        try:
            plan.check_dtypes(directory, state.dtypes)  # never cast complex, bool or integer tensors into weights
            model = cls(config, data_format=data_format, dtype=dtype)
            keras_weights.assign_checkpoint(model, directory, state, plan.assignments)
        finally:
            state.close()
        model.image_processor = image_processor
        plan.warn_about_what_was_not_loaded(directory, cls.__name__)
        return model

    def save_pretrained(self, directory: str, push_to_hub: bool = False, repo_id: Optional[str] = None,
                        **push_options: Any) -> str:
        """Write config.json, model.safetensors (transformers' PyTorch layout and names) and preprocessor_config.json
        (`self.image_processor`, else the released checkpoints' preprocessing); a warning says when transformers
        cannot build or reproduce the config. `push_to_hub=True` then uploads the folder to `repo_id` (default: the
        folder's name) with huggingface_hub (`token=`, `private=`, `commit_message=`, `revision=`). Returns
        `directory`. BatchNorm `num_batches_tracked` is written as 0: a Keras model does not count batches.
        """
        return save_pretrained_folder(directory, self.config, self.with_head, self.architecture,
                                      keras_weights.checkpoint_arrays(self), self.image_processor, push_to_hub,
                                      repo_id, **push_options)

    # ---------------------------------------------------------------- keras-hub's names
    @classmethod
    def from_preset(cls, preset: str, load_weights: bool = True, **kwargs: Any):
        """keras-hub's entry point. `preset`: a local preset folder (what `save_to_preset` or `save_pretrained`
        writes), `hf://org/name` or `org/name` on the hub, loaded as `from_pretrained` loads them; or an
        architecture name (`cvt-13`, `cvt-21`, `cvt-w24`, `cvt-13-384`), which has no weights: it needs
        `load_weights=False` and gives random weights. The data format follows `keras.config.image_data_format()`
        unless `data_format=` is given; `dtype=` sets the dtype policy; other keyword arguments go to
        `from_pretrained` (or, for an architecture name, override config fields)."""
        data_format = kwargs.pop("data_format", None)
        # the backbone's stage choice and the dtype policy are the model's, not the config's
        model_arguments = {key: kwargs.pop(key) for key in ("out_features", "out_indices", "dtype") if key in kwargs}
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
        statistics = {id(v) for layer in sublayers(self) if isinstance(layer, keras.layers.BatchNormalization)
                      for v in (layer.moving_mean, layer.moving_variance)}
        variables = self.trainable_weights if only_trainable else self.weights
        return int(sum(np.prod(v.shape) for v in variables if id(v) not in statistics))


@keras.saving.register_keras_serializable(package="cvt_tf")
class TFCvtModel(TFCvtPreTrainedModel):
    """The bare CvT backbone. Returns `CvtModelOutput` (or its tuple with `return_dict=False`)."""

    with_head = False
    architecture = "CvtModel"

    def build(self, input_shape=None):
        self.cvt.build(None)
        self._quantize_configured_layers()

    def call(self, pixel_values, output_hidden_states=None, output_attentions=None, return_dict=None,
             training=False):
        arguments = call_arguments(self.config, pixel_values, output_hidden_states=output_hidden_states,
                                   output_attentions=output_attentions, return_dict=return_dict)
        outputs = self.cvt(arguments["pixel_values"], output_hidden_states=arguments["output_hidden_states"],
                           output_attentions=arguments["output_attentions"], training=training)
        return outputs if arguments["return_dict"] else outputs.to_tuple()


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
        arguments = call_arguments(self.config, pixel_values, output_hidden_states=output_hidden_states,
                                   output_attentions=output_attentions, return_dict=return_dict)
        pixel_values = arguments["pixel_values"]
        outputs = self.cvt(pixel_values, output_hidden_states=True, output_attentions=arguments["output_attentions"],
                           training=training)
        maps = (pixel_values,) + tuple(outputs.hidden_states)
        feature_maps = tuple(maps[i] for i in self.out_indices)
        pyramid = {f"P{stride.bit_length() - 1}": feature for stride, feature in zip(self.strides, feature_maps)}
        result = CvtBackboneOutput(feature_maps=feature_maps, pyramid_outputs=pyramid,
                                   attentions=outputs.attentions,
                                   hidden_states=outputs.hidden_states if arguments["output_hidden_states"] else None)
        return result if arguments["return_dict"] else result.to_tuple()


@keras.saving.register_keras_serializable(package="cvt_tf")
class TFCvtForImageClassification(ClassifierFitHooks, TFCvtPreTrainedModel):
    """CvT with the classification head: LayerNorm of the final cls token (or of every final token, then their
    mean, when the last stage has none) and a Dense classifier (identity when num_labels is 0). `compile`/`fit`
    train on a compiled loss or, without one, on the model's own loss (`cvt_tf.training.ClassifierFitHooks`)."""

    with_head = True
    architecture = "CvtForImageClassification"

    def __init__(self, config: CvtConfig, data_format: Optional[str] = None, **kwargs):
        super().__init__(config, data_format=data_format, **kwargs)
        self.layernorm = _layer_norm("layernorm", self.layer_policy)
        if config.num_labels > 0:
            self.classifier = _dense(config, config.num_labels, "classifier", self.layer_policy)
        else:
            self.classifier = keras.layers.Identity(dtype=self.layer_policy, name="classifier")

    def build(self, input_shape=None):
        self.cvt.build(None)
        self.layernorm.build((None, None, self.config.hidden_size))
        self.classifier.build((None, self.config.hidden_size))
        self._quantize_configured_layers()

    def call(self, pixel_values, labels=None, output_hidden_states=None, output_attentions=None,
             return_dict=None, training=False):
        arguments = call_arguments(self.config, pixel_values, labels=labels, output_hidden_states=output_hidden_states,
                                   output_attentions=output_attentions, return_dict=return_dict)
        labels = arguments["labels"]
        outputs = self.cvt(arguments["pixel_values"], output_hidden_states=arguments["output_hidden_states"],
                           output_attentions=arguments["output_attentions"], training=training)
        logits = self.forward_head(self._normalised_tokens(outputs))
        loss = None if labels is None else self.compute_classification_loss(labels, logits)
        result = CvtImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                          attentions=outputs.attentions)
        return result if arguments["return_dict"] else result.to_tuple()

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
            return self.layernorm(outputs.cls_token_value)
        grid = outputs.last_hidden_state
        if self.data_format == "channels_first":
            grid = ops.transpose(grid, (0, 2, 3, 1))
        return self.layernorm(_grid_to_tokens(grid))

    def problem_type_for(self, labels) -> str:
        """`config.problem_type`, or transformers' inference from num_labels and the labels' dtype
        (`cvt_core.training.problem_type_for`)."""
        return problem_type_for(self, "int" in keras.backend.standardize_dtype(labels.dtype))

    def compute_classification_loss(self, labels, logits, sample_weight=None):
        """MSE (regression), softmax cross-entropy ignoring label -100 (single label) or sigmoid BCE (multi label),
        each a mean over the batch, as transformers' PyTorch model computes it, in float32 whatever the logits'
        dtype; class labels outside [0, num_labels) are refused (`cvt_tf.losses.classification_loss`)."""
        if self.config.num_labels == 0:
            raise ValueError("num_labels is 0 (identity head): there are no logits to compute a loss from")
        labels = ops.convert_to_tensor(labels)
        return classification_loss(self.problem_type_for(labels), self.config.num_labels, labels, logits,
                                   sample_weight)
