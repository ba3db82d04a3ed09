"""The Keras backend the models run on, and what differs between backends.

The Keras side runs on each Keras 3 backend: `tensorflow` (the default this package selects when `KERAS_BACKEND`
is unset), `jax` and `torch`. Set the backend before Keras is first imported:

    KERAS_BACKEND=jax python train.py

`TF` is the one backend check of the package; the models themselves are `keras.ops`. Under JAX and PyTorch,
TensorFlow is never imported on the model's path (`import cvt_tf`, `from_pretrained`, calling, `fit`, `predict`,
saving and loading); what is TensorFlow's own (SavedModel/LiteRT export, `tf.distribute` strategies) asks
`tensorflow(feature)`, which names the backend it needs. What TensorFlow needs besides `keras.ops`:

- `empty_batch_guard`: TensorFlow's convolutions cannot take an empty batch inside a graph (JAX's and PyTorch's
  can), so inference on one runs on a blank image and cuts every output back to 0 rows;
- `jax_compiled_inference`: calling the model eagerly on JAX would dispatch (and compile, once per shape) every
  operation on its own, tens of seconds for a first call; in inference the encoder runs as one `jax.jit` function
  of the variables' current values instead (Keras' own `predict` and `fit` steps are compiled anyway);
- `MultiWorkerFitFixes`: Keras (3.3 to 3.15.1, keras-team/keras#20585) cannot `fit` under
  `tf.distribute.MultiWorkerMirroredStrategy`: its first step reduces the distributed batch with
  `strategy.reduce`, which that strategy cannot apply to a nested structure, and it averages each step's scalar
  logs with `strategy.reduce("MEAN", value, axis=0)`, which needs an axis. The mixin works around both for that
  strategy only, by overriding the trainer's `_maybe_symbolic_build` (a private method: no public hook exists;
  under a Keras that no longer calls it, the override is simply unused) and its public `train_step`/`test_step`.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

BACKEND: str = keras.backend.backend()
TF: bool = BACKEND == "tensorflow"
JAX: bool = BACKEND == "jax"
TORCH: bool = BACKEND == "torch"


def tensorflow(feature: str):
    """The `tensorflow` module, for `feature`, which only Keras' TensorFlow backend has. Raises one RuntimeError
    naming the backend needed when the process runs another one."""
    if not TF:
        raise RuntimeError(f"{feature} needs Keras' TensorFlow backend: set KERAS_BACKEND=tensorflow before keras is "
                           f"imported (this process runs the {BACKEND} backend)")
    import tensorflow as tf

    return tf


class _EmptyBatchGuard:
    """Inference on an empty batch, which TensorFlow's convolutions cannot take (they fail inside the graph): the
    encoder runs on one blank image instead and every output is cut back to the batch's 0 rows, as PyTorch returns
    them. With a batch size known only when the graph runs, the swap is a `tf.cond` and the cut a slice to the
    batch size, which TensorFlow forwards without a copy when it covers the whole tensor."""

    def __init__(self, images):
        tf = tensorflow("the empty-batch guard")
        size = tf.shape(images)[0]
        blank = tf.zeros(tf.concat([[1], tf.shape(images)[1:]], axis=0), images.dtype)
        if images.shape[0] == 0:
            self.input, self.size = blank, 0
        else:
            self.input = tf.cond(size > 0, lambda: images, lambda: blank)
            self.size = size

    def restore(self, tensor):
        return tensor if tensor is None else tensor[:self.size]


def empty_batch_guard(images):
    """None when no guard is needed (another backend, or a batch known to be non-empty), else the guard: run the
    encoder on `guard.input` and map `guard.restore` over its outputs."""
    if not TF:
        return None
    size = images.shape[0]
    return None if size is not None and size > 0 else _EmptyBatchGuard(images)


def jax_compiled_inference(layer, inputs, **options):
    """`layer(inputs, training=False, **options)` on JAX as one `jax.jit` function of the layer's current variable
    values and `inputs` (one compile per input shape, dtype and set of `options`, which must be hashable), or None
    where that does not apply: another backend, an unbuilt layer, or inputs that are tracers (inside Keras' own
    compiled steps and shape inference). The values are passed on every call, so the function always sees the
    current weights."""
    if not (JAX and layer.built):
        return None
    import jax

    if isinstance(inputs, jax.core.Tracer):
        return None
    functions = layer.__dict__.get("_jax_compiled_inference")
    if functions is None:
        functions = {}
        object.__setattr__(layer, "_jax_compiled_inference", functions)  # a plain attribute, not tracked by Keras
    key = tuple(sorted(options.items()))
    function = functions.get(key)
    if function is None:
        def run(trainable, non_trainable, values):
            return layer.stateless_call(trainable, non_trainable, values, training=False, **options)[0]

        function = functions[key] = jax.jit(run)
    return function([v.value for v in layer.trainable_variables], [v.value for v in layer.non_trainable_variables],
                    inputs)


class MultiWorkerFitFixes:
    """Mixin (before `keras.Model`) that lets `fit`/`evaluate` run under `MultiWorkerMirroredStrategy`; see the
    module docstring. Changes nothing under any other strategy or backend."""

    def _in_multi_worker_strategy(self) -> bool:
        if not TF:
            return False
        import tensorflow as tf

        return isinstance(getattr(self, "distribute_strategy", None), tf.distribute.MultiWorkerMirroredStrategy)

    def _step_logs(self, logs):
        if not self._in_multi_worker_strategy():
            return logs
        import tensorflow as tf

        return keras.tree.map_structure(
            lambda value: tf.reshape(value, [1]) if tf.is_tensor(value) and value.shape.rank == 0 else value, logs)

    def train_step(self, *args, **kwargs):
        return self._step_logs(super().train_step(*args, **kwargs))

    def test_step(self, *args, **kwargs):
        return self._step_logs(super().test_step(*args, **kwargs))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # The build only needs shapes: take this worker's first replica's batch instead of reducing it.
        if iterator is None or not self._in_multi_worker_strategy():
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        import tensorflow as tf

        strategy = self.distribute_strategy
        for _, _, batches in iterator:
            data_batch = keras.tree.map_structure(
                lambda value: (strategy.experimental_local_results(value)[0]
                               if isinstance(value, tf.distribute.DistributedValues) else value),
                next(batches))
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)
