"""Ownership by record, not by name: --force replaces a folder only when its .cvt-manifest.json accounts for every
entry, unchanged, and a single file (`cvt attention --out`) only when its PNG carries cvt's record; every writing
command refuses the files it reads; an interrupt (SIGINT, SIGTERM, SIGHUP) leaves nothing behind.

The rules live in conversion.atomic; tests/test_destinations.py covers the rest of the destination check."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conversion_helpers import REPO, assert_one_line_error, cli, leftovers, make_tiny_checkpoint, tree_listing

MANIFEST = ".cvt-manifest.json"
# The glob patterns an earlier cvt took for "what cvt writes" (and the fixed names of export and train)
OLD_PATTERNS = ("config.json", "preprocessor_config.json", "*.safetensors", "model.safetensors.index.json",
                "pytorch_model*.bin", "pytorch_model*.bin.index.json", "tf_model*.h5", "tf_model.h5.index.json",
                "model.weights.h5", "*.keras", "model.onnx", "model.pt2", "model.tflite", "report.json",
                "training_curve.png")


def lookalike_names(seed: int = 0, per_pattern: int = 5) -> list:
    """User file names that match the old patterns: random prefixes and suffixes in each pattern's `*`, the fixed
    names themselves, and the names from the report that found the problem."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_-"
    names = {"my_finetune_v2.safetensors", "archive_2023.keras", "pytorch_model_backup.bin"}
    for pattern in OLD_PATTERNS:
        if "*" not in pattern:
            names.add(pattern)
            continue
        for _ in range(per_pattern):
            names.add(pattern.replace("*", "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))))
    return sorted(names)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint (`src`, `tiny.json`), a folder `cvt convert` wrote (`written`) and an input image."""
    root = make_tiny_checkpoint(tmp_path_factory.mktemp("ownership"))
    code, out, err = cli("convert", root / "src", root / "written", "--to", "torch", "--quiet")
    assert code == 0, err
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "cat.png")
    return root


def test_lookalike_names_are_at_least_thirty_and_all_match_an_old_pattern():
    import fnmatch

    names = lookalike_names()
    assert len(names) >= 30
    assert all(any(fnmatch.fnmatchcase(n, p) for p in OLD_PATTERNS) for n in names)


# ------------------------------------------------------------------------------------------- the folder record
def test_every_folder_cvt_writes_carries_a_manifest_of_sizes_and_digests(world):
    import hashlib

    manifest = json.loads((world / "written" / MANIFEST).read_text())
    assert manifest["format"] == "cvt-manifest" and manifest["version"] == 1
    assert manifest["command"] == "cvt convert"
    listed = {item["path"]: item for item in manifest["files"]}
    assert sorted(listed) == sorted(n for n in os.listdir(world / "written") if n != MANIFEST)
    for name, item in listed.items():
        data = (world / "written" / name).read_bytes()
        assert item["size"] == len(data) and item["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_cvt_written_folder_with_subfolders_is_replaceable_under_force(tmp_path, monkeypatch):
    from conversion.atomic import atomic_directory, check_destination

    monkeypatch.chdir(tmp_path)
    with atomic_directory("out") as tmp:  # an export-like layout: a nested folder and an empty one
        os.makedirs(os.path.join(tmp, "saved_model", "variables"))
        os.makedirs(os.path.join(tmp, "saved_model", "assets"))
        for name in ("config.json", "saved_model/saved_model.pb", "saved_model/variables/variables.index"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(name)
    check_destination("out", force=True)
    with atomic_directory("out", force=True) as tmp:
        with open(os.path.join(tmp, "model.onnx"), "w") as f:
            f.write("new")
    assert sorted(os.listdir("out")) == [MANIFEST, "model.onnx"] and leftovers(tmp_path) == []


def test_convert_replaces_a_folder_cvt_wrote_under_force(world, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(world / "written", dst)  # a copy still proves itself: the record is of contents
    code, out, err = cli("convert", world / "src", dst, "--to", "torch", "--force", "--quiet")
    assert code == 0, err
    assert f"wrote {dst}" in out and leftovers(tmp_path) == []


@pytest.mark.parametrize("change", ["edit same size", "edit other size", "add file", "add folder", "add symlink",
                                    "replace by symlink", "add fifo"])
def test_a_cvt_written_folder_changed_by_the_user_is_refused_under_force(change, world, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(world / "written", dst)
    config = dst / "config.json"
    named = {"edit same size": "config.json", "edit other size": "config.json", "add file": "notes.txt",
             "add folder": "mine/", "add symlink": "link", "replace by symlink": "config.json",
             "add fifo": "pipe"}[change]
    if change == "edit same size":
        data = bytearray(config.read_bytes())
        data[data.index(b":") + 2] ^= 1  # one bit of one value: same size, other digest
        config.write_bytes(bytes(data))
    elif change == "edit other size":
        config.write_text(config.read_text() + " ")
    elif change == "add file":
        (dst / "notes.txt").write_text("mine")
    elif change == "add folder":
        (dst / "mine").mkdir()
        (dst / "mine" / "model.safetensors").write_text("mine")
    elif change == "add symlink":
        os.symlink(world / "src", dst / "link")
    elif change == "replace by symlink":
        (tmp_path / "elsewhere.json").write_bytes(config.read_bytes())
        config.unlink()
        os.symlink(tmp_path / "elsewhere.json", config)
    else:
        os.mkfifo(dst / "pipe")
    before = tree_listing(dst) if change != "add fifo" else sorted(os.listdir(dst))
    assert_one_line_error(*cli("convert", world / "src", dst, "--to", "torch", "--force", "--quiet"),
                          f"{dst}: {named} was not written by cvt (or was changed since)",
                          "move it away or choose another destination")
    assert (tree_listing(dst) if change != "add fifo" else sorted(os.listdir(dst))) == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("manifest", ["missing", "not json", "duplicate keys", "nan size", "wrong version",
                                      "a folder", "a symlink", "too large", "bad digest"])
def test_a_folder_without_a_readable_manifest_is_refused_under_force(manifest, world, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(world / "written", dst)
    record = dst / MANIFEST
    text = record.read_text()
    record.unlink()
    if manifest == "not json":
        record.write_text(text[:-20])
    elif manifest == "duplicate keys":
        record.write_text(text.replace('"version": 1,', '"version": 1, "version": 1,'))
    elif manifest == "nan size":
        value = json.loads(text)
        record.write_text(json.dumps(value).replace(f'"size": {value["files"][0]["size"]}', '"size": NaN'))
    elif manifest == "wrong version":
        record.write_text(text.replace('"version": 1,', '"version": 2,'))
    elif manifest == "a folder":
        record.mkdir()
    elif manifest == "a symlink":
        (tmp_path / "kept.json").write_text(text)
        os.symlink(tmp_path / "kept.json", record)
    elif manifest == "too large":
        record.write_text(text[:-2] + " " * (5 * 1024 * 1024) + "}\n")
    elif manifest == "bad digest":
        value = json.loads(text)
        value["files"][0]["sha256"] = "0" * 63 + "g"
        record.write_text(json.dumps(value))
    before = tree_listing(dst)
    code, out, err = cli("convert", world / "src", dst, "--to", "torch", "--force", "--quiet")
    fragment = ("it has no .cvt-manifest.json" if manifest == "missing" else
                f"its {MANIFEST} cannot be read")
    assert_one_line_error(code, out, err, fragment, "even --force does not replace it")
    assert tree_listing(dst) == before and leftovers(tmp_path) == []


def test_a_folder_a_user_changes_while_cvt_writes_is_not_replaced(world, tmp_path):
    from conversion.atomic import atomic_directory
    from conversion.errors import ConversionError

    dst = tmp_path / "dst"
    shutil.copytree(world / "written", dst)
    with pytest.raises(ConversionError, match="config.json was not written by cvt .*found when about to replace"):
        with atomic_directory(str(dst), force=True) as tmp:
            (dst / "config.json").write_text('{"mine": true}')  # changed after the first check
            (tmp_path / tmp / "config.json").write_text("{}")
    assert (dst / "config.json").read_text() == '{"mine": true}' and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- lookalike names
WRITERS = ["convert", "export", "demo", "train"]


def _writer_argv(command: str, world, dst) -> list:
    return {
        "convert": ["convert", world / "src", dst, "--to", "torch", "--force", "--quiet"],
        "export": ["export", world / "src", dst, "--format", "onnx", "--force", "--quiet"],
        "demo": ["demo", "--preset", world / "tiny.json", "--out", dst, "--force", "--quiet"],
        "train": ["train", "--out", dst, "--epochs", "1", "--no-convert", "--force", "--quiet"],
    }[command]


def _fill_with_lookalikes(folder, seed: int) -> list:
    rng = np.random.default_rng(seed)
    names = lookalike_names(seed)
    for name in names:
        (folder / name).write_bytes(rng.bytes(int(rng.integers(1, 64))))
    return names


@pytest.mark.parametrize("command", WRITERS)
def test_lookalike_names_in_a_folder_cvt_did_not_write_are_never_deleted_under_force(command, world, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    dst = tmp_path / "mine"
    dst.mkdir()
    names = _fill_with_lookalikes(dst, seed=WRITERS.index(command))
    before = tree_listing(dst)
    assert_one_line_error(*cli(*_writer_argv(command, world, dst)), "holds files cvt did not write",
                          "it has no .cvt-manifest.json", names[0])
    assert tree_listing(dst) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("command", WRITERS)
def test_lookalike_names_added_to_a_folder_cvt_wrote_are_never_deleted_under_force(command, world, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    dst = tmp_path / "mine"
    shutil.copytree(world / "written", dst)
    names = _fill_with_lookalikes(dst, seed=10 + WRITERS.index(command))  # config.json among them: changed
    before = tree_listing(dst)
    code, out, err = cli(*_writer_argv(command, world, dst))
    assert_one_line_error(code, out, err, "were not written by cvt (or were changed since)",
                          "move them away or choose another destination")
    assert any(name in err for name in names)
    assert tree_listing(dst) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("name", lookalike_names(seed=3)[:12])
def test_one_lookalike_beside_a_folder_cvt_wrote_is_named_and_kept(name, world, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(world / "written", dst)
    (dst / name).write_bytes(b"the user's own " + name.encode())
    assert_one_line_error(*cli("convert", world / "src", dst, "--to", "torch", "--force", "--quiet"),
                          f"{name} was not written by cvt")
    assert (dst / name).read_bytes() == b"the user's own " + name.encode()


# --------------------------------------------------------------------------------------- cvt attention --out
def test_the_png_record_proves_cvt_wrote_a_picture_and_any_change_undoes_the_proof(tmp_path):
    from conversion.atomic import png_with_record, png_written_by_cvt

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buffer, format="PNG")
    plain = buffer.getvalue()
    (tmp_path / "plain.png").write_bytes(plain)
    (tmp_path / "cvt.png").write_bytes(png_with_record(plain))
    assert png_written_by_cvt(str(tmp_path / "cvt.png")) and not png_written_by_cvt(str(tmp_path / "plain.png"))
    assert png_with_record(png_with_record(plain)) == png_with_record(plain)  # one record, never two
    from PIL.PngImagePlugin import PngInfo

    with Image.open(tmp_path / "cvt.png") as picture:
        record = picture.text.get("cvt-written", "")
        assert record.startswith("sha256=")  # an ordinary tEXt chunk
        edited = np.array(picture.convert("RGB"))
    edited[0, 0] = 255
    kept = PngInfo()
    kept.add_text("cvt-written", record)  # an editor that keeps the text chunks
    Image.fromarray(edited).save(tmp_path / "edited.png", pnginfo=kept)
    assert not png_written_by_cvt(str(tmp_path / "edited.png"))
    changed = bytearray(png_with_record(plain))
    changed[20] ^= 1
    (tmp_path / "changed.png").write_bytes(bytes(changed))
    assert not png_written_by_cvt(str(tmp_path / "changed.png"))


def _attention(world, out, *extra):
    return cli("attention", world / "cat.png", "--model", world / "written", "--out", out, "--quiet", *extra)


@pytest.mark.parametrize("target", ["model weights", "model config", "model folder", "input image",
                                    "new file in the model folder", "hard link to the input image"])
def test_attention_out_onto_what_it_reads_is_refused_and_the_file_unchanged(target, world, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(world / "written", model)
    image = tmp_path / "cat.png"
    shutil.copy(world / "cat.png", image)
    out = {"model weights": model / "model.safetensors", "model config": model / "config.json",
           "model folder": model, "input image": image, "new file in the model folder": model / "attention.png",
           "hard link to the input image": tmp_path / "other.png"}[target]
    if target == "hard link to the input image":
        os.link(image, out)
    before = tree_listing(tmp_path)
    code, stdout, err = cli("attention", image, "--model", model, "--out", out, "--force", "--quiet")
    fragment = {"model folder": "is the source", "input image": "is the source",
                "hard link to the input image": "is the source"}.get(target, "lies inside the source")
    assert_one_line_error(code, stdout, err, fragment)
    assert tree_listing(tmp_path) == before


def test_attention_replaces_its_own_picture_under_force_and_refuses_any_other(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "attention.png"
    code, stdout, err = _attention(world, out)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == f"wrote {out}"
    from conversion.atomic import png_written_by_cvt

    assert png_written_by_cvt(str(out))
    code, stdout, err = _attention(world, out, "--force", "--layer", "0")
    assert code == 0, err

    for name in lookalike_names(seed=4)[:3] + ["attention.png"]:
        mine = tmp_path / "mine" / name
        mine.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(mine, format="PNG")  # a real PNG, not cvt's
        data = mine.read_bytes()
        assert_one_line_error(*_attention(world, mine, "--force"),
                              f"{mine}: was not written by cvt (or was changed since)")
        assert mine.read_bytes() == data
    assert not [n for n in os.listdir(tmp_path / "mine") if n.startswith(".tmp-")]


# ------------------------------------------------------------------------------------------------- interrupts
def test_signals_during_a_rename_are_held_back_until_it_is_done(tmp_path, monkeypatch):
    import conversion.atomic as atomic

    real = atomic._commit

    def interrupted_commit(*args):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the destination is renamed into place
        real(*args)

    monkeypatch.setattr(atomic, "_commit", interrupted_commit)
    monkeypatch.chdir(tmp_path)
    # Python's own SIGINT handler, as in a command started in the foreground (a background job inherits SIGINT
    # ignored, and the held-back signal would then be delivered to SIG_IGN)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with atomic.running_command("test"):
            with pytest.raises(KeyboardInterrupt):
                with atomic.atomic_directory("out") as tmp:
                    with open(os.path.join(tmp, "config.json"), "w") as f:
                        f.write("{}")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(os.listdir("out")) == [MANIFEST, "config.json"] and leftovers(tmp_path) == []
    assert atomic.committed_destinations() == [str(tmp_path / "out")]


@pytest.fixture
def interrupt_request_forgotten_after():
    """cvt's signal handler, called in this process, leaves conversion.atomic's interrupt request set when the
    command ends (the next command starts afresh); a later test's direct `atomic_directory` in the same process
    would then raise KeyboardInterrupt and end the whole pytest session. Forgotten after the test."""
    import conversion.atomic as atomic

    yield
    atomic._interrupt_requested = False


def test_an_interrupt_swallowed_during_the_cross_check_still_exits_130_and_writes_nothing(
        world, tmp_path, monkeypatch, interrupt_request_forgotten_after):
    """CPython drops a KeyboardInterrupt raised inside a weakref callback or __del__ (seen with importlib's
    module-lock callback): the request is remembered, and no rename follows it."""
    import conversion.crosscheck as crosscheck
    from cvt_cli.app import _on_sigterm

    real = crosscheck.build_result

    def swallowed(*args, **kwargs):
        try:
            _on_sigterm(signal.SIGINT, None)  # the handler runs where its exception is lost
        except KeyboardInterrupt:
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(crosscheck, "build_result", swallowed)
    dst = tmp_path / "dst"
    code, out, err = cli("convert", world / "src", dst, "--to", "torch", "--quiet")
    assert code == 130 and err == "cvt: error: interrupted; nothing was written\n", (code, err)
    assert "wrote" not in out and not dst.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("reraised", [ValueError, RuntimeError, TypeError])
def test_an_interrupt_a_framework_turns_into_another_exception_still_exits_130_and_writes_nothing(
        world, tmp_path, monkeypatch, reraised, interrupt_request_forgotten_after):
    """TensorFlow's graph tracing catches the KeyboardInterrupt a signal raises and re-raises its own error (seen
    under SIGTERM during `cvt export`): the interrupt request decides the exit, not the exception's type."""
    import conversion.crosscheck as crosscheck
    from cvt_cli.app import _on_sigterm

    def traced(*args, **kwargs):
        try:
            _on_sigterm(signal.SIGTERM, None)
        except KeyboardInterrupt:
            raise reraised("Tried to convert 'shape' to a tensor and failed. Error: None values not supported.")

    monkeypatch.setattr(crosscheck, "build_result", traced)
    dst = tmp_path / "dst"
    code, out, err = cli("convert", world / "src", dst, "--to", "torch", "--quiet")
    assert code == 130 and err == "cvt: error: interrupted; nothing was written\n", (code, err)
    assert not dst.exists() and leftovers(tmp_path) == []


def _convert_process(world, dst, cwd):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               KERAS_BACKEND=os.environ.get("KERAS_BACKEND", "tensorflow"))
    return subprocess.Popen([sys.executable, "-m", "cvt_cli", "convert", str(world / "src"), str(dst),
                             "--to", "torch,keras", "--quiet"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)


def _default_signals():
    """In the child: the signals at their defaults even when this test runs with them ignored (a background job,
    nohup), so that the child's Python installs its own handlers."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM], ids=["SIGINT", "SIGHUP", "SIGTERM"])
def test_a_signal_during_the_cross_check_exits_130_and_leaves_nothing(signum, world, tmp_path):
    """`cvt convert` in a child process gets the signal once its temporary folder holds the PyTorch weights (the
    cross-check is under way), after a random extra delay; a child that finished first is run again."""
    rng = random.Random(int(signum))
    for attempt in range(4):
        dst = tmp_path / f"out{attempt}"
        process = _convert_process(world, dst, tmp_path)
        deadline = time.monotonic() + 240
        started = False
        while time.monotonic() < deadline and process.poll() is None:
            partial = [n for n in os.listdir(tmp_path) if n.startswith(f".{dst.name}.partial-")]
            if partial and os.path.exists(tmp_path / partial[0] / "model.safetensors"):
                started = True
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5) / (attempt + 1))
        if process.poll() is None:
            process.send_signal(signum)
        out, err = process.communicate(timeout=240)
        assert started or process.returncode == 0, (process.returncode, err[-2000:])
        if process.returncode == 0:  # finished before the signal: try again, sooner
            assert (dst / MANIFEST).exists()
            continue
        assert process.returncode == 130, (process.returncode, err[-2000:])
        assert err.strip().splitlines()[-1] == "cvt: error: interrupted; nothing was written", err[-2000:]
        assert "Traceback" not in err and "wrote" not in out
        assert not dst.exists() and leftovers(tmp_path) == []
        return
    pytest.fail("cvt convert finished before every signal; no interrupt was tested")
