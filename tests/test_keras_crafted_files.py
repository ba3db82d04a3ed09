"""Crafted Keras files against our Keras models, as a stranger would write them: a `.keras` config.json whose `dtype`
entry is some other Keras object is refused before Keras builds it; a sharded index that stores a variable twice,
or names another shard than the one holding it, is refused; a nested model is compared at the path Keras reads it
from, so a decoy copy elsewhere in the file does not let a bad one through; and a refused nested load, strict or
with `skip_mismatch=True`, leaves the model's weights as they were."""

from __future__ import annotations

import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cvt_core.errors import CheckpointError  # noqa: E402
from cvt_core.weights import WeightLoadError  # noqa: E402
from cvt_tf import TFCvtForImageClassification  # noqa: E402
from test_keras_ecosystem import WRAPPERS, _cvt, _datasets, _wrapped  # noqa: E402

NOT_A_POLICY = "is not a Keras dtype policy"
POLICY = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}, "registered_name": None}
GADGET = {"module": "keras.layers", "class_name": "Dense", "config": {"units": 4096, "name": "gadget"},
          "build_config": {"input_shape": [None, 4096]}}
NOT_POLICIES = {
    "a-layer-built-from-its-config": GADGET,
    "a-layer-under-a-policy-class-name": dict(GADGET, class_name="DTypePolicy"),
    "a-policy-with-a-build-config": dict(POLICY, build_config={"input_shape": [None, 4096]}),
    "a-registered-custom-class": dict(POLICY, registered_name="attacker>DTypePolicy"),
    "a-policy-from-another-module": dict(POLICY, module="keras.layers"),
    "a-policy-whose-config-holds-an-object": dict(POLICY, config={"name": GADGET}),
    "a-policy-map-with-a-layer-inside": {
        "module": "keras.dtype_policies", "class_name": "DTypePolicyMap", "registered_name": None,
        "config": {"default_policy": POLICY, "policy_map": {"cvt/encoder": GADGET}}},
    "a-policy-map-whose-default-is-a-layer": {
        "module": "keras.dtype_policies", "class_name": "DTypePolicyMap", "registered_name": None,
        "config": {"default_policy": GADGET, "policy_map": {}}},
    "a-list": [POLICY],
}


