"""Training the Keras model like any Keras model (`compile`/`fit`/`evaluate`/`predict`/`save`), transformers' style
(labels inside the inputs, no compiled loss), mixed bfloat16, and moving trained weights between the frameworks:
the same eval predictions, the same BatchNorm update and the same drop-path schedule on both sides."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

from cvt_core.outputs import CvtImageClassifierOutput  # noqa: E402
from cvt_tf import TFCvtForImageClassification  # noqa: E402
from cvt_tf import training as kt  # noqa: E402
from cvt_torch import CvtForImageClassification  # noqa: E402
from cvt_torch import training as tt  # noqa: E402
from training_helpers import digits, small_config, torch_threads  # noqa: E402

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def keras_model(config, seed=0):
    keras.utils.set_random_seed(seed)
    model = TFCvtForImageClassification(config, data_format="channels_first")
    model.build_with_dummy_input()
    return model


@pytest.fixture(scope="module")
def keras_trained_on_digits():
    """A small CvT trained for 4 epochs with an ordinary Keras compile/fit."""
    train_x, train_y, val_x, val_y = digits()
    model = keras_model(small_config())
    steps = 4 * int(np.ceil(len(train_y) / 32))
    model.compile(optimizer=keras.optimizers.AdamW(kt.WarmupCosineSchedule(3e-3, steps, steps // 10),
                                                   weight_decay=0.05),
                  loss=SCCE, metrics=["accuracy"])
    history = model.fit(train_x, train_y, batch_size=32, epochs=4, validation_data=(val_x, val_y), verbose=0)
    return model, history


def test_keras_compile_and_fit_learn_the_digits(keras_trained_on_digits):
    model, history = keras_trained_on_digits
    val_x, val_y = digits()[2:]
    assert set(history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    results = model.evaluate(val_x, val_y, batch_size=128, verbose=0, return_dict=True)
    assert results["accuracy"] >= 0.9, results
    assert results["accuracy"] == pytest.approx(history.history["val_accuracy"][-1])


def test_predict_returns_float32_logits_while_calling_returns_the_output_container(keras_trained_on_digits):
    model, _ = keras_trained_on_digits
    val_x = digits()[2][:10]
    predicted = model.predict(val_x, batch_size=4, verbose=0)
    assert isinstance(predicted, np.ndarray) and predicted.shape == (10, 10) and predicted.dtype == np.float32
    called = model(val_x)
    assert isinstance(called, CvtImageClassifierOutput)
    np.testing.assert_allclose(predicted, called.logits.numpy(), atol=1e-5)


def test_keras_file_round_trip_restores_model_and_training_state(keras_trained_on_digits, tmp_path):
    model, _ = keras_trained_on_digits
    val_x, val_y = digits()[2:]
    path = str(tmp_path / "digits.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is TFCvtForImageClassification and loaded.config == model.config
    np.testing.assert_array_equal(loaded.predict(val_x, verbose=0), model.predict(val_x, verbose=0))
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) > 0
    history = loaded.fit(val_x[:64], val_y[:64], batch_size=32, epochs=1, verbose=0)  # training goes on
    assert np.isfinite(history.history["loss"][0]) and "accuracy" in history.history


def test_keras_trained_weights_give_identical_eval_predictions_in_pytorch(keras_trained_on_digits, tmp_path):
    model, _ = keras_trained_on_digits
    val_x = digits()[2]
    model.save_pretrained(tmp_path)
    keras_logits = model.predict(val_x, verbose=0)
    torch_model = CvtForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(val_x)).logits.numpy()
    np.testing.assert_array_equal(torch_logits.argmax(1), keras_logits.argmax(1))
    np.testing.assert_allclose(torch_logits, keras_logits, atol=1e-4)


def test_pytorch_trained_weights_give_identical_eval_predictions_in_keras(tmp_path):
    train_x, train_y, val_x, _ = digits()
    with torch_threads(1):
        torch.manual_seed(5)
        model = CvtForImageClassification(small_config())
        optimizer = tt.make_optimizer(model, 3e-3)
        for start in range(0, 640, 64):  # enough steps to move every weight and BatchNorm statistic
            tt.train_step(model, optimizer, train_x[start:start + 64], train_y[start:start + 64])
        torch_logits = tt.predict_logits(model, val_x)
    model.save_pretrained(tmp_path)
    keras_logits = TFCvtForImageClassification.from_pretrained(tmp_path).predict(val_x, verbose=0)
    np.testing.assert_array_equal(keras_logits.argmax(1), torch_logits.argmax(1))
    np.testing.assert_allclose(keras_logits, torch_logits, atol=1e-4)


def _torch_state_from_keras(model):
    from training_helpers import keras_state_arrays

    return keras_state_arrays(model)


def test_one_training_step_updates_weights_and_batchnorm_statistics_as_pytorch_does():
    config = small_config(drop_path_rate=[0.0] * 3)
    x, y = digits()[0][:32], digits()[1][:32]
    torch.manual_seed(6)
    torch_model = CvtForImageClassification(config)
    keras_model_ = keras_model(config)
    for entry_name, variable in keras_model_.canonical_weights().items():
        from cvt_core.weights import weight_table

        entry = {e.torch_name(True): e for e in weight_table(config, True)}[entry_name]
        variable.assign(entry.to_keras(torch_model.state_dict()[entry_name].numpy()))
    tt.train_step(torch_model, torch.optim.SGD(torch_model.parameters(), lr=0.5), x, y)
    keras_model_.compile(optimizer=keras.optimizers.SGD(0.5), loss=SCCE)
    keras_model_.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    after = _torch_state_from_keras(keras_model_)
    moved = 0
    for name, value in torch_model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        np.testing.assert_allclose(after[name], value.numpy(), atol=2e-5, rtol=1e-4, err_msg=name)
        moved += "running_var" in name and not np.allclose(value.numpy(), 1.0)
    assert moved == 12  # every BatchNorm's running variance moved, identically (unbiased) in both frameworks


def test_transformers_style_fit_with_labels_in_the_inputs_equals_a_compiled_loss():
    x, y = digits()[0][:32], digits()[1][:32]
    config = small_config(drop_path_rate=[0.0] * 3)
    compiled = keras_model(config, seed=7)
    own_loss = keras_model(config, seed=7)
    compiled.compile(optimizer=keras.optimizers.SGD(0.5), loss=SCCE, metrics=["accuracy"])
    own_loss.compile(optimizer=keras.optimizers.SGD(0.5), metrics=["accuracy"])  # no loss: the model's own
    first = compiled.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0).history
    second = own_loss.fit({"pixel_values": x, "labels": y}, batch_size=32, epochs=1, shuffle=False, verbose=0).history
    assert first["loss"][0] == pytest.approx(second["loss"][0], rel=1e-5)
    assert first["accuracy"] == second["accuracy"]
    for a, b in zip(compiled.trainable_variables, own_loss.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    evaluated = own_loss.evaluate({"pixel_values": x, "labels": y}, verbose=0, return_dict=True)
    assert set(evaluated) == {"loss", "accuracy"}
    with_y = own_loss.evaluate(x, y, verbose=0, return_dict=True)  # labels as y also reach the model's loss
    assert with_y["loss"] == pytest.approx(evaluated["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="no loss to train on"):  # neither a compiled loss nor labels
        own_loss.fit(x, batch_size=32, epochs=1, verbose=0)


def test_mixed_bfloat16_policy_trains_with_float32_variables_and_loss():
    x, y = digits()[0][:64], digits()[1][:64]
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = keras_model(small_config(drop_path_rate=[0.0] * 3))
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=SCCE, metrics=["accuracy"])
        history = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history
        assert model(x[:2]).logits.dtype == tf.bfloat16
        assert model.predict(x[:2], verbose=0).dtype == np.float32
        assert model(x[:2], labels=y[:2]).loss.dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(v.dtype == "float32" for v in model.variables if "iteration" not in v.path)
    assert all(np.isfinite(history["loss"])) and history["loss"][-1] < 0.8 * history["loss"][0], history["loss"]


def test_mixed_bfloat16_inference_of_trained_weights_agrees_with_float32_on_real_digits(keras_trained_on_digits):
    """The speed issue's bf16 promise on weights whose top-1 means something: the same trained weights under
    mixed_bfloat16 give the float32 prediction for >= 99% of the 360 held-out handwritten digits."""
    model, _ = keras_trained_on_digits
    val_x = digits()[2]
    expected = model.predict(val_x, verbose=0)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        bf16_model = keras_model(small_config())
        bf16_model.set_weights(model.get_weights())
        got = bf16_model.predict(val_x, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    agreement = float(np.mean(got.argmax(1) == expected.argmax(1)))
    assert agreement >= 0.99, agreement
    assert 0 < np.abs(got - expected).max() < 0.5  # really bf16, and close


def test_warmup_cosine_schedule_equals_the_pytorch_one():
    schedule = kt.WarmupCosineSchedule(2e-3, total_steps=50, warmup_steps=7)
    keras_rates = [float(schedule(step)) for step in range(55)]
    torch_rates = [2e-3 * tt.warmup_cosine_factor(step, 50, 7) for step in range(55)]
    np.testing.assert_allclose(keras_rates, torch_rates, rtol=1e-6, atol=2e-3 * 1e-6)  # float32 arithmetic
    assert keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule)).get_config() == \
        schedule.get_config()


def test_drop_path_schedule_is_per_layer_and_identical_in_both_frameworks():
    config = small_config(depth=[1, 3, 5], drop_path_rate=[0.1, 0.2, 0.4])
    expected = [[0.0], [0.0, 0.1, 0.2], [0.0, 0.1, 0.2, 0.3, 0.4]]
    torch_rates = [[layer.drop_path.drop_prob for layer in stage.layers]
                   for stage in CvtForImageClassification(config).cvt.encoder.stages]
    keras_rates = [[block.drop_path.drop_prob for block in stage.blocks]
                   for stage in TFCvtForImageClassification(config, data_format="channels_first").cvt.encoder.stages]
    np.testing.assert_allclose(torch_rates[1] + torch_rates[2], expected[1] + expected[2], atol=1e-12)
    np.testing.assert_allclose(keras_rates[1] + keras_rates[2], expected[1] + expected[2], atol=1e-12)
    assert torch_rates[0] == keras_rates[0] == [0.0]


def test_training_true_turns_on_drop_path_and_eval_is_deterministic():
    config = small_config(drop_path_rate=[0.0, 0.0, 0.5])
    model = keras_model(config)
    x = digits()[0][:8]
    first, second = model(x, training=True).logits.numpy(), model(x, training=True).logits.numpy()
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(model(x).logits.numpy(), model(x, training=False).logits.numpy())


def test_synchronize_batch_norm_marks_every_batchnorm_and_is_neutral_without_a_strategy():
    config = small_config(drop_path_rate=[0.0] * 3)
    x = digits()[0][:8]
    plain, synced = keras_model(config, seed=8), keras_model(config, seed=8)
    assert kt.synchronize_batch_norm(synced) == 12
    np.testing.assert_allclose(synced(x, training=True).logits.numpy(), plain(x, training=True).logits.numpy(),
                               atol=1e-6)
    synced_moving = np.concatenate([v.numpy() for v in synced.variables if "moving_variance" in v.path])
    plain_moving = np.concatenate([v.numpy() for v in plain.variables if "moving_variance" in v.path])
    assert not np.allclose(plain_moving, 1.0)
    np.testing.assert_allclose(synced_moving, plain_moving, atol=1e-6)
    assert kt.synchronize_batch_norm(synced, enabled=False) == 12
