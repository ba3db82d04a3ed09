"""Bounded images and preprocessing: every image file goes through `read_image_file`, which opens regular files
only (a FIFO does not hang), checks the size a header declares before decoding (a 65-byte PNG declaring
30000 x 30000 is refused, not allocated), and turns whatever Pillow raises on a hostile file into one line naming
the file; resizes that would make a huge image (a 1 x 60000 strip to a short side of 256) are refused; and
`preprocessor_config.json` is strict JSON with typed, bounded settings."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import warnings

import numpy as np
import pytest
from PIL import Image

from cvt_core.image_processing import (
    MAX_SIDE,
    PREPROCESSOR_CONFIG_NAME,
    CvtImageProcessor,
    ImageLoadError,
    ImageTooLargeError,
    read_image_file,
)
from cvt_core.untrusted import Limits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png_header(width: int, height: int, pixels: bytes = b"") -> bytes:
    """A PNG that declares `width` x `height` RGB pixels and holds (the zlib stream of) `pixels` only."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b""))


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------ header bombs
@pytest.mark.parametrize("width, height, declared", [
    (30000, 30000, "declares 900,000,000 pixels"),  # above Pillow's own bomb limit: it raises while opening
    (9000, 9000, "is 9000x9000 pixels (81,000,000)"),  # between ours and Pillow's: refused by ours
    (8193, 8192, "is 8193x8192 pixels"),
    (70000, 1, "is 70000x1 pixels (70,000)"),  # few pixels, one side too long
    (1, 70000, "is 1x70000 pixels"),
])
def test_declared_image_sizes_over_the_limits_are_refused_before_decoding(tmp_path, width, height, declared):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(width, height))
    assert path.stat().st_size < 100
    with pytest.raises(ImageTooLargeError) as caught:
        CvtImageProcessor()(str(path))
    message = _one_line(caught.value)
    assert message.startswith(f"{path}: the image ") and declared in message
    assert message.endswith(f"at most {Limits.IMAGE_PIXELS:,} pixels and {Limits.IMAGE_SIDE:,} a side are read")
    assert isinstance(caught.value, ImageLoadError) and isinstance(caught.value, ValueError)


