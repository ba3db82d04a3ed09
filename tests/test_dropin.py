"""The habits transformers and keras-hub users bring: hub ids through huggingface_hub's cache, presets that say they
have no weights, the preprocessing that travels with the weights, configs transformers can build, `num_parameters()`,
Keras' `summary()`, layout and loss rules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from conversion_helpers import REPO, assert_one_line_error, cli

TINY = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=4, image_size=64,
            id2label={0: "ant", 1: "bee", 2: "cat", 3: "dog"}, label2id={"ant": 0, "bee": 1, "cat": 2, "dog": 3})
CUSTOM_PROCESSOR = dict(size={"shortest_edge": 72}, crop_pct=0.9, image_mean=[0.5, 0.5, 0.5],
                        image_std=[0.25, 0.25, 0.25], resample=2)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _tiny_config(**overrides):
    from cvt_core import CvtConfig

    return CvtConfig(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A seeded random classifier saved by our PyTorch model with a non-default preprocessor_config.json."""
    import torch

    from cvt_core import CvtImageProcessor
    from cvt_torch import CvtForImageClassification

    torch.manual_seed(0)
    model = CvtForImageClassification(_tiny_config()).eval()
    model.image_processor = CvtImageProcessor(**CUSTOM_PROCESSOR)
    directory = tmp_path_factory.mktemp("dropin") / "tiny"
    model.save_pretrained(directory)
    return directory


def _hub_cache(home, repo_id: str, snapshots: dict) -> None:
    """huggingface_hub's cache layout under `home` (HF_HOME): refs name commits, snapshots hold the files."""
    storage = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    for ref, (commit, folder) in snapshots.items():
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
        shutil.copytree(folder, storage / "snapshots" / commit, dirs_exist_ok=True)


_OFFLINE_CHILD = r"""
import json, sys, warnings
import numpy as np
warnings.simplefilter("ignore")
from cvt_core import CvtImageProcessor
from cvt_core.errors import CheckpointError
from cvt_torch import CvtForImageClassification
from cvt_tf import TFCvtForImageClassification
import torch

x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
def torch_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(x)).logits.numpy().tolist()
out = {
    "torch": torch_logits(CvtForImageClassification.from_pretrained("acme/tiny-cvt")),
    "torch_hf_scheme": torch_logits(CvtForImageClassification.from_pretrained("hf://acme/tiny-cvt")),
    "torch_revision": torch_logits(CvtForImageClassification.from_pretrained("acme/tiny-cvt", revision="v2")),
    "torch_local_only": torch_logits(CvtForImageClassification.from_pretrained("acme/tiny-cvt", local_files_only=True)),
    "keras": np.asarray(TFCvtForImageClassification.from_pretrained("acme/tiny-cvt")(x).logits).tolist(),
    "keras_preset": np.asarray(TFCvtForImageClassification.from_preset(
        "hf://acme/tiny-cvt", data_format="channels_first")(x).logits).tolist(),
    "processor": CvtImageProcessor.from_pretrained("acme/tiny-cvt").to_dict(),
    "model_processor": CvtForImageClassification.from_pretrained("acme/tiny-cvt").image_processor.to_dict(),
}
# a transformers user's first lines, and a keras-hub user's, unchanged but for the class names
from PIL import Image
image = Image.fromarray((np.random.default_rng(1).random((80, 90, 3)) * 255).astype(np.uint8))
processor = CvtImageProcessor.from_pretrained("acme/tiny-cvt")
model = CvtForImageClassification.from_pretrained("acme/tiny-cvt")
inputs = processor(image, return_tensors="pt")
out["transformers_lines"] = model(**inputs).logits.detach().numpy().tolist()
classifier = TFCvtForImageClassification.from_preset("hf://acme/tiny-cvt")
nhwc = processor(image, return_tensors="np", data_format="channels_last")["pixel_values"]
out["keras_hub_lines"] = classifier.predict(nhwc, verbose=0).tolist()
try:
    CvtForImageClassification.from_pretrained("acme/not-cached")
except CheckpointError as exc:
    out["uncached"] = str(exc)
print(json.dumps(out))
"""


