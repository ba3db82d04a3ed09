"""Generic Keras 3 layers that reproduce PyTorch operators exactly, for porting PyTorch models.

- `TorchBatchNormalization`: BatchNormalization whose training step updates the moving variance with the unbiased
  batch variance, as `torch.nn.BatchNorm2d` does (Keras uses the biased one), optionally synchronised across the
  replicas of a `tf.distribute` strategy as `torch.nn.SyncBatchNorm` is.
- `GroupedDepthwiseConv2D`: a depthwise convolution that stores its kernel as `Conv2D(groups=C)` does,
  (kh, kw, 1, C), the layout of PyTorch's depthwise weight after transposition, but runs `depthwise_conv`: the
  backend's depthwise kernel (on TensorFlow much faster than its grouped convolution), on JAX strided slices.
- `CeilModeAveragePooling2D`: `torch.nn.AvgPool2d(kernel, stride, padding, ceil_mode=True,
  count_include_pad=True)` for channels-last tensors.

`sublayers(layer)` walks a layer tree through public attributes (Keras lists a model's direct layers only), and
`truncated_normal(stddev)` is the kernels' initializer (transformers' and PyTorch's truncated normal).

All layers work on channels-last (NHWC) tensors, on every Keras backend (`keras.ops`); the replica all-reduce
of `synchronized` BatchNorm and the pooling of images whose size is known only when the graph runs are
TensorFlow's (`cvt_tf.backend.TF`). Under JAX, `keras.distribution` shards the batch of one program, whose batch
statistics are already those of the global batch.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
from keras import ops

from cvt_core.shapes import avg_pool_ceil_extra_padding, avg_pool_ceil_window_counts

from .backend import JAX, TF, TORCH

if TF:
    import tensorflow as tf


_RANDOM_INITIALIZATION_SKIPPED: list = []  # non-empty inside `random_initialization_skipped()`


@contextlib.contextmanager
def random_initialization_skipped():
    """Layers built in this block start their kernels at zero (`truncated_normal` gives Zeros): for a model whose
    every weight is overwritten right after, where drawing millions of random numbers costs seconds for nothing."""
    _RANDOM_INITIALIZATION_SKIPPED.append(True)
    try:
        yield
    finally:
        _RANDOM_INITIALIZATION_SKIPPED.pop()


def truncated_normal(stddev: float) -> keras.initializers.Initializer:
    """Keras' TruncatedNormal(0, stddev) (values beyond 2 stddev redrawn); on JAX drawn on the host instead."""
    if _RANDOM_INITIALIZATION_SKIPPED:
        return keras.initializers.Zeros()
    if JAX:
        return _HostTruncatedNormal(stddev=stddev)
    return keras.initializers.TruncatedNormal(mean=0.0, stddev=stddev)


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


def public_attributes(layer: keras.layers.Layer) -> dict:
    """{name: value} of a layer's public attributes, its sub-layers included (on the torch backend every Keras layer
    is a torch module, and torch keeps sub-modules in its own registry, `named_children`, not in `__dict__`)."""
    attributes = {name: value for name, value in vars(layer).items() if not name.startswith("_")}
    if TORCH:
        attributes.update((name, child) for name, child in layer.named_children() if not name.startswith("_"))
    return attributes


def sublayers(layer: keras.layers.Layer):
    """Every layer below `layer`, depth first, found through its public attributes that hold a layer or a list of
    layers (each block's sub-blocks, and the Keras layers inside them)."""
    for value in public_attributes(layer).values():
        for child in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(child, keras.layers.Layer):
                yield child
                yield from sublayers(child)


def depthwise_conv(inputs, kernel, strides=(1, 1), dilation_rate=(1, 1)):
    """'valid' depthwise convolution of NHWC `inputs` with `kernel` (kh, kw, C, 1), as `keras.ops.depthwise_conv`.

    On JAX it is computed as the sum of kh * kw strided slices of the input, each times one tap of the kernel,
    which XLA fuses into one loop: XLA's CPU grouped convolution is 50-100x slower on CvT's 3x3 projections
    (measured: 185 ms against 2 ms for a (8, 58, 58, 64) input), and that difference was most of the model's time.
    """
    if not JAX:
        return ops.depthwise_conv(inputs, kernel, strides=strides, padding="valid", dilation_rate=dilation_rate,
                                  data_format="channels_last")
    (kh, kw), (sh, sw), (dh, dw) = kernel.shape[:2], strides, dilation_rate
    out_h = (inputs.shape[1] - (kh - 1) * dh - 1) // sh + 1
    out_w = (inputs.shape[2] - (kw - 1) * dw - 1) // sw + 1
    outputs = None
    for i in range(kh):
        for j in range(kw):
            tap = inputs[:, i * dh:i * dh + (out_h - 1) * sh + 1:sh, j * dw:j * dw + (out_w - 1) * sw + 1:sw, :]
            tap = tap * kernel[i, j, :, 0]
            outputs = tap if outputs is None else outputs + tap
    return outputs


