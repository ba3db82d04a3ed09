"""HDF5 and .keras files from untrusted sources are safe by construction (cvt_core.h5_safety): a file is walked whole
before any dataset is read, and anything that would pull bytes from elsewhere (external raw storage, external or
soft links, virtual datasets) or expand in memory (filters, unallocated datasets, zip bombs), or is not plain float
weights, is refused in one line by every entry point: `cvt_core.tf_h5.open_tf_h5`, both frameworks'
`from_pretrained`, Keras `load_weights` and `cvt convert` (exit 2, nothing written, the secret bytes nowhere).
Also: big-endian weights read correctly, and a full disk while writing tf_model.h5 is one line, not a segfault."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conversion_helpers import REPO, TINY_CONFIG, assert_one_line_error, cli, read_safetensors  # noqa: E402

from cvt_core import CvtConfig  # noqa: E402
from cvt_core.errors import CheckpointError  # noqa: E402

SENTINEL = b"CVT-H5-SECRET-SENTINEL!"
TF_KERNEL = "classifier/tf_cvt_for_image_classification/classifier/kernel:0"  # (24, 3) float32: 288 bytes
KERAS_KERNEL = "classifier/vars/0"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random tiny checkpoint (`src`), its conversion to every format (`all`), and a secret file (`secret.bin`)
    plus an HDF5 file holding the same secret bytes (`secret.h5`), which a crafted file would pull in."""
    from conversion.pipeline import make_random_checkpoint

    root = tmp_path_factory.mktemp("h5-reader")
    make_random_checkpoint(str(root / "src"), CvtConfig(**TINY_CONFIG), seed=3)
    code, _, err = cli("convert", root / "src", root / "all", "--to", "all", "--no-check")
    assert code == 0, err
    secret = (SENTINEL * 16)[:288]
    (root / "secret.bin").write_bytes(secret)
    with h5py.File(root / "secret.h5", "w") as f:
        f["d"] = np.frombuffer(secret, np.float32).reshape(24, 3)
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    return root


@pytest.fixture(scope="module")
def keras_model():
    """A built Keras model with random weights (not the world's, so a file that loaded any of its values would show),
    shared by the tests whose `load_weights` must be refused: each checks that the model's weights did not change,
    so one model serves them all, and Keras builds cost seconds each."""
    from cvt_tf import TFCvtForImageClassification

    model = TFCvtForImageClassification(CvtConfig(**TINY_CONFIG))
    model.build_with_dummy_input()
    return model


# ------------------------------------------------------------------------------------------------ crafted files
def _replace(f, path, make):
    value = f[path][()]
    del f[path]
    make(f, path, value)


def _external_storage(root):
    return lambda f, p, v: f.create_dataset(p, v.shape, "<f4", external=[(str(root / "secret.bin"), 0, v.nbytes)])


def _virtual(root):
    def make(f, p, v):
        layout = h5py.VirtualLayout(v.shape, "<f4")
        layout[:] = h5py.VirtualSource(str(root / "secret.h5"), "d", shape=v.shape)
        f.create_virtual_dataset(p, layout)
    return make


def _set(f, p, value):
    f[p] = value


CRAFTS = {  # name -> (how the weight is replaced, fragment of the refusal)
    "external-raw-storage": (_external_storage, "external raw storage"),
    "external-link": (lambda root: lambda f, p, v: _set(f, p, h5py.ExternalLink(str(root / "secret.h5"), "/d")),
                      "external link"),
    "soft-link": (lambda root: lambda f, p, v: _set(f, p, h5py.SoftLink("/secret-copy")), "soft link"),
    "virtual-dataset": (_virtual, "virtual dataset"),
    "gzip-filter": (lambda root: lambda f, p, v: f.create_dataset(p, data=v, compression="gzip"), "filtered"),
    "unallocated": (lambda root: lambda f, p, v: f.create_dataset(p, v.shape, "<f4"), "but has 0 stored"),
    "huge-unallocated": (lambda root: lambda f, p, v: f.create_dataset(p, (1 << 32,), "<f4"),
                         "declares 17179869184 bytes"),
    "chunked": (lambda root: lambda f, p, v: f.create_dataset(p, data=v, chunks=(4, 3)), "chunked storage"),
    "int32": (lambda root: lambda f, p, v: _set(f, p, v.astype(np.int32)), "32-bit integer values"),
    "complex": (lambda root: lambda f, p, v: _set(f, p, v.astype(np.complex64)), "compound (complex"),
    "group-instead-of-weight": (lambda root: lambda f, p, v: f.create_group(p), "a group"),
}
EXTRA = {  # name -> (a change elsewhere in the file, fragment)
    "named-datatype": (lambda f: _set(f, "named", np.dtype("<f4")), "named datatype"),
}
TF_CASES = sorted(CRAFTS) + sorted(EXTRA)


