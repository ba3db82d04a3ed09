"""`cvt export SRC DST`: a classifier checkpoint as deployable artifacts, each proven in its own runtime.

Formats (`--format`, comma-separated or `all`), each written into DST beside config.json and
preprocessor_config.json:
  onnx          model.onnx     torch.onnx (dynamo exporter), run in ONNX Runtime's CPU provider
  torch-export  model.pt2      torch.export, run through torch.export.load
  saved-model   saved_model/   TensorFlow SavedModel of our Keras model, run through tf.saved_model.load
  tflite        model.tflite   TFLite (built-in operators), run in TensorFlow's TFLite interpreter

Every artifact takes `pixel_values` (N, C, H, W) float32 and returns `logits` (N, num_labels) float32. The batch
is dynamic in all; height and width are dynamic in model.onnx, model.pt2 (from the smallest size torch.export
traces, printed) and saved_model/; model.tflite is fixed at `--image-size`. `--dtype bfloat16` computes in
bfloat16 inside (torch-export: bfloat16 weights; saved-model: Keras' mixed_bfloat16) with float32 in and out;
ONNX Runtime's CPU provider and TFLite have no bfloat16 kernels, so those formats refuse it.

The check: the source model (as stored, float32) and every artifact run on the same seeded inputs, batches of 1
and 3, at `--image-size` (default: the config's image_size, else 224) and, for the artifacts with dynamic height
and width, at a second size 32 rows and 16 columns larger. Each output passes when
max|artifact - source| <= atol * max(1, max|source|), atol 1e-4 for float32 (export reorders float32 arithmetic),
5e-2 for bfloat16. Everything is written into a temporary folder beside DST and moved into place only when every
artifact passes; otherwise the command fails (exit 1) and DST is not written. DST is checked, and later
replaced with --force, by the rules of `conversion.atomic` (a folder cvt wrote, proven by its manifest).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cvt_core.config import CvtConfig
from cvt_core.shapes import InputTooSmallError, default_input_size, stage_geometry

from . import crosscheck, models
from .atomic import atomic_directory, check_destination
from .errors import ConversionError, CrossCheckFailed, one_line
from .formats import config_for_output, open_source, write_preprocessor
from .pipeline import FRAMEWORK_NAMES, describe_state, parse_choices, resolve_source, size_text
from .state import CanonicalState

FORMATS = ("onnx", "torch-export", "saved-model", "tflite")
ARTIFACT_NAMES = {"onnx": "model.onnx", "torch-export": "model.pt2", "saved-model": "saved_model",
                  "tflite": "model.tflite"}
SPATIALLY_DYNAMIC = ("onnx", "torch-export", "saved-model")
DTYPES = ("float32", "bfloat16")
HOLDS_BFLOAT16 = ("torch-export", "saved-model")
DEFAULT_ATOL = {"float32": 1e-4, "bfloat16": crosscheck.default_atol("bfloat16")}
CHECK_BATCHES = (1, 3)
SECOND_SIZE_STEP = (32, 16)  # the second checked size: this many rows and columns more


@dataclass
class ExportReport:
    destination: Optional[str] = None
    written: List[str] = field(default_factory=list)
    checks: List[crosscheck.CheckResult] = field(default_factory=list)
    summary: str = ""


def parse_formats(value: str | Sequence[str]) -> List[str]:
    """`all`, one format, or a comma-separated list, in FORMATS order."""
    return parse_choices(value, FORMATS, "--format")


def check_request(targets: Sequence[str], dtype: str, opset: Optional[int]) -> None:
    """Refuse what the asked formats cannot hold, before any work."""
    if dtype not in DTYPES:
        raise ConversionError(dtype, f"unknown --dtype; choose one of {list(DTYPES)}")
    if dtype != "float32":
        refused = [t for t in targets if t not in HOLDS_BFLOAT16]
        if refused:
            raise ConversionError(None, f"--dtype {dtype} cannot be held by --format {','.join(refused)}: ONNX "
                                        f"Runtime's CPU provider and TFLite have no {dtype} kernels; export those "
                                        f"formats in float32 or pick --format {','.join(HOLDS_BFLOAT16)}")
    if opset is not None and "onnx" in targets:
        from .export_torch import MIN_OPSET, max_opset

        highest = max_opset()
        if not MIN_OPSET <= opset <= highest:
            raise ConversionError(None, f"--opset {opset} is out of range: torch.onnx's exporter writes this model "
                                        f"at opset {MIN_OPSET} to {highest} (the installed onnx's newest)")


def check_image_size(config: CvtConfig, height: int, width: int) -> None:
    try:
        stage_geometry(config, height, width)
    except InputTooSmallError as exc:
        raise ConversionError(None, f"--image-size {height} {width}: {exc}") from None


def check_sizes(config: CvtConfig, image_size: Optional[Sequence[int]], targets: Sequence[str]) -> List[Tuple[int, int]]:
    """The image sizes the check runs at: the asked one and, for artifacts with dynamic height and width, a larger
    non-square one."""
    height, width = (int(image_size[0]), int(image_size[1])) if image_size else default_input_size(config)
    check_image_size(config, height, width)
    sizes = [(height, width)]
    if any(t in SPATIALLY_DYNAMIC for t in targets):
        sizes.append((height + SECOND_SIZE_STEP[0], width + SECOND_SIZE_STEP[1]))
    return sizes


def seeded_inputs(config: CvtConfig, sizes: Sequence[Tuple[int, int]]) -> Dict[Tuple[int, int, int], np.ndarray]:
    """(batch, height, width) -> standard-normal pixels, all drawn from one generator (seed crosscheck.SEED)."""
    rng = np.random.default_rng(crosscheck.SEED)
    return {(batch, h, w): rng.standard_normal((batch, config.num_channels, h, w)).astype(np.float32)
            for h, w in sizes for batch in CHECK_BATCHES}


RUNTIMES = {"onnx": "ONNX Runtime", "torch-export": "torch.export.load", "saved-model": "tf.saved_model.load",
            "tflite": "the TFLite interpreter"}
EXPORTERS = {"onnx": "torch.onnx", "torch-export": "torch.export", "saved-model": "tf.saved_model",
             "tflite": "the TFLite converter"}


def _written_by(fmt: str, write: Callable[[], object]):
    """Run an exporter; its failure on this model is a model the format cannot hold (one line, exit 2)."""
    try:
        return write()
    except ConversionError:
        raise
    except Exception as exc:  # the exporters raise anything from RuntimeError to their own error types
        raise ConversionError(None, f"--format {fmt}: {EXPORTERS[fmt]} cannot export this model "
                                    f"({one_line(str(exc))[:300] or type(exc).__name__})") from None


def _run_artifact(fmt: str, open_artifact: Callable[[str], Callable[[np.ndarray], np.ndarray]], path: str,
                  inputs) -> Dict:
    """The artifact's logits on each input, loaded once; one that does not load or run fails the check."""
    try:
        run = open_artifact(path)
        return {case: run(pixels) for case, pixels in inputs.items()}
    except Exception as exc:  # onnxruntime, torch and TensorFlow each raise their own types
        raise CrossCheckFailed(f"FAILED: {ARTIFACT_NAMES[fmt]} does not run in {RUNTIMES[fmt]} "
                               f"({one_line(str(exc))[:300] or type(exc).__name__}); nothing was written") from None


