"""No silent acceptance of weights: a tensor of a dtype no weight may have (complex, bool, integers), NaN or Inf in
a weight, a tensor the bare model does not use, or weights whose outputs no trained model computes, are refused by
both frameworks' `from_pretrained` and by `cvt convert` (exit 2, one line, nothing written); merely implausible
outputs give a remark in the cross-check."""

from __future__ import annotations

import math
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conversion_helpers import TINY_CONFIG, assert_one_line_error, cli  # noqa: E402

from conversion import crosscheck  # noqa: E402
from conversion.errors import ConversionError  # noqa: E402
from conversion.random_weights import random_state  # noqa: E402
from cvt_core import CvtConfig  # noqa: E402
from cvt_core.checkpoint import write_safetensors  # noqa: E402
from cvt_core.errors import CheckpointError  # noqa: E402
from cvt_core.weights import (NonFiniteWeightError, WeightLoadError, dtype_problem, plan_load,  # noqa: E402
                              value_problem, weight_table)

CONFIG = CvtConfig(**TINY_CONFIG)
FLOAT_NAMES = sorted(e.torch_name(True) for e in weight_table(CONFIG, True) if e.leaf != "num_batches_tracked")
BAD_DTYPES = ["complex64", "complex128", "bool", "int8", "int32", "int64", "uint8"]
SAFETENSORS_DTYPES = ["bool", "int8", "int32", "int64", "uint8"]  # safetensors has no complex; tf_model.h5 does
NON_FINITE = [("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)]


def _pick(seed: int) -> str:
    """A float weight of the tiny classifier, chosen by `seed`."""
    return FLOAT_NAMES[int(np.random.default_rng(seed).integers(len(FLOAT_NAMES)))]


def _tensors(seed: int = 0):
    return random_state(CONFIG, True, seed=seed)


def _write_folder(directory, tensors) -> str:
    """config.json + model.safetensors holding `tensors` (transformers' PyTorch names)."""
    os.makedirs(directory)
    CONFIG.save_pretrained(str(directory))
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    return str(directory)


def _write_tf_h5_folder(directory, name: str, dtype: str, seed: int) -> str:
    """config.json + transformers' tf_model.h5, with the dataset of weight `name` replaced by one of `dtype`."""
    from conversion.hf_tf_h5 import write_tf_h5
    from conversion.state import make_state
    from cvt_core.tensor_file import LazyTensors

    os.makedirs(directory)
    CONFIG.save_pretrained(str(directory))
    arrays = _tensors(seed)
    tensors = LazyTensors({k: v.shape for k, v in arrays.items()}, {k: v.dtype for k, v in arrays.items()},
                          arrays.__getitem__)
    path = os.path.join(directory, "tf_model.h5")
    write_tf_h5(make_state(CONFIG, tensors, "random", "hf", "torch"), path)
    entry = {e.torch_name(True): e for e in weight_table(CONFIG, True)}[name]
    suffix = entry.keras_path() + ":0"
    with h5py.File(path, "r+") as f:
        found = []

        def visit(key, obj):
            if isinstance(obj, h5py.Dataset) and key.endswith(suffix):
                found.append(key)

        f.visititems(visit)
        assert len(found) == 1, (suffix, found)
        values = np.asarray(f[found[0]][()])
        del f[found[0]]
        replaced = values.astype(dtype) + (1j if dtype.startswith("complex") else 0)
        f.create_dataset(found[0], data=replaced)
    return str(directory)


def _bad_dtype_folder(root, dtype: str, seed: int):
    """(folder, name of the weight stored as `dtype`)."""
    name = _pick(seed)
    directory = root / f"{dtype}-{seed}"
    if dtype in SAFETENSORS_DTYPES:
        tensors = _tensors(seed)
        tensors[name] = tensors[name].astype(dtype)
        return _write_folder(directory, tensors), name
    return _write_tf_h5_folder(directory, name, dtype, seed), name


def _non_finite_folder(root, label: str, value: float, seed: int):
    """(folder, name of the weight holding `value` at a few seeded places)."""
    rng = np.random.default_rng(seed)
    tensors = _tensors(seed)
    name = _pick(seed)
    flat = tensors[name].reshape(-1)
    flat[rng.choice(flat.size, size=min(3, flat.size), replace=False)] = value
    return _write_folder(root / f"{label}-{seed}", tensors), name


def _assert_convert_refused(root, src: str, *fragments, args=(), to="keras"):
    dst = root / (os.path.basename(src) + "-out")
    code, out, err = cli("convert", src, dst, "--to", to, *args)
    assert_one_line_error(code, out, err, *fragments)
    assert not dst.exists()
    assert not [n for n in os.listdir(root) if ".partial-" in n]
    return err


# ------------------------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_float_weights_of_the_four_float_dtypes_pass_the_dtype_rule(dtype):
    import ml_dtypes  # noqa: F401  (bfloat16)

    from cvt_core.dtypes import numpy_dtype

    assert dtype_problem("cvt.x.weight", numpy_dtype(dtype)) is None
    assert dtype_problem("cvt.x.normalization.num_batches_tracked", np.int64) is None


@pytest.mark.parametrize("dtype", BAD_DTYPES + ["object", "S8", "U4", "float128"])
def test_every_other_dtype_is_refused_for_a_float_weight_by_name_and_dtype(dtype):
    if dtype == "float128" and not hasattr(np, "float128"):
        pytest.skip("no float128 here")
    problem = dtype_problem("cvt.x.weight", np.dtype(dtype))
    assert problem is not None and problem.startswith(np.dtype(dtype).name)
    shapes = {e.torch_name(True): e.shape for e in weight_table(CONFIG, True)}
    dtypes = {k: np.float32 if not k.endswith("num_batches_tracked") else np.int64 for k in shapes}
    dtypes[FLOAT_NAMES[0]] = np.dtype(dtype)
    plan = plan_load(CONFIG, True, shapes, dtypes)
    with pytest.raises(WeightLoadError) as caught:
        plan.check("ckpt", strict=False, ignore_mismatched_sizes=True)  # not even non-strict loading casts it
    assert caught.value.bad_dtype == [(FLOAT_NAMES[0], np.dtype(dtype).name)]
    assert FLOAT_NAMES[0] in caught.value.summary() and "\n" not in caught.value.summary()


@pytest.mark.parametrize("dtype", ["float32", "bool", "complex64"])
def test_num_batches_tracked_must_be_an_integer(dtype):
    assert dtype_problem("a.normalization.num_batches_tracked", np.dtype(dtype)) is not None


def test_value_rule_counts_non_finite_values_and_catches_values_beyond_float32():
    assert value_problem(np.array([1.0, np.nan, np.inf, 2.0], np.float32)) == \
        "holds 2 non-finite values (NaN or Inf) of 4"
    assert "(NaN)" in value_problem(np.array([np.nan], np.float16))
    assert "beyond the range of float32" in value_problem(np.array([1e300, 0.0]))
    assert value_problem(np.array([1e30], np.float32)) is None  # finite, if absurd: judged by the cross-check
    assert value_problem(np.zeros(0, np.float32)) is None
    assert value_problem(np.arange(3)) is None


# ------------------------------------------------------------------------------------------------ dtypes
def _assert_dtype_refusal(caught, name: str, dtype: str) -> None:
    """A complex tensor may already be refused by the file's reader (safetensors, tf_model.h5 and PyTorch pickles
    hold no complex weights a reader accepts); anything the reader passes meets the load plan's dtype rule."""
    if isinstance(caught.value, WeightLoadError):
        assert caught.value.bad_dtype == [(name, dtype)]
        assert "wrong dtype" in str(caught.value)
    else:
        assert dtype.startswith("complex") and "complex" in str(caught.value), caught.value


@pytest.mark.parametrize("seed,dtype", list(enumerate(BAD_DTYPES)))
def test_wrong_weight_dtype_is_refused_by_torch_from_pretrained(tmp_path, seed, dtype):
    from cvt_torch import CvtForImageClassification

    folder, name = _bad_dtype_folder(tmp_path, dtype, seed)
    with pytest.raises((WeightLoadError, CheckpointError)) as caught:
        CvtForImageClassification.from_pretrained(folder)
    _assert_dtype_refusal(caught, name, dtype)
    with pytest.raises((WeightLoadError, CheckpointError)):
        CvtForImageClassification.from_pretrained(folder, strict=False, ignore_mismatched_sizes=True)


@pytest.mark.parametrize("seed,dtype", list(enumerate(BAD_DTYPES)))
def test_wrong_weight_dtype_is_refused_by_keras_from_pretrained(tmp_path, seed, dtype):
    from cvt_tf import TFCvtForImageClassification

    folder, name = _bad_dtype_folder(tmp_path, dtype, seed)
    with pytest.raises((WeightLoadError, CheckpointError)) as caught:
        TFCvtForImageClassification.from_pretrained(folder)
    _assert_dtype_refusal(caught, name, dtype)


@pytest.mark.parametrize("seed,dtype", list(enumerate(BAD_DTYPES)))
def test_wrong_weight_dtype_is_refused_by_convert_in_one_line(tmp_path, seed, dtype):
    folder, name = _bad_dtype_folder(tmp_path, dtype, seed)
    if dtype.startswith("complex"):
        _assert_convert_refused(tmp_path, folder, "complex")
    else:
        _assert_convert_refused(tmp_path, folder, "wrong dtype", name, dtype)


@pytest.mark.parametrize("seed,dtype", list(enumerate(BAD_DTYPES)))
def test_wrong_weight_dtype_is_refused_by_the_converter_state_whatever_the_reader(seed, dtype):
    from conversion.state import make_state
    from cvt_core.tensor_file import LazyTensors

    arrays = _tensors(seed)
    name = _pick(seed)
    arrays[name] = arrays[name].astype(dtype)
    tensors = LazyTensors({k: v.shape for k, v in arrays.items()}, {k: v.dtype for k, v in arrays.items()},
                          arrays.__getitem__)
    with pytest.raises(ConversionError, match="wrong dtype") as caught:
        make_state(CONFIG, tensors, "ckpt", "hf", "torch")
    assert f"{name}: {dtype}" in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------------ NaN / Inf
@pytest.mark.parametrize("seed,label,value", [(s, lab, v) for s, (lab, v) in enumerate(NON_FINITE * 2)])
def test_non_finite_weight_is_refused_by_torch_from_pretrained(tmp_path, seed, label, value):
    from cvt_torch import CvtForImageClassification, CvtModel

    folder, name = _non_finite_folder(tmp_path, label, value, seed)
    with pytest.raises(NonFiniteWeightError, match="non-finite") as caught:
        CvtForImageClassification.from_pretrained(folder)
    assert caught.value.name == name and "\n" not in str(caught.value)
    if not name.startswith(("classifier.", "layernorm.")):  # the bare model loads the backbone only
        with pytest.raises(NonFiniteWeightError):
            CvtModel.from_pretrained(folder)


# NaN by default; each Keras case builds the model before its weights are judged (seconds), so inf and -inf are slow
@pytest.mark.parametrize("seed,label,value", [(s, lab, v) if lab == "nan" else
                                              pytest.param(s, lab, v, marks=pytest.mark.slow)
                                              for s, (lab, v) in enumerate(NON_FINITE)])
def test_non_finite_weight_is_refused_by_keras_from_pretrained(tmp_path, seed, label, value):
    from cvt_tf import TFCvtForImageClassification

    folder, name = _non_finite_folder(tmp_path, label, value, seed)
    with pytest.raises(NonFiniteWeightError, match="non-finite") as caught:
        TFCvtForImageClassification.from_pretrained(folder)
    assert caught.value.name == name


@pytest.mark.parametrize("seed,label,value", [(s, lab, v) for s, (lab, v) in enumerate(NON_FINITE * 2)])
def test_non_finite_weight_is_refused_by_convert_with_the_tensor_and_the_count(tmp_path, seed, label, value):
    folder, name = _non_finite_folder(tmp_path, label, value, seed)
    err = _assert_convert_refused(tmp_path, folder, name, "non-finite", "refusing to convert")
    assert "differs by" not in err


def test_non_finite_weight_is_refused_by_convert_with_no_check_too(tmp_path):
    folder, name = _non_finite_folder(tmp_path, "nan", np.nan, 11)
    _assert_convert_refused(tmp_path, folder, name, "non-finite", args=("--no-check",))


def test_float64_weight_beyond_float32_is_refused_by_both_loaders(tmp_path):
    from cvt_torch import CvtForImageClassification

    tensors = _tensors(2)
    name = _pick(2)
    tensors[name] = tensors[name].astype(np.float64)
    tensors[name].reshape(-1)[0] = 1e300
    folder = _write_folder(tmp_path / "f64", tensors)
    with pytest.raises(NonFiniteWeightError, match="beyond the range of float32"):
        CvtForImageClassification.from_pretrained(folder)
    _assert_convert_refused(tmp_path, folder, name, "beyond the range of float32")


def test_cast_that_overflows_float16_is_refused(tmp_path):
    tensors = _tensors(3)
    name = _pick(3)
    tensors[name].reshape(-1)[0] = 1e6
    folder = _write_folder(tmp_path / "big", tensors)
    _assert_convert_refused(tmp_path, folder, name, "--dtype float16 cannot hold it", args=("--dtype", "float16"))


def test_non_finite_weight_in_a_keras_model_source_is_refused(tmp_path):
    from cvt_tf import TFCvtForImageClassification

    model = TFCvtForImageClassification(CONFIG, data_format="channels_first")
    model.build_with_dummy_input()
    name, variable = sorted(model.canonical_weights().items())[0]
    value = np.array(variable.numpy())
    value.reshape(-1)[0] = np.nan
    variable.assign(value)
    path = str(tmp_path / "model.keras")
    model.save(path)
    _assert_convert_refused(tmp_path, path, name, "non-finite")


# ------------------------------------------------------------------------------------------------ unexpected tensors
@pytest.mark.parametrize("extra", ["foo.bar", "cvt.foo.bar", "encoder.stages.0.extra"])
def test_extra_tensor_is_refused_by_the_bare_torch_model(tmp_path, extra):
    from cvt_torch import CvtModel

    tensors = _tensors(4)
    tensors[extra] = np.zeros(2, np.float32)
    folder = _write_folder(tmp_path / "extra", tensors)
    with pytest.raises(WeightLoadError, match="unexpected") as caught:
        CvtModel.from_pretrained(folder)
    assert caught.value.unexpected == [extra]


def test_extra_tensor_is_refused_by_the_bare_keras_model(tmp_path):
    from cvt_tf import TFCvtModel

    tensors = _tensors(5)
    tensors["foo.bar"] = np.zeros(2, np.float32)
    folder = _write_folder(tmp_path / "extra", tensors)
    with pytest.raises(WeightLoadError, match="foo.bar"):
        TFCvtModel.from_pretrained(folder)


def test_classifier_checkpoint_still_loads_into_the_bare_model_without_its_head(tmp_path):
    import warnings

    from cvt_torch import CvtModel

    folder = _write_folder(tmp_path / "classifier", _tensors(6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the head is dropped silently, as transformers does
        model = CvtModel.from_pretrained(folder)
    assert not any(k.startswith(("classifier.", "layernorm.")) for k in model.state_dict())


# ------------------------------------------------------------------------------------------------ the cross-check
def _scaled_head_folder(root, factor: float, seed: int) -> str:
    tensors = _tensors(seed)
    tensors["classifier.weight"] = tensors["classifier.weight"] * np.float32(factor)
    tensors["classifier.bias"] = tensors["classifier.bias"] * np.float32(factor)
    return _write_folder(root / f"head-{factor:g}", tensors)


# The source model's outputs are judged whatever is written: by default the PyTorch target (a second); the Keras
# target, whose files are written and run in Keras before the judgement, under -m slow
CROSS_CHECK_TARGETS = ["torch", pytest.param("keras", marks=pytest.mark.slow)]


@pytest.mark.parametrize("target", CROSS_CHECK_TARGETS)
def test_huge_finite_weights_are_refused_by_the_cross_check(tmp_path, target):
    # 1e30 in a random tensor: the logits overflow to Inf/NaN or reach an absurd magnitude
    tensors = _tensors(7)
    name = _pick(7)
    tensors[name] = np.full_like(tensors[name], 1e30)
    folder = _write_folder(tmp_path / "huge", tensors)
    err = _assert_convert_refused(tmp_path, folder, "the source model's", to=target)
    assert ("reach" in err or "contain" in err) and "not" in err


@pytest.mark.parametrize("target", CROSS_CHECK_TARGETS)
def test_logits_of_absurd_magnitude_are_refused_not_passed_as_relative_differences(tmp_path, target):
    folder = _scaled_head_folder(tmp_path, 1e28, 8)
    err = _assert_convert_refused(tmp_path, folder, "the source model's logits reach",
                                  "the weights are not what a trained model holds", to=target)
    assert "e+" in err


@pytest.mark.parametrize("target", CROSS_CHECK_TARGETS)
def test_logits_of_implausible_magnitude_give_a_remark(tmp_path, target):
    folder = _scaled_head_folder(tmp_path, 1e5, 9)
    dst = tmp_path / "remarked"
    code, out, err = cli("convert", folder, dst, "--to", target)
    assert code == 0, (out, err)
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("OK:") and "remark: logits reach" in summary, out
    assert "remark: logits reach" in out.split("wrote")[0]  # under the table too


def test_reference_with_nan_is_a_named_refusal():
    reference = {"logits": np.array([[1.0, np.nan]], np.float32)}
    with pytest.raises(ConversionError, match=r"^src: the source model's logits contain NaN \(1 of 2 values\)"):
        crosscheck.build_result("ref", reference, [("t", reference)], "x", 1e-5, source="src",
                                subject="the source model's")
    with pytest.raises(ConversionError, match="contain Inf"):
        crosscheck.build_result("ref", {"hidden_states.0": np.array([np.inf])}, [], "x", 1e-5)


def test_target_with_nan_fails_named_as_such_where_the_reference_is_finite():
    reference = {"logits": np.array([[1.0, 2.0]], np.float32)}
    result = crosscheck.build_result("ref", reference, [("model.keras", {"logits": np.array([[np.nan, 2.0]])})],
                                     "x", 1e-5)
    assert not result.ok
    assert result.failures == ["model.keras: logits contain 1 NaN where the reference's are finite"]
    assert "NaN/Inf !" in crosscheck.format_table(result)


@pytest.mark.parametrize("peak,expect", [(50.0, None), (2.5e4, "remark"), (2e6, "refused")])
def test_magnitude_thresholds(peak, expect):
    assert crosscheck.REMARK_MAGNITUDE == 1e4 and crosscheck.REFUSE_MAGNITUDE == 1e6
    reference = {"logits": np.array([[1.0, -peak]], np.float32)}
    if expect == "refused":
        with pytest.raises(ConversionError, match=r"logits reach 2e\+06 \(above 1e\+06\)"):
            crosscheck.build_result("ref", reference, [("t", reference)], "x", 1e-5)
        return
    result = crosscheck.build_result("ref", reference, [("t", reference)], "x", 1e-5)
    assert result.ok
    if expect is None:
        assert result.remarks == []
    else:
        assert result.remarks == ["logits reach 2.5e+04: the weights are not what a trained model holds"]
        assert "remark: logits reach 2.5e+04" in crosscheck.format_table(result)
        assert not math.isnan(result.worst)


def test_one_line_command_refusal_for_wrong_dtype_names_the_rule(tmp_path):
    folder, name = _bad_dtype_folder(tmp_path, "int32", 20)
    _assert_convert_refused(tmp_path, folder, name, "int32", "float16, bfloat16, float32 or float64")
