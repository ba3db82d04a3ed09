"""Keras' own tools on our Keras models: a CvT nested in a functional model under the user's head, in
`Sequential([Rescaling, model])` and in a subclassed wrapper saves and reloads (`save`/`load_model`,
`save_weights`/`load_weights`, `ModelCheckpoint`, `BackupAndRestore`) with identical outputs and stays strict about
weights of another config; a dtype policy given to the constructor reaches every layer and survives a `.keras`
file; `quantize("int8")` and LoRA round-trip; rematerialised blocks give the gradients of plain ones; and what
`cvt_tf.keras_weights` expects a model to write is what Keras writes."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from cvt_core import CvtConfig  # noqa: E402
from cvt_core.errors import CheckpointError  # noqa: E402
from cvt_core.weights import WeightLoadError  # noqa: E402
from cvt_tf import TFCvtForImageClassification, TFCvtModel  # noqa: E402
from cvt_tf.keras_weights import file_layout  # noqa: E402
from cvt_tf.layers import sublayers  # noqa: E402
from cvt_tf.training import block_remat_scope  # noqa: E402

TINY = dict(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 2], num_labels=3, drop_path_rate=[0.0] * 3)
OTHER = dict(TINY, depth=[1, 1, 1])  # the same layers, one block fewer in the last stage
MISMATCH = "the Keras weights do not match the model's config"
IMAGES = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
LABELS = np.array([0, 1, 2, 1])


def _cvt(fields=TINY, cls=TFCvtForImageClassification, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    model = cls(CvtConfig(**fields), data_format="channels_last", **kwargs)
    model.build_with_dummy_input()
    return model


class Wrapper(keras.Model):
    """A user's own model holding ours as an attribute."""

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.head = keras.layers.Dense(2, name="head")

    def call(self, images):
        return self.head(self.backbone(images / 255.0).logits)

    def get_config(self):
        return {**super().get_config(), "backbone": keras.saving.serialize_keras_object(self.backbone)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(keras.saving.deserialize_keras_object(config.pop("backbone")), **config)


keras.saving.register_keras_serializable(package="tests")(Wrapper)


def _wrapped(kind: str, fields=TINY, seed=0) -> keras.Model:
    """Our model inside another: under a head in a functional model, behind Rescaling in a Sequential, or held by a
    subclassed model; built, with distinct random weights."""
    if kind == "functional":
        backbone = _cvt(fields, TFCvtModel, seed)
        inputs = keras.Input((32, 32, 3))
        features = backbone(inputs).last_hidden_state
        outputs = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(features))
        model = keras.Model(inputs, outputs)
    elif kind == "sequential":
        model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255), _cvt(fields, seed=seed)])
    else:
        model = Wrapper(_cvt(fields, seed=seed))
        model(IMAGES[:1])
    rng = np.random.default_rng(seed + 1)
    for variable in model.weights:
        value = rng.standard_normal(variable.shape).astype(np.float32) * 0.2
        variable.assign(np.abs(value) + 0.5 if "moving_variance" in variable.path else value)
    return model


def _outputs(model) -> np.ndarray:
    out = model(IMAGES, training=False)
    return np.asarray(out.logits if hasattr(out, "logits") else out)


WRAPPERS = ["functional", "sequential", "subclassed"]


# ------------------------------------------------------------------------------------------------ nested models
@pytest.mark.parametrize("kind", WRAPPERS)
def test_nested_model_reloads_from_keras_file_and_weights_file_with_identical_outputs(kind, tmp_path):
    model = _wrapped(kind)
    expected = _outputs(model)
    model.save(tmp_path / "whole.keras")
    np.testing.assert_array_equal(_outputs(keras.models.load_model(tmp_path / "whole.keras")), expected)
    model.save_weights(tmp_path / "whole.weights.h5")
    fresh = _wrapped(kind, seed=5)
    assert np.abs(_outputs(fresh) - expected).max() > 1e-3
    fresh.load_weights(tmp_path / "whole.weights.h5")
    np.testing.assert_array_equal(_outputs(fresh), expected)


