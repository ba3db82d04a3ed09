"""The cross-check: run the source and every written format on the same input and compare.

Input: a fixed batch of 2 standard-normal images (seed 0) at the config's `image_size` (224 when unset), or one
image file through the released checkpoints' preprocessing (`--image`).

Compared outputs: `logits` (classifier), `cls_token_value` (bare model with a cls token) and `hidden_states.i`
(every stage output, NCHW). For each output the check passes when

    max |target - reference| <= atol * max(1, max |reference|)

where `max |reference|` is taken over that output of the source (the reference) on the whole batch, so the limit
is absolute for outputs of magnitude up to 1 and relative to the largest value above that. The default `atol` is
1e-5 for float32 weights; a cast to float16 or bfloat16 changes the weights themselves, so its default is looser
(see DEFAULT_ATOL: 1e-2 for float16, 5e-2 for bfloat16); `--atol` overrides it. Top-1 agreement of the logits is
printed but does not decide the result (two logits within tolerance of a tie may swap).

What the reference itself computes is judged before any comparison, because a relative limit would let garbage
pass (weights made of /etc/passwd bytes give logits near 1e29, and a difference of 1e28 is then within limits):

- NaN or Inf in any reference output (logits, cls_token_value, hidden_states.i) is a refusal, `ConversionError`,
  exit status 2: "the source model's logits contain NaN: the weights are not a trained model's".
- max |reference| of any output above REFUSE_MAGNITUDE (1e6) is a refusal too (exit 2): "... logits reach
  1.7e+29 (above 1e+06): the weights are not what a trained model holds".
- above REMARK_MAGNITUDE (1e4), up to REFUSE_MAGNITUDE, the check runs and a remark is printed under the table
  and in the summary line: "remark: logits reach 2.5e+04: the weights are not what a trained model holds"
  (trained CvT logits stay in the tens).

NaN or Inf in a written format's output while the reference is finite fails the check (exit 1), named as such
("model.keras: logits contain 6 NaN where the reference's are finite"), not as a difference of nan.

Models are built one at a time and released before the next, so the check needs memory for one model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from cvt_core.config import CvtConfig
from cvt_core.shapes import default_input_size

from .errors import ConversionError

DEFAULT_ATOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
REMARK_MAGNITUDE = 1e4  # max |reference output| above this: a remark (trained CvT logits stay in the tens)
REFUSE_MAGNITUDE = 1e6  # ... above this: a refusal (exit 2), no trained model computes such values
SEED = 0
BATCH = 2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_atol(dtype: Optional[str]) -> float:
    return DEFAULT_ATOL.get(dtype or "float32", DEFAULT_ATOL["float32"])


def seeded_batch(config: CvtConfig, seed: int = SEED, batch: int = BATCH) -> Tuple[np.ndarray, str]:
    height, width = default_input_size(config)
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, config.num_channels, height, width)).astype(np.float32)
    return pixels, f"{batch} seeded random images {config.num_channels}x{height}x{width} (seed {seed})"


def load_image(path: str, config: CvtConfig) -> Tuple[np.ndarray, str]:
    """One image through the released checkpoints' preprocessing: at 224, bicubic resize of the short side to
    int(224 / 0.875) and a center crop; at 384 and above, a straight bicubic resize; then 1/255 and ImageNet
    mean/std, channels first. The file is read by `cvt_core.image_processing.read_image_file` (a regular file
    whose declared size is within `Limits` before it is decoded; EXIF orientation applied)."""
    try:
        from PIL import Image

        from cvt_core.image_processing import check_image_size, read_image_file
    except ImportError:
        raise ConversionError(path, "--image needs Pillow (pip install pillow)") from None
    height, width = default_input_size(config)
    try:
        image = read_image_file(path)
        if height == width and height < 384:
            short = int(height / 0.875)
            w, h = image.size
            scale = short / min(w, h)
            size = (max(short, round(w * scale)), max(short, round(h * scale)))
            check_image_size(*size, f"{path} resized to {size[0]}x{size[1]}")  # a thin strip would be huge
            image = image.resize(size, Image.BICUBIC)
            w, h = image.size
            left, top = (w - width) // 2, (h - height) // 2
            image = image.crop((left, top, left + width, top + height))
        else:
            check_image_size(width, height, f"{path} resized to {width}x{height}")
            image = image.resize((width, height), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ConversionError(path, "no such image file") from None
    except ValueError as exc:  # ImageLoadError and ImageTooLargeError: one line that starts with the path
        raise ConversionError(None, " ".join(str(exc).split())) from None
    except OSError as exc:
        raise ConversionError(path, f"cannot read the image ({exc})") from None
    if config.num_channels != 3:
        raise ConversionError(path, f"--image gives RGB input but the model takes {config.num_channels} channels")
    array = (array - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return array.transpose(2, 0, 1)[None].copy(), f"image {path} -> 3x{height}x{width} (ImageNet preprocessing)"


@dataclass
class CheckResult:
    input_description: str
    reference_label: str
    atol: float
    rows: List[str] = field(default_factory=list)
    limits: Dict[str, float] = field(default_factory=dict)
    columns: List[str] = field(default_factory=list)
    diffs: Dict[str, Dict[str, float]] = field(default_factory=dict)  # column -> row -> max |diff| (nan: missing)
    top1: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # column -> (agreeing, total)
    failures: List[str] = field(default_factory=list)
    remarks: List[str] = field(default_factory=list)  # what the reference's magnitudes say about the weights

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def worst(self) -> float:
        values = [v for col in self.diffs.values() for v in col.values()]
        return max(values) if values else 0.0

    @property
    def worst_ratio(self) -> float:
        """The largest max|diff| / limit over every output and format (pass: <= 1)."""
        values = [v / self.limits[row] for col in self.diffs.values() for row, v in col.items()]
        return max(values) if values else 0.0


def compare(reference: Dict[str, np.ndarray], result: CheckResult, label: str, outputs: Dict[str, np.ndarray]) -> None:
    """Add one target's column to `result`."""
    if not result.rows:
        result.rows = list(reference)
        for name in result.rows:
            ref = reference[name].astype(np.float64)
            scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
            result.limits[name] = result.atol * scale
    result.columns.append(label)
    column = result.diffs[label] = {}
    for name in result.rows:
        ref = reference[name]
        got = outputs.get(name)
        if got is None or got.shape != ref.shape:
            column[name] = math.nan
            result.failures.append(f"{label}: {name} " + ("missing" if got is None else f"has shape {got.shape}, "
                                                                                        f"reference {ref.shape}"))
            continue
        bad = int(np.count_nonzero(~np.isfinite(got))) if got.size and np.issubdtype(got.dtype, np.inexact) else 0
        if bad:
            column[name] = math.inf
            result.failures.append(f"{label}: {name} contain {_non_finite_text(got, bad)} where the reference's are "
                                   f"finite")
            continue
        diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
        column[name] = diff
        if not diff <= result.limits[name]:  # also catches NaN
            result.failures.append(f"{label}: {name} differs by {diff:.3g} > {result.limits[name]:.3g}")
    if "logits" in reference and reference["logits"].ndim == 2 and reference["logits"].shape[-1] > 1 \
            and "logits" in outputs and outputs["logits"].shape == reference["logits"].shape:
        agree = int(np.sum(np.argmax(outputs["logits"], -1) == np.argmax(reference["logits"], -1)))
        result.top1[label] = (agree, reference["logits"].shape[0])


