"""The two model files mirror each other (`cvt_torch.modeling_cvt` and `cvt_tf.modeling_cvt`): class for class,
with the same constructor parameters, public methods and sub-block attribute names, and the shared methods give
the same numbers (`forward_features` / `forward_head` on the same weights, `compute_classification_loss`).
Every difference allowed below is listed with its reason, so a new one fails here until it is either removed or
explained."""

from __future__ import annotations

import inspect
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import cvt_tf.modeling_cvt as keras_models  # noqa: E402
import cvt_torch.modeling_cvt as torch_models  # noqa: E402
from conversion.pipeline import make_random_checkpoint  # noqa: E402
from cvt_core.config import CvtConfig  # noqa: E402

# Classes with no counterpart in the other framework, and why.
ONE_SIDED_CLASSES = {
    "QuickGELU": "PyTorch has no QuickGELU module; Keras' Activation layer takes the function (quick_gelu)",
    "TFCvtMainLayer": "transformers' TF layout: both Keras models hold the backbone as `cvt` (variable paths cvt/...), "
                      "where the PyTorch CvtModel holds `encoder` itself",
}
# Constructor parameters of one side only, and why.
ONE_SIDED_PARAMETERS = {
    "data_format": "the Keras models also take NHWC images; PyTorch takes NCHW (channels-last is a tensor layout there)",
    "seed": "Keras random ops draw from a SeedGenerator; PyTorch draws from its global generator (torch.manual_seed)",
}
# Public methods of one side only: framework hooks our classes override, and framework-only services.
ONE_SIDED_METHODS = {
    "extra_repr": "nn.Module's repr hook",
    "init_weights": "PyTorch initialises every weight in __init__ (transformers' API); Keras when it builds a variable",
    "build": "Keras builds variables lazily",
    "build_with_dummy_input": "Keras builds variables lazily; PyTorch has them after __init__",
    "canonical_weights": "PyTorch's state_dict() is already keyed by the weight table's names",
    "get_config": "Keras serialisation (.keras files)",
    "from_config": "Keras serialisation (.keras files)",
    "load_weights": "Keras' weights files, loaded strictly",
    "load_own_variables": "Keras' weights files, loaded strictly",
    "predict": "the Keras trainer (predict), taught empty batches",
    "summary": "Keras' summary, building the variables first (PyTorch has them after __init__)",
    "from_preset": "keras-hub's entry point (from_pretrained, or an architecture name with load_weights=False)",
    "save_to_preset": "keras-hub's name for save_pretrained",
    "forward_intermediates": "timm's feature API, a PyTorch convention; Keras dense heads take TFCvtBackbone's "
                             "pyramid_outputs (keras-hub's)",
    "gradient_checkpointing_enable": "activation checkpointing per block (torch.utils.checkpoint), transformers' name",
    "gradient_checkpointing_disable": "activation checkpointing per block (torch.utils.checkpoint), transformers' name",
    "set_grad_checkpointing": "activation checkpointing per block (torch.utils.checkpoint), timm's name",
}
# Sub-block attributes named otherwise in Keras: (torch name, Keras name) -> why.
RENAMED_ATTRIBUTES = {
    ("output", "dense_output"): "`output` is a property of keras.layers.Layer",
    ("layers", "blocks"): "the attribute name is part of the paths in .keras / .weights.h5 files; kept so they load",
}
# Sub-blocks of one side only: (class name without the TF prefix, attribute) -> why.
ONE_SIDED_ATTRIBUTES = {
    ("CvtConvEmbeddings", "padding"): "Keras' Conv2D has no explicit integer padding: a ZeroPadding2D runs first",
    ("CvtSelfAttentionConvProjection", "padding"): "Keras' Conv2D has no explicit integer padding: a ZeroPadding2D "
                                                   "runs first",
}
# Every projection method and a final stage with and without a cls token, so every sub-block exists.
MIRROR_CONFIGS = {
    "final-cls-token": dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 2], num_labels=3,
                            qkv_projection_method=["avg", "linear", "dw_bn"]),
    "no-cls-token": dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 1, 2], num_labels=3,
                         cls_token=[False, False, False]),
}