@pytest.mark.parametrize("kind", WRAPPERS)
def test_nested_model_refuses_weights_of_another_config_with_our_message(kind, tmp_path):
    _wrapped(kind, OTHER).save_weights(tmp_path / "other.weights.h5")
    with pytest.raises(ValueError, match=MISMATCH) as caught:
        _wrapped(kind).load_weights(tmp_path / "other.weights.h5")
    assert "stages.2.layers.1." in str(caught.value)  # the block the file lacks, by its weight name


def test_model_checkpoint_and_backup_and_restore_reload_a_nested_model(tmp_path):
    model = _wrapped("functional")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(True))
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"))
    weights_checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "last.weights.h5"), save_weights_only=True)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt  # after epoch 0's backup was written

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(KeyboardInterrupt):
        model.fit(IMAGES, LABELS % 2, batch_size=2, epochs=2, verbose=0,
                  callbacks=[checkpoint, weights_checkpoint, backup, Interrupt()])
    expected = _outputs(model)
    np.testing.assert_array_equal(_outputs(keras.models.load_model(tmp_path / "best.keras")), expected)
    reloaded = _wrapped("functional", seed=5)
    reloaded.load_weights(tmp_path / "last.weights.h5")
    np.testing.assert_array_equal(_outputs(reloaded), expected)

    restored = _wrapped("functional", seed=5)
    restored.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(True))
    seen = {}

    class Record(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["outputs"] = _outputs(self.model)  # after BackupAndRestore (listed first) restored the weights

    restored.fit(IMAGES, LABELS % 2, batch_size=2, epochs=2, verbose=0,
                 callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup")), Record()])
    np.testing.assert_array_equal(seen["outputs"], expected)


def test_the_nested_model_is_walked_for_safety_by_keras_driven_loads(tmp_path):
    model = _wrapped("sequential")
    model.save_weights(tmp_path / "w.weights.h5")
    with h5py.File(tmp_path / "w.weights.h5", "r+") as f:
        name = next(n for n in _datasets(f) if n.endswith("classifier/vars/0"))
        shape = f[name].shape
        del f[name]
        f.create_dataset(name, shape=shape, dtype="<f4", chunks=shape)  # chunked storage: refused by the walk
    with pytest.raises(ValueError, match="chunked storage"):
        _wrapped("sequential").load_weights(tmp_path / "w.weights.h5")


def _datasets(h5_file):
    names = []
    h5_file.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
    return names


# ------------------------------------------------------------------------------------------------ dtype policies
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "bfloat16"])
def test_constructor_dtype_reaches_every_layer_and_survives_a_keras_file(policy, tmp_path):
    model = _cvt(dtype=policy)
    layers = list(sublayers(model))
    assert len(layers) > 100 and {layer.dtype_policy.name for layer in [model, *layers]} == {policy}
    assert keras.config.dtype_policy().name == "float32"  # the global policy is untouched
    expected = _outputs(model)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert {layer.dtype_policy.name for layer in [loaded, *sublayers(loaded)]} == {policy}
    np.testing.assert_array_equal(_outputs(loaded), expected)
    assert keras.backend.standardize_dtype(loaded.weights[0].dtype) == (
        "float32" if policy.startswith("mixed") else "bfloat16")


# ------------------------------------------------------------------------------------------------ quantization, LoRA
def _dense_layers(model):
    return [layer for layer in sublayers(model) if isinstance(layer, keras.layers.Dense)]


def test_int8_quantized_model_round_trips_through_a_keras_file(tmp_path):
    model = _cvt()
    before = _outputs(model)
    model.quantize("int8")
    expected = _outputs(model)
    assert np.abs(expected - before).max() > 0  # quantized, yet close
    np.testing.assert_allclose(expected, before, atol=0.05 * np.abs(before).max())
    model.save(tmp_path / "int8.keras")
    loaded = keras.models.load_model(tmp_path / "int8.keras")
    assert {layer.quantization_mode for layer in _dense_layers(loaded)} == {"int8"}
    np.testing.assert_array_equal(_outputs(loaded), expected)
    model.save_weights(tmp_path / "int8.weights.h5")
    fresh = _cvt(seed=3)
    fresh.quantize("int8")
    fresh.load_weights(tmp_path / "int8.weights.h5")
    np.testing.assert_array_equal(_outputs(fresh), expected)


