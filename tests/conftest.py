"""Shared fixtures: transformers checkpoints with randomised weights and what transformers computes on them.

`hf_reference` builds every case of PARITY_CASES once per session: a transformers PyTorch model, saved with
`save_pretrained`, its outputs, and (in one child process for all cases) the outputs of transformers' own TF
model on the same checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from hf_oracle import hf_torch_outputs, make_hf_checkpoint, run_hf_tf  # noqa: E402

TINY = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3])


@dataclass(frozen=True)
class ParityCase:
    config: dict
    height: int
    width: int
    batch: int = 2
    with_head: bool = True
    labels: Optional[str] = None  # "class" | "multi" | "regression"


# Configs transformers can build (depth[s] > s, cls token on the last stage only, dw_bn projection).
PARITY_CASES: Dict[str, ParityCase] = {
    "tiny-64": ParityCase(dict(TINY, num_labels=5), 64, 64, labels="class"),
    "tiny-384-batch1": ParityCase(dict(TINY, num_labels=3, image_size=384), 384, 384, batch=1),
    "tiny-nonsquare": ParityCase(dict(TINY, num_labels=4), 96, 160, labels="multi"),
    "tiny-variants": ParityCase(
        dict(embed_dim=[24, 40], num_heads=[2, 4], depth=[1, 3], patch_sizes=[5, 3], patch_stride=[3, 2],
             patch_padding=[1, 0], mlp_ratio=[2.0, 1.5], qkv_bias=[False, True], cls_token=[False, True],
             qkv_projection_method=["dw_bn", "dw_bn"], kernel_qkv=[5, 3], padding_q=[2, 1], stride_q=[1, 1],
             stride_kv=[1, 2], padding_kv=[2, 0], attention_drop_rate=[0.0, 0.0], drop_rate=[0.0, 0.0],
             drop_path_rate=[0.0, 0.1], num_labels=1),
        71, 53, labels="regression"),
    "tiny-four-stages-bare": ParityCase(
        dict(embed_dim=[8, 16, 24, 32], num_heads=[1, 2, 3, 4], depth=[1, 2, 3, 4], patch_sizes=[3, 3, 3, 3],
             patch_stride=[2, 2, 2, 2], patch_padding=[1, 1, 1, 1], mlp_ratio=[4.0] * 4, attention_drop_rate=[0.0] * 4,
             drop_rate=[0.0] * 4, drop_path_rate=[0.0] * 4, qkv_bias=[True] * 4, cls_token=[False, False, False, True],
             qkv_projection_method=["dw_bn"] * 4, kernel_qkv=[3] * 4, padding_kv=[1] * 4, stride_kv=[2] * 4,
             padding_q=[1] * 4, stride_q=[1] * 4),
        48, 48, with_head=False),
    "cvt13-224": ParityCase(dict(num_labels=1000, image_size=224), 224, 224, batch=2, labels="class"),
}


@dataclass
class Reference:
    name: str
    case: ParityCase
    checkpoint: str
    pixel_values: np.ndarray
    labels: Optional[np.ndarray]
    torch: Dict[str, np.ndarray]
    tf: Dict[str, np.ndarray] = field(default_factory=dict)


def _labels(case: ParityCase, rng: np.random.Generator) -> Optional[np.ndarray]:
    n = case.config.get("num_labels", 2)
    if case.labels == "class":
        return rng.integers(0, n, size=(case.batch,)).astype(np.int64)
    if case.labels == "multi":
        return (rng.random((case.batch, n)) > 0.5).astype(np.float32)
    if case.labels == "regression":
        return rng.standard_normal((case.batch,)).astype(np.float32)
    return None


def _hf_tf_can_load(case: ParityCase) -> bool:
    """transformers' TF model names every cls token variable `...stages.2.cls_token` (defect B5), so it loads the
    token only when it sits on stage 2; elsewhere its cls token stays random and it is no oracle."""
    cls = case.config.get("cls_token", [False, False, True])
    return not any(flag for s, flag in enumerate(cls) if s != 2)


def _build_references(root) -> Dict[str, Reference]:
    refs: Dict[str, Reference] = {}
    jobs = []
    for i, (name, case) in enumerate(PARITY_CASES.items()):
        rng = np.random.default_rng(1000 + i)
        checkpoint = str(root / name)
        model = make_hf_checkpoint(checkpoint, dict(case.config, image_size=case.config.get("image_size", case.height)),
                                   seed=i, with_head=case.with_head)
        pixel_values = rng.standard_normal((case.batch, 3, case.height, case.width)).astype(np.float32)
        labels = _labels(case, rng)
        refs[name] = Reference(name, case, checkpoint, pixel_values, labels, hf_torch_outputs(model, pixel_values, labels))
        np.save(root / f"{name}-pixels.npy", pixel_values)
        if not _hf_tf_can_load(case):
            continue
        jobs.append({"checkpoint": checkpoint, "pixel_values": str(root / f"{name}-pixels.npy"),
                     "output": str(root / f"{name}-tf.npz"), "with_head": case.with_head})
    run_hf_tf(jobs)
    for name, ref in refs.items():
        if _hf_tf_can_load(ref.case):
            ref.tf = _arrays(root / f"{name}-tf.npz")
    return refs


def _save_references(root, refs: Dict[str, Reference]) -> None:
    for name, ref in refs.items():
        np.savez(root / f"{name}-torch.npz", **ref.torch)
        if ref.labels is not None:
            np.save(root / f"{name}-labels.npy", ref.labels)
    (root / "complete").write_text("\n".join(refs))


def _arrays(path) -> Dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _load_references(root) -> Dict[str, Reference]:
    refs: Dict[str, Reference] = {}
    for name, case in PARITY_CASES.items():
        labels = root / f"{name}-labels.npy"
        refs[name] = Reference(name, case, str(root / name), np.load(root / f"{name}-pixels.npy"),
                               np.load(labels) if labels.exists() else None, _arrays(root / f"{name}-torch.npz"),
                               _arrays(root / f"{name}-tf.npz") if _hf_tf_can_load(case) else {})
    return refs


@pytest.fixture(scope="session")
def hf_reference(tmp_path_factory, worker_id) -> Dict[str, Reference]:
    """Every parity case, built and run through transformers (PyTorch and TF) once per test run: under
    pytest-xdist the first worker builds them in the run's shared temporary folder, under a lock, and the others
    read what it wrote."""
    if worker_id == "master":
        return _build_references(tmp_path_factory.mktemp("hf-reference"))
    import fcntl

    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, above each worker's own
    root = shared / "hf-reference"
    with open(shared / "hf-reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "complete").exists():
            return _load_references(root)
        root.mkdir(exist_ok=True)
        refs = _build_references(root)
        _save_references(root, refs)
        return refs
