"""`convert`, `verify` and `demo`: the work behind the command line, usable from Python.

Each prints a human report through `echo` and returns a `Report`; user errors raise `ConversionError`, a failed
cross-check raises `CrossCheckFailed` (after the report is printed and the partial output removed).

Weights that are not a trained model's are user errors (`ConversionError`, exit status 2), not failed checks: a
tensor of a dtype no weight may have, NaN or Inf in a weight (`conversion.state`), and NaN, Inf or an absurd
magnitude in what the source model computes (`crosscheck.judge_reference`). Smaller but still implausible
magnitudes give a remark, printed under the table and in the summary line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from cvt_core.checkpoint import CONFIG_NAME

from . import crosscheck, models
from .atomic import atomic_directory, check_destination, temporary_directory
from .errors import ConversionError, CrossCheckFailed
from .formats import (TARGETS, formats_in_directory, load_config_arg, open_source, read_config_file, read_target,
                      target_framework, write_targets)
from .state import CanonicalState

FORMAT_NAMES = {"hf": "transformers PyTorch", "hf-tf": "transformers TF", "keras": "Keras 3",
                "original": "original microsoft/CvT"}
FRAMEWORK_NAMES = {"torch": "our PyTorch CvT", "keras": "our Keras CvT"}


@dataclass
class Report:
    destination: Optional[str] = None
    written: List[str] = field(default_factory=list)
    check: Optional[crosscheck.CheckResult] = None
    summary: str = ""


def parse_choices(value: str | Sequence[str], choices: Sequence[str], option: str) -> List[str]:
    """`all`, one of `choices`, or a comma-separated list of them (for the command-line option `option`), in the
    order of `choices`."""
    items = value.split(",") if isinstance(value, str) else list(value)
    chosen = set()
    for item in (i.strip() for i in items):
        if item == "all":
            chosen.update(choices)
        elif item in choices:
            chosen.add(item)
        else:
            raise ConversionError(item or repr(item), f"unknown {option}; choose from {[*choices, 'all']} "
                                                      f"(comma-separated)")
    return [c for c in choices if c in chosen]


def parse_targets(value: str | Sequence[str]) -> List[str]:
    """`all`, one target, or a comma-separated list, in TARGETS order."""
    return parse_choices(value, TARGETS, "--to target")


def size_text(path: str) -> str:
    """The bytes of a file, or of every file under a folder, as "352 B", "82.4 MB"."""
    if os.path.isdir(path):
        n = float(sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names))
    else:
        n = float(os.path.getsize(path))
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def describe_state(state: CanonicalState) -> str:
    arch = "CvtForImageClassification" if state.with_head else "CvtModel"
    return (f"{FORMAT_NAMES[state.fmt]}, {arch}, {state.num_parameters:,} parameters, {state.float_dtype}, "
            f"hidden_act {state.config.hidden_act}")


def resolve_source(src: str) -> str:
    """`src` itself, or for a hub id (`org/name`, `hf://org/name`) a local snapshot through huggingface_hub's cache;
    a preset name, which has no weights, is refused."""
    from cvt_core.checkpoint import CheckpointError
    from cvt_core.hub import resolve_pretrained

    try:
        return resolve_pretrained(src)
    except CheckpointError as exc:
        raise ConversionError(None, str(exc)) from None


def _pixels(config, image: Optional[str]):
    return crosscheck.load_image(image, config) if image else crosscheck.seeded_batch(config)


def _target_job(label: str, path: str, config, with_head: Optional[bool], pixels: np.ndarray):
    """(column label, framework, run): run loads the written file, computes the outputs and frees the model."""
    def run():
        framework, model = read_target(label, path, config, with_head)
        try:
            return models.run_model(model, framework, pixels)
        finally:
            del model
            models.release(os.path.getsize(path))
    return os.path.basename(path), target_framework(label), run


def _reference_job(state: CanonicalState, pixels: np.ndarray):
    def run():
        if state.keras_model is not None:
            return models.run_model(state.keras_model, "keras", pixels)
        cast, state.cast = state.cast, None  # the reference is the source as stored, before any --dtype cast
        try:
            model = models.build_model(state, desc="loading source model")
        finally:
            state.cast = cast
        try:
            return models.run_model(model, state.framework, pixels)
        finally:
            del model
            models.release(state.nbytes)
    framework = "keras" if state.keras_model is not None else state.framework
    return REFERENCE, framework, run


REFERENCE = "<reference>"


def run_jobs(jobs, framework: str, outputs: Dict[str, Dict[str, np.ndarray]]) -> None:
    """Run the jobs of one framework. All PyTorch models run before the first Keras one: TensorFlow's oneDNN
    allocator keeps the memory of a released model for its own reuse, PyTorch's goes back to the system, so this
    order keeps the peak at one model."""
    for label, job_framework, run in jobs:
        if job_framework == framework and label not in outputs:
            outputs[label] = run()


def _written_jobs(directory: str, with_head: Optional[bool], pixels: np.ndarray):
    config = read_config_file(os.path.join(directory, CONFIG_NAME))
    return [_target_job(label, path, config, with_head, pixels) for label, path in formats_in_directory(directory)]


def _remarks(result: Optional[crosscheck.CheckResult]) -> str:
    return "".join(f"; remark: {remark}" for remark in (result.remarks if result is not None else ()))


def _summary_ok(result: crosscheck.CheckResult, what: str) -> str:
    formats = f"all {len(result.columns)} formats ({', '.join(result.columns)})" if len(result.columns) > 1 \
        else result.columns[0]
    return (f"OK: {formats} {what} within tolerance (largest difference {result.worst:.2e}, "
            f"{result.worst_ratio:.1%} of its limit; atol {result.atol:g})" + _remarks(result))


def convert(src: str, dst: str, from_format: str = "auto", to: str | Sequence[str] = "all", config: Optional[str] = None,
            dtype: Optional[str] = None, hidden_act: Optional[str] = None, force: bool = False,
            atol: Optional[float] = None, image: Optional[str] = None, check: bool = True,
            echo: Callable[[str], None] = print, print_summary: bool = True) -> Report:
    """Convert SRC into DST (see the module and `cvt convert --help`)."""
    targets = parse_targets(to)
    if dtype == "keep":
        dtype = None
    dst = os.fspath(dst)
    inputs = [path for path in (config, image) if path and os.path.exists(path)]
    check_destination(dst, force, [src, *inputs])  # fail before any heavy work
    local = resolve_source(src)
    state = open_source(local, from_format, config, hidden_act=hidden_act, dtype=dtype)
    report = Report(destination=dst)
    try:
        if state.keras_model is not None:
            # a loaded .keras model may be written and run as it is, never read tensor by tensor: check it whole
            state.check_values()
        echo(f"source: {src}" + (f" ({local})" if local != src else ""))
        echo(f"  {describe_state(state)}")
        if state.cast:
            echo(f"  casting floating-point weights to {state.cast}")
        tol = atol if atol is not None else crosscheck.default_atol(state.cast)
        with atomic_directory(dst, force, [local, *inputs]) as tmp:
            # numpy-only formats first; then the PyTorch side of the check; then the Keras files and the Keras side
            written = write_targets(state, tmp, [t for t in targets if t != "keras"])
            pixels, description = _pixels(state.config, image)
            outputs: Dict[str, Dict[str, np.ndarray]] = {}
            reference = _reference_job(state, pixels)
            if check:
                run_jobs([reference] + _written_jobs(tmp, state.with_head, pixels), "torch", outputs)
            if "keras" in targets:
                written += write_targets(state, tmp, ["keras"], config_json=False)
            # what was written is printed only once DST is in place: a failed check or commit writes nothing
            listing = [f"  {os.path.basename(path):<20} {size_text(path):>10}" for path in written]
            report.written = [os.path.join(dst, os.path.basename(p)) for p in written]
            if check:
                jobs = _written_jobs(tmp, state.with_head, pixels)
                run_jobs([reference] + jobs, "keras", outputs)
                label = f"the source ({FRAMEWORK_NAMES[state.framework]} on {os.path.basename(state.source) or state.source})"
                result = crosscheck.build_result(label, outputs.pop(REFERENCE), [(c, outputs[c]) for c, _, _ in jobs],
                                                 description, tol, source=state.source, subject="the source model's")
                report.check = result
                echo(crosscheck.format_table(result))
                if not result.ok:
                    for note in state.notes:
                        echo(f"note: {note}")
                    report.summary = (f"FAILED: {len(result.failures)} output(s) beyond tolerance ({result.failures[0]}); "
                                      f"{dst} was not written")
                    raise CrossCheckFailed(report.summary)
        echo(f"wrote {dst} ({', '.join(targets)}):")
        for line in listing:
            echo(line)
        for note in state.notes:
            echo(f"  note: {note}")
        if check:
            report.summary = _summary_ok(report.check, "match the source" if len(report.check.columns) > 1 else "matches the source") + f"; wrote {dst}"
        else:
            report.summary = f"wrote {dst} (cross-check skipped with --no-check)"
        if print_summary:
            echo(report.summary)
        return report
    except CrossCheckFailed:
        if print_summary:
            echo(report.summary)
        raise
    finally:
        state.close()


def verify(directory: str, atol: Optional[float] = None, image: Optional[str] = None,
           echo: Callable[[str], None] = print) -> Report:
    """Cross-check every format found in `directory` against the first (PyTorch weights when present)."""
    if not os.path.exists(directory):
        raise ConversionError(directory, "no such directory")
    if not os.path.isdir(directory):
        raise ConversionError(directory, "not a directory; verify takes a checkpoint folder")
    config = read_config_file(os.path.join(directory, CONFIG_NAME))
    found = formats_in_directory(directory)
    if not found:
        raise ConversionError(directory, "holds no checkpoint (model.safetensors, pytorch_model.bin, tf_model.h5, "
                                         "model.weights.h5, model.keras)")
    tol = atol if atol is not None else crosscheck.default_atol("float32")
    pixels, description = _pixels(config, image)
    ref_path, rest = found[0][1], found[1:]
    echo(f"verify: {directory}: {', '.join(os.path.basename(p) for _, p in found)}")
    jobs = [_target_job(label, path, config, None, pixels) for label, path in found]
    outputs: Dict[str, Dict[str, np.ndarray]] = {}
    for framework in ("torch", "keras"):
        run_jobs(jobs, framework, outputs)
    result = crosscheck.build_result(jobs[0][0], outputs[jobs[0][0]], [(c, outputs[c]) for c, _, _ in jobs[1:]],
                                     description, tol, source=ref_path, subject="the model's")
    report = Report(destination=directory, check=result)
    if not rest:
        report.summary = (f"OK: {os.path.basename(ref_path)} loads and runs; it is the only format, nothing to compare"
                          + _remarks(result))
        echo(report.summary)
        return report
    echo(crosscheck.format_table(result))
    if not result.ok:
        report.summary = f"FAILED: {len(result.failures)} output(s) beyond tolerance ({result.failures[0]})"
        echo(report.summary)
        raise CrossCheckFailed(report.summary)
    report.summary = _summary_ok(result, ("agree" if len(rest) > 1 else "agrees") + f" with {os.path.basename(ref_path)}")
    echo(report.summary)
    return report


def make_random_checkpoint(directory: str, config, seed: int = 0, with_head: bool = True) -> None:
    """A seeded random transformers-layout checkpoint saved by our PyTorch model (BatchNorm statistics, norms and
    biases randomised too, so that the cross-check can see every tensor)."""
    import torch

    from cvt_torch import CvtForImageClassification, CvtModel

    from .random_weights import random_state

    torch.manual_seed(seed)
    model = (CvtForImageClassification if with_head else CvtModel)(config)
    state = random_state(config, with_head, seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    model.save_pretrained(directory)


def demo(preset: str = "cvt-13", out: Optional[str] = None, force: bool = False, to: str = "all",
         atol: Optional[float] = None, echo: Callable[[str], None] = print) -> Report:
    """Random checkpoint of `preset` (name or config.json) -> every format -> cross-check."""
    config, _ = load_config_arg(preset)
    if out is not None:
        check_destination(out, force, [preset] if os.path.exists(preset) else [])
    what = f"CvT with the config {preset}" if os.path.exists(preset) else preset
    echo(f"cvt demo: a randomly initialised {what} (seed 0, BatchNorm statistics randomised), saved in transformers' "
         f"PyTorch layout by our PyTorch model, is converted to every format; each is loaded back and run on the "
         f"same input as the source.")
    with temporary_directory(prefix="cvt-demo-") as work:
        source = os.path.join(work, "source")
        make_random_checkpoint(source, config)
        dst = out if out is not None else os.path.join(work, "converted")
        try:
            report = convert(source, dst, to=to, force=force, atol=atol, echo=echo, print_summary=False)
        except CrossCheckFailed as exc:
            echo(f"demo FAILED: {exc}")
            raise
        result = report.check
        where = f"written to {out}" if out is not None else "temporary, removed (pass --out DIR to keep them)"
        report.summary = (f"demo OK: all {len(result.columns)} formats ({', '.join(result.columns)}) agree with the "
                          f"source within tolerance (largest difference {result.worst:.2e}, {result.worst_ratio:.1%} of its limit; "
                          f"atol {result.atol:g}); "
                          f"files {where}" + _remarks(result))
        echo(report.summary)
        return report
