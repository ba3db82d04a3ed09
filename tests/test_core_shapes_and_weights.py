"""Shape rules, the weight-name table and the NumPy checkpoint layer of cvt_core."""

import os
import pathlib
import zipfile

import numpy as np
import pytest

from cvt_core import CvtConfig, InputTooSmallError, count_parameters, minimum_input_size, stage_output_sizes, weight_table
from cvt_core.checkpoint import CheckpointError, load_pretrained_state, read_safetensors, read_torch_bin, write_safetensors
from cvt_core.shapes import (avg_pool_ceil_output_size, avg_pool_ceil_window_counts, check_pixel_values_shape,
                             stage_geometry)
from cvt_core.weights import WeightLoadError, plan_load

REFERENCE = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def _reference_rows(name: str, section_end: str = "# Section 2"):
    path = REFERENCE / name
    assert path.exists(), f"{path} is missing: the tests expect the project's shared/ folder beside the checkout"
    text = path.read_text().split(section_end)[0]
    return [line.split("\t") for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_table_reproduces_transformers_pytorch_state_dict_in_order():
    rows = _reference_rows("hf-cvt13-pytorch-state-dict.txt")
    expected = [(name, tuple(eval(shape))) for name, shape, _ in rows]
    ours = [(e.torch_name(), e.shape) for e in weight_table(CvtConfig(num_labels=1000))]
    assert ours == expected


def test_table_reproduces_transformers_tf_variable_names_and_shapes():
    rows = _reference_rows("hf-cvt13-tf-weights.txt")
    expected = sorted((name, tuple(eval(shape))) for name, shape, *_ in rows)
    ours = sorted((e.hf_tf_name(), e.keras_shape) for e in weight_table(CvtConfig(num_labels=1000)) if e.has_keras_twin)
    assert ours == expected


def test_original_names_follow_microsoft_cvt():
    names = {e.torch_name(): e.original_name() for e in weight_table(CvtConfig(num_labels=1000))}
    assert names["cvt.encoder.stages.0.embedding.convolution_embeddings.projection.weight"] == "stage0.patch_embed.proj.weight"
    assert names["cvt.encoder.stages.2.cls_token"] == "stage2.cls_token"
    assert names["cvt.encoder.stages.1.layers.1.attention.attention.convolution_projection_key.convolution_projection"
                 ".normalization.running_var"] == "stage1.blocks.1.attn.conv_proj_k.bn.running_var"
    assert names["cvt.encoder.stages.2.layers.9.attention.attention.projection_value.bias"] == "stage2.blocks.9.attn.proj_v.bias"
    assert names["cvt.encoder.stages.2.layers.3.attention.output.dense.weight"] == "stage2.blocks.3.attn.proj.weight"
    assert names["cvt.encoder.stages.2.layers.3.intermediate.dense.weight"] == "stage2.blocks.3.mlp.fc1.weight"
    assert names["cvt.encoder.stages.2.layers.3.layernorm_after.bias"] == "stage2.blocks.3.norm2.bias"
    assert names["layernorm.weight"] == "norm.weight" and names["classifier.bias"] == "head.bias"


@pytest.mark.parametrize("preset, params", [("cvt-13", 19_997_480), ("cvt-21", 31_622_696), ("cvt-w24", 277_196_392)])
def test_parameter_counts_match_the_released_models(preset, params):
    assert count_parameters(CvtConfig.from_preset(preset)) == params


def test_table_follows_config_options_transformers_cannot_build():
    config = CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 1], cls_token=[True, False, False],
                       qkv_projection_method=["avg", "linear", "dw_bn"], qkv_bias=[False, True, True])
    names = [e.torch_name(with_head=False) for e in weight_table(config, with_head=False)]
    assert names[0] == "encoder.stages.0.cls_token"
    assert [e.shape for e in weight_table(config) if e.leaf == "cls_token"] == [(1, 1, 8)]
    assert not any("convolution_projection" in n for n in names if ".stages.0." in n or ".stages.1." in n)
    assert not any(n.startswith("encoder.stages.0") and n.endswith("projection_query.bias") for n in names)
    assert any(n.startswith("encoder.stages.2") and n.endswith("normalization.running_var") for n in names)


