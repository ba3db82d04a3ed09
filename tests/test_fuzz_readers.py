"""Generated hostile inputs against every reader of untrusted files (tests/fuzz_inputs.py makes and runs them).

Every reader is fuzzed in the default run: 200 cases for the cheap readers, fewer where a case costs more (the
two torch layouts, tf_model.h5, and the two Keras readers, whose accepted cases each build a Keras model), and
thousands of cases each under `-m slow`, in a child process under a memory cap and a per-case alarm. Through
`cvt convert`, the default run fuzzes one kind of checkpoint, a PyTorch zip (a dozen cases: each child first pays
the frameworks' start-up and its seed's conversion, and every accepted case converts and cross-checks; crafted
HDF5 files go through `cvt convert` in tests/test_h5_reader.py); every kind at that size, and every kind with
hundreds of cases, run under `-m slow`.

The invariants are docs/security.md's: every case returns the right kind of arrays or is refused with one line
of the promised type; no other exception, no crash, no hang, no allocation past the cap, and no byte of the
sentinel secret file in any output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from typing import Dict, List

import pytest

from fuzz_inputs import CLI_KINDS, KINDS, deflated_zeros

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CASES = 200
# by default, fewer where a case costs more: a Keras weights case that passes the checks builds and loads a Keras
# model (about a second); tf_model.h5 cases copy and edit an HDF5 file; torch cases patch zips and walk long pickles
DEFAULT_CASES_BY_KIND = {"torch-zip": 100, "torch-legacy": 50, "tf-h5": 50, "keras-weights": 10, "keras-file": 40}
# `cvt convert` per case: a refused case takes a second, an accepted HDF5 one builds and cross-checks two models;
# each child also converts its seed first. By default one kind goes through the command
CLI_CASES = {"cli:safetensors": 12, "cli:torch-zip": 12, "cli:config": 12, "cli:tf-h5": 6, "cli:keras-weights": 6}
CLI_DEFAULT_KINDS = ("cli:torch-zip",)
SLOW_CLI_CASES = 200
SLOW_CASES = 3000
SLOW_CASES_BY_KIND = {"keras-weights": 600, "keras-file": 1500}
CHILD_TIMEOUT = 900


def run_cases(kind: str, run_seed: int, count: int, workdir: str) -> Dict[str, List[dict]]:
    """Every case's record, by outcome; a child that dies is restarted after the case it died on, which is then
    recorded as a crash."""
    outcomes: Dict[str, List[dict]] = {}
    start, end = 0, count
    # the child's files live under `workdir` (pytest's tmp_path), so a child that dies leaves nothing elsewhere
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3", PYTHONFAULTHANDLER="1",
               CVT_FUZZ_TMP=workdir)
    while start < end:
        child = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_inputs.py"), kind, str(run_seed),
                                str(start), str(end - start)], capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                               env=env)
        last_started, finished = None, set()
        for line in child.stdout.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "start" in record:
                last_started = record["start"]
            elif "case" in record:
                finished.add(record["case"])
                outcomes.setdefault(record["outcome"], []).append(record)
        if child.returncode == 0:
            break
        if last_started is None or last_started in finished:
            pytest.fail(f"the {kind} worker failed outside any case (exit {child.returncode}): "
                        f"{child.stderr[-2000:]}")
        outcomes.setdefault("violation", []).append(
            {"case": last_started, "detail": f"the process died (exit {child.returncode}): {child.stderr[-800:]}"})
        start = last_started + 1
    return outcomes


def check(kind: str, run_seed: int, count: int, workdir, least_refused: float = 0.25) -> None:
    outcomes = run_cases(kind, run_seed, count, str(workdir))
    violations = outcomes.get("violation", [])
    assert not violations, f"{len(violations)} of {count} {kind} cases broke an invariant, e.g. " + \
        json.dumps(violations[:5], indent=1)
    refused, accepted = len(outcomes.get("refused", [])), len(outcomes.get("ok", []))
    assert refused + accepted + len(outcomes.get("skipped", [])) == count
    # the generator must reach the refusals: a harness whose every case reads fine tests nothing
    assert refused >= int(count * least_refused), (kind, refused, accepted)
    assert len(outcomes.get("skipped", [])) <= count // 20, outcomes.get("skipped", [])[:3]


def test_the_generated_deflate_bomb_inflates_to_the_size_it_is_made_for():
    """The bombs' stream repeats one flushed segment per MiB; 3 MiB stands for the 1 GiB the cases use."""
    assert zlib.decompress(deflated_zeros(3), -15) == bytes(3 << 20)
    assert len(deflated_zeros()) < 2 << 20 and deflated_zeros().startswith(deflated_zeros(3)[:-2])


@pytest.mark.parametrize("kind", KINDS)
def test_generated_hostile_inputs_are_read_or_refused_in_one_line_within_the_memory_cap(kind, tmp_path):
    check(kind, run_seed=0, count=DEFAULT_CASES_BY_KIND.get(kind, DEFAULT_CASES), workdir=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_thousands_of_generated_hostile_inputs_keep_every_invariant(kind, tmp_path):
    check(kind, run_seed=1, count=SLOW_CASES_BY_KIND.get(kind, SLOW_CASES), workdir=tmp_path)


@pytest.mark.parametrize("kind", [kind if kind in CLI_DEFAULT_KINDS else pytest.param(kind, marks=pytest.mark.slow)
                                  for kind in CLI_KINDS])
def test_generated_hostile_checkpoints_make_cvt_convert_exit_0_or_2_with_one_line_and_leave_nothing(kind, tmp_path):
    check(kind, run_seed=0, count=CLI_CASES[kind], workdir=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", CLI_KINDS)
def test_hundreds_of_generated_hostile_checkpoints_keep_the_command_lines_promises(kind, tmp_path):
    check(kind, run_seed=1, count=SLOW_CLI_CASES, workdir=tmp_path)
