"""Strict config.json: every field takes its own type only (no coercion of 3.7 to 3 or "false" to True), label maps
whose keys are exactly the class ids, strict JSON on load (depth, NaN, duplicates), and a size budget refused before
any model allocates. Every refusal is one line naming the field and the value."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from cvt_core.config import (
    PER_STAGE_FIELDS,
    PRESETS,
    CvtConfig,
    ModelTooLargeError,
    activation_elements,
    parameter_count,
)
from cvt_core.untrusted import Limits
from cvt_core.weights import count_parameters

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN, INF = float("nan"), float("inf")

INT_STAGE_FIELDS = ("patch_sizes", "patch_stride", "patch_padding", "embed_dim", "num_heads", "depth", "kernel_qkv",
                    "padding_kv", "stride_kv", "padding_q", "stride_q")
FLOAT_STAGE_FIELDS = ("mlp_ratio", "attention_drop_rate", "drop_rate", "drop_path_rate")
BOOL_STAGE_FIELDS = ("qkv_bias", "cls_token")
STRING_STAGE_FIELDS = ("qkv_projection_method",)
assert set(INT_STAGE_FIELDS + FLOAT_STAGE_FIELDS + BOOL_STAGE_FIELDS + STRING_STAGE_FIELDS) == set(PER_STAGE_FIELDS)

# wrong values for each kind of field: what a hand-edited or hostile config.json (or a Python caller) may hold
WRONG_INT = [True, False, 3.7, 3.0, "3", None, [3], {"n": 3}, NAN]
WRONG_FLOAT = [True, "0.1", NAN, INF, -INF, None, [0.1], {"x": 0.1}]
WRONG_BOOL = ["false", "true", 0, 1, 0.0, None, [True], {"on": True}]
WRONG_STRING = [1, True, None, ["dw_bn"], {"m": "dw_bn"}]


def _cases():
    cases = []
    for name in INT_STAGE_FIELDS:
        cases += [(name, 1, bad) for bad in WRONG_INT]
    for name in FLOAT_STAGE_FIELDS:
        cases += [(name, 1, bad) for bad in WRONG_FLOAT]
    for name in BOOL_STAGE_FIELDS:
        cases += [(name, 1, bad) for bad in WRONG_BOOL]
    for name in STRING_STAGE_FIELDS:
        cases += [(name, 1, bad) for bad in WRONG_STRING]
    # whole per-stage lists replaced by a scalar, a string, a nested list or null
    for name in PER_STAGE_FIELDS:  # (a null mlp_ratio means the default, as the keyword's None does)
        cases += [(name, None, bad) for bad in (7, "abc", [[1, 2, 3]], None, {"0": 1}, [])
                  if not (name == "mlp_ratio" and bad is None)]
    cases += [("num_channels", None, bad) for bad in WRONG_INT]
    cases += [("num_labels", None, bad) for bad in WRONG_INT if bad is not None]
    for name in ("initializer_range", "layer_norm_eps"):
        cases += [(name, None, bad) for bad in WRONG_FLOAT]
    for name in ("output_hidden_states", "output_attentions", "return_dict"):
        cases += [(name, None, bad) for bad in WRONG_BOOL]
    cases += [("hidden_act", None, bad) for bad in WRONG_STRING]
    cases += [("problem_type", None, bad) for bad in WRONG_STRING if bad is not None]
    cases += [("image_size", None, bad) for bad in (True, 224.0, "224", [224.0, 224], [224, True], [224, 224, 224],
                                                    [[224]], {"h": 224}, NAN)]
    cases += [("architectures", None, bad) for bad in ("CvtModel", [1], [None], {"a": 1}, True, 3)]
    for name in ("torch_dtype", "dtype", "transformers_version", "_name_or_path"):
        cases += [(name, None, bad) for bad in (5, 1.5, True, ["float32"], {"a": "b"})]
    return cases


CASES = _cases()


def _case_id(case):
    name, stage, bad = case
    return f"{name}{'' if stage is None else f'[{stage}]'}={bad!r}"


def _with(name, stage, bad) -> dict:
    data = CvtConfig().to_dict()
    data.pop("id2label"), data.pop("label2id")
    if name == "num_labels":
        data["num_labels"] = bad
    elif stage is None:
        data[name] = bad
    else:
        data[name] = list(data[name])
        data[name][stage] = bad
    return data


def _assert_one_line_naming(exc: BaseException, name: str, stage, bad) -> None:
    message = str(exc)
    assert "\n" not in message, message
    field = name if stage is None else f"{name}[{stage}]"
    if name == "return_dict":
        field = "return_dict"
    assert field in message, (field, message)
    shown = [repr(bad)] + ([repr(item) for item in bad] if isinstance(bad, list) else [])  # or the wrong entry
    assert any(text in message for text in shown) or (name in PER_STAGE_FIELDS and stage is None), (shown, message)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_each_field_refuses_wrong_types_with_one_line_naming_field_and_value(case):
    name, stage, bad = case
    with pytest.raises(ValueError) as caught:
        CvtConfig.from_dict(_with(name, stage, bad))
    _assert_one_line_naming(caught.value, name, stage, bad)


JSON_CASES = [c for c in CASES if not (isinstance(c[2], float) and not math.isfinite(c[2]))]


@pytest.mark.parametrize("case", JSON_CASES[::5], ids=[_case_id(c) for c in JSON_CASES[::5]])
def test_wrong_types_in_config_json_are_refused_on_load_naming_the_file(tmp_path, case):
    name, stage, bad = case
    (tmp_path / "config.json").write_text(json.dumps(_with(name, stage, bad), allow_nan=False))
    with pytest.raises(ValueError) as caught:
        CvtConfig.from_pretrained(tmp_path)
    _assert_one_line_naming(caught.value, name, stage, bad)
    assert str(caught.value).startswith(str(tmp_path / "config.json") + ": ")


def test_python_built_configs_are_as_strict_as_files():
    with pytest.raises(ValueError, match=r"^num_labels must be an integer, got 3\.7$"):
        CvtConfig(num_labels=3.7)
    with pytest.raises(ValueError, match=r"^output_attentions must be true or false, got 'false'$"):
        CvtConfig(output_attentions="false")
    with pytest.raises(ValueError, match=r"^embed_dim\[2\] must be an integer, got 384\.0$"):
        CvtConfig(embed_dim=[64, 192, 384.0])
    config = CvtConfig()
    with pytest.raises(ValueError, match="num_labels must be an integer, got 2.5"):
        config.num_labels = 2.5
    assert config.num_labels == 2
    config.output_hidden_states = 1  # attributes set later are checked when a model validates the config
    with pytest.raises(ValueError, match="output_hidden_states must be true or false, got 1"):
        config.validate()


def test_accepted_spellings_stay_accepted():
    # ints where floats are expected, tuples for lists, image_size as an int or [h, w], null problem_type
    config = CvtConfig(mlp_ratio=(4, 4, 4), drop_rate=[0, 0, 0], initializer_range=0, image_size=[224, 192],
                       problem_type=None, layer_norm_eps=1e-5)
    assert config.mlp_ratio == [4, 4, 4] and config.image_size == [224, 192]
    assert CvtConfig(image_size=384).image_size == 384


def test_transformers_config_files_still_load(tmp_path):
    import transformers

    data = transformers.CvtConfig().to_dict()  # every generic key, "dtype": null, "architectures": null
    assert CvtConfig.from_dict(data).embed_dim == [64, 192, 384]
    transformers.CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], num_labels=4).save_pretrained(tmp_path)
    config = CvtConfig.from_pretrained(tmp_path)
    assert config.num_labels == 4 and config.id2label == {i: f"LABEL_{i}" for i in range(4)}
    # ours, written and read back, and read by transformers
    CvtConfig.from_preset("cvt-13").save_pretrained(tmp_path / "ours")
    assert CvtConfig.from_pretrained(tmp_path / "ours") == CvtConfig.from_preset("cvt-13")
    assert transformers.CvtConfig.from_pretrained(tmp_path / "ours").num_labels == 1000


def test_hub_style_label_maps_with_a_label_named_twice_load():
    # ImageNet-1k names "crane" (134 and 517) twice, so the hub's label2id has fewer entries than id2label
    id2label = {str(i): f"class {i}" for i in range(6)}
    id2label["4"] = "crane"
    id2label["1"] = "crane"
    label2id = {v: int(k) for k, v in id2label.items()}
    config = CvtConfig.from_dict({"id2label": id2label, "label2id": label2id})
    assert config.num_labels == 6 and config.label2id["crane"] == 4 and config.id2label[1] == "crane"
    # label2id values written as strings, as some hub files do
    assert CvtConfig(id2label={"0": "a", "1": "b"}, label2id={"a": "0", "b": "1"}).label2id == {"a": 0, "b": 1}


@pytest.mark.parametrize("id2label, message", [
    ({"0": "a", "2": "b"}, r"id2label has the class id '2' but 2 labels are class ids 0\.\.1"),
    ({"1": "a", "2": "b", "3": "c"}, r"class id '3' but 3 labels are class ids 0\.\.2"),
    ({"-1": "a", "0": "b"}, r"id2label has the class id '-1'; class ids are the integers"),
    ({"01": "a", "1": "b"}, r"class id '01'"),
    ({"1.0": "a", "0": "b"}, r"class id '1\.0'"),
    ({" 1": "a", "0": "b"}, r"class id ' 1'"),
    ({"x": "a"}, r"class id 'x'"),
    ({0: "a", "0": "b"}, r"id2label names class 0 twice \(key '0'\)"),
    ({True: "a", 0: "b"}, r"class id True"),
    ({0: 1, 1: "b"}, r"id2label\[0\] must be a label string, got 1"),
    ({0: None}, r"id2label\[0\] must be a label string, got None"),
    ([["0", "a"]], r"id2label must be a mapping"),
    ("abc", r"id2label must be a mapping"),
])
def test_id2label_keys_must_be_exactly_the_class_ids(id2label, message):
    with pytest.raises(ValueError, match=message) as caught:
        CvtConfig(id2label=id2label)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("label2id, message", [
    ({"a": 1, "b": 0}, r"label2id\['a'\]=1 disagrees with id2label \(id2label\[1\]='b'\)"),
    ({"a": 5}, r"label2id\['a'\]=5 disagrees with id2label \(no class\)"),
    ({"a": 0, "b": 1, "c": 2}, r"label2id has 3 entries but there are 2 classes"),
    ({"a": 0.0}, r"label2id\['a'\] has the class id 0\.0"),
    ({"a": True}, r"label2id\['a'\] has the class id True"),
    ({1: 0}, r"label2id keys must be label strings, got 1"),
    (["a"], r"label2id must be a mapping"),
])
def test_label2id_must_agree_with_id2label(label2id, message):
    with pytest.raises(ValueError, match=message) as caught:
        CvtConfig(id2label={0: "a", 1: "b"}, label2id=label2id)
    assert "\n" not in str(caught.value)


def test_num_labels_and_id2label_must_agree_and_a_new_label_map_replaces_the_old_inverse():
    with pytest.raises(ValueError, match="num_labels=3 but id2label has 2 entries"):
        CvtConfig(num_labels=3, id2label={0: "a", 1: "b"})
    config = CvtConfig(id2label={0: "a", 1: "b"}).copy(id2label={0: "x", 1: "y", 2: "z"})
    assert config.label2id == {"x": 0, "y": 1, "z": 2}
    assert CvtConfig(id2label={0: "a", 1: "b"}).copy(num_labels=5).num_labels == 5


# ------------------------------------------------------------------------------------------------ strict JSON
@pytest.mark.parametrize("text, message", [
    ("[" * 100000 + "]" * 100000, r"JSON nested 100000 levels deep; at most 64 are accepted"),
    ('{"a": ' * 100000 + "1" + "}" * 100000, r"JSON nested 100000 levels deep"),
    ('{"initializer_range": NaN}', r"refused JSON: NaN is not a number JSON allows"),
    ('{"layer_norm_eps": Infinity}', r"refused JSON: Infinity is not a number JSON allows"),
    ('{"num_channels": 3, "num_channels": 4}', r"refused JSON: key 'num_channels' appears twice"),
    ('{"id2label": {"0": "a", "0": "b"}}', r"refused JSON: key '0' appears twice"),
    ("[1, 2, 3]", r"a config.json must hold a JSON object, got list"),
    ('"config"', r"a config.json must hold a JSON object, got str"),
    ("{not json", r"not valid JSON"),
])
def test_config_json_is_parsed_strictly_with_one_line_errors(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        CvtConfig.from_pretrained(tmp_path)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(tmp_path / "config.json"))


def test_config_json_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo" / "config.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    code = (f"from cvt_core.config import CvtConfig\n"
            f"try:\n    CvtConfig.from_pretrained({str(fifo.parent)!r})\n"
            f"except ValueError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{fifo}: is a named pipe (FIFO); only regular files are read"
    with pytest.raises(ValueError, match=r"/dev/zero: is a device; only regular files are read"):
        CvtConfig.from_json_file("/dev/zero")
    with pytest.raises(FileNotFoundError, match="no such config file"):
        CvtConfig.from_json_file(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------------ budget
def test_parameter_count_formula_equals_the_weight_table():
    configs = [CvtConfig.from_preset(name) for name in PRESETS]
    configs += [
        CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[2, 1, 3], num_labels=0,
                  qkv_projection_method=["avg", "linear", "dw_bn"], qkv_bias=[False, True, False],
                  cls_token=[True, False, True], mlp_ratio=[2.5, 1.0, 3.0], kernel_qkv=[3, 5, 5],
                  padding_q=[1, 2, 2], patch_sizes=[5, 3, 3]),
        CvtConfig(num_channels=1, embed_dim=[12], num_heads=[2], depth=[3], patch_sizes=[3], patch_stride=[2],
                  patch_padding=[1], mlp_ratio=[4.0], attention_drop_rate=[0.0], drop_rate=[0.0], drop_path_rate=[0.0],
                  qkv_bias=[True], cls_token=[False], qkv_projection_method=["dw_bn"], kernel_qkv=[3], padding_kv=[1],
                  stride_kv=[1], padding_q=[1], stride_q=[1], num_labels=7),
    ]
    for config in configs:
        for with_head in (True, False):
            assert parameter_count(config, with_head) == count_parameters(config, with_head)


@pytest.mark.parametrize("name", ["cvt-13", "cvt-21", "cvt-w24", "cvt-13-384", "cvt-21-384", "cvt-w24-384"])
def test_presets_are_well_inside_the_budget(name):
    config = CvtConfig.from_preset(name)
    assert parameter_count(config) < Limits.MODEL_PARAMETERS / 5
    assert activation_elements(config)[0] < Limits.ACTIVATION_ELEMENTS / 20


ONE_WIDE_STAGE = dict(embed_dim=[65536], num_heads=[1], depth=[1], patch_sizes=[7], patch_stride=[4],
                      patch_padding=[2], mlp_ratio=[1.0], attention_drop_rate=[0.0], drop_rate=[0.0],
                      drop_path_rate=[0.0], qkv_bias=[True], cls_token=[True], qkv_projection_method=["dw_bn"],
                      kernel_qkv=[3], padding_kv=[1], stride_kv=[2], padding_q=[1], stride_q=[1])


def _run_limited(code: str) -> str:
    """`code` in a child process whose address space is capped at 2 GiB; its stdout."""
    prelude = ("import resource\n"
               "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n")
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_budget_refuses_huge_models_before_allocating_in_2_gib(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ONE_WIDE_STAGE))
    out = _run_limited(f"""
        import time
        from cvt_core.config import CvtConfig, ModelTooLargeError
        started = time.perf_counter()
        for source in ({str(tmp_path)!r}, "preset"):
            try:
                if source == "preset":
                    CvtConfig.from_preset("cvt-13", image_size=16384)
                else:
                    CvtConfig.from_pretrained(source)
            except ModelTooLargeError as exc:
                print(exc)
        # a valid config changed afterwards is refused by the model's constructor, before any weight
        import torch
        from cvt_torch import CvtForImageClassification
        config = CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 2], num_labels=3)
        config.embed_dim, config.num_heads, config.mlp_ratio = [8, 16, 65536], [1, 2, 1], [4.0, 4.0, 1.0]
        try:
            CvtForImageClassification(config)
        except ModelTooLargeError as exc:
            print(exc)
        print(f"seconds {{time.perf_counter() - started:.1f}}")
    """)
    lines = out.strip().splitlines()
    assert len(lines) == 4, out
    assert lines[0].startswith(f"{tmp_path / 'config.json'}: the model would have ")
    assert lines[0].endswith("GB in float32); at most 2,000,000,000 are accepted (lower embed_dim, depth, mlp_ratio "
                             "or num_labels)")
    assert lines[1].startswith("one image would need ") and "of a 16384x16384 image" in lines[1]
    assert "at most 2,000,000,000 are accepted" in lines[1]
    assert lines[2].startswith("the model would have ")
    assert float(lines[3].split()[1]) < 120


@pytest.mark.parametrize("overrides, figure", [
    (dict(ONE_WIDE_STAGE), "the model would have 25,782,779,906 parameters (103.1 GB in float32)"),
    (dict(embed_dim=[64, 192, 49152], num_heads=[1, 3, 6], mlp_ratio=[4.0, 4.0, 1.0]), "parameters"),
    # the head's share of the parameters: a million labels (seconds to build and check their label maps)
    pytest.param(dict(num_labels=1 << 20, embed_dim=[64, 192, 4096], num_heads=[1, 3, 8]), "parameters",
                 marks=pytest.mark.slow),
    (dict(image_size=16384), "one image would need"),
    (dict(image_size=[2048, 2048]), "one image would need"),
    (dict(image_size=[64, 16384], patch_stride=[1, 2, 2], patch_padding=[3, 1, 1]), "one image would need"),
    # within every per-field bound, tiny in parameters: the zero-padded grids the convolutions read are the cost
    (dict(image_size=32, patch_sizes=[1, 3, 3], patch_stride=[16384, 2, 2], patch_padding=[16384, 1, 1]),
     "the patch embedding's padded input (3 channels), 32,800x32,800"),
    (dict(image_size=32, embed_dim=[64, 64, 64], num_heads=[1, 1, 1], padding_kv=[4096, 1, 1]),
     "the q/k/v projection's input padded by padding_kv=4096"),
])
def test_budget_refusal_names_the_figure_and_the_limit(overrides, figure):
    with pytest.raises(ModelTooLargeError) as caught:
        CvtConfig(**overrides)
    message = str(caught.value)
    assert figure in message and "at most 2,000,000,000 are accepted" in message and "\n" not in message
    assert isinstance(caught.value, ValueError)


def test_a_config_of_more_blocks_than_any_cvt_is_refused_before_a_block_is_built():
    """Building a block costs about a second and 10 MB in Keras whatever its width: 256 blocks of width 8 (a
    2.6 MB checkpoint) took 284 s and 3.3 GB."""
    with pytest.raises(ModelTooLargeError) as caught:
        CvtConfig(embed_dim=[8, 8, 8], num_heads=[1, 1, 1], depth=[1, 1, 256], image_size=32)
    assert "258 transformer blocks" in str(caught.value) and "at most 128" in str(caught.value)
    CvtConfig(embed_dim=[8, 8, 8], num_heads=[1, 1, 1], depth=[1, 1, 126], image_size=32)


STRIDE_ONE = dict(embed_dim=[8], num_heads=[1], depth=[1], patch_sizes=[3], patch_stride=[1], patch_padding=[1],
                  mlp_ratio=[2.0], attention_drop_rate=[0.0], drop_rate=[0.0], drop_path_rate=[0.0], qkv_bias=[True],
                  cls_token=[False], qkv_projection_method=["dw_bn"], kernel_qkv=[3], padding_kv=[1], stride_kv=[1],
                  padding_q=[1], stride_q=[1], image_size=32)


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_an_input_larger_than_the_config_image_size_is_held_to_the_same_activation_bound(framework):
    """A preprocessing config may resize to 8192 while config.json says 32: the models check every input's size
    against the bound before computing (the attention of a 256x256 input here would be 65536 x 65536)."""
    import numpy as np

    config = CvtConfig(**STRIDE_ONE)
    x = np.zeros((1, 3, 256, 256), np.float32)
    if framework == "torch":
        import torch

        from cvt_torch import CvtModel

        with pytest.raises(ModelTooLargeError) as caught, torch.no_grad():
            CvtModel(config).eval()(torch.from_numpy(x))
    else:
        from cvt_tf import TFCvtModel

        with pytest.raises(ValueError) as caught:  # Keras wraps the one line in its own call report
            TFCvtModel(config)(x.transpose(0, 2, 3, 1))
    message = str(caught.value)
    assert "pixel_values of 256x256: one image would need" in message and "65,536x65,536" in message
