"""Benchmark: convert a CvT-W24-shaped checkpoint (277M parameters, random weights) torch -> hf-tf -> torch with
`cvt convert`, beside transformers' own conversion of the same file, in the same run.

Every measured step runs in a fresh child process; its wall time and peak resident memory (ru_maxrss of that child,
from os.wait4) are printed with the ratio of the peak to the checkpoint's size. Targets (from the issue): faster
than transformers, peak memory at most 2.5x the checkpoint's bytes.

    python benchmarks/bench_conversion.py [--preset cvt-w24] [--workdir DIR] [--keep] [--skip-transformers]

Not a test: it takes a few minutes and about 4 GB of memory at its peak (transformers' step).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MAKE_CHECKPOINT = r"""
import sys
from cvt_core import CvtConfig
from cvt_core.checkpoint import write_safetensors
from conversion.random_weights import random_state
config = CvtConfig.from_preset(sys.argv[2])
config.extra["architectures"] = ["CvtForImageClassification"]
write_safetensors(sys.argv[1] + "/model.safetensors", random_state(config, True, seed=0))
config.save_pretrained(sys.argv[1])
"""

_TRANSFORMERS_PT_TO_TF = r"""
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import transformers
model = transformers.TFCvtForImageClassification.from_pretrained(sys.argv[1], from_pt=True)
model.save_pretrained(sys.argv[2])
"""

_TRANSFORMERS_TF_TO_PT = r"""
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import transformers
model = transformers.CvtForImageClassification.from_pretrained(sys.argv[1], from_tf=True)
model.save_pretrained(sys.argv[2])
"""


def run_measured(argv, env=None, timeout=1800):
    """(exit status, wall seconds, peak RSS bytes, last stderr line) of one child process; the peak is the
    child's own ru_maxrss, from os.wait4."""
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as err_file:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err_file, cwd=REPO)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        err_file.seek(0)
        lines = [line.strip() for line in err_file.read().splitlines() if line.strip()]
    return proc.returncode, wall, usage.ru_maxrss * 1024, (lines[-1] if lines else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cvt-w24")
    parser.add_argument("--workdir", default=None, help="where to put the checkpoints (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="cvt-bench-")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="3")
    python = sys.executable
    try:
        src = os.path.join(work, "src-torch")
        os.makedirs(src, exist_ok=True)
        subprocess.run([python, "-c", _MAKE_CHECKPOINT, src, args.preset], env=env, check=True, cwd=REPO)
        ckpt = os.path.getsize(os.path.join(src, "model.safetensors"))
        sys.path.insert(0, REPO)
        from cvt_core import CvtConfig, count_parameters

        params = count_parameters(CvtConfig.from_preset(args.preset))
        print(f"{args.preset}: {params:,} parameters; model.safetensors {ckpt / 1e9:.3f} GB (random float32 weights, "
              f"seed 0); {os.cpu_count()} CPUs")
        print(f"{'step':<66} {'rc':>3} {'wall s':>8} {'peak RSS GB':>12} {'RSS/ckpt':>9}")
        rows = {}

        def step(key, label, argv, step_env=env):
            rc, wall, peak, last = run_measured(argv, env=step_env)
            rows[key] = (rc, wall, peak)
            print(f"{label:<66} {rc:>3} {wall:>8.1f} {peak / 1e9:>12.2f} {peak / ckpt:>8.2f}x", flush=True)
            if rc != 0:
                print(f"    failed: {last[:200]}", flush=True)

        cvt = [python, "-m", "cvt_cli", "convert"]
        step("ours_pt_tf", "ours: cvt convert torch -> hf-tf (with cross-check)",
             cvt + [src, os.path.join(work, "ours-tf"), "--to", "hf-tf", "--quiet"])
        step("ours_tf_pt", "ours: cvt convert hf-tf -> torch (with cross-check)",
             cvt + [os.path.join(work, "ours-tf"), os.path.join(work, "ours-back"), "--to", "torch", "--quiet"])
        step("ours_pt_tf_nc", "ours: cvt convert torch -> hf-tf --no-check",
             cvt + [src, os.path.join(work, "ours-tf-nc"), "--to", "hf-tf", "--quiet", "--no-check"])
        step("ours_tf_pt_nc", "ours: cvt convert hf-tf -> torch --no-check",
             cvt + [os.path.join(work, "ours-tf-nc"), os.path.join(work, "ours-back-nc"), "--to", "torch", "--quiet",
                    "--no-check"])
        if not args.skip_transformers:
            tf_env = dict(env, TF_USE_LEGACY_KERAS="1")
            step("hf_pt_tf", "transformers: TFCvt...from_pretrained(from_pt=True) + save_pretrained",
                 [python, "-c", _TRANSFORMERS_PT_TO_TF, src, os.path.join(work, "hf-tf")], tf_env)
            step("hf_tf_pt", "transformers: Cvt...from_pretrained(from_tf=True) + save_pretrained",
                 [python, "-c", _TRANSFORMERS_TF_TO_PT, os.path.join(work, "hf-tf"), os.path.join(work, "hf-back")], tf_env)

        print()
        round_trip = rows["ours_pt_tf"][1] + rows["ours_tf_pt"][1]
        round_trip_nc = rows["ours_pt_tf_nc"][1] + rows["ours_tf_pt_nc"][1]
        peak = max(rows["ours_pt_tf"][2], rows["ours_tf_pt"][2])
        print(f"ours, torch -> hf-tf -> torch: {round_trip:.1f} s with cross-checks ({round_trip_nc:.1f} s without), "
              f"peak {peak / 1e9:.2f} GB = {peak / ckpt:.2f}x the checkpoint (target <= 2.5x: "
              f"{'met' if peak <= 2.5 * ckpt else 'MISSED'})")
        if "hf_pt_tf" in rows and rows["hf_pt_tf"][0] == 0:
            hf_rc, hf_wall, hf_peak = rows["hf_pt_tf"]
            ours_rc, ours_wall, ours_peak = rows["ours_pt_tf"]
            print(f"torch -> hf-tf, ours / transformers: time {ours_wall / hf_wall:.2f} (with our cross-check), "
                  f"{rows['ours_pt_tf_nc'][1] / hf_wall:.2f} (without); peak memory {ours_peak / hf_peak:.2f} "
                  f"(target: faster than transformers: {'met' if ours_wall < hf_wall else 'MISSED'})")
            if rows["hf_tf_pt"][0] != 0:
                print("hf-tf -> torch: transformers' from_pretrained(from_tf=True) fails (defect B11), so there is "
                      "no transformers time to compare the way back with")
        return 0
    finally:
        if args.keep:
            print(f"checkpoints kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
