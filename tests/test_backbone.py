"""CvT as a dense-task backbone: `cvt_torch.CvtBackbone` and `cvt_tf.TFCvtBackbone` return the chosen stages'
maps with transformers' stage names, the true strides and the sizes `cvt_core.shapes` gives for any input, equal
to transformers' `hidden_states` and to each other, load classifier checkpoints strictly below the head, and the
Keras one trains under `fit` and round-trips through `.keras`."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import cvt_tf  # noqa: E402
import cvt_torch  # noqa: E402
from conversion_helpers import TINY  # noqa: E402
from cvt_core import CvtConfig  # noqa: E402
from cvt_core.backbone import resolve_out_features, stage_names, stage_strides  # noqa: E402
from cvt_core.shapes import stage_output_sizes  # noqa: E402
from hf_oracle import assert_close, make_hf_checkpoint  # noqa: E402


def _uniform(count, **fields):
    return {name: [value] * count for name, value in fields.items()}


ODD_CONFIGS = {
    "two-stages": dict(embed_dim=[8, 16], num_heads=[1, 2], depth=[1, 1], cls_token=[False, True],
                       **_uniform(2, patch_sizes=7, patch_stride=4, patch_padding=2, mlp_ratio=4.0,
                                  attention_drop_rate=0.0, drop_rate=0.0, drop_path_rate=0.0, qkv_bias=True,
                                  qkv_projection_method="dw_bn", kernel_qkv=3, padding_kv=1, stride_kv=2,
                                  padding_q=1, stride_q=1)),
    "four-stages-cls-on-stage-2": dict(embed_dim=[8, 16, 24, 32], num_heads=[1, 2, 3, 4], depth=[1, 2, 1, 1],
                                       cls_token=[False, True, False, False],
                                       **_uniform(4, patch_sizes=3, patch_stride=2, patch_padding=1, mlp_ratio=4.0,
                                                  attention_drop_rate=0.0, drop_rate=0.0, drop_path_rate=0.0,
                                                  qkv_bias=True, qkv_projection_method="dw_bn", kernel_qkv=3,
                                                  padding_kv=1, stride_kv=2, padding_q=1, stride_q=1)),
    "tiny": dict(TINY),
}
NON_SQUARE = (72, 52)  # neither side a multiple of 16


@pytest.mark.parametrize("preset, strides, channels", [("cvt-13", [4, 8, 16], [64, 192, 384]),
                                                       ("cvt-21", [4, 8, 16], [64, 192, 384]),
                                                       ("cvt-w24", [4, 8, 16], [192, 768, 1024])])
def test_preset_backbones_name_three_stages_at_strides_4_8_16(preset, strides, channels):
    config = CvtConfig.from_preset(preset)
    assert stage_names(config) == ["stem", "stage1", "stage2", "stage3"]
    assert stage_strides(config) == [1, *strides]
    model = cvt_torch.CvtBackbone(CvtConfig.from_preset(preset, depth=[1, 1, 1]), out_indices=[1, 2, 3])
    assert model.out_features == ["stage1", "stage2", "stage3"]
    assert (model.strides, model.channels) == (strides, channels)


@pytest.mark.parametrize("name", list(ODD_CONFIGS))
def test_every_stage_map_has_the_size_cvt_core_gives_for_a_non_square_input_in_both_frameworks(name, tmp_path):
    config = CvtConfig(**ODD_CONFIGS[name])
    stages = stage_names(config)[1:]
    sizes = stage_output_sizes(config, *NON_SQUARE)
    pixels = np.random.default_rng(0).standard_normal((2, 3, *NON_SQUARE)).astype(np.float32)
    torch_model = cvt_torch.CvtBackbone(config, out_features=stages).eval()
    with torch.no_grad():
        torch_maps = torch_model(torch.from_numpy(pixels)).feature_maps
    keras_model = cvt_tf.TFCvtBackbone.from_pretrained(torch_model.save_pretrained(tmp_path), out_features=stages)
    keras_maps = keras_model(pixels).feature_maps
    expected = [(2, width, h, w) for width, (h, w) in zip(config.embed_dim, sizes)]
    assert [tuple(m.shape) for m in torch_maps] == expected
    assert [tuple(m.shape) for m in keras_maps] == expected
    assert all(m.is_contiguous() for m in torch_maps)
    for torch_map, keras_map in zip(torch_maps, keras_maps):
        assert_close(np.asarray(keras_map), torch_map.numpy(), "Keras vs PyTorch")


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory):
    """A transformers classifier checkpoint, and transformers' own CvtModel on the same weights."""
    import transformers

    directory = tmp_path_factory.mktemp("backbone") / "hf"
    make_hf_checkpoint(str(directory), dict(TINY, num_labels=5), seed=3)
    bare = transformers.CvtModel.from_pretrained(str(directory)).eval()
    return directory, bare


