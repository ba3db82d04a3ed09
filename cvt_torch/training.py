"""Training `CvtForImageClassification` in PyTorch: loop helpers, DistributedDataParallel under `torchrun`,
synchronised BatchNorm, bf16 autocast and `torch.compile`.

The model needs nothing from here: it is an ordinary `nn.Module` whose `forward(pixel_values, labels)` returns
`.loss` and `.logits`, so any training loop works. `fit` is the whole loop `cvt train --framework torch` runs (the
same arguments as `cvt_tf.training.fit`, the same `cvt_core.training.FitResult` back):

    result = fit(lambda: CvtForImageClassification(config), train_pixels, train_labels, val_pixels, val_labels,
                 epochs=15, batch_size=64, learning_rate=2e-3, warmup_epochs=1.0)
    result.model.save_pretrained("out")               # result.history: one record per epoch

and here it is in pieces:

    context = init_distributed()                      # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK (or none)
    model = CvtForImageClassification(config)
    runner = prepare_model(model, context, sync_batchnorm=True, compile=False)   # DDP when WORLD_SIZE > 1
    optimizer = make_optimizer(model, learning_rate=2e-3, weight_decay=0.05)
    scheduler = make_scheduler(optimizer, total_steps, warmup_steps)
    for x, y in iterate_batches(..., rank=context.rank, world_size=context.world_size):
        loss, correct = train_step(runner, optimizer, x, y, scheduler, autocast_dtype=torch.bfloat16)
    unwrap(runner).save_pretrained("out")            # BatchNorm running statistics included

Launched by `torchrun --nproc_per_node N` (as in `torchrun --nproc_per_node N -m cvt_cli train ...`), `fit` trains
with DistributedDataParallel over the N processes.

Synchronised BatchNorm: `torch.nn.SyncBatchNorm` runs only on GPUs; on the CPU (gloo) `convert_sync_batchnorm`
puts in `DistributedBatchNorm2d`, which computes the same global-batch statistics with differentiable
all-reduces. Both keep the state_dict names, so `save_pretrained` writes an ordinary checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cvt_core.batching import Augmentation, format_epoch, iterate_batches
from cvt_core.training import FitResult, check_fit_arguments, training_schedule

from .losses import check_class_labels
from .optimize import uses_training_kernels


# --------------------------------------------------------------------------------------------------- distributed set-up
@dataclass
class DistributedContext:
    """Where this process stands in a run: rank, world size, its device, and whether it writes the outputs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(backend: Optional[str] = None, timeout_s: float = 300.0) -> DistributedContext:
    """Join the process group that `torchrun` describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); without those variables, a single-process context. `backend` defaults to nccl
    with CUDA, else gloo."""
    if not launched_by_torchrun():
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return DistributedContext(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        import datetime

        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistributedContext(rank, world_size, local_rank, device, backend)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------------------------- synchronised BatchNorm
class DistributedBatchNorm2d(nn.BatchNorm2d):
    """`BatchNorm2d` whose training statistics cover the global batch of all processes, on any device.

    Mean and variance are two-pass: all-reduce of (sum, count), then of the summed squared deviations. The
    all-reduces are autograd-aware, so each process's gradient includes the other processes' terms, exactly as
    `torch.nn.SyncBatchNorm` computes them; the running variance is updated with the unbiased global variance.
    Outside an initialised process group (or in eval mode) it is a plain `BatchNorm2d`.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(input)
        dims = [0, 2, 3]
        values = input.float()
        local_sum = values.sum(dim=dims)
        local_count = torch.full_like(local_sum[:1], values.numel() / values.shape[1])
        totals = all_reduce(torch.cat([local_sum, local_count]))
        total_sum, count = totals[:-1], totals[-1]
        mean = total_sum / count
        centred = values - mean[None, :, None, None]
        variance = all_reduce(centred.square().sum(dim=dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.num_batches_tracked.add_(1)
                unbiased = variance * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        output = centred * torch.rsqrt(variance + self.eps)[None, :, None, None]
        if self.affine:
            output = output * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return output.to(input.dtype)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every `BatchNorm2d` of `model` synchronised across processes: `torch.nn.SyncBatchNorm` when the model's
    parameters sit on a GPU, `DistributedBatchNorm2d` otherwise (SyncBatchNorm refuses CPU tensors). Parameters
    and buffers are kept (same objects), so the state_dict is unchanged. Returns the model (changed in place
    unless the root itself is a BatchNorm)."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, DistributedBatchNorm2d):
            replacement = DistributedBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                                 module.track_running_stats)
            if module.affine:
                replacement.weight, replacement.bias = module.weight, module.bias
            replacement.running_mean, replacement.running_var = module.running_mean, module.running_var
            replacement.num_batches_tracked = module.num_batches_tracked
            replacement.train(module.training)
            return replacement
        for name, child in module.named_children():
            setattr(module, name, convert(child))
        return module

    return convert(model)


# ------------------------------------------------------------------------------------------------------- model wrapping
def prepare_model(model: nn.Module, context: Optional[DistributedContext] = None, sync_batchnorm: bool = False,
                  compile: bool = False, compile_backend: str = "inductor") -> nn.Module:
    """Move `model` to the context's device and return what the loop should call: the model itself, wrapped in
    `DistributedDataParallel` when the run has several processes (with synchronised BatchNorm if asked), then
    `torch.compile`d if asked. `unwrap(result)` gives `model` back for saving."""
    context = context or DistributedContext()
    model.to(context.device)
    runner: nn.Module = model
    if context.distributed:
        if sync_batchnorm:
            convert_sync_batchnorm(model)
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        runner = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if compile:
        runner = torch.compile(runner, backend=compile_backend)
    return runner


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside `torch.compile` and `DistributedDataParallel` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# --------------------------------------------------------------------------------------------------------- optimisation
def parameter_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """AdamW groups: weight decay on matrices, kernels and the cls token; none on biases and norm parameters
    (every 1-D tensor), as `cvt_tf.training.make_optimizer` does."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameter_groups(unwrap(model), weight_decay), lr=learning_rate)


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0) -> float:
    """Learning-rate multiplier of optimizer step `step` (0-based): linear warm-up (step + 1) / warmup_steps, then
    cosine decay to `final_fraction` at `total_steps`; equal to `cvt_tf.training.WarmupCosineSchedule`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0):
    """`LambdaLR` on `warmup_cosine_factor`; call `scheduler.step()` after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup_steps))


