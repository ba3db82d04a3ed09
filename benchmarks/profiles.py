"""Where the time goes, for the targets a benchmark run misses: each runtime's own profiler summed by op type, and
the ceiling that follows from it.

A worker answers `profile` (benchmarks/workers.py) with `op_profile`: the op types of one prepared (variant, batch)
call and their milliseconds per call, from torch.profiler (PyTorch), TensorFlow's profiler (Keras/TF) or ONNX
Runtime's session profiling. `ceiling` then splits the profile into matrix products and the rest and scales both to
the measured wall time: the ratio ours would reach if everything but its matrix products took no time, and the time
the rest would have to fit in for the target. JAX runs have no op profile here.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

# op types that are matrix products (GEMMs) in the runtimes' own names: aten::addmm / mm / bmm / matmul / linear,
# mkldnn::_linear_pointwise, TensorFlow's _MklNativeFusedMatMul / BatchMatMulV2, ONNX MatMul / Gemm / FusedMatMul /
# Einsum; and the fused attention kernels (aten::_scaled_dot_product_*), whose two products are the work the MAC
# count gives them (their softmax rides along)
_MATMUL_PATTERN = re.compile(r"(mm|matmul|linear|gemm|einsum|scaled_dot_product)", re.IGNORECASE)


def profile_key(section: str, batch: int, candidate: str) -> str:
    """How a run files the op profile of one candidate of one row."""
    return f"{section}/{batch}/{candidate}"


def is_matmul(op_type: str) -> bool:
    return bool(_MATMUL_PATTERN.search(op_type))


def _per_call(totals: Dict[str, float], calls: int) -> Dict[str, float]:
    return {op: seconds * 1000 / calls for op, seconds in sorted(totals.items(), key=lambda kv: -kv[1])}


def torch_op_profile(run: Callable[[], Any], calls: int = 3) -> Dict[str, float]:
    """Self CPU milliseconds per call of each aten / mkldnn op while `run` runs."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            run()
    totals: Dict[str, float] = collections.Counter()
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0:
            totals[event.key] += event.self_cpu_time_total * 1e-6
    return _per_call(totals, calls)


def tf_kernel_events(xspace_path: str, scope: str = "tf_cvt") -> Iterable[Tuple[str, str, float]]:
    """(op type, node name, seconds) of every TensorFlow kernel run under `scope` recorded in an XSpace file
    (both transformers' TF model and ours name their layers tf_cvt...)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xspace_path, "rb") as f:
        space.ParseFromString(f.read())
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                metadata = plane.event_metadata[event.metadata_id]
                # kernel events carry the node name (the layers' scopes) and the op type as display name
                if metadata.display_name and scope in metadata.name:
                    yield metadata.display_name, metadata.name, event.duration_ps * 1e-12


def tf_op_profile(run: Callable[[], Any], calls: int = 3) -> Dict[str, float]:
    """Kernel milliseconds per call of each TensorFlow op type while `run` runs (TensorFlow runs independent ops
    concurrently, so they can add up to more than the wall time)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            for _ in range(calls):
                run()
        finally:
            tf.profiler.experimental.stop()
        files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        totals: Dict[str, float] = collections.Counter()
        for op_type, _, seconds in (tf_kernel_events(files[0]) if files else ()):
            totals[op_type] += seconds
    return _per_call(totals, calls)