def test_keras_layout_round_trips_every_kind_of_kernel():
    rng = np.random.default_rng(0)
    for entry in weight_table(CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 1])):
        array = rng.standard_normal(entry.shape)
        keras_array = entry.to_keras(array)
        assert keras_array.shape == entry.keras_shape
        np.testing.assert_array_equal(entry.from_keras(keras_array), array)
    conv = next(e for e in weight_table(CvtConfig()) if e.layer_type == "conv")
    assert conv.keras_shape == (7, 7, 3, 64)
    dense = next(e for e in weight_table(CvtConfig()) if e.layer_type == "dense" and e.leaf == "weight" and "intermediate" in e.name)
    assert dense.keras_shape == (64, 256)


def test_stage_output_sizes_for_released_resolutions():
    config = CvtConfig()
    assert stage_output_sizes(config, 224, 224) == [(56, 56), (28, 28), (14, 14)]
    assert stage_output_sizes(config, 384, 384) == [(96, 96), (48, 48), (24, 24)]
    assert stage_output_sizes(config, 100, 200) == [(25, 50), (13, 25), (7, 13)]
    geometry = stage_geometry(config, 224, 224)[2]
    assert (geometry.num_tokens, geometry.num_query_tokens, geometry.num_key_tokens) == (197, 197, 50)


def test_too_small_input_names_the_stage_and_the_minimum():
    config = CvtConfig()
    assert minimum_input_size(config) == 3
    with pytest.raises(InputTooSmallError, match=r"input 2x2 is too small: .* at least 3x3"):
        stage_output_sizes(config, 2, 2)


def test_check_pixel_values_shape_explains_layout_mistakes():
    config = CvtConfig()
    assert check_pixel_values_shape(config, (1, 3, 32, 32)) == (32, 32)
    with pytest.raises(ValueError, match="looks channels-last"):
        check_pixel_values_shape(config, (1, 32, 32, 3))
    with pytest.raises(ValueError, match="must be 4-D"):
        check_pixel_values_shape(config, (3, 32, 32))
    assert check_pixel_values_shape(config, (None, None, None, 3), channels_last=True) == (None, None)


@pytest.mark.parametrize("size, kernel, stride, padding", [(7, 3, 2, 1), (8, 3, 2, 1), (5, 3, 2, 0), (9, 4, 3, 2), (4, 3, 3, 1), (1, 3, 2, 1)])
def test_avg_pool_ceil_mode_geometry_matches_pytorch(size, kernel, stride, padding):
    import torch

    pool = torch.nn.AvgPool2d(kernel, stride, padding, ceil_mode=True)
    ones = torch.ones(1, 1, size, size)
    out = pool(ones)
    assert out.shape[-1] == avg_pool_ceil_output_size(size, kernel, stride, padding)
    # On an all-ones input the output is (real cells in the window) / divisor: recover the divisor from a 0/1 test.
    counts = np.array(avg_pool_ceil_window_counts(size, kernel, stride, padding), dtype=np.float64)
    real = torch.nn.functional.avg_pool2d(ones, kernel, stride, padding, ceil_mode=True, divisor_override=1)
    np.testing.assert_allclose(out[0, 0].numpy(), real[0, 0].numpy() / np.outer(counts, counts), rtol=1e-6)


def test_plan_load_reports_missing_unexpected_and_mis_shaped():
    config = CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 1], num_labels=4)
    shapes = {e.torch_name(): e.shape for e in weight_table(config)}
    shapes.pop("cvt.encoder.stages.0.layers.0.layernorm_before.bias")
    shapes["cvt.encoder.stages.9.extra"] = (1,)
    shapes["classifier.weight"] = (5, 24)
    plan = plan_load(config, True, shapes)
    with pytest.raises(WeightLoadError) as info:
        plan.check("ckpt")
    text = str(info.value)
    assert "missing weights (1):\n  cvt.encoder.stages.0.layers.0.layernorm_before.bias" in text
    assert "unexpected weights (1):\n  cvt.encoder.stages.9.extra" in text
    assert "classifier.weight: (5, 24) vs (4, 24)" in text