def test_hub_ids_load_offline_from_huggingface_hubs_cache_in_both_frameworks(tiny_checkpoint, tmp_path):
    import torch

    from cvt_torch import CvtForImageClassification

    other = tmp_path / "other"
    torch.manual_seed(1)
    CvtForImageClassification(_tiny_config()).save_pretrained(other)
    _hub_cache(tmp_path / "hf-home", "acme/tiny-cvt", {"main": (COMMIT, tiny_checkpoint), "v2": (OTHER_COMMIT, other)})
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", PYTHONPATH=REPO,
               KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_CHILD], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        local = CvtForImageClassification.from_pretrained(tiny_checkpoint)(torch.from_numpy(x)).logits.numpy()
        revised = CvtForImageClassification.from_pretrained(other)(torch.from_numpy(x)).logits.numpy()
    for key in ("torch", "torch_hf_scheme", "torch_local_only"):
        np.testing.assert_allclose(out[key], local, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(out["torch_revision"], revised, atol=1e-6)
    assert np.abs(revised - local).max() > 1e-3  # the revision is really another snapshot
    for key in ("keras", "keras_preset"):
        np.testing.assert_allclose(out[key], local, atol=1e-5, err_msg=key)
    assert out["processor"]["size"] == {"shortest_edge": 72} and out["processor"]["crop_pct"] == 0.9
    assert out["model_processor"] == out["processor"]
    from PIL import Image

    from cvt_core import CvtImageProcessor

    image = Image.fromarray((np.random.default_rng(1).random((80, 90, 3)) * 255).astype(np.uint8))
    pixels = CvtImageProcessor.from_pretrained(tiny_checkpoint)(image, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 72, 72)  # the checkpoint's own preprocessing, not the 224 default
    with torch.no_grad():
        expected = CvtForImageClassification.from_pretrained(tiny_checkpoint)(pixels).logits.numpy()
    np.testing.assert_allclose(out["transformers_lines"], expected, atol=1e-6)
    np.testing.assert_allclose(out["keras_hub_lines"], expected, atol=1e-5)
    assert "acme/not-cached" in out["uncached"] and "HF_HUB_OFFLINE" in out["uncached"]
    assert "\n" not in out["uncached"]


def test_a_preset_name_is_refused_by_from_pretrained_with_directions_to_both_ways():
    from cvt_core.errors import CheckpointError
    from cvt_torch import CvtForImageClassification
    from cvt_tf import TFCvtForImageClassification

    for cls in (CvtForImageClassification, TFCvtForImageClassification):
        with pytest.raises(CheckpointError) as caught:
            cls.from_pretrained("cvt-13", num_labels=10, ignore_mismatched_sizes=True)
        message = str(caught.value)
        assert "CvtConfig.from_preset('cvt-13')" in message and "microsoft/cvt-13" in message
        assert "random weights" in message


def test_keras_from_preset_needs_load_weights_false_for_an_architecture_name_and_follows_keras_layout():
    import keras

    from cvt_tf import TFCvtForImageClassification

    with pytest.raises(ValueError, match="load_weights=False"):
        TFCvtForImageClassification.from_preset("cvt-13")
    model = TFCvtForImageClassification.from_preset("cvt-13", load_weights=False, num_labels=7,
                                                    embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3])
    assert model.data_format == keras.config.image_data_format() == "channels_last"
    assert model.config.num_labels == 7 and model.config.image_size == 224
    assert model(np.zeros((1, 32, 32, 3), np.float32)).logits.shape == (1, 7)


def test_save_to_preset_writes_the_folder_from_preset_and_from_pretrained_read(tiny_checkpoint, tmp_path):
    from cvt_tf import TFCvtForImageClassification

    model = TFCvtForImageClassification.from_preset(str(tiny_checkpoint))
    assert model.data_format == "channels_last"
    model.save_to_preset(tmp_path / "preset")
    assert sorted(os.listdir(tmp_path / "preset")) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    x = np.random.default_rng(3).random((2, 64, 64, 3), np.float32)
    again = TFCvtForImageClassification.from_preset(str(tmp_path / "preset"))
    np.testing.assert_allclose(again(x).logits, model(x).logits, atol=1e-6)
    nchw = TFCvtForImageClassification.from_pretrained(tmp_path / "preset")
    assert nchw.data_format == "channels_first"
    np.testing.assert_allclose(nchw(x.transpose(0, 3, 1, 2)).logits, model(x).logits, atol=1e-5)


class _RecordingHfApi:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok, self.token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, revision=None, commit_message=None):
        self.calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), commit_message))


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_save_pretrained_pushes_the_written_folder_to_the_hub_when_asked(framework, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingHfApi)
    _RecordingHfApi.calls = []
    if framework == "torch":
        from cvt_torch import CvtForImageClassification as Model
    else:
        from cvt_tf import TFCvtForImageClassification as Model
    model = Model(_tiny_config())
    model.save_pretrained(tmp_path / "local")
    assert _RecordingHfApi.calls == []
    model.save_pretrained(tmp_path / "my-cvt", push_to_hub=True, token="hf_x", private=True)
    model.save_pretrained(tmp_path / "again", push_to_hub=True, repo_id="acme/cvt", commit_message="fine-tuned")
    files = ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert _RecordingHfApi.calls == [
        ("create_repo", "my-cvt", True, True, "hf_x"), ("upload_folder", "my-cvt", files, "Upload CvT checkpoint"),
        ("create_repo", "acme/cvt", None, True, None), ("upload_folder", "acme/cvt", files, "fine-tuned")]


