"""PyTorch backend of the CvT library: `CvtModel`, `CvtForImageClassification` and `CvtBackbone`, built from a `CvtConfig`."""

from cvt_core.config import CvtConfig

from .modeling_cvt import CvtBackbone, CvtForImageClassification, CvtModel, CvtPreTrainedModel
from .optimize import optimize_for_inference, optimize_for_training

__all__ = ["CvtConfig", "CvtModel", "CvtForImageClassification", "CvtBackbone", "CvtPreTrainedModel",
           "optimize_for_inference", "optimize_for_training"]
