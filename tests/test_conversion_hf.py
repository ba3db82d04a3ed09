"""The converter against transformers 4.57.6: its TF classes load our tf_model.h5 (and compute what its PyTorch
model computes), our h5 has exactly the layout transformers writes, we read transformers' tf_model.h5 with the
BatchNorm statistics it drops, and every PyTorch-side input format (safetensors, .bin, sharded, fp16) converts.

transformers' TF side runs in one child process for the whole module (see conversion_helpers.run_transformers_tf).
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import transformers

from conversion_helpers import TINY, TINY_DEEP, cli, h5_dump, read_safetensors, run_transformers_tf
from hf_oracle import assert_close, hf_torch_outputs, make_hf_checkpoint

CASES = {
    "classifier": dict(config=dict(TINY, num_labels=5), with_head=True, seed=11),
    "bare": dict(config=dict(TINY), with_head=False, seed=12),
    "deep": dict(config=dict(TINY_DEEP, num_labels=3), with_head=True, seed=13),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Per case: transformers' PyTorch checkpoint, its outputs, our tf_model.h5 converted from it, transformers'
    own tf_model.h5 of it, and what transformers' TF model computes on ours."""
    root = tmp_path_factory.mktemp("hf-conversion")
    data = {}
    jobs = []
    for name, case in CASES.items():
        pt = str(root / f"{name}-pt")
        model = make_hf_checkpoint(pt, case["config"], seed=case["seed"], with_head=case["with_head"])
        size = case["config"]["image_size"]
        pixels = np.random.default_rng(case["seed"]).standard_normal((2, 3, size, size)).astype(np.float32)
        np.save(root / f"{name}-pixels.npy", pixels)
        ours = str(root / f"{name}-ours-tf")
        code, out, err = cli("convert", pt, ours, "--to", "hf-tf")
        assert code == 0, err
        theirs = str(root / f"{name}-theirs-tf")
        jobs.append({"kind": "save", "checkpoint": pt, "output": theirs, "with_head": case["with_head"]})
        jobs.append({"kind": "run", "checkpoint": ours, "pixel_values": str(root / f"{name}-pixels.npy"),
                     "output": str(root / f"{name}-tf-on-ours.npz"), "with_head": case["with_head"]})
        data[name] = dict(pt=pt, ours=ours, theirs=theirs, model=model, pixels=pixels, report=out,
                          torch=hf_torch_outputs(model, pixels))
    # a folder with every format: transformers' TF from_pretrained would take model.safetensors (and crash on any
    # PyTorch safetensors, its own included), so it is pointed at tf_model.h5 with use_safetensors=False
    everything = str(root / "classifier-ours-all")
    code, out, err = cli("convert", data["classifier"]["pt"], everything)
    assert code == 0, err
    jobs.append({"kind": "run", "checkpoint": everything, "pixel_values": str(root / "classifier-pixels.npy"),
                 "output": str(root / "classifier-tf-on-ours-all.npz"), "with_head": True, "use_safetensors": False})
    data["everything"] = everything
    run_transformers_tf(jobs)
    for name in CASES:
        with np.load(root / f"{name}-tf-on-ours.npz") as f:
            data[name]["tf_on_ours"] = {k: f[k] for k in f.files}
    with np.load(root / "classifier-tf-on-ours-all.npz") as f:
        data["classifier"]["tf_on_ours_all"] = {k: f[k] for k in f.files}
    data["root"] = root
    return data


