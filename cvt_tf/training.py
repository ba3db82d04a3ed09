"""Training `TFCvtForImageClassification` with Keras: `compile`/`fit` helpers and `tf.distribute` strategies.

Everything here runs on each Keras backend except the strategies (`split_cpu`, `make_strategy` beyond
"default", `synchronize_batch_norm`'s replica all-reduce), which are TensorFlow's `tf.distribute` and say so
under another backend; on JAX, distribute with `keras.distribution` (e.g. `DataParallel`) instead.

The model itself needs nothing from here: `model.compile(optimizer, loss=..., metrics=[...])` and `model.fit(x, y)`
work as for any Keras model (see `cvt_tf.modeling_cvt`). This module adds what the `cvt train` command and most
fine-tuning scripts want around it:

- `make_strategy`: the default strategy, `MirroredStrategy` (all local devices, or N logical CPU devices made
  with `split_cpu`) or `MultiWorkerMirroredStrategy` (workers described by `TF_CONFIG`);
- `synchronize_batch_norm`: BatchNorm statistics over the global batch of a strategy (the Keras twin of
  `torch.nn.SyncBatchNorm`); without it each replica normalises with its own share of the batch;
- `WarmupCosineSchedule` and `make_optimizer`: AdamW with linear warm-up then cosine decay, no weight decay
  on biases and norm scales, the same schedule as `cvt_torch.training`;
- `ArrayBatches`: NumPy arrays as a `keras.utils.PyDataset`, reshuffled and augmented each epoch exactly as
  `cvt_core.batching.iterate_batches` does for the PyTorch loop;
- `EpochLogger`: one progress line per epoch and a history with wall times; `BatchProgress`: a progress bar;
- `fit`: all of it, the loop `cvt train --framework keras` runs, with the arguments of `cvt_torch.training.fit`
  and the same `cvt_core.training.FitResult` back;
- `ClassifierFitHooks`: the Keras trainer hooks `TFCvtForImageClassification` inherits, which let `compile`/`fit`/
  `evaluate`/`predict` work on its output container and its own loss;
- `block_remat_scope`: build a model inside it to recompute each block's activations in the backward pass
  (Keras' rematerialisation, PyTorch's gradient checkpointing), trading compute for memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import keras
import numpy as np
from keras import ops

from cvt_core.batching import Augmentation, epoch_order, format_epoch, num_batches
from cvt_core.config import CvtConfig
from cvt_core.outputs import CvtImageClassifierOutput
from cvt_core.training import FitResult, check_fit_arguments, training_schedule

from .backend import BACKEND, JAX, TF, tensorflow
from .layers import TorchBatchNormalization, block_name, sublayers

STRATEGIES = ("default", "mirrored", "multi-worker")


# -------------------------------------------------------------------------------------------------- devices, strategies
def split_cpu(count: int) -> List[str]:
    """Split the CPU into `count` logical devices (for MirroredStrategy on one machine, e.g. in tests) and return
    their names. Must run before TensorFlow initialises its devices, i.e. before the first op or device query."""
    tf = tensorflow("split_cpu (logical CPU devices for tf.distribute)")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as exc:
        current = tf.config.list_logical_devices("CPU")
        if len(current) != count:
            raise RuntimeError(f"cannot split the CPU into {count} devices: TensorFlow is already initialised with "
                               f"{len(current)}; split it first thing in the process") from exc
    return [device.name for device in tf.config.list_logical_devices("CPU")]


def set_threads(threads: Optional[int]) -> None:
    """Limit TensorFlow's op thread pools (before TensorFlow initialises; ignored afterwards, and under the other
    backends, which keep their own)."""
    if not threads or not TF:
        return
    tf = tensorflow("set_threads")
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass


class _NoStrategy:
    """The "default" strategy of a backend without tf.distribute: one replica, a scope that does nothing."""

    num_replicas_in_sync = 1

    def scope(self):
        return contextlib.nullcontext()


def make_strategy(kind: str = "default", devices: Optional[List[str]] = None):
    """`default` (no distribution), `mirrored` (one replica per device: `devices`, else every GPU, else the CPU
    devices) or `multi-worker` (`MultiWorkerMirroredStrategy`, one process per worker, configured by the
    `TF_CONFIG` environment variable). The last two are tf.distribute's: TensorFlow backend only."""
    if kind not in STRATEGIES:
        raise ValueError(f"unknown strategy {kind!r}; choose one of {list(STRATEGIES)}")
    if kind == "default" and not TF:
        return _NoStrategy()
    tf = tensorflow(f"strategy {kind!r} (tf.distribute; on JAX use keras.distribution.DataParallel)")
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        if devices is None:
            gpus = tf.config.list_logical_devices("GPU")
            devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    if kind == "multi-worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("the multi-worker strategy reads the cluster from the TF_CONFIG environment variable, "
                             "which is not set")
        return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief() -> bool:
    """Whether this process writes the outputs: always, except the non-chief workers of a multi-worker cluster."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    except json.JSONDecodeError:
        raise ValueError("TF_CONFIG is not valid JSON") from None
    task = config.get("task") or {}
    if not config.get("cluster") or not task:
        return True
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in config["cluster"]


def synchronize_batch_norm(model: keras.Model, enabled: bool = True) -> int:
    """Make every `TorchBatchNormalization` of `model` compute its batch statistics over the global batch of the
    strategy it runs under (or stop it); returns how many layers were changed. Call it before `fit` traces the
    training step (i.e. before the first `fit`, or recompile afterwards)."""
    layers = [layer for layer in sublayers(model) if isinstance(layer, TorchBatchNormalization)]
    for layer in layers:
        layer.synchronized = bool(enabled)
    return len(layers)


# ------------------------------------------------------------------------------------------- the model's trainer hooks
class ClassifierFitHooks:
    """Keras' trainer hooks for `TFCvtForImageClassification` (a mixin before `keras.Model` in its bases).

    `compile(optimizer, loss=..., metrics=...)` then `fit(images, labels)` applies the loss and metrics to the
    logits; `compile(optimizer)` without a loss trains on the model's own loss (transformers' rule), from labels
    given as `y` or inside the input dict `{"pixel_values": ..., "labels": ...}`. `predict` returns the logits
    (float32); calling the model returns the whole output container."""

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
        if self.loss is not None:  # the loss given to compile
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
        replicas = tensorflow("a strategy").distribute.get_strategy().num_replicas_in_sync if TF else 1
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


def block_remat_scope(config: CvtConfig) -> keras.RematScope:
    """`keras.RematScope` that rematerialises every transformer block of a model built inside it: the block's
    activations are recomputed in the backward pass instead of stored (PyTorch's gradient checkpointing) through
    `keras.remat` (TensorFlow's recompute_grad, jax.checkpoint, torch.utils.checkpoint; Keras 3.8 or later). Same
    gradients (tests/test_keras_ecosystem.py, TensorFlow backend), less memory.

        with block_remat_scope(config):
            model = TFCvtForImageClassification(config)
    """
    names = sorted({block_name(index) for depth in config.depth for index in range(depth)})
    return keras.RematScope(mode="list_of_layers", layer_names=names)


# --------------------------------------------------------------------------------------------------------- optimisation
@keras.saving.register_keras_serializable(package="cvt_tf")
class WarmupCosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to `final_fraction * peak` at
    `total_steps` (flat afterwards). Step s (0-based) uses the rate of `cvt_torch.training.warmup_cosine_factor`."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0):
        self.peak, self.total_steps = float(peak), int(total_steps)
        self.warmup_steps, self.final_fraction = int(warmup_steps), float(final_fraction)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = float(self.warmup_steps)
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        warming = (step + 1.0) / max(warmup, 1.0)
        progress = ops.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = self.final_fraction + (1.0 - self.final_fraction) * 0.5 * (1.0 + ops.cos(np.pi * progress))
        return self.peak * ops.where(step < warmup, warming, cosine)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "final_fraction": self.final_fraction}


def make_optimizer(model: keras.Model, learning_rate: float, weight_decay: float, total_steps: int,
                   warmup_steps: int = 0) -> keras.optimizers.Optimizer:
    """AdamW on the warm-up + cosine schedule; biases, norm scales/offsets (every 1-D variable) are not decayed.
    The model must be built."""
    optimizer = keras.optimizers.AdamW(
        learning_rate=WarmupCosineSchedule(learning_rate, total_steps, warmup_steps), weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
    return optimizer


# ----------------------------------------------------------------------------------------------------------------- data
class ArrayBatches(keras.utils.PyDataset):
    """(pixels, labels) NumPy arrays served in global batches, reshuffled every epoch from (seed, epoch) and
    augmented as `cvt_core.batching.iterate_batches` does; pass it to `fit` without `batch_size`."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool = False, seed: int = 0,
                 augmentation: Optional[Augmentation] = None, drop_remainder: bool = False):
        super().__init__()
        self.pixels, self.labels = pixels, np.asarray(labels, np.int64)
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.augmentation, self.drop_remainder = augmentation, bool(drop_remainder)
        self.epoch = 0
        self._order = epoch_order(len(pixels), self.shuffle, self.seed, self.epoch)

    def __len__(self) -> int:
        return num_batches(len(self.pixels), self.batch_size, self.drop_remainder)

    def __getitem__(self, index: int):
        rows = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        batch = self.pixels[rows]
        if self.augmentation is not None and self.augmentation.enabled:
            batch = self.augmentation(batch, np.random.default_rng([self.seed, self.epoch, index, 1]))
        return np.ascontiguousarray(batch, np.float32), self.labels[rows]

    def on_epoch_end(self):
        self.epoch += 1
        self._order = epoch_order(len(self.pixels), self.shuffle, self.seed, self.epoch)


# ------------------------------------------------------------------------------------------------------------- progress
class EpochLogger(keras.callbacks.Callback):
    """Prints `epoch i/n  loss .. acc .. val_loss .. val_acc ..  (t s)` after each epoch through `echo` (nothing
    when `echo` is None) and keeps `history`: one dict per epoch with the metrics, the learning rate and the
    elapsed seconds."""

    def __init__(self, epochs: int, echo: Optional[Callable[[str], None]] = print):
        super().__init__()
        self.epochs, self.echo = epochs, echo
        self.history: List[Dict[str, float]] = []
        self._start = None

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        record = {"epoch": epoch + 1, "seconds": time.perf_counter() - self._start}
        for source, target in (("loss", "train_loss"), ("accuracy", "train_accuracy"), ("val_loss", "val_loss"),
                               ("val_accuracy", "val_accuracy")):
            if source in logs:
                record[target] = float(logs[source])
        schedule = self.model.optimizer.learning_rate if self.model.optimizer is not None else None
        if schedule is not None:
            record["learning_rate"] = float(np.asarray(schedule))
        self.history.append(record)
        if self.echo is not None:
            self.echo(format_epoch(record, self.epochs))


def _backend_version() -> str:
    """"TensorFlow 2.21.0", "JAX 0.10.2", "PyTorch 2.13.0+cpu": the backend the training runs on."""
    import importlib

    module, label = {"tensorflow": ("tensorflow", "TensorFlow"), "jax": ("jax", "JAX"),
                     "torch": ("torch", "PyTorch")}.get(BACKEND, (BACKEND, BACKEND))
    return f"{label} {importlib.import_module(module).__version__}"


def predict_logits(model: keras.Model, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """float32 logits of `model` on NumPy pixels, in inference mode."""
    return np.asarray(model.predict(pixels, batch_size=batch_size, verbose=0), np.float32)



class BatchProgress(keras.callbacks.Callback):
    """Advances a progress bar once per training batch: `progress(iterable, description)` (e.g. a tqdm wrapper)
    wraps `range(steps_per_epoch)` at the start of each epoch, and each finished batch draws its next item."""

    def __init__(self, progress: Callable[[Iterable, str], Iterable], epochs: int, steps_per_epoch: int):
        super().__init__()
        self.progress, self.epochs, self.steps_per_epoch = progress, epochs, steps_per_epoch
        self._bar: Optional[Iterator] = None

    def on_epoch_begin(self, epoch, logs=None):
        self._bar = iter(self.progress(range(self.steps_per_epoch), f"epoch {epoch + 1}/{self.epochs}"))
        next(self._bar, None)  # a wrapping bar counts an item once the next one is asked for

    def on_train_batch_end(self, batch, logs=None):
        next(self._bar, None)

    def on_epoch_end(self, epoch, logs=None):
        for _ in self._bar:  # finish (and close) the bar
            pass


# ------------------------------------------------------------------------------------------------------------------ fit
def fit(build_model: Callable[[], keras.Model], train_pixels: np.ndarray, train_labels: np.ndarray,
        val_pixels: Optional[np.ndarray] = None, val_labels: Optional[np.ndarray] = None, *, epochs: int,
        batch_size: int, learning_rate: float, weight_decay: float = 0.05, warmup_epochs: float = 0.0,
        augmentation: Optional[Augmentation] = None, seed: int = 0, bf16: bool = False, threads: Optional[int] = None,
        sync_batchnorm: bool = False, compile: bool = False, strategy: str = "default",
        cpu_replicas: Optional[int] = None, echo: Optional[Callable[[str], None]] = print,
        progress: Optional[Callable[[Iterable, str], Iterable]] = None) -> FitResult:
    """Train the model `build_model()` returns (built, e.g. with `build_with_dummy_input()`) on NumPy data (NCHW
    pixels, integer labels) with `compile`/`fit`, AdamW on the warm-up + cosine schedule and a sparse categorical
    cross-entropy on the logits: what `cvt train --framework keras` runs, with the arguments of
    `cvt_torch.training.fit`.

    `build_model` is called inside the `strategy` scope (`default`, `mirrored`: every local GPU, else the CPU, or
    `cpu_replicas` logical CPU devices; `multi-worker`: the cluster in TF_CONFIG), under the `mixed_bfloat16` policy
    when `bf16` (the global policy is restored afterwards; variables stay float32) and after
    `keras.utils.set_random_seed(seed)`, because a Keras model takes its distribution, precision and initial weights
    from where it is built. `seed` also draws the batch order and `augmentation` of every epoch; `batch_size` is
    the global batch of all replicas; `warmup_epochs` is rounded to whole steps; `sync_batchnorm` computes BatchNorm
    statistics over the global batch. `threads` (None or 0: TensorFlow's choice) and `cpu_replicas` act only before
    TensorFlow runs its first operation in the process: afterwards the thread pools stay as they are and
    `cpu_replicas` raises RuntimeError. `compile` is PyTorch's torch.compile and must stay False. `echo` gets the
    setup line and one line per epoch, and `progress(range(steps), description)` may show a progress bar per epoch;
    both on the chief only.
    """
    check_fit_arguments(train_pixels, train_labels, val_pixels, val_labels, epochs, batch_size, learning_rate)
    if compile:
        raise ValueError("compile=True is torch.compile, an option of cvt_torch.training.fit; Keras compiles its "
                         "training step itself")
    if cpu_replicas and strategy != "mirrored":
        raise ValueError("cpu_replicas needs strategy='mirrored'")
    devices = split_cpu(cpu_replicas) if cpu_replicas else None
    set_threads(threads)
    distribution = make_strategy(strategy, devices)
    chief = is_chief()
    say = echo if chief else None
    keras.utils.set_random_seed(seed)
    policy_before = keras.mixed_precision.global_policy()
    if bf16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    schedule = training_schedule(len(train_labels), batch_size, epochs, warmup_epochs)
    try:
        with distribution.scope():
            model = build_model()
            if sync_batchnorm:
                synchronize_batch_norm(model)
            model.compile(optimizer=make_optimizer(model, learning_rate, weight_decay, schedule.total_steps,
                                                   schedule.warmup_steps),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        replicas = distribution.num_replicas_in_sync
        if say is not None:
            strategy_name = {"mirrored": "MirroredStrategy", "multi-worker": "MultiWorkerMirroredStrategy"}.get(
                strategy, type(distribution).__name__)
            where = (f"{strategy_name} over {replicas} replicas"
                     + (", synchronised BatchNorm" if sync_batchnorm else "")) if replicas > 1 else "1 replica"
            say(f"training with Keras {keras.__version__} / {_backend_version()} ({where}"
                f"{', mixed_bfloat16' if bf16 else ''}): {epochs} epochs x {schedule.steps_per_epoch} steps, "
                f"global batch {batch_size}")
        batches = ArrayBatches(train_pixels, train_labels, batch_size, shuffle=True, seed=seed,
                               augmentation=augmentation)
        logger = EpochLogger(epochs, echo=say)
        callbacks: List[keras.callbacks.Callback] = [logger]
        if progress is not None and say is not None:
            callbacks.append(BatchProgress(progress, epochs, len(batches)))
        validation = (val_pixels, val_labels) if val_labels is not None and len(val_labels) else None
        started = time.perf_counter()
        model.fit(batches, epochs=epochs, validation_data=validation, validation_batch_size=256,
                  callbacks=callbacks, verbose=0)
        seconds = time.perf_counter() - started
    finally:
        keras.mixed_precision.set_global_policy(policy_before)
    return FitResult(model=model, history=logger.history, seconds=seconds, steps=int(model.optimizer.iterations),
                     is_main=chief, world_size=replicas, threads=threads or None)