def test_preprocessing_follows_the_weights_through_save_convert_and_export(tiny_checkpoint, tmp_path):
    from cvt_core import CvtImageProcessor
    from cvt_torch import CvtForImageClassification
    from cvt_tf import TFCvtForImageClassification

    expected = CvtImageProcessor(**CUSTOM_PROCESSOR)
    assert CvtImageProcessor.from_pretrained(tiny_checkpoint) == expected
    torch_model = CvtForImageClassification.from_pretrained(tiny_checkpoint)
    keras_model = TFCvtForImageClassification.from_pretrained(tiny_checkpoint)
    assert torch_model.image_processor == keras_model.image_processor == expected
    torch_model.save_pretrained(tmp_path / "torch-saved")
    keras_model.save_pretrained(tmp_path / "keras-saved")
    code, out, err = cli("convert", tiny_checkpoint, tmp_path / "converted", "--to", "all")
    assert code == 0, err
    code, out, err = cli("export", tiny_checkpoint, tmp_path / "exported", "--format", "onnx", "--quiet")
    assert code == 0, err
    for folder in ("torch-saved", "keras-saved", "converted", "exported"):
        assert CvtImageProcessor.from_pretrained(tmp_path / folder) == expected, folder


def test_save_pretrained_writes_the_released_preprocessing_for_the_config_when_the_model_has_none(tmp_path):
    from cvt_core import CvtImageProcessor
    from cvt_torch import CvtModel
    from cvt_tf import TFCvtModel

    CvtModel(_tiny_config(image_size=384)).save_pretrained(tmp_path / "torch")
    TFCvtModel(_tiny_config(image_size=None)).save_pretrained(tmp_path / "keras")
    assert CvtImageProcessor.from_pretrained(tmp_path / "torch") == CvtImageProcessor.for_resolution(384)
    assert CvtImageProcessor.from_pretrained(tmp_path / "keras") == CvtImageProcessor.for_resolution(224)


def test_config_json_always_names_image_size(tmp_path):
    from cvt_core import CvtConfig

    config = _tiny_config(image_size=None)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == 224
    assert config.image_size is None  # the object itself is left as it was
    assert CvtConfig.from_pretrained(tmp_path).image_size == 224


@pytest.mark.parametrize("overrides, fragment", [
    (dict(hidden_act="quick_gelu"), "quick_gelu"),
    (dict(depth=[1, 1, 3]), "depth[s] <= s"),
    (dict(qkv_projection_method=["dw_bn", "avg", "dw_bn"]), "'avg'"),
    (dict(cls_token=[False, True, True]), "cls_token on stage 1"),
    (dict(cls_token=[False, False, False]), "without a cls token"),
])
def test_save_pretrained_warns_once_when_transformers_cannot_reproduce_the_config(overrides, fragment, tmp_path):
    from cvt_torch import CvtForImageClassification

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CvtForImageClassification(_tiny_config(**overrides)).save_pretrained(tmp_path / "odd")
        CvtForImageClassification(_tiny_config()).save_pretrained(tmp_path / "fine")
    messages = [str(w.message) for w in caught if "transformers cannot" in str(w.message)]
    assert len(messages) == 1 and fragment in messages[0] and str(tmp_path / "odd") in messages[0]


def test_num_parameters_is_a_method_counting_what_pytorch_counts_in_both_frameworks():
    from cvt_core import count_parameters
    from cvt_torch import CvtForImageClassification
    from cvt_tf import TFCvtForImageClassification

    config = _tiny_config()
    torch_model, keras_model = CvtForImageClassification(config), TFCvtForImageClassification(config)
    total = sum(p.numel() for p in torch_model.parameters())
    assert torch_model.num_parameters() == keras_model.num_parameters() == total
    assert count_parameters(config, True) >= total  # the table also counts BatchNorm statistics
    for p in torch_model.cvt.parameters():
        p.requires_grad_(False)
    keras_model.cvt.trainable = False
    head = sum(p.numel() for p in torch_model.parameters() if p.requires_grad)
    assert torch_model.num_parameters(only_trainable=True) == keras_model.num_parameters(only_trainable=True) == head
    assert 0 < head < total


