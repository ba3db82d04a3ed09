"""PyTorch backend of the CvT library: `CvtModel` and `CvtForImageClassification`, built from a `CvtConfig`."""

from cvt_core.config import CvtConfig

from .modeling_cvt import CvtForImageClassification, CvtModel, CvtPreTrainedModel

__all__ = ["CvtConfig", "CvtModel", "CvtForImageClassification", "CvtPreTrainedModel"]
