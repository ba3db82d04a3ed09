"""cvt_core's one checkpoint I/O layer: the lazy reader of every PyTorch-side format (real torch.save files, zip and
legacy layouts, equal to torch.load), the one atomic file write behind every writer, the one bfloat16 rule, and
`from_pretrained`'s meta-device build (skipped initialisation when the checkpoint covers the model, the usual fresh
values where it does not).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conversion_helpers import TINY_CONFIG
from cvt_core import CvtConfig
from cvt_core.atomic import atomic_write
from cvt_core.checkpoint import (
    CheckpointError,
    load_pretrained_state,
    open_checkpoint,
    read_torch_bin,
    save_pretrained_state,
    write_safetensors,
    write_safetensors_streaming,
)
from cvt_torch import CvtForImageClassification, CvtModel
from cvt_torch.numpy_bridge import numpy_to_tensor, tensor_to_numpy


def _as_torch(array: np.ndarray) -> torch.Tensor:
    return numpy_to_tensor(np.array(array))


def _assert_same_tensors(ours, expected) -> None:
    assert list(ours) == list(expected)
    for key, tensor in expected.items():
        assert ours[key].shape == tuple(tensor.shape), key
        assert _as_torch(ours[key]).dtype == tensor.dtype, key
        assert torch.equal(_as_torch(ours[key]), tensor), key


def _saved_tensors():
    """Tensors of every dtype the readers must carry bit for bit, and views sharing a storage at offsets."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    return {
        "float32": base,
        "transposed-view": base.t(),
        "offset-slice": base[1:3, 2:5],
        "scalar": base[3, 5],
        "float16": (base * 3).half(),
        "bfloat16": (base - 1).bfloat16(),
        "int64": torch.tensor([-(2 ** 40), 0, 7], dtype=torch.int64),
        "empty": torch.zeros(0, 5),
    }


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_torch_save_files_read_equal_to_torch_load(tmp_path, layout, wrapper):
    tensors = _saved_tensors()
    path = tmp_path / "weights.pt"
    torch.save(tensors if wrapper is None else {wrapper: tensors, "epoch": 3}, path,
               _use_new_zipfile_serialization=layout == "zip")
    loaded = torch.load(path, weights_only=True)
    expected = loaded if wrapper is None else loaded[wrapper]
    _assert_same_tensors(read_torch_bin(str(path)), expected)
    with open_checkpoint(str(path)) as lazy:
        assert lazy.shapes == {k: tuple(v.shape) for k, v in expected.items()}
        _assert_same_tensors(lazy, expected)


def _open_fds_on(path) -> int:
    real = os.path.realpath(path)
    return sum(1 for fd in os.listdir("/proc/self/fd")
               if os.path.realpath(os.path.join("/proc/self/fd", fd)) == real)


@pytest.mark.parametrize("layout", ["safetensors", "legacy"])
def test_open_checkpoint_knows_every_shape_up_front_and_reads_each_tensor_on_access(tmp_path, layout):
    values = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.full(4, 7, np.int64)}
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.bin")
    if layout == "safetensors":
        write_safetensors(str(path), values)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in values.items()}, path, _use_new_zipfile_serialization=False)
    tensors = open_checkpoint(str(path))
    assert tensors.shapes == {"a": (2, 3), "b": (4,)}
    assert tensors.dtypes == {"a": np.dtype("float32"), "b": np.dtype("int64")}
    # overwrite a's bytes in place after opening: what is read is what the file holds at access time
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(values["a"].tobytes())
    raw[at: at + 24] = (values["a"] + 100).tobytes()
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(tensors["a"], values["a"] + 100)
    np.testing.assert_array_equal(tensors["b"], values["b"])
    assert _open_fds_on(path) == 1
    tensors.close()
    tensors.close()  # a second close does nothing
    assert _open_fds_on(path) == 0