def test_keras_summary_of_a_model_never_called_shows_its_parameters():
    from cvt_tf import TFCvtForImageClassification

    model = TFCvtForImageClassification(_tiny_config())
    lines = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    text = "\n".join(lines)
    assert f"{model.count_params():,}" in text and "unbuilt" not in text
    assert model.num_parameters() < model.count_params()  # Keras also counts the BatchNorm statistics


def test_keras_constructor_follows_keras_image_data_format_and_runs_image_dataset_from_directory(tmp_path):
    import keras
    from PIL import Image

    from cvt_tf import TFCvtForImageClassification

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / label / f"{i}.png")
    dataset = keras.utils.image_dataset_from_directory(tmp_path, image_size=(32, 32), batch_size=4, shuffle=False)
    model = TFCvtForImageClassification(_tiny_config(num_labels=2, id2label=None, label2id=None))
    assert model.data_format == "channels_last"
    assert model.predict(dataset, verbose=0).shape == (6, 2)
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        nchw = TFCvtForImageClassification(_tiny_config())
        assert nchw.data_format == "channels_first"
        assert nchw(np.zeros((1, 3, 32, 32), np.float32)).logits.shape == (1, 4)  # the layers inside stay NHWC
    finally:
        keras.config.set_image_data_format(previous)


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_own_loss_warns_once_when_float_labels_make_it_multi_label(framework):
    if framework == "torch":
        import torch

        from cvt_torch import CvtForImageClassification as Model
        to_tensor = torch.from_numpy
    else:
        import tensorflow as tf

        from cvt_tf import TFCvtForImageClassification as Model
        to_tensor = tf.constant
    model = Model(_tiny_config())
    logits = to_tensor(np.zeros((2, 4), np.float32))
    one_hot = to_tensor(np.eye(4, dtype=np.float32)[[1, 2]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.compute_classification_loss(one_hot, logits)
        model.compute_classification_loss(one_hot, logits)
        model.compute_classification_loss(to_tensor(np.array([1, 2])), logits)
    messages = [str(w.message) for w in caught if "problem_type" in str(w.message)]
    assert len(messages) == 1 and "multi-label" in messages[0] and "integer class ids" in messages[0]


def test_keras_own_loss_weighs_samples_as_the_compiled_loss_does():
    import keras

    from cvt_tf import TFCvtForImageClassification

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 32, 32)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 1, -100])
    weights = np.array([0.5, 2.0, 1.0, 0.0, 3.0, 1.0], np.float32)
    model = TFCvtForImageClassification(_tiny_config(), data_format="channels_first")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100))
    compiled = model.evaluate(x, y, sample_weight=weights, batch_size=6, verbose=0)
    model.compile()
    own = model.evaluate(x, y, sample_weight=weights, batch_size=6, verbose=0)
    np.testing.assert_allclose(own, compiled, rtol=1e-5)


def test_transformers_pipeline_on_our_folder_gives_the_top_1_of_cvt_predict(tiny_checkpoint, tmp_path):
    from skimage import data as photos
    from PIL import Image
    from transformers import pipeline

    image = tmp_path / "astronaut.png"
    Image.fromarray(photos.astronaut()).save(image)
    classify = pipeline("image-classification", model=str(tiny_checkpoint), framework="pt")
    ours = classify(str(image), top_k=1)[0]["label"]
    code, out, err = cli("predict", image, "--model", tiny_checkpoint, "--top-k", "1", "--framework", "torch")
    assert code == 0, err
    top1 = [line.split() for line in out.splitlines() if line.strip().startswith("1.")][0]
    assert top1[1] == ours


def test_transformers_tf_loads_a_folder_that_cvt_convert_wrote(tiny_checkpoint, tmp_path):
    from conversion_helpers import run_transformers_tf

    code, out, err = cli("convert", tiny_checkpoint, tmp_path / "hf-tf", "--to", "hf-tf")
    assert code == 0, err
    config = json.loads((tmp_path / "hf-tf" / "config.json").read_text())
    assert config["image_size"] == 64
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run_transformers_tf([{"kind": "run", "checkpoint": str(tmp_path / "hf-tf"), "pixel_values": str(tmp_path / "x.npy"),
                          "output": str(tmp_path / "out.npz"), "with_head": True}])
    import torch

    from cvt_torch import CvtForImageClassification

    with torch.no_grad():
        expected = CvtForImageClassification.from_pretrained(tiny_checkpoint)(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["logits"], expected, atol=1e-4)


def test_cvt_convert_refuses_a_preset_name_as_source_in_one_line(tmp_path):
    assert_one_line_error(*cli("convert", "cvt-13", tmp_path / "out"), "cvt-13", "preset")
