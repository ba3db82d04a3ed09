"""`CvtImageProcessor` against transformers 4.57.6's `ConvNextImageProcessor` (the released checkpoints' processor).

The oracle is always transformers' slow (PIL) ConvNext processor configured as the `microsoft/cvt-*` checkpoints
are (cvt-facts §6). Where transformers cannot take an input (grey, RGBA, file paths) the oracle is transformers
applied after its own RGB conversion (`convert_to_rgb`) or file reader (`load_image`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from skimage import data as skdata

from cvt_core.config import CvtConfig
from cvt_core.image_processing import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    PREPROCESSOR_CONFIG_NAME,
    CvtImageProcessor,
    ImageLoadError,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoImageProcessor, ConvNextImageProcessor  # noqa: E402
from transformers.image_transforms import convert_to_rgb  # noqa: E402
from transformers.image_utils import load_image  # noqa: E402

TOL = 1e-5
REPO_ROOT = Path(__file__).resolve().parents[1]

# microsoft/cvt-13's preprocessor_config.json as cvt-facts §6 describes the released settings, in the hub's legacy
# spelling (int size, feature_extractor_type, no rescale keys): 224 -> resize short side 256 bicubic, crop 224,
# ImageNet mean/std. The -384 checkpoints differ only in size.
HUB_CVT13 = {
    "crop_pct": 0.875,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ConvNextFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 224,
}


def hf_processor(size: int = 224, **overrides) -> ConvNextImageProcessor:
    """transformers' processor with the released checkpoints' settings."""
    kwargs = dict(size={"shortest_edge": size}, crop_pct=0.875, resample=PIL.Image.BICUBIC,
                  image_mean=transformers.image_utils.IMAGENET_DEFAULT_MEAN,
                  image_std=transformers.image_utils.IMAGENET_DEFAULT_STD)
    kwargs.update(overrides)
    return ConvNextImageProcessor(**kwargs)


def hf_pixels(processor, images, **kwargs) -> np.ndarray:
    return np.asarray(processor(images, return_tensors="np", **kwargs)["pixel_values"])


def ours_pixels(processor, images, **kwargs) -> np.ndarray:
    out = processor(images, return_tensors="np", **kwargs)["pixel_values"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    return out


def assert_same(actual, expected):
    assert actual.shape == expected.shape, f"shape {actual.shape} != transformers {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL)


# Real photographs (scikit-image's bundled data) covering square, landscape, portrait and grey inputs.
PHOTOS = {
    "astronaut-square": lambda: skdata.astronaut(),                    # 512 x 512 RGB
    "chelsea-landscape": lambda: skdata.chelsea(),                     # 300 x 451 RGB
    "coffee-landscape": lambda: skdata.coffee(),                       # 400 x 600 RGB
    "rocket-portrait": lambda: np.ascontiguousarray(skdata.rocket().transpose(1, 0, 2)),  # 640 x 427: tall
    "small-odd": lambda: skdata.chelsea()[::7, ::5],                   # 43 x 91: upsampled, odd sizes
}


@pytest.fixture(scope="module")
def photos():
    return {name: make() for name, make in PHOTOS.items()}


@pytest.fixture(scope="module")
def digits_uint8():
    """scikit-learn digits (8 x 8, 0-16) as uint8 grey, upscaled 8x to 64 x 64 by pixel repetition."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:6]
    grey = np.round(images * (255 / 16)).astype(np.uint8)
    return [np.kron(g, np.ones((8, 8), dtype=np.uint8)) for g in grey]