def test_plan_load_moves_between_classifier_and_bare_model():
    config = CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 1], num_labels=4)
    classifier = {e.torch_name(True): e.shape for e in weight_table(config, True)}
    bare = {e.torch_name(False): e.shape for e in weight_table(config, False)}
    into_bare = plan_load(config, False, classifier)
    into_bare.check("ckpt")
    assert set(into_bare.assignments) == set(bare)
    into_classifier = plan_load(config, True, bare)
    into_classifier.check("ckpt")
    assert sorted(into_classifier.fresh_head) == ["classifier.bias", "classifier.weight", "layernorm.bias", "layernorm.weight"]


def test_safetensors_round_trip_with_bfloat16_and_int64(tmp_path):
    import ml_dtypes

    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array(7, dtype=np.int64),
               "c": np.linspace(0, 1, 5).astype(ml_dtypes.bfloat16)}
    write_safetensors(str(tmp_path / "x.safetensors"), tensors)
    back = read_safetensors(str(tmp_path / "x.safetensors"))
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype
        np.testing.assert_array_equal(back[key], value)
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(str(tmp_path / "x.safetensors"))["a"], tensors["a"])


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(str(path), {"w": np.ones((64, 64), np.float32)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_safetensors(str(path))


def test_pytorch_bin_is_read_without_torch_and_pickled_code_is_refused(tmp_path):
    import torch

    torch.save({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(), "n": torch.tensor(3)}, tmp_path / "ok.bin")
    state = read_torch_bin(str(tmp_path / "ok.bin"))
    np.testing.assert_array_equal(state["w"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
    assert int(state["n"]) == 3

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": Exploit()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="refusing to load: the pickle asks for"):
        read_torch_bin(str(tmp_path / "evil.bin"))
    assert not marker.exists()


def test_corrupt_bin_and_empty_folder_are_clear_errors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02not a zip")
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint"):
        load_pretrained_state(str(tmp_path))
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as archive:
        archive.writestr("archive/version", "3")
    with pytest.raises(CheckpointError, match="no data.pkl"):
        load_pretrained_state(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_pretrained_state(str(empty))


def test_sharded_checkpoint_from_transformers_loads(tmp_path):
    import transformers

    model = transformers.CvtModel(transformers.CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3])).eval()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    state = load_pretrained_state(str(tmp_path))
    expected = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key], value.numpy())


def test_model_output_behaves_like_transformers_model_output():
    from cvt_core.outputs import CvtImageClassifierOutput

    out = CvtImageClassifierOutput(logits=1, hidden_states=(2, 3))
    assert out.loss is None and out["logits"] == 1 and out[0] == 1 and out.to_tuple() == (1, (2, 3))
    out.loss = 0.5
    assert list(out.keys()) == ["loss", "logits", "hidden_states"] and out[0] == 0.5
    rebuilt = CvtImageClassifierOutput(iter(out.items()))  # how tf.function rebuilds a returned mapping
    assert rebuilt == out and rebuilt.logits == 1
    with pytest.raises(TypeError, match="no field 'pooled'"):
        CvtImageClassifierOutput(pooled=1)


def test_written_checkpoint_has_ordinary_permissions_and_streams_one_tensor_at_a_time(tmp_path):
    from cvt_core.checkpoint import write_safetensors_streaming

    fetched = []

    def fetch(name):
        fetched.append(name)
        return np.full((2, 2), len(fetched), np.float32)

    path = tmp_path / "model.safetensors"
    write_safetensors_streaming(str(path), [("a", (2, 2), np.float32), ("b", (2, 2), np.float32)], fetch)
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert fetched == ["a", "b"]
    assert float(read_safetensors(str(path))["b"][0, 0]) == 2.0
    with pytest.raises(CheckpointError, match="tensor 'a' is float64"):
        write_safetensors_streaming(str(path), [("a", (2, 2), np.float32)], lambda name: np.zeros((2, 2)))
    assert float(read_safetensors(str(path))["b"][0, 0]) == 2.0  # the failed write left the old file intact