@pytest.mark.parametrize("case", list(CASES))
def test_our_tf_model_h5_has_the_exact_layout_transformers_writes(world, case):
    ours = h5_dump(os.path.join(world[case]["ours"], "tf_model.h5"))
    theirs = h5_dump(os.path.join(world[case]["theirs"], "tf_model.h5"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key] == theirs[key], f"{case}: {key} differs"


def test_deep_case_really_splits_weight_names(world):
    attrs = h5_dump(os.path.join(world["deep"]["theirs"], "tf_model.h5"))["cvt"]
    assert "weight_names" not in attrs and {"weight_names0", "weight_names1"} <= set(attrs)


@pytest.mark.parametrize("case", ["classifier", "bare", "deep"])
def test_transformers_tf_loads_our_tf_model_h5_and_matches_transformers_pytorch(world, case):
    got, want = world[case]["tf_on_ours"], world[case]["torch"]
    assert sorted(got) == sorted(want)
    for key in want:
        assert_close(got[key], want[key], f"{case} {key}")


def test_transformers_tf_loads_tf_model_h5_from_a_folder_with_every_format(world):
    assert sorted(os.listdir(world["everything"])) == [".cvt-manifest.json", "config.json", "model.keras", "model.safetensors",
                                                       "model.weights.h5", "preprocessor_config.json", "tf_model.h5"]
    got, want = world["classifier"]["tf_on_ours_all"], world["classifier"]["torch"]
    for key in want:
        assert_close(got[key], want[key], f"every-format folder {key}")


def test_transformers_tf_model_h5_converts_to_torch_with_batchnorm_statistics(world, tmp_path):
    dst = tmp_path / "back"
    code, out, err = cli("convert", world["classifier"]["theirs"], dst, "--to", "torch")
    assert code == 0, err
    source = read_safetensors(os.path.join(world["classifier"]["pt"], "model.safetensors"))
    back = read_safetensors(str(dst / "model.safetensors"))
    assert sorted(back) == sorted(source)
    stats = [k for k in source if k.endswith(("running_mean", "running_var"))]
    assert stats and all(np.abs(source[k] - np.round(source[k])).max() > 0 for k in stats)  # randomised, not 0/1
    for key, value in source.items():
        if key.endswith("num_batches_tracked"):
            assert back[key].shape == () and int(back[key]) == 0  # no TF twin: restarts at 0 (documented)
        else:
            np.testing.assert_array_equal(back[key], value, err_msg=key)
    # and transformers' PyTorch model reproduces itself on the converted checkpoint
    reloaded = transformers.CvtForImageClassification.from_pretrained(str(dst)).eval()
    got = hf_torch_outputs(reloaded, world["classifier"]["pixels"])
    for key, value in world["classifier"]["torch"].items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_bare_transformers_tf_model_h5_reads_as_bare_model(world, tmp_path):
    code, out, err = cli("convert", world["bare"]["theirs"], tmp_path / "bare", "--to", "torch")
    assert code == 0, err
    assert "CvtModel" in out
    back = read_safetensors(str(tmp_path / "bare" / "model.safetensors"))
    assert not any(k.startswith(("cvt.", "classifier", "layernorm")) for k in back)
    with open(tmp_path / "bare" / "config.json") as f:
        assert json.load(f)["architectures"] == ["CvtModel"]


def test_transformers_pytorch_loads_our_safetensors_and_reproduces_the_source(world, tmp_path):
    dst = tmp_path / "pt"
    code, out, err = cli("convert", world["classifier"]["pt"], dst, "--to", "torch")
    assert code == 0, err
    model, info = transformers.CvtForImageClassification.from_pretrained(str(dst), output_loading_info=True)
    assert not any(info.values()), info
    got = hf_torch_outputs(model.eval(), world["classifier"]["pixels"])
    for key, value in world["classifier"]["torch"].items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def _assert_same_weights(dst, reference_dir):
    source = read_safetensors(os.path.join(reference_dir, "model.safetensors"))
    back = read_safetensors(os.path.join(dst, "model.safetensors"))
    assert sorted(back) == sorted(source)
    for key, value in source.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_pytorch_model_bin_source_is_read_without_pickle_execution_and_converts(world, tmp_path):
    src = tmp_path / "bin"
    world["classifier"]["model"].save_pretrained(str(src), safe_serialization=False)
    assert os.listdir(src) and (src / "pytorch_model.bin").exists()
    code, out, err = cli("convert", src, tmp_path / "dst", "--to", "torch,hf-tf")
    assert code == 0, err
    _assert_same_weights(str(tmp_path / "dst"), world["classifier"]["pt"])


def test_sharded_safetensors_source_converts(world, tmp_path):
    src = tmp_path / "sharded"
    world["classifier"]["model"].save_pretrained(str(src), max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists() and not (src / "model.safetensors").exists()
    code, out, err = cli("convert", src, tmp_path / "dst", "--to", "torch")
    assert code == 0, err
    _assert_same_weights(str(tmp_path / "dst"), world["classifier"]["pt"])


def test_float16_checkpoint_is_kept_in_float16_and_loads_in_transformers(world, tmp_path):
    src = tmp_path / "fp16"
    copy.deepcopy(world["classifier"]["model"]).half().save_pretrained(str(src))
    dst = tmp_path / "dst"
    code, out, err = cli("convert", src, dst, "--to", "torch,hf-tf")
    assert code == 0, err
    source = read_safetensors(str(src / "model.safetensors"))
    back = read_safetensors(str(dst / "model.safetensors"))
    for key, value in source.items():
        assert back[key].dtype == value.dtype
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    import h5py

    with h5py.File(dst / "tf_model.h5") as f:
        kernel = f["classifier/tf_cvt_for_image_classification/classifier/kernel:0"]
        assert kernel.dtype == np.float16
        np.testing.assert_array_equal(kernel[()], source["classifier.weight"].T)
    model = transformers.CvtForImageClassification.from_pretrained(str(dst), torch_dtype=torch.float16)
    assert model.classifier.weight.dtype == torch.float16


def test_bfloat16_cast_on_request(world, tmp_path):
    dst = tmp_path / "bf16"
    code, out, err = cli("convert", world["classifier"]["pt"], dst, "--to", "torch,hf-tf", "--dtype", "bfloat16")
    assert code == 0, err
    assert "bfloat16" in out and "atol 0.05" in out  # the looser default tolerance for the cast
    import h5py
    import ml_dtypes

    source = read_safetensors(os.path.join(world["classifier"]["pt"], "model.safetensors"))
    with open(dst / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    weight = "cvt.encoder.stages.0.embedding.convolution_embeddings.projection.weight"
    assert header[weight]["dtype"] == "BF16"
    assert header["cvt.encoder.stages.0.layers.0.attention.attention.convolution_projection_key"
                  ".convolution_projection.normalization.num_batches_tracked"]["dtype"] == "I64"
    expected = source[weight].astype(ml_dtypes.bfloat16).astype(np.float32)
    back = transformers.CvtForImageClassification.from_pretrained(str(dst))
    np.testing.assert_array_equal(
        back.cvt.encoder.stages[0].embedding.convolution_embeddings.projection.weight.float().detach().numpy(), expected)
    with h5py.File(dst / "tf_model.h5") as f:  # HDF5 has no bfloat16: the same values, stored as float32
        kernel = f["cvt/tf_cvt_for_image_classification/cvt/encoder/stages.0/embedding/convolution_embeddings/"
                   "projection/kernel:0"]
        assert kernel.dtype == np.float32
        np.testing.assert_array_equal(kernel[()], expected.transpose(2, 3, 1, 0))
    assert "bfloat16 values are stored exactly as float32" in out


def test_reported_cross_check_lists_logits_and_every_stage(world):
    report = world["classifier"]["report"]
    for row in ("logits", "hidden_states.0", "hidden_states.1", "hidden_states.2", "top-1 agreement"):
        assert row in report
    assert report.strip().splitlines()[-1].startswith("OK: tf_model.h5 matches the source")
