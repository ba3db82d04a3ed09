"""Checkpoint conversion for the CvT library: every format, and the `cvt` command that proves both sides agree.

Formats (see `conversion.formats`): transformers PyTorch (model.safetensors, sharded, pytorch_model.bin read without
running pickled code), transformers TF (`tf_model.h5`, exactly as transformers 4.57.6 writes it), Keras 3 native
(`model.weights.h5`, `model.keras`) and the original microsoft/CvT checkpoints. Everything goes through one
numpy "canonical state" keyed by the `cvt_core` weight table.

Python API::

    from conversion import convert, verify
    convert("cvt-13-folder", "out", to="all")      # prints the cross-check, raises on failure
"""

from .errors import ConversionError, CrossCheckFailed
from .formats import open_source, write_targets
from .pipeline import convert, demo, verify
from .state import CanonicalState

__all__ = ["ConversionError", "CrossCheckFailed", "CanonicalState", "convert", "verify", "demo", "open_source",
           "write_targets"]