def test_shard_index_may_mix_safetensors_and_torch_save_shards(tmp_path):
    write_safetensors(str(tmp_path / "part-1.safetensors"), {"a": np.ones(3, np.float32)})
    torch.save({"b": torch.full((2,), 5.0), "unlisted": torch.zeros(1)}, tmp_path / "part-2.bin",
               _use_new_zipfile_serialization=False)
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "part-1.safetensors", "b": "part-2.bin"}}))
    with open_checkpoint(str(index)) as tensors:
        assert tensors.shapes == {"a": (3,), "b": (2,)}
        np.testing.assert_array_equal(tensors["b"], [5.0, 5.0])
    index.write_text(json.dumps({"weight_map": {"a": "part-1.safetensors", "c": "part-2.bin"}}))
    with pytest.raises(CheckpointError, match="part-2.bin: shard lacks 1 tensors its index lists, e.g. c"):
        open_checkpoint(str(index))


# ------------------------------------------------------------------------------------------ atomic_write
class _WriteFailed(Exception):
    pass


@pytest.mark.parametrize("failure", [_WriteFailed, KeyboardInterrupt])
def test_failed_atomic_write_leaves_no_destination_and_no_temporary_file(tmp_path, failure):
    with pytest.raises(failure):
        with atomic_write(str(tmp_path / "out.json")) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise failure()
    assert os.listdir(tmp_path) == []


