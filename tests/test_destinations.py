"""Where the commands may write: an empty destination, the working folder, the source or a folder around or inside
it are refused; --force replaces only an empty folder or one whose .cvt-manifest.json proves cvt wrote everything
in it; a failed command leaves no folder and prints no "wrote". The rule (conversion.atomic.check_destination) is
tested once, then `cvt convert`, `cvt demo` and `cvt train` through it. tests/test_ownership.py tests the
ownership records themselves, lookalike names and `cvt attention --out`."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conversion_helpers import assert_one_line_error, cli, leftovers, make_tiny_checkpoint, tree_listing


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random transformers-layout checkpoint (`src`) and its config file (`tiny.json`)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("destinations"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The working folder of the command: a folder holding a sentinel file."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "sentinel.txt").write_text("do not delete")
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two classes of four 12x12 images: enough for a one-step `cvt train`."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("dark", "light"):
        (root / label).mkdir()
        for i in range(4):
            base = 40 if label == "dark" else 200
            pixels = np.clip(base + rng.integers(-30, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


# --------------------------------------------------------------------------------------------------------- the rule
def _layout(root):
    """Destinations of every kind, under `root` (the working folder)."""
    from conversion.atomic import atomic_directory

    (root / "par" / "child").mkdir(parents=True)
    names = ("config.json", "model.safetensors", "tf_model.h5", "model.weights.h5", "model.keras",
             "preprocessor_config.json")
    with atomic_directory(str(root / "ckpt")) as tmp:  # written by cvt: it has a manifest
        for name in names:
            with open(os.path.join(tmp, name), "w") as f:
                f.write("{}")
    (root / "handmade").mkdir()  # the same names, written by hand: no manifest
    for name in names:
        (root / "handmade" / name).write_text("{}")
    (root / "empty").mkdir()
    (root / "mixed").mkdir()
    (root / "mixed" / "config.json").write_text("{}")
    (root / "mixed" / "notes.txt").write_text("mine")
    (root / "mixed" / "src").mkdir()
    (root / "file").write_text("mine")
    os.symlink(root / "ckpt", root / "link")


@pytest.mark.parametrize("dst, force, sources, message", [
    ("", True, [], "the destination '' is empty"),
    ("   ", True, [], "is empty"),
    (".", True, [], "is the working folder"),
    ("..", True, [], "contains the working folder"),
    ("par", True, ["par/child"], "contains the source par/child"),
    ("par/child", True, ["par/child"], "is the source par/child"),
    ("par/child/out", False, ["par/child"], "lies inside the source par/child"),
    ("mixed", True, [], "holds files cvt did not write (config.json, notes.txt, src/)"),
    ("mixed", False, [], "holds files cvt did not write"),
    ("handmade", True, [], "it has no .cvt-manifest.json"),
    ("handmade", False, [], "so even --force does not replace it"),
    ("file", True, [], "is a file"),
    ("link", True, [], "is a symbolic link"),
    ("ckpt", False, [], "already exists; pass --force"),
    ("empty", False, [], "already exists; pass --force"),
])
def test_check_destination_refuses_with_one_line_naming_the_problem(dst, force, sources, message, workdir):
    from conversion.atomic import check_destination
    from conversion.errors import ConversionError

    _layout(workdir)
    before = tree_listing(workdir)
    with pytest.raises(ConversionError) as caught:
        check_destination(dst, force, sources)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert tree_listing(workdir) == before


@pytest.mark.parametrize("dst, force, empty_ok", [
    ("new", False, False), ("new/deeper", False, False), ("empty", True, False), ("ckpt", True, False),
    ("empty", False, True),
])
def test_check_destination_allows_new_empty_and_checkpoint_folders(dst, force, empty_ok, workdir):
    from conversion.atomic import check_destination

    _layout(workdir)
    check_destination(dst, force, ["par/child"], empty_ok=empty_ok)


def test_files_appearing_in_the_destination_while_writing_are_not_replaced(workdir):
    from conversion.atomic import atomic_directory
    from conversion.errors import ConversionError

    (workdir / "out").mkdir()
    with pytest.raises(ConversionError, match="holds files cvt did not write"):
        with atomic_directory("out", force=True) as tmp:
            (workdir / "out" / "notes.txt").write_text("written meanwhile")
            (workdir / tmp / "config.json").write_text("{}")
    assert os.listdir(workdir / "out") == ["notes.txt"] and leftovers(workdir) == []


# ------------------------------------------------------------------------------------------------------ cvt convert
def test_convert_to_an_empty_destination_is_refused_and_the_working_folder_kept(checkpoint, workdir):
    before = tree_listing(workdir)
    assert_one_line_error(*cli("convert", checkpoint / "src", "", "--to", "torch", "--force"), "is empty")
    assert tree_listing(workdir) == before and leftovers(workdir.parent) == []


def test_convert_to_the_working_folder_is_refused(checkpoint, workdir):
    before = tree_listing(workdir)
    assert_one_line_error(*cli("convert", checkpoint / "src", ".", "--to", "torch", "--force"), "working folder")
    assert tree_listing(workdir) == before and leftovers(workdir.parent) == []


def test_convert_into_the_parent_of_the_source_is_refused_and_the_source_kept(checkpoint, workdir):
    shutil.copytree(checkpoint / "src", workdir / "par" / "child")
    before = tree_listing(workdir)
    assert_one_line_error(*cli("convert", "par/child", "par", "--to", "torch", "--force"), "contains the source")
    assert tree_listing(workdir) == before and leftovers(workdir) == []


def test_convert_onto_the_source_is_refused_and_the_source_kept(checkpoint, workdir):
    shutil.copytree(checkpoint / "src", workdir / "ckpt")
    before = tree_listing(workdir)
    assert_one_line_error(*cli("convert", "ckpt", "ckpt", "--to", "torch", "--force"), "is the source")
    assert_one_line_error(*cli("convert", "ckpt", os.path.join(os.getcwd(), "ckpt", "."), "--to", "torch", "--force"),
                    "is the source")
    assert tree_listing(workdir) == before and leftovers(workdir) == []


def test_convert_into_a_folder_inside_the_source_is_refused(checkpoint, workdir):
    shutil.copytree(checkpoint / "src", workdir / "ckpt")
    before = tree_listing(workdir)
    assert_one_line_error(*cli("convert", "ckpt", "ckpt/converted", "--to", "torch"), "lies inside the source")
    assert_one_line_error(*cli("convert", "ckpt/model.safetensors", "ckpt", "--config", checkpoint / "tiny.json",
                         "--to", "torch", "--force"), "contains the source")
    assert tree_listing(workdir) == before


def test_force_does_not_replace_a_folder_holding_other_files(checkpoint, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    (dst / "config.json").write_text("{}")
    assert_one_line_error(*cli("convert", checkpoint / "src", dst, "--to", "torch", "--force"),
                          "holds files cvt did not write (config.json, notes.txt)",
                          "move them away or choose another destination")
    assert sorted(os.listdir(dst)) == ["config.json", "notes.txt"] and (dst / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_force_does_not_replace_a_file_or_a_symlink(kind, checkpoint, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    dst = tmp_path / "dst"
    if kind == "file":
        dst.write_text("mine")
    else:
        os.symlink(target, dst)
    assert_one_line_error(*cli("convert", checkpoint / "src", dst, "--to", "torch", "--force"),
                    "is a file" if kind == "file" else "is a symbolic link")
    assert os.path.islink(dst) == (kind == "symlink")
    assert (dst.read_text() if kind == "file" else (dst / "notes.txt").read_text()) == "mine"
    assert leftovers(tmp_path) == []


# a duplicate of test_conversion_cli.py::test_existing_destination_needs_force_and_survives_a_failed_replacement
# (the same three conversions, cross-checked in both frameworks; that one also checks the refusal without --force)
@pytest.mark.slow
def test_force_replaces_a_previous_output_and_a_failed_replacement_keeps_it(checkpoint, tmp_path):
    dst = tmp_path / "dst"
    code, out, err = cli("convert", checkpoint / "src", dst, "--to", "torch,hf-tf")
    assert code == 0, err
    first = tree_listing(dst)
    code, out, err = cli("convert", checkpoint / "src", dst, "--to", "torch,hf-tf", "--force", "--atol", "1e-12")
    assert code == 1 and tree_listing(dst) == first and leftovers(tmp_path) == []
    code, out, err = cli("convert", checkpoint / "src", dst, "--to", "torch", "--force")
    assert code == 0, err
    assert sorted(os.listdir(dst)) == [".cvt-manifest.json", "config.json", "model.safetensors",
                                       "preprocessor_config.json"]
    assert leftovers(tmp_path) == []


def test_failing_cross_check_prints_no_wrote(checkpoint, tmp_path):
    # float16 weights differ from the float32 source by ~1e-3: the check fails without building a Keras model
    code, out, err = cli("convert", checkpoint / "src", tmp_path / "dst", "--to", "torch", "--dtype", "float16",
                         "--atol", "1e-12")
    assert code == 1, err
    assert "wrote" not in out, out
    assert out.strip().splitlines()[-1].startswith("FAILED:") and "was not written" in out
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path) == []


def test_passing_convert_prints_wrote_after_the_check(checkpoint, tmp_path):
    code, out, err = cli("convert", checkpoint / "src", tmp_path / "dst", "--to", "torch")
    assert code == 0, err
    lines = out.splitlines()
    wrote = [i for i, line in enumerate(lines) if line.startswith(f"wrote {tmp_path / 'dst'} (torch):")]
    table_end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("top-1 agreement"))
    assert len(wrote) == 1 and wrote[0] > table_end, out


# --------------------------------------------------------------------------------------------------------- cvt demo
def test_demo_out_follows_the_same_rule(checkpoint, workdir):
    (workdir / "kept").mkdir()
    (workdir / "kept" / "notes.txt").write_text("mine")
    before = tree_listing(workdir)
    preset = str(checkpoint / "tiny.json")
    assert_one_line_error(*cli("demo", "--preset", preset, "--out", "", "--force", "--quiet"), "is empty")
    assert_one_line_error(*cli("demo", "--preset", preset, "--out", ".", "--force", "--quiet"), "working folder")
    assert_one_line_error(*cli("demo", "--preset", preset, "--out", "kept", "--force", "--quiet"),
                    "holds files cvt did not write (notes.txt)")
    assert tree_listing(workdir) == before


# -------------------------------------------------------------------------------------------------------- cvt train
def _train(images, out, *extra):
    return cli("train", "--data", images, "--epochs", "1", "--batch-size", "8", "--image-size", "16",
               "--val-fraction", "0.25", "--out", out, "--quiet", *extra)


def test_train_out_onto_a_folder_holding_other_files_is_refused(images, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert_one_line_error(*_train(images, run, "--no-convert", "--force"), "holds files cvt did not write (notes.txt)")
    assert os.listdir(run) == ["notes.txt"] and leftovers(tmp_path) == []


def test_train_out_empty_or_the_data_folder_is_refused(images, workdir):
    before = tree_listing(workdir), tree_listing(images)
    assert_one_line_error(*_train(images, "", "--no-convert", "--force"), "is empty")
    assert_one_line_error(*_train(images, images, "--no-convert", "--force"), "is the source")
    assert_one_line_error(*_train(images, images / "dark", "--no-convert", "--force"), "lies inside the source")
    assert (tree_listing(workdir), tree_listing(images)) == before


@pytest.mark.parametrize("problem", ["missing data", "unknown config"])
def test_failed_train_leaves_no_run_folder(problem, images, tmp_path):
    out = tmp_path / "runs" / "first"
    if problem == "missing data":
        result = _train(tmp_path / "no-such-data", out)
    else:
        result = _train(images, out, "--config", "cvt-99")
    assert_one_line_error(*result)
    assert os.listdir(tmp_path) == []  # neither the run folder nor the runs/ it would have created


def test_train_builds_its_run_folder_atomically_names_final_paths_and_force_replaces_an_earlier_run(images, tmp_path):
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)  # an empty folder is used without --force
    code, out, err = _train(images, run)
    assert code == 0, err
    assert ".partial" not in out + err and leftovers(run.parent) == []
    assert f"wrote {run}: checkpoint/, converted-keras/" in out
    report = json.loads((run / "report.json").read_text())
    assert report["files"] == {"checkpoint": str(run / "checkpoint"), "converted": str(run / "converted-keras"),
                               "plot": report["files"]["plot"], "report": str(run / "report.json")}
    assert report["files"]["plot"] in (None, str(run / "training_curve.png"))

    assert_one_line_error(*_train(images, run, "--no-convert"), "already exists; pass --force")
    code, out, err = _train(images, run, "--no-convert", "--force")  # an earlier run is cvt's own: replaced
    assert code == 0, err
    assert "converted-keras" not in os.listdir(run) and leftovers(run.parent) == []


def test_train_whose_conversion_fails_its_check_keeps_the_trained_checkpoint_and_exits_1(images, tmp_path,
                                                                                         monkeypatch):
    import conversion.crosscheck as crosscheck

    monkeypatch.setattr(crosscheck, "default_atol", lambda cast: 1e-12)
    run = tmp_path / "run"
    code, out, err = _train(images, run)
    assert code == 1, err
    assert "conversion to keras FAILED" in out and ".partial" not in out + err
    assert set(os.listdir(run)) - {"training_curve.png"} == {"checkpoint", "report.json", ".cvt-manifest.json"}
    assert "model.safetensors" in os.listdir(run / "checkpoint") and leftovers(tmp_path) == []
    assert json.loads((run / "report.json").read_text())["conversion_failed"].startswith("FAILED:")
