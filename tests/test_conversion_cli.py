"""The `cvt` command: bad inputs end in one line and exit 2 with nothing left behind, pickles never run, writes
are atomic (failure, cross-check failure, Ctrl-C), --force semantics, verify, demo and --image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conversion_helpers import (assert_one_line_error, cli, leftovers, make_tiny_checkpoint, read_safetensors, REPO,
                                TINY_CONFIG)
from cvt_core import CvtConfig



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random transformers-layout checkpoint (`src`) and its config file (`tiny.json`)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli"))


def _bad_inputs(root):
    """name -> (argv after `convert`, fragments the error must contain). Files are created here."""
    src = root / "src"
    bad = root / "bad"
    if bad.exists():
        shutil.rmtree(bad)
    bad.mkdir()

    def folder(name, weights_name, data, config=True):
        d = bad / name
        d.mkdir()
        if config:
            shutil.copy(src / "config.json", d / "config.json")
        (d / weights_name).write_bytes(data)
        return d

    weights = (src / "model.safetensors").read_bytes()
    folder("truncated", "model.safetensors", weights[: len(weights) // 2])
    folder("corrupt", "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not-json-header!" + b"\x00" * 64)
    folder("truncated-h5", "tf_model.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 200)
    folder("corrupt-keras", "model.keras", b"PK\x03\x04 not really a zip")
    folder("not-a-pickle", "pytorch_model.bin", b"this is not a checkpoint at all")
    mismatch = folder("mismatch", "model.safetensors", weights)
    (mismatch / "config.json").write_text(json.dumps(dict(TINY_CONFIG, embed_dim=[8, 16, 32], num_heads=[1, 2, 4])))
    broken_config = folder("broken-config", "model.safetensors", weights)
    (broken_config / "config.json").write_text("{ not json")
    invalid_config = folder("invalid-config", "model.safetensors", weights)
    (invalid_config / "config.json").write_text(json.dumps(dict(TINY_CONFIG, num_heads=[3, 2, 3])))
    (bad / "empty").mkdir()
    lonely = bad / "lonely"
    lonely.mkdir()
    shutil.copy(src / "model.safetensors", lonely / "model.safetensors")
    return {
        "missing": (["does-not-exist"], ["does-not-exist", "no such file"]),
        "truncated-safetensors": ([bad / "truncated"], [bad / "truncated" / "model.safetensors", "truncated"]),
        "corrupt-safetensors": ([bad / "corrupt"], [bad / "corrupt" / "model.safetensors", "corrupt"]),
        "truncated-h5": ([bad / "truncated-h5"], [bad / "truncated-h5" / "tf_model.h5", "truncated or corrupt"]),
        "corrupt-keras": ([bad / "corrupt-keras" / "model.keras"], ["model.keras", "corrupt"]),
        "not-a-pickle": ([bad / "not-a-pickle"], ["pytorch_model.bin", "not a PyTorch checkpoint"]),
        "config-weights-disagree": ([mismatch], [mismatch / "model.safetensors", "do not match the config"]),
        "config-not-json": ([broken_config], [broken_config / "config.json", "not valid JSON"]),
        "config-invalid": ([invalid_config], [invalid_config / "config.json", "embed_dim[0]=8 is not divisible"]),
        "empty-folder": ([bad / "empty"], [bad / "empty", "no checkpoint found"]),
        "file-without-config": ([lonely / "model.safetensors"], ["model.safetensors", "--config"]),
        "unknown-preset": ([lonely / "model.safetensors", "--config", "cvt-99"], ["cvt-99", "unknown preset"]),
        "wrong-from": ([src, "--from", "hf-tf"], [src, "--from hf-tf needs tf_model.h5"]),
        "wrong-from-file": ([src / "model.safetensors", "--from", "keras"], ["--from keras does not fit"]),
        "invalid-from": ([src, "--from", "onnx"], ["--from", "invalid choice"]),
        "unknown-to": ([src, "--to", "onnx"], ["onnx", "unknown --to target"]),
        "bad-atol": ([src, "--atol", "-1"], ["--atol", "must be positive"]),
    }


BAD_INPUTS = ["missing", "truncated-safetensors", "corrupt-safetensors", "truncated-h5", "corrupt-keras", "not-a-pickle",
              "config-weights-disagree", "config-not-json", "config-invalid", "empty-folder", "file-without-config",
              "unknown-preset", "wrong-from", "wrong-from-file", "invalid-from", "unknown-to", "bad-atol"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_ends_in_one_line_exit_2_and_leaves_nothing(checkpoint, tmp_path, case, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, fragments = _bad_inputs(checkpoint)[case]
    dst = tmp_path / "out" / "dst"
    assert_one_line_error(*cli("convert", *argv[:1], dst, *argv[1:]), *fragments)
    assert not (tmp_path / "out").exists()  # not even the parent it would have created


def test_every_bad_input_case_is_listed(checkpoint):
    assert sorted(_bad_inputs(checkpoint)) == sorted(BAD_INPUTS)


def test_hub_id_without_network_names_the_id_and_the_local_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # nothing cached
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("convert", "microsoft/cvt-13", tmp_path / "d")
    assert_one_line_error(code, out, err, "microsoft/cvt-13", "local directory")
    assert not (tmp_path / "d").exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("layout", ["zip-file", "legacy-file", "pytorch_model.bin-in-folder"])
def test_pickle_that_would_create_a_file_is_refused_and_the_file_never_appears(checkpoint, tmp_path, layout):
    marker = tmp_path / "PWNED"
    payload = {"stage0.patch_embed.proj.weight": torch.zeros(1), "evil": _Evil(str(marker))}
    if layout == "pytorch_model.bin-in-folder":
        src = tmp_path / "folder"
        src.mkdir()
        shutil.copy(checkpoint / "src" / "config.json", src / "config.json")
        torch.save(payload, src / "pytorch_model.bin")
        argv = [src]
    else:
        src = tmp_path / "evil.pth"
        torch.save(payload, src, _use_new_zipfile_serialization=(layout == "zip-file"))
        argv = [src, "--config", checkpoint / "tiny.json"]
    assert not marker.exists()
    code, out, err = cli("convert", argv[0], tmp_path / "dst", *argv[1:])
    assert_one_line_error(code, out, err, "refusing to load")
    assert not marker.exists()
    assert not (tmp_path / "dst").exists()


# test_destinations.py::test_failing_cross_check_prints_no_wrote checks all of this (and that no "wrote" is printed)
@pytest.mark.slow
def test_cross_check_beyond_tolerance_exits_1_and_writes_nothing(checkpoint, tmp_path):
    code, out, err = cli("convert", checkpoint / "src", tmp_path / "dst", "--to", "hf-tf", "--atol", "1e-12")
    assert code == 1, err
    assert out.strip().splitlines()[-1].startswith("FAILED:")
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path) == []


def test_existing_destination_needs_force_and_survives_a_failed_replacement(checkpoint, tmp_path):
    dst = tmp_path / "dst"
    assert cli("convert", checkpoint / "src", dst, "--to", "hf-tf")[0] == 0
    earlier = {name: (dst / name).read_bytes() for name in os.listdir(dst)}
    assert_one_line_error(*cli("convert", checkpoint / "src", dst, "--to", "torch"), dst, "--force")

    code, out, err = cli("convert", checkpoint / "src", dst, "--to", "torch,hf-tf", "--force", "--atol", "1e-12")
    assert code == 1
    assert {name: (dst / name).read_bytes() for name in os.listdir(dst)} == earlier and leftovers(tmp_path) == []

    code, out, err = cli("convert", checkpoint / "src", dst, "--to", "torch", "--force")
    assert code == 0, err
    assert sorted(os.listdir(dst)) == [".cvt-manifest.json", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert leftovers(tmp_path) == []


def test_interrupt_while_writing_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    import conversion.formats as formats

    real = formats.write_tf_h5

    def write_then_interrupt(state, path):
        real(state, path)
        assert os.path.getsize(path) > 0  # a half-written destination exists at this point
        raise KeyboardInterrupt

    monkeypatch.setattr(formats, "write_tf_h5", write_then_interrupt)
    dst = tmp_path / "new-parent" / "dst"
    code, out, err = cli("convert", checkpoint / "src", dst, "--to", "torch,hf-tf")
    assert code == 130 and err.startswith("cvt: error: interrupted") and err.count("\n") == 1
    assert not (tmp_path / "new-parent").exists() and leftovers(tmp_path) == []


def test_python_dash_m_cvt_cli_gives_exit_code_and_one_line_stderr(checkpoint, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "cvt_cli", "convert", str(tmp_path / "nope"), str(tmp_path / "d")],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"cvt: error: {tmp_path / 'nope'}: no such file or directory\n"
    proc = subprocess.run([sys.executable, "-m", "cvt_cli", "convert", str(checkpoint / "src"), str(tmp_path / "d"),
                           "--to", "torch", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no framework noise, no progress bars when not on a terminal
    assert proc.stdout.strip().splitlines()[-1].startswith("OK: model.safetensors matches the source")


def test_single_weights_file_converts_with_config(checkpoint, tmp_path):
    lonely = tmp_path / "weights.safetensors"
    shutil.copy(checkpoint / "src" / "model.safetensors", lonely)
    code, out, err = cli("convert", lonely, tmp_path / "d", "--config", checkpoint / "tiny.json", "--to", "torch")
    assert code == 0, err
    back = read_safetensors(str(tmp_path / "d" / "model.safetensors"))
    source = read_safetensors(str(checkpoint / "src" / "model.safetensors"))
    for key, value in source.items():
        np.testing.assert_array_equal(back[key], value)


def test_demo_on_a_tiny_config_ends_with_one_summary_line_and_verify_agrees(checkpoint, tmp_path):
    out_dir = tmp_path / "demo"
    code, out, err = cli("demo", "--preset", checkpoint / "tiny.json", "--out", out_dir)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("cvt demo:")
    assert lines[-1].startswith("demo OK: all 4 formats")
    assert sorted(os.listdir(out_dir)) == [".cvt-manifest.json", "config.json", "model.keras", "model.safetensors", "model.weights.h5",
                                           "preprocessor_config.json", "tf_model.h5"]
    code, out, err = cli("verify", out_dir)
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("OK: all 3 formats (tf_model.h5, model.weights.h5, model.keras) agree")


def test_demo_without_out_leaves_no_files(checkpoint, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, out, err = cli("demo", "--preset", checkpoint / "tiny.json")
    assert code == 0, err
    assert os.listdir(tmp_path) == []


def test_verify_catches_a_tampered_format(checkpoint, tmp_path):
    import h5py

    dst = tmp_path / "d"
    assert cli("convert", checkpoint / "src", dst, "--to", "torch,hf-tf")[0] == 0
    with h5py.File(dst / "tf_model.h5", "r+") as f:
        dataset = f["layernorm/tf_cvt_for_image_classification/layernorm/gamma:0"]
        dataset[0] = dataset[0] + 0.5
    code, out, err = cli("verify", dst)
    assert code == 1
    assert "logits" in out and out.strip().splitlines()[-1].startswith("FAILED:")


def test_verify_with_one_format_loads_and_runs_it(checkpoint):
    code, out, err = cli("verify", checkpoint / "src")
    assert code == 0, err
    assert "only format" in out


def test_image_input_goes_through_imagenet_preprocessing(checkpoint, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    code, out, err = cli("convert", checkpoint / "src", tmp_path / "d", "--to", "hf-tf", "--image", tmp_path / "cat.png")
    assert code == 0, err
    assert "cat.png -> 3x32x32" in out and "top-1 agreement" in out

    from conversion.crosscheck import load_image

    pixels, _ = load_image(str(tmp_path / "cat.png"), CvtConfig(**dict(TINY_CONFIG, image_size=224)))
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == np.float32
    assert_one_line_error(*cli("convert", checkpoint / "src", tmp_path / "e", "--image", tmp_path / "no.png"), "no.png")


def test_hub_id_is_fetched_with_huggingface_hub_when_the_network_allows(checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, tuple(allow_patterns)))
        snapshot = tmp_path / "cache" / repo_id.replace("/", "--")
        if not snapshot.exists():
            shutil.copytree(checkpoint / "src", snapshot)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("convert", "someone/tiny-cvt", tmp_path / "d", "--to", "torch")
    assert code == 0, err
    assert calls and calls[0][0] == "someone/tiny-cvt" and "config.json" in calls[0][1]
    assert out.startswith("source: someone/tiny-cvt (")
    np.testing.assert_array_equal(read_safetensors(str(tmp_path / "d" / "model.safetensors"))["classifier.weight"],
                                  read_safetensors(str(checkpoint / "src" / "model.safetensors"))["classifier.weight"])