def _range_text(name: str, bounds: Tuple[int, Optional[int]]) -> str:
    lower, upper = bounds
    if lower == upper:
        return f"{name} {lower}"
    return f"{name} {lower}+" if upper is None else f"{name} {lower}..{upper}"


def _check_torch_export_range(ranges, sizes: Sequence[Tuple[int, int]]) -> None:
    (h_low, h_high), (w_low, w_high) = ranges[2], ranges[3]
    for height, width in sizes:
        if not (h_low <= height and (h_high is None or height <= h_high)
                and w_low <= width and (w_high is None or width <= w_high)):
            raise ConversionError(None, f"--format torch-export cannot hold {height}x{width} images for this model: "
                                        f"torch.export traces it for {_range_text('height', ranges[2])}, "
                                        f"{_range_text('width', ranges[3])} (every token grid at least 2x2); pass a "
                                        f"larger --image-size or leave torch-export out")


# ------------------------------------------------------------------------------------------------ the two sides
def _torch_side(state: CanonicalState, targets, reference, tmp: str, dtype: str, opset: int,
                sizes, inputs, echo) -> Tuple[Dict[str, Dict], List[str]]:
    """Write and run the PyTorch artifacts: (outputs per artifact, notes to print)."""
    from . import export_torch

    model = reference if state.framework == "torch" else models.build_torch_model(state)
    module = export_torch.logits_module(model, dtype)
    height, width = sizes[0]
    example = export_torch.example_input(state.config, height, width)
    outputs: Dict[str, Dict] = {}
    notes: List[str] = []
    if "onnx" in targets:
        path = os.path.join(tmp, ARTIFACT_NAMES["onnx"])
        echo(f"exporting {ARTIFACT_NAMES['onnx']} (torch.onnx, opset {opset}) ...")
        op_counts = _written_by("onnx", lambda: export_torch.write_onnx(module, example, path, opset))
        leftover = export_torch.training_only_ops(op_counts)
        if leftover:
            raise CrossCheckFailed(f"FAILED: {ARTIFACT_NAMES['onnx']} holds training-only nodes ({', '.join(leftover)}); "
                                   f"nothing was written")
        notes.append(f"opset {opset}, {sum(op_counts.values())} nodes (no BatchNormalization or Dropout); "
                     f"pixel_values [batch, {state.config.num_channels}, height, width]")
        outputs["onnx"] = _run_artifact("onnx", export_torch.open_onnx, path, inputs)
    if "torch-export" in targets:
        path = os.path.join(tmp, ARTIFACT_NAMES["torch-export"])
        echo(f"exporting {ARTIFACT_NAMES['torch-export']} (torch.export) ...")
        ranges = _written_by("torch-export", lambda: export_torch.write_torch_export(module, example, path))
        _check_torch_export_range(ranges, sizes)
        notes.append(", ".join(_range_text(name, bounds) for name, bounds in
                               (("batch", ranges[0]), ("height", ranges[2]), ("width", ranges[3]))))
        outputs["torch-export"] = _run_artifact("torch-export", export_torch.open_torch_export, path, inputs)
    return outputs, notes