def _crafted_h5(world, source, weight, case, directory):
    """A copy of `source` with `weight` replaced (or the file changed elsewhere) as `case` says."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / os.path.basename(source)
    shutil.copyfile(source, path)
    with h5py.File(path, "a") as f:
        if case == "soft-link":  # a soft link to a dataset the file holds
            f["secret-copy"] = f[weight][()]
        if case in CRAFTS:
            _replace(f, weight, CRAFTS[case][0](world))
        else:
            EXTRA[case][0](f)
    return path


def _fragment(case):
    return (CRAFTS.get(case) or EXTRA[case])[1]


def _tf_folder(world, tmp_path, case):
    """A folder holding config.json and a crafted tf_model.h5, and nothing else."""
    folder = tmp_path / "in"
    _crafted_h5(world, world / "all" / "tf_model.h5", TF_KERNEL, case, folder)
    shutil.copyfile(world / "all" / "config.json", folder / "config.json")
    return folder


def _assert_one_line(exc_info, *fragments):
    message = str(exc_info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)
    assert SENTINEL.decode() not in message


def _assert_nothing_written(tmp_path, code, out, err, *fragments):
    assert_one_line_error(code, out, err, *fragments)
    assert not (tmp_path / "out").exists()
    assert SENTINEL.decode() not in out + err


# ------------------------------------------------------------------------------------------------ tf_model.h5
@pytest.mark.parametrize("case", TF_CASES)
def test_crafted_tf_model_h5_is_refused_in_one_line_by_open_tf_h5(world, tmp_path, case):
    from cvt_core.tf_h5 import open_tf_h5

    folder = _tf_folder(world, tmp_path, case)
    with pytest.raises(CheckpointError) as info:
        open_tf_h5(str(folder / "tf_model.h5"), CvtConfig(**TINY_CONFIG))
    _assert_one_line(info, folder / "tf_model.h5", _fragment(case))


@pytest.mark.parametrize("case", TF_CASES)
def test_crafted_tf_model_h5_is_refused_in_one_line_by_both_from_pretrained(world, tmp_path, case):
    from cvt_tf import TFCvtForImageClassification
    from cvt_torch import CvtForImageClassification

    folder = _tf_folder(world, tmp_path, case)
    for cls in (CvtForImageClassification, TFCvtForImageClassification):
        with pytest.raises(CheckpointError) as info:
            cls.from_pretrained(str(folder))
        _assert_one_line(info, folder / "tf_model.h5", _fragment(case))


@pytest.mark.parametrize("case", TF_CASES)
def test_crafted_tf_model_h5_is_refused_by_convert_with_exit_2_and_nothing_written(world, tmp_path, case):
    folder = _tf_folder(world, tmp_path, case)
    code, out, err = cli("convert", folder, tmp_path / "out" / "dst", "--to", "torch")
    _assert_nothing_written(tmp_path, code, out, err, folder / "tf_model.h5", _fragment(case))


def test_convert_of_a_crafted_tf_model_h5_runs_as_a_command_and_leaks_nothing(world, tmp_path):
    """`python -m cvt_cli convert` in a child process: exit 2, one line on stderr, no output, no secret."""
    folder = _tf_folder(world, tmp_path, "external-raw-storage")
    result = subprocess.run([sys.executable, "-m", "cvt_cli", "convert", str(folder), str(tmp_path / "out" / "dst"),
                             "--to", "torch"], cwd=REPO, capture_output=True, timeout=600,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    err = result.stderr.decode()
    lines = [line for line in err.splitlines() if line.startswith("cvt: error: ")]
    assert result.returncode == 2, err
    assert len(lines) == 1 and "external raw storage" in lines[0], err
    assert "Traceback" not in err
    assert SENTINEL not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


def test_tf_model_h5_with_an_overlong_name_is_refused_in_one_line(world, tmp_path):
    from cvt_core.tf_h5 import open_tf_h5

    path = tmp_path / "tf_model.h5"
    shutil.copyfile(world / "all" / "tf_model.h5", path)
    with h5py.File(path, "a") as f:
        f["classifier"].attrs["weight_names"] = [b"x" * 100_000, b"y"]
    with pytest.raises(CheckpointError) as info:
        open_tf_h5(str(path), CvtConfig(**TINY_CONFIG))
    _assert_one_line(info, path, "a name of 512 bytes or more")


def test_tf_model_h5_whose_layer_is_a_dataset_is_refused_in_one_line(world, tmp_path):
    from cvt_core.tf_h5 import open_tf_h5

    path = tmp_path / "tf_model.h5"
    shutil.copyfile(world / "all" / "tf_model.h5", path)
    with h5py.File(path, "a") as f:
        del f["layernorm"]
        f["layernorm"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as info:
        open_tf_h5(str(path), CvtConfig(**TINY_CONFIG))
    _assert_one_line(info, path, "'layernorm' listed in layer_names is a dataset")


def test_tf_model_h5_with_a_hard_link_cycle_still_reads(world, tmp_path):
    """Hard links are accepted, and a group that contains itself is walked once."""
    from cvt_core.tf_h5 import open_tf_h5

    path = tmp_path / "tf_model.h5"
    shutil.copyfile(world / "all" / "tf_model.h5", path)
    with h5py.File(path, "a") as f:
        f["cvt"]["loop"] = f["cvt"]
    with open_tf_h5(str(path), CvtConfig(**TINY_CONFIG)) as weights:
        assert weights["classifier.bias"].shape == (3,)


@pytest.mark.parametrize("how", ["truncated", "header-only", "fifo", "device"])
def test_unreadable_tf_model_h5_is_one_line_in_the_reader_both_from_pretrained_and_convert(world, tmp_path, how):
    """A FIFO or a device under the name is refused before a byte is read (by the folder readers, which look for
    regular files only, as "no weights found")."""
    from cvt_core.tf_h5 import open_tf_h5
    from cvt_tf import TFCvtForImageClassification
    from cvt_torch import CvtForImageClassification

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(world / "all" / "config.json", folder / "config.json")
    path = folder / "tf_model.h5"
    data = (world / "all" / "tf_model.h5").read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
        fragment = "truncated or corrupt"
    elif how == "header-only":
        path.write_bytes(data[:96])
        fragment = "truncated or corrupt"
    elif how == "fifo":
        os.mkfifo(path)
        fragment = "named pipe"
    else:
        os.symlink("/dev/zero", path)
        fragment = "a device"
    with pytest.raises(CheckpointError) as info:
        open_tf_h5(str(path), CvtConfig(**TINY_CONFIG))
    _assert_one_line(info, path, fragment)
    regular = how in ("truncated", "header-only")
    for cls in (CvtForImageClassification, TFCvtForImageClassification):
        with pytest.raises(CheckpointError) as info:
            cls.from_pretrained(str(folder))
        _assert_one_line(info, *((path, fragment) if regular else (folder, "no weights found")))
    code, out, err = cli("convert", path, tmp_path / "out" / "dst", "--to", "torch")
    _assert_nothing_written(tmp_path, code, out, err, path, fragment)


def test_big_endian_tf_model_h5_reads_the_same_values_everywhere(world, tmp_path):
    """Big-endian float datasets are accepted: HDF5 converts them to native order while reading (into a
    native-order array), so every reader sees the values a little-endian file holds."""
    from cvt_core.tf_h5 import open_tf_h5
    from cvt_tf import TFCvtForImageClassification
    from cvt_torch import CvtForImageClassification

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(world / "all" / "config.json", folder / "config.json")
    path = folder / "tf_model.h5"
    shutil.copyfile(world / "all" / "tf_model.h5", path)
    with h5py.File(path, "a") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in names:
            _replace(f, name, lambda f, p, v: _set(f, p, v.astype(v.dtype.newbyteorder(">"))))
        assert f[TF_KERNEL].dtype.str == ">f4"
    source = read_safetensors(str(world / "src" / "model.safetensors"))
    with open_tf_h5(str(path), CvtConfig(**TINY_CONFIG)) as weights:
        for name in weights:
            value = weights[name]
            assert value.dtype == np.float32 and value.dtype.isnative
            np.testing.assert_array_equal(value, source[name])
    torch_model = CvtForImageClassification.from_pretrained(str(folder))
    for name, value in torch_model.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(value.numpy(), source[name])
    keras_model = TFCvtForImageClassification.from_pretrained(str(folder))
    np.testing.assert_array_equal(keras_model.canonical_weights()["classifier.weight"].numpy(),
                                  source["classifier.weight"].T)
    code, _, err = cli("convert", folder, tmp_path / "out", "--to", "torch", "--no-check")
    assert code == 0, err
    converted = read_safetensors(str(tmp_path / "out" / "model.safetensors"))
    for name, value in source.items():
        if not name.endswith("num_batches_tracked"):
            assert converted[name].tobytes() == value.tobytes(), name


# ------------------------------------------------------------------------------------------------ Keras files
KERAS_CASES = [c for c in TF_CASES if c != "named-datatype"] + ["named-datatype", "big-endian"]


def _keras_fragment(case):
    """What Keras files are refused with: the walk's words, except for a group standing where a variable should
    be, which the walk accepts (groups are plain) and the strict check then reports as a missing variable."""
    return {"big-endian": "big-endian", "group-instead-of-weight": "1 missing"}.get(case) or _fragment(case)


def _crafted_keras_weights(world, tmp_path, case):
    folder = tmp_path / "in"
    if case == "big-endian":
        folder.mkdir(parents=True)
        path = folder / "model.weights.h5"
        shutil.copyfile(world / "all" / "model.weights.h5", path)
        with h5py.File(path, "a") as f:
            _replace(f, KERAS_KERNEL, lambda f, p, v: _set(f, p, v.astype(">f4")))
    else:
        path = _crafted_h5(world, world / "all" / "model.weights.h5", KERAS_KERNEL, case, folder)
    shutil.copyfile(world / "all" / "config.json", folder / "config.json")
    return path


def _keras_archive(world, path, weights=None, config=None, extra=()):
    """A .keras archive like `all/model.keras`, with its weights member or config.json replaced."""
    with zipfile.ZipFile(world / "all" / "model.keras") as source, zipfile.ZipFile(path, "w") as target:
        for item in source.namelist():
            data = source.read(item)
            if item == "model.weights.h5" and weights is not None:
                data = weights
            if item == "config.json" and config is not None:
                data = config
            target.writestr(item, data)
        for name, data, method in extra:
            target.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return path


@pytest.mark.parametrize("case", KERAS_CASES)
def test_crafted_keras_weights_are_refused_by_convert_with_exit_2_and_nothing_written(world, tmp_path, case):
    path = _crafted_keras_weights(world, tmp_path, case)
    code, out, err = cli("convert", path, tmp_path / "out" / "dst", "--from", "keras", "--to", "torch")
    _assert_nothing_written(tmp_path, code, out, err, path, _keras_fragment(case))


@pytest.mark.parametrize("skip_mismatch", [False, True])
@pytest.mark.parametrize("case", ["external-raw-storage", "virtual-dataset", "gzip-filter", "big-endian"])
def test_crafted_keras_weights_are_refused_by_load_weights_in_one_line(world, keras_model, tmp_path, case,
                                                                       skip_mismatch):
    """skip_mismatch=True, Keras' opt-out of the strict comparison, keeps every safety check of the file."""
    path = _crafted_keras_weights(world, tmp_path, case)
    model = keras_model
    before = model.canonical_weights()["classifier.weight"].numpy().copy()
    with pytest.raises(CheckpointError) as info:
        model.load_weights(str(path), skip_mismatch=skip_mismatch)
    _assert_one_line(info, path, _keras_fragment(case))
    np.testing.assert_array_equal(model.canonical_weights()["classifier.weight"].numpy(), before)


