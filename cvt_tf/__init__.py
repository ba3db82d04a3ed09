"""CvT for Keras 3 (TensorFlow backend): `TFCvtModel`, `TFCvtForImageClassification` and `TFCvtBackbone`.

Importing this package selects the TensorFlow backend for Keras unless `KERAS_BACKEND` is already set.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from cvt_core.config import CvtConfig  # noqa: E402

from .modeling_cvt import TFCvtBackbone, TFCvtForImageClassification, TFCvtModel, TFCvtPreTrainedModel  # noqa: E402

__all__ = ["CvtConfig", "TFCvtModel", "TFCvtForImageClassification", "TFCvtBackbone", "TFCvtPreTrainedModel"]
