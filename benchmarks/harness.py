"""Measuring on a shared CPU: machine facts, and interleaved timing of candidates that live in worker processes.

Machine facts: how busy the cores are, the best rate of a matmul, peak resident memory, CPU model, ISA flags and
library versions. Timing (`run_group`): every candidate of a configuration is prepared and warmed up, then timed in
`repeats` rounds in rotating order, so load that changes during a run hits all of them alike; each candidate
reports the median of its rounds. `compare_logits` checks that a candidate computes what the reference does.
"""

from __future__ import annotations

import os
import platform
import select
import time
from typing import Any, Dict, List, Optional

import numpy as np


# ============================================================================================== machine facts
def cores_in_use(seconds: float = 2.0) -> Optional[float]:
    """How many cores other processes keep busy right now (from /proc/stat over `seconds`); None off Linux."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return 0.0
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def best_rate(fn, flops: float, repeats: int = 7) -> float:
    """GFLOP/s of `fn` (which does `flops` floating-point operations): two untimed calls, then the best of `repeats`."""
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def peak_rss_mb() -> Dict[str, Optional[float]]:
    """This process's peak (VmHWM) and current (VmRSS) resident memory in MB."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    except OSError:
        import resource

        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"peak_rss_mb": out.get("VmHWM"), "rss_mb": out.get("VmRSS")}


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory to the current one; False where the OS does not allow it."""
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine_facts() -> Dict[str, Any]:
    """Python, platform, CPU count, and on Linux the CPU model and the vector/matrix extensions it has."""
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    machine["cpu"] = line.split(":", 1)[1].strip()
                    break
            f.seek(0)
            flags = next((line for line in f if line.startswith("flags")), "")
            machine["isa"] = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {x}" in flags]
    except OSError:
        pass
    return machine


def library_versions() -> Dict[str, str]:
    """Installed versions of the libraries the benchmark compares (those that are installed)."""
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "transformers", "tensorflow", "keras", "tf_keras"):
        try:
            versions[name] = md.version(name if name != "tf_keras" else "tf-keras")
        except Exception:
            pass
    return versions


# ============================================================================================== timing
class Candidate:
    """One implementation in one variant at one batch, run by a worker (see `benchmarks.workers.Worker`)."""

    def __init__(self, worker, variant: str, batch: int, name: str):
        self.worker, self.variant, self.batch, self.name = worker, variant, batch, name
        self.key = f"{variant}/{batch}"
        self.times: List[float] = []
        self.error: Optional[str] = None
        self.logits: Optional[str] = None
        self.loss: Optional[float] = None

    @property
    def median(self) -> Optional[float]:
        return float(np.median(self.times)) if self.times else None

    @property
    def images_per_s(self) -> Optional[float]:
        return self.batch / self.median if self.times else None


def prepare_all(candidates: List[Candidate], warmup: int, timeout: float = 1800) -> Dict[str, float]:
    """Build and warm up every candidate, the workers in parallel (tracing and compiling dominate the warm-up),
    each worker's candidates one after the other. Returns the last warm-up time of each candidate."""
    queues: Dict[Any, List[Candidate]] = {}
    for cand in candidates:
        queues.setdefault(cand.worker, []).append(cand)
    warm: Dict[str, float] = {}
    inflight: Dict[Any, Candidate] = {}

    def launch(worker):
        while queues[worker]:
            cand = queues[worker].pop(0)
            if worker.send(cmd="prepare", variant=cand.variant, batch=cand.batch, warmup=warmup):
                inflight[worker.proc.stdout] = cand
                return
            cand.error = worker.error

    for worker in list(queues):
        launch(worker)
    while inflight:
        ready, _, _ = select.select(list(inflight), [], [], timeout)
        if not ready:
            for cand in inflight.values():
                cand.error = f"no answer to prepare in {timeout:.0f} s"
            break
        for stream in ready:
            cand = inflight.pop(stream)
            try:
                reply = cand.worker.read(1)
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
                cand.worker.error = reply["error"]
            if "error" in reply:
                cand.error = reply["error"].splitlines()[0][:300]
            else:
                cand.logits, cand.loss = reply.get("logits"), reply.get("loss")
                warm[cand.name] = reply["warmup_s"][-1]
            launch(cand.worker)
    return warm


def run_group(candidates: List[Candidate], repeats: int, min_sample_s: float, log, warmup: int = 2,
              settle_s: float = 0.0, untimed: int = 0) -> None:
    """Warm every candidate up, then `repeats` rounds in rotating order; each round times every candidate for at
    least `min_sample_s` (whole iterations), after `settle_s` of quiet (the previous worker's threads spin for a
    while after their last operation) and `untimed` untimed iterations (a worker resuming after the others ran is
    slow on its first iteration: measured up to 30% for transformers' PyTorch after the TF workers)."""
    warm = prepare_all(candidates, warmup)
    inner = {}
    for cand in candidates:
        if cand.error:
            log(f"    {cand.name}: unavailable ({cand.error})")
            continue
        seconds = warm[cand.name]
        if seconds < 2 * min_sample_s:  # the warm-ups ran side by side: time one iteration alone
            reply = cand.worker.call(cmd="time", key=cand.key, n=1)
            seconds = min(reply.get("times") or [seconds])
        inner[cand.name] = max(1, int(round(min_sample_s / max(seconds, 1e-3))))
    live = [c for c in candidates if c.error is None]
    for r in range(repeats):
        shift = r % max(1, len(live))
        for cand in live[shift:] + live[:shift]:
            time.sleep(settle_s)
            reply = cand.worker.call(cmd="time", key=cand.key, n=inner[cand.name], untimed=untimed)
            if "error" in reply:
                cand.error = reply["error"].splitlines()[0][:300]
                continue
            cand.times.append(float(np.median(reply["times"])))
    for cand in live:
        if cand.times:
            log(f"    {cand.name:<34s} {cand.images_per_s:8.2f} img/s  (median of {len(cand.times)} x "
                f"{inner[cand.name]} it; spread {min(cand.times) * 1e3:.0f}-{max(cand.times) * 1e3:.0f} ms)")


def compare_logits(reference: Candidate, candidate: Candidate) -> Optional[Dict[str, float]]:
    """Largest logit difference (absolute and relative to the largest reference logit) and top-1 agreement of two
    candidates' warm-up outputs on the same input; None when either has none."""
    if not reference.logits or not candidate.logits:
        return None
    a, b = np.load(reference.logits).astype(np.float64), np.load(candidate.logits).astype(np.float64)
    scale = max(1.0, float(np.abs(a).max()))
    return {"max_abs_diff": float(np.abs(a - b).max()), "relative_to_max_logit": float(np.abs(a - b).max() / scale),
            "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1)))}
