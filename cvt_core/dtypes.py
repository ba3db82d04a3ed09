"""The one bfloat16 rule: NumPy has no bfloat16, so it comes from the `ml_dtypes` package, and this module alone
says how to get it, how to recognise it and what the error says when the package is missing.

`ml_dtypes` ships with TensorFlow and JAX; a PyTorch-only install may lack it. Every reader, writer and cast of the
project (safetensors `BF16`, torch `BFloat16Storage`, `--dtype bfloat16`, the torch <-> NumPy bridge) asks here.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .errors import CheckpointError


def _ml_bfloat16() -> Optional[np.dtype]:
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return np.dtype(ml_dtypes.bfloat16)


def has_bfloat16() -> bool:
    """Whether NumPy can hold bfloat16 here (ml_dtypes is installed)."""
    return _ml_bfloat16() is not None


def bfloat16_dtype(subject: str) -> np.dtype:
    """NumPy's bfloat16 (ml_dtypes'), or a one-line `CheckpointError` naming `subject` (the file or option that
    needs it) when ml_dtypes is missing."""
    dtype = _ml_bfloat16()
    if dtype is None:
        raise CheckpointError(f"{subject}: bfloat16 needs the ml_dtypes package (pip install ml_dtypes)")
    return dtype


def is_bfloat16(dtype: np.dtype) -> bool:
    return np.dtype(dtype).name == "bfloat16"


def is_float(dtype: np.dtype) -> bool:
    """Whether `dtype` is floating point, bfloat16 included (NumPy files ml_dtypes' bfloat16 under kind 'V')."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or is_bfloat16(dtype)


def numpy_dtype(name: str, subject: Optional[str] = None) -> np.dtype:
    """The NumPy dtype called `name` (float32, float16, bfloat16, int64, ...); bfloat16 through `bfloat16_dtype`,
    whose error names `subject` (default: the dtype's name)."""
    if name == "bfloat16":
        return bfloat16_dtype(subject or name)
    return np.dtype(name)
