"""The Keras models on each Keras backend: TensorFlow, JAX and PyTorch.

One child process per backend (`KERAS_BACKEND` set before Keras is imported) runs tests/keras_backend_checks.py:
parity with transformers' PyTorch model to 1e-5 on the parity configs, `fit` with the model's own loss and with a
compiled one (the loss goes down; one step moves the BatchNorm statistics exactly as a PyTorch training forward
does), `predict`, `mixed_bfloat16`, `.weights.h5` and `.keras` files (one saved here under TensorFlow loads
there), and on JAX a `keras.distribution.DataParallel` fit over two host devices that equals the one-device fit.
The JAX and PyTorch children run with TensorFlow made unimportable. Back here, under TensorFlow, the `.keras` file
each child trained and saved loads with the logits the child computed. The TensorFlow child is a slow extra: the rest
of the suite runs the same checks on TensorFlow in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hf_oracle import assert_close

HERE = os.path.dirname(os.path.abspath(__file__))
# The rest of the suite runs every one of these checks in this process, on the TensorFlow backend, so its child is
# a slow extra (`-m slow`): CI's minutes go to the backends nothing else covers.
BACKEND_PARAMS = [pytest.param("tensorflow", marks=pytest.mark.slow), "jax", "torch"]
BACKEND_CASES = ("tiny-64", "tiny-variants", "tiny-four-stages-bare")
TRAIN_CASE = "tiny-64"  # 5 classes, integer labels, drop path only on the last stage


def _statistics_after_one_training_forward(checkpoint: str, pixel_values: np.ndarray) -> dict:
    """BatchNorm running statistics of transformers' PyTorch classifier after one forward in training mode, for
    the stages before the last (its drop path makes the last stage's random)."""
    import torch
    import transformers

    model = transformers.CvtForImageClassification.from_pretrained(checkpoint).train()
    with torch.no_grad():
        model(torch.from_numpy(pixel_values))
    last = len(model.config.depth) - 1
    return {name: value.numpy() for name, value in model.state_dict().items()
            if name.endswith(("running_mean", "running_var")) and f".stages.{last}." not in name}


@pytest.fixture(scope="module")
def backend_job(hf_reference, tmp_path_factory):
    """The job every backend's child runs, and a `.keras` file of the training case saved under TensorFlow."""
    import keras

    from cvt_tf import TFCvtForImageClassification

    assert keras.backend.backend() == "tensorflow"
    root = tmp_path_factory.mktemp("keras-backends")
    cases = []
    for name in BACKEND_CASES:
        ref = hf_reference[name]
        np.save(root / f"{name}-pixels.npy", ref.pixel_values)
        np.savez(root / f"{name}-expected.npz", **ref.torch)
        labels = None
        if ref.labels is not None:
            labels = str(root / f"{name}-labels.npy")
            np.save(labels, ref.labels)
        cases.append({"name": name, "checkpoint": ref.checkpoint, "pixels": str(root / f"{name}-pixels.npy"),
                      "labels": labels, "expected": str(root / f"{name}-expected.npz"),
                      "with_head": ref.case.with_head, "num_labels": ref.case.config.get("num_labels", 2)})
    main = hf_reference[TRAIN_CASE]
    np.savez(root / "batchnorm.npz", **_statistics_after_one_training_forward(main.checkpoint, main.pixel_values))
    TFCvtForImageClassification.from_pretrained(main.checkpoint).save(root / "tensorflow.keras")
    return {"cases": cases, "train_case": TRAIN_CASE, "batchnorm_after_one_step": str(root / "batchnorm.npz"),
            "tensorflow_keras_file": str(root / "tensorflow.keras"), "root": root}


def _run_child(backend: str, job: dict, root) -> dict:
    workdir = root / backend
    workdir.mkdir()
    job = {key: value for key, value in job.items() if key != "root"}
    job.update(backend=backend, workdir=str(workdir), report=str(workdir / "report.json"),
               block_tensorflow=backend != "tensorflow", distributed=backend == "jax")
    (workdir / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)
    if backend == "jax":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
        env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "keras_backend_checks.py"), str(workdir / "job.json")],
                          env=env, capture_output=True, text=True, timeout=900)
    (workdir / "child-stderr.log").write_text(proc.stderr)  # each check's seconds, for a slow run
    assert proc.returncode == 0, f"{backend} child failed:\n{proc.stderr[-4000:]}"
    return json.loads((workdir / "report.json").read_text())


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_keras_models_load_match_train_and_save_on_every_backend(backend, backend_job):
    import keras

    report = _run_child(backend, backend_job, backend_job["root"])
    failures = {name: outcome for name, outcome in report.items() if outcome != "ok"}
    assert not failures, f"{backend}: " + "\n\n".join(f"{name}:\n{outcome}" for name, outcome in failures.items())
    expected_checks = {f"parity[{name}]" for name in BACKEND_CASES} | {
        "keras_file_saved_by_tensorflow_loads_with_equal_logits",
        "backbone_feature_maps_match_transformers_and_survive_a_keras_file"}
    if backend == "jax":
        expected_checks.add("jax_data_parallel_equals_one_device")
    assert expected_checks <= set(report), f"checks missing from the {backend} report: {expected_checks - set(report)}"
    # the other way round: the .keras file the child trained and saved under its backend, loaded here (TensorFlow)
    workdir = backend_job["root"] / backend
    model = keras.models.load_model(workdir / f"trained-{backend}.keras")
    pixels = np.load(next(case["pixels"] for case in backend_job["cases"] if case["name"] == TRAIN_CASE))
    assert_close(model.predict(pixels, verbose=0), np.load(workdir / f"trained-{backend}-logits.npy"),
                 f"logits of the .keras file trained under {backend}")
