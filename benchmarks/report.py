"""What a benchmark run reports: result rows, the targets of the speed issue with PASS/FAIL, the table on stdout,
`results.json` (the dict `summarise` returns) and the `results.png` bar chart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from benchmarks.harness import compare_logits, library_versions, machine_facts
from benchmarks.profiles import ceiling, describe, profile_key
from cvt_core.macs import MATMUL_KINDS


TARGETS = [
    # (id, description, section, batch, ours, reference, minimum ratio); ours and the reference run in the same rows.
    # The PyTorch targets are judged on the documented fast configuration (`ours-pt-fast`: optimize_for_inference,
    # optimize_for_training); the model as loaded (`ours-pt`) is reported beside it without a target.
    ("pt-fp32-b8", "PyTorch fp32 inference, batch 8", "pt-fp32", 8, "ours-pt-fast:fp32", "hf-pt:fp32", 1.5),
    ("pt-fp32-b1", "PyTorch fp32 latency, batch 1 (no worse)", "pt-fp32", 1, "ours-pt-fast:fp32", "hf-pt:fp32", 1.0),
    ("pt-bf16-b8", "PyTorch bf16 (model.to(bfloat16)) vs transformers fp32, batch 8", "pt-bf16", 8,
     "ours-pt-fast:bf16", "hf-pt:fp32", 3.0),
    ("pt-autocast-b8", "PyTorch bf16 (autocast) vs transformers fp32, batch 8", "pt-bf16", 8,
     "ours-pt-fast:autocast", "hf-pt:fp32", 3.0),
    ("pt-train", "PyTorch training step", "pt-train", None, "ours-pt-fast:train", "hf-pt:train", 1.3),
    ("tf-fp32-b8", "Keras/TF fp32 inference, batch 8", "tf-fp32", 8, "ours-keras:fp32", "hf-tf:fp32", 2.5),
    ("tf-fp32-b8-vs-pt", "Keras fp32 vs transformers PyTorch fp32, batch 8", "tf-fp32", 8,
     "ours-keras:fp32", "hf-pt:fp32", 1.0),
    ("tf-fp32-b1", "Keras/TF fp32 latency, batch 1 (no worse)", "tf-fp32", 1, "ours-keras:fp32", "hf-tf:fp32", 1.0),
    ("tf-bf16-b8", "Keras bf16 (mixed_bfloat16) vs transformers PyTorch fp32, batch 8", "tf-bf16", 8,
     "ours-keras-bf16:bf16", "hf-pt:fp32", 3.0),
    ("tf-train", "Keras training step", "tf-train", None, "ours-keras:train", "hf-tf:train", 2.0),
    ("onnx-fp32-b8", "ONNX Runtime: our model.onnx vs transformers' ONNX export, batch 8", "onnx-fp32", 8,
     "ours-onnx:fp32", "hf-onnx:fp32", 1.3),
    ("pt-fp32-b8-vs-ort", "PyTorch fp32 eager vs ONNX Runtime on transformers' ONNX export, batch 8", "onnx-fp32", 8,
     "ours-pt-fast:fp32", "hf-onnx:fp32", 1.2),
]


ONNX_MATMUL = "onnxruntime MatMul fp32"

# For the ceiling of a missed target: the measured matmul peaks (fp32, bf16) of the runtime each of our candidates
# runs its matrix products on, and whether its inference forward runs the last block for the cls token alone (the
# optimised PyTorch classifier does, and so does its ONNX export; the model as loaded and the Keras model run every
# token).
OURS_MATMUL_RUNTIMES = {
    "ours-pt": ("torch.matmul fp32 (MKL sgemm)", "torch.matmul bf16 (oneDNN)", False),
    "ours-pt-fast": ("oneDNN fp32 matmul", "torch.matmul bf16 (oneDNN)", True),
    "ours-onnx": (ONNX_MATMUL, None, True),
    "ours-keras": ("tf.matmul fp32", "tf.matmul bf16", False),
    "ours-keras-jax": ("jax matmul fp32 (XLA)", "jax matmul bf16 (XLA)", False),
}

# bf16 top-1 agreement with fp32 on real photos, >= 99%: (id, description, ours, transformers' counterpart).
# Judged on the retrieval head, whose classes (the photos) mean something with random weights; the random
# 1000-class head's agreement is reported beside it, with transformers' figure in the same precision for scale.
AGREEMENT_TARGETS = [
    ("pt-bf16-agreement", "PyTorch model.to(bfloat16) top-1 agreement with fp32", "ours-pt-fast:bf16",
     "hf-pt:bf16"),
    ("pt-autocast-agreement", "PyTorch autocast top-1 agreement with fp32", "ours-pt-fast:autocast",
     "hf-pt:autocast"),
    ("tf-bf16-agreement", "Keras mixed_bfloat16 top-1 agreement with fp32", "ours-keras-bf16:bf16",
     "hf-tf-bf16:bf16"),
]
MINIMUM_AGREEMENT = 0.99


def agreement_targets(agreement: Dict[str, Any]) -> List[Dict[str, Any]]:
    targets = []
    for tid, text, ours, reference in AGREEMENT_TARGETS:
        stats, ref_stats = agreement.get(ours), agreement.get(reference)
        if not isinstance(stats, dict):
            targets.append({"id": tid, "target": text, "ours": ours, "status": "n/a"})
            continue
        value = stats["retrieval_top1_agreement"]
        targets.append({
            "id": tid, "target": text, "ours": ours, "reference": reference, "minimum": MINIMUM_AGREEMENT,
            "retrieval_top1_agreement": value, "random_head_top1_agreement": stats["top1_agreement"],
            "reference_random_head_top1_agreement": ref_stats["top1_agreement"] if isinstance(ref_stats, dict) else None,
            "max_abs_logit_diff_median": stats["max_abs_logit_diff_median"],
            "reference_max_abs_logit_diff_median": (ref_stats["max_abs_logit_diff_median"]
                                                    if isinstance(ref_stats, dict) else None),
            "status": "PASS" if value >= MINIMUM_AGREEMENT else "FAIL",
        })
    return targets


def _find(rows, section, batch, candidate):
    for row in rows:
        if row["section"] == section and (batch is None or row["batch"] == batch) and row["candidate"] == candidate:
            return row
    return None


def flops_factor(variant: str) -> int:
    """How many forward passes' worth of FLOPs one call of `variant` computes: a training step ("train",
    "train-compiled") 3 (the backward computes two products per forward one), inference 1."""
    return 3 if variant.startswith("train") else 1


def result_row(cand, section: str, batch: int, reference: str, ref, gflop_per_image: float) -> Dict[str, Any]:
    """The results.json row of one timed candidate; `ref` is the candidate named `reference` (or None)."""
    flops = gflop_per_image * flops_factor(cand.variant)
    return {
        "section": section, "batch": batch, "candidate": cand.name, "worker": cand.worker.kind,
        "variant": cand.variant, "error": cand.error, "median_s": cand.median,
        "images_per_s": cand.images_per_s, "times_s": cand.times, "loss": cand.loss,
        "best_images_per_s": batch / min(cand.times) if cand.times else None,
        "gflops_per_s": cand.images_per_s * flops if cand.images_per_s else None,
        "vs_reference": compare_logits(ref, cand) if ref is not None and cand is not ref else None,
        "reference": reference,
    }


def missed_targets(section: str, batch: int, images_per_s: Dict[str, Optional[float]]) -> List[Dict[str, Any]]:
    """The targets of one timed row (`images_per_s` by candidate name) that it misses."""
    missed = []
    for tid, text, tsection, tbatch, ours, ref, minimum in TARGETS:
        if tsection != section or (tbatch is not None and tbatch != batch):
            continue
        o, r = images_per_s.get(ours), images_per_s.get(ref)
        if o and r and o / r < minimum:
            missed.append({"id": tid, "target": text, "ours": ours, "reference": ref, "ratio": o / r,
                           "minimum": minimum})
    return missed


def matmul_work(candidate: str, batch: int, macs: Dict[str, int], cls_only_macs: Optional[Dict[str, int]],
                rates: Dict[str, float]) -> Tuple[Optional[float], Optional[float]]:
    """(GFLOP of matrix products that our `candidate` executes per batch, the matmul peak of its runtime in
    GFLOP/s), or Nones where either is unknown. A training step runs every token (no cls-only block) and counts
    `flops_factor` forward passes."""
    name, _, variant = candidate.partition(":")
    runtime = OURS_MATMUL_RUNTIMES.get(name.replace("-bf16", ""))
    if runtime is None:
        return None, None
    fp32_peak, bf16_peak, runs_cls_only = runtime
    peak = rates.get(bf16_peak if variant in ("bf16", "autocast") else fp32_peak)
    factor = flops_factor(variant)
    counted = cls_only_macs if runs_cls_only and factor == 1 and cls_only_macs else macs
    gflop = 2 * batch * factor * sum(counted.get(kind, 0) for kind in MATMUL_KINDS) / 1e9
    return gflop or None, peak


def summarise(rows, memory, rates, macs, gflop_per_image, agreement, workers, batches, train_batch,
              quick: bool, op_profiles: Optional[Dict[str, Dict[str, Any]]] = None,
              cls_only_macs: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """The content of results.json (without the run's wall time and load, which the caller adds): the rows with
    their share of the matmul peaks, the targets with ratios and PASS/FAIL (a missed one with the op profiles of
    its candidates and the ceiling they give), machine facts and versions. `cls_only_macs`: the MAC count of the
    classifiers that run the last block for the cls token alone (for the ceilings)."""
    op_profiles = op_profiles or {}
    onnx_peak = rates.get(ONNX_MATMUL)  # the ONNX rows run on ONNX Runtime's own GEMM (MLAS)
    fp32_peaks = {k: v for k, v in rates.items() if "fp32" in k and k != ONNX_MATMUL}
    bf16_peaks = {k: v for k, v in rates.items() if "bf16" in k}
    peak32 = max(fp32_peaks.values()) if fp32_peaks else None
    peak16 = max(bf16_peaks.values()) if bf16_peaks else None
    mkl = rates.get("torch.matmul fp32 (MKL sgemm)")
    for row in rows:
        g = row.get("gflops_per_s")
        peak = peak16 if row["variant"] in ("bf16", "autocast") else peak32
        if row["section"].startswith("onnx"):
            peak = onnx_peak
        row["percent_of_best_matmul"] = 100 * g / peak if g and peak else None
        row["percent_of_torch_matmul_fp32"] = 100 * g / mkl if g and mkl else None
    targets = []
    for tid, text, section, batch, ours, ref, minimum in TARGETS:
        o, r = _find(rows, section, batch, ours), _find(rows, section, batch, ref)
        ratio = paired = None
        if o and r and o["images_per_s"] and r["images_per_s"]:
            ratio = o["images_per_s"] / r["images_per_s"]
            if len(o["times_s"]) == len(r["times_s"]):
                # the same rounds, run back to back: robust to load that drifts between rounds
                paired = float(np.median(np.asarray(r["times_s"]) / np.asarray(o["times_s"])))
        status = "n/a" if ratio is None else ("PASS" if ratio >= minimum else "FAIL")
        target = {"id": tid, "target": text, "ours": ours, "reference": ref, "ratio": ratio,
                  "paired_ratio": paired, "minimum": minimum, "status": status,
                  "note": (o or {}).get("error") or (r or {}).get("error")}
        if status == "FAIL":
            found = {name: op_profiles.get(profile_key(section, row["batch"], name))
                     for name, row in ((ours, o), (ref, r))}
            target["profiles"] = found
            ours_profile = found[ours] or {}
            if ours_profile.get("ops_ms"):
                target["ceiling"] = ceiling(ours_profile["ops_ms"], 1000 * o["batch"] / o["images_per_s"],
                                            1000 * r["batch"] / r["images_per_s"], minimum,
                                            *matmul_work(ours, o["batch"], macs, cls_only_macs, rates))
        targets.append(target)
    return {
        "machine": machine_facts(), "versions": library_versions(), "matmul_gflops": rates,
        "best_fp32_matmul_gflops": peak32, "best_bf16_matmul_gflops": peak16, "gmac_per_image": macs["total"] / 1e9,
        "macs_by_kind": macs, "cls_only_macs_by_kind": cls_only_macs, "gflop_per_image": gflop_per_image,
        "batches": batches, "train_batch": train_batch,
        "workers": {k: {"threads": w.info.get("threads"), "error": w.error, "load_s": w.info.get("load_s")}
                    for k, w in workers.items()},
        "rows": rows, "targets": targets, "peak_rss_mb": memory, "bf16_agreement": agreement,
        "agreement_targets": agreement_targets(agreement or {}),
        "quick": bool(quick),
    }


def _fmt(value, spec=".2f", missing="-"):
    return missing if value is None else format(value, spec)


def print_table(result: Dict[str, Any]) -> None:
    rows = result["rows"]
    print()
    if result.get("load_average_start"):
        print(f"load average (1 min) at start {result['load_average_start'][0]:.1f}, at end "
              f"{result['load_average_end'][0]:.1f}, on {result['machine'].get('cpus')} CPUs; cores busy before the "
              f"start {_fmt(result.get('cores_busy_before_start'), '.1f')}; OpenMP wait policy "
              f"{result.get('omp_wait_policy')}")
    print(f"CvT-13 at 224, {result['gflop_per_image']:.2f} GFLOP/image; machine: {result['machine'].get('cpu', '?')}, "
          f"{result['machine'].get('cpus')} CPUs; matmul peaks: " +
          ", ".join(f"{k} {v:.0f}" for k, v in result["matmul_gflops"].items()) + " GFLOP/s")
    header = (f"{'configuration':<22s} {'batch':>5s} {'candidate':<26s} {'img/s':>8s} {'x ref':>6s} {'GFLOP/s':>8s} "
              f"{'%peak':>6s} {'%mm32':>6s} {'max|dlogit|':>11s} {'top1':>5s}")
    print(header)
    print("-" * len(header))
    for row in rows:
        ref = next((r for r in rows if r["section"] == row["section"] and r["batch"] == row["batch"]
                    and r["candidate"] == row["reference"]), None)
        ratio = (row["images_per_s"] / ref["images_per_s"]
                 if ref and ref["images_per_s"] and row["images_per_s"] else None)
        cmp = row.get("vs_reference") or {}
        if row["error"]:
            print(f"{row['section']:<22s} {row['batch']:>5d} {row['candidate']:<26s} unavailable: {row['error'][:60]}")
            continue
        print(f"{row['section']:<22s} {row['batch']:>5d} {row['candidate']:<26s} {_fmt(row['images_per_s']):>8s} "
              f"{_fmt(ratio):>6s} {_fmt(row['gflops_per_s'], '.0f'):>8s} "
              f"{_fmt(row['percent_of_best_matmul'], '.0f'):>6s} "
              f"{_fmt(row['percent_of_torch_matmul_fp32'], '.0f'):>6s} {_fmt(cmp.get('max_abs_diff'), '.2e'):>11s} "
              f"{_fmt(None if not cmp else 100 * cmp['top1_agreement'], '.0f'):>5s}")
    print()
    print("%peak: of the best measured matmul rate of the same precision (fp32 rows: max over MKL, oneDNN and TF; "
          "bf16 rows: bf16; onnx rows: ONNX Runtime's own MatMul); %mm32: of torch.matmul fp32 (MKL sgemm). Training "
          "rows count 3x the forward FLOPs.")
    print("paired: median over rounds of (reference time / ours time) within the same round.")
    print()
    print(f"{'target (ratio = ours img/s / reference img/s, medians)':<70s} {'ratio':>6s} {'paired':>6s} "
          f"{'need':>5s}  status")
    for t in result["targets"]:
        # three decimals: a ratio just under its target must not print as the target
        print(f"{t['target']:<70s} {_fmt(t['ratio'], '.3f'):>6s} {_fmt(t.get('paired_ratio'), '.3f'):>6s} "
              f"{t['minimum']:>5.1f}  "
              f"{t['status']}"
              + (f"  ({t['note'][:60]})" if t["status"] == "n/a" and t.get("note") else ""))
    missed = [t for t in result["targets"] if t["status"] == "FAIL"]
    if missed:
        print("\nwhere the time goes for each missed target (the runtimes' own profilers, ms per call) and its ceiling:")
        for t in missed:
            print(describe(t, t.get("profiles") or {}))
    print()
    if result["peak_rss_mb"]:
        print("peak resident memory per worker process (MB) while running each configuration:")
        for kind, per in result["peak_rss_mb"].items():
            print(f"  {kind:<16s} " + ", ".join(f"{k} {_fmt(v, '.0f')}" for k, v in per.items()))
        print()
    agreement = result.get("bf16_agreement") or {}
    if agreement.get("views"):
        print(f"bf16 vs fp32 on {agreement['views']} views of {len(agreement['photos'])} real photos (random weights: "
              "top-1 of the random 1000-class head and of a photo-retrieval head on the logits):")
        for key, s in agreement.items():
            if isinstance(s, dict):
                print(f"  {key:<22s} top-1 {100 * s['top1_agreement']:5.1f}%  retrieval top-1 "
                      f"{100 * s['retrieval_top1_agreement']:5.1f}%  median max|dlogit| "
                      f"{s['max_abs_logit_diff_median']:.3f}  median fp32 margin {s['fp32_margin_median']:.3f}  "
                      f"decisive {100 * s['decisive_fraction']:.0f}%")
        print()
        print(f"{'bf16 target (top-1 agreement with fp32 on real photos)':<56s} {'retrieval':>9s} {'need':>5s}  "
              f"status  {'random head: ours / transformers':>32s}  {'median max|dlogit|: ours / transformers':>40s}")
        for t in result.get("agreement_targets", []):
            if t["status"] == "n/a":
                print(f"{t['target']:<56s} {'-':>9s} {'-':>5s}  n/a")
                continue
            ref_random = t.get("reference_random_head_top1_agreement")
            print(f"{t['target']:<56s} {100 * t['retrieval_top1_agreement']:8.1f}% {100 * t['minimum']:4.0f}%  "
                  f"{t['status']:<6s}  {100 * t['random_head_top1_agreement']:14.1f}% / "
                  f"{_fmt(None if ref_random is None else 100 * ref_random, '.1f'):>5s}%  "
                  f"{t['max_abs_logit_diff_median']:20.3f} / {_fmt(t.get('reference_max_abs_logit_diff_median'), '.3f')}")
        print("The retrieval head's classes are the photos (which photo a view comes from), so its top-1 means "
              "something with random weights; the random 1000-class head's top-1 margins are often below bf16's "
              "logit error, so its flips measure the weights, not the implementation (transformers' figure for scale).")
        print()


def plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["images_per_s"]]
    sections = [("pt-fp32", "PyTorch fp32"), ("pt-bf16", "PyTorch bf16"), ("pt-train", "PyTorch train step"),
                ("tf-fp32", "Keras/TF fp32"), ("tf-bf16", "Keras/TF bf16"), ("tf-train", "Keras/TF train step"),
                ("onnx-fp32", "ONNX Runtime fp32")]
    present = [(s, t) for s, t in sections if any(r["section"] == s for r in rows)]
    if not present:
        return
    columns = 3 if len(present) > 3 else len(present)
    rows_count = -(-len(present) // columns)
    fig, axes = plt.subplots(rows_count, columns, figsize=(5.2 * columns, 4.4 * rows_count), squeeze=False)
    colours = {"hf": "#9e9e9e", "ours": "#1f77b4"}
    for ax in axes.flat[len(present):]:
        ax.axis("off")
    for ax, (section, title) in zip(axes.flat, present):
        sec_rows = [r for r in rows if r["section"] == section]
        batches = sorted({r["batch"] for r in sec_rows})
        names = list(dict.fromkeys(r["candidate"] for r in sec_rows))
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            values = [next((r["images_per_s"] for r in sec_rows if r["batch"] == b and r["candidate"] == name), 0)
                      for b in batches]
            colour = colours["ours" if name.startswith("ours") else "hf"]
            alpha = 1.0 if name.endswith(("fp32", "train")) else 0.6
            hatch = "" if name.endswith(("fp32", "train")) else "//"
            if section.startswith("tf") and name.startswith("hf-pt"):  # the cross-framework reference
                colour, alpha, hatch = "#e0e0e0", 1.0, ".."
            bars = ax.bar(np.arange(len(batches)) + (i - (len(names) - 1) / 2) * width, values, width,
                          label=name, color=colour, alpha=alpha, hatch=hatch, edgecolor="black", linewidth=0.4)
            for bar, value in zip(bars, values):
                if value:
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{value:.1f}", ha="center",
                            va="bottom", fontsize=6)
        ax.set_xticks(np.arange(len(batches)))
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_ylabel("images / s")
        ax.set_title(title)
        ax.legend(fontsize=6)
    ratios = [f"{t['id']} {t['ratio']:.2f}x" for t in result["targets"] if t["ratio"]]
    fig.suptitle("CvT-13 at 224: transformers 4.57.6 (grey) vs ours (blue), same weights, same run, median img/s\n"
                 + ", ".join(ratios[:5]) + "\n" + ", ".join(ratios[5:]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: Dict[str, Any], out_dir: Path, log) -> None:
    """results.json, the table on stdout, and results.png (skipped, with a log line, without matplotlib)."""
    with open(out_dir / "results.json", "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)
    try:
        plot(result, out_dir / "results.png")
    except Exception as exc:  # matplotlib missing: the JSON and the table are the result
        log(f"no chart: {exc}")
    log(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.png'}")