def onnx_op_profile(model_path: str, options, feed: Dict[str, Any], calls: int = 3,
                    warmup: int = 3) -> Dict[str, float]:
    """Kernel milliseconds per call of each ONNX op type (after ONNX Runtime's graph optimisations) in a profiling
    session made like the timed one. Its first `warmup` runs are left out: a fresh session's first runs grow its
    memory arena and touch new pages (the largest softmax then takes twice its time), which the timed session,
    warmed before its rounds, never shows."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder:
        profiled = onnxruntime.SessionOptions()
        profiled.intra_op_num_threads = options.intra_op_num_threads
        profiled.enable_profiling = True
        profiled.profile_file_prefix = os.path.join(folder, "ort")
        session = onnxruntime.InferenceSession(model_path, profiled, providers=["CPUExecutionProvider"])
        for _ in range(warmup + calls):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    counted_from = runs[warmup]["ts"] if len(runs) > warmup else None
    totals: Dict[str, float] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            if counted_from is not None and event["ts"] < counted_from:
                continue
            totals[event["args"]["op_name"]] += event["dur"] * 1e-6
    return _per_call(totals, calls)


def timed_profile(profile: Callable[[], Dict[str, float]]) -> Dict[str, Any]:
    start = time.perf_counter()
    ops = profile()
    return {"ops_ms": ops, "profile_s": time.perf_counter() - start}


def ceiling(ours_ops: Dict[str, float], ours_ms: float, reference_ms: float, minimum: float,
            matmul_gflop: Optional[float] = None, peak_gflops: Optional[float] = None) -> Dict[str, Any]:
    """What the profile of ours says about a missed target. Op times are scaled to the measured wall time
    `ours_ms` per batch (profilers add overhead, and concurrent ops can sum past the wall time): `matmul_ms`,
    `other_ms`; `needed_ms` is ours' time per batch at the target; `matmul_only_ratio` the ratio if everything but
    the matrix products took no time; `other_budget_ms` what the rest may take at the target with the matrix
    products as fast as now (negative: out of reach without faster matrix products).

    Given the matrix products' work per batch (`matmul_gflop`, as ours executes it) and the measured matmul peak of
    the runtime ours runs on (`peak_gflops`): `matmul_percent_of_peak` (how fast they run now), `matmul_at_peak_ms`,
    `at_peak_ratio` (the ratio with the matrix products at that peak and the rest as now) and
    `other_budget_at_peak_ms` (what the rest may take at the target then)."""
    total = sum(ours_ops.values())
    if not total or not ours_ms or not reference_ms:
        return {}
    scale = ours_ms / total
    matmul_ms = scale * sum(ms for op, ms in ours_ops.items() if is_matmul(op))
    needed_ms = reference_ms / minimum
    result = {
        "matmul_ms": matmul_ms, "other_ms": ours_ms - matmul_ms, "needed_ms": needed_ms,
        "matmul_only_ratio": reference_ms / matmul_ms if matmul_ms else None,
        "other_budget_ms": needed_ms - matmul_ms,
    }
    if matmul_gflop and peak_gflops and matmul_ms:
        at_peak_ms = 1000 * matmul_gflop / peak_gflops
        result.update({
            "matmul_gflop": matmul_gflop, "peak_gflops": peak_gflops,
            "matmul_percent_of_peak": 100 * at_peak_ms / matmul_ms, "matmul_at_peak_ms": at_peak_ms,
            "at_peak_ratio": reference_ms / (at_peak_ms + result["other_ms"]),
            "other_budget_at_peak_ms": needed_ms - at_peak_ms,
        })
    return result


def describe(target: Dict[str, Any], profiles: Dict[str, Optional[Dict[str, Any]]], top: int = 8) -> str:
    """The lines printed for a missed target: both profiles side by side (top op types) and the ceiling."""
    lines = [f"{target['target']}: {target['ratio']:.3f}x, needs {target['minimum']:.2f}x"]
    for role in ("ours", "reference"):
        name = target[role]
        profile = profiles.get(name)
        if not profile or not profile.get("ops_ms"):
            lines.append(f"  {name}: no op profile" + (f" ({profile.get('error')})" if profile else ""))
            continue
        ops = profile["ops_ms"]
        total = sum(ops.values())
        matmul = sum(ms for op, ms in ops.items() if is_matmul(op))
        shown = ", ".join(f"{op} {ms:.1f}" for op, ms in list(ops.items())[:top])
        lines.append(f"  {name}: profiled {total:.1f} ms per call, matrix products {100 * matmul / total:.0f}%; "
                     f"top ops (ms): {shown}")
    c = target.get("ceiling") or {}
    if c:
        lines.append(f"  ceiling: at the target ours would take {c['needed_ms']:.0f} ms per batch; its matrix products "
                     f"take {c['matmul_ms']:.0f} ms of its {c['matmul_ms'] + c['other_ms']:.0f} ms now, so with "
                     f"everything else free it would reach {c['matmul_only_ratio']:.2f}x, and everything else must "
                     f"fit in {c['other_budget_ms']:.0f} ms (now {c['other_ms']:.0f} ms)")
        if c.get("at_peak_ratio"):
            lines.append(f"  at its runtime's measured matmul peak ({c['peak_gflops']:.0f} GFLOP/s; now "
                         f"{c['matmul_percent_of_peak']:.0f}% of it) its {c['matmul_gflop']:.1f} GFLOP of matrix "
                         f"products would take {c['matmul_at_peak_ms']:.0f} ms: with the rest as now that is "
                         f"{c['at_peak_ratio']:.2f}x, and the rest must fit in {c['other_budget_at_peak_ms']:.0f} ms")
    return "\n".join(lines)
