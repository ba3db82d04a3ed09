"""The Keras backend the models run on, and the one switch between TensorFlow's fast kernels and `keras.ops`.

The Keras side runs on each Keras 3 backend: `tensorflow` (the default this package selects when `KERAS_BACKEND`
is unset), `jax` and `torch`. Set the backend before Keras is first imported:

    KERAS_BACKEND=jax python train.py

`TF` is the one backend check of the package: where TensorFlow has a faster kernel than the one `keras.ops` would
give it (the fused MatMul + BiasAdd of every Dense, the one-kernel squared difference of LayerNorm, the traced
encoder, the empty-batch guard, `tf.distribute` strategies), the code asks `TF`; everything else is `keras.ops`.
Under JAX and PyTorch, TensorFlow is never imported on the model's path (`import cvt_tf`, `from_pretrained`,
calling, `fit`, `predict`, saving and loading); what is TensorFlow's own (SavedModel/LiteRT export,
`tf.distribute` strategies) asks `tensorflow(feature)`, which names the backend it needs.

Under the torch backend every Keras layer is a `torch.nn.Module` whose parameters are keyed by the variable path,
and torch refuses a "." in a parameter name; our paths are transformers' TF names (`cvt/encoder/stages.0/...`),
which have dots. `_allow_dotted_variable_paths` keys those parameters with the dots replaced, leaving the
variable paths (and so every saved file) unchanged.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

BACKEND: str = keras.backend.backend()
TF: bool = BACKEND == "tensorflow"
JAX: bool = BACKEND == "jax"
TORCH: bool = BACKEND == "torch"

TORCH_PARAMETER_DOT = "\u2024"  # ONE DOT LEADER: stands for "." in the torch parameter names of dotted paths


def tensorflow(feature: str):
    """The `tensorflow` module, for `feature`, which only Keras' TensorFlow backend has. Raises one RuntimeError
    naming the backend needed when the process runs another one."""
    if not TF:
        raise RuntimeError(f"{feature} needs Keras' TensorFlow backend: set KERAS_BACKEND=tensorflow before keras is "
                           f"imported (this process runs the {BACKEND} backend)")
    import tensorflow as tf

    return tf


def torch_parameter_name(path: str) -> str:
    """The name under which the torch backend registers the variable at `path` (torch forbids "." in it)."""
    return path.replace(".", TORCH_PARAMETER_DOT)


def _allow_dotted_variable_paths() -> None:
    """Make Keras' torch layers register each variable under `torch_parameter_name(variable.path)` instead of the
    raw path. Changes nothing for paths without dots, which register as before."""
    import torch
    from keras.src.backend.torch.layer import TorchLayer

    if getattr(TorchLayer, "_cvt_dotted_paths", False):
        return

    def _track_variables(self):
        self._torch_params = torch.nn.ParameterDict(
            {torch_parameter_name(variable.path): variable.value for variable in self.variables})

    def _post_track_variable(self, variable):
        if hasattr(self, "_torch_params"):
            name = torch_parameter_name(variable.path)
            if name not in self.torch_params:
                self.torch_params[name] = variable.value

    def _post_untrack_variable(self, variable):
        if hasattr(self, "_torch_params"):
            name = torch_parameter_name(variable.path)
            if name in self.torch_params:
                self.torch_params.pop(name)

    TorchLayer._track_variables = _track_variables
    TorchLayer._post_track_variable = _post_track_variable
    TorchLayer._post_untrack_variable = _post_untrack_variable
    TorchLayer._cvt_dotted_paths = True


if TORCH:
    _allow_dotted_variable_paths()
