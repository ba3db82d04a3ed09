"""The PyTorch backend against transformers 4.57.6: same outputs on transformers' checkpoints, and checkpoints
that travel both ways (ours load in transformers, transformers' load in ours, bare <-> classifier)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

from cvt_core.checkpoint import PYTORCH_BIN_NAME, SAFETENSORS_NAME
from cvt_torch import CvtConfig, CvtForImageClassification, CvtModel
from hf_oracle import assert_close, make_hf_checkpoint, randomize_

PARITY_CASE_NAMES = ["tiny-64", "tiny-384-batch1", "tiny-nonsquare", "tiny-variants", "tiny-four-stages-bare", "cvt13-224"]
TINY = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3])


def _backbone_outputs_match(outputs, reference, name):
    assert_close(outputs.last_hidden_state.numpy(), reference["last_hidden_state"], f"{name} last_hidden_state")
    if "cls_token_value" in reference:
        assert_close(outputs.cls_token_value.numpy(), reference["cls_token_value"], f"{name} cls_token_value")
    else:
        assert outputs.cls_token_value is None
    expected_hidden = sorted(k for k in reference if k.startswith("hidden_states."))
    assert len(outputs.hidden_states) == len(expected_hidden)
    for i, hidden in enumerate(outputs.hidden_states):
        assert_close(hidden.numpy(), reference[f"hidden_states.{i}"], f"{name} hidden_states.{i}")


def test_every_reference_case_is_covered(hf_reference):
    assert sorted(hf_reference) == sorted(PARITY_CASE_NAMES)


@pytest.mark.parametrize("case_name", PARITY_CASE_NAMES)
def test_outputs_match_transformers_pytorch(hf_reference, case_name):
    ref = hf_reference[case_name]
    model_class = CvtForImageClassification if ref.case.with_head else CvtModel
    model = model_class.from_pretrained(ref.checkpoint)
    assert not model.training
    pixel_values = torch.from_numpy(ref.pixel_values)
    with torch.no_grad():
        if ref.case.with_head:
            labels = None if ref.labels is None else torch.from_numpy(ref.labels)
            result = model(pixel_values, labels=labels)
            assert_close(result.logits.numpy(), ref.torch["logits"], f"{case_name} logits")
            if labels is not None:
                assert_close(result.loss.numpy(), ref.torch["loss"], f"{case_name} loss")
            backbone = model.cvt
        else:
            backbone = model
        outputs = backbone(pixel_values, output_hidden_states=True)
    _backbone_outputs_match(outputs, ref.torch, case_name)


def test_bare_model_loads_classifier_checkpoint(hf_reference):
    ref = hf_reference["tiny-64"]
    model = CvtModel.from_pretrained(ref.checkpoint)
    with torch.no_grad():
        outputs = model(torch.from_numpy(ref.pixel_values), output_hidden_states=True)
    _backbone_outputs_match(outputs, ref.torch, "tiny-64 via CvtModel")


def test_classifier_loads_bare_checkpoint_with_fresh_head_and_warns(hf_reference):
    ref = hf_reference["tiny-four-stages-bare"]
    with pytest.warns(UserWarning, match="no classification head") as caught:
        model = CvtForImageClassification.from_pretrained(ref.checkpoint)
    text = " ".join(str(w.message) for w in caught)
    assert "classifier.weight" in text and "layernorm.weight" in text
    # the fresh head carries the initialisation, the backbone the checkpoint
    assert torch.equal(model.layernorm.weight, torch.ones_like(model.layernorm.weight))
    with torch.no_grad():
        outputs = model.cvt(torch.from_numpy(ref.pixel_values), output_hidden_states=True)
        logits = model(torch.from_numpy(ref.pixel_values)).logits
    _backbone_outputs_match(outputs, ref.torch, "bare checkpoint in classifier")
    assert logits.shape == (ref.case.batch, model.config.num_labels)


def test_pytorch_model_bin_checkpoint_loads(tmp_path):
    directory = str(tmp_path / "bin")
    hf_model = make_hf_checkpoint(directory, dict(TINY, num_labels=3, image_size=48), seed=7, safe_serialization=False)
    assert os.path.exists(os.path.join(directory, PYTORCH_BIN_NAME))
    ours = CvtForImageClassification.from_pretrained(directory)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(x).logits.numpy(), hf_model(x).logits.numpy(), "logits from pytorch_model.bin")


def _random_model(model_class, config, seed=0):
    torch.manual_seed(seed)
    model = model_class(config).eval()
    randomize_(model, seed)  # non-trivial norms, biases and BatchNorm statistics, so naming slips show
    return model


@pytest.mark.parametrize("with_head", [True, False])
def test_saved_checkpoint_loads_in_transformers_with_same_outputs(tmp_path, with_head):
    config = CvtConfig(**TINY, num_labels=4, image_size=64)
    ours = _random_model(CvtForImageClassification if with_head else CvtModel, config, seed=3)
    ours.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / SAFETENSORS_NAME)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["architectures"] == [type(ours).__name__]
    hf_class = transformers.CvtForImageClassification if with_head else transformers.CvtModel
    theirs = hf_class.from_pretrained(str(tmp_path)).eval()
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    for name, tensor in ours_state.items():
        assert torch.equal(tensor, theirs_state[name]), name
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if with_head:
            assert_close(ours(x).logits.numpy(), theirs(x).logits.numpy(), "logits in transformers")
        else:
            assert_close(ours(x).last_hidden_state.numpy(), theirs(x).last_hidden_state.numpy(), "last_hidden_state")


def test_saved_checkpoint_of_config_transformers_cannot_build_roundtrips(tmp_path):
    config = CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 1], cls_token=[True, False, False],
                       qkv_projection_method=["avg", "linear", "dw_bn"], hidden_act="quick_gelu", num_labels=3)
    ours = _random_model(CvtForImageClassification, config, seed=5)
    ours.save_pretrained(tmp_path)
    loaded = CvtForImageClassification.from_pretrained(tmp_path)
    assert loaded.config == CvtConfig.from_pretrained(tmp_path)
    assert loaded.config.hidden_act == "quick_gelu"
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(ours(x).logits, loaded(x).logits)
