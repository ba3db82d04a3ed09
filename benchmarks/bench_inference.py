"""CvT-13 side by side: transformers 4.57.6 against this library, PyTorch and Keras/TF, in one run.

    python -m benchmarks.bench_inference            # full run (about 10-15 minutes on a 2-core CPU)
    python -m benchmarks.bench_inference --quick    # smoke run (batch 8 only, few repetitions)

Every implementation runs in its own worker process with the same random CvT-13 weights (transformers' PyTorch
classifier with every weight and BatchNorm statistic randomised, saved once and loaded by all four):

    hf-pt            transformers.CvtForImageClassification (PyTorch, eager, torch.no_grad)
    ours-pt          cvt_torch.CvtForImageClassification (PyTorch, eager, torch.no_grad)
    hf-tf            transformers.TFCvtForImageClassification (tf_keras, call wrapped in tf.function);
                     needs TF_USE_LEGACY_KERAS=1, so it never shares a process with Keras 3
    ours-keras       cvt_tf.TFCvtForImageClassification (Keras 3), `predict_on_batch` as Keras users call it
    *-bf16           the same under the mixed_bfloat16 policy (TF processes: the policy is process-global)

The parent process only orchestrates: for each configuration it prepares (and warms up) every candidate, then
runs repetitions in rotating order, so all candidates of a row see the same machine load, and reports medians.
It prints a table of ratios with the targets of the speed issue, and writes `results.json` and `results.png` to
--out (default benchmarks/results/). Logits of every candidate are compared with the reference on the same
input, so a speed-up that changed the numbers would show. A last section runs ~100 real photos (scikit-image
samples, augmented) through the float32 and bfloat16 models and reports top-1 agreement and logit margins.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from conversion.random_weights import randomize_torch_model_

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

IMAGE_SIZE = 224
NUM_LABELS = 1000
WORKER_KINDS = ("hf-pt", "ours-pt", "hf-tf", "hf-tf-bf16", "ours-keras", "ours-keras-bf16")
LABELS = {
    "hf-pt": "transformers PyTorch", "ours-pt": "ours PyTorch", "hf-tf": "transformers TF",
    "hf-tf-bf16": "transformers TF (mixed_bfloat16)", "ours-keras": "ours Keras",
    "ours-keras-bf16": "ours Keras (mixed_bfloat16)",
}


# ============================================================================================== FLOPs
def cvt_macs(config, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> Dict[str, int]:
    """Multiply-accumulates of one image through CvT (analytic, from the config), by kind of operation.

    Counts every matmul and convolution (projections, attention scores and context, MLP, conv embeddings,
    depthwise q/k/v convolutions, classifier); normalisations and activations are not counted. CvT-13 at 224 gives
    4.57 GMAC, the paper's figure."""
    from cvt_core.shapes import stage_geometry

    macs = {"embedding": 0, "qkv_conv": 0, "qkv_linear": 0, "attention": 0, "out_proj": 0, "mlp": 0, "head": 0}
    in_ch = config.num_channels
    for geo in stage_geometry(config, height, width):
        s = geo.stage
        dim, k = config.embed_dim[s], config.patch_sizes[s]
        grid = geo.height * geo.width
        macs["embedding"] += grid * dim * in_ch * k * k
        tq, tk = geo.num_query_tokens, geo.num_key_tokens
        kq = config.kernel_qkv[s]
        conv_q = geo.query_height * geo.query_width * dim * kq * kq
        conv_kv = geo.key_height * geo.key_width * dim * kq * kq
        method = config.qkv_projection_method[s]
        hidden = config.mlp_hidden_dim(s)
        tokens = geo.num_tokens
        per_layer = {
            "qkv_conv": (conv_q + 2 * conv_kv) if method == "dw_bn" else 0,
            "qkv_linear": tq * dim * dim + 2 * tk * dim * dim,
            "attention": 2 * tq * tk * dim,
            "out_proj": tq * dim * dim,
            "mlp": 2 * tokens * dim * hidden,
        }
        for key, value in per_layer.items():
            macs[key] += value * config.depth[s]
        in_ch = dim
    macs["head"] = config.hidden_size * max(config.num_labels, 0)
    macs["total"] = sum(macs.values())
    return macs