# ---------------------------------------------------------------------------------------------------------------- steps
def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _device_of(model: nn.Module) -> torch.device:
    return next(unwrap(model).parameters()).device


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, pixel_values, labels, scheduler=None,
               autocast_dtype: Optional[torch.dtype] = None, max_grad_norm: Optional[float] = None
               ) -> Tuple[float, int]:
    """One optimizer step on a batch (NumPy or tensors); returns (loss, number of correct top-1 predictions) of this
    process's batch. The loss is computed in float32 from the logits, also under bf16 autocast."""
    device = _device_of(model)
    pixel_values = torch.as_tensor(pixel_values, device=device)
    labels = torch.as_tensor(labels, device=device)
    model.train()
    with _autocast(device, autocast_dtype):
        logits = model(pixel_values).logits
    check_class_labels(labels, logits.shape[-1])
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    correct = int((logits.detach().argmax(-1) == labels).sum())
    return float(loss.detach()), correct


@torch.no_grad()
def predict_logits(model: nn.Module, pixel_values: np.ndarray, batch_size: int = 256,
                   autocast_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """float32 logits of the (unwrapped) model in eval mode; the model's train/eval mode is restored after."""
    plain = unwrap(model)
    was_training = plain.training
    plain.eval()
    device = _device_of(plain)
    out = []
    try:
        for start in range(0, len(pixel_values), batch_size):
            batch = torch.as_tensor(np.ascontiguousarray(pixel_values[start:start + batch_size]), device=device)
            with _autocast(device, autocast_dtype):
                out.append(plain(batch).logits.float().cpu().numpy())
    finally:
        plain.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, plain.config.num_labels), np.float32)


