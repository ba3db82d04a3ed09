"""Keras-native formats and bit-exact round trips torch -> keras -> torch (and through tf_model.h5), also for
configs transformers cannot build (a cls token on stage 0, the "avg" and "linear" projections, depth 1 stages)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conversion_helpers import cli, read_safetensors
from cvt_core import CvtConfig

VARIANT = dict(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 2], cls_token=[True, False, True],
               qkv_projection_method=["avg", "dw_bn", "linear"], num_labels=3, image_size=48)
PIXELS = np.random.default_rng(5).standard_normal((2, 3, 48, 48)).astype(np.float32)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random checkpoint of the variant config saved by our PyTorch model (BatchNorm statistics randomised)."""
    from conversion.pipeline import make_random_checkpoint

    from cvt_core.checkpoint import write_safetensors

    root = tmp_path_factory.mktemp("keras-roundtrip")
    make_random_checkpoint(str(root / "src"), CvtConfig(**VARIANT), seed=7)
    # values a lossy path would change: a subnormal (TensorFlow flushes them in arithmetic) and a negative zero
    state = read_safetensors(str(root / "src" / "model.safetensors"))
    weight = state["cvt.encoder.stages.1.layers.0.intermediate.dense.weight"].copy()
    weight[0, :3] = np.array([1e-40, -1e-42, -0.0], np.float32)
    state["cvt.encoder.stages.1.layers.0.intermediate.dense.weight"] = weight
    write_safetensors(str(root / "src" / "model.safetensors"), state)
    return root


def _torch_outputs(directory):
    from cvt_torch import CvtForImageClassification

    model = CvtForImageClassification.from_pretrained(str(directory))
    with torch.no_grad():
        out = model(torch.from_numpy(PIXELS), output_hidden_states=True)
    return [out.logits.numpy()] + [h.numpy() for h in out.hidden_states]


def _assert_bit_exact(back_dir, source_dir):
    source = read_safetensors(os.path.join(source_dir, "model.safetensors"))
    back = read_safetensors(os.path.join(back_dir, "model.safetensors"))
    assert sorted(back) == sorted(source)
    for key, value in source.items():
        if key.endswith("num_batches_tracked"):
            assert int(back[key]) == 0  # Keras has no batch counter (documented)
        else:
            assert back[key].dtype == value.dtype
            assert back[key].tobytes() == value.tobytes(), key  # bit for bit: subnormals and -0.0 included


@pytest.mark.parametrize("via", ["model.keras", "model.weights.h5", "tf_model.h5"])
def test_torch_to_keras_to_torch_is_bit_exact(source, tmp_path, via):
    middle = tmp_path / "middle"
    target = "hf-tf" if via == "tf_model.h5" else "keras"
    code, out, err = cli("convert", source / "src", middle, "--to", target)
    assert code == 0, err
    src = middle / via if via != "tf_model.h5" else middle
    code, out, err = cli("convert", src, tmp_path / "back", "--to", "torch")
    assert code == 0, err
    _assert_bit_exact(str(tmp_path / "back"), str(source / "src"))
    for got, want in zip(_torch_outputs(tmp_path / "back"), _torch_outputs(source / "src"), strict=True):
        np.testing.assert_array_equal(got, want)


def test_keras_file_loads_with_keras_load_model_and_computes_what_torch_computes(source, tmp_path):
    code, out, err = cli("convert", source / "src", tmp_path / "k", "--to", "keras")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "k")) == [".cvt-manifest.json", "config.json", "model.keras", "model.weights.h5", "preprocessor_config.json"]
    import keras

    from cvt_tf import TFCvtForImageClassification

    model = keras.models.load_model(str(tmp_path / "k" / "model.keras"))
    assert isinstance(model, TFCvtForImageClassification)
    assert model.config.cls_token == [True, False, True]
    out_keras = model(PIXELS, output_hidden_states=True, training=False)
    expected = _torch_outputs(source / "src")
    got = [np.asarray(out_keras.logits)] + [np.asarray(h) for h in out_keras.hidden_states]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5 * max(1.0, float(np.abs(e).max())))

    weights_only = TFCvtForImageClassification(CvtConfig.from_pretrained(str(tmp_path / "k")), data_format="channels_first")
    weights_only.build_with_dummy_input()
    weights_only.load_weights(str(tmp_path / "k" / "model.weights.h5"))
    np.testing.assert_array_equal(np.asarray(weights_only(PIXELS, training=False).logits), got[0])


