"""transformers 4.57.6 as the numerical oracle: build its CvT, save it, and record what it computes.

The PyTorch side runs in the test process. transformers' TF classes need Keras 2 and set
`TF_USE_LEGACY_KERAS=1` in `os.environ` on import, so they run only in a child process (`run_hf_tf`), which
keeps our Keras 3 untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, Optional

import numpy as np

from conversion.random_weights import randomize_torch_model_ as randomize_  # re-exported for the tests

ORACLE_TOLERANCE = 1e-5


def assert_close(actual, expected, name: str = "", tol: float = ORACLE_TOLERANCE) -> None:
    """|actual - expected| <= tol * max(1, max|expected|), with shapes equal."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != reference {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert err <= tol * scale, f"{name}: max abs diff {err:.3g} > {tol:g} * {scale:.3g}"


def make_hf_checkpoint(directory: str, config_kwargs: dict, seed: int = 0, with_head: bool = True,
                       safe_serialization: bool = True):
    """Save a randomised transformers CvT (classifier or bare model) to `directory`; returns the model (eval)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.CvtConfig(**config_kwargs)
    cls = transformers.CvtForImageClassification if with_head else transformers.CvtModel
    model = cls(config).eval()
    randomize_(model, seed)
    model.save_pretrained(directory, safe_serialization=safe_serialization)
    return model


def hf_torch_outputs(model, pixel_values: np.ndarray, labels: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """logits/loss (classifier), last_hidden_state, cls_token_value and hidden_states.{i} as NumPy."""
    import torch

    x = torch.from_numpy(pixel_values)
    out: Dict[str, np.ndarray] = {}
    with torch.no_grad():
        backbone = getattr(model, "cvt", model)
        base = backbone(x, output_hidden_states=True)
        out["last_hidden_state"] = base.last_hidden_state.numpy()
        if base.cls_token_value is not None:
            out["cls_token_value"] = base.cls_token_value.numpy()
        for i, h in enumerate(base.hidden_states):
            out[f"hidden_states.{i}"] = h.numpy()
        if backbone is not model:
            kwargs = {}
            if labels is not None:
                kwargs["labels"] = torch.from_numpy(labels)
            result = model(x, **kwargs)
            out["logits"] = result.logits.numpy()
            if labels is not None:
                out["loss"] = np.asarray(result.loss.numpy())
    return out


_TF_CHILD = r"""
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import transformers
jobs = json.loads(sys.argv[1])
for job in jobs:
    cls = transformers.TFCvtForImageClassification if job["with_head"] else transformers.TFCvtModel
    model = cls.from_pretrained(job["checkpoint"], from_pt=job.get("from_pt", True))
    x = np.load(job["pixel_values"])
    out = {}
    backbone = model.cvt
    base = backbone(x, output_hidden_states=True, training=False)
    out["last_hidden_state"] = base.last_hidden_state.numpy()
    if base.cls_token_value is not None:
        out["cls_token_value"] = base.cls_token_value.numpy()
    for i, h in enumerate(base.hidden_states):
        out[f"hidden_states.{i}"] = h.numpy()
    if job["with_head"]:
        out["logits"] = model(x, training=False).logits.numpy()
    np.savez(job["output"], **out)
"""


def run_hf_tf(jobs: list, timeout: int = 900) -> None:
    """Run transformers' TF CvT in a child process for each job and save its outputs.

    Each job: {"checkpoint": dir, "pixel_values": .npy path, "output": .npz path, "with_head": bool,
    "from_pt": bool (default True: load the PyTorch weights; False: load tf_model.h5)}.
    """
    env = dict(os.environ)
    env["TF_USE_LEGACY_KERAS"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    proc = subprocess.run([sys.executable, "-c", _TF_CHILD, json.dumps(jobs)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"transformers TF oracle failed:\n{proc.stderr[-4000:]}")