def test_both_backbones_from_a_classifier_checkpoint_equal_transformers_hidden_states_and_load_strictly(
        classifier_checkpoint):
    directory, reference = classifier_checkpoint
    pixels = np.random.default_rng(1).standard_normal((2, 3, *NON_SQUARE)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(pixels), output_hidden_states=True).hidden_states
    stages = ["stage1", "stage2", "stage3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the head is left out without a word; anything else would warn
        torch_model = cvt_torch.CvtBackbone.from_pretrained(directory, out_features=stages)
        keras_model = cvt_tf.TFCvtBackbone.from_pretrained(str(directory), out_features=stages)
    with torch.no_grad():
        torch_maps = torch_model(torch.from_numpy(pixels)).feature_maps
    keras_output = keras_model(pixels)
    assert len(expected) == 3
    for stage, want, got_torch, got_keras in zip(stages, expected, torch_maps, keras_output.feature_maps):
        assert_close(got_torch.numpy(), want.numpy(), f"PyTorch {stage}")
        assert_close(np.asarray(got_keras), want.numpy(), f"Keras {stage}")
    assert list(keras_output.pyramid_outputs) == ["P2", "P3", "P4"]
    assert all(keras_output.pyramid_outputs[key] is m for key, m in zip(["P2", "P3", "P4"], keras_output.feature_maps))


def test_the_stem_is_the_pixel_input_and_the_default_is_the_last_stage():
    config = CvtConfig(**TINY)
    model = cvt_torch.CvtBackbone(config, out_indices=[0, -1]).eval()
    assert model.out_features == ["stem", "stage3"] and model.strides == [1, 16] and model.channels == [3, 48]
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem, last = model(pixels).feature_maps
    assert torch.equal(stem, pixels) and last.shape == (1, 48, 4, 4)
    assert cvt_torch.CvtBackbone(config).out_features == ["stage3"]
    assert cvt_tf.TFCvtBackbone(config, data_format="channels_first").out_indices == [3]


@pytest.mark.parametrize("out_features, out_indices, fragments", [
    (["stage1", "stage9"], None, ["stage9", "'stem', 'stage1', 'stage2', 'stage3'"]),
    (None, [1, 4], ["index 4 is out of range"]),
    (["stage2", "stage1"], None, ["in the order of"]),
    (["stage1", "stage1"], None, ["at most once"]),
    (["stage1"], [2], ["name different stages"]),
    ("stage1", None, ["a list of stage names"]),
])
def test_a_bad_stage_choice_is_one_line_naming_the_valid_ones_in_both_frameworks(out_features, out_indices,
                                                                               fragments):
    config = CvtConfig(**TINY)
    for build in (cvt_torch.CvtBackbone, cvt_tf.TFCvtBackbone,
                  lambda *a, **k: resolve_out_features(*a, **k)):
        with pytest.raises(ValueError) as caught:
            build(config, out_features=out_features, out_indices=out_indices)
        message = str(caught.value)
        assert "\n" not in message and all(f in message for f in fragments), message


def test_keras_backbone_trains_a_dense_head_under_fit_and_round_trips_through_a_keras_file(tmp_path):
    keras.utils.set_random_seed(0)
    config = CvtConfig(**TINY)
    backbone = cvt_tf.TFCvtBackbone(config, out_features=["stage2", "stage3"], data_format="channels_last")
    head = keras.layers.Dense(1, name="per_pixel")

    class DenseRegressor(keras.Model):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = backbone, head

        def call(self, images, training=False):
            return self.head(self.backbone(images, training=training).pyramid_outputs["P4"])

    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 64, 64, 3)).astype(np.float32)
    targets = images[:, ::16, ::16, :1] * 0.5  # a per-pixel target on the stride-16 grid
    model = DenseRegressor()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    statistics = lambda: [np.array(v) for v in backbone.weights if "moving_mean" in v.path]  # noqa: E731
    model(images[:1])
    before = statistics()
    history = model.fit(images, targets, batch_size=8, epochs=6, verbose=0).history["loss"]
    assert history[-1] < history[0], history
    assert any(not np.allclose(a, b) for a, b in zip(before, statistics()))  # BatchNorm statistics move in fit

    path = str(tmp_path / "backbone.keras")
    backbone.save(path)
    restored = keras.models.load_model(path)
    assert restored.out_features == ["stage2", "stage3"] and restored.data_format == "channels_last"
    for got, want in zip(restored(images[:2]).feature_maps, backbone(images[:2]).feature_maps):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("with_head", [True, False], ids=["classifier", "bare"])
def test_timm_forward_intermediates_and_feature_info_give_the_stage_maps_at_their_true_reductions(with_head):
    config = CvtConfig(**dict(TINY, num_labels=4))
    model = (cvt_torch.CvtForImageClassification if with_head else cvt_torch.CvtModel)(config).eval()
    pixels = torch.randn(2, 3, *NON_SQUARE)
    info = model.feature_info
    assert [(i["num_chs"], i["reduction"]) for i in info] == [(16, 4), (32, 8), (48, 16)]
    modules = dict(model.named_modules())
    assert all(i["module"] in modules for i in info)
    with torch.no_grad():
        hidden = (model.cvt if with_head else model)(pixels, output_hidden_states=True).hidden_states
        features, maps = model.forward_intermediates(pixels)
        last_two = model.forward_intermediates(pixels, indices=2, output_fmt="NHWC", intermediates_only=True)
        chosen = model.forward_intermediates(pixels, indices=[0, -1], intermediates_only=True)
    assert len(maps) == 3 and all(torch.equal(a, b) for a, b in zip(maps, hidden))
    assert [tuple(m.shape) for m in last_two] == [(2, 9, 7, 32), (2, 5, 4, 48)]
    assert torch.equal(last_two[1], hidden[2].permute(0, 2, 3, 1))
    assert torch.equal(chosen[0], hidden[0]) and torch.equal(chosen[1], hidden[2])
    if with_head:
        with torch.no_grad():
            assert (features - model.forward_features(pixels)).abs().max() <= 1e-5
            normed = model.forward_intermediates(pixels, indices=1, norm=True, intermediates_only=True)[0]
            want = model.layernorm(hidden[2].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        assert torch.equal(normed, want)
    else:
        assert torch.equal(features, hidden[2])
        with pytest.raises(ValueError, match="final LayerNorm"):
            model.forward_intermediates(pixels, norm=True)
    with pytest.raises(ValueError, match="numbered 0 to 2"):
        model.forward_intermediates(pixels, indices=[3])
