"""Framework-neutral CvT spec: configuration, shape rules, the weight-name table, outputs and checkpoint I/O.

Nothing here imports PyTorch or TensorFlow; both backends are built against this package.
"""

from .config import CvtConfig, PRESETS
from .shapes import InputTooSmallError, minimum_input_size, stage_geometry, stage_output_sizes
from .weights import WeightEntry, WeightLoadError, count_parameters, plan_load, weight_table

__all__ = [
    "CvtConfig",
    "PRESETS",
    "InputTooSmallError",
    "minimum_input_size",
    "stage_geometry",
    "stage_output_sizes",
    "WeightEntry",
    "WeightLoadError",
    "count_parameters",
    "plan_load",
    "weight_table",
]
