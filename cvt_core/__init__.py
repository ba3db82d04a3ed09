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
    "CvtImageProcessor",
]


def __getattr__(name):
    # The processor needs Pillow; importing it lazily keeps `import cvt_core` light.
    if name == "CvtImageProcessor":
        from .image_processing import CvtImageProcessor

        return CvtImageProcessor
    raise AttributeError(f"module 'cvt_core' has no attribute {name!r}")
