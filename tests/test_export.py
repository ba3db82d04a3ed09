"""Deployment: `cvt export` writes ONNX, torch.export, SavedModel and TFLite artifacts that each reproduce the source
in their own runtime (checked here against transformers' own model, and the original code's QuickGELU computation),
the PyTorch model objects export with torch.export and both ONNX exporters, and bad requests end in one line,
exit 2 and nothing written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conversion_helpers import (TINY, TINY_CONFIG, assert_one_line_error, cli, hf_to_original, leftovers,
                                quick_gelu_reference)
from cvt_core import CvtConfig
from hf_oracle import make_hf_checkpoint

ATOL = 1e-4
ARTIFACTS = {"onnx": "model.onnx", "torch-export": "model.pt2", "saved-model": "saved_model", "tflite": "model.tflite"}
CONFIG = dict(TINY, num_labels=4)  # image_size 64; a config transformers' CvT can build
SIZES = ((64, 64), (96, 80))  # the command's default size for CONFIG and its second, larger one


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A checkpoint saved by transformers (`hf/`), the same weights as an original microsoft/CvT file
    (`original.pth` + `original.json`), and transformers' model, which computes what both hold."""
    root = tmp_path_factory.mktemp("export")
    model = make_hf_checkpoint(str(root / "hf"), CONFIG, seed=5)
    torch.save({hf_to_original(k): v.clone() for k, v in model.state_dict().items()}, root / "original.pth")
    (root / "original.json").write_text(json.dumps(CONFIG))
    return dict(root=root, hf=root / "hf", original=root / "original.pth", original_config=root / "original.json",
                model=model)


def _inputs(sizes):
    rng = np.random.default_rng(11)
    return [rng.standard_normal((batch, 3, h, w)).astype(np.float32) for h, w in sizes for batch in (1, 3)]


def _expected(model, pixels, quick_gelu=False):
    import copy

    reference = quick_gelu_reference(copy.deepcopy(model)) if quick_gelu else model
    with torch.no_grad():
        return reference(torch.from_numpy(pixels)).logits.numpy()