@pytest.mark.parametrize("case", sorted(NOT_POLICIES))
def test_a_config_whose_dtype_is_not_a_policy_is_refused_before_keras_builds_it(case, tmp_path, monkeypatch):
    built = []
    original_build = keras.layers.Dense.build
    monkeypatch.setattr(keras.layers.Dense, "build", lambda self, *a, **k: (built.append(self.name),
                                                                           original_build(self, *a, **k)))
    config = _cvt().get_config()
    with pytest.raises(ValueError, match=NOT_A_POLICY):
        TFCvtForImageClassification.from_config(dict(config, dtype=NOT_POLICIES[case]))
    assert "gadget" not in built
    # the same through a whole .keras file and keras.models.load_model
    model = _cvt()
    model.save(tmp_path / "model.keras")
    crafted = tmp_path / "crafted.keras"
    import zipfile

    with zipfile.ZipFile(tmp_path / "model.keras") as source, zipfile.ZipFile(crafted, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "config.json":
                archive_config = json.loads(data)
                archive_config["config"]["dtype"] = NOT_POLICIES[case]
                data = json.dumps(archive_config).encode()
            target.writestr(item, data)
    with pytest.raises(Exception, match=NOT_A_POLICY):
        keras.models.load_model(crafted)
    assert "gadget" not in built


def test_every_policy_keras_writes_for_our_model_is_still_accepted():
    for model in (_cvt(dtype="mixed_bfloat16"), _cvt(dtype="float64")):
        config = json.loads(json.dumps(model.get_config()))
        rebuilt = TFCvtForImageClassification.from_config(config)
        assert rebuilt.dtype_policy.name == model.dtype_policy.name
    quantized = _cvt()
    quantized.quantize("int8")
    rebuilt = TFCvtForImageClassification.from_config(json.loads(json.dumps(quantized.get_config())))
    rebuilt.build_with_dummy_input()
    assert rebuilt.classifier.quantization_mode == "int8"


# ------------------------------------------------------------------------------------------------ sharded indexes
def _sharded(tmp_path):
    model = _cvt()
    index = tmp_path / "model.weights.json"
    model.save_weights(index, max_shard_size=0.00005)  # 50 kB: several shards for the tiny model
    weight_map = json.loads(index.read_text())["weight_map"]
    assert len(set(map(str, weight_map.values()))) > 1
    return model, index, weight_map


def _shard_of(weight_map, layer: str) -> str:
    named = weight_map[f"/{layer}/vars"]
    return named[0] if isinstance(named, list) else named


def test_a_sharded_index_loads_strictly_as_written(tmp_path):
    model, index, _ = _sharded(tmp_path)
    fresh = _cvt(seed=3)
    fresh.load_weights(index)
    for a, b in zip(fresh.weights, model.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("decoy_dtype", ["float32", "int8"])
def test_a_variable_stored_in_two_shards_is_refused(decoy_dtype, tmp_path):
    _, index, weight_map = _sharded(tmp_path)
    holder = _shard_of(weight_map, "classifier")
    other = next(name for name in sorted(set(map(str, sum((v if isinstance(v, list) else [v]
                                                           for v in weight_map.values()), []))))
                 if name != holder)
    with h5py.File(tmp_path / holder, "r") as f:
        value = f["classifier/vars/0"][()]
    with h5py.File(tmp_path / other, "a") as f:
        f.create_dataset("classifier/vars/0", data=value.astype(decoy_dtype))
    fresh = _cvt(seed=3)
    before = np.asarray(fresh.classifier.kernel)
    with pytest.raises(CheckpointError, match="is stored in two shards"):
        fresh.load_weights(index)
    np.testing.assert_array_equal(np.asarray(fresh.classifier.kernel), before)


def test_an_index_naming_another_shard_than_the_one_holding_a_layer_is_refused(tmp_path):
    _, index, weight_map = _sharded(tmp_path)
    holder = _shard_of(weight_map, "classifier")
    other = next(str(v[0] if isinstance(v, list) else v) for v in weight_map.values()
                 if str(v[0] if isinstance(v, list) else v) != holder)
    content = json.loads(index.read_text())
    content["weight_map"]["/classifier/vars"] = other
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match="names shard .* for layer classifier"):
        _cvt(seed=3).load_weights(index)


# ------------------------------------------------------------------------------------------------ nested loads
def _nested_group(h5_file) -> str:
    """The group holding the nested CvT's variables (the parent of its `cvt/encoder`)."""
    path = next(n for n in _datasets(h5_file) if "/cvt/encoder/" in n)
    return path.split("/cvt/encoder/")[0]


def _with_int8_kernel(path, decoy_at=None):
    """The file with an int8 tensor where the nested model's classifier kernel (or, for a bare model, its first
    Dense kernel) belongs, and optionally an exact copy of the nested model's variables at `decoy_at`."""
    with h5py.File(path, "r+") as f:
        group = _nested_group(f)
        if decoy_at is not None:
            f.copy(f[group], decoy_at)
        name = next(n for n in _datasets(f) if n.startswith(group + "/") and n.endswith("/vars/0")
                    and f[n].ndim == 2)
        shape = f[name].shape
        del f[name]
        f.create_dataset(name, data=np.full(shape, 7, np.int8))


def _our_model(outer):
    from cvt_tf.modeling_cvt import TFCvtPreTrainedModel

    from cvt_tf.layers import sublayers

    return next(layer for layer in [*outer.layers, *sublayers(outer)] if isinstance(layer, TFCvtPreTrainedModel))


@pytest.mark.parametrize("decoy_at", [None, "aaa_decoy", "zzz_decoy", "layers/decoy"])
@pytest.mark.parametrize("kind", WRAPPERS)
def test_a_nested_model_is_compared_where_keras_reads_it_and_a_refusal_changes_nothing(kind, decoy_at, tmp_path):
    _wrapped(kind).save_weights(tmp_path / "w.weights.h5")
    _with_int8_kernel(tmp_path / "w.weights.h5", decoy_at)
    target = _wrapped(kind, seed=5)
    before = [np.asarray(v).copy() for v in _our_model(target).weights]
    with pytest.raises(ValueError, match=r"int8 vs float32"):
        target.load_weights(tmp_path / "w.weights.h5")
    for a, b in zip(_our_model(target).weights, before):
        np.testing.assert_array_equal(np.asarray(a), b)
    # the next load of a good file goes through in full
    good = _wrapped(kind, seed=2)
    good.save_weights(tmp_path / "good.weights.h5")
    target.load_weights(tmp_path / "good.weights.h5")
    for a, b in zip(target.weights, good.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_with_skip_mismatch_a_refused_nested_model_keeps_its_weights(tmp_path):
    _wrapped("sequential").save_weights(tmp_path / "w.weights.h5")
    _with_int8_kernel(tmp_path / "w.weights.h5")
    target = _wrapped("sequential", seed=5)
    before = [np.asarray(v).copy() for v in _our_model(target).weights]
    with pytest.warns(UserWarning, match=r"int8 vs float32"):
        target.load_weights(tmp_path / "w.weights.h5", skip_mismatch=True)
    for a, b in zip(_our_model(target).weights, before):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_a_keras_file_of_our_model_is_compared_at_its_top_not_at_a_decoy(tmp_path):
    model = _cvt()
    model.save(tmp_path / "model.keras")
    import zipfile

    with zipfile.ZipFile(tmp_path / "model.keras") as archive:
        weights = archive.read("model.weights.h5")
    (tmp_path / "w.h5").write_bytes(weights)
    with h5py.File(tmp_path / "w.h5", "r+") as f:
        f.create_group("zz")
        for top in list(f.keys()):
            if top != "zz":
                f.copy(f[top], f"zz/{top}")
        shape = f["classifier/vars/0"].shape
        del f["classifier/vars/0"]
        f.create_dataset("classifier/vars/0", data=np.full(shape, 5, np.int8))
    crafted = tmp_path / "crafted.keras"
    with zipfile.ZipFile(tmp_path / "model.keras") as source, zipfile.ZipFile(crafted, "w") as target:
        for item in source.infolist():
            target.writestr(item, (tmp_path / "w.h5").read_bytes() if item.filename == "model.weights.h5"
                            else source.read(item))
    with pytest.raises((ValueError, WeightLoadError), match=r"int8 vs float32"):
        keras.models.load_model(crafted)
