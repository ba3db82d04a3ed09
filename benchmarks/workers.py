"""One process per implementation: the worker's request loop and the parent's handle on it.

The parent and a worker talk in JSON lines over the worker's stdin/stdout; anything the libraries print goes to the
worker's log file. A worker is started as `python -m benchmarks.bench_inference --worker KIND ...` with the
environment its framework needs (transformers' TF classes need Keras 2, so they never share a process with Keras 3).
Requests: prepare (build and warm up a variant at a batch, save its logits), time, release, reset_peak, memory,
matmul, logits (of a batch of photos), profile (op types of a prepared run, for a missed target), quit.
"""

from __future__ import annotations

import gc
import json
import os
import select
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from benchmarks import implementations, profiles
from benchmarks.harness import peak_rss_mb, reset_peak_rss

REPO_ROOT = Path(__file__).resolve().parents[1]


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
        impl = implementations.build(kind, checkpoint, threads)
        reply({"ready": True, "load_s": time.perf_counter() - start, "threads": impl.threads, **peak_rss_mb()})
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
                if not request["variant"].startswith("train"):
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
                reply({"ok": reset_peak_rss(), **peak_rss_mb()})
            elif cmd == "memory":
                reply({"ok": True, **peak_rss_mb()})
            elif cmd == "profile":  # op types of a prepared (variant, batch) and their ms per call
                run = prepared[request["key"]]
                reply({"ok": True, **profiles.timed_profile(
                    lambda: impl.op_profile(run, request["variant"], request["batch"]))})
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
            env["KERAS_BACKEND"] = "jax" if kind in implementations.JAX_KINDS else "tensorflow"
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
        self._quitting = False

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
        if self.proc.poll() is None and not self._quitting:
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
