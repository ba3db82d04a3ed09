"""`cvt_torch.training.fit` and `cvt_tf.training.fit` called directly on a small CvT and a few digits: the same
argument names on both sides, a `FitResult` with one record per epoch and validation metrics when validation data
is given, weights that moved, the echoed lines and progress bars, and one-line refusals of bad data and of the
other framework's options; plus the step schedule both share.

Tracing a Keras training step takes tens of seconds on a small CPU, so Keras trains once here (the `fitted`
fixture); the cases that need another run train in PyTorch only."""

from __future__ import annotations

import inspect
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cvt_core.training import FitResult, TrainingSchedule, training_schedule  # noqa: E402
from cvt_tf import TFCvtForImageClassification  # noqa: E402
from cvt_tf import training as kt  # noqa: E402
from cvt_torch import CvtForImageClassification  # noqa: E402
from cvt_torch import training as tt  # noqa: E402
from training_helpers import digits, small_config  # noqa: E402

FRAMEWORKS = ("torch", "keras")
EPOCHS, BATCH_SIZE, TRAIN_IMAGES, VAL_IMAGES = 2, 32, 64, 32
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH_SIZE


def fit_function(framework: str):
    return tt.fit if framework == "torch" else kt.fit


def build_small_model(framework: str):
    if framework == "torch":
        return CvtForImageClassification(small_config())
    model = TFCvtForImageClassification(small_config(), data_format="channels_first")
    model.build_with_dummy_input()
    return model


def weight_arrays(framework: str, model) -> list:
    if framework == "torch":
        return [value.detach().numpy().copy() for value in model.state_dict().values()]
    return [np.array(value) for value in model.get_weights()]


def small_data(validation: bool = True) -> tuple:
    train_x, train_y, val_x, val_y = digits()
    train = (train_x[:TRAIN_IMAGES], train_y[:TRAIN_IMAGES])
    return train + ((val_x[:VAL_IMAGES], val_y[:VAL_IMAGES]) if validation else (None, None))


def refuse_to_build():
    pytest.fail("fit built the model although its arguments were refused")


@pytest.fixture(scope="module", params=FRAMEWORKS)
def fitted(request):
    """One 2-epoch fit with validation data per framework: (framework, result, the model fit built and its initial
    weights, the echoed lines, [description, batches drawn, finished] of each progress bar)."""
    framework = request.param
    built = {}

    def build_model():
        built["model"] = build_small_model(framework)
        built["initial"] = weight_arrays(framework, built["model"])
        return built["model"]

    bars = []

    def progress(iterable, description):
        bar = [description, 0, False]
        bars.append(bar)
        for item in iterable:
            bar[1] += 1
            yield item
        bar[2] = True

    lines = []
    result = fit_function(framework)(build_model, *small_data(), epochs=EPOCHS, batch_size=BATCH_SIZE,
                                     learning_rate=3e-3, seed=0, threads=1, echo=lines.append, progress=progress)
    return framework, result, built, lines, bars


def test_both_fit_functions_take_the_same_argument_names():
    assert list(inspect.signature(tt.fit).parameters) == list(inspect.signature(kt.fit).parameters)


def test_fit_returns_one_record_per_epoch_with_finite_losses_and_validation_metrics(fitted):
    _, result, _, _, _ = fitted
    assert isinstance(result, FitResult)
    assert [record["epoch"] for record in result.history] == list(range(1, EPOCHS + 1))
    for record in result.history:
        assert np.isfinite(record["train_loss"]) and 0 <= record["train_accuracy"] <= 1, record
        assert np.isfinite(record["val_loss"]) and 0 <= record["val_accuracy"] <= 1, record
    assert result.val_loss == result.history[-1]["val_loss"] and result.train_loss == result.history[-1]["train_loss"]
    assert result.steps == EPOCHS * STEPS_PER_EPOCH
    assert result.is_main and result.world_size == 1 and result.seconds > 0


def test_fit_trains_the_model_it_built(fitted):
    framework, result, built, _, _ = fitted
    assert result.model is built["model"]
    moved = [not np.array_equal(before, after)
             for before, after in zip(built["initial"], weight_arrays(framework, result.model))]
    assert sum(moved) > len(moved) // 2, f"{sum(moved)} of {len(moved)} weight arrays changed"