# ---------------------------------------------------------------------- settings
def test_hub_config_reads_as_released_settings_in_transformers_and_ours(tmp_path):
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(HUB_CVT13))
    hf = ConvNextImageProcessor.from_pretrained(tmp_path)
    reference = hf_processor(224)
    for field in ("size", "crop_pct", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std"):
        assert getattr(hf, field) == getattr(reference, field), field
    assert CvtImageProcessor.from_pretrained(tmp_path) == CvtImageProcessor()


def test_defaults_are_released_settings_not_transformers_constructor_defaults():
    ours = CvtImageProcessor().to_dict()
    assert ours["size"] == {"shortest_edge": 224}
    assert ours["crop_pct"] == 0.875
    assert ours["resample"] == int(PIL.Image.Resampling.BICUBIC)
    assert ours["image_mean"] == list(IMAGENET_DEFAULT_MEAN) and ours["image_std"] == list(IMAGENET_DEFAULT_STD)
    assert ours["do_rescale"] and ours["rescale_factor"] == 1 / 255 and ours["do_normalize"] and ours["do_resize"]
    hf = hf_processor(224).to_dict()
    assert {k: hf[k] for k in ours} == ours
    plain = ConvNextImageProcessor()  # transformers' own constructor defaults match no checkpoint
    assert (plain.size, plain.resample, list(plain.image_mean)) != (ours["size"], ours["resample"], ours["image_mean"])


# ---------------------------------------------------------------------- equality with transformers
@pytest.mark.parametrize("size", [224, 384])
@pytest.mark.parametrize("name", list(PHOTOS))
def test_pil_photo_matches_transformers(photos, name, size):
    image = PIL.Image.fromarray(photos[name])
    expected = hf_pixels(hf_processor(size), image)
    actual = ours_pixels(CvtImageProcessor.for_resolution(size), image)
    assert actual.shape == (1, 3, size, size)
    assert_same(actual, expected)


@pytest.mark.parametrize("size", [224, 384])
@pytest.mark.parametrize("layout", ["hwc-uint8", "chw-uint8", "hwc-float32-unit", "hwc-float64-integral", "chw-int64"])
def test_numpy_layouts_and_dtypes_match_transformers(photos, layout, size):
    rgb = photos["coffee-landscape"]
    array = {
        "hwc-uint8": rgb,
        "chw-uint8": np.ascontiguousarray(rgb.transpose(2, 0, 1)),
        "hwc-float32-unit": rgb.astype(np.float32) / 255,
        "hwc-float64-integral": rgb.astype(np.float64),
        "chw-int64": rgb.transpose(2, 0, 1).astype(np.int64),
    }[layout]
    with pytest.warns(UserWarning, match="already rescaled") if layout == "hwc-float32-unit" else _no_warning():
        actual = ours_pixels(CvtImageProcessor.for_resolution(size), array)
    assert_same(actual, hf_pixels(hf_processor(size), array))


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_float_unit_range_image_is_scaled_for_resize_then_back_like_transformers(photos):
    """Floats in [0, 1] go through PIL as uint8(x * 255) and come back / 255; with do_rescale=False that is the
    pipeline for pre-scaled images, and it differs from simply resizing the uint8 image by < 1/255."""
    unit = photos["chelsea-landscape"].astype(np.float32) / 255
    actual = ours_pixels(CvtImageProcessor(), unit, do_rescale=False)
    assert_same(actual, hf_pixels(hf_processor(), unit, do_rescale=False))
    from_uint8 = ours_pixels(CvtImageProcessor(), photos["chelsea-landscape"])
    assert np.max(np.abs(actual - from_uint8)) < 1 / 255 / min(IMAGENET_DEFAULT_STD) + TOL


@pytest.mark.parametrize("size", [224, 384])
def test_arbitrary_unit_floats_are_truncated_to_uint8_for_pil_like_transformers(size):
    """Floats in [0, 1] that are not multiples of 1/255: transformers truncates x * 255 (no rounding) before PIL."""
    noise = np.random.default_rng(0).random((57, 83, 3))
    expected = hf_pixels(hf_processor(size), noise, do_rescale=False)
    assert_same(ours_pixels(CvtImageProcessor.for_resolution(size), noise, do_rescale=False), expected)


def test_grey_pil_and_grey_arrays_match_transformers_after_rgb_conversion():
    camera = skdata.camera()[:, 60:460]  # 512 x 400 grey, non-square
    pil_grey = PIL.Image.fromarray(camera)
    assert pil_grey.mode == "L"
    expected = hf_pixels(hf_processor(), convert_to_rgb(pil_grey))
    with pytest.raises(ValueError):  # transformers' ConvNext processor cannot take grey input itself
        hf_processor()(camera)
    ours = CvtImageProcessor()
    for grey in (pil_grey, camera, camera[:, :, None], camera[None, :, :]):
        assert_same(ours_pixels(ours, grey), expected)
    channels = ours_pixels(ours, camera)[0]  # grey -> three equal channels before normalisation
    np.testing.assert_allclose(channels[0] * IMAGENET_DEFAULT_STD[0] + IMAGENET_DEFAULT_MEAN[0],
                               channels[2] * IMAGENET_DEFAULT_STD[2] + IMAGENET_DEFAULT_MEAN[2], atol=1e-6)


def test_grey_page_non_square_384_matches_transformers():
    page = skdata.page()  # 191 x 384 grey
    expected = hf_pixels(hf_processor(384), convert_to_rgb(PIL.Image.fromarray(page)))
    assert_same(ours_pixels(CvtImageProcessor.for_resolution(384), page), expected)


def test_rgba_and_palette_images_convert_to_rgb_like_transformers():
    logo = skdata.logo().copy()  # 500 x 500 x 4; give it a real alpha ramp (its own alpha is opaque)
    logo[..., 3] = np.linspace(0, 255, logo.shape[1]).astype(np.uint8)[None, :]
    rgba = PIL.Image.fromarray(logo, mode="RGBA")
    expected = hf_pixels(hf_processor(), convert_to_rgb(rgba))
    ours = CvtImageProcessor()
    assert_same(ours_pixels(ours, rgba), expected)
    assert_same(ours_pixels(ours, logo), expected)                       # H x W x 4 array
    assert_same(ours_pixels(ours, logo.transpose(2, 0, 1)), expected)    # 4 x H x W array
    palette = PIL.Image.fromarray(skdata.astronaut()).convert("P")
    assert_same(ours_pixels(ours, palette), hf_pixels(hf_processor(), convert_to_rgb(palette)))


def test_sklearn_digits_upscaled_grey_batch_matches_transformers(digits_uint8):
    expected = hf_pixels(hf_processor(), [convert_to_rgb(PIL.Image.fromarray(d)) for d in digits_uint8])
    actual = ours_pixels(CvtImageProcessor(), digits_uint8)
    assert actual.shape == (len(digits_uint8), 3, 224, 224)
    assert_same(actual, expected)


def test_raw_8x8_digit_floats_0_to_16_are_cast_not_scaled_like_transformers():
    """transformers casts integer-valued floats straight to uint8 (values 0-16 stay 0-16: a dark image)."""
    from sklearn.datasets import load_digits

    digit = load_digits().images[3]  # float64, 8 x 8, values 0..16
    expected = hf_pixels(hf_processor(), np.repeat(digit[:, :, None], 3, axis=2))
    actual = ours_pixels(CvtImageProcessor(), digit)
    assert_same(actual, expected)
    raw = (actual[0] * np.array(IMAGENET_DEFAULT_STD)[:, None, None] + np.array(IMAGENET_DEFAULT_MEAN)[:, None, None]) * 255
    assert 12 < raw.max() < 24  # about 16 (+ bicubic overshoot), not 255


def test_file_paths_read_like_transformers_load_image_with_exif_rotation(tmp_path, photos):
    png = tmp_path / "chelsea.png"
    PIL.Image.fromarray(photos["chelsea-landscape"]).save(png)
    jpeg = tmp_path / "coffee-rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    PIL.Image.fromarray(photos["coffee-landscape"]).save(jpeg, quality=95, exif=exif)
    ours = CvtImageProcessor()
    for path in (png, jpeg):
        expected = hf_pixels(hf_processor(), load_image(str(path)))
        assert_same(ours_pixels(ours, path), expected)          # pathlib.Path
        assert_same(ours_pixels(ours, str(path)), expected)     # str
    with PIL.Image.open(jpeg) as unrotated:
        assert np.max(np.abs(ours_pixels(ours, unrotated) - ours_pixels(ours, jpeg))) > 0.5  # EXIF was applied


def test_mixed_batch_stacks_in_order_and_matches_transformers(tmp_path, photos):
    path = tmp_path / "astronaut.png"
    PIL.Image.fromarray(photos["astronaut-square"]).save(path)
    batch = [PIL.Image.fromarray(photos["chelsea-landscape"]), photos["rocket-portrait"], path,
             np.ascontiguousarray(photos["coffee-landscape"].transpose(2, 0, 1))]
    ours = CvtImageProcessor()
    actual = ours_pixels(ours, batch)
    assert actual.shape == (4, 3, 224, 224)
    for i, item in enumerate(batch):
        assert_same(actual[i:i + 1], ours_pixels(ours, item))
    rgb_list = [photos["chelsea-landscape"], photos["rocket-portrait"], photos["astronaut-square"],
                photos["coffee-landscape"]]
    assert_same(actual, hf_pixels(hf_processor(), [PIL.Image.fromarray(a) for a in rgb_list]))
    assert_same(ours_pixels(ours, tuple(batch)), actual)


def test_4d_array_is_a_batch_like_transformers(photos):
    crop = [photos[n][:300, :400] for n in ("astronaut-square", "chelsea-landscape", "coffee-landscape")]
    stacked = np.stack(crop)  # 3 x 300 x 400 x 3
    expected = hf_pixels(hf_processor(384), stacked)
    assert expected.shape == (3, 3, 384, 384)
    assert_same(ours_pixels(CvtImageProcessor.for_resolution(384), stacked), expected)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(do_resize=False),
        dict(do_rescale=False),
        dict(do_normalize=False),
        dict(do_rescale=False, do_normalize=False),
        dict(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25]),
        dict(image_mean=0.5, image_std=0.5),
        dict(resample=PIL.Image.Resampling.BILINEAR),
        dict(resample=PIL.Image.Resampling.NEAREST),
        dict(resample=PIL.Image.Resampling.LANCZOS),
        dict(crop_pct=1.0),
        dict(crop_pct=0.95, size={"shortest_edge": 160}),
        dict(size={"shortest_edge": 383}),
        dict(size={"shortest_edge": 448}),
        dict(rescale_factor=1 / 127.5, image_mean=1.0, image_std=1.0),
    ],
    ids=lambda o: ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in o.items()),
)
def test_settings_match_transformers(photos, overrides):
    image = photos["small-odd"] if overrides.get("do_resize") is False else photos["chelsea-landscape"]
    kwargs = dict(overrides)
    kwargs.setdefault("size", {"shortest_edge": 224})
    size = kwargs.pop("size")["shortest_edge"]
    expected = hf_pixels(hf_processor(size, **kwargs), image)
    actual = ours_pixels(CvtImageProcessor(size=size, **kwargs), image)
    assert_same(actual, expected)
    # the same settings given per call, on a default processor
    assert_same(ours_pixels(CvtImageProcessor(), image, size=size, **kwargs), expected)


