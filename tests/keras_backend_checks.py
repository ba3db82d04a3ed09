"""The Keras model checks that must hold on every Keras backend, run in a child process per backend by
tests/test_keras_backends.py (`KERAS_BACKEND` is set before anything imports Keras).

    python tests/keras_backend_checks.py JOB.json

JOB.json, written by the test, names the transformers checkpoints with their inputs and what transformers'
PyTorch model computed on them, a `.keras` file saved under TensorFlow, the BatchNorm statistics one PyTorch
training forward leaves, and where to write the report. With "block_tensorflow" the child makes `tensorflow`
unimportable first, so the whole path (import, from_pretrained, call, fit, predict, save/load) is shown to run
without it. Each check runs even when an earlier one failed; the report maps check name -> "ok" or the failure.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_tensorflow_unimportable() -> None:
    """`import tensorflow` then raises ImportError and `importlib.util.find_spec("tensorflow")` is None, as when
    it is not installed (a None entry in sys.modules is Python's own way to block an import; libraries that probe
    for TensorFlow, torch._dynamo among them, see it as absent)."""
    assert "tensorflow" not in sys.modules, "tensorflow was imported before it could be blocked"
    sys.modules["tensorflow"] = None


def _assert_close(actual, expected, name: str, tol: float = 1e-5) -> None:
    """|actual - expected| <= tol * max(1, max|expected|) (tests/hf_oracle.py's rule, without its imports)."""
    import numpy as np

    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != reference {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert err <= tol * scale, f"{name}: max abs diff {err:.3g} > {tol:g} * {scale:.3g}"


def run(job: dict) -> dict:
    import keras
    import numpy as np

    from cvt_tf import TFCvtBackbone, TFCvtForImageClassification, TFCvtModel

    backend = keras.backend.backend()
    assert backend == job["backend"], f"KERAS_BACKEND={job['backend']} but Keras runs {backend}"
    report: dict = {}
    work = job["workdir"]

    seconds: dict = {}

    def check(name):
        def wrap(function):
            start = time.perf_counter()
            try:
                function()
                report[name] = "ok"
            except Exception:  # every check reports, whatever an earlier one did
                report[name] = traceback.format_exc()[-2500:]
            seconds[name] = round(time.perf_counter() - start, 2)
            print(f"{name}: {seconds[name]} s", file=sys.stderr, flush=True)
            return function
        return wrap

    cases = {case["name"]: case for case in job["cases"]}

    def load(case, **kwargs):
        cls = TFCvtForImageClassification if case["with_head"] else TFCvtModel
        return cls.from_pretrained(case["checkpoint"], **kwargs)

    def reference(case):
        with np.load(case["expected"]) as data:
            return {k: data[k] for k in data.files}

    @check("tensorflow_not_imported")
    def _():
        if job["block_tensorflow"]:
            assert sys.modules.get("tensorflow") is None, "tensorflow was imported"

    for case in job["cases"]:
        @check(f"parity[{case['name']}]")
        def _(case=case):
            model = load(case)
            pixels = np.load(case["pixels"])
            expected = reference(case)
            kwargs = {}
            if case["labels"] is not None:
                kwargs["labels"] = np.load(case["labels"])
            out = model(pixels, output_hidden_states=True, **kwargs)
            if case["with_head"]:
                _assert_close(ops_numpy(out.logits), expected["logits"], "logits")
                if "loss" in expected:
                    _assert_close(ops_numpy(out.loss), expected["loss"], "loss")
                stages = model.cvt(pixels, output_hidden_states=True)
            else:
                stages = out
            _assert_close(ops_numpy(stages.last_hidden_state), expected["last_hidden_state"], "last_hidden_state")
            for i, hidden in enumerate(stages.hidden_states):
                _assert_close(ops_numpy(hidden), expected[f"hidden_states.{i}"], f"hidden_states.{i}")

    main = cases[job["train_case"]]

    def main_depth():
        with open(os.path.join(main["checkpoint"], "config.json")) as f:
            return json.load(f)["depth"]

    pixels, labels = np.load(main["pixels"]), np.load(main["labels"])

    # One model and one compiled step for both training checks (a compile costs more than the steps): the first
    # step runs at learning rate 0, so it changes nothing but the BatchNorm moving statistics.
    trained = {}

    @check("fit_updates_batchnorm_statistics_as_pytorch")
    def _():
        model = trained["model"] = load(main)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.0))
        if backend == "jax":
            assert model.jit_compile, "JAX steps should be compiled (jit_compile resolves to True)"
        trained["first_loss"] = model.fit(pixels, labels, batch_size=len(labels), epochs=1, shuffle=False,
                                          verbose=0).history["loss"][0]
        weights = model.canonical_weights()
        with np.load(job["batchnorm_after_one_step"]) as expected:
            assert expected.files, "no BatchNorm statistics to compare"
            for name in expected.files:
                _assert_close(ops_numpy(weights[name]), expected[name], name)

    @check("fit_with_own_loss_lowers_the_loss_and_moves_batchnorm_statistics")
    def _():
        model = trained["model"]
        before = {n: ops_numpy(v) for n, v in model.canonical_weights().items() if "running_" in n}
        model.optimizer.learning_rate.assign(3e-3)
        losses = model.fit(pixels, labels, batch_size=len(labels), epochs=6, shuffle=False, verbose=0).history["loss"]
        assert losses[-1] < trained["first_loss"], f"loss did not go down: {trained['first_loss']} then {losses}"
        after = model.canonical_weights()
        assert all(not np.allclose(ops_numpy(after[n]), v) for n, v in before.items()), "moving statistics unchanged"
        path = os.path.join(work, f"trained-{backend}.keras")
        model.save(path)
        np.save(os.path.join(work, f"trained-{backend}-logits.npy"), model.predict(pixels, verbose=0))

    def fit_with_compiled_loss():
        """A model trained 4 SGD steps with a compiled loss and metric, drop path off (so that a data-parallel run,
        whose random draws differ, can be compared with it), and its history."""
        model = load(main, drop_path_rate=[0.0] * len(main_depth()))
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1),  # (Adam would magnify rounding noise)
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        history = model.fit(pixels, labels, batch_size=len(labels), epochs=4, shuffle=False, verbose=0).history
        return model, history

    @check("fit_with_compiled_loss_and_metrics")
    def _():
        model, history = fit_with_compiled_loss()
        trained["compiled_loss_weights"] = {n: ops_numpy(v) for n, v in model.canonical_weights().items()}
        assert history["loss"][-1] < history["loss"][0], f"loss did not go down: {history['loss']}"
        assert "accuracy" in history
        logits = model.predict(pixels, verbose=0)
        assert logits.dtype == np.float32 and logits.shape == (len(labels), main["num_labels"])
        _assert_close(logits, ops_numpy(model(pixels).logits), "predict vs call")

    @check("out_of_range_labels_are_refused")
    def _():
        model = load(main)
        bad = labels.copy()
        bad[0] = main["num_labels"]
        try:
            model(pixels, labels=bad)
        except ValueError as exc:
            assert "num_labels" in str(exc), str(exc)
        else:
            raise AssertionError("an out-of-range label was accepted")

    @check("keras_file_saved_by_tensorflow_loads_with_equal_logits")
    def _():
        model = keras.models.load_model(job["tensorflow_keras_file"])
        _assert_close(ops_numpy(model(pixels).logits), reference(main)["logits"], "logits")

    @check("model_weights_h5_round_trip")
    def _():
        model = load(main)
        path = os.path.join(work, f"{backend}.weights.h5")
        model.save_weights(path)
        fresh = TFCvtForImageClassification(model.config, data_format="channels_first")
        fresh.load_weights(path)
        _assert_close(ops_numpy(fresh(pixels).logits), reference(main)["logits"], "logits")

    @check("backbone_feature_maps_match_transformers_and_survive_a_keras_file")
    def _():
        expected = reference(main)
        stages = sorted(int(k.split(".")[1]) for k in expected if k.startswith("hidden_states."))
        backbone = TFCvtBackbone.from_pretrained(main["checkpoint"], out_indices=[s + 1 for s in stages])
        output = backbone(pixels)
        assert list(output.pyramid_outputs) == [f"P{s.bit_length() - 1}" for s in backbone.strides]
        for stage, feature in zip(stages, output.feature_maps):
            _assert_close(ops_numpy(feature), expected[f"hidden_states.{stage}"], f"feature map of stage {stage}")
        path = os.path.join(work, f"backbone-{backend}.keras")
        backbone.save(path)
        loaded = keras.models.load_model(path)
        assert list(loaded.out_features) == list(backbone.out_features), loaded.out_features
        for stage, feature in zip(stages, loaded(pixels).feature_maps):
            _assert_close(ops_numpy(feature), expected[f"hidden_states.{stage}"], f"reloaded stage {stage}")

    @check("mixed_bfloat16_inference_and_training")
    def _():
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            model = load(main)
            assert all(v.dtype == "float32" for v in model.weights), "variables must stay float32"
            logits = model(pixels).logits
            assert keras.backend.standardize_dtype(logits.dtype) == "bfloat16", logits.dtype
            _assert_close(ops_numpy(ops_float32(logits)), reference(main)["logits"], "bf16 logits", tol=0.1)
            model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3))
            loss = model.fit(pixels, labels, batch_size=len(labels), epochs=1, verbose=0).history["loss"][0]
            assert np.isfinite(loss), loss
        finally:
            keras.mixed_precision.set_global_policy("float32")

    @check("empty_batch_gives_empty_outputs")
    def _():
        model = load(main)
        empty = np.zeros((0,) + pixels.shape[1:], np.float32)
        assert tuple(model(empty).logits.shape) == (0, main["num_labels"])

    @check("tensorflow_only_features_name_their_backend")
    def _():
        if backend == "tensorflow":
            return
        from conversion.export_keras import write_saved_model

        model = load(main)
        try:
            write_saved_model(model, os.path.join(work, "saved"))
        except RuntimeError as exc:
            assert "KERAS_BACKEND=tensorflow" in str(exc), str(exc)
        else:
            raise AssertionError("a SavedModel export ran without the TensorFlow backend")

    if backend == "jax" and job.get("distributed"):
        @check("jax_data_parallel_equals_one_device")
        def _():
            import jax

            devices = jax.devices()
            assert len(devices) >= 2, f"needs 2 host devices (XLA_FLAGS), got {devices}"

            single = trained["compiled_loss_weights"]  # fit_with_compiled_loss on one device, above
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices[:2]))
            try:
                model, _ = fit_with_compiled_loss()
                parallel = {n: ops_numpy(v) for n, v in model.canonical_weights().items()}
            finally:
                keras.distribution.set_distribution(None)
            for name, value in single.items():
                _assert_close(parallel[name], value, name, tol=1e-4)

    if job["block_tensorflow"]:
        report["tensorflow_not_imported_at_the_end"] = (
            "ok" if sys.modules.get("tensorflow") is None else "tensorflow was imported by one of the checks")
    return report


def ops_numpy(value):
    import keras

    return keras.ops.convert_to_numpy(value)


def ops_float32(value):
    import keras

    return keras.ops.cast(value, "float32")


def main() -> int:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    if job["block_tensorflow"]:
        _make_tensorflow_unimportable()
    sys.path.insert(0, _REPO)
    os.environ.setdefault("TMPDIR", tempfile.gettempdir())
    report = run(job)
    with open(job["report"], "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