def test_header_bomb_is_refused_within_2_gib_of_address_space(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(8000, 8000))  # 64,000,000 pixels: within the limit, not decodable from 80 bytes
    bigger = tmp_path / "bigger.png"
    bigger.write_bytes(png_header(20000, 20000))
    code = ("import resource\n"
            "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
            "from cvt_core.image_processing import CvtImageProcessor, ImageLoadError\n"
            f"for path in ({str(path)!r}, {str(bigger)!r}):\n"
            "    try:\n        CvtImageProcessor()(path)\n"
            "    except ImageLoadError as exc:\n        print(type(exc).__name__, exc)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith(f"ImageLoadError {path}: cannot read this file as an image (")  # truncated data
    assert lines[1].startswith(f"ImageTooLargeError {bigger}: the image declares 400,000,000 pixels")


def test_a_thin_strip_within_the_limits_is_refused_when_resizing_would_make_it_huge(tmp_path):
    strip = np.zeros((1, 60000, 3), np.uint8)
    path = tmp_path / "strip.png"
    Image.fromarray(strip).save(path)
    with pytest.raises(ImageTooLargeError) as caught:
        CvtImageProcessor()(str(path))
    message = _one_line(caught.value)
    assert message.startswith(f"cannot resize the 60000x1 image ({path}) to 15360000x256 pixels")
    grey = np.zeros((1, 60000), np.uint8)  # the same from memory (a 1 x 60000 x 3 array would read as channels first)
    with pytest.raises(ImageTooLargeError, match=r"cannot resize the 60000x1 image to 15360000x256 pixels"):
        CvtImageProcessor()(grey)
    with pytest.raises(ImageTooLargeError, match=r"60000x1 image \(image 1 of the batch\)"):
        CvtImageProcessor()([np.zeros((8, 8, 3), np.uint8), grey])
    # the warp (shortest_edge >= 384) and do_resize=False have bounded outputs and still work
    assert CvtImageProcessor(size=384)(str(path))["pixel_values"].shape == (1, 3, 384, 384)
    assert CvtImageProcessor(do_resize=False)(str(path))["pixel_values"].shape == (1, 3, 1, 60000)


# ------------------------------------------------------------------------------------------------ not regular files
def test_a_fifo_named_as_an_image_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    code = ("from cvt_core.image_processing import CvtImageProcessor, ImageLoadError\n"
            "try:\n"
            f"    CvtImageProcessor()({str(fifo)!r})\n"
            "except ImageLoadError as exc:\n"
            "    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"{fifo}: is a named pipe (FIFO); only regular files are read"


@pytest.mark.parametrize("path, kind", [("/dev/zero", "a device"), ("/dev/null", "a device"), (".", "a folder")])
def test_devices_and_folders_are_refused(path, kind):
    with pytest.raises(ImageLoadError) as caught:
        read_image_file(path)
    assert _one_line(caught.value) == f"{path}: is {kind}; only regular files are read"


def test_missing_files_and_urls_keep_their_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png: no such image file"):
        read_image_file(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="URLs are not fetched"):
        read_image_file("https://example.com/cat.png")


# ------------------------------------------------------------------------------------------------ hostile content
def _valid_files() -> dict:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    files = {}
    for fmt in ("PNG", "JPEG", "BMP", "GIF", "WEBP", "PPM", "TGA", "QOI"):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        files[fmt] = buffer.getvalue()
    return files


VALID = _valid_files()


@pytest.mark.parametrize("fmt", sorted(VALID))
def test_truncated_and_corrupted_files_are_one_image_load_error_line(tmp_path, fmt):
    data = VALID[fmt]
    rng = np.random.default_rng(len(data))
    variants = [data[:n] for n in (1, 8, 16, 30, 60, len(data) // 3, len(data) // 2, len(data) - 1)]
    for _ in range(25):  # flipped bytes, mostly in the header where the parsers decide sizes and offsets
        mutated = bytearray(data)
        for position in rng.integers(0, min(len(data), 200), size=3):
            mutated[position] = int(rng.integers(0, 256))
        variants.append(bytes(mutated))
    for index, variant in enumerate(variants):
        path = tmp_path / f"case{index}.{fmt.lower()}"
        path.write_bytes(variant)
        try:
            image = read_image_file(path)
        except ImageLoadError as exc:
            assert _one_line(exc).startswith(f"{path}: "), exc
        else:
            assert image.mode == "RGB"
            assert image.size[0] * image.size[1] <= Limits.IMAGE_PIXELS


def test_postscript_is_not_rendered(tmp_path):
    path = tmp_path / "page.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageLoadError, match=r"page\.eps: cannot read this file as an image: not in a format read here \(PNG, JPEG"):
        read_image_file(path)


def test_an_icon_container_declaring_16x16_around_a_huge_png_is_not_decoded(tmp_path):
    """ICO's directory states one size and its embedded PNG another, which Pillow decodes whole before shrinking:
    container formats are outside the allow list, so nothing is decoded and one line names the formats read."""
    import struct as _struct

    inner = png_header(13000, 13000)
    directory = _struct.pack("<HHH", 0, 1, 1) + _struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 22)
    path = tmp_path / "icon.ico"
    path.write_bytes(directory + inner)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a Pillow warning: the command line prints exactly one line
        with pytest.raises(ImageLoadError) as caught:
            read_image_file(path)
    assert "icon.ico: cannot read this file as an image: not in a format read here" in str(caught.value) and "\n" not in str(caught.value)


def test_a_tiff_whose_one_tile_is_far_larger_than_its_8x8_image_is_not_decoded(tmp_path):
    """TIFF tiles may exceed the image, and libtiff inflates a whole tile: 2 MB declaring 8x8 took 2.1 GB."""
    from PIL import TiffImagePlugin

    path = tmp_path / "tile.tif"
    info = TiffImagePlugin.ImageFileDirectory_v2()
    Image.new("RGB", (8, 8)).save(path, "TIFF", tiffinfo=info)
    with pytest.raises(ImageLoadError, match="tile.tif: cannot read this file as an image: not in a format read here"):
        read_image_file(path)


def test_a_gif_frame_reaching_outside_its_screen_is_refused_before_decoding(tmp_path):
    """GIF's header gives the screen; each frame has its own box, which Pillow would decode at the frame's size."""
    import struct as _struct

    screen = b"GIF89a" + _struct.pack("<HH", 8, 8) + b"\x00\x00\x00"
    frame = b"\x2c" + _struct.pack("<HHHH", 0, 0, 30000, 30000) + b"\x80" + b"\x00\x00\x00\xff\xff\xff"
    data = screen + frame + b"\x02\x02\x44\x01\x00\x3b"
    path = tmp_path / "frame.gif"
    path.write_bytes(data)
    with pytest.raises(ImageLoadError) as caught:
        read_image_file(path)
    assert "frame.gif" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("fmt", ["ICO", "ICNS", "PCX", "SGI", "DDS", "TIFF"])
def test_formats_outside_the_allow_list_are_refused_in_one_line(tmp_path, fmt):
    from PIL import Image

    path = tmp_path / f"image.{fmt.lower()}"
    try:
        Image.new("RGB", (16, 16)).save(path, fmt)
    except (OSError, KeyError, ValueError):
        pytest.skip(f"this Pillow cannot write {fmt}")
    with pytest.raises(ImageLoadError, match="not in a format read here"):
        read_image_file(path)


def test_in_memory_images_and_ordinary_files_keep_working(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    processor = CvtImageProcessor(size=32)
    from_file = processor(str(tmp_path / "a.png"))["pixel_values"]
    assert np.array_equal(from_file, processor(array)["pixel_values"])
    assert np.array_equal(from_file, processor(Image.fromarray(array))["pixel_values"])
    assert read_image_file(tmp_path / "a.png").size == (50, 40)


# ------------------------------------------------------------------------------------------------ other readers
def test_conversion_crosscheck_image_goes_through_the_same_reader(tmp_path):
    from conversion.crosscheck import load_image
    from conversion.errors import ConversionError
    from cvt_core.config import CvtConfig

    config = CvtConfig(image_size=64)
    bomb, strip, fifo, good = (tmp_path / name for name in ("bomb.png", "strip.png", "fifo.png", "good.png"))
    bomb.write_bytes(png_header(30000, 30000))
    Image.fromarray(np.zeros((1, 60000, 3), np.uint8)).save(strip)
    os.mkfifo(fifo)
    Image.fromarray(np.zeros((70, 90, 3), np.uint8)).save(good)
    expected = {bomb: "the image declares 900,000,000 pixels", fifo: "is a named pipe (FIFO)",
                strip: "resized to 4380000x73: the image is 4380000x73 pixels (319,740,000)"}
    for path, fragment in expected.items():
        with pytest.raises(ConversionError) as caught:
            load_image(str(path), config)
        assert str(caught.value).startswith(str(path)) and fragment in _one_line(caught.value)
    pixels, _ = load_image(str(good), config)
    assert pixels.shape == (1, 3, 64, 64)


def test_training_image_folder_refuses_a_fifo_and_reports_bombs_as_dataset_errors(tmp_path):
    from cvt_cli.data import DatasetError, load_image_folder, preprocess

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / label / "0.png")
    os.mkfifo(tmp_path / "b" / "1.png")
    with pytest.raises(DatasetError, match=r"b/1\.png: is a named pipe \(FIFO\); only regular image files are read"):
        load_image_folder(tmp_path)
    os.unlink(tmp_path / "b" / "1.png")
    (tmp_path / "b" / "1.png").write_bytes(png_header(30000, 30000))
    dataset = load_image_folder(tmp_path)
    with pytest.raises(DatasetError, match=r"unreadable image in the dataset: .*1\.png: the image declares"):
        preprocess(dataset, CvtImageProcessor(size=16, crop_pct=1.0))


# ------------------------------------------------------------------------------------------------ preprocessor_config.json
@pytest.mark.parametrize("settings, message", [
    (dict(size=0), "size must be a positive int"),
    (dict(size=-5), "size must be a positive int"),
    (dict(size=True), "size must be a positive int"),
    (dict(size=224.0), "size must be a positive int"),
    (dict(size="224"), "size must be a positive int"),
    (dict(size=[224]), "size must be a positive int"),
    (dict(size=10 ** 6), f"size shortest_edge=1000000 is too large: at most {MAX_SIDE}"),
    (dict(size={"shortest_edge": MAX_SIDE + 1}), f"shortest_edge={MAX_SIDE + 1} is too large"),
    (dict(size={"shortest_edge": 10 ** 30}), "is too large"),
    (dict(size={"height": 224, "width": 224}), "takes {\"shortest_edge\": n} only"),
    (dict(crop_pct=0), "crop_pct must be a finite number > 0, got 0"),
    (dict(crop_pct=-0.5), "crop_pct must be a finite number > 0"),
    (dict(crop_pct="0.9"), "crop_pct must be a finite number > 0, got '0.9'"),
    (dict(crop_pct=True), "crop_pct must be a finite number > 0, got True"),
    (dict(crop_pct=1e-9, size=224), f"resizes the short side to 224000000000 pixels; at most {MAX_SIDE} are accepted"),
    (dict(crop_pct=0.001, size=100), "resizes the short side to 100000 pixels"),
    (dict(rescale_factor=0), "rescale_factor must be a finite number > 0, got 0"),
    (dict(rescale_factor=-1), "rescale_factor must be a finite number > 0"),
    (dict(rescale_factor="1/255"), "rescale_factor must be a finite number > 0, got '1/255'"),
    (dict(image_mean=["a", "b", "c"]), "image_mean must be a number or 3 numbers"),
    (dict(image_mean=[0.5, 0.5]), "image_mean must have 3 entries"),
    (dict(image_mean=[0.5, True, 0.5]), "image_mean must be a number or 3 numbers"),
    (dict(image_mean="0.5"), "image_mean must be a number or 3 numbers"),
    (dict(image_mean=[[0.5], [0.5], [0.5]]), "image_mean must be a number or 3 numbers"),
    (dict(image_std=[0.2, 0.0, 0.2]), "image_std must not contain 0"),
    (dict(image_std=[0.2, -0.1, 0.2]), "image_std must be positive"),
    (dict(image_std=[0.2] * 4), "image_std must have 3 entries"),
    (dict(resample=99), "resample=99 is not a PIL resampling filter"),
    (dict(resample=3.0), "resample=3.0 is not a PIL resampling filter"),
    (dict(resample="cubic"), "resample='cubic' is unknown"),
    (dict(do_resize="false"), "do_resize must be true or false, got 'false'"),
    (dict(do_rescale=0), "do_rescale must be true or false, got 0"),
    (dict(do_normalize=None), "do_normalize must be true or false, got None"),
    (dict(do_center_crop="no"), "do_center_crop must be true or false, got 'no'"),
])
def test_bad_preprocessor_settings_are_one_line_value_errors_in_files_and_code(tmp_path, settings, message):
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps(settings))
    with pytest.raises(ValueError) as caught:
        CvtImageProcessor.from_pretrained(tmp_path)
    text = _one_line(caught.value)
    assert text.startswith(f"{tmp_path / PREPROCESSOR_CONFIG_NAME}: ") and message in text, text
    with pytest.raises(ValueError) as caught:
        CvtImageProcessor.from_dict(settings)
    assert message in _one_line(caught.value)
    if None not in settings.values():  # per call, None means "the processor's own setting"
        with pytest.raises(ValueError) as caught:  # the same checks for settings given per call
            CvtImageProcessor()(np.zeros((8, 8, 3), np.uint8), **settings)
        assert message in _one_line(caught.value)


@pytest.mark.parametrize("text, message", [
    ("[" * 100000 + "]" * 100000, "JSON nested 100000 levels deep; at most 64 are accepted"),
    ('{"crop_pct": NaN}', "refused JSON: NaN is not a number JSON allows"),
    ('{"rescale_factor": -Infinity}', "refused JSON: -Infinity is not a number JSON allows"),
    ('{"size": 224, "size": 100000}', "refused JSON: key 'size' appears twice"),
    ("[]", "a preprocessor config must hold a JSON object"),
])
def test_preprocessor_config_json_is_parsed_strictly(tmp_path, text, message):
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text(text)
    with pytest.raises(ValueError) as caught:
        CvtImageProcessor.from_pretrained(tmp_path)
    assert message in _one_line(caught.value)


def test_accepted_preprocessor_spellings_stay_accepted(tmp_path):
    # the hub's int size, a one-entry mean/std, crop_pct above 1 (transformers pads), null crop_pct, a filter name
    processor = CvtImageProcessor.from_dict({"size": 224, "image_mean": [0.5], "image_std": 0.25, "crop_pct": 1.2,
                                             "resample": "bicubic"})
    assert processor.image_mean == [0.5] * 3 and processor.image_std == [0.25] * 3 and processor.resample == 3
    assert CvtImageProcessor.from_dict({"crop_pct": None}).crop_pct == 224 / 256
    assert CvtImageProcessor(size=MAX_SIDE).size == {"shortest_edge": MAX_SIDE}
    assert CvtImageProcessor(do_resize=np.bool_(False)).do_resize is False
    (tmp_path / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps({"size": 224, "unknown_key": 1}))
    with pytest.warns(UserWarning, match="unknown_key"):  # unknown keys: warned about and ignored, as before
        CvtImageProcessor.from_pretrained(tmp_path)


def test_cvt_predict_reports_bombs_fifos_and_bad_preprocessor_configs_in_one_line(tmp_path):
    from conversion.pipeline import make_random_checkpoint
    from conversion_helpers import assert_one_line_error, cli
    from cvt_core.config import CvtConfig

    checkpoint = tmp_path / "checkpoint"
    make_random_checkpoint(str(checkpoint), CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 2],
                                                      num_labels=3, image_size=32), seed=0)
    bomb, fifo = tmp_path / "bomb.png", tmp_path / "fifo.png"
    bomb.write_bytes(png_header(30000, 30000))
    os.mkfifo(fifo)
    assert_one_line_error(*cli("predict", bomb, "--model", checkpoint, "--quiet"), f"{bomb}: the image declares")
    assert_one_line_error(*cli("predict", fifo, "--model", checkpoint, "--quiet"), f"{fifo}: is a named pipe")
    (checkpoint / PREPROCESSOR_CONFIG_NAME).write_text(json.dumps({"size": 10 ** 6}))
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good)
    assert_one_line_error(*cli("predict", good, "--model", checkpoint, "--quiet"),
                          f"{checkpoint / PREPROCESSOR_CONFIG_NAME}: size shortest_edge=1000000 is too large")


def test_a_jpeg_of_more_scans_than_any_progressive_jpeg_is_refused_before_decoding(tmp_path):
    """Each scan is a pass over the whole image: 10,000 scans in 1 MB kept a core busy for 100 s."""
    from cvt_core.image_processing import MAX_JPEG_SCANS

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG", progressive=True)
    path = tmp_path / "scans.jpg"
    path.write_bytes(buffer.getvalue() + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" * (MAX_JPEG_SCANS + 1))
    with pytest.raises(ImageTooLargeError, match=f"scans.jpg: a JPEG of more than {MAX_JPEG_SCANS} scans"):
        read_image_file(path)
    plain = tmp_path / "progressive.jpg"
    plain.write_bytes(buffer.getvalue())
    assert read_image_file(plain).size == (16, 16)


def test_a_float_image_holding_nan_is_refused_in_one_line_without_numpy_warnings(tmp_path):
    path = tmp_path / "nan.pfm"
    path.write_bytes(b"Pf\n1 1\n-1.0\n" + np.array([np.nan], "<f4").tobytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageLoadError, match="nan"):
            read_image_file(path)