def test_our_from_pretrained_loads_a_converted_folder_in_both_frameworks(source, tmp_path):
    code, out, err = cli("convert", source / "src", tmp_path / "all")
    assert code == 0, err
    from cvt_tf import TFCvtForImageClassification

    keras_model = TFCvtForImageClassification.from_pretrained(str(tmp_path / "all"))
    expected = _torch_outputs(tmp_path / "all")
    got = np.asarray(keras_model(PIXELS, training=False).logits)
    np.testing.assert_allclose(got, expected[0], rtol=0, atol=1e-5 * max(1.0, float(np.abs(expected[0]).max())))


def test_from_pretrained_reads_a_folder_holding_only_tf_model_h5_in_both_frameworks(source, tmp_path):
    """What transformers' TF save_pretrained or `cvt convert --to hf-tf` leaves (config.json + tf_model.h5) is a
    checkpoint folder for both models' from_pretrained, BatchNorm statistics included."""
    code, out, err = cli("convert", source / "src", tmp_path / "tf", "--to", "hf-tf")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "tf")) == [".cvt-manifest.json", "config.json", "preprocessor_config.json", "tf_model.h5"]
    from cvt_tf import TFCvtForImageClassification
    from cvt_torch import CvtForImageClassification

    expected = _torch_outputs(source / "src")
    torch_model = CvtForImageClassification.from_pretrained(str(tmp_path / "tf"))
    source_state = read_safetensors(str(source / "src" / "model.safetensors"))
    for name, value in torch_model.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert value.numpy().tobytes() == source_state[name].tobytes(), name
    assert [a.tobytes() for a in _torch_outputs(tmp_path / "tf")] == [a.tobytes() for a in expected]
    keras_model = TFCvtForImageClassification.from_pretrained(str(tmp_path / "tf"))
    got = np.asarray(keras_model(PIXELS, training=False).logits)
    np.testing.assert_allclose(got, expected[0], rtol=0, atol=1e-5 * max(1.0, float(np.abs(expected[0]).max())))

    # a new head from the same TF weights: the load plan's rules apply as for PyTorch weights
    with pytest.raises(ValueError, match="classifier.weight"):
        CvtForImageClassification.from_pretrained(str(tmp_path / "tf"), num_labels=5)
    with pytest.warns(UserWarning, match="re-initialised"):
        fresh = TFCvtForImageClassification.from_pretrained(str(tmp_path / "tf"), num_labels=5,
                                                            ignore_mismatched_sizes=True)
    assert fresh(PIXELS, training=False).logits.shape == (2, 5)


def test_from_pretrained_on_a_keras_only_folder_says_how_to_load_it(source, tmp_path):
    code, out, err = cli("convert", source / "src", tmp_path / "k", "--to", "keras")
    assert code == 0, err
    from cvt_torch import CvtForImageClassification

    with pytest.raises(ValueError, match="keras.models.load_model") as caught:
        CvtForImageClassification.from_pretrained(str(tmp_path / "k"))
    assert "tf_model.h5" in str(caught.value) and "model.keras" in str(caught.value)


def test_keras_weights_file_without_config_asks_for_one(source, tmp_path):
    code, out, err = cli("convert", source / "src", tmp_path / "k", "--to", "keras")
    assert code == 0, err
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    os.replace(tmp_path / "k" / "model.weights.h5", lonely / "model.weights.h5")
    code, out, err = cli("convert", lonely / "model.weights.h5", tmp_path / "d")
    assert code == 2 and "--config" in err and err.count("\n") == 1
    code, out, err = cli("convert", lonely / "model.weights.h5", tmp_path / "d", "--config", tmp_path / "k" / "config.json",
                         "--to", "torch")
    assert code == 0, err
    _assert_bit_exact(str(tmp_path / "d"), str(source / "src"))


def test_bare_model_round_trips_through_keras(tmp_path):
    from conversion.pipeline import make_random_checkpoint

    config = CvtConfig(**dict(VARIANT, num_labels=2))
    make_random_checkpoint(str(tmp_path / "src"), config, seed=8, with_head=False)
    code, out, err = cli("convert", tmp_path / "src", tmp_path / "k", "--to", "keras,hf-tf")
    assert code == 0, err
    with open(tmp_path / "k" / "config.json") as f:
        assert json.load(f)["architectures"] == ["CvtModel"]
    code, out, err = cli("convert", tmp_path / "k" / "model.weights.h5", tmp_path / "back", "--to", "torch")
    assert code == 0, err
    _assert_bit_exact(str(tmp_path / "back"), str(tmp_path / "src"))
