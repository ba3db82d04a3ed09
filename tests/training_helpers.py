"""Shared by the training tests: the digits at a small resolution, a small CvT config, and a thread limit."""

from __future__ import annotations

import contextlib
import functools
from typing import Dict, Tuple

import numpy as np

from cvt_core.config import CvtConfig
from cvt_core.weights import weight_table
from cvt_cli.data import load_digits_dataset, preprocess, stratified_split
from cvt_core.image_processing import CvtImageProcessor

IMAGE_SIZE = 16
SMALL = dict(embed_dim=[16, 32, 64], num_heads=[1, 2, 4], depth=[1, 1, 2], patch_sizes=[7, 3, 3],
             patch_stride=[4, 2, 2], patch_padding=[2, 1, 1])


def small_config(**overrides) -> CvtConfig:
    fields = dict(SMALL, num_labels=10, image_size=IMAGE_SIZE, drop_path_rate=[0.0, 0.0, 0.1])
    fields.update(overrides)
    return CvtConfig(**fields)


@functools.lru_cache(maxsize=None)
def digits(image_size: int = IMAGE_SIZE) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train pixels, train labels, validation pixels, validation labels): 80/20 stratified split, seed 0."""
    dataset = load_digits_dataset()
    pixels = preprocess(dataset, CvtImageProcessor(size=image_size, crop_pct=1.0))
    train, val = stratified_split(dataset.labels, 0.2, seed=0)
    for array in (pixels, dataset.labels):
        array.setflags(write=False)
    return pixels[train], dataset.labels[train], pixels[val], dataset.labels[val]


@contextlib.contextmanager
def torch_threads(count: int = 1):
    """Small models train fastest on one thread (and do not fight the other processes of a loaded machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def keras_state_arrays(model) -> Dict[str, np.ndarray]:
    """{torch name: PyTorch-layout array} of a Keras model (num_batches_tracked, which Keras lacks, as 0)."""
    variables = model.canonical_weights()
    out = {}
    for entry in weight_table(model.config, model.with_head):
        name = entry.torch_name(model.with_head)
        if entry.has_keras_twin:
            out[name] = np.asarray(entry.from_keras(np.asarray(variables[name].numpy())), order="C")
        else:
            out[name] = np.zeros(entry.shape, np.int64)
    return out