def test_failed_atomic_write_leaves_an_existing_destination_untouched(tmp_path):
    (tmp_path / "out.json").write_text("before")
    with pytest.raises(_WriteFailed):
        with atomic_write(str(tmp_path / "out.json")) as tmp:
            with open(tmp, "w") as f:
                f.write("after")
            raise _WriteFailed()
    assert os.listdir(tmp_path) == ["out.json"] and (tmp_path / "out.json").read_text() == "before"
    with atomic_write(str(tmp_path / "out.json")) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".out.json")
        with open(tmp, "w") as f:
            f.write("after")
    assert os.listdir(tmp_path) == ["out.json"] and (tmp_path / "out.json").read_text() == "after"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_the_file_the_mode_the_umask_gives_new_files(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_write(str(tmp_path / "out.bin")) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def _write_config(directory):
    CvtConfig(**TINY_CONFIG).save_pretrained(directory)


def _write_preprocessor(directory):
    from cvt_core.image_processing import CvtImageProcessor

    CvtImageProcessor().save_pretrained(directory)


def _write_safetensors(directory):
    write_safetensors_streaming(os.path.join(directory, "model.safetensors"), [("w", (2,), np.float32)],
                                lambda name: np.zeros(2, np.float32))


def _write_tf_h5(directory):
    from conversion.hf_tf_h5 import write_tf_h5
    from conversion.random_weights import random_state
    from conversion.state import make_state
    from cvt_core.tensor_file import LazyTensors

    config = CvtConfig(**TINY_CONFIG)
    arrays = random_state(config, True, seed=0)
    tensors = LazyTensors({k: v.shape for k, v in arrays.items()}, {k: v.dtype for k, v in arrays.items()},
                          arrays.__getitem__)
    write_tf_h5(make_state(config, tensors, "random", "hf", "torch"), os.path.join(directory, "tf_model.h5"))


WRITERS = {"config.json": _write_config, "preprocessor_config.json": _write_preprocessor,
           "model.safetensors": _write_safetensors, "tf_model.h5": _write_tf_h5}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_file_writer_interrupted_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, name):
    """Each writer goes through atomic_write: interrupted after its bytes are written, before the rename, the
    folder holds the previous file and nothing else."""
    import cvt_core.atomic

    WRITERS[name](str(tmp_path))
    before = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(b"previous")

    def interrupted(src, dst):
        assert os.path.getsize(src) > 0  # the temporary file was written in full
        raise KeyboardInterrupt

    monkeypatch.setattr(cvt_core.atomic.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        WRITERS[name](str(tmp_path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [name] and (tmp_path / name).read_bytes() == b"previous"
    WRITERS[name](str(tmp_path))
    assert os.listdir(tmp_path) == [name]
    if name != "tf_model.h5":  # HDF5 files carry timestamps
        assert (tmp_path / name).read_bytes() == before


# ------------------------------------------------------------------------------------------ the bfloat16 rule
def test_without_ml_dtypes_every_bfloat16_reader_and_cast_gives_the_one_message(tmp_path, monkeypatch):
    import ml_dtypes

    import cvt_core.dtypes
    from cvt_core.dtypes import numpy_dtype

    write_safetensors(str(tmp_path / "bf16.safetensors"), {"w": np.ones(2, ml_dtypes.bfloat16)})
    torch.save({"w": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "bf16.bin")
    torch.save({"w": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "bf16.pt", _use_new_zipfile_serialization=False)
    monkeypatch.setattr(cvt_core.dtypes, "_ml_bfloat16", lambda: None)
    message = "bfloat16 needs the ml_dtypes package (pip install ml_dtypes)"
    for name in ("bf16.safetensors", "bf16.bin", "bf16.pt"):
        with pytest.raises(CheckpointError) as exc:
            open_checkpoint(str(tmp_path / name))
        assert str(exc.value) == f"{tmp_path / name}: {message}"
    with pytest.raises(CheckpointError) as exc:
        numpy_dtype("bfloat16", "--dtype bfloat16")
    assert str(exc.value) == f"--dtype bfloat16: {message}"
    # saving a bfloat16 model stays possible: its values are exact in float32
    values = torch.tensor([1.5, -2.25, 3.0e38]).bfloat16()
    array = tensor_to_numpy(values)
    assert array.dtype == np.float32 and torch.equal(torch.from_numpy(array), values.float())


def test_bfloat16_crosses_the_numpy_bridge_bit_for_bit():
    values = torch.randn(64).bfloat16()
    array = tensor_to_numpy(values)
    assert array.dtype.name == "bfloat16"
    back = numpy_to_tensor(array)
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), values.view(torch.int16))


# ------------------------------------------------------------------------------------------ from_pretrained
@pytest.fixture(scope="module")
def saved_classifier(tmp_path_factory):
    directory = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(5)
    model = CvtForImageClassification(CvtConfig(**TINY_CONFIG)).eval()
    model.save_pretrained(directory)
    return model, directory


def test_from_pretrained_of_a_complete_checkpoint_draws_no_random_numbers_and_loads_every_weight(saved_classifier):
    model, directory = saved_classifier
    rng = torch.get_rng_state()
    loaded = CvtForImageClassification.from_pretrained(directory)
    assert torch.equal(torch.get_rng_state(), rng)  # built on the meta device: no initialisation drawn
    expected = model.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixels).logits, model(pixels).logits)


def test_from_pretrained_gives_left_out_weights_the_values_of_a_fresh_model(saved_classifier, tmp_path):
    model, directory = saved_classifier
    missing = "cvt.encoder.stages.1.layers.0.attention.output.dense.bias"
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    with load_pretrained_state(str(directory)) as state:
        save_pretrained_state(str(tmp_path), {k: v for k, v in state.items() if k != missing})
    config = CvtConfig.from_pretrained(str(tmp_path))
    torch.manual_seed(11)
    fresh = CvtForImageClassification(config).state_dict()
    torch.manual_seed(11)
    loaded = CvtForImageClassification.from_pretrained(tmp_path, strict=False).state_dict()
    assert torch.equal(loaded[missing], fresh[missing])
    for name, value in model.state_dict().items():
        if name != missing:
            assert torch.equal(loaded[name], value), name

    bare = tmp_path / "bare"
    CvtModel.from_pretrained(directory).save_pretrained(bare)
    torch.manual_seed(12)
    fresh = CvtForImageClassification(config).state_dict()
    torch.manual_seed(12)
    loaded = CvtForImageClassification.from_pretrained(bare).state_dict()
    for name in ("classifier.weight", "classifier.bias", "layernorm.weight", "layernorm.bias"):
        assert torch.equal(loaded[name], fresh[name]), name
    assert torch.equal(loaded[missing], model.state_dict()[missing])
