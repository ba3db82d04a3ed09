"""Valid-looking input that used to give wrong answers or deep tracebacks: high-bit-depth images, `cvt predict` on
checkpoints without a classifier, misspelled `from_pretrained` overrides, a file given as the checkpoint folder,
absurd config sizes and out-of-range class labels."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from conversion.pipeline import make_random_checkpoint  # noqa: E402
from conversion_helpers import cli  # noqa: E402
from cvt_core.checkpoint import CheckpointError  # noqa: E402
from cvt_core.config import MAX_IMAGE_SIZE, CvtConfig  # noqa: E402
from cvt_core.image_processing import CvtImageProcessor, HighBitDepthError  # noqa: E402

TINY = dict(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 2], num_labels=3, image_size=32)


def tiny_config(**overrides) -> CvtConfig:
    return CvtConfig(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("classifier")
    make_random_checkpoint(str(directory), tiny_config(), seed=0)
    return directory


def _frameworks():
    from cvt_tf.modeling_cvt import TFCvtForImageClassification
    from cvt_torch import CvtForImageClassification

    return [CvtForImageClassification, TFCvtForImageClassification]


# ------------------------------------------------------------------------------------------ high bit depth
def _gradient16() -> np.ndarray:
    """A 16-bit grey gradient covering the whole range, with a vertical ramp so no two rows are alike."""
    x = np.linspace(0, 65535, 48)[None, :] * np.linspace(0.25, 1.0, 40)[:, None]
    return np.rint(x).astype(np.uint16)


@pytest.mark.parametrize("fmt", ["PNG"])  # TIFF, the other 16-bit grey format, is not read (docs/security.md)
def test_16_bit_grey_file_matches_its_8_bit_version_within_one_level(tmp_path, fmt):
    wide = _gradient16()
    path16 = tmp_path / f"gradient16.{fmt.lower()}"
    Image.fromarray(wide).save(path16, format=fmt)
    assert Image.open(path16).mode.startswith("I;16")
    path8 = tmp_path / "gradient8.png"
    Image.fromarray((wide.astype(np.float64) * 255 / 65535).round().astype(np.uint8)).save(path8)
    plain = CvtImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)
    got = plain([str(path16)])["pixel_values"][0]
    want = plain([str(path8)])["pixel_values"][0]
    assert np.abs(got - want).max() <= 1
    assert got.max() == 255 and got.min() == 0  # the gradient's range survives, not clipped to white


def test_high_bit_depth_pil_images_are_scaled_to_8_bits_by_mode():
    wide = _gradient16()
    eight = (wide.astype(np.float64) / 257).round()
    plain = CvtImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)
    cases = {
        "I;16": Image.fromarray(wide),
        "I": Image.fromarray(wide.astype(np.int32)),  # as 16-bit PGM files open
        "F": Image.fromarray((wide / 65535).astype(np.float32)),  # a float image in 0..1
    }
    for mode, image in cases.items():
        assert image.mode == mode
        got = plain(image)["pixel_values"][0, 0]
        assert np.abs(got - eight).max() <= 1, mode
    # values a 32-bit integer image holds within 0..255 are 8-bit already, as Pillow's own conversion reads them
    small = np.arange(256, dtype=np.int32).reshape(16, 16)
    assert np.array_equal(plain(Image.fromarray(small))["pixel_values"][0, 0], small)
    with pytest.raises(HighBitDepthError, match=r"mode 'I' image with values in \[-5, 65535\]"):
        plain(Image.fromarray(np.array([[-5, 65535]], np.int32)))


# ------------------------------------------------------------------------------------------ predict
def _predict(directory, tmp_path, *extra):
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    return cli("predict", str(image), "--model", str(directory), "--quiet", *extra)


@pytest.mark.parametrize("kind", ["bare-torch", "num-labels-0", "bare-keras"])
def test_predict_refuses_a_checkpoint_without_classifier(tmp_path, kind):
    directory = tmp_path / "checkpoint"
    extra = ()
    if kind == "bare-torch":
        make_random_checkpoint(str(directory), tiny_config(), seed=0, with_head=False)
    elif kind == "num-labels-0":
        make_random_checkpoint(str(directory), tiny_config(num_labels=0), seed=0)
    else:
        source = tmp_path / "source"
        make_random_checkpoint(str(source), tiny_config(), seed=0, with_head=False)
        code, _, err = cli("convert", str(source), str(directory), "--to", "keras", "--no-check", "--quiet")
        assert code == 0, err
        os.unlink(directory / "model.keras")
        extra = ("--framework", "keras")
    code, out, err = _predict(directory, tmp_path, *extra)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"cvt: error: {directory} has no classifier (")
    assert lines[0].endswith("); predict needs an image-classification checkpoint")
    assert ("num_labels=0" in lines[0]) == (kind == "num-labels-0")


# ------------------------------------------------------------------------------------------ from_pretrained
def test_from_pretrained_refuses_misspelled_overrides_and_keeps_its_real_keywords(checkpoint):
    torch_class, keras_class = _frameworks()
    for model_class in (torch_class, keras_class):
        for overrides, named in ((dict(num_label=10), "'num_label' (did you mean 'num_labels'?)"),
                                 (dict(hiden_act="quick_gelu"), "'hiden_act' (did you mean 'hidden_act'?)")):
            with pytest.raises(TypeError, match="unknown config field") as caught:
                model_class.from_pretrained(str(checkpoint), **overrides)
            assert named in str(caught.value)
            with pytest.raises(TypeError, match="unknown config field"):  # also beside an explicit config
                model_class.from_pretrained(str(checkpoint), config=tiny_config(), **overrides)
    model = torch_class.from_pretrained(str(checkpoint), strict=True, ignore_mismatched_sizes=False,
                                        hidden_act="quick_gelu", num_labels=3)
    assert model.config.hidden_act == "quick_gelu"
    model = keras_class.from_pretrained(str(checkpoint), config=tiny_config(), strict=True,
                                        data_format="channels_last", output_hidden_states=True)
    assert model.config.output_hidden_states


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_from_pretrained_given_a_file_asks_for_the_folder(checkpoint, name):
    path = str(checkpoint / name)
    for model_class in _frameworks():
        with pytest.raises(CheckpointError) as caught:
            model_class.from_pretrained(path)
        assert str(caught.value) == f"{path}: is a file; pass the folder that holds config.json"


def test_from_pretrained_on_a_folder_without_config_json_says_so(checkpoint, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    for model_class in _frameworks():
        with pytest.raises(CheckpointError, match=r"no config\.json in this folder \(it holds \['model\.safetensors'\]\)"):
            model_class.from_pretrained(str(tmp_path))


def test_config_from_pretrained_given_a_weights_file_is_one_value_error(checkpoint):
    with pytest.raises(ValueError, match="model.safetensors: not a config.json .*pass the folder that holds config.json"):
        CvtConfig.from_pretrained(checkpoint / "model.safetensors")


# ------------------------------------------------------------------------------------------ config sizes
@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=10 ** 9), f"image_size must be at most {MAX_IMAGE_SIZE}, got 1000000000"),
    (dict(image_size=[224, 10 ** 9]), f"image_size must be at most {MAX_IMAGE_SIZE}"),
    (dict(patch_sizes=[7, 10 ** 9, 3]), r"patch_sizes\[1\] must be at most"),
    (dict(patch_padding=[2, 1, 10 ** 9]), r"patch_padding\[2\] must be at most"),
    (dict(embed_dim=[8, 16, 3 * 10 ** 8]), r"embed_dim\[2\] must be at most"),
    (dict(depth=[1, 10 ** 9, 2]), r"depth\[1\] must be at most"),
    (dict(mlp_ratio=[4.0, 1e9, 4.0]), r"mlp_ratio\[1\]=1000000000.0 gives an MLP of width"),
    (dict(num_labels=(1 << 20) + 1), "num_labels must be at most 1048576"),
    (dict(num_channels=10 ** 9), "num_channels must be at most"),
])
def test_absurd_config_sizes_are_one_line_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message) as caught:
        tiny_config(**overrides)
    assert "\n" not in str(caught.value)


def test_absurd_image_size_in_config_json_is_refused_on_load(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"image_size": 32', '"image_size": 1000000000')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="image_size must be at most 16384"):
        CvtConfig.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ labels
def test_out_of_range_labels_name_num_labels_and_the_label_in_torch():
    import torch

    from cvt_torch import CvtForImageClassification
    from cvt_torch.training import train_step

    model = CvtForImageClassification(tiny_config())
    pixels = torch.zeros(2, 3, 32, 32)
    for bad in (3, -1):
        with pytest.raises(ValueError, match=rf"labels must be class indices in \[0, num_labels=3\); got {bad}$"):
            model(pixels, labels=torch.tensor([0, bad]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, num_labels=3\); got 7$"):
        train_step(model, optimizer, pixels.numpy(), np.array([7, 1]))
    # torch's ignore_index stays allowed: it adds nothing to the loss
    loss = model(pixels, labels=torch.tensor([2, -100])).loss
    assert torch.isfinite(loss)