@keras.saving.register_keras_serializable(package="cvt_tf")
class TorchBatchNormalization(keras.layers.BatchNormalization):
    """`BatchNormalization` with PyTorch's training semantics and defaults (momentum 0.9 = torch 0.1, eps 1e-5).

    In training, inputs are normalised with the biased batch variance and the moving variance is updated with the
    unbiased one, var * n / (n - 1) with n = number of values per channel. Inference is Keras' unchanged.

    `synchronized=True` (settable after construction too) computes the batch statistics over the global batch of
    a `tf.distribute` strategy (MirroredStrategy, MultiWorkerMirroredStrategy), as `torch.nn.SyncBatchNorm` does:
    the replicas all-reduce their sums (a two-pass mean and variance) and the counts, gradients flow through the
    all-reduce, and every replica applies the same moving-statistics update. Outside a multi-replica strategy it
    changes nothing (under JAX's `keras.distribution.DataParallel` the statistics are the global batch's anyway).
    Masks and renorm are not supported.
    """

    def __init__(self, momentum: float = 0.9, epsilon: float = 1e-5, **kwargs):
        if kwargs.get("renorm"):
            raise ValueError("TorchBatchNormalization does not support renorm=True")
        super().__init__(momentum=momentum, epsilon=epsilon, **kwargs)

    def _batch_moments(self, inputs, reduction_axes, dtype):
        """(mean, biased variance, number of values per channel) of this replica's batch, or of the global
        batch when synchronized across the replicas of a strategy."""
        shape = ops.shape(inputs)
        count = ops.cast(ops.prod(ops.stack([shape[a] for a in reduction_axes])), dtype)
        context = tf.distribute.get_replica_context() if TF else None
        if not (self.synchronized and context is not None and context.num_replicas_in_sync > 1):
            mean, variance = ops.moments(inputs, axes=reduction_axes, synchronized=False)
            return mean, variance, count
        local_sum = tf.reduce_sum(inputs, axis=reduction_axes)
        total_sum, total_count = context.all_reduce(tf.distribute.ReduceOp.SUM, [local_sum, count])
        mean = total_sum / total_count
        squared_deviation = tf.reduce_sum(tf.square(inputs - mean), axis=reduction_axes)
        variance = context.all_reduce(tf.distribute.ReduceOp.SUM, squared_deviation) / total_count
        return mean, variance, total_count

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            raise ValueError("TorchBatchNormalization does not support masks")
        if not (training and self.trainable):
            return super().call(inputs, training=False)
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        inputs = ops.cast(inputs, compute_dtype)
        reduction_axes = [i for i in range(len(inputs.shape)) if i != self.axis % len(inputs.shape)]
        mean, variance, count = self._batch_moments(inputs, reduction_axes, compute_dtype)
        # torch raises for a single value per channel; here the correction is skipped instead (n / max(n-1, 1)).
        unbiased_variance = variance * count / ops.maximum(count - 1.0, 1.0)
        momentum = self.momentum
        self.moving_mean.assign(
            ops.cast(self.moving_mean, compute_dtype) * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(
            ops.cast(self.moving_variance, compute_dtype) * momentum + unbiased_variance * (1.0 - momentum))
        gamma = ops.cast(self.gamma, compute_dtype) if self.scale else None
        beta = ops.cast(self.beta, compute_dtype) if self.center else None
        outputs = ops.batch_normalization(
            x=inputs, mean=mean, variance=variance, axis=self.axis, offset=beta, scale=gamma, epsilon=self.epsilon)
        return ops.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="cvt_tf")