# ============================================================================================== weights
def make_checkpoint(directory: str, seed: int = 0) -> None:
    """transformers' CvT-13 classifier with randomised weights, saved with save_pretrained (safetensors)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.CvtConfig(num_labels=NUM_LABELS, image_size=IMAGE_SIZE)  # the cvt-13 defaults
    model = transformers.CvtForImageClassification(config).eval()
    randomize_torch_model_(model, seed)
    model.save_pretrained(directory, safe_serialization=True)


def make_inputs(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed + batch)
    pixels = rng.standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    labels = rng.integers(0, NUM_LABELS, size=(batch,)).astype(np.int64)
    return pixels, labels


# ============================================================================================== real photos
def photo_views(max_views: int, seed: int = 0):
    """~`max_views` views of the scikit-image sample photos: the photo itself, its mirror image and random crops
    (60-100% of each side), preprocessed by cvt_core.CvtImageProcessor. Returns (pixels, source photo index,
    names); the first view of every photo is the photo itself."""
    import skimage.data
    from PIL import Image

    from cvt_core import CvtImageProcessor

    names = ["astronaut", "chelsea", "coffee", "rocket", "cat", "camera", "coins", "moon", "page", "clock",
             "hubble_deep_field", "immunohistochemistry", "brick", "grass", "gravel", "text", "horse", "logo",
             "colorwheel", "retina", "eagle", "motorcycle"]
    photos, used = [], []
    for name in names:
        try:
            if name == "motorcycle":
                image = skimage.data.stereo_motorcycle()[0]
            else:
                image = getattr(skimage.data, name)()
        except Exception:  # not bundled with this scikit-image and no network: skip it
            continue
        image = np.asarray(image)
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.dtype != np.uint8:
            image = (255 * (image - image.min()) / max(1e-9, float(image.max() - image.min()))).astype(np.uint8)
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        photos.append(Image.fromarray(image[..., :3]).convert("RGB"))
        used.append(name)
    rng = np.random.default_rng(seed)
    photos, used = photos[:max(1, max_views // 2)], used[:max(1, max_views // 2)]  # at least 2 views per photo
    per_photo = max(2, -(-max_views // max(1, len(photos))))
    views, sources = [], []
    for index, photo in enumerate(photos):
        width, height = photo.size
        for v in range(per_photo):
            if v == 0:
                view = photo
            elif v == 1:
                view = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            else:
                fw, fh = rng.uniform(0.6, 1.0, size=2)
                cw, ch = max(32, int(width * fw)), max(32, int(height * fh))
                x0, y0 = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
                view = photo.crop((x0, y0, x0 + cw, y0 + ch))
                if rng.random() < 0.5:
                    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            views.append(view)
            sources.append(index)
    pixels = CvtImageProcessor()(views, return_tensors="np")["pixel_values"].astype(np.float32)
    return pixels, np.asarray(sources), used


def agreement_stats(reference: np.ndarray, candidate: np.ndarray, sources: np.ndarray) -> Dict[str, float]:
    """Top-1 agreement of `candidate` logits with the float32 `reference`, on the random 1000-class head and on a
    retrieval head (cosine similarity of each view's logits to the float32 logits of every source photo, whose
    classes are the photos), with the margins that decide how robust that agreement is."""
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    top2 = np.sort(reference, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    error = np.abs(candidate - reference).max(axis=1)
    first = np.array([np.flatnonzero(sources == s)[0] for s in range(sources.max() + 1)])

    def retrieval(logits):
        unit = logits / np.linalg.norm(logits, axis=1, keepdims=True)
        protos = reference[first] / np.linalg.norm(reference[first], axis=1, keepdims=True)
        return unit @ protos.T

    ref_ret, cand_ret = retrieval(reference), retrieval(candidate)
    ret_sorted = np.sort(ref_ret, axis=1)
    return {
        "images": int(len(reference)),
        "top1_agreement": float(np.mean(reference.argmax(1) == candidate.argmax(1))),
        "fp32_margin_median": float(np.median(margin)),
        "fp32_margin_p10": float(np.percentile(margin, 10)),
        "max_abs_logit_diff_median": float(np.median(error)),
        "max_abs_logit_diff_max": float(error.max()),
        "decisive_fraction": float(np.mean(margin > 2 * error)),
        "retrieval_top1_agreement": float(np.mean(ref_ret.argmax(1) == cand_ret.argmax(1))),
        "retrieval_accuracy_fp32": float(np.mean(ref_ret.argmax(1) == sources)),
        "retrieval_accuracy_candidate": float(np.mean(cand_ret.argmax(1) == sources)),
        "retrieval_margin_median": float(np.median(ret_sorted[:, -1] - ret_sorted[:, -2])),
    }


# ============================================================================================== workers
def _peak_rss_mb() -> Dict[str, float]:
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


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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


def _best_rate(fn, flops: float, repeats: int = 7) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


class TorchImpl:
    def __init__(self, kind: str, checkpoint: str, threads: Optional[int]):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        if kind == "hf-pt":
            import transformers

            self.model = transformers.CvtForImageClassification.from_pretrained(checkpoint).eval()
        else:
            from cvt_torch import CvtForImageClassification

            self.model = CvtForImageClassification.from_pretrained(checkpoint).eval()
        self.kind = kind
        self._bf16 = None
        self.threads = torch.get_num_threads()

    def _bf16_model(self):
        if self._bf16 is None:
            self._bf16 = copy.deepcopy(self.model).to(self.torch.bfloat16)
        return self._bf16

    def release(self):
        self._bf16 = None

    def make(self, variant: str, batch: int):
        torch = self.torch
        pixels, labels = make_inputs(batch)
        x, y = torch.from_numpy(pixels), torch.from_numpy(labels)
        model = self.model
        if variant == "fp32":
            def run():
                with torch.no_grad():
                    return model(x).logits
        elif variant == "bf16":
            bf16, xb = self._bf16_model(), x.to(torch.bfloat16)

            def run():
                with torch.no_grad():
                    return bf16(xb).logits
        elif variant == "autocast":
            def run():
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(x).logits
        elif variant == "train":
            trained = copy.deepcopy(model).train()
            optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4, weight_decay=0.01)

            def run():
                optimizer.zero_grad(set_to_none=True)
                loss = trained(x, labels=y).loss
                loss.backward()
                optimizer.step()
                return loss
        else:
            raise ValueError(f"unknown variant {variant}")
        return run

    def logits(self, variant: str, pixels: np.ndarray, chunk: int = 16) -> np.ndarray:
        torch = self.torch
        out = []
        for start in range(0, len(pixels), chunk):
            x = torch.from_numpy(pixels[start:start + chunk])
            with torch.no_grad():
                if variant == "bf16":
                    logits = self._bf16_model()(x.to(torch.bfloat16)).logits
                elif variant == "autocast":
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        logits = self.model(x).logits
                else:
                    logits = self.model(x).logits
            out.append(logits.float().numpy())
        return np.concatenate(out)

    def to_numpy(self, value) -> np.ndarray:
        return value.detach().float().numpy()

    def matmul_rates(self) -> Dict[str, float]:
        torch = self.torch
        n = 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        rates = {"torch.matmul fp32 (MKL sgemm)": _best_rate(lambda: torch.matmul(a, b), 2 * n ** 3)}
        try:
            op = torch.ops.mkldnn._linear_pointwise
            bt = b.t().contiguous()
            rates["oneDNN fp32 matmul"] = _best_rate(lambda: op(a, bt, None, "none", [], ""), 2 * n ** 3)
        except Exception:
            pass
        ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)
        rates["torch.matmul bf16 (oneDNN)"] = _best_rate(lambda: torch.matmul(ab, bb), 2 * n ** 3)
        return rates


class TFImpl:
    def __init__(self, kind: str, checkpoint: str, threads: Optional[int]):
        import tensorflow as tf

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        self.tf = tf
        self.kind = kind
        self.bf16 = kind.endswith("-bf16")
        if kind.startswith("hf-tf"):
            import tf_keras
            import transformers

            self.keras = tf_keras
            if self.bf16:
                tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
            self.model = transformers.TFCvtForImageClassification.from_pretrained(checkpoint, from_pt=True)
            model = self.model
            self._call = tf.function(lambda x: model(x, training=False).logits, reduce_retracing=True)
        else:
            import keras

            from cvt_tf import TFCvtForImageClassification

            self.keras = keras
            if self.bf16:
                keras.mixed_precision.set_global_policy("mixed_bfloat16")
            self.model = TFCvtForImageClassification.from_pretrained(checkpoint)
            self._call = self.model.predict_on_batch  # what Keras users call for a batch
        self.threads = tf.config.threading.get_intra_op_parallelism_threads() or "default"
        self._compiled = False
        self._saved_weights = None

    def release(self):
        if self._saved_weights is not None:  # undo the training steps: later rows must see the original weights
            self.model.set_weights(self._saved_weights)
            self._saved_weights = None

    def _infer(self, pixels: np.ndarray):
        if self.kind.startswith("hf-tf"):
            return self._call(self.tf.constant(pixels))
        return self._call(pixels)

    def make(self, variant: str, batch: int):
        pixels, labels = make_inputs(batch)
        if variant in ("fp32", "bf16"):
            return lambda: self._infer(pixels)
        if variant == "train":
            if self._saved_weights is None:
                self._saved_weights = self.model.get_weights()
            if not self._compiled:
                optimizer = self.keras.optimizers.AdamW(learning_rate=1e-4, weight_decay=0.01)
                self.model.compile(optimizer=optimizer)  # both models compute their own loss from the labels
                self._compiled = True
            model = self.model
            return lambda: model.train_on_batch(pixels, labels)
        raise ValueError(f"unknown variant {variant}")

    def logits(self, variant: str, pixels: np.ndarray, chunk: int = 16) -> np.ndarray:
        out = []
        for start in range(0, len(pixels), chunk):
            out.append(self.to_numpy(self._infer(pixels[start:start + chunk])))
        return np.concatenate(out)

    def to_numpy(self, value) -> np.ndarray:
        if isinstance(value, (list, tuple)):
            value = value[0]
        if hasattr(value, "logits"):
            value = value.logits
        if isinstance(value, dict):
            value = value.get("logits", next(iter(value.values())))
        value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        return np.asarray(value, dtype=np.float32)

    def matmul_rates(self) -> Dict[str, float]:
        tf = self.tf
        n = 2048
        a, b = tf.random.normal((n, n)), tf.random.normal((n, n))
        ab, bb = tf.cast(a, tf.bfloat16), tf.cast(b, tf.bfloat16)
        return {"tf.matmul fp32": _best_rate(lambda: tf.matmul(a, b).numpy(), 2 * n ** 3),
                "tf.matmul bf16": _best_rate(lambda: tf.matmul(ab, bb).numpy(), 2 * n ** 3)}


def worker_main(kind: str, checkpoint: str, threads: Optional[int], workdir: str) -> None:
    """Serve the parent's requests, one JSON object per line on stdin/stdout. Anything else the libraries print
    goes to stderr (the worker's log file)."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj):
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    try:
        start = time.perf_counter()
        impl = TorchImpl(kind, checkpoint, threads) if kind.endswith("-pt") else TFImpl(kind, checkpoint, threads)
        reply({"ready": True, "load_s": time.perf_counter() - start, "threads": impl.threads,
               **_peak_rss_mb()})
    except Exception as exc:  # e.g. the Keras model is not importable yet
        reply({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]})
        return
    prepared: Dict[str, Any] = {}
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request["cmd"]
        try:
            if cmd == "quit":
                reply({"ok": True})
                break
            if cmd == "prepare":
                key = f"{request['variant']}/{request['batch']}"
                run = impl.make(request["variant"], request["batch"])
                times, value = [], None
                for _ in range(request.get("warmup", 2)):
                    start = time.perf_counter()
                    value = run()
                    times.append(time.perf_counter() - start)
                prepared[key] = run
                result = {"ok": True, "warmup_s": times}
                if request["variant"] != "train":
                    path = os.path.join(workdir, f"{kind}-{key.replace('/', '-')}.npy")
                    np.save(path, impl.to_numpy(value))
                    result["logits"] = path
                else:
                    result["loss"] = float(np.asarray(impl.to_numpy(value)).ravel()[0])
                reply(result)
            elif cmd == "time":
                run = prepared[request["key"]]
                for _ in range(request.get("untimed", 0)):
                    run()
                times = []
                for _ in range(request["n"]):
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                reply({"ok": True, "times": times})
            elif cmd == "release":
                prepared.clear()
                impl.release()
                gc.collect()
                reply({"ok": True})
            elif cmd == "reset_peak":
                gc.collect()
                reply({"ok": _reset_peak_rss(), **_peak_rss_mb()})
            elif cmd == "memory":
                reply({"ok": True, **_peak_rss_mb()})
            elif cmd == "matmul":
                reply({"ok": True, "rates": impl.matmul_rates()})
            elif cmd == "logits":
                pixels = np.load(request["pixels"])
                path = os.path.join(workdir, f"{kind}-{request['variant']}-photos.npy")
                np.save(path, impl.logits(request["variant"], pixels))
                reply({"ok": True, "logits": path})
            else:
                reply({"error": f"unknown command {cmd}"})
        except Exception as exc:
            reply({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]})


