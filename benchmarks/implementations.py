"""The contenders of the inference benchmark: how each is built from the shared checkpoint and how it is run.

    hf-pt            transformers.CvtForImageClassification (PyTorch, eager, torch.no_grad)
    ours-pt          cvt_torch.CvtForImageClassification as loaded (PyTorch, eager, torch.no_grad)
    ours-pt-fast     the documented fast configuration of the same model: `optimize_for_inference(model)` for
                     inference, training through `optimize_for_training(model)` (both in cvt_torch.optimize)
    hf-tf            transformers.TFCvtForImageClassification (tf_keras, call wrapped in tf.function);
                     needs TF_USE_LEGACY_KERAS=1, so it never shares a process with Keras 3
    ours-keras       cvt_tf.TFCvtForImageClassification (Keras 3, TensorFlow backend): inference ("fp32", "bf16")
                     through the documented speed step `cvt_tf.optimize.optimize_for_inference(model)`; the model
                     itself as Keras users call it, `predict_on_batch`, is timed beside it ("fp32-plain",
                     "bf16-plain"); training is the model's own `train_on_batch`
    ours-keras-jax   the same model on Keras' JAX backend (XLA-compiled predict and train steps; the worker runs
                     with KERAS_BACKEND=jax and never imports TensorFlow)
    *-bf16           the same under the mixed_bfloat16 policy (Keras processes: the policy is process-global)
    hf-onnx          ONNX Runtime (CPU provider, default session options) on transformers' classifier exported the
                     ordinary way: `torch.onnx.export(model, (x,), f, opset_version=17)` (the TorchScript-based
                     exporter, as optimum exports it), batch axis dynamic
    ours-onnx        ONNX Runtime, same options, on the `model.onnx` that `cvt export` writes (conversion.export_torch)

Each implementation turns a (variant, batch) into a zero-argument callable the harness times: "fp32", "bf16"
(PyTorch: `model.to(torch.bfloat16)`; TF: the process's mixed_bfloat16 policy), "autocast" (PyTorch only) and
"train" (forward, backward and an AdamW step; "train-compiled" the same with the PyTorch model under
`torch.compile`); the ONNX workers run "fp32" only. The frameworks are imported inside, so importing this module is cheap.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import numpy as np

from benchmarks import profiles
from benchmarks.harness import best_rate

IMAGE_SIZE = 224
NUM_LABELS = 1000
WORKER_KINDS = ("hf-pt", "ours-pt", "ours-pt-fast", "hf-tf", "hf-tf-bf16", "ours-keras", "ours-keras-bf16", "ours-keras-jax",
                "ours-keras-jax-bf16", "hf-onnx", "ours-onnx")
TORCH_KINDS = ("hf-pt", "ours-pt", "ours-pt-fast")
JAX_KINDS = ("ours-keras-jax", "ours-keras-jax-bf16")  # workers on Keras' JAX backend
HF_ONNX_OPSET = 17
MATMUL_SIZE = 2048


def make_checkpoint(directory: str, seed: int = 0) -> None:
    """transformers' CvT-13 classifier with randomised weights, saved with save_pretrained (safetensors)."""
    import torch
    import transformers

    from conversion.random_weights import randomize_torch_model_

    torch.manual_seed(seed)
    config = transformers.CvtConfig(num_labels=NUM_LABELS, image_size=IMAGE_SIZE)  # the cvt-13 defaults
    model = transformers.CvtForImageClassification(config).eval()
    randomize_torch_model_(model, seed)
    model.save_pretrained(directory, safe_serialization=True)


def make_inputs(batch: int, seed: int = 0):
    """The pixels (NCHW, float32) and labels every implementation gets at `batch`."""
    rng = np.random.default_rng(seed + batch)
    pixels = rng.standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    labels = rng.integers(0, NUM_LABELS, size=(batch,)).astype(np.int64)
    return pixels, labels