def _open_artifact(fmt, path):
    """The artifact loaded as a user loads it, in its own runtime: pixels -> logits."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda pixels: session.run(["logits"], {"pixel_values": pixels})[0]
    if fmt == "torch-export":
        module = torch.export.load(str(path)).module()
        return lambda pixels: module(torch.from_numpy(pixels))["logits"].detach().numpy()
    import tensorflow as tf

    if fmt == "saved-model":
        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        return lambda pixels: serve(pixel_values=tf.constant(pixels))["logits"].numpy()
    interpreter = tf.lite.Interpreter(model_path=str(path))
    source, result = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run(pixels):
        interpreter.resize_tensor_input(source["index"], pixels.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], pixels)
        interpreter.invoke()
        return interpreter.get_tensor(result["index"])
    return run


def _assert_artifacts_reproduce(dst, formats, model, quick_gelu=False):
    for fmt in formats:
        run = _open_artifact(fmt, dst / ARTIFACTS[fmt])
        sizes = SIZES[:1] if fmt == "tflite" else SIZES  # TFLite is fixed at the exported size
        for pixels in _inputs(sizes):
            got, want = run(pixels), _expected(model, pixels, quick_gelu)
            assert got.dtype == np.float32 and got.shape == want.shape, (fmt, got.dtype, got.shape)
            limit = ATOL * max(1.0, float(np.abs(want).max()))
            assert np.abs(got - want).max() <= limit, (fmt, pixels.shape, np.abs(got - want).max())


@pytest.fixture(scope="module")
def hf_exports(sources):
    """`cvt export` of the transformers checkpoint, one format at a time, run once per format: fmt -> (folder,
    stdout). ONNX at --opset 18 (the default is 20), so the option is seen to work."""
    done = {}

    def export(fmt):
        if fmt not in done:
            dst = sources["root"] / f"deploy-{fmt}"
            extra = ["--opset", "18"] if fmt == "onnx" else []
            code, out, err = cli("export", sources["hf"], dst, "--format", fmt, *extra, "--quiet")
            assert code == 0, err
            done[fmt] = (dst, out)
        return done[fmt]
    return export


# ---------------------------------------------------------------------------------------------- the command
@pytest.mark.parametrize("fmt", list(ARTIFACTS))
def test_each_format_from_a_transformers_checkpoint_reproduces_transformers(sources, hf_exports, fmt):
    dst, out = hf_exports(fmt)
    assert sorted(os.listdir(dst)) == sorted([".cvt-manifest.json", "config.json", "preprocessor_config.json", ARTIFACTS[fmt]])
    assert "top-1 agreement" in out and out.rstrip().splitlines()[-1].startswith("OK: ")
    assert ("96x80" in out) == (fmt != "tflite")  # the second size is checked where height and width are dynamic
    _assert_artifacts_reproduce(dst, [fmt], sources["model"])
    assert not leftovers(sources["root"])


@pytest.mark.slow
def test_every_format_from_an_original_checkpoint_reproduces_the_quick_gelu_computation(sources, tmp_path):
    dst = tmp_path / "deploy"
    code, out, err = cli("export", sources["original"], dst, "--config", sources["original_config"], "--quiet")
    assert code == 0, err
    assert "original microsoft/CvT" in out and "quick_gelu" in out
    assert json.loads((dst / "config.json").read_text())["hidden_act"] == "quick_gelu"
    _assert_artifacts_reproduce(dst, list(ARTIFACTS), sources["model"], quick_gelu=True)


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_original_checkpoint_exports_with_quick_gelu(sources, tmp_path, fmt):
    dst = tmp_path / "deploy"
    code, out, err = cli("export", sources["original"], dst, "--config", sources["original_config"], "--format",
                         fmt, "--quiet")
    assert code == 0, err
    _assert_artifacts_reproduce(dst, [fmt], sources["model"], quick_gelu=True)


def test_onnx_graph_is_inference_only_with_named_dynamic_axes(hf_exports):
    import onnx

    dst, _ = hf_exports("onnx")
    model = onnx.load(str(dst / "model.onnx"))
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"BatchNormalization", "Dropout"}, ops
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]  # noqa: E731
    assert [(i.name, dims(i)) for i in model.graph.input] == [("pixel_values", ["batch", 3, "height", "width"])]
    assert [(o.name, dims(o)) for o in model.graph.output] == [("logits", ["batch", CONFIG["num_labels"]])]


def test_bfloat16_torch_export_takes_and_returns_float32(sources, tmp_path):
    dst = tmp_path / "deploy"
    code, out, err = cli("export", sources["hf"], dst, "--format", "torch-export", "--dtype", "bfloat16", "--quiet")
    assert code == 0, err
    program = torch.export.load(str(dst / "model.pt2"))
    pixels = _inputs(SIZES[:1])[1]
    with torch.no_grad():
        logits = program.module()(torch.from_numpy(pixels))["logits"]
    assert logits.dtype == torch.float32
    assert any(node.meta.get("val") is not None and getattr(node.meta["val"], "dtype", None) == torch.bfloat16
               for node in program.graph.nodes)  # the computation inside is bfloat16
    want = _expected(sources["model"], pixels)
    assert np.abs(logits.numpy() - want).max() <= 5e-2 * max(1.0, float(np.abs(want).max()))


@pytest.mark.slow
def test_bfloat16_saved_model_takes_and_returns_float32(sources, tmp_path):
    import tensorflow as tf

    dst = tmp_path / "deploy"
    code, out, err = cli("export", sources["hf"], dst, "--format", "saved-model", "--dtype", "bfloat16", "--quiet")
    assert code == 0, err
    serve = tf.saved_model.load(str(dst / "saved_model")).signatures["serving_default"]
    assert serve.structured_input_signature[1]["pixel_values"].dtype == tf.float32
    pixels = _inputs(SIZES[:1])[1]
    logits = serve(pixel_values=tf.constant(pixels))["logits"]
    assert logits.dtype == tf.float32
    want = _expected(sources["model"], pixels)
    assert np.abs(logits.numpy() - want).max() <= 5e-2 * max(1.0, float(np.abs(want).max()))


def test_outputs_beyond_tolerance_fail_with_exit_1_and_write_nothing(sources, tmp_path):
    dst = tmp_path / "deploy"
    code, out, err = cli("export", sources["hf"], dst, "--format", "tflite", "--atol", "1e-12", "--quiet")
    assert code == 1, (out, err)
    assert "FAILED" in out and "was not written" in out
    assert not dst.exists() and not leftovers(tmp_path)


def _bad_requests(sources, tmp_path):
    """name -> (argv after `export`, the destination, fragments the error must hold)."""
    hf, dst = sources["hf"], tmp_path / "out" / "deploy"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bare = tmp_path / "bare"
    make_hf_checkpoint(str(bare), CONFIG, seed=6, with_head=False)
    small = tmp_path / "small"
    from conversion.pipeline import make_random_checkpoint

    make_random_checkpoint(str(small), CvtConfig(**TINY_CONFIG), seed=2)  # image_size 32: grids of 1 at its size
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "config.json").write_text("{}")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    return {
        "unknown-format": ([hf, dst, "--format", "pdf"], dst, ["pdf", "unknown --format"]),
        "dst-inside-src": ([hf, hf / "deploy"], hf / "deploy", ["lies inside the source"]),
        "unwritable-dst": ([hf, blocker / "deploy"], blocker / "deploy", ["is a file, not a directory"]),
        "dst-exists": ([hf, occupied], None, [occupied, ".cvt-manifest.json"]),
        "dst-holds-other-files": ([hf, foreign, "--force"], None, [foreign, "notes.txt"]),
        "bare-model": ([bare, dst], dst, ["bare CvtModel", "logits"]),
        "bfloat16-tflite": ([hf, dst, "--format", "tflite", "--dtype", "bfloat16"], dst, ["--dtype bfloat16", "tflite"]),
        "opset-too-old": ([hf, dst, "--format", "onnx", "--opset", "13"], dst, ["--opset 13", "out of range"]),
        "image-too-small": ([hf, dst, "--image-size", "2", "2"], dst, ["--image-size 2 2", "too small"]),
        "torch-export-size": ([small, dst, "--format", "torch-export"], dst, ["torch-export cannot hold 32x32"]),
        "original-without-config": ([sources["original"], dst], dst, ["--config"]),
    }


BAD_REQUESTS = ["unknown-format", "dst-inside-src", "unwritable-dst", "dst-exists", "dst-holds-other-files",
                "bare-model", "bfloat16-tflite", "opset-too-old", "image-too-small", "torch-export-size",
                "original-without-config"]


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_ends_in_one_line_exit_2_and_writes_nothing(sources, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    argv, dst, fragments = _bad_requests(sources, tmp_path)[case]
    assert_one_line_error(*cli("export", *argv, "--quiet"), *fragments)
    if dst is not None:
        assert not os.path.exists(dst)
    assert not leftovers(tmp_path) and not (tmp_path / "out").exists()
    assert sorted(os.listdir(sources["hf"])) == ["config.json", "model.safetensors"]


def test_every_bad_request_case_is_listed(sources, tmp_path):
    assert sorted(_bad_requests(sources, tmp_path)) == sorted(BAD_REQUESTS)


def test_force_replaces_an_earlier_export(sources, tmp_path):
    dst = tmp_path / "deploy"
    code, _, err = cli("export", sources["hf"], dst, "--format", "onnx", "--quiet")  # the earlier export
    assert code == 0, err
    assert_one_line_error(*cli("export", sources["hf"], dst, "--format", "tflite", "--quiet"), "pass --force")
    code, _, err = cli("export", sources["hf"], dst, "--format", "tflite", "--force", "--quiet")
    assert code == 0, err
    assert sorted(os.listdir(dst)) == [".cvt-manifest.json", "config.json", "model.tflite", "preprocessor_config.json"]
    assert not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------- model objects
@pytest.fixture(scope="module", params=["CvtForImageClassification", "CvtModel"])
def model(request):
    import cvt_torch

    torch.manual_seed(0)
    return getattr(cvt_torch, request.param)(CvtConfig(**TINY_CONFIG)).eval()


def _eager(model, pixels):
    with torch.no_grad():
        return model(pixels).to_tuple()


def _assert_equal_to_eager(model, outputs, pixels):
    expected = _eager(model, pixels)
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5


def test_torch_export_with_dynamic_batch_height_and_width_equals_eager(model):
    dynamic = torch.export.Dim.DYNAMIC
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),),
                                  dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},))
    for shape in [(1, 3, 64, 64), (3, 3, 96, 80), (2, 3, 48, 120)]:
        pixels = torch.randn(shape)
        with torch.no_grad():
            _assert_equal_to_eager(model, program.module()(pixels).to_tuple(), pixels)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_onnx_export_runs_in_onnxruntime_equal_to_eager(model, tmp_path, dynamo):
    import onnxruntime

    path = tmp_path / "model.onnx"
    names = ["last_hidden_state", "cls_token_value"] if not model.with_head else ["logits"]
    if dynamo:
        dynamic = torch.export.Dim.DYNAMIC
        options = dict(dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},), verbose=False)
    else:
        options = dict(dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"}})
    torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), str(path), dynamo=dynamo, input_names=["pixel_values"],
                      output_names=names, **options)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 64), (3, 3, 96, 80)]:
        pixels = torch.randn(shape)
        outputs = session.run(names, {"pixel_values": pixels.numpy()})
        _assert_equal_to_eager(model, [torch.from_numpy(o) for o in outputs], pixels)


def test_jit_trace_at_one_size_equals_eager_at_another(model):
    traced = torch.jit.trace(model, torch.randn(2, 3, 64, 64), strict=False)  # the trace check runs too
    for shape in [(2, 3, 64, 64), (3, 3, 96, 80)]:
        pixels = torch.randn(shape)
        with torch.no_grad():
            outputs = traced(pixels)
        assert isinstance(outputs, dict)
        _assert_equal_to_eager(model, list(outputs.values()), pixels)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_keras_export_serves_float32_at_any_batch_and_size_under_every_policy(tmp_path, policy):
    import keras
    import tensorflow as tf

    import cvt_tf
    from conversion import export_keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = cvt_tf.TFCvtForImageClassification(CvtConfig(**CONFIG), data_format="channels_first")
        model.build_with_dummy_input()
        export_keras.write_saved_model(model, str(tmp_path / "saved_model"))
    finally:
        keras.config.set_dtype_policy(previous)
    serve = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
    spec = serve.structured_input_signature[1]["pixel_values"]
    assert spec.dtype == tf.float32 and spec.shape.as_list() == [None, 3, None, None]
    tolerance = 5e-2 if policy == "mixed_bfloat16" else 1e-5
    for pixels in _inputs(SIZES):
        logits = serve(pixel_values=tf.constant(pixels))["logits"]
        want = model(pixels, training=False).logits
        assert logits.dtype == tf.float32 and logits.shape == (pixels.shape[0], CONFIG["num_labels"])
        assert np.abs(logits.numpy() - np.asarray(want, np.float32)).max() <= tolerance


def test_keras_litert_export_runs_in_the_plain_tflite_interpreter_at_any_batch(tmp_path):
    import tensorflow as tf

    import cvt_tf
    from conversion import export_keras

    model = cvt_tf.TFCvtForImageClassification(CvtConfig(**CONFIG), data_format="channels_first")
    model.build_with_dummy_input()
    path = tmp_path / "model.tflite"
    export_keras.write_tflite(model, str(path))
    assert sorted(os.listdir(tmp_path)) == ["model.tflite"]
    run = _open_artifact("tflite", path)  # TFLite's built-in operators only: no select-ops (Flex) delegate
    assert list(tf.lite.Interpreter(model_path=str(path)).get_input_details()[0]["shape_signature"]) == [-1, 3, 64, 64]
    for pixels in _inputs(SIZES[:1]):
        want = model(pixels, training=False).logits.numpy()
        assert np.abs(run(pixels) - want).max() <= 1e-5
