"""What both frameworks' `fit` (`cvt_torch.training.fit`, `cvt_tf.training.fit`) share, in NumPy terms: the checks
of their data and settings, the step counts of the warm-up + cosine schedule, `FitResult`, what either returns, and
how the models' own loss announces the problem type it infers.

    schedule = training_schedule(num_samples=1437, batch_size=64, epochs=15, warmup_epochs=1.0)
    schedule.steps_per_epoch, schedule.total_steps, schedule.warmup_steps      # 23, 345, 23
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional

import numpy as np

from .batching import num_batches

logger = logging.getLogger("cvt")


def announce_inferred_problem_type(model: Any, problem_type: str) -> None:
    """Say, once per model and pick, which loss a model's own loss picked when `config.problem_type` is unset
    (transformers' inference from num_labels and the labels' dtype): logged at INFO level, and a UserWarning for
    multi-label, the pick that one-hot single-label targets fall into."""
    if model.__dict__.get("_announced_problem_type") == problem_type:
        return
    # a plain attribute, past nn.Module's and Keras' attribute tracking
    object.__setattr__(model, "_announced_problem_type", problem_type)
    model_name, num_labels = type(model).__name__, model.config.num_labels
    logger.info("%s: config.problem_type is unset; training with %s (inferred from num_labels=%d and the labels' "
                "dtype, as transformers does)", model_name, problem_type, num_labels)
    if problem_type == "multi_label_classification":
        warnings.warn(f"{model_name}: config.problem_type is unset and the labels are floats, so the model's own loss "
                      f"is multi-label sigmoid BCE over {num_labels} outputs (transformers' rule). For one-hot "
                      f"single-label targets pass integer class ids, or set config.problem_type="
                      f"'single_label_classification'; setting config.problem_type also silences this",
                      UserWarning, stacklevel=5)


def problem_type_for(model: Any, integer_labels: bool) -> str:
    """The loss a classifier's own loss computes: `config.problem_type`, or else transformers' inference for this
    call only (the config is not changed): one label -> regression; integer class ids -> single-label
    classification; float (or boolean) labels -> multi-label. An inferred pick is announced once per model
    (`announce_inferred_problem_type`)."""
    config = model.config
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        problem_type = "regression"
    elif integer_labels:
        problem_type = "single_label_classification"
    else:
        problem_type = "multi_label_classification"
    announce_inferred_problem_type(model, problem_type)
    return problem_type


class TrainingSchedule(NamedTuple):
    """Optimizer steps of a run: per epoch, in all, and those of the linear warm-up before the cosine decay."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def training_schedule(num_samples: int, batch_size: int, epochs: int, warmup_epochs: float) -> TrainingSchedule:
    """The schedule of `epochs` passes over `num_samples` in global batches of `batch_size` (a short last batch
    counts as a step). The warm-up is `warmup_epochs` rounded to whole steps, leaving at least the last step to the
    decay."""
    steps_per_epoch = num_batches(num_samples, batch_size)
    total = steps_per_epoch * epochs
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), max(total - 1, 0))
    return TrainingSchedule(steps_per_epoch, total, warmup)


def check_fit_arguments(train_pixels: np.ndarray, train_labels: np.ndarray, val_pixels: Optional[np.ndarray],
                        val_labels: Optional[np.ndarray], epochs: int, batch_size: int, learning_rate: float) -> None:
    """Raise ValueError (one line) for data or settings that `fit` cannot train on, before any work starts."""
    if np.ndim(train_pixels) != 4:
        raise ValueError(f"train_pixels must be a batch of NCHW images (4 dimensions), got shape "
                         f"{np.shape(train_pixels)}")
    if len(train_pixels) == 0:
        raise ValueError("train_pixels holds no images; fit needs at least one training image")
    if len(train_pixels) != len(train_labels):
        raise ValueError(f"train_pixels has {len(train_pixels)} images but train_labels {len(train_labels)} labels")
    if (val_pixels is None) != (val_labels is None):
        raise ValueError("pass val_pixels and val_labels together (or neither)")
    if val_pixels is not None and len(val_pixels) != len(val_labels):
        raise ValueError(f"val_pixels has {len(val_pixels)} images but val_labels {len(val_labels)} labels")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")


@dataclass
class FitResult:
    """What `fit` returns, in either framework.

    `model` is the trained model itself (in PyTorch without its DistributedDataParallel / torch.compile
    wrappers). `history` has one record per epoch with `epoch`, `train_loss`, `train_accuracy`, `learning_rate`,
    `seconds` (since training began) and, where validation data was given and this process evaluates it,
    `val_loss` and `val_accuracy`. `seconds` is the time of the whole training loop, `steps` the optimizer steps
    taken, `world_size` the processes (PyTorch) or replicas (Keras) that trained together, `is_main` whether this
    process is the one that saves and reports, `threads` the CPU threads used per process (None: the framework's
    choice)."""

    model: Any
    history: List[Dict[str, float]]
    seconds: float
    steps: int
    is_main: bool
    world_size: int
    threads: Optional[int]

    @property
    def final(self) -> Dict[str, float]:
        """The last epoch's record."""
        return self.history[-1]

    @property
    def train_loss(self) -> float:
        return self.final["train_loss"]

    @property
    def train_accuracy(self) -> float:
        return self.final["train_accuracy"]

    @property
    def val_loss(self) -> Optional[float]:
        return self.final.get("val_loss")

    @property
    def val_accuracy(self) -> Optional[float]:
        return self.final.get("val_accuracy")