@pytest.mark.parametrize("case", KERAS_CASES)
def test_keras_file_with_crafted_weights_is_refused_by_convert_with_exit_2(world, tmp_path, case):
    weights = _crafted_keras_weights(world, tmp_path, case).read_bytes()
    path = _keras_archive(world, tmp_path / "model.keras", weights=weights)
    code, out, err = cli("convert", path, tmp_path / "out" / "dst", "--to", "torch")
    _assert_nothing_written(tmp_path, code, out, err, path, _keras_fragment(case))


def test_keras_file_with_crafted_weights_is_refused_by_keras_load_model(world, tmp_path):
    """Keras' own load_model reaches our model's whole-file check before any variable is read."""
    import keras

    weights = _crafted_keras_weights(world, tmp_path, "external-raw-storage").read_bytes()
    path = _keras_archive(world, tmp_path / "model.keras", weights=weights)
    with pytest.raises(Exception) as info:
        keras.models.load_model(str(path))
    assert "external raw storage" in str(info.value)
    assert SENTINEL.decode() not in str(info.value)


KERAS_ARCHIVE_CASES = {
    "zip-bomb": (dict(extra=[("assets/zeros.bin", b"\0" * (64 * 1024 * 1024), zipfile.ZIP_DEFLATED)]),
                 "decompression bomb"),
    "member-outside-the-archive": (dict(extra=[("../evil.txt", b"x", zipfile.ZIP_STORED)]), "outside the archive"),
    "config-with-nan": (dict(config=b'{"class_name": "TFCvtModel", "config": NaN}'), "refused JSON"),
    "config-not-json": (dict(config=b"{ not json"), "not valid JSON"),
    "extra-member": (dict(extra=[("assets/notes.txt", b"hello", zipfile.ZIP_STORED)]), "does not"),
}


