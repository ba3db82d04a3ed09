"""The `cvt` command's surface: `--version`, `cvt predict --json` (JSON Lines, notes on stderr) and help texts
that agree with the parsers they describe (every positional explained, every option they name real, every stated
default the true one)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from importlib import metadata

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from conversion.pipeline import make_random_checkpoint  # noqa: E402
from conversion_helpers import REPO, TINY_CONFIG, assert_one_line_error, cli  # noqa: E402
from cvt_cli import app  # noqa: E402
from cvt_core.config import CvtConfig  # noqa: E402

LABELS = {0: "circle", 1: "cross", 2: "square"}


def _subcommands():
    """(name, parser) of every `cvt` command, and ("", the top-level parser)."""
    parser = app.build_parser()
    yield "", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _run_cvt(*args: str) -> subprocess.CompletedProcess:
    """`python -m cvt_cli ARGS` in a child process, with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "cvt_cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


# ------------------------------------------------------------------------------------------ --version
def test_version_prints_the_installed_distribution_version_and_exits_0():
    done = _run_cvt("--version")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"cvt {metadata.version('cvt-dual')}"
    assert lines[1].startswith("installed: ")
    for name in ("torch", "tensorflow", "keras"):
        try:
            assert f"{name} {metadata.version(name)}" in lines[1]
        except metadata.PackageNotFoundError:
            assert f"{name} " not in lines[1]
    assert done.stderr == ""


