"""CvtConfig: transformers compatibility, presets, aliases and validation errors that name the field."""

import json

import pytest

from cvt_core import CvtConfig
from cvt_core.config import PER_STAGE_FIELDS


def test_defaults_equal_transformers_cvt_config():
    import transformers

    ours, theirs = CvtConfig().to_dict(), transformers.CvtConfig().to_dict()
    for name in PER_STAGE_FIELDS + ("num_channels", "initializer_range", "layer_norm_eps"):
        assert ours[name] == theirs[name], name
    assert ours["id2label"] == {str(k): v for k, v in theirs["id2label"].items()}


def test_config_json_from_transformers_loads_and_missing_hidden_act_means_gelu(tmp_path):
    import transformers

    transformers.CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], num_labels=7).save_pretrained(tmp_path)
    assert "hidden_act" not in json.loads((tmp_path / "config.json").read_text())
    config = CvtConfig.from_pretrained(tmp_path)
    assert config.hidden_act == "gelu"
    assert config.embed_dim == [8, 16, 24] and config.num_labels == 7
    assert CvtConfig.from_pretrained(tmp_path / "config.json") == config


def test_save_pretrained_is_loadable_by_transformers_with_image_size(tmp_path):
    import transformers

    ours = CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], num_labels=3, image_size=96, hidden_act="quick_gelu",
                     id2label={0: "cat", 1: "dog", 2: "bird"})
    ours.save_pretrained(tmp_path)
    theirs = transformers.CvtConfig.from_pretrained(tmp_path)
    assert theirs.embed_dim == [8, 16, 24]
    assert theirs.image_size == 96
    assert theirs.id2label == {0: "cat", 1: "dog", 2: "bird"}
    assert CvtConfig.from_pretrained(tmp_path) == ours


def test_layer_norm_eps_is_kept_for_round_trips(tmp_path):
    config = CvtConfig(layer_norm_eps=1e-6)
    config.save_pretrained(tmp_path)
    assert CvtConfig.from_pretrained(tmp_path).layer_norm_eps == 1e-6


def test_mlp_ratios_alias_is_accepted_and_contradiction_is_refused():
    assert CvtConfig(mlp_ratios=[2.0, 3.0, 4.0]).mlp_ratio == [2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="mlp_ratios"):
        CvtConfig(mlp_ratio=[4.0, 4.0, 4.0], mlp_ratios=[2.0, 3.0, 4.0])


@pytest.mark.parametrize("name, depth, width, labels", [
    ("cvt-13", [1, 2, 10], [64, 192, 384], 1000),
    ("cvt-21", [1, 4, 16], [64, 192, 384], 1000),
    ("cvt-w24", [2, 2, 20], [192, 768, 1024], 1000),
    ("microsoft/cvt-13-384-22k", [1, 2, 10], [64, 192, 384], 1000),
])
def test_presets_have_the_papers_architecture(name, depth, width, labels):
    config = CvtConfig.from_preset(name)
    assert config.depth == depth and config.embed_dim == width and config.num_labels == labels
    assert config.image_size == (384 if "384" in name else 224)


def test_preset_overrides_and_unknown_preset():
    assert CvtConfig.from_preset("cvt-13", num_labels=10, hidden_act="quick_gelu").num_labels == 10
    with pytest.raises(ValueError, match="unknown preset 'cvt-99'"):
        CvtConfig.from_preset("cvt-99")


def test_per_layer_drop_path_schedule_is_a_linspace_per_stage():
    config = CvtConfig()
    assert config.drop_path_rates(0) == [0.0]
    rates = config.drop_path_rates(2)
    assert len(rates) == 10 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates[1] == pytest.approx(0.1 / 9)


@pytest.mark.parametrize("kwargs, message", [
    (dict(depth=[1, 2]), r"has 3 entries but depth=\[1, 2\] has 2"),
    (dict(embed_dim=[64, 190, 384]), r"embed_dim\[1\]=190 is not divisible by num_heads\[1\]=3"),
    (dict(patch_stride=[4, 0, 2]), r"patch_stride\[1\] must be positive, got 0"),
    (dict(patch_sizes=[7, -3, 3]), r"patch_sizes\[1\] must be positive, got -3"),
    (dict(padding_kv=[1, -1, 1]), r"padding_kv\[1\] must be non-negative, got -1"),
    (dict(depth=[1, 0, 10]), r"depth\[1\] must be positive, got 0"),
    (dict(qkv_projection_method=["dw_bn", "conv", "dw_bn"]), r"qkv_projection_method\[1\]='conv' is unknown"),
    (dict(hidden_act="relu"), r"hidden_act='relu' is unknown"),
    (dict(drop_path_rate=[0.0, 0.0, 1.0]), r"drop_path_rate\[2\] must be in \[0, 1\), got 1.0"),
    (dict(attention_drop_rate=[-0.1, 0.0, 0.0]), r"attention_drop_rate\[0\] must be in \[0, 1\)"),
    (dict(mlp_ratio=[4.0, 0.0, 4.0]), r"mlp_ratio\[1\] must be a positive number"),
    (dict(stride_q=[1, 2, 1]), r"stride_q\[1\]=2"),
    (dict(qkv_projection_method=["avg"] * 3, padding_kv=[1, 2, 1]), r"padding_kv\[1\]=2 is more than half of kernel_qkv\[1\]=3"),
    (dict(embed_dim=[64, 192, 384.0]), r"embed_dim\[2\] must be an integer"),
    (dict(cls_token=[0, 0, 1]), r"cls_token\[0\] must be true or false"),
    (dict(problem_type="ranking"), r"problem_type='ranking' is unknown"),
    (dict(num_labels=-1), r"num_labels must be >= 0"),
    (dict(embed_dim=64), r"embed_dim must be a non-empty list"),
])
def test_inconsistent_config_raises_value_error_naming_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CvtConfig(**kwargs)


def test_unknown_keyword_is_a_type_error_listing_known_fields():
    with pytest.raises(TypeError, match="unknown field"):
        CvtConfig(embed_dims=[1, 2, 3])


def test_corrupt_or_foreign_config_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        CvtConfig.from_pretrained(tmp_path)
    bad.write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="not a CvT config"):
        CvtConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such config file"):
        CvtConfig.from_pretrained(tmp_path / "missing")


def test_num_labels_override_replaces_stored_label_map(tmp_path):
    CvtConfig(num_labels=1000).save_pretrained(tmp_path)
    config = CvtConfig.from_pretrained(tmp_path, num_labels=10)
    assert config.num_labels == 10 and len(config.label2id) == 10
