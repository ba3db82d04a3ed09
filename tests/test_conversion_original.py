"""Original microsoft/CvT checkpoints: made here in the original naming (renamed by an independent rule, see
conversion_helpers.hf_to_original), imported with QuickGELU, and checked against the original code's computation
(transformers' PyTorch CvT with QuickGELU, which equals it per cvt-facts.md)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers

from conversion_helpers import TINY, cli, hf_to_original, quick_gelu_reference, read_safetensors
from hf_oracle import assert_close, hf_torch_outputs, make_hf_checkpoint


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A tiny original-format checkpoint (flat torch.save), the config.json describing it, and what the original
    code computes on it."""
    root = tmp_path_factory.mktemp("original")
    model = make_hf_checkpoint(str(root / "hf"), dict(TINY, num_labels=4), seed=21)
    reference = quick_gelu_reference(model)
    pixels = np.random.default_rng(21).standard_normal((2, 3, 64, 64)).astype(np.float32)
    expected = hf_torch_outputs(reference, pixels)
    state = {hf_to_original(k): v.clone() for k, v in model.state_dict().items()}
    flat = root / "CvT-tiny-64x64-IN-1k.pth"
    torch.save(state, flat)
    config = dict(TINY, embed_dim=TINY["embed_dim"], num_labels=4)
    config_path = root / "tiny-config.json"
    config_path.write_text(json.dumps(config))
    return dict(root=root, state=state, flat=str(flat), config=str(config_path), pixels=pixels, expected=expected,
                hf_dir=str(root / "hf"))


def test_original_names_follow_the_original_code(original):
    names = set(original["state"])
    for name in ("stage0.patch_embed.proj.weight", "stage2.cls_token", "stage1.blocks.1.attn.conv_proj_k.bn.running_var",
                 "stage2.blocks.2.attn.proj_v.bias", "stage0.blocks.0.mlp.fc2.weight", "norm.bias", "head.weight"):
        assert name in names


def test_original_checkpoint_converts_to_every_format_and_reproduces_the_original_code(original, tmp_path):
    dst = tmp_path / "converted"
    code, out, err = cli("convert", original["flat"], dst, "--config", original["config"])
    assert code == 0, err
    assert "original microsoft/CvT" in out and "hidden_act quick_gelu" in out
    with open(dst / "config.json") as f:
        assert json.load(f)["hidden_act"] == "quick_gelu"
    assert sorted(os.listdir(dst)) == [".cvt-manifest.json", "config.json", "model.keras", "model.safetensors", "model.weights.h5",
                                   "preprocessor_config.json", "tf_model.h5"]

    from cvt_torch import CvtForImageClassification

    ours = CvtForImageClassification.from_pretrained(str(dst))
    with torch.no_grad():
        result = ours(torch.from_numpy(original["pixels"]), output_hidden_states=True)
    assert_close(result.logits.numpy(), original["expected"]["logits"], "torch logits")
    for i, hidden in enumerate(result.hidden_states):
        assert_close(hidden.numpy(), original["expected"][f"hidden_states.{i}"], f"torch hidden_states.{i}")

    from cvt_tf import TFCvtForImageClassification

    keras_model = TFCvtForImageClassification.from_pretrained(str(dst))
    keras_out = keras_model(original["pixels"], output_hidden_states=True, training=False)
    assert_close(np.asarray(keras_out.logits), original["expected"]["logits"], "keras logits")

    # transformers loads the converted folder without complaint (it computes GELU whatever the config says)
    _, info = transformers.CvtForImageClassification.from_pretrained(str(dst), output_loading_info=True)
    assert not any(info.values()), info


def test_same_weights_as_the_transformers_checkpoint_they_came_from(original, tmp_path):
    code, out, err = cli("convert", original["flat"], tmp_path / "d", "--config", original["config"], "--to", "torch",
                         "--no-check")
    assert code == 0, err
    back = read_safetensors(str(tmp_path / "d" / "model.safetensors"))
    source = read_safetensors(os.path.join(original["hf_dir"], "model.safetensors"))
    assert sorted(back) == sorted(source)
    for key, value in source.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)  # num_batches_tracked carried too


@pytest.mark.parametrize("variant", ["state_dict-wrapper", "legacy-serialization", "dataparallel-prefix"])
def test_original_checkpoint_variants_give_identical_weights(original, tmp_path, variant):
    path = tmp_path / "variant.pth"
    if variant == "state_dict-wrapper":
        torch.save({"state_dict": original["state"]}, path)
    elif variant == "legacy-serialization":
        torch.save(original["state"], path, _use_new_zipfile_serialization=False)
    else:
        torch.save({f"module.{k}": v for k, v in original["state"].items()}, path)
    code, out, err = cli("convert", path, tmp_path / "d", "--config", original["config"], "--to", "torch", "--no-check")
    assert code == 0, err
    back = read_safetensors(str(tmp_path / "d" / "model.safetensors"))
    source = read_safetensors(os.path.join(original["hf_dir"], "model.safetensors"))
    for key, value in source.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_hidden_act_can_be_overridden(original, tmp_path):
    code, out, err = cli("convert", original["flat"], tmp_path / "d", "--config", original["config"], "--to", "torch",
                         "--hidden-act", "gelu")
    assert code == 0, err
    with open(tmp_path / "d" / "config.json") as f:
        assert json.load(f)["hidden_act"] == "gelu"


def test_missing_config_names_the_preset_the_shapes_match(tmp_path):
    from cvt_core import CvtConfig
    from conversion.random_weights import random_state

    config = CvtConfig.from_preset("cvt-13", num_labels=10)
    state = {hf_to_original(k): torch.from_numpy(v) for k, v in random_state(config, True, seed=3).items()}
    path = tmp_path / "CvT-13-224x224-IN-1k.pth"
    torch.save(state, path)
    code, out, err = cli("convert", path, tmp_path / "d")
    assert code == 2 and err.count("\n") == 1
    assert "--config" in err and "cvt-13" in err and str(path) in err
    assert not (tmp_path / "d").exists()

    # with the preset: QuickGELU, and the number of labels read from the head
    code, out, err = cli("convert", path, tmp_path / "d", "--config", "cvt-13", "--to", "torch")
    assert code == 0, err
    with open(tmp_path / "d" / "config.json") as f:
        written = json.load(f)
    assert written["hidden_act"] == "quick_gelu" and len(written["id2label"]) == 10
    assert written["embed_dim"] == [64, 192, 384] and written["depth"] == [1, 2, 10]


def test_transformers_names_with_from_original_are_refused(original, tmp_path):
    code, out, err = cli("convert", original["hf_dir"], tmp_path / "d", "--from", "original", "--config",
                         original["config"])
    assert code == 2 and "--from hf" in err and err.count("\n") == 1
    code, out, err = cli("convert", original["flat"], tmp_path / "d", "--from", "hf", "--config", original["config"])
    assert code == 2 and "--from original" in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()
