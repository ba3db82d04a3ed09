"""The classification loss of `TFCvtForImageClassification`, as transformers' PyTorch model computes it, and the
check that refuses class labels outside [0, num_labels) on every backend, eagerly and inside compiled steps.

`TFCvtForImageClassification.compute_classification_loss` and `fit` without a compiled loss use it
(`cvt_tf.training.ClassifierFitHooks`).
"""

from __future__ import annotations

import numpy as np
from keras import ops

from .backend import JAX, TF

if TF:
    import tensorflow as tf

IGNORED_LABEL = -100  # torch CrossEntropyLoss's default ignore_index


def classification_loss(problem_type: str, num_labels: int, labels, logits, sample_weight=None):
    """MSE (`regression`), softmax cross-entropy ignoring label -100 (`single_label_classification`) or sigmoid BCE
    (`multi_label_classification`), each a mean over the batch, computed in float32 whatever the logits' dtype
    (mixed precision). With `sample_weight` the loss is sum(w * loss) / n over the n samples that count (label -100
    does not), 0 when none does: how Keras reduces its compiled losses (`sum_over_batch_size`), so
    `compile(loss=...)` and the model's own loss weigh samples alike."""
    labels = ops.convert_to_tensor(labels)
    logits = ops.cast(logits, "float32")
    if problem_type == "regression":
        labels = ops.cast(labels, logits.dtype)
        if num_labels == 1:
            per_sample = ops.square(ops.reshape(logits, [-1]) - ops.reshape(labels, [-1]))
        else:
            per_sample = ops.mean(ops.square(logits - labels), axis=-1)
        valid = ops.ones_like(per_sample)
    elif problem_type == "single_label_classification":
        labels = ops.reshape(ops.cast(labels, "int32"), [-1])
        logits = ops.reshape(logits, (-1, num_labels))
        valid = ops.not_equal(labels, IGNORED_LABEL)
        labels = checked_class_indices(labels, valid, num_labels)
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


def checked_class_indices(labels, valid, num_labels: int):
    """`labels`, refused unless each `valid` one is a class index in [0, num_labels): a ValueError eagerly, an
    assertion with the same message inside a TensorFlow graph (`fit`) and an error raised from inside a compiled
    JAX step, before the cross-entropy (which on CPU fails with TensorFlow's own message, on GPU silently gives
    NaN, and on JAX silently gives a wrong loss)."""
    bad = ops.logical_and(valid, ops.logical_or(labels < 0, labels >= num_labels))
    message = f"labels must be class indices in [0, num_labels={num_labels}); got"
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