def test_rescale_then_normalize_order(photos):
    image = photos["astronaut-square"]
    plain = ours_pixels(CvtImageProcessor(do_rescale=False, do_normalize=False), image)
    normalized = ours_pixels(CvtImageProcessor(), image)
    mean = np.array(IMAGENET_DEFAULT_MEAN, dtype=np.float32)[None, :, None, None]
    std = np.array(IMAGENET_DEFAULT_STD, dtype=np.float32)[None, :, None, None]
    np.testing.assert_allclose(normalized, (plain / 255 - mean) / std, atol=TOL)


def test_crop_pct_above_one_pads_with_zeros_like_transformers(photos):
    image = photos["chelsea-landscape"]
    expected = hf_pixels(hf_processor(crop_pct=1.2), image)
    actual = ours_pixels(CvtImageProcessor(crop_pct=1.2), image)
    assert_same(actual, expected)
    border = actual[0, :, 0, :]  # the padded top row holds raw 0, i.e. -mean/std after normalisation
    np.testing.assert_allclose(border, np.broadcast_to((-np.array(IMAGENET_DEFAULT_MEAN) / IMAGENET_DEFAULT_STD)[:, None],
                                                       border.shape), atol=TOL)


def test_do_center_crop_false_keeps_the_short_side_resize(photos):
    image = photos["chelsea-landscape"]  # 300 x 451: short side -> 256, long side -> int(256 * 451 / 300) = 384
    actual = ours_pixels(CvtImageProcessor(do_center_crop=False), image)
    assert actual.shape == (1, 3, 256, 384)
    resized = np.asarray(PIL.Image.fromarray(image).resize((384, 256), PIL.Image.Resampling.BICUBIC), dtype=np.float32)
    expected = ((resized / 255 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(actual[0], expected, atol=TOL)
    cropped = ours_pixels(CvtImageProcessor(), image)
    np.testing.assert_allclose(cropped[0], actual[0, :, 16:240, 80:304], atol=TOL)


def test_no_resize_keeps_sizes_and_returns_a_list_for_ragged_batches(photos):
    a, b = photos["small-odd"], photos["chelsea-landscape"]
    ours = CvtImageProcessor(do_resize=False)
    out = ours([a, b])["pixel_values"]
    assert isinstance(out, list) and [x.shape for x in out] == [(3, 43, 91), (3, 300, 451)]
    assert_same(out[1][None], hf_pixels(hf_processor(do_resize=False), b))
    with pytest.raises(ValueError, match="different sizes"):
        ours([a, b], return_tensors="np")


# ---------------------------------------------------------------------- outputs
def test_return_tensors_give_framework_tensors_with_the_same_values(photos):
    image = PIL.Image.fromarray(photos["coffee-landscape"])
    ours = CvtImageProcessor()
    reference = ours(image)["pixel_values"]
    assert isinstance(reference, np.ndarray) and reference.dtype == np.float32 and reference.flags.c_contiguous
    assert_same(ours(image, return_tensors="np")["pixel_values"], reference)

    torch = pytest.importorskip("torch")
    pt = ours(image, return_tensors="pt")["pixel_values"]
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32 and tuple(pt.shape) == (1, 3, 224, 224)
    assert_same(pt.numpy(), hf_processor()(image, return_tensors="pt")["pixel_values"].numpy())

    tf = pytest.importorskip("tensorflow")
    tft = ours(image, return_tensors="tf")["pixel_values"]
    assert tf.is_tensor(tft) and tft.dtype == tf.float32
    assert_same(tft.numpy(), reference)


def test_output_is_a_dict_with_attribute_access(photos):
    batch = CvtImageProcessor()(photos["chelsea-landscape"])
    assert set(batch) == {"pixel_values"}
    assert batch.pixel_values is batch["pixel_values"]
    with pytest.raises(AttributeError):
        batch.logits


@pytest.mark.parametrize("size", [224, 384])
def test_channels_last_matches_transformers(photos, size):
    images = [photos["astronaut-square"], photos["rocket-portrait"]]
    expected = hf_pixels(hf_processor(size), images, data_format="channels_last")
    actual = ours_pixels(CvtImageProcessor.for_resolution(size), images, data_format="channels_last")
    assert actual.shape == (2, size, size, 3)
    assert_same(actual, expected)
    first = ours_pixels(CvtImageProcessor.for_resolution(size), images)
    np.testing.assert_array_equal(actual, first.transpose(0, 2, 3, 1))


def test_torch_tensor_input_matches_numpy_input(photos):
    torch = pytest.importorskip("torch")
    chw = np.ascontiguousarray(photos["chelsea-landscape"].transpose(2, 0, 1))
    ours = CvtImageProcessor()
    assert_same(ours_pixels(ours, torch.from_numpy(chw)), ours_pixels(ours, chw))


def test_importing_and_running_the_processor_loads_neither_torch_nor_tensorflow():
    code = (
        "import sys, numpy as np\n"
        "from cvt_core.image_processing import CvtImageProcessor\n"
        "out = CvtImageProcessor()(np.zeros((40, 60, 3), np.uint8), return_tensors='np')\n"
        "assert out['pixel_values'].shape == (1, 3, 224, 224)\n"
        "bad = sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules)\n"
        "print('LOADED', bad)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout


# ---------------------------------------------------------------------- preprocessor_config.json
@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(size={"shortest_edge": 384}),
        dict(resample=PIL.Image.Resampling.BILINEAR, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.3, 0.35],
             crop_pct=0.9, size={"shortest_edge": 192}),
        dict(do_normalize=False, rescale_factor=1 / 127.5),
    ],
    ids=["released-224", "released-384", "custom", "no-normalize"],
)
def test_saved_config_loads_in_transformers_with_identical_outputs(tmp_path, photos, settings):
    ours = CvtImageProcessor(**settings)
    path = ours.save_pretrained(tmp_path)
    assert path == os.path.join(str(tmp_path), PREPROCESSOR_CONFIG_NAME)
    written = json.loads(Path(path).read_text())
    assert written["image_processor_type"] == "ConvNextImageProcessor"
    hf = ConvNextImageProcessor.from_pretrained(tmp_path)
    auto = AutoImageProcessor.from_pretrained(tmp_path, use_fast=False)
    assert type(auto) is ConvNextImageProcessor
    images = [photos["chelsea-landscape"], PIL.Image.fromarray(photos["rocket-portrait"])]
    expected = ours_pixels(ours, images)
    assert_same(hf_pixels(hf, images), expected)
    assert_same(hf_pixels(auto, images), expected)
    # the file transformers writes for the same processor holds the same settings
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / PREPROCESSOR_CONFIG_NAME).read_text()) == written
    assert CvtImageProcessor.from_pretrained(tmp_path) == ours