def _non_finite_text(values: np.ndarray, count: int) -> str:
    """`6 NaN`, `2 Inf`, `3 NaN or Inf` (of `count` non-finite values)."""
    nans = int(np.count_nonzero(np.isnan(values)))
    return f"{count} " + ("NaN" if nans == count else "Inf" if nans == 0 else "NaN or Inf")


def judge_reference(reference: Dict[str, np.ndarray], source: Optional[str] = None,
                    subject: str = "the reference model's") -> List[str]:
    """The remarks on the reference outputs' magnitudes (see the module docstring); NaN or Inf in any output, or
    a magnitude above REFUSE_MAGNITUDE, is a one-line `ConversionError` about `source` (exit status 2)."""
    remarks = []
    for name, values in reference.items():
        values = np.asarray(values)
        if not values.size or not np.issubdtype(values.dtype, np.inexact):
            continue
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            kinds = _non_finite_text(values, bad).split(" ", 1)[1]
            raise ConversionError(source, f"{subject} {name} contain {kinds} ({bad} of {values.size} values): the "
                                          f"weights are not a trained model's")
        peak = float(np.max(np.abs(values.astype(np.float64))))
        if peak > REFUSE_MAGNITUDE:
            raise ConversionError(source, f"{subject} {name} reach {peak:.2g} (above {REFUSE_MAGNITUDE:g}): the "
                                          f"weights are not what a trained model holds")
        if peak > REMARK_MAGNITUDE:
            remarks.append(f"{name} reach {peak:.2g}: the weights are not what a trained model holds")
    return remarks


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "missing"
    if math.isinf(value):
        return "NaN/Inf"
    return "0" if value == 0 else f"{value:.2e}"


def format_table(result: CheckResult) -> str:
    lines = [f"cross-check on {result.input_description}",
             f"reference: {result.reference_label}; pass when max|diff| <= atol * max(1, max|reference|), "
             f"atol {result.atol:g}"]
    width0 = max([len("output"), len("top-1 agreement")] + [len(r) for r in result.rows])
    widths = [max(10, len(c)) for c in result.columns]
    header = "  " + "output".ljust(width0) + "  " + "limit".rjust(9) + "".join(
        "  " + c.rjust(w) for c, w in zip(result.columns, widths, strict=True))
    lines.append(header)
    for row in result.rows:
        cells = []
        for column, w in zip(result.columns, widths, strict=True):
            value = result.diffs[column].get(row, math.nan)
            mark = "" if value <= result.limits[row] else " !"
            cells.append("  " + (_fmt(value) + mark).rjust(w))
        lines.append("  " + row.ljust(width0) + "  " + f"{result.limits[row]:.1e}".rjust(9) + "".join(cells))
    if result.top1:
        cells = []
        for column, w in zip(result.columns, widths, strict=True):
            agree, total = result.top1.get(column, (0, 0))
            cells.append("  " + (f"{agree}/{total}" if total else "-").rjust(w))
        lines.append("  " + "top-1 agreement".ljust(width0) + "  " + "".rjust(9) + "".join(cells))
    lines.extend(f"remark: {remark}" for remark in result.remarks)
    return "\n".join(lines)


def build_result(reference_label: str, reference: Dict[str, np.ndarray], targets: List[Tuple[str, Dict[str, np.ndarray]]],
                 input_description: str, atol: float, source: Optional[str] = None,
                 subject: str = "the reference model's") -> CheckResult:
    """Judge the reference (`judge_reference`: a refusal about `source`, or remarks), then compare each target's
    outputs with it."""
    remarks = judge_reference(reference, source, subject)
    result = CheckResult(input_description, reference_label, atol, remarks=remarks)
    for label, outputs in targets:
        compare(reference, result, label, outputs)
    if not targets:  # keep the rows (and limits) for the report
        compare(reference, result, "_", reference)
        result.columns, result.diffs, result.top1 = [], {}, {}
    return result