@pytest.mark.parametrize("case", sorted(KERAS_ARCHIVE_CASES))
def test_crafted_keras_archive_is_refused_by_convert_in_one_line(world, tmp_path, case):
    changes, fragment = KERAS_ARCHIVE_CASES[case]
    path = _keras_archive(world, tmp_path / "model.keras", **changes)
    code, out, err = cli("convert", path, tmp_path / "out" / "dst", "--to", "torch")
    _assert_nothing_written(tmp_path, code, out, err, path, fragment)


def test_keras_file_of_another_model_is_one_line_naming_its_class(world, tmp_path):
    import keras

    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "other.keras"
    other.save(path)
    code, out, err = cli("convert", path, tmp_path / "out" / "dst", "--to", "torch")
    _assert_nothing_written(tmp_path, code, out, err, path, "not a CvT model saved by cvt_tf: holds", "Sequential")


def test_unedited_keras_files_still_convert(world, tmp_path):
    for name, extra in (("model.keras", ()), ("model.weights.h5", ("--config", world / "tiny.json"))):
        code, _, err = cli("convert", world / "all" / name, tmp_path / name, "--to", "torch", *extra)
        assert code == 0, err


# ------------------------------------------------------------------------------------------------ writing tf_model.h5
def _state(world):
    from conversion.hf_tf_h5 import read_tf_h5

    return read_tf_h5(str(world / "all" / "tf_model.h5"), CvtConfig(**TINY_CONFIG))