@pytest.mark.parametrize("size", [224, 384])
def test_transformers_saved_config_loads_in_ours_with_identical_outputs(tmp_path, photos, size):
    hf = hf_processor(size, resample=PIL.Image.Resampling.HAMMING, image_mean=[0.4, 0.5, 0.6])
    hf.save_pretrained(tmp_path)
    image = photos["coffee-landscape"]
    for source in (tmp_path, tmp_path / PREPROCESSOR_CONFIG_NAME, str(tmp_path)):
        ours = CvtImageProcessor.from_pretrained(source)
        assert ours.resample == int(PIL.Image.Resampling.HAMMING) and ours.size == {"shortest_edge": size}
        assert_same(ours_pixels(ours, image), hf_pixels(hf, image))


def test_missing_config_keys_take_transformers_defaults(tmp_path, photos):
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps({"image_processor_type": "ConvNextImageProcessor"}))
    hf = ConvNextImageProcessor.from_pretrained(tmp_path)
    ours = CvtImageProcessor.from_pretrained(tmp_path)
    assert ours.size == {"shortest_edge": 384} and ours.image_mean == [0.5, 0.5, 0.5]
    assert ours.resample == int(PIL.Image.Resampling.BILINEAR)
    image = photos["chelsea-landscape"]
    assert_same(ours_pixels(ours, image), hf_pixels(hf, image))


