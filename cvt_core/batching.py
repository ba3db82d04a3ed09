"""What both frameworks' training loops share, in NumPy: the batch order of every epoch, light augmentation,
the mini-batches themselves (one process or a share per process of a distributed run), and the one-line report
of an epoch, so that a PyTorch run and a Keras run see the same batches and print the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

METRICS = (("train_loss", "loss"), ("train_accuracy", "acc"), ("val_loss", "val_loss"), ("val_accuracy", "val_acc"))


def format_epoch(record: Dict[str, float], epochs: int) -> str:
    """`epoch  3/30  loss 0.4120  acc 0.8710  val_loss 0.3012  val_acc 0.9111  lr 1.9e-03  (2.1 s)`."""
    parts = [f"epoch {int(record['epoch']):>{len(str(epochs))}}/{epochs}"]
    for key, label in METRICS:
        if record.get(key) is not None:
            parts.append(f"{label} {record[key]:.4f}")
    if record.get("learning_rate") is not None:
        parts.append(f"lr {record['learning_rate']:.2e}")
    parts.append(f"({record['seconds']:.1f} s)")
    return "  ".join(parts)


def random_translate(pixels: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Shift each NCHW image by a random whole number of pixels in [-max_shift, max_shift] along each axis,
    filling the uncovered border with the image's own edge pixels (light augmentation for small images)."""
    if max_shift <= 0:
        return pixels
    n, _, height, width = pixels.shape
    padded = np.pad(pixels, ((0, 0), (0, 0), (max_shift, max_shift), (max_shift, max_shift)), mode="edge")
    offsets = rng.integers(0, 2 * max_shift + 1, size=(n, 2))
    out = np.empty_like(pixels)
    for i, (dy, dx) in enumerate(offsets):
        out[i] = padded[i, :, dy:dy + height, dx:dx + width]
    return out


def random_horizontal_flip(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror a random half of the NCHW images left-right."""
    flip = rng.random(len(pixels)) < 0.5
    out = pixels.copy()
    out[flip] = out[flip, :, :, ::-1]
    return out


@dataclass(frozen=True)
class Augmentation:
    """Light augmentation of training batches: random translation by up to `max_shift` pixels and, optionally,
    random horizontal flips (off for digits, which flipping would change)."""

    max_shift: int = 0
    horizontal_flip: bool = False

    @property
    def enabled(self) -> bool:
        return self.max_shift > 0 or self.horizontal_flip

    def __call__(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.max_shift > 0:
            pixels = random_translate(pixels, self.max_shift, rng)
        if self.horizontal_flip:
            pixels = random_horizontal_flip(pixels, rng)
        return pixels


def epoch_order(num_samples: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation drawn from (seed, epoch), the same in every process of a
    distributed run, or 0..N-1 without shuffling."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def num_batches(num_samples: int, batch_size: int, drop_remainder: bool = False) -> int:
    return num_samples // batch_size if drop_remainder else -(-num_samples // batch_size)


def iterate_batches(pixels: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool = False, seed: int = 0,
                    epoch: int = 0, augmentation: Optional[Augmentation] = None, drop_remainder: bool = False,
                    rank: int = 0, world_size: int = 1) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """NumPy mini-batches (pixels, labels) of one epoch.

    `batch_size` is the global batch. With `world_size > 1` each process gets its contiguous share of every global
    batch (rank r of W takes rows [r*B/W, (r+1)*B/W)), so W processes together see exactly the batches one process
    would; the global batch must then divide by W, and a short last batch is dropped. Augmentation draws from
    (seed, epoch, batch index), so it is identical across processes and reproducible.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size > 1:
        if batch_size % world_size:
            raise ValueError(f"the global batch size {batch_size} must divide by the number of processes {world_size}")
        drop_remainder = True
    order = epoch_order(len(pixels), shuffle, seed, epoch)
    share = batch_size // world_size
    for index in range(num_batches(len(order), batch_size, drop_remainder)):
        rows = order[index * batch_size:(index + 1) * batch_size]
        if augmentation is not None and augmentation.enabled:
            batch = augmentation(pixels[rows], np.random.default_rng([seed, epoch, index, 1]))
        else:
            batch = pixels[rows]
        batch_labels = labels[rows]
        if world_size > 1:
            batch = batch[rank * share:(rank + 1) * share]
            batch_labels = batch_labels[rank * share:(rank + 1) * share]
        yield np.ascontiguousarray(batch, dtype=np.float32), np.asarray(batch_labels, np.int64)
