"""`cvt train` and `cvt predict` end to end on a tiny image folder (in-process through
`cvt_cli.app.main`), their outputs, and the one-line errors for bad datasets."""

from __future__ import annotations

import contextlib
import io
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from cvt_cli.app import main  # noqa: E402

CLASSES = ("circle", "cross", "square")


def draw(kind: str, rng: np.random.Generator, size: int = 20) -> Image.Image:
    """A white shape on black with jitter: easy to tell apart even after one epoch."""
    canvas = np.zeros((size, size), np.uint8)
    y, x = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-2, 2, 2)
    if kind == "circle":
        canvas[(y - cy) ** 2 + (x - cx) ** 2 < (size / 3) ** 2] = 255
    elif kind == "cross":
        canvas[(np.abs(y - cy) < 2) | (np.abs(x - cx) < 2)] = 255
    else:
        canvas[4:-4, 4:-4] = 255
    noise = rng.integers(0, 40, canvas.shape, dtype=np.uint8)
    return Image.fromarray(np.maximum(canvas, noise)).convert("RGB")


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for kind in CLASSES:
        (root / kind).mkdir()
        for i in range(8):
            draw(kind, rng).save(root / kind / f"{kind}-{i}.png")
    return root


def train_args(data, out, framework, *extra):
    return ["train", "--data", str(data), "--framework", framework, "--epochs", "2", "--batch-size", "8",
            "--image-size", "16", "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def torch_run(shapes_folder, tmp_path_factory):
    """(run folder, exit status, printed text) of a 2-epoch PyTorch run, shared by the tests that need one."""
    out = tmp_path_factory.mktemp("runs") / "torch"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(train_args(shapes_folder, out, "torch"))
    return out, status, printed.getvalue()


def other_framework(framework: str) -> str:
    return {"torch": "keras", "keras": "torch"}[framework]


def _summary(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("validation accuracy:")]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_cvt_train_writes_checkpoint_plot_report_and_agrees_in_the_other_framework(framework, shapes_folder,
                                                                                   tmp_path, capsys, torch_run):
    if framework == "torch":
        out, status, printed = torch_run
    else:
        out = tmp_path / "keras"
        status = main(train_args(shapes_folder, out, "keras"))
        printed = capsys.readouterr().out
    assert status == 0, printed
    assert "epoch 2/2" in printed and f"converting to {other_framework(framework)}" in printed
    assert "top-1 agreement 100.00%" in _summary(printed)
    other = other_framework(framework)
    checkpoint = out / "checkpoint"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASSES)}
    assert config["image_size"] == 16
    assert (checkpoint / "model.safetensors").is_file()
    preprocessing = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert preprocessing["size"] == {"shortest_edge": 16} and preprocessing["crop_pct"] == 1.0
    assert (out / f"converted-{other}" / ("model.keras" if other == "keras" else "model.safetensors")).is_file()
    assert (out / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["framework"] == framework and len(report["history"]) == 2
    assert report["dataset"]["train_images"] == 18 and report["dataset"]["val_images"] == 6
    assert set(report["validation_accuracy"]) == {"torch", "keras"}
    assert report["validation_accuracy"]["torch"] == report["validation_accuracy"]["keras"]
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_difference"] < 1e-4


def test_cvt_predict_prints_top_k_labels_with_probabilities_in_either_framework(torch_run, shapes_folder, capsys):
    out, status, _ = torch_run
    assert status == 0
    images = [str(shapes_folder / "cross" / "cross-0.png"), str(shapes_folder / "circle" / "circle-1.png")]
    capsys.readouterr()
    printed = {}
    for framework in ("torch", "keras"):
        assert main(["predict", *images, "--model", str(out / "checkpoint"), "--top-k", "2",
                     "--framework", framework]) == 0
        printed[framework] = capsys.readouterr().out
    lines = printed["torch"].splitlines()
    assert lines[0].startswith(str(out / "checkpoint")) and "torch" in lines[0]
    assert lines[1] == images[0] and lines[4] == images[1]
    ranks = [line.split() for line in lines[2:4] + lines[5:7]]
    assert [r[0] for r in ranks] == ["1.", "2.", "1.", "2."]
    assert all(r[1] in CLASSES for r in ranks)
    probabilities = [float(r[2]) for r in ranks]
    assert probabilities[0] >= probabilities[1] and probabilities[2] >= probabilities[3]
    assert 0 < probabilities[0] + probabilities[1] <= 1.0001
    keras_ranks = [line.split() for line in printed["keras"].splitlines()[2:4] + printed["keras"].splitlines()[5:7]]
    assert [r[1] for r in keras_ranks] == [r[1] for r in ranks]
    np.testing.assert_allclose([float(r[2]) for r in keras_ranks], probabilities, atol=2e-4)


def test_cvt_train_without_data_uses_the_embedded_digits(tmp_path, capsys):
    assert main(["train", "--epochs", "1", "--no-convert", "--out", str(tmp_path / "digits"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "handwritten digits" in printed and "1797 images, 10 classes" in printed
    report = json.loads((tmp_path / "digits" / "report.json").read_text())
    assert report["dataset"]["classes"] == [str(i) for i in range(10)]
    assert report["model"]["parameters"] == 570_058 and report["validation_accuracy"]["torch"] > 0.3
    assert report["top1_agreement"] is None


def _bad_folder(root, kind):
    if kind == "empty":
        root.mkdir()
    elif kind == "one-class":
        (root / "only").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "only" / "a.png")
    elif kind == "unreadable":
        for name in ("a", "b"):
            (root / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / name / "ok.png")
        (root / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


@pytest.mark.parametrize("kind, message", [
    ("empty", "no class subfolders"),
    ("one-class", "only one class ('only')"),
    ("unreadable", "corrupt.jpg: cannot read this file as an image"),
    ("missing", "no such dataset folder"),
])
def test_bad_dataset_folder_gives_a_one_line_error_and_status_2(kind, message, tmp_path, capsys):
    data = _bad_folder(tmp_path / "data", kind)
    status = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("cvt: error: ") and err.count("\n") == 1 and message in err, err


def test_existing_run_folder_is_kept_unless_forced(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("keep me")
    assert main(["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet"]) == 2
    assert "holds files cvt did not write (mine.txt)" in capsys.readouterr().err
    assert (tmp_path / "run" / "mine.txt").read_text() == "keep me"


def test_predict_reports_a_missing_image_in_one_line(torch_run, tmp_path, capsys):
    out, _, _ = torch_run
    assert main(["predict", str(tmp_path / "nope.png"), "--model", str(out / "checkpoint")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cvt: error: ") and "nope.png" in err and "no such image file" in err


def test_framework_specific_options_are_refused_for_the_other_framework(tmp_path, capsys):
    assert main(["train", "--framework", "keras", "--compile", "--out", str(tmp_path / "a")]) == 2
    assert "--compile applies to --framework torch only" in capsys.readouterr().err
    assert main(["train", "--strategy", "mirrored", "--out", str(tmp_path / "b")]) == 2
    assert "torchrun" in capsys.readouterr().err


@pytest.mark.slow
def test_main_job_reaches_95_percent_on_digits_in_both_frameworks_with_full_agreement(tmp_path, capsys):
    """The README's main job (`cvt train` with its defaults): digits, PyTorch training, Keras evaluation."""
    assert main(["train", "--out", str(tmp_path / "main"), "--quiet"]) == 0
    summary = _summary(capsys.readouterr().out)
    report = json.loads((tmp_path / "main" / "report.json").read_text())
    assert report["validation_accuracy"]["torch"] >= 0.95 and report["validation_accuracy"]["keras"] >= 0.95, summary
    assert report["top1_agreement"] == 1.0 and "top-1 agreement 100.00%" in summary