def test_from_pretrained_overrides_win(tmp_path):
    CvtImageProcessor().save_pretrained(tmp_path)
    assert CvtImageProcessor.from_pretrained(tmp_path, size=384).size == {"shortest_edge": 384}


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    CvtImageProcessor.for_resolution(384).save_pretrained(tmp_path)
    before = (tmp_path / PREPROCESSOR_CONFIG_NAME).read_text()
    CvtImageProcessor().save_pretrained(tmp_path)  # overwrite
    assert os.listdir(tmp_path) == [PREPROCESSOR_CONFIG_NAME]
    assert CvtImageProcessor.from_pretrained(tmp_path) == CvtImageProcessor()

    broken = CvtImageProcessor.for_resolution(384)
    good = (tmp_path / PREPROCESSOR_CONFIG_NAME).read_text()
    assert good != before

    def fail():
        raise RuntimeError("disk full")

    monkeypatch.setattr(broken, "to_json_string", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        broken.save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == [PREPROCESSOR_CONFIG_NAME]
    assert (tmp_path / PREPROCESSOR_CONFIG_NAME).read_text() == good


def test_saving_without_center_crop_warns_that_transformers_still_crops(tmp_path):
    ours = CvtImageProcessor(do_center_crop=False)
    with pytest.warns(UserWarning, match="still centre-crop"):
        ours.save_pretrained(tmp_path)
    assert CvtImageProcessor.from_pretrained(tmp_path).do_center_crop is False


# ---------------------------------------------------------------------- convenience constructors
def test_for_config_picks_released_settings_from_image_size(photos):
    assert CvtImageProcessor.for_config(CvtConfig.from_preset("cvt-13")) == CvtImageProcessor()
    assert CvtImageProcessor.for_config(CvtConfig.from_preset("cvt-13-384")).size == {"shortest_edge": 384}
    assert CvtImageProcessor.for_config(CvtConfig(image_size=384)) == CvtImageProcessor.for_resolution(384)
    assert CvtImageProcessor.for_config(CvtConfig()) == CvtImageProcessor()  # no image_size: 224
    assert CvtImageProcessor.for_config({"image_size": [384, 384]}).size == {"shortest_edge": 384}
    with pytest.raises(ValueError, match="not square"):
        CvtImageProcessor.for_config(CvtConfig(image_size=[224, 320]))
    image = photos["coffee-landscape"]
    assert_same(ours_pixels(CvtImageProcessor.for_config(CvtConfig(image_size=384)), image),
                hf_pixels(hf_processor(384), image))


def test_for_resolution_384_warps_without_cropping(photos):
    image = photos["coffee-landscape"]  # 400 x 600: a warp keeps both image edges, a crop would not
    out = ours_pixels(CvtImageProcessor.for_resolution(384), image)
    warped = np.asarray(PIL.Image.fromarray(image).resize((384, 384), PIL.Image.Resampling.BICUBIC), dtype=np.float32)
    expected = ((warped / 255 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(out[0], expected, atol=TOL)


# ---------------------------------------------------------------------- errors
def test_corrupt_and_truncated_files_raise_naming_the_file(tmp_path, photos):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not a PNG file")
    with pytest.raises(ImageLoadError, match="garbage.png"):
        CvtImageProcessor()(garbage)
    good = tmp_path / "full.png"
    PIL.Image.fromarray(photos["astronaut-square"]).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        CvtImageProcessor()([good, truncated])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        CvtImageProcessor()(str(tmp_path / "missing.jpg"))


@pytest.mark.parametrize("bad", [42, {"image": 1}, b"\x89PNG", None, 3.5], ids=["int", "dict", "bytes", "None", "float"])
def test_unsupported_types_raise_type_error(bad):
    with pytest.raises(TypeError, match="unsupported image type"):
        CvtImageProcessor()(bad)


def test_unsupported_type_inside_a_batch_names_its_position(photos):
    with pytest.raises(TypeError, match="image 1 of the batch"):
        CvtImageProcessor()([photos["small-odd"], object()])


@pytest.mark.parametrize(
    "shape",
    [(32, 32, 5), (5, 32, 32), (2, 2, 2, 2, 2), (10, 8, 8), (0, 32, 3), (32,)],
    ids=["5-channels-last", "5-channels-first", "5-d", "no-channel-axis", "empty", "1-d"],
)
def test_wrong_array_shapes_raise_value_error(shape):
    with pytest.raises(ValueError, match="wrong array shape"):
        CvtImageProcessor()(np.zeros(shape, dtype=np.uint8))


def test_empty_batch_raises():
    for empty in ([], (), [[]], np.zeros((0, 32, 32, 3), np.uint8)):
        with pytest.raises(ValueError, match="empty batch"):
            CvtImageProcessor()(empty)


def test_pixel_values_outside_transformers_ranges_cannot_be_resized():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CvtImageProcessor()(np.full((20, 20, 3), 1.5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        CvtImageProcessor()(np.full((20, 20, 3), 300, dtype=np.int32))
    with pytest.raises(TypeError, match="bool"):
        CvtImageProcessor()(np.ones((20, 20), dtype=bool))


def test_bad_arguments_raise_value_error(tmp_path):
    image = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="return_tensors"):
        CvtImageProcessor()(image, return_tensors="jax")
    with pytest.raises(ValueError, match="data_format"):
        CvtImageProcessor()(image, data_format="NCHW")
    with pytest.raises(ValueError, match="shortest_edge"):
        CvtImageProcessor(size={"height": 224, "width": 224})
    with pytest.raises(ValueError, match="resample"):
        CvtImageProcessor(resample="cubic-ish")
    with pytest.raises(ValueError, match="3 entries"):
        CvtImageProcessor(image_mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="image_std"):
        CvtImageProcessor(image_std=[0.2, 0.0, 0.2])
    with pytest.raises(ValueError, match="crop_pct"):
        CvtImageProcessor(crop_pct=0)


def test_config_files_for_other_processors_or_bad_json_are_refused(tmp_path):
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps({"image_processor_type": "ViTImageProcessor"}))
    with pytest.raises(ValueError, match="ViTImageProcessor"):
        CvtImageProcessor.from_pretrained(tmp_path)
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CvtImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="microsoft/cvt-13"):
        CvtImageProcessor.from_pretrained("microsoft/cvt-13")
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(dict(HUB_CVT13, do_pad=True)))
    with pytest.warns(UserWarning, match="do_pad"):
        CvtImageProcessor.from_pretrained(tmp_path)
