"""The PyTorch artifacts of `cvt export`: `model.onnx` (torch.onnx's dynamo exporter) and `model.pt2`
(`torch.export`), written from our `CvtForImageClassification` and run back in ONNX Runtime and `torch.export.load`.

Both hold `LogitsModule`: `pixel_values` (N, C, H, W) float32 in, `logits` (N, num_labels) float32 out, with the
batch, height and width dynamic. The classifier inside is `cvt_torch.optimize.optimize_for_inference`'s copy of the
model: each BatchNorm folded into its depthwise convolution, dropout off, the last block computed for the cls token
only (the logits are the model's to float32 rounding), and under export its kernels take the public ops only, so
the graphs hold no BatchNorm, no dropout and no private kernel. Both are traced without autograd.

Tracing sees only sizes other than 1 (torch.export assumes a dynamic size is not 1 and guards on the sizes it
derives), so the example input is the checked size grown until every token grid is at least 2 x 2: traced on a
1-wide grid, the exported program would be pinned to that width.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from cvt_core.config import CvtConfig
from cvt_core.shapes import stage_geometry

from .errors import ConversionError

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
DIMENSION_NAMES = ("batch", None, "height", "width")  # the ONNX names of pixel_values' dynamic axes
TRACE_BATCH = 2
# Nodes that have no place in an inference graph: a BatchNorm left unfolded, dropout, training-mode statistics.
TRAINING_ONLY_ONNX_OPS = ("BatchNormalization", "Dropout", "RandomNormal", "RandomNormalLike", "RandomUniform",
                          "RandomUniformLike", "Bernoulli")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_OPSET = 20
MIN_OPSET = 18  # the dynamo exporter's own opset; converting this model below it fails


class LogitsModule(torch.nn.Module):
    """What every PyTorch artifact serves: float32 `pixel_values` in, `{"logits": float32}` out; the classifier
    computes in `dtype` inside (its weights are in that dtype)."""

    def __init__(self, classifier: torch.nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.classifier = classifier
        self.compute_dtype = dtype

    def forward(self, pixel_values: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.classifier(pixel_values.to(self.compute_dtype), return_dict=True).logits
        return {OUTPUT_NAME: logits.float()}


def logits_module(classifier: torch.nn.Module, dtype: str) -> LogitsModule:
    """The served module in eval mode around the classifier's optimised copy (`optimize_for_inference`) in `dtype`;
    the source is left as it is, the reference."""
    from cvt_torch.optimize import optimize_for_inference

    torch_dtype = TORCH_DTYPES[dtype]
    return LogitsModule(optimize_for_inference(classifier).to(torch_dtype), torch_dtype).eval()


def tracing_size(config: CvtConfig, height: int, width: int) -> Tuple[int, int]:
    """(height, width) at least the given ones at which every stage, query and key grid is at least 2 x 2."""
    roomy = 4 * max(height, width)  # the other axis, large enough not to matter: the axes are independent

    def smallest(size: int, axis: int) -> int:
        while True:
            grids = stage_geometry(config, *((size, roomy) if axis == 0 else (roomy, size)))
            sides = [(g.height, g.query_height, g.key_height) if axis == 0 else (g.width, g.query_width, g.key_width)
                     for g in grids]
            if min(min(s) for s in sides) >= 2:
                return size
            size += 1

    return smallest(height, 0), smallest(width, 1)


def example_input(config: CvtConfig, height: int, width: int) -> torch.Tensor:
    traced_height, traced_width = tracing_size(config, height, width)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(TRACE_BATCH, config.num_channels, traced_height, traced_width, generator=generator)


def _dynamic_shapes():
    dynamic = torch.export.Dim.DYNAMIC
    return {INPUT_NAME: {0: dynamic, 2: dynamic, 3: dynamic}}


@contextlib.contextmanager
def _exporter_notices_silenced() -> Iterator[None]:
    """torch.onnx logs a warning per torchvision operator it cannot register, onnxscript logs the traceback of an
    opset conversion that failed (write_onnx reports it in one line) and the exporters raise deprecation warnings
    about their own internals."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)  # onnxscript logs a failed opset conversion (checked after) as an error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ------------------------------------------------------------------------------------------------ torch.export
def export_program(module: LogitsModule, example: torch.Tensor) -> "torch.export.ExportedProgram":
    with _exporter_notices_silenced(), torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=_dynamic_shapes())


def _bound(value) -> Optional[int]:
    """An upper bound of torch.export's ranges as an int, None for its unbounded `int_oo`."""
    import sympy

    return int(value) if isinstance(value, (int, sympy.Integer)) else None


def input_ranges(program: "torch.export.ExportedProgram") -> List[Tuple[int, Optional[int]]]:
    """(smallest, largest or None) of each axis of `pixel_values` that the exported program accepts."""
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    ranges = []
    for size in node.meta["val"].shape:
        if isinstance(size, int):
            ranges.append((size, size))
            continue
        value_range = program.range_constraints[size.node.expr]
        ranges.append((int(value_range.lower), _bound(value_range.upper)))
    # torch.export does not trace a batch of 1 (its ranges start at 2) but its programs take one
    lower, upper = ranges[0]
    ranges[0] = (min(lower, 1), upper)
    return ranges


def write_torch_export(module: LogitsModule, example: torch.Tensor, path: str) -> List[Tuple[int, Optional[int]]]:
    """Write `model.pt2`; returns the accepted range of each input axis."""
    program = export_program(module, example)
    torch.export.save(program, path)
    return input_ranges(program)


def open_torch_export(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """`model.pt2` loaded with torch.export.load: pixels -> logits."""
    module = torch.export.load(path).module()

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(pixels))[OUTPUT_NAME].float().numpy()
    return run


# ------------------------------------------------------------------------------------------------ ONNX
def write_onnx(module: LogitsModule, example: torch.Tensor, path: str, opset: int) -> Dict[str, int]:
    """Write `model.onnx` (one self-contained file, optimised by torch.onnx's own pass, the axes named batch /
    height / width); returns the count of each operator type. Raises ConversionError when the exporter could not
    write the asked opset."""
    import onnx

    with _exporter_notices_silenced(), torch.no_grad():
        torch.onnx.export(module, (example,), path, dynamo=True, verbose=False, dynamic_shapes=_dynamic_shapes(),
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                          external_data=False, optimize=True)
    model = onnx.load(path)
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ConversionError(None, f"--opset {opset}: torch.onnx's exporter wrote opset {written} instead; pick "
                                    f"another --opset (default {DEFAULT_OPSET})")
    _name_dynamic_axes(model)
    onnx.save(model, path)
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def max_opset() -> int:
    import onnx

    return int(onnx.defs.onnx_opset_version())


def _name_dynamic_axes(model) -> None:
    """The exporter names the dynamic axes after its symbols (s99, s100, ...): rename them batch, height, width
    everywhere they appear."""
    graph = model.graph
    renames = {}
    for dim, name in zip(graph.input[0].type.tensor_type.shape.dim, DIMENSION_NAMES):
        if name is not None and dim.dim_param:
            renames[dim.dim_param] = name
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]


def training_only_ops(op_counts: Dict[str, int]) -> Sequence[str]:
    return [op for op in TRAINING_ONLY_ONNX_OPS if op in op_counts]


def open_onnx(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """`model.onnx` in an ONNX Runtime session on the CPU provider: pixels -> logits."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda pixels: session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
