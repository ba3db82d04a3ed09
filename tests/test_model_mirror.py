"""The two model files mirror each other (`cvt_torch.modeling_cvt` and `cvt_tf.modeling_cvt`) in behaviour, not
only in names: class for class, the same constructor parameters, public methods, sub-block attribute names and
call signatures (`forward` and `call`, `training` aside), and on the same weights every pair of modules, called
with what the PyTorch module received in a forward pass, returns the same structure and the same numbers, on
listed and generated configs. Every difference allowed below is listed with its reason, so a new one fails here
until it is either removed or explained."""

from __future__ import annotations

import inspect
import os
import random

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
from cvt_core.outputs import ModelOutput  # noqa: E402
from cvt_core.shapes import minimum_input_size  # noqa: E402
from generated_configs import generated_config  # noqa: E402

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
    "rematerialized_call": "Keras' rematerialisation hook (block_remat_scope), PyTorch's gradient checkpointing "
                           "sits in CvtStage.forward",
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


# ------------------------------------------------------------------------------------------------ same behaviour
# Where a module's output holds attention probabilities (B, heads, T, T_kv): 4-D like a grid, but the same layout in
# both frameworks. (Keras' layers below the model compute NHWC grids where PyTorch's compute NCHW.)
ATTENTION_OUTPUT_POSITION = {"CvtSelfAttention": 1, "CvtAttention": 1, "CvtLayer": 1, "CvtStage": 2}
MODEL_CLASSES = ("CvtModel", "CvtBackbone", "CvtForImageClassification")  # NCHW in both (data_format channels_first)
# Output fields of one side only, and why.
ONE_SIDED_OUTPUTS = {
    "out.pyramid_outputs": "keras-hub's pyramid backbones key their maps P2, P3, ...; transformers' BackboneOutput "
                           "(the PyTorch tuple order) has no such field",
}
BEHAVIOUR_CONFIGS = {**{name: kwargs for name, kwargs in MIRROR_CONFIGS.items()},
                     **{f"generated-{seed}": generated_config(seed) for seed in range(6)}}


def _call_parameters(function) -> list:
    """(name, default) of each parameter but `self` and Keras' `training`."""
    return [(name, p.default) for name, p in inspect.signature(function).parameters.items()
            if name not in ("self", "training")]


@pytest.mark.parametrize("torch_name, keras_name", PAIRS)
def test_forward_and_call_take_the_same_arguments_with_the_same_defaults(torch_name, keras_name):
    torch_class, keras_class = TORCH_CLASSES[torch_name], KERAS_CLASSES[keras_name]
    own_forward = torch_class.forward.__module__ == torch_models.__name__
    assert own_forward == (keras_class.call.__module__ == keras_models.__name__)  # both or neither (base classes)
    if own_forward:
        assert _call_parameters(torch_class.forward) == _call_parameters(keras_class.call)


def _keras_layer_at(keras_model, torch_path: str):
    """The Keras layer at a PyTorch module path (`cvt.encoder.stages.0.layers.1.attention.output`)."""
    to_keras = {torch_name: keras_name for torch_name, keras_name in RENAMED_ATTRIBUTES}
    layer, parts = keras_model, torch_path.split(".") if torch_path else []
    while parts:
        if isinstance(layer, keras_models.TFCvtPreTrainedModel) and parts[0] == "encoder":
            layer = layer.cvt  # TFCvtMainLayer holds the encoder in Keras (ONE_SIDED_CLASSES)
        child = getattr(layer, to_keras.get(parts[0], parts[0]))
        parts = parts[1:]
        if isinstance(child, (list, tuple)):
            child, parts = child[int(parts[0])], parts[1:]
        layer = child
    return layer


def _to_keras_input(value, grid_layout_differs: bool):
    if isinstance(value, torch.Tensor):
        array = value.detach().numpy()
        return array.transpose(0, 2, 3, 1) if grid_layout_differs and array.ndim == 4 else array
    return value


def _leaves(output, attention_position=None, in_attentions=False, path="out"):
    """(path, value, is attention probabilities) for every tensor, int and None of a module's output."""
    if isinstance(output, ModelOutput):
        for field in type(output)._fields:
            yield from _leaves(getattr(output, field), None, field == "attentions", f"{path}.{field}")
    elif isinstance(output, (tuple, list)):
        for i, value in enumerate(output):
            yield from _leaves(value, None, in_attentions or i == attention_position, f"{path}[{i}]")
    else:
        yield path, output, in_attentions


