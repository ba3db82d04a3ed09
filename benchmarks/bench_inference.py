"""CvT-13 side by side: transformers 4.57.6 against this library, PyTorch and Keras/TF, in one run.

    python -m benchmarks.bench_inference            # full run (about 16 minutes on a 2-core CPU)
    python -m benchmarks.bench_inference --quick    # smoke run (batch 8 only, few repetitions)

Every implementation (see benchmarks/implementations.py) runs in its own worker process (benchmarks/workers.py)
with the same random CvT-13 weights: transformers' PyTorch classifier with every weight and BatchNorm statistic
randomised, saved once and loaded by all of them.

The parent process only orchestrates: for each configuration it prepares (and warms up) every candidate, then
runs repetitions in rotating order, so all candidates of a row see the same machine load, and reports medians
(benchmarks/harness.py). It prints a table of ratios with the targets of the speed issue, and writes `results.json`
and `results.png` to --out (default benchmarks/results/; benchmarks/report.py). Logits of every candidate are
compared with the reference on the same input, so a speed-up that changed the numbers would show. A target the run
misses is profiled right after its row, in each runtime's own profiler, and printed with the ceiling that profile
gives (benchmarks/profiles.py). A last section
runs ~100 real photos (scikit-image samples, augmented) through the float32 and bfloat16 models and reports top-1
agreement and logit margins (benchmarks/agreement.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.agreement import photo_agreement  # noqa: E402
from benchmarks.harness import Candidate, cores_in_use, run_group  # noqa: E402
from benchmarks.implementations import IMAGE_SIZE, WORKER_KINDS, make_checkpoint  # noqa: E402
from benchmarks.profiles import profile_key  # noqa: E402
from benchmarks.report import missed_targets, result_row, summarise, write_results  # noqa: E402
from benchmarks.workers import Worker, worker_main  # noqa: E402
from cvt_core.config import CvtConfig  # noqa: E402
from cvt_core.macs import cvt_macs  # noqa: E402


def profile_missed_targets(cands: List[Candidate], section: str, batch: int, profiles: Dict[str, Dict[str, Any]],
                           log) -> None:
    """Profile ours and the reference of every target of this row that the row misses, while their runs are still
    prepared in the workers."""
    by_name = {c.name: c for c in cands}
    for target in missed_targets(section, batch, {c.name: c.images_per_s for c in cands}):
        for name in (target["ours"], target["reference"]):
            key = profile_key(section, batch, name)
            if key in profiles:
                continue
            cand = by_name[name]
            reply = cand.worker.call(cmd="profile", key=cand.key, variant=cand.variant, batch=cand.batch)
            profiles[key] = reply if reply.get("ok") else {"error": reply.get("error")}
            log(f"    profiled {name} for the missed target {target['id']}"
                + (f" ({reply['profile_s']:.0f} s)" if reply.get("ok") else f": {reply.get('error')}"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8 only, 2 repetitions, fewer photos")
    parser.add_argument("--batches", default=None, help="comma-separated inference batch sizes (default 1,8,32)")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="batch of the training step (default 8; --quick: 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration (default 5)")
    parser.add_argument("--min-sample", type=float, default=None, help="seconds per timed sample (default 0.5)")
    parser.add_argument("--untimed", type=int, default=1,
                        help="untimed iterations before each timed sample: a worker resuming after the others ran is "
                             "slow on its first iteration (default 1)")
    parser.add_argument("--settle", type=float, default=0.3,
                        help="seconds of quiet before each timed sample, so the previous worker's spinning threads "
                             "have stopped (default 0.3)")
    parser.add_argument("--threads", type=int, default=None, help="threads per worker (default: the library's own)")
    parser.add_argument("--frameworks", default="pt,tf,jax,onnx",
                        help="comma-separated: pt, tf, jax (our Keras model on Keras' JAX backend, in the Keras/TF "
                             "rows), onnx (ONNX Runtime on both ONNX exports); default all four")
    parser.add_argument("--omp-wait-policy", choices=("auto", "default", "passive"), default="auto",
                        help="OpenMP threads of the workers: 'default' spins at barriers (the libraries' default), "
                             "'passive' sleeps; 'auto' (default) picks passive when other processes keep more than 0.4 "
                             "cores busy at the start, where spinning threads steal the core their preempted partner "
                             "needs")
    parser.add_argument("--no-compiled-training", dest="compiled_training", action="store_false",
                        help="skip the PyTorch training step under torch.compile (reported beside the eager step, "
                             "no target; its first call compiles for a minute or two)")
    parser.add_argument("--no-profile", dest="profile_misses", action="store_false",
                        help="skip the op profiles of the candidates of a missed target (by default each is profiled "
                             "in its runtime's profiler right after its row, and the run prints the ceiling)")
    parser.add_argument("--photos", type=int, default=None, help="real-photo views for bf16 agreement (default 96)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"), help="output folder")
    parser.add_argument("--worker", choices=WORKER_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.checkpoint, args.threads, args.workdir)
        return 0

    batches = [int(b) for b in (args.batches or ("8" if args.quick else "1,8,32")).split(",")]
    repeats = args.repeats or (2 if args.quick else 5)
    min_sample = args.min_sample if args.min_sample is not None else (0.0 if args.quick else 0.5)
    num_photos = args.photos if args.photos is not None else (8 if args.quick else 96)
    warmup = 1 if args.quick else 2  # the first call traces/compiles; the timed rounds follow
    train_batch = args.train_batch or (4 if args.quick else 8)
    frameworks = set(args.frameworks.split(","))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {message}", flush=True)

    load_start = os.getloadavg()
    busy_cores = cores_in_use()
    busy = busy_cores is not None and busy_cores > 0.4
    if busy:
        log(f"WARNING: other processes keep {busy_cores:.1f} of {os.cpu_count()} cores busy before the run: timings will"
            " be noisy, and threads preempted mid-operation stretch the fastest code the most")
    omp_passive = args.omp_wait_policy == "passive" or (args.omp_wait_policy == "auto" and busy)
    if omp_passive and "OMP_WAIT_POLICY" not in os.environ:
        log("workers run with OMP_WAIT_POLICY=PASSIVE (same for every implementation)")
    workdir = tempfile.mkdtemp(prefix="cvt-bench-")
    workers: Dict[str, Worker] = {}
    try:
        checkpoint = os.path.join(workdir, "cvt13-random")
        log("building the random CvT-13 checkpoint (transformers, randomised weights and BatchNorm statistics)")
        make_checkpoint(checkpoint)
        config = CvtConfig.from_pretrained(checkpoint)
        macs = cvt_macs(config, IMAGE_SIZE, IMAGE_SIZE)
        cls_only_macs = cvt_macs(config, IMAGE_SIZE, IMAGE_SIZE, cls_only=True)
        gflop_per_image = 2 * macs["total"] / 1e9
        log(f"CvT-13 at {IMAGE_SIZE}: {macs['total'] / 1e9:.3f} GMAC = {gflop_per_image:.2f} GFLOP per image")

        kinds = []
        if "pt" in frameworks:
            kinds += ["hf-pt", "ours-pt", "ours-pt-fast"]
        if "tf" in frameworks:
            kinds += ["hf-tf", "ours-keras", "hf-tf-bf16", "ours-keras-bf16"]
        if "jax" in frameworks:
            kinds += ["ours-keras-jax", "ours-keras-jax-bf16"]
        if "onnx" in frameworks:
            kinds += ["hf-onnx", "ours-onnx"]
        for kind in kinds:
            workers[kind] = Worker(kind, checkpoint, args.threads, workdir, str(out_dir), omp_passive)
        for kind in kinds:
            workers[kind].wait_ready()
            w = workers[kind]
            log(f"worker {kind}: " + (f"ready in {w.info.get('load_s', 0):.1f} s, {w.info.get('threads')} threads"
                                       if not w.error else f"UNAVAILABLE: {w.error}"))

        rates: Dict[str, float] = {}
        for kind in ("ours-pt", "ours-keras", "hf-tf"):
            if kind in workers and not workers[kind].error:
                reply = workers[kind].call(cmd="matmul")
                rates.update(reply.get("rates", {}))
                if kind == "ours-keras" and reply.get("rates"):
                    break
        if "ours-keras-jax" in workers and not workers["ours-keras-jax"].error:
            rates.update(workers["ours-keras-jax"].call(cmd="matmul").get("rates", {}))
        if "ours-onnx" in workers and not workers["ours-onnx"].error:
            rates.update(workers["ours-onnx"].call(cmd="matmul").get("rates", {}))
        for name, rate in rates.items():
            log(f"matmul rate, {name}: {rate:.0f} GFLOP/s")

        rows: List[Dict[str, Any]] = []
        memory: Dict[str, Dict[str, Any]] = {}
        profiles: Dict[str, Dict[str, Any]] = {}  # "section/batch/candidate" -> op profile, for missed targets

        def group(title: str, section: str, batch: int, spec, reference: str):
            log(f"{title}, batch {batch}")
            involved = sorted({kind for kind, _ in spec if kind in workers})
            for kind in involved:
                workers[kind].call(cmd="reset_peak")
            cands = [Candidate(workers[kind], variant, batch, f"{kind}:{variant}") for kind, variant in spec
                     if kind in workers]
            if not cands:
                return
            run_group(cands, repeats, min_sample, log, warmup, settle_s=args.settle, untimed=args.untimed)
            if args.profile_misses:
                profile_missed_targets(cands, section, batch, profiles, log)
            for kind in involved:
                reply = workers[kind].call(cmd="memory")
                memory.setdefault(kind, {})[f"{section}/{batch}"] = reply.get("peak_rss_mb")
                workers[kind].call(cmd="release")
            ref = next((c for c in cands if c.name == reference), None)
            rows.extend(result_row(cand, section, batch, reference, ref, gflop_per_image) for cand in cands)

        if "pt" in frameworks:
            for batch in batches:
                group("PyTorch fp32 inference", "pt-fp32", batch,
                      [("hf-pt", "fp32"), ("ours-pt", "fp32"), ("ours-pt-fast", "fp32")], "hf-pt:fp32")
            for batch in batches:
                group("PyTorch bf16 inference", "pt-bf16", batch,
                      [("hf-pt", "fp32"), ("hf-pt", "bf16"), ("hf-pt", "autocast"), ("ours-pt", "bf16"),
                       ("ours-pt", "autocast"), ("ours-pt-fast", "bf16"), ("ours-pt-fast", "autocast")],
                      "hf-pt:fp32")
        if "tf" in frameworks or "jax" in frameworks:
            # at batch 8 transformers' PyTorch fp32 runs in the same rounds: the cross-framework targets' reference;
            # our Keras model on JAX runs in the same rounds as on TensorFlow
            cross = [("hf-pt", "fp32")] if "hf-pt" in workers else []
            for batch in batches:
                group("Keras/TF and Keras/JAX fp32 inference", "tf-fp32", batch,
                      [("hf-tf", "fp32"), ("ours-keras", "fp32"), ("ours-keras", "fp32-plain"),
                       ("ours-keras-jax", "fp32")]
                      + (cross if batch == 8 else []), "hf-tf:fp32")
            for batch in batches:
                group("Keras/TF and Keras/JAX bf16 inference (mixed_bfloat16)", "tf-bf16", batch,
                      [("hf-tf", "fp32"), ("hf-tf-bf16", "bf16"), ("ours-keras-bf16", "bf16"),
                       ("ours-keras-bf16", "bf16-plain"),
                       ("ours-keras-jax-bf16", "bf16")] + (cross if batch == 8 else []), "hf-tf:fp32")

        if "onnx" in frameworks:
            for batch in batches:
                # our eager PyTorch model in the same rounds: a CPU deployment's alternative to ONNX Runtime
                group("ONNX Runtime fp32 inference (CPU provider) beside our eager PyTorch", "onnx-fp32", batch,
                      [("hf-onnx", "fp32"), ("ours-onnx", "fp32"), ("ours-pt", "fp32"), ("ours-pt-fast", "fp32")],
                      "hf-onnx:fp32")

        # real photos before the training rows (a TF training step changes the model in place until released)
        agreement = photo_agreement(workers, num_photos, workdir, log) if num_photos > 0 else {}
        training_rows = []
        if "pt" in frameworks:
            training_rows.append(("PyTorch training step (forward, backward, AdamW)", "pt-train",
                                  [("hf-pt", "train"), ("ours-pt", "train"), ("ours-pt-fast", "train")]
                                  + ([("ours-pt", "train-compiled")] if args.compiled_training else []),
                                  "hf-pt:train"))
        if "tf" in frameworks or "jax" in frameworks:
            training_rows.append(("Keras/TF and Keras/JAX training step (forward, backward, AdamW)", "tf-train",
                                  [("hf-tf", "train"), ("ours-keras", "train"), ("ours-keras-jax", "train")],
                                  "hf-tf:train"))
        # the training rows need few workers and the most memory: the others quit first (on a 24 GiB machine all ten
        # processes and a training step do not fit, and the kernel's OOM killer would stop one mid-row)
        for kind in set(workers) - {kind for _, _, spec, _ in training_rows for kind, _ in spec}:
            workers[kind].close(wait=False)
        for title, section, spec, reference in training_rows:
            group(title, section, train_batch, spec, reference)
        result = summarise(rows, memory, rates, macs, gflop_per_image, agreement, workers, batches, train_batch,
                           args.quick, profiles, cls_only_macs)
        result["wall_s"] = time.perf_counter() - started
        result["load_average_start"], result["load_average_end"] = list(load_start), list(os.getloadavg())
        result["cores_busy_before_start"] = busy_cores
        result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY") or ("PASSIVE" if omp_passive else "default")
        write_results(result, out_dir, log)
    finally:
        for worker in workers.values():  # all of them at once: TF processes take a while to exit
            worker.close(wait=False)
        for worker in workers.values():
            worker.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
