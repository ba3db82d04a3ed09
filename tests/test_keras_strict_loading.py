"""Keras weight files load strictly into our Keras models: a `model.weights.h5` or `.keras` whose config was edited
(cls token removed, fewer or more layers than the weights hold, another class count), or whose file lacks or adds
a sub-layer, is refused with the missing, unexpected and mis-shaped weights listed, by `load_weights`,
`keras.models.load_model` and `cvt convert`. Also: the Keras model on an empty batch, and out-of-range labels in
its loss."""

from __future__ import annotations

import json
import os
import shutil
import zipfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from conversion_helpers import cli, leftovers  # noqa: E402

from cvt_core import CvtConfig  # noqa: E402
from cvt_core.weights import WeightLoadError  # noqa: E402
from cvt_tf import TFCvtForImageClassification, TFCvtModel  # noqa: E402

BASE = dict(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 2], num_labels=3, image_size=32)
PIXELS = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)

# edited config -> a name the error must list (a model weight for missing / mis-shaped, a file path for unexpected)
EDITS = {
    "cls-token-removed": (dict(cls_token=[False, False, False]), "1 unexpected", "tf_cvt_stage_2/vars/0"),
    "fewer-layers": (dict(depth=[1, 1, 1]), "unexpected", "tf_cvt_stage_2/blocks/tf_cvt_layer_1/"),
    "more-layers": (dict(depth=[1, 1, 3]), "missing", "cvt.encoder.stages.2.layers.2."),
    "other-class-count": (dict(num_labels=5), "2 mis-shaped", "classifier.weight (24, 3) vs (24, 5)"),
}