def tf_matmul_rate(dtype, n: int = MATMUL_SIZE) -> float:
    """GFLOP/s of `tf.matmul` on two n x n matrices of `dtype` (best of several)."""
    import tensorflow as tf

    a = tf.cast(tf.random.normal((n, n)), dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)
    return best_rate(lambda: tf.matmul(a, b).numpy(), 2 * n ** 3)


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
        self.fast = kind == "ours-pt-fast"
        self.served = self._optimized(self.model) if self.fast else self.model  # what inference calls
        self._bf16 = None
        self.threads = torch.get_num_threads()

    def _optimized(self, model):
        from cvt_torch.optimize import optimize_for_inference

        return optimize_for_inference(model)

    def _bf16_model(self):
        if self._bf16 is None:  # the fast one folds its BatchNorms in float32, then converts
            copied = self._optimized(self.model) if self.fast else copy.deepcopy(self.model)
            self._bf16 = copied.to(self.torch.bfloat16)
        return self._bf16

    def release(self):
        self._bf16 = None

    def make(self, variant: str, batch: int):
        torch = self.torch
        pixels, labels = make_inputs(batch)
        x, y = torch.from_numpy(pixels), torch.from_numpy(labels)
        model = self.served
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
        elif variant in ("train", "train-compiled"):
            trained = copy.deepcopy(self.model).train()
            if self.fast:
                from cvt_torch.optimize import optimize_for_training

                trained = optimize_for_training(trained)
            optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4, weight_decay=0.01)
            # "train-compiled": the same step with the model under torch.compile (inductor), reported beside the
            # default eager path a user gets; the optimizer step stays eager in both
            step_model = torch.compile(trained) if variant == "train-compiled" else trained

            def run():
                optimizer.zero_grad(set_to_none=True)
                loss = step_model(x, labels=y).loss
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
                        logits = self.served(x).logits
                else:
                    logits = self.served(x).logits
            out.append(logits.float().numpy())
        return np.concatenate(out)

    def to_numpy(self, value) -> np.ndarray:
        return value.detach().float().numpy()

    def op_profile(self, run, variant: str, batch: int) -> Dict[str, float]:
        return profiles.torch_op_profile(run)

    def matmul_rates(self) -> Dict[str, float]:
        torch = self.torch
        n = MATMUL_SIZE
        a, b = torch.randn(n, n), torch.randn(n, n)
        rates = {"torch.matmul fp32 (MKL sgemm)": best_rate(lambda: torch.matmul(a, b), 2 * n ** 3)}
        try:
            op = torch.ops.mkldnn._linear_pointwise
            bt = b.t().contiguous()
            rates["oneDNN fp32 matmul"] = best_rate(lambda: op(a, bt, None, "none", [], ""), 2 * n ** 3)
        except Exception:
            pass
        ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)
        rates["torch.matmul bf16 (oneDNN)"] = best_rate(lambda: torch.matmul(ab, bb), 2 * n ** 3)
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
            from cvt_tf.optimize import optimize_for_inference

            self.model = TFCvtForImageClassification.from_pretrained(checkpoint)
            self._call = optimize_for_inference(self.model)
            self._plain_call = self.model.predict_on_batch  # what Keras users call for a batch
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
        if variant in ("fp32-plain", "bf16-plain"):
            return lambda: self._plain_call(pixels)
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
        infer = self._plain_call if variant.endswith("-plain") else self._infer
        out = []
        for start in range(0, len(pixels), chunk):
            out.append(self.to_numpy(infer(pixels[start:start + chunk])))
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

    def op_profile(self, run, variant: str, batch: int) -> Dict[str, float]:
        return profiles.tf_op_profile(run)

    def matmul_rates(self) -> Dict[str, float]:
        tf = self.tf
        return {"tf.matmul fp32": tf_matmul_rate(tf.float32), "tf.matmul bf16": tf_matmul_rate(tf.bfloat16)}