def test_too_little_free_space_for_tf_model_h5_is_one_line_before_writing(world, tmp_path, monkeypatch):
    import collections

    import conversion.hf_tf_h5 as hf_tf_h5

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(hf_tf_h5.shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    code, out, err = cli("convert", world / "src", tmp_path / "out" / "dst", "--to", "hf-tf", "--no-check")
    _assert_nothing_written(tmp_path, code, out, err, "tf_model.h5", "not enough free disk space")


def test_write_error_while_writing_tf_model_h5_is_one_line_and_leaves_nothing(world, tmp_path, monkeypatch):
    """A disk that fills up after the free-space check: HDF5 never sees the error (it would crash the interpreter
    later), the writer raises one ConversionError line and the temporary file is gone."""
    import errno

    import conversion.hf_tf_h5 as hf_tf_h5
    from conversion.errors import ConversionError

    real_pwrite = os.pwrite
    calls = {"n": 0}

    def failing_pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(hf_tf_h5.os, "pwrite", failing_pwrite)
    state = _state(world)
    try:
        with pytest.raises(ConversionError) as info:
            hf_tf_h5.write_tf_h5(state, str(tmp_path / "tf_model.h5"))
    finally:
        state.close()
    assert "\n" not in str(info.value) and "the disk is full" in str(info.value)
    assert os.listdir(tmp_path) == []


_FULL_DISK_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[3])
from conversion_helpers import TINY_CONFIG
from cvt_core import CvtConfig
import conversion.hf_tf_h5 as m
from conversion.errors import ConversionError
state = m.read_tf_h5(sys.argv[1], CvtConfig(**TINY_CONFIG))
m._check_free_space = lambda *a: None  # as if the disk filled up after the check
try:
    m.write_tf_h5(state, sys.argv[2])