class GroupedDepthwiseConv2D(keras.layers.Conv2D):
    """Depthwise `Conv2D(filters=C, groups=C)`: kernel (kh, kw, 1, C), computed with a depthwise kernel.

    TensorFlow's CPU grouped convolution is tens of times slower than its depthwise convolution; the two give the
    same result, and the stored kernel keeps the `groups=C` layout so weights stay interchangeable.
    Channels-last only.
    """

    def __init__(self, filters: int, kernel_size, **kwargs):
        kwargs.pop("groups", None)
        if kwargs.get("data_format", "channels_last") != "channels_last":
            raise ValueError("GroupedDepthwiseConv2D supports data_format='channels_last' only")
        super().__init__(filters=filters, kernel_size=kernel_size, groups=filters, **kwargs)

    def convolution_op(self, inputs, kernel):
        kh, kw = self.kernel_size
        depthwise_kernel = ops.reshape(kernel, (kh, kw, self.filters, 1))
        if self.padding == "valid":
            return depthwise_conv(inputs, depthwise_kernel, self.strides, self.dilation_rate)
        return ops.depthwise_conv(
            inputs, depthwise_kernel, strides=self.strides, padding=self.padding,
            dilation_rate=self.dilation_rate, data_format="channels_last")

    def get_config(self):
        config = super().get_config()
        config.pop("groups", None)
        return config


@keras.saving.register_keras_serializable(package="cvt_tf")
class CeilModeAveragePooling2D(keras.layers.Layer):
    """PyTorch's `AvgPool2d(kernel, stride, padding, ceil_mode=True, count_include_pad=True)`, channels-last.

    Zero-pad symmetrically, add the zeros a ceil-mode window needs at the bottom/right, average with a 'valid'
    window, then rescale each output so it is divided by the cells of its window that lie inside the symmetrically
    padded input (padding counts, the ceil-mode overhang does not). Static spatial sizes use the integer rules of
    `cvt_core.shapes`; unknown ones compute the same divisor by pooling a mask.
    """

    def __init__(self, pool_size: int, strides: int, padding: int, **kwargs):
        super().__init__(**kwargs)
        self.pool_size, self.strides, self.padding = int(pool_size), int(strides), int(padding)

    def call(self, inputs):
        k, s, p = self.pool_size, self.strides, self.padding
        height, width = inputs.shape[1], inputs.shape[2]
        if height is None or width is None:  # only TensorFlow graphs leave sizes unknown until they run
            return self._dynamic_call(inputs)
        extra_h = avg_pool_ceil_extra_padding(height, k, s, p)
        extra_w = avg_pool_ceil_extra_padding(width, k, s, p)
        padded = ops.pad(inputs, [[0, 0], [p, p + extra_h], [p, p + extra_w], [0, 0]])
        averaged = ops.average_pool(padded, k, s, "valid", data_format="channels_last")
        counts = np.outer(avg_pool_ceil_window_counts(height, k, s, p), avg_pool_ceil_window_counts(width, k, s, p))
        rescale = (k * k) / counts.astype(np.float64)
        return averaged * ops.convert_to_tensor(rescale[None, :, :, None], dtype=averaged.dtype)

    def _dynamic_call(self, inputs):
        k, s, p = self.pool_size, self.strides, self.padding
        dynamic = tf.shape(inputs)
        extra_h = self._dynamic_extra_padding(dynamic[1])
        extra_w = self._dynamic_extra_padding(dynamic[2])
        paddings = [[0, 0], [p, p], [p, p], [0, 0]]
        ceil_paddings = [[0, 0], [0, extra_h], [0, extra_w], [0, 0]]
        padded = tf.pad(tf.pad(inputs, paddings), ceil_paddings)
        inside = tf.pad(tf.pad(tf.ones_like(inputs[..., :1]), paddings, constant_values=1.0), ceil_paddings)
        return tf.nn.avg_pool2d(padded, k, s, "VALID") / tf.nn.avg_pool2d(inside, k, s, "VALID")

    def _dynamic_extra_padding(self, size):
        # tensor version of cvt_core.shapes.avg_pool_ceil_extra_padding
        k, s, p = self.pool_size, self.strides, self.padding
        out = -((-(size + 2 * p - k)) // s) + 1
        out = tf.where((out - 1) * s >= size + p, out - 1, out)
        return tf.maximum(0, (out - 1) * s + k - (size + 2 * p))

    def compute_output_shape(self, input_shape):
        from cvt_core.shapes import avg_pool_ceil_output_size

        def side(n):
            return None if n is None else avg_pool_ceil_output_size(n, self.pool_size, self.strides, self.padding)

        return (input_shape[0], side(input_shape[1]), side(input_shape[2]), input_shape[3])

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size, "strides": self.strides, "padding": self.padding}


def block_name(index: int) -> str:
    """The Keras layer name of a stage's block `index` (transformers' `layers.<index>`, "." being "_")."""
    return f"layers_{index}"