def test_version_imports_no_framework():
    code = ("import sys\nfrom cvt_cli.app import main\ntry:\n    main(['--version'])\nexcept SystemExit as exc:\n"
            "    assert exc.code == 0, exc.code\nprint(sorted(m for m in ('torch', 'tensorflow', 'keras') "
            "if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_version_falls_back_to_pyproject_when_the_distribution_is_not_installed(monkeypatch, capsys):
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    real_version = metadata.version

    def version(name):
        if name == app.DISTRIBUTION:
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(SystemExit) as exited:
        app.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.splitlines()[0] == f"cvt {declared}"


# ------------------------------------------------------------------------------------------ predict --json
@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A random 3-class checkpoint without preprocessor_config.json (so predict prints its note) and 3 images."""
    root = tmp_path_factory.mktemp("predict-json")
    directory = root / "checkpoint"
    make_random_checkpoint(str(directory), CvtConfig(**{**TINY_CONFIG, "id2label": LABELS}), seed=0)
    if (directory / "preprocessor_config.json").exists():
        os.unlink(directory / "preprocessor_config.json")
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        images.append(str(root / f"image-{i}.png"))
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images[-1])
    return directory, images


def _plain_rankings(printed: str, images):
    """{image: [(label, probability), ...]} from the plain output."""
    rankings, current = {}, None
    for line in printed.splitlines():
        if line in images:
            current = rankings.setdefault(line, [])
        elif current is not None:  # the ranks below an image; the notes and the header come before the first
            rank, label, probability = line.split()
            assert rank == f"{len(current) + 1}."
            current.append((label, float(probability)))
    return rankings


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_predict_json_prints_one_object_per_image_whose_top1_equals_the_plain_output(classifier, framework):
    directory, images = classifier
    code, plain, _ = cli("predict", *images, "--model", directory, "--top-k", "2", "--framework", framework, "-q")
    assert code == 0
    rankings = _plain_rankings(plain, images)
    assert list(rankings) == images and "has no preprocessor_config.json" in plain
    code, out, err = cli("predict", *images, "--model", directory, "--top-k", "2", "--framework", framework, "-q",
                         "--json")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(images)
    objects = [json.loads(line) for line in lines]  # every stdout line is JSON: nothing else went there
    assert [o["image"] for o in objects] == images
    for item in objects:
        assert set(item) == {"image", "predictions"}
        predictions = item["predictions"]
        assert len(predictions) == 2 and all(set(p) == {"label", "id", "score"} for p in predictions)
        assert all(LABELS[p["id"]] == p["label"] for p in predictions)
        assert predictions[0]["score"] >= predictions[1]["score"] and 0 < sum(p["score"] for p in predictions) <= 1
        shown = rankings[item["image"]]
        assert [p["label"] for p in predictions] == [label for label, _ in shown]
        np.testing.assert_allclose([p["score"] for p in predictions], [s for _, s in shown], atol=5e-5)
    assert "has no preprocessor_config.json" in err and f"({framework}, 3 classes)" in err  # the notes, on stderr


def test_predict_json_top_k_beyond_the_classes_gives_every_class_summing_to_1(classifier):
    directory, images = classifier
    code, out, err = cli("predict", images[0], "--model", directory, "--top-k", "10", "--json", "-q")
    assert code == 0, err
    predictions = json.loads(out)["predictions"]
    assert sorted(p["id"] for p in predictions) == [0, 1, 2]
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-6)


def test_predict_json_reports_a_missing_image_in_one_line_on_stderr_and_nothing_on_stdout(classifier, tmp_path):
    directory, _ = classifier
    missing = tmp_path / "nope.png"
    code, out, err = cli("predict", missing, "--model", directory, "--json", "-q")
    assert out == ""
    assert_one_line_error(code, out, err, missing, "no such image file")


def test_predict_json_writes_a_non_finite_score_as_null_so_the_line_stays_json():
    from cvt_cli.predict import _json_safe

    result = {"image": "x.png", "predictions": [{"label": "a", "id": 0, "score": float("nan")},
                                                {"label": "b", "id": 1, "score": 0.5}]}
    line = json.dumps(_json_safe(result), allow_nan=False)
    assert [p["score"] for p in json.loads(line)["predictions"]] == [None, 0.5]


# ------------------------------------------------------------------------------------------ help texts
def _texts(parser: argparse.ArgumentParser):
    """(where, text) of everything a command's --help shows in words: description, epilog and each help."""
    for where, text in (("description", parser.description), ("epilog", parser.epilog)):
        if text:
            yield where, text
    for action in parser._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            yield "/".join(action.option_strings) or action.metavar or action.dest, action.help


def test_every_positional_argument_has_help():
    missing = [f"cvt {name} {action.metavar or action.dest}" for name, parser in _subcommands()
               for action in parser._actions if not action.option_strings and not (action.help or "").strip()]
    assert missing == []


def test_every_option_named_in_a_commands_help_is_an_option_of_that_command():
    wrong = []
    for name, parser in _subcommands():
        options = {option for action in parser._actions for option in action.option_strings}
        for where, text in _texts(parser):
            for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text):
                if option not in options:
                    wrong.append(f"cvt {name} ({where}): {option}")
    assert wrong == []


def _stated_default(text: str):
    """The value a help text says is the default: the word after `default` or `default:`, or None."""
    found = re.search(r"\bdefault:? ([^\s,;)]+)", text)
    return found.group(1) if found else None


def test_every_default_stated_in_help_is_the_parsers_default():
    wrong, checked = [], 0
    for name, parser in _subcommands():
        for action in parser._actions:
            stated = _stated_default(action.help or "")
            if stated is None or action.default in (None, False, argparse.SUPPRESS):
                continue  # a default worked out at run time is described in words, not checked here
            checked += 1
            value = action.default
            same = (stated == str(value) if isinstance(value, str)
                    else float(stated) == float(value) if re.fullmatch(r"-?[0-9.e+-]+", stated) else False)
            if not same:
                wrong.append(f"cvt {name} {'/'.join(action.option_strings)}: help says {stated!r}, default {value!r}")
    assert wrong == [] and checked >= 10


def test_help_of_every_command_formats(capsys):
    for name, parser in _subcommands():  # argparse only formats the help texts (and their %-escapes) when asked
        assert parser.format_help().startswith(f"usage: cvt {name}".rstrip())
    with pytest.raises(SystemExit) as exited:
        app.main(["verify", "--help"])
    assert exited.value.code == 0 and "DIR " in capsys.readouterr().out