def _keras_side(state: CanonicalState, targets, reference, tmp: str, dtype: str, sizes, inputs,
                echo) -> Tuple[Dict[str, Dict], List[str]]:
    """Write and run the TensorFlow artifacts: (outputs per artifact, notes to print)."""
    from . import export_keras

    reuse = state.framework == "keras" and dtype == "float32" and reference is not None
    model = reference if reuse else export_keras.build_served_model(state, dtype)
    outputs: Dict[str, Dict] = {}
    notes: List[str] = []
    if "saved-model" in targets:
        path = os.path.join(tmp, ARTIFACT_NAMES["saved-model"])
        echo(f"exporting {ARTIFACT_NAMES['saved-model']}/ (tf.saved_model) ...")
        _written_by("saved-model", lambda: export_keras.write_saved_model(model, path))
        notes.append(f"signature {export_keras.SERVING_SIGNATURE}: pixel_values [batch, "
                     f"{state.config.num_channels}, height, width] float32 -> logits")
        outputs["saved-model"] = _run_artifact("saved-model", export_keras.open_saved_model, path, inputs)
    if "tflite" in targets:
        height, width = sizes[0]
        path = os.path.join(tmp, ARTIFACT_NAMES["tflite"])
        echo(f"exporting {ARTIFACT_NAMES['tflite']} (TFLite converter, {height}x{width}) ...")
        _written_by("tflite", lambda: export_keras.write_tflite(model, path, height, width))
        shape = export_keras.tflite_input_shape(path)
        batch = "batch dynamic" if shape[0] == -1 else f"batch {shape[0]}"
        notes.append(f"{batch}, height {shape[2]}, width {shape[3]}")
        fixed_size = {case: pixels for case, pixels in inputs.items() if case[1:] == (height, width)}
        outputs["tflite"] = _run_artifact("tflite", export_keras.open_tflite, path, fixed_size)
    return outputs, notes


def _reference_outputs(state: CanonicalState, inputs) -> Tuple[object, Dict]:
    """The source model as stored (float32) and its logits on every input."""
    model = state.keras_model if state.keras_model is not None else models.build_model(state, desc="loading source model")
    framework = "keras" if state.keras_model is not None else state.framework
    return model, {case: models.run_model(model, framework, pixels)["logits"] for case, pixels in inputs.items()}


def _tables(state: CanonicalState, reference: Dict, outputs: Dict[str, Dict], sizes, atol: float) -> List[crosscheck.CheckResult]:
    """One cross-check table per image size: a row per batch, a column per artifact that takes that size."""
    label = f"the source ({FRAMEWORK_NAMES[state.framework]} on {os.path.basename(state.source) or state.source})"
    results = []
    for height, width in sizes:
        cases = [(batch, height, width) for batch in CHECK_BATCHES]
        rows = {f"logits, batch {case[0]}": case for case in cases}
        columns = [(ARTIFACT_NAMES[fmt] + ("/" if fmt == "saved-model" else ""), fmt) for fmt in FORMATS
                   if fmt in outputs and cases[0] in outputs[fmt]]
        description = (f"seeded random images {state.config.num_channels}x{height}x{width} (seed {crosscheck.SEED}), "
                       f"batches of {' and '.join(map(str, CHECK_BATCHES))}")
        result = crosscheck.build_result(
            label, {row: reference[case] for row, case in rows.items()},
            [(column, {row: outputs[fmt][case] for row, case in rows.items()}) for column, fmt in columns],
            description, atol)
        for column, fmt in columns:  # top-1 over every image of the size
            ours = np.concatenate([outputs[fmt][case] for case in cases]).argmax(-1)
            source = np.concatenate([reference[case] for case in cases]).argmax(-1)
            if reference[cases[0]].shape[-1] > 1:
                result.top1[column] = (int(np.sum(ours == source)), int(source.size))
        results.append(result)
    return results