def _assert_same_output(torch_output, keras_output, class_name: str, where: str):
    grid_layout_differs = class_name not in MODEL_CLASSES
    position = ATTENTION_OUTPUT_POSITION.get(class_name)
    torch_leaves = [leaf for leaf in _leaves(torch_output, position) if leaf[0] not in ONE_SIDED_OUTPUTS]
    keras_leaves = [leaf for leaf in _leaves(keras_output, position) if not leaf[0].startswith(tuple(ONE_SIDED_OUTPUTS))]
    assert [p for p, _, _ in torch_leaves] == [p for p, _, _ in keras_leaves], f"{where}: output structure differs"
    for (path, expected, is_attention), (_, got, _) in zip(torch_leaves, keras_leaves):
        if expected is None or isinstance(expected, int):
            assert got is None if expected is None else int(got) == expected, f"{where} {path}"
            continue
        got = keras.ops.convert_to_numpy(got)
        if grid_layout_differs and got.ndim == 4 and not is_attention:
            got = got.transpose(0, 3, 1, 2)
        expected = expected.detach().numpy()
        assert got.shape == expected.shape, f"{where} {path}: shape {got.shape} vs {expected.shape}"
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f"{where} {path}")


def _recorded_calls(model: nn.Module, run) -> list:
    """(module path, module, arguments by name, output) of every call of our modules during `run()`."""
    calls = []

    def record(path):
        def hook(module, args, kwargs, output):
            arguments = inspect.signature(module.forward).bind(*args, **kwargs)
            arguments.apply_defaults()
            calls.append((path, module, dict(arguments.arguments), output))
        return hook

    handles = [module.register_forward_hook(record(path), with_kwargs=True) for path, module in model.named_modules()
               if type(module).__module__ == torch_models.__name__]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


@pytest.mark.parametrize("config_name", sorted(BEHAVIOUR_CONFIGS))
def test_every_pair_of_modules_returns_the_same_on_the_same_weights_and_inputs(config_name, tmp_path):
    """Each PyTorch module's recorded call (inputs, output) is replayed on its Keras counterpart at the same path,
    with and without hidden states and attentions, for the classifier, the bare model and the backbone."""
    config = CvtConfig(**BEHAVIOUR_CONFIGS[config_name])
    make_random_checkpoint(str(tmp_path), config, seed=5)
    rng = random.Random(config_name)
    side = minimum_input_size(config)
    pixels = torch.randn(2, config.num_channels, side + rng.randrange(0, 24), side + rng.randrange(0, 24),
                         generator=torch.Generator().manual_seed(1))
    compared = set()
    for torch_class, keras_class in ((torch_models.CvtForImageClassification, keras_models.TFCvtForImageClassification),
                                     (torch_models.CvtModel, keras_models.TFCvtModel),
                                     (torch_models.CvtBackbone, keras_models.TFCvtBackbone)):
        torch_model = torch_class.from_pretrained(tmp_path)
        keras_model = keras_class.from_pretrained(tmp_path)
        calls = []
        for flags in (True, False):
            calls += _recorded_calls(torch_model, lambda: torch_model(pixels, output_hidden_states=flags,
                                                                      output_attentions=flags))
        for path, module, arguments, torch_output in calls:
            class_name = type(module).__name__
            layer = _keras_layer_at(keras_model, path)
            if type(layer).__name__ != "TF" + class_name:
                # ONE_SIDED_CLASSES: QuickGELU is a Keras Activation layer (compared too); `cvt` differs in class
                assert (class_name, type(layer).__name__) == ("QuickGELU", "Activation") or (
                    (path, type(layer).__name__) == ("cvt", "TFCvtMainLayer")), path
                if class_name != "QuickGELU":
                    continue
            values = [_to_keras_input(v, class_name not in MODEL_CLASSES) for v in arguments.values()]
            first, rest = values[0], dict(zip(list(arguments)[1:], values[1:]))
            keras_output = layer(first, **rest)
            _assert_same_output(torch_output, keras_output, class_name, f"{config_name} {path or torch_class.__name__}")
            compared.add(class_name)
    never_called = {"CvtPreTrainedModel"} | ({"CvtSelfAttentionConvProjection"} if "dw_bn" not in
                                             config.qkv_projection_method else set())
    assert ("QuickGELU" in compared) == (config.hidden_act == "quick_gelu")
    assert compared - {"QuickGELU"} == {t for t, _ in PAIRS} - never_called