except ConversionError as exc:
    print("ERROR", exc)
import gc
gc.collect()
print("ALIVE")
"""


def test_full_disk_while_writing_tf_model_h5_is_one_line_not_a_segfault(world, tmp_path):
    """On a real full file system (a 64 KiB tmpfs; needs root to mount, else skipped)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        result = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(world / "all" / "tf_model.h5"),
                                 str(mount / "tf_model.h5"), os.path.join(REPO, "tests")],
                                cwd=REPO, capture_output=True, timeout=300)
        out = result.stdout.decode()
        assert result.returncode == 0, (result.returncode, out, result.stderr.decode()[-2000:])
        assert "ERROR" in out and "the disk is full" in out and "ALIVE" in out, out
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# ------------------------------------------------------------------------------- every path load_weights takes
def _sharded_weights(model, folder):
    """`save_weights` split into shards: `w.weights.json` and `w_0000N.weights.h5` (Keras names them so)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras notes that it renames the .weights.h5 it was given to .weights.json
        model.save_weights(str(folder / "w.weights.h5"), max_shard_size=0.0001)
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".weights.h5"))
    assert (folder / "w.weights.json").exists() and len(shards) > 1
    return folder / "w.weights.json", [folder / n for n in shards]


@pytest.mark.parametrize("skip_mismatch", [False, True])
@pytest.mark.parametrize("where", ["listed", "unlisted"])
def test_every_shard_of_sharded_keras_weights_is_walked_before_keras_reads_it(keras_model, tmp_path, where,
                                                                              skip_mismatch):
    """A shard holding an unallocated 2 GiB dataset (a 300 KB file) was read whole under skip_mismatch=True, and
    Keras also opens `<base>_00000.weights.h5` whether or not the index lists it."""
    model = keras_model
    index, shards = _sharded_weights(model, tmp_path)
    if where == "unlisted":  # the index names other files; the shard Keras opens by its own naming is the bad one
        data = json.loads(index.read_text())
        def elsewhere(value):
            names = value if isinstance(value, list) else [value]
            kept = [n for n in names if not n.endswith("_00000.weights.h5")] or [shards[-1].name]
            return kept if isinstance(value, list) else kept[0]

        data["weight_map"] = {k: elsewhere(v) for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    with h5py.File(shards[0], "r+") as f:
        vars_groups = []
        f.visititems(lambda n, o: vars_groups.append(n) if isinstance(o, h5py.Group) and n.endswith("vars") else None)
        name = [g for g in vars_groups if len(f[g])][0] + "/0"
        del f[name]
        f.create_dataset(name, shape=(1 << 29,), dtype="<f4", chunks=(1 << 18,), fillvalue=0.5)
    before = model.canonical_weights()["classifier.weight"].numpy().copy()
    with pytest.raises(CheckpointError) as info:
        model.load_weights(str(index), skip_mismatch=skip_mismatch)
    _assert_one_line(info, shards[0], "chunked storage")
    np.testing.assert_array_equal(model.canonical_weights()["classifier.weight"].numpy(), before)


def test_sharded_keras_weights_naming_a_file_outside_their_folder_are_refused(keras_model, tmp_path):
    model = keras_model
    index, _ = _sharded_weights(model, tmp_path)
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = ["../secret.weights.h5"]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as info:
        model.load_weights(str(index))
    _assert_one_line(info, index, "a shard must be a plain .weights.h5 file name")


@pytest.mark.parametrize("skip_mismatch", [False, True])
def test_a_legacy_h5_given_to_load_weights_is_walked_like_tf_model_h5(world, keras_model, tmp_path, skip_mismatch):
    """`load_weights("x.h5")` goes to Keras' legacy reader, which cast integer kernels and read unallocated data."""
    model = keras_model
    path = tmp_path / "legacy.h5"
    shutil.copyfile(world / "all" / "tf_model.h5", path)
    with h5py.File(path, "r+") as f:
        shape = f[TF_KERNEL].shape
        del f[TF_KERNEL]
        f[TF_KERNEL] = np.full(shape, 7, np.int32)
    before = model.canonical_weights()["classifier.weight"].numpy().copy()
    with pytest.raises(CheckpointError) as info:
        model.load_weights(str(path), skip_mismatch=skip_mismatch)
    _assert_one_line(info, path, "integer")
    np.testing.assert_array_equal(model.canonical_weights()["classifier.weight"].numpy(), before)