def _edited(config: dict, **changes) -> dict:
    config = dict(config, **changes)
    if "num_labels" in changes:  # keep the label maps consistent, as an edit by hand would
        n = changes["num_labels"]
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(n)}
    return config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`cvt convert --to keras` of a random checkpoint: config.json, model.weights.h5, model.keras; and the logits
    of the source weights."""
    from conversion.pipeline import make_random_checkpoint

    root = tmp_path_factory.mktemp("keras-strict")
    make_random_checkpoint(str(root / "src"), CvtConfig(**BASE), seed=11)
    code, _, err = cli("convert", root / "src", root / "k", "--to", "keras")
    assert code == 0, err
    reference = TFCvtForImageClassification.from_pretrained(str(root / "src"))
    return root, reference(PIXELS, training=False).logits.numpy()


def _edited_weights_folder(root, name, changes):
    """config.json edited + the unchanged model.weights.h5, in a folder of its own."""
    folder = root / f"weights-{name}"
    folder.mkdir(exist_ok=True)
    with open(root / "k" / "config.json") as f:
        config = _edited(json.load(f), **changes)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    if not (folder / "model.weights.h5").exists():
        shutil.copyfile(root / "k" / "model.weights.h5", folder / "model.weights.h5")
    return folder


def _edited_keras_file(root, name, changes):
    """model.keras with the CvT config inside its config.json edited (its weights unchanged)."""
    path = root / f"{name}.keras"
    with zipfile.ZipFile(root / "k" / "model.keras") as source, zipfile.ZipFile(path, "w") as target:
        for item in source.namelist():
            data = source.read(item)
            if item == "config.json":
                outer = json.loads(data)
                outer["config"]["config"] = _edited(outer["config"]["config"], **changes)
                data = json.dumps(outer).encode()
            target.writestr(item, data)
    return path


def _model(changes) -> TFCvtForImageClassification:
    model = TFCvtForImageClassification(CvtConfig(**_edited(BASE, **changes)), data_format="channels_first")
    model.build_with_dummy_input()
    return model


def _values(model):
    return [v.numpy().copy() for v in model.weights]


# ------------------------------------------------------------------------------------------------ load_weights
@pytest.mark.parametrize("case", sorted(EDITS))
@pytest.mark.parametrize("file_name", ["model.weights.h5", "model.keras"])
def test_load_weights_refuses_a_file_of_another_config_and_keeps_the_model(saved, case, file_name):
    root, _ = saved
    changes, kind, listed = EDITS[case]
    model = _model(changes)
    before = _values(model)
    with pytest.raises(WeightLoadError) as caught:
        model.load_weights(str(root / "k" / file_name))
    message = str(caught.value)
    assert "\n" not in message and kind in message and listed in message, message
    assert message.startswith(str(root / "k" / file_name))
    assert all(np.array_equal(a, b) for a, b in zip(before, _values(model), strict=True))  # nothing assigned


def test_load_weights_refuses_a_file_missing_a_sub_layer_or_holding_an_extra_one(saved, tmp_path):
    root, _ = saved
    lacking, extra = tmp_path / "lacking.weights.h5", tmp_path / "extra.weights.h5"
    for path in (lacking, extra):
        shutil.copyfile(root / "k" / "model.weights.h5", path)
    with h5py.File(lacking, "a") as f:
        del f["layernorm"]
    with h5py.File(extra, "a") as f:
        f.create_group("cvt/encoder/stages/tf_cvt_stage_3/vars").create_dataset("0", data=np.zeros((1, 1, 24)))
    with pytest.raises(WeightLoadError, match=r"2 missing from the file: layernorm\.weight, layernorm\.bias"):
        _model({}).load_weights(str(lacking))
    with pytest.raises(WeightLoadError, match=r"1 unexpected in the file: cvt/encoder/stages/tf_cvt_stage_3/vars/0"):
        _model({}).load_weights(str(extra))


@pytest.mark.parametrize("file_name", ["model.weights.h5", "model.keras"])
def test_load_weights_of_a_matching_file_gives_the_same_logits(saved, file_name):
    root, logits = saved
    model = _model({})
    model.load_weights(str(root / "k" / file_name))
    np.testing.assert_array_equal(model(PIXELS, training=False).logits.numpy(), logits)


def test_load_weights_skip_mismatch_warns_with_the_list(saved):
    root, _ = saved
    with pytest.warns(UserWarning, match="1 unexpected in the file: cvt/encoder/stages/tf_cvt_stage_2/vars/0"):
        _model(dict(cls_token=[False, False, False])).load_weights(str(root / "k" / "model.weights.h5"),
                                                                   skip_mismatch=True)


# ------------------------------------------------------------------------------------------------ keras.models.load_model
@pytest.mark.parametrize("case", sorted(EDITS))
def test_load_model_refuses_a_keras_file_whose_config_was_edited(saved, case):
    root, _ = saved
    changes, kind, listed = EDITS[case]
    with pytest.raises(ValueError) as caught:
        keras.models.load_model(str(_edited_keras_file(root, case, changes)))
    assert "the Keras weights do not match the model's config" in str(caught.value)
    assert kind in str(caught.value) and listed in str(caught.value)


def test_load_model_of_an_unedited_keras_file_gives_the_same_logits(saved):
    root, logits = saved
    model = keras.models.load_model(str(root / "k" / "model.keras"))
    np.testing.assert_array_equal(model(PIXELS, training=False).logits.numpy(), logits)


# ------------------------------------------------------------------------------------------------ cvt convert
# every edit through model.weights.h5; through .keras (its own load path) one edit by default, the rest slow
@pytest.mark.parametrize("case, file_kind", [
    pytest.param(case, kind, marks=[pytest.mark.slow] if kind == "keras" and case != "cls-token-removed" else [])
    for kind in ("weights.h5", "keras") for case in sorted(EDITS)])
def test_convert_refuses_keras_weights_of_another_config_in_one_line(saved, tmp_path, case, file_kind):
    root, _ = saved
    changes, kind, _ = EDITS[case]
    if file_kind == "keras":
        source = _edited_keras_file(root, f"cli-{case}", changes)
    else:
        source = _edited_weights_folder(root, case, changes) / "model.weights.h5"
    code, out, err = cli("convert", source, tmp_path / "out", "--to", "torch")
    assert code == 2, err
    assert err.startswith(f"cvt: error: {source}: the weights do not match the config: ") and err.count("\n") == 1, err
    assert kind.split()[-1] in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_convert_of_unedited_keras_files_still_succeeds(saved, tmp_path):
    root, _ = saved
    for name in ("model.weights.h5", "model.keras"):
        code, _, err = cli("convert", root / "k" / name, tmp_path / name, "--to", "torch")
        assert code == 0, err


# ------------------------------------------------------------------------------------------------ empty batch
@pytest.mark.parametrize("cls_token", [[False, False, True], [False, False, False]])
def test_empty_batch_gives_empty_outputs_eagerly_in_a_graph_and_in_predict(cls_token):
    config = CvtConfig(**dict(BASE, cls_token=cls_token))
    model = TFCvtForImageClassification(config, data_format="channels_first")
    model.build_with_dummy_input()
    empty = np.zeros((0, 3, 32, 32), np.float32)
    out = model(empty, output_hidden_states=True, training=False)
    assert out.logits.shape == (0, 3)
    assert [tuple(h.shape) for h in out.hidden_states] == [(0, 8, 8, 8), (0, 16, 4, 4), (0, 24, 2, 2)]
    graph = tf.function(lambda x: model(x, training=False).logits,
                        input_signature=[tf.TensorSpec((None, 3, 32, 32), tf.float32)])
    assert tuple(graph(tf.constant(empty)).shape) == (0, 3)
    # the same graph on a real batch computes what the eager call does
    np.testing.assert_allclose(graph(tf.constant(PIXELS)).numpy(), model(PIXELS, training=False).logits.numpy(),
                               rtol=1e-5, atol=1e-6)
    assert model.predict(empty, verbose=0).shape == (0, 3)
    backbone = TFCvtModel(config, data_format="channels_first")
    backbone.build_with_dummy_input()
    base = backbone(empty, training=False)
    assert tuple(base.last_hidden_state.shape) == (0, 24, 2, 2)
    assert (base.cls_token_value is None) == (not cls_token[-1])


# ------------------------------------------------------------------------------------------------ labels
def test_out_of_range_label_is_refused_naming_num_labels_and_the_label():
    model = _model({})
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, num_labels=3\); got 5"):
        model(PIXELS, labels=np.array([0, 5]), training=False)
    with pytest.raises(ValueError, match=r"num_labels=3\); got -2"):
        model.compute_classification_loss(np.array([-2, 1]), tf.zeros((2, 3)))
    assert np.isfinite(float(model(PIXELS, labels=np.array([2, -100]), training=False).loss))  # -100 is ignored


def test_out_of_range_label_inside_a_graph_fails_with_the_same_message():
    """The loss as fit's train step runs it: traced into a graph, where the check is an assertion."""
    model = _model({})
    loss = tf.function(model.compute_classification_loss)
    assert np.isfinite(float(loss(np.array([0, 2]), tf.zeros((2, 3)))))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels must be class indices in \[0, num_labels=3\); got\] \[3\]"):
        loss(np.array([1, 3]), tf.zeros((2, 3)))


@pytest.mark.slow
def test_out_of_range_label_in_fit_fails_the_step_with_the_same_message():
    model = _model({})
    model.compile(keras.optimizers.Adam(1e-3))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels must be class indices in \[0, num_labels=3\); got\] \[3\]"):
        model.fit(PIXELS, np.array([1, 3]), batch_size=2, epochs=1, verbose=0)