def _own_classes(module, base) -> dict:
    return {name: cls for name, cls in vars(module).items()
            if inspect.isclass(cls) and cls.__module__ == module.__name__ and issubclass(cls, base)}


TORCH_CLASSES = _own_classes(torch_models, nn.Module)
KERAS_CLASSES = _own_classes(keras_models, keras.layers.Layer)
PAIRS = sorted((name, "TF" + name) for name in TORCH_CLASSES if "TF" + name in KERAS_CLASSES)


def _public_methods(cls) -> set:
    """Public methods defined in our classes (the class and its bases in the same module), not the framework's;
    `call` is Keras' `forward`."""
    names = set()
    for klass in cls.__mro__:
        if klass.__module__ != cls.__module__:
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, (classmethod, staticmethod))):
                names.add("forward" if name == "call" else name)
    return names


def test_every_module_class_has_its_counterpart_in_the_other_framework():
    torch_only = {name for name in TORCH_CLASSES if "TF" + name not in KERAS_CLASSES}
    keras_only = {name for name in KERAS_CLASSES if not (name.startswith("TF") and name[2:] in TORCH_CLASSES)}
    assert torch_only | keras_only == set(ONE_SIDED_CLASSES)
    assert {"CvtLayer", "CvtSelfAttentionProjection", "CvtForImageClassification"} <= {t for t, _ in PAIRS}


@pytest.mark.parametrize("torch_name, keras_name", PAIRS)
def test_constructors_take_the_same_parameters(torch_name, keras_name):
    def parameters(cls):
        return [name for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD and name not in ONE_SIDED_PARAMETERS]

    assert parameters(TORCH_CLASSES[torch_name]) == parameters(KERAS_CLASSES[keras_name])


@pytest.mark.parametrize("torch_name, keras_name", PAIRS)
def test_public_methods_are_the_same_forward_being_call(torch_name, keras_name):
    torch_methods = _public_methods(TORCH_CLASSES[torch_name]) - set(ONE_SIDED_METHODS)
    keras_methods = _public_methods(KERAS_CLASSES[keras_name]) - set(ONE_SIDED_METHODS)
    assert torch_methods == keras_methods


def test_allowed_differences_are_all_still_used():
    parameters = {name for cls in [*TORCH_CLASSES.values(), *KERAS_CLASSES.values()]
                  for name in inspect.signature(cls.__init__).parameters}
    assert set(ONE_SIDED_PARAMETERS) <= parameters
    torch_methods = set().union(*(_public_methods(TORCH_CLASSES[t]) for t, _ in PAIRS))
    keras_methods = set().union(*(_public_methods(KERAS_CLASSES[k]) for _, k in PAIRS))
    assert set(ONE_SIDED_METHODS) == torch_methods ^ keras_methods


def _torch_sub_blocks(model: nn.Module) -> dict:
    """{class name: attribute names holding sub-blocks} over every module of `model` defined in cvt_torch."""
    found: dict = {}
    for module in model.modules():
        if type(module).__module__ == torch_models.__name__:
            found.setdefault(type(module).__name__, set()).update(name for name, _ in module.named_children())
    return found


def _keras_sub_blocks(layer: keras.layers.Layer, found=None) -> dict:
    """The same for a Keras layer tree, class names without the TF prefix, Keras' names mapped to torch's."""
    found = {} if found is None else found
    to_torch = {keras_name: torch_name for torch_name, keras_name in RENAMED_ATTRIBUTES}
    names = found.setdefault(type(layer).__name__[2:], set()) if type(layer).__module__ == keras_models.__name__ else set()
    for name, value in vars(layer).items():
        children = value if isinstance(value, (list, tuple)) else [value]
        children = [child for child in children if isinstance(child, keras.layers.Layer)]
        if name.startswith("_") or not children:
            continue
        names.add(to_torch.get(name, name))
        for child in children:
            _keras_sub_blocks(child, found)
    return found