def test_fit_echoes_its_setup_and_one_line_per_epoch(fitted):
    framework, _, _, lines, _ = fitted
    assert lines[0].startswith(f"training with {'PyTorch' if framework == 'torch' else 'Keras'} ")
    assert f"{EPOCHS} epochs x {STEPS_PER_EPOCH} steps, global batch {BATCH_SIZE}" in lines[0]
    assert [line.split("  ")[0] for line in lines[1:]] == [f"epoch {i}/{EPOCHS}" for i in range(1, EPOCHS + 1)]
    assert all("val_acc" in line for line in lines[1:])


def test_fit_shows_a_progress_bar_over_every_batch_of_each_epoch(fitted):
    _, _, _, _, bars = fitted
    assert bars == [[f"epoch {i}/{EPOCHS}", STEPS_PER_EPOCH, True] for i in range(1, EPOCHS + 1)]


def test_torch_fit_without_validation_data_reports_no_validation_metrics():
    result = tt.fit(lambda: build_small_model("torch"), *small_data(validation=False), epochs=1,
                    batch_size=BATCH_SIZE, learning_rate=3e-3, threads=1, echo=None)
    assert len(result.history) == 1 and np.isfinite(result.train_loss)
    assert "val_loss" not in result.history[0] and result.val_accuracy is None


def test_torch_fit_is_reproducible_from_its_seed():
    runs = [tt.fit(lambda: build_small_model("torch"), *small_data(validation=False), epochs=1,
                   batch_size=BATCH_SIZE, learning_rate=3e-3, seed=4, threads=1, echo=None) for _ in range(2)]
    assert runs[0].train_loss == runs[1].train_loss
    for first, second in zip(weight_arrays("torch", runs[0].model), weight_arrays("torch", runs[1].model)):
        np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("framework, options, message", [
    ("torch", dict(strategy="mirrored"), "run PyTorch distributed under torchrun"),
    ("torch", dict(cpu_replicas=2), "run PyTorch distributed under torchrun"),
    ("keras", dict(compile=True), "compile=True is torch.compile"),
    ("keras", dict(cpu_replicas=2), "cpu_replicas needs strategy='mirrored'"),
])
def test_fit_refuses_the_other_frameworks_options_before_building(framework, options, message):
    with pytest.raises(ValueError, match=message):
        fit_function(framework)(refuse_to_build, *small_data(), epochs=1, batch_size=BATCH_SIZE, learning_rate=1e-3,
                                **options)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("change, message", [
    (dict(train_labels=np.zeros(TRAIN_IMAGES - 1, np.int64)), "has 64 images but train_labels 63 labels"),
    (dict(val_labels=None), "pass val_pixels and val_labels together"),
    (dict(train_pixels=np.zeros((0, 3, 16, 16), np.float32), train_labels=np.zeros(0, np.int64)), "no images"),
    (dict(epochs=0), "epochs must be at least 1"),
])
def test_fit_refuses_data_or_settings_it_cannot_train_on_in_one_line(framework, change, message):
    train_x, train_y, val_x, val_y = small_data()
    arguments = dict(train_pixels=train_x, train_labels=train_y, val_pixels=val_x, val_labels=val_y, epochs=1,
                     batch_size=BATCH_SIZE, learning_rate=1e-3)
    arguments.update(change)
    with pytest.raises(ValueError, match=message) as caught:
        fit_function(framework)(refuse_to_build, **arguments)
    assert "\n" not in str(caught.value)


def test_training_schedule_rounds_the_warmup_to_steps_and_leaves_the_last_step_to_the_decay():
    assert training_schedule(1437, 64, 15, 1.0) == TrainingSchedule(23, 345, 23)
    assert training_schedule(10, 4, 2, 0.5) == TrainingSchedule(3, 6, 2)  # 1.5 steps of warm-up round to 2
    assert training_schedule(10, 4, 1, 5.0) == TrainingSchedule(3, 3, 2)