# ------------------------------------------------------------------------------------------------ the command
def export(src: str, dst: str, formats: str | Sequence[str] = "all", image_size: Optional[Sequence[int]] = None,
           opset: Optional[int] = None, dtype: str = "float32", from_format: str = "auto",
           config: Optional[str] = None, force: bool = False, atol: Optional[float] = None,
           echo: Callable[[str], None] = print) -> ExportReport:
    """Export SRC into DST (see the module docstring and `cvt export --help`)."""
    targets = parse_formats(formats)
    check_request(targets, dtype, opset)
    if opset is None:
        from .export_torch import DEFAULT_OPSET

        opset = DEFAULT_OPSET
    dst = os.fspath(dst)
    inputs_read = [config] if config and os.path.exists(config) else []
    check_destination(dst, force, [src, *inputs_read])  # fail before any heavy work
    local = resolve_source(src)
    state = open_source(local, from_format, config)
    report = ExportReport(destination=dst)
    try:
        if not state.with_head:
            raise ConversionError(src, "holds a bare CvtModel (no classification head), but every artifact of cvt "
                                       "export returns logits; export a CvtForImageClassification checkpoint")
        sizes = check_sizes(state.config, image_size, targets)
        tolerance = atol if atol is not None else DEFAULT_ATOL[dtype]
        echo(f"source: {src}" + (f" ({local})" if local != src else ""))
        echo(f"  {describe_state(state)}")
        inputs = seeded_inputs(state.config, sizes)
        reference_model, reference = _reference_outputs(state, inputs)
        with atomic_directory(dst, force, [local, *inputs_read]) as tmp:
            written = [config_for_output(state).save_pretrained(tmp), write_preprocessor(tmp, local, state.config, *(sizes[0] if image_size else (None, None)))]
            outputs: Dict[str, Dict] = {}
            notes: Dict[str, str] = {}
            torch_targets = [t for t in targets if t in ("onnx", "torch-export")]
            keras_targets = [t for t in targets if t in ("saved-model", "tflite")]
            if torch_targets:  # PyTorch before Keras: see pipeline.run_jobs on memory
                side_outputs, side_notes = _torch_side(state, torch_targets,
                                                       reference_model if state.framework == "torch" else None,
                                                       tmp, dtype, opset, sizes, inputs, echo)
                outputs.update(side_outputs)
                notes.update(zip(torch_targets, side_notes))
            if keras_targets:
                side_outputs, side_notes = _keras_side(state, keras_targets,
                                                       reference_model if state.framework == "keras" else None,
                                                       tmp, dtype, sizes, inputs, echo)
                outputs.update(side_outputs)
                notes.update(zip(keras_targets, side_notes))
            report.checks = _tables(state, reference, outputs, sizes, tolerance)
            for result in report.checks:
                echo(crosscheck.format_table(result))
            failures = [f for result in report.checks for f in result.failures]
            if failures:
                report.summary = (f"FAILED: {len(failures)} output(s) beyond tolerance ({failures[0]}); "
                                  f"{dst} was not written")
                raise CrossCheckFailed(report.summary)
            written += [os.path.join(tmp, ARTIFACT_NAMES[t]) for t in targets]
            described = [""] * (len(written) - len(targets)) + [f"  {notes[t]}" for t in targets]
            listing = [f"  {os.path.basename(path) + ('/' if os.path.isdir(path) else ''):<26} "
                       f"{size_text(path):>10}{note}" for path, note in zip(written, described)]
        report.written = [os.path.join(dst, os.path.basename(p)) for p in written]
        echo(f"wrote {dst} ({', '.join(targets)}):")
        for line in listing:
            echo(line)
        worst = max(result.worst_ratio for result in report.checks)
        report.summary = (f"OK: {len(targets)} artifact(s) ({', '.join(ARTIFACT_NAMES[t] for t in targets)}) match "
                          f"the source in their own runtimes ({worst:.1%} of the limit at most; atol {tolerance:g}); "
                          f"wrote {dst}")
        echo(report.summary)
        return report
    except CrossCheckFailed as exc:
        report.summary = report.summary or str(exc)
        echo(report.summary)
        raise
    finally:
        state.close()