class Worker:
    """A worker process seen from the parent."""

    def __init__(self, kind: str, checkpoint: str, threads: Optional[int], workdir: str, log_dir: str,
                 omp_passive: bool = False):
        env = dict(os.environ)
        if omp_passive:
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        if kind.startswith("hf-tf"):
            env["TF_USE_LEGACY_KERAS"] = "1"  # transformers' TF classes need Keras 2 (tf_keras)
        else:
            env.pop("TF_USE_LEGACY_KERAS", None)
            env.setdefault("KERAS_BACKEND", "tensorflow")
        self.kind = kind
        self.log_path = os.path.join(log_dir, f"worker-{kind}.log")
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "benchmarks.bench_inference", "--worker", kind, "--checkpoint", checkpoint,
               "--workdir", workdir]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1)
        self.info: Dict[str, Any] = {}
        self.error: Optional[str] = None

    def read(self, timeout: float) -> Dict[str, Any]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"{self.kind}: no answer in {timeout:.0f} s (log: {self.log_path})")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind}: worker exited (log: {self.log_path})")
        return json.loads(line)

    def wait_ready(self, timeout: float = 900) -> None:
        try:
            self.info = self.read(timeout)
        except Exception as exc:
            self.info = {"error": str(exc)}
        if "error" in self.info:
            self.error = self.info["error"].splitlines()[0][:300]

    def send(self, **request) -> bool:
        if self.error:
            return False
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            return True
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return False

    def call(self, timeout: float = 1800, **request) -> Dict[str, Any]:
        if not self.send(**request):
            return {"error": self.error}
        try:
            return self.read(timeout)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return {"error": self.error}

    def close(self, wait: bool = True) -> None:
        """Ask the worker to quit; with `wait`, wait for it (killing it after a minute) and close its log."""
        if self.proc.poll() is None and not getattr(self, "_quitting", False):
            self._quitting = True
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
            except Exception:
                pass
        if wait:
            try:
                self.proc.wait(timeout=60)
            except Exception:
                self.proc.kill()
            self._log.close()


