"""CvT for Keras 3, the Keras side of the project: `TFCvtModel`, `TFCvtForImageClassification` and `TFCvtBackbone`,
on the TensorFlow, JAX and PyTorch backends.

Importing this package selects the TensorFlow backend for Keras unless `KERAS_BACKEND` is already set; set it
before Keras is first imported to run on another one (`KERAS_BACKEND=jax`, `KERAS_BACKEND=torch`). Under JAX and
PyTorch TensorFlow need not be installed (see `cvt_tf.backend`).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from cvt_core.config import CvtConfig  # noqa: E402

from .modeling_cvt import TFCvtBackbone, TFCvtForImageClassification, TFCvtModel, TFCvtPreTrainedModel  # noqa: E402

__all__ = ["CvtConfig", "TFCvtModel", "TFCvtForImageClassification", "TFCvtBackbone", "TFCvtPreTrainedModel"]
