"""Where the Keras CvT-13 spends its inference time: TensorFlow's profiler, summed by op type.

    python -m benchmarks.profile_keras                          # mixed_bfloat16, batch 8, 224x224
    python -m benchmarks.profile_keras --policy float32 --batch 1

Builds `cvt_tf.TFCvtForImageClassification` (CvT-13, random weights) under the given Keras dtype policy, warms
`predict_on_batch` up, traces a few calls with `tf.profiler` and prints, per TensorFlow op type, the summed kernel
time per call, its share, and the count; then the weight casts of the mixed-precision policy, and what the matmuls
achieve against `tf.matmul`'s rate on this machine. The profiler adds overhead of its own, so read shares, not
absolute times. TensorFlow runs independent ops concurrently (inter-op threads), so op times can add up to more than
the wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="mixed_bfloat16", choices=["float32", "mixed_bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3, help="profiled calls (default 3)")
    args = parser.parse_args(argv)

    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks.implementations import tf_matmul_rate
    from benchmarks.profiles import tf_kernel_events
    from cvt_core.config import CvtConfig
    from cvt_core.macs import cvt_macs
    from cvt_tf import TFCvtForImageClassification

    keras.mixed_precision.set_global_policy(args.policy)
    config = CvtConfig.from_preset("cvt-13", num_labels=1000)
    model = TFCvtForImageClassification(config, data_format="channels_first")
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    for _ in range(4):
        model.predict_on_batch(pixels)
    start = time.perf_counter()
    for _ in range(args.calls):
        model.predict_on_batch(pixels)
    unprofiled = (time.perf_counter() - start) / args.calls

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        for _ in range(args.calls):
            model.predict_on_batch(pixels)
        profiled = (time.perf_counter() - start) / args.calls
        tf.profiler.experimental.stop()
        files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        if not files:
            print("the profiler wrote no trace", file=sys.stderr)
            return 1
        events = list(tf_kernel_events(files[0]))

    by_type, counts, casts = collections.Counter(), collections.Counter(), collections.Counter()
    for op_type, name, seconds in events:
        by_type[op_type] += seconds / args.calls
        counts[op_type] += 1 / args.calls
        if op_type == "Cast":
            # weight casts sit under the Dense layers' `Cast/Cast` scope; the rest are activation casts
            casts["weights" if re.search(r"/Cast/Cast(:|$)", name) else "activations"] += seconds / args.calls
    total = sum(by_type.values())
    print(f"CvT-13, {args.policy}, batch {args.batch}: {unprofiled * 1000:.1f} ms per predict_on_batch "
          f"({args.batch / unprofiled:.1f} img/s; {profiled * 1000:.1f} ms while profiled); kernel time per call "
          f"{total * 1000:.1f} ms")
    print(f"{'op type':<40s} {'ms/call':>8s} {'share':>6s} {'count':>6s}")
    for op_type, seconds in by_type.most_common():
        if seconds * 1000 < 0.05:
            continue
        print(f"{op_type:<40s} {seconds * 1000:8.2f} {100 * seconds / total:5.1f}% {counts[op_type]:6.0f}")
    if casts:
        print(f"Cast: weights {casts['weights'] * 1000:.2f} ms, activations {casts['activations'] * 1000:.2f} ms")
    macs = cvt_macs(config)
    matmul_flop = 2 * args.batch * (macs["qkv_linear"] + macs["out_proj"] + macs["mlp"] + macs["head"])
    matmul_s = sum(s for t, s in by_type.items() if "MatMul" in t and "Batch" not in t)
    rate = tf_matmul_rate(tf.bfloat16 if args.policy == "mixed_bfloat16" else tf.float32)
    if matmul_s:
        print(f"Dense matmuls: {matmul_flop / 1e9:.1f} GFLOP in {matmul_s * 1000:.1f} ms = "
              f"{matmul_flop / matmul_s / 1e9:.0f} GFLOP/s; tf.matmul 2048^2 here: {rate:.0f} GFLOP/s. "
              f"With every other op free and the matmuls at that rate: {args.batch / (matmul_flop / rate / 1e9):.0f} "
              f"img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