# ============================================================================================== runs
class Candidate:
    def __init__(self, worker: Worker, variant: str, batch: int, name: str):
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
    queues: Dict[Worker, List[Candidate]] = {}
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
    if not reference.logits or not candidate.logits:
        return None
    a, b = np.load(reference.logits).astype(np.float64), np.load(candidate.logits).astype(np.float64)
    scale = max(1.0, float(np.abs(a).max()))
    return {"max_abs_diff": float(np.abs(a - b).max()), "relative_to_max_logit": float(np.abs(a - b).max() / scale),
            "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1)))}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8 only, 3 repetitions, fewer photos")
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
    parser.add_argument("--frameworks", default="pt,tf", help="pt, tf or pt,tf (default both)")
    parser.add_argument("--omp-wait-policy", choices=("auto", "default", "passive"), default="auto",
                        help="OpenMP threads of the workers: 'default' spins at barriers (the libraries' default), "
                             "'passive' sleeps; 'auto' (default) picks passive when other processes keep more than 0.4 "
                             "cores busy at the start, where spinning threads steal the core their preempted partner "
                             "needs")
    parser.add_argument("--photos", type=int, default=None, help="real-photo views for bf16 agreement (default 96)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"), help="output folder")
    parser.add_argument("--worker", choices=WORKER_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
        from cvt_core import CvtConfig

        config = CvtConfig.from_pretrained(checkpoint)
        macs = cvt_macs(config)
        gflop_per_image = 2 * macs["total"] / 1e9
        log(f"CvT-13 at {IMAGE_SIZE}: {macs['total'] / 1e9:.3f} GMAC = {gflop_per_image:.2f} GFLOP per image")

        kinds = []
        if "pt" in frameworks:
            kinds += ["hf-pt", "ours-pt"]
        if "tf" in frameworks:
            kinds += ["hf-tf", "ours-keras", "hf-tf-bf16", "ours-keras-bf16"]
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
        for name, rate in rates.items():
            log(f"matmul rate, {name}: {rate:.0f} GFLOP/s")

        rows: List[Dict[str, Any]] = []
        memory: Dict[str, Dict[str, Any]] = {}

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
            for kind in involved:
                reply = workers[kind].call(cmd="memory")
                memory.setdefault(kind, {})[f"{section}/{batch}"] = reply.get("peak_rss_mb")
                workers[kind].call(cmd="release")
            by_name = {c.name: c for c in cands}
            ref = by_name.get(reference)
            for cand in cands:
                flops = gflop_per_image * (3 if cand.variant == "train" else 1)
                rows.append({
                    "section": section, "batch": batch, "candidate": cand.name, "worker": cand.worker.kind,
                    "variant": cand.variant, "error": cand.error, "median_s": cand.median,
                    "images_per_s": cand.images_per_s, "times_s": cand.times, "loss": cand.loss,
                    "best_images_per_s": batch / min(cand.times) if cand.times else None,
                    "gflops_per_s": cand.images_per_s * flops if cand.images_per_s else None,
                    "vs_reference": compare_logits(ref, cand) if ref is not None and cand is not ref else None,
                    "reference": reference,
                })

        if "pt" in frameworks:
            for batch in batches:
                group("PyTorch fp32 inference", "pt-fp32", batch, [("hf-pt", "fp32"), ("ours-pt", "fp32")],
                      "hf-pt:fp32")
            for batch in batches:
                group("PyTorch bf16 inference", "pt-bf16", batch,
                      [("hf-pt", "fp32"), ("hf-pt", "bf16"), ("hf-pt", "autocast"), ("ours-pt", "bf16"),
                       ("ours-pt", "autocast")], "hf-pt:fp32")
        if "tf" in frameworks:
            # at batch 8 transformers' PyTorch fp32 runs in the same rounds: the cross-framework targets' reference
            cross = [("hf-pt", "fp32")] if "hf-pt" in workers else []
            for batch in batches:
                group("Keras/TF fp32 inference", "tf-fp32", batch,
                      [("hf-tf", "fp32"), ("ours-keras", "fp32")] + (cross if batch == 8 else []), "hf-tf:fp32")
            for batch in batches:
                group("Keras/TF bf16 inference (mixed_bfloat16)", "tf-bf16", batch,
                      [("hf-tf", "fp32"), ("hf-tf-bf16", "bf16"), ("ours-keras-bf16", "bf16")]
                      + (cross if batch == 8 else []), "hf-tf:fp32")

        # real photos before the training rows (a TF training step changes the model in place until released)
        agreement = photo_agreement(workers, num_photos, workdir, log) if num_photos > 0 else {}
        if "pt" in frameworks:
            group("PyTorch training step (forward, backward, AdamW)", "pt-train", train_batch,
                  [("hf-pt", "train"), ("ours-pt", "train")], "hf-pt:train")
        if "tf" in frameworks:
            group("Keras/TF training step (forward, backward, AdamW)", "tf-train", train_batch,
                  [("hf-tf", "train"), ("ours-keras", "train")], "hf-tf:train")
        result = summarise(rows, memory, rates, macs, gflop_per_image, agreement, workers, batches, train_batch, args)
        result["wall_s"] = time.perf_counter() - started
        result["load_average_start"], result["load_average_end"] = list(load_start), list(os.getloadavg())
        result["cores_busy_before_start"] = busy_cores
        result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY") or ("PASSIVE" if omp_passive else "default")
        with open(out_dir / "results.json", "w") as f:
            json.dump(result, f, indent=2)
        print_table(result)
        try:
            plot(result, out_dir / "results.png")
        except Exception as exc:  # matplotlib missing: the JSON and the table are the result
            log(f"no chart: {exc}")
        log(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.png'}")
    finally:
        for worker in workers.values():  # all of them at once: TF processes take a while to exit
            worker.close(wait=False)
        for worker in workers.values():
            worker.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def photo_agreement(workers: Dict[str, Worker], num_photos: int, workdir: str, log) -> Dict[str, Any]:
    """Real photos through the float32 and bfloat16 models of each implementation."""
    try:
        pixels, sources, names = photo_views(num_photos)
    except Exception as exc:
        log(f"no real-photo check: {exc}")
        return {"error": str(exc)}
    path = os.path.join(workdir, "photos.npy")
    np.save(path, pixels)
    log(f"bf16 agreement on {len(pixels)} views of {len(names)} scikit-image photos")
    pairs = [("hf-pt", "fp32", "hf-pt", "bf16"), ("hf-pt", "fp32", "hf-pt", "autocast"),
             ("ours-pt", "fp32", "ours-pt", "bf16"), ("ours-pt", "fp32", "ours-pt", "autocast"),
             ("hf-tf", "fp32", "hf-tf-bf16", "bf16"), ("ours-keras", "fp32", "ours-keras-bf16", "bf16")]
    cache: Dict[str, Optional[np.ndarray]] = {}

    def logits(kind, variant):
        key = f"{kind}:{variant}"
        if key not in cache:
            cache[key] = None
            if kind in workers and not workers[kind].error:
                reply = workers[kind].call(cmd="logits", variant=variant, pixels=path)
                if "logits" in reply:
                    cache[key] = np.load(reply["logits"])
                workers[kind].call(cmd="release")
        return cache[key]

    out: Dict[str, Any] = {"photos": names, "views": int(len(pixels))}
    for ref_kind, ref_variant, kind, variant in pairs:
        ref, cand = logits(ref_kind, ref_variant), logits(kind, variant)
        if ref is None or cand is None:
            continue
        stats = agreement_stats(ref, cand, sources)
        out[f"{kind}:{variant}"] = stats
        log(f"    {kind}:{variant:<9s} top-1 agreement {stats['top1_agreement'] * 100:5.1f}% (retrieval head "
            f"{stats['retrieval_top1_agreement'] * 100:5.1f}%), max |dlogit| median "
            f"{stats['max_abs_logit_diff_median']:.3f}, fp32 top-1 margin median {stats['fp32_margin_median']:.3f}")
    return out


# ============================================================================================== summary
TARGETS = [
    # (id, description, section, batch, ours, reference, minimum ratio)
    ("pt-fp32-b8", "PyTorch fp32 inference, batch 8", "pt-fp32", 8, "ours-pt:fp32", "hf-pt:fp32", 1.5),
    ("pt-fp32-b1", "PyTorch fp32 latency, batch 1 (no worse)", "pt-fp32", 1, "ours-pt:fp32", "hf-pt:fp32", 1.0),
    ("pt-bf16-b8", "PyTorch bf16 (model.to(bfloat16)) vs transformers fp32, batch 8", "pt-bf16", 8, "ours-pt:bf16",
     "hf-pt:fp32", 3.0),
    ("pt-autocast-b8", "PyTorch bf16 (autocast) vs transformers fp32, batch 8", "pt-bf16", 8, "ours-pt:autocast",
     "hf-pt:fp32", 3.0),
    ("pt-train", "PyTorch training step", "pt-train", None, "ours-pt:train", "hf-pt:train", 1.3),
    ("tf-fp32-b8", "Keras/TF fp32 inference, batch 8", "tf-fp32", 8, "ours-keras:fp32", "hf-tf:fp32", 2.5),
    ("tf-fp32-b8-vs-pt", "Keras fp32 vs transformers PyTorch fp32, batch 8", "tf-fp32", 8,
     "ours-keras:fp32", "hf-pt:fp32", 1.0),
    ("tf-fp32-b1", "Keras/TF fp32 latency, batch 1 (no worse)", "tf-fp32", 1, "ours-keras:fp32", "hf-tf:fp32", 1.0),
    ("tf-bf16-b8", "Keras bf16 (mixed_bfloat16) vs transformers PyTorch fp32, batch 8", "tf-bf16", 8,
     "ours-keras-bf16:bf16", "hf-pt:fp32", 3.0),
    ("tf-train", "Keras training step", "tf-train", None, "ours-keras:train", "hf-tf:train", 2.0),
]


# bf16 top-1 agreement with fp32 on real photos, >= 99%: (id, description, ours, transformers' counterpart).
# Judged on the retrieval head, whose classes (the photos) mean something with random weights; the random
# 1000-class head's agreement is reported beside it, with transformers' figure in the same precision for scale.
AGREEMENT_TARGETS = [
    ("pt-bf16-agreement", "PyTorch model.to(bfloat16) top-1 agreement with fp32", "ours-pt:bf16", "hf-pt:bf16"),
    ("pt-autocast-agreement", "PyTorch autocast top-1 agreement with fp32", "ours-pt:autocast", "hf-pt:autocast"),
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


def summarise(rows, memory, rates, macs, gflop_per_image, agreement, workers, batches, train_batch,
              args) -> Dict[str, Any]:
    fp32_peaks = {k: v for k, v in rates.items() if "fp32" in k}
    bf16_peaks = {k: v for k, v in rates.items() if "bf16" in k}
    peak32 = max(fp32_peaks.values()) if fp32_peaks else None
    peak16 = max(bf16_peaks.values()) if bf16_peaks else None
    mkl = rates.get("torch.matmul fp32 (MKL sgemm)")
    for row in rows:
        g = row.get("gflops_per_s")
        peak = peak16 if row["variant"] in ("bf16", "autocast") else peak32
        row["percent_of_best_matmul"] = 100 * g / peak if g and peak else None
        row["percent_of_torch_matmul_fp32"] = 100 * g / mkl if g and mkl else None
    targets = []
    for tid, text, section, batch, ours, ref, minimum in TARGETS:
        ours_section, ref_section = (section if isinstance(section, tuple) else (section, section))
        o, r = _find(rows, ours_section, batch, ours), _find(rows, ref_section, batch, ref)
        ratio = paired = None
        if o and r and o["images_per_s"] and r["images_per_s"]:
            ratio = o["images_per_s"] / r["images_per_s"]
            if ours_section == ref_section and len(o["times_s"]) == len(r["times_s"]):
                # the same rounds, run back to back: robust to load that drifts between rounds
                paired = float(np.median(np.asarray(r["times_s"]) / np.asarray(o["times_s"])))
        status = "n/a" if ratio is None else ("PASS" if ratio >= minimum else "FAIL")
        targets.append({"id": tid, "target": text, "ours": ours, "reference": ref, "ratio": ratio,
                        "paired_ratio": paired, "minimum": minimum, "status": status,
                        "note": (o or {}).get("error") or (r or {}).get("error")})
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
    versions = {}
    for name in ("torch", "transformers", "tensorflow", "keras", "tf_keras"):
        try:
            import importlib.metadata as md

            versions[name] = md.version(name if name != "tf_keras" else "tf-keras")
        except Exception:
            pass
    return {
        "machine": machine, "versions": versions, "matmul_gflops": rates, "best_fp32_matmul_gflops": peak32,
        "best_bf16_matmul_gflops": peak16, "gmac_per_image": macs["total"] / 1e9, "macs_by_kind": macs,
        "gflop_per_image": gflop_per_image, "batches": batches, "train_batch": train_batch,
        "workers": {k: {"threads": w.info.get("threads"), "error": w.error, "load_s": w.info.get("load_s")}
                    for k, w in workers.items()},
        "rows": rows, "targets": targets, "peak_rss_mb": memory, "bf16_agreement": agreement,
        "agreement_targets": agreement_targets(agreement or {}),
        "quick": bool(args.quick),
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
          "bf16 rows: bf16); %mm32: of torch.matmul fp32 (MKL sgemm). Training rows count 3x the forward FLOPs.")
    print("paired: median over rounds of (reference time / ours time) within the same round.")
    print()
    print(f"{'target (ratio = ours img/s / reference img/s, medians)':<70s} {'ratio':>6s} {'paired':>6s} "
          f"{'need':>5s}  status")
    for t in result["targets"]:
        print(f"{t['target']:<70s} {_fmt(t['ratio']):>6s} {_fmt(t.get('paired_ratio')):>6s} {t['minimum']:>5.1f}  "
              f"{t['status']}"
              + (f"  ({t['note'][:60]})" if t["status"] == "n/a" and t.get("note") else ""))
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
                ("tf-fp32", "Keras/TF fp32"), ("tf-bf16", "Keras/TF bf16"), ("tf-train", "Keras/TF train step")]
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


if __name__ == "__main__":
    sys.exit(main())