class KerasJaxImpl(TFImpl):
    """`ours-keras-jax(-bf16)`: `cvt_tf` on Keras' JAX backend, called as `TFImpl` calls ours (`predict_on_batch`,
    `train_on_batch` with the model's own loss), both XLA-compiled by Keras. JAX's CPU threads are XLA's own
    (`threads` is not applied)."""

    def __init__(self, kind: str, checkpoint: str, threads: Optional[int]):
        import keras

        from cvt_tf import TFCvtForImageClassification

        if keras.backend.backend() != "jax":
            raise RuntimeError(f"{kind} needs KERAS_BACKEND=jax, the worker runs {keras.backend.backend()}")
        self.tf = None
        self.keras = keras
        self.kind = kind
        self.bf16 = kind.endswith("-bf16")
        if self.bf16:
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
        self.model = TFCvtForImageClassification.from_pretrained(checkpoint)
        self._call = self._plain_call = self.model.predict_on_batch  # XLA fuses the plain layers itself
        self.threads = "default"
        self._compiled = False
        self._saved_weights = None

    def op_profile(self, run, variant: str, batch: int) -> Dict[str, float]:
        raise NotImplementedError("no op profile for Keras on JAX")

    def matmul_rates(self) -> Dict[str, float]:
        import jax
        import jax.numpy as jnp

        n = MATMUL_SIZE
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        matmul = jax.jit(jnp.matmul)
        rates = {"jax matmul fp32 (XLA)": best_rate(lambda: matmul(a, b).block_until_ready(), 2 * n ** 3)}
        a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        rates["jax matmul bf16 (XLA)"] = best_rate(lambda: matmul(a16, b16).block_until_ready(), 2 * n ** 3)
        return rates


class OnnxImpl:
    """An ONNX file exported in this worker from the shared checkpoint, run in an ONNX Runtime CPU session."""

    def __init__(self, kind: str, checkpoint: str, threads: Optional[int]):
        import tempfile

        import onnxruntime
        import torch

        self._folder = tempfile.TemporaryDirectory(prefix=f"cvt-bench-{kind}-")
        self.path = path = f"{self._folder.name}/model.onnx"
        pixels = torch.from_numpy(make_inputs(2)[0])
        if kind == "hf-onnx":
            import transformers

            model = transformers.CvtForImageClassification.from_pretrained(checkpoint).eval()
            model.config.return_dict = False
            torch.onnx.export(model, (pixels,), path, dynamo=False, opset_version=HF_ONNX_OPSET,
                              input_names=["pixel_values"], output_names=["logits"],
                              dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
        else:
            from conversion.export_torch import DEFAULT_OPSET, logits_module, write_onnx
            from cvt_torch import CvtForImageClassification

            model = CvtForImageClassification.from_pretrained(checkpoint)
            write_onnx(logits_module(model, "float32"), pixels, path, DEFAULT_OPSET)
        del model
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self._options = options
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.threads = threads or "default"

    def release(self):
        pass

    def make(self, variant: str, batch: int):
        if variant != "fp32":
            raise ValueError(f"the ONNX workers run fp32 only, not {variant}")
        feed = {"pixel_values": make_inputs(batch)[0]}
        return lambda: self.session.run(["logits"], feed)[0]

    def logits(self, variant: str, pixels: np.ndarray, chunk: int = 16) -> np.ndarray:
        return np.concatenate([self.session.run(["logits"], {"pixel_values": pixels[i:i + chunk]})[0]
                               for i in range(0, len(pixels), chunk)])

    def to_numpy(self, value) -> np.ndarray:
        return np.asarray(value, dtype=np.float32)

    def op_profile(self, run, variant: str, batch: int) -> Dict[str, float]:
        return profiles.onnx_op_profile(self.path, self._options, {"pixel_values": make_inputs(batch)[0]})

    def matmul_rates(self) -> Dict[str, float]:
        """GFLOP/s of an ONNX MatMul of two MATMUL_SIZE square matrices (the right one a constant, as weights are) in
        a session like the model's: the ceiling of the ONNX rows."""
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper

        from benchmarks.report import ONNX_MATMUL

        n = MATMUL_SIZE
        rng = np.random.default_rng(0)
        weight = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "weight")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "weight"], ["y"])], "matmul",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = onnxruntime.InferenceSession(model.SerializeToString(), self._options,
                                               providers=["CPUExecutionProvider"])
        feed = {"x": rng.standard_normal((n, n)).astype(np.float32)}
        return {ONNX_MATMUL: best_rate(lambda: session.run(["y"], feed), 2 * n ** 3)}


def build(kind: str, checkpoint: str, threads: Optional[int]):
    """The implementation of worker `kind`, its model loaded from `checkpoint`."""
    if kind.endswith("-onnx"):
        return OnnxImpl(kind, checkpoint, threads)
    if kind in JAX_KINDS:
        return KerasJaxImpl(kind, checkpoint, threads)
    return TorchImpl(kind, checkpoint, threads) if kind in TORCH_KINDS else TFImpl(kind, checkpoint, threads)