def test_integer_values_where_a_float_weight_belongs_are_refused_even_with_skip_mismatch(tmp_path):
    quantized = _cvt()
    quantized.quantize("int8")
    quantized.save_weights(tmp_path / "int8.weights.h5")
    with pytest.raises(WeightLoadError, match=r"of another dtype \(file vs model\): .*int8 vs float32"):
        _cvt().load_weights(tmp_path / "int8.weights.h5", skip_mismatch=True)


def test_lora_trains_only_its_weights_and_round_trips(tmp_path):
    model = _cvt()
    dense_layers = _dense_layers(model)
    for dense in dense_layers:
        dense.enable_lora(2)
    assert all({v.name for v in dense.trainable_variables} == {"bias", "lora_kernel_a", "lora_kernel_b"}
               for dense in dense_layers)
    kernels = [(v, v.numpy().copy()) for dense in dense_layers for v in dense.non_trainable_variables]
    before = _outputs(model)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(IMAGES, LABELS, batch_size=4, epochs=3, verbose=0)
    expected = _outputs(model)
    assert np.abs(expected - before).max() > 1e-3
    assert kernels and all(np.array_equal(v.numpy(), value) for v, value in kernels)
    model.save(tmp_path / "lora.keras")  # Keras merges each LoRA product into its kernel
    np.testing.assert_allclose(_outputs(keras.models.load_model(tmp_path / "lora.keras")), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ rematerialisation
def test_rematerialised_blocks_give_the_gradients_of_plain_blocks():
    config = CvtConfig(**TINY)
    plain = _cvt()
    with block_remat_scope(config):
        remat = TFCvtForImageClassification(config, data_format="channels_last")
        remat.build_with_dummy_input()
    remat.set_weights(plain.get_weights())

    def gradients(model):
        with tf.GradientTape() as tape:
            loss = model(IMAGES / 255.0, labels=LABELS, training=True).loss
        return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]

    keras.utils.set_random_seed(1)
    expected = gradients(plain)
    keras.utils.set_random_seed(1)
    for got, want in zip(gradients(remat), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the expected layout
@pytest.mark.parametrize("change", ["plain", "bare-model", "mixed_bfloat16", "int8", "lora", "compiled-and-trained"])
def test_the_expected_layout_is_what_keras_writes(change, tmp_path):
    if change == "bare-model":
        model = _cvt(cls=TFCvtModel)
    else:
        model = _cvt(dtype="mixed_bfloat16" if change == "mixed_bfloat16" else None)
    if change == "int8":
        model.quantize("int8")
    if change == "lora":
        for dense in _dense_layers(model):
            dense.enable_lora(2)
    if change == "compiled-and-trained":
        model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True), metrics=["accuracy"])
        model.fit(IMAGES, LABELS, batch_size=4, epochs=1, verbose=0)
    model.save_weights(tmp_path / "w.weights.h5")
    with h5py.File(tmp_path / "w.weights.h5", "r") as f:
        written = {name: (tuple(f[name].shape), f[name].dtype.name) for name in _datasets(f)
                   if not name.startswith("optimizer/")}
    layout, _ = file_layout(model)
    assert {path: shape for path, (shape, _) in layout.items()} == {p: s for p, (s, _) in written.items()}
    assert {path for path, (_, dtype) in layout.items() if dtype == "int8"} == {
        path for path, (_, dtype) in written.items() if dtype == "int8"}


def test_a_file_refused_by_the_walk_is_refused_before_any_weight_is_assigned(tmp_path):
    model = _cvt()
    model.save_weights(tmp_path / "w.weights.h5")
    with h5py.File(tmp_path / "w.weights.h5", "r+") as f:
        f["cvt/link"] = h5py.SoftLink("/classifier")
    fresh = _cvt(seed=4)
    before = [v.numpy().copy() for v in fresh.weights]
    with pytest.raises(CheckpointError, match="soft link"):
        fresh.load_weights(tmp_path / "w.weights.h5")
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, fresh.weights, strict=True))