def cross_entropy_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> Tuple[float, float]:
    """Mean softmax cross-entropy and top-1 accuracy of NumPy logits (float64 arithmetic)."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    return loss, float((logits.argmax(1) == labels).mean())


def _all_reduce_sums(context: DistributedContext, *values: float) -> List[float]:
    if not context.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def train_classifier(runner: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                     batches: Callable[[int], Iterable[Tuple[np.ndarray, np.ndarray]]], epochs: int,
                     context: Optional[DistributedContext] = None,
                     validation: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                     autocast_dtype: Optional[torch.dtype] = None, echo: Optional[Callable[[str], None]] = print,
                     progress: Optional[Callable[[Iterable, str], Iterable]] = None) -> List[Dict[str, float]]:
    """The epoch loop: `batches(epoch)` yields this process's (pixels, labels); after each epoch the training loss
    and accuracy are averaged over all processes and, on the main process, the validation set is evaluated.
    Returns one record per epoch (the history `cvt train` plots and reports); `echo` prints one line per epoch
    on the main process."""
    context = context or DistributedContext()
    history: List[Dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        loss_sum = correct = seen = 0.0
        iterator = batches(epoch)
        if progress is not None and context.is_main:
            iterator = progress(iterator, f"epoch {epoch + 1}/{epochs}")
        for pixel_values, labels in iterator:
            loss, batch_correct = train_step(runner, optimizer, pixel_values, labels, scheduler, autocast_dtype)
            loss_sum += loss * len(labels)
            correct += batch_correct
            seen += len(labels)
        loss_sum, correct, seen = _all_reduce_sums(context, loss_sum, correct, seen)
        record: Dict[str, float] = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                                    "train_accuracy": correct / max(seen, 1),
                                    "learning_rate": optimizer.param_groups[0]["lr"]}
        if validation is not None and context.is_main and len(validation[1]):
            logits = predict_logits(runner, validation[0], autocast_dtype=autocast_dtype)
            record["val_loss"], record["val_accuracy"] = cross_entropy_and_accuracy(logits, validation[1])
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        if echo is not None and context.is_main:
            echo(format_epoch(record, epochs))
    return history



# ------------------------------------------------------------------------------------------------------------------ fit
def fit(build_model: Callable[[], nn.Module], train_pixels: np.ndarray, train_labels: np.ndarray,
        val_pixels: Optional[np.ndarray] = None, val_labels: Optional[np.ndarray] = None, *, epochs: int,
        batch_size: int, learning_rate: float, weight_decay: float = 0.05, warmup_epochs: float = 0.0,
        augmentation: Optional[Augmentation] = None, seed: int = 0, bf16: bool = False, threads: Optional[int] = None,
        sync_batchnorm: bool = False, compile: bool = False, strategy: str = "default",
        cpu_replicas: Optional[int] = None, echo: Optional[Callable[[str], None]] = print,
        progress: Optional[Callable[[Iterable, str], Iterable]] = None) -> FitResult:
    """Train the model `build_model()` returns on NumPy data (NCHW pixels, integer labels) with AdamW on the
    warm-up + cosine schedule, the loop `cvt train --framework torch` runs; `cvt_tf.training.fit` takes the same
    arguments.

    `build_model` is called after the process joins the `torchrun` process group (when launched by torchrun:
    DistributedDataParallel over its processes, `sync_batchnorm` synchronising BatchNorm) and after
    `torch.manual_seed(seed)`, so initialisation is reproducible. `seed` also draws the batch order and
    `augmentation` of every epoch; `batch_size` is the global batch of all processes; `warmup_epochs` is rounded to
    whole steps. `bf16` trains under bfloat16 autocast (weights stay float32), `compile` runs `torch.compile`, and
    `threads` (None or 0: PyTorch's choice) sets the CPU threads while training. `strategy` and `cpu_replicas` are
    Keras options and must stay at their defaults here. `echo` gets the setup line and one line per epoch, and
    `progress(batches, description)` may wrap each epoch's batches in a progress bar; both on the main process only.
    For oneDNN matmuls in the training step (`cvt train --fast-kernels`), build the model through
    `cvt_torch.optimize.optimize_for_training`: `fit(lambda: optimize_for_training(CvtForImageClassification(config)),
    ...)`.
    """
    check_fit_arguments(train_pixels, train_labels, val_pixels, val_labels, epochs, batch_size, learning_rate)
    if strategy != "default" or cpu_replicas:
        raise ValueError("strategy and cpu_replicas are tf.distribute options of cvt_tf.training.fit; run PyTorch "
                         "distributed under torchrun (e.g. torchrun --nproc_per_node 2 -m cvt_cli train ...)")
    context = init_distributed()
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = build_model()
        runner = prepare_model(model, context, sync_batchnorm=sync_batchnorm, compile=compile)
        schedule = training_schedule(len(train_labels), batch_size, epochs, warmup_epochs)
        optimizer = make_optimizer(model, learning_rate, weight_decay)
        scheduler = make_scheduler(optimizer, schedule.total_steps, schedule.warmup_steps)
        autocast = torch.bfloat16 if bf16 else None
        say = echo if context.is_main else None
        if say is not None:
            where = (f"DistributedDataParallel over {context.world_size} processes ({context.backend})"
                     + (", synchronised BatchNorm" if sync_batchnorm else "")) if context.distributed else "1 process"
            say(f"training with PyTorch {torch.__version__} on {context.device.type} ({where}, "
                f"{torch.get_num_threads()} thread(s) each{', bf16 autocast' if autocast else ''}"
                f"{', torch.compile' if compile else ''}"
                f"{', oneDNN training matmuls' if uses_training_kernels(model) else ''}): {epochs} epochs x "
                f"{schedule.steps_per_epoch} steps, global batch {batch_size}")

        def batches(epoch: int):
            return iterate_batches(train_pixels, train_labels, batch_size, shuffle=True, seed=seed, epoch=epoch,
                                   augmentation=augmentation, rank=context.rank, world_size=context.world_size)

        validation = (val_pixels, val_labels) if val_pixels is not None else None
        started = time.perf_counter()
        history = train_classifier(runner, optimizer, scheduler, batches, epochs, context, validation=validation,
                                   autocast_dtype=autocast, echo=say, progress=progress)
        seconds = time.perf_counter() - started
        # LambdaLR counts its step() calls, one per optimizer step, in last_epoch.
        return FitResult(model=unwrap(runner), history=history, seconds=seconds, steps=scheduler.last_epoch,
                         is_main=context.is_main, world_size=context.world_size, threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(threads_before)
        shutdown_distributed()