def test_valid_sharded_and_legacy_files_still_load_through_load_weights(world, keras_model, tmp_path):
    """Shards saved from one model, then the world's tf_model.h5, load into another model of other values."""
    from cvt_tf import TFCvtForImageClassification

    index, _ = _sharded_weights(keras_model, tmp_path)
    world_head = read_safetensors(str(world / "src" / "model.safetensors"))["classifier.weight"].T
    fresh = TFCvtForImageClassification(CvtConfig(**TINY_CONFIG))
    fresh.build_with_dummy_input()
    for path, want in ((index, keras_model.canonical_weights()["classifier.weight"].numpy()),
                       (world / "all" / "tf_model.h5", world_head)):
        assert not np.array_equal(fresh.canonical_weights()["classifier.weight"].numpy(), want)
        fresh.load_weights(str(path))
        np.testing.assert_array_equal(fresh.canonical_weights()["classifier.weight"].numpy(), want)


def test_variable_length_string_attributes_together_longer_than_the_file_are_refused(tmp_path, monkeypatch):
    """Such an attribute stores 16 bytes and points at a heap string many attributes may share; Keras' legacy
    loader read 3000 of them pointing at one 1 MB string (3 GB) from a 1.3 MB file. The walk adds their lengths up
    (here four distinct strings against a small file size and a small allowance, since a real file cannot share one
    string between attributes without hand-patching its heap)."""
    from cvt_core.h5_safety import TF_KIND, _Walk
    from cvt_core.untrusted import Limits

    monkeypatch.setattr(Limits, "H5_ATTRIBUTE_BYTES", 100)  # each stores 16 bytes; 100 is also the allowance

    path = tmp_path / "strings.h5"
    with h5py.File(path, "w") as f:
        for index in range(4):
            f.attrs[f"layer_names{index}"] = "x" * 1000  # h5py stores a Python str as a variable-length string
    with h5py.File(path, "r") as f:
        walk = _Walk(h5py, str(path), size=1500, kind=TF_KIND)
        with pytest.raises(CheckpointError, match="together hold 2000 bytes, more than the 1500-byte file"):
            walk.check_attributes(f.id, "/")