@pytest.mark.parametrize("config_name", sorted(MIRROR_CONFIGS))
def test_sub_blocks_have_the_same_attribute_names(config_name):
    config = CvtConfig(**MIRROR_CONFIGS[config_name])
    torch_blocks = _torch_sub_blocks(torch_models.CvtForImageClassification(config))
    keras_blocks = _keras_sub_blocks(keras_models.TFCvtForImageClassification(config, data_format="channels_first"))
    for name in sorted(set(torch_blocks) & set(keras_blocks)):
        one_sided = {attribute for cls, attribute in ONE_SIDED_ATTRIBUTES if cls == name}
        assert torch_blocks[name] - one_sided == keras_blocks[name] - one_sided, name
    for name, attribute in ONE_SIDED_ATTRIBUTES:  # each still on exactly one side
        assert (attribute in torch_blocks[name]) != (attribute in keras_blocks[name]), (name, attribute)
    assert {"CvtStage", "CvtLayer", "CvtSelfAttentionProjection"} <= set(torch_blocks) & set(keras_blocks)


# ------------------------------------------------------------------------------------------------ same numbers
@pytest.mark.parametrize("config_name", sorted(MIRROR_CONFIGS))
def test_forward_features_and_forward_head_agree_on_the_same_weights(config_name, tmp_path):
    config = CvtConfig(**MIRROR_CONFIGS[config_name])
    make_random_checkpoint(str(tmp_path), config, seed=4)
    torch_model = torch_models.CvtForImageClassification.from_pretrained(tmp_path)
    keras_model = keras_models.TFCvtForImageClassification.from_pretrained(tmp_path)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 48, 48)).astype(np.float32)
    with torch.no_grad():
        torch_features = torch_model.forward_features(torch.from_numpy(pixels))
        torch_logits = torch_model.forward_head(torch_features).numpy()
        torch_pooled = torch_model.forward_head(torch_features, pre_logits=True).numpy()
    keras_features = keras_model.forward_features(pixels)
    tokens = 1 if config.cls_token[-1] else 9  # 48 -> 12 -> 6 -> 3
    assert tuple(keras_features.shape) == tuple(torch_features.shape) == (2, tokens, 48)
    np.testing.assert_allclose(keras_features.numpy(), torch_features.numpy(), atol=1e-5)
    np.testing.assert_allclose(keras_model.forward_head(keras_features).numpy(), torch_logits, atol=1e-5)
    np.testing.assert_allclose(keras_model.forward_head(keras_features, pre_logits=True).numpy(), torch_pooled,
                               atol=1e-5)
    np.testing.assert_allclose(keras_model.forward_head(keras_features).numpy(), keras_model(pixels).logits.numpy(),
                               atol=1e-6)


LOSS_CASES = {
    "regression-one-label": (dict(num_labels=1), lambda rng: rng.standard_normal((6, 1)).astype(np.float32)),
    "regression-three-labels": (dict(num_labels=3, problem_type="regression"),
                                lambda rng: rng.standard_normal((6, 3)).astype(np.float32)),
    "single-label-with-ignored": (dict(num_labels=3), lambda rng: np.array([0, 2, -100, 1, 1, 0])),
    "multi-label": (dict(num_labels=3), lambda rng: (rng.random((6, 3)) > 0.5).astype(np.float32)),
}


@pytest.mark.parametrize("weights", ["none", "per-sample", "all-zero"])
@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_classification_loss_is_the_same_in_both_frameworks(case, weights):
    overrides, make_labels = LOSS_CASES[case]
    config = CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 1, 1], **overrides)
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, config.num_labels)).astype(np.float32) * 2
    labels = make_labels(rng)
    sample_weight = {"none": None, "per-sample": np.array([0.5, 2.0, 1.0, 0.0, 3.0, 1.5], np.float32),
                     "all-zero": np.zeros(6, np.float32)}[weights]
    torch_loss = torch_models.CvtForImageClassification(config).compute_classification_loss(
        torch.from_numpy(labels), torch.from_numpy(logits),
        None if sample_weight is None else torch.from_numpy(sample_weight))
    keras_loss = keras_models.TFCvtForImageClassification(config).compute_classification_loss(
        tf.constant(labels), tf.constant(logits), sample_weight)
    np.testing.assert_allclose(float(torch_loss), float(keras_loss), rtol=1e-6, atol=1e-7)
    if weights == "all-zero":
        assert float(torch_loss) == 0.0
