"""`cvt attention` and `conversion.attention.attention_maps`: one map per stage on its key grid, from attention
rows that sum to 1 over the keys, the same in PyTorch and Keras, drawn into a PNG; bad requests are one line."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from conversion.attention import attention_maps
from conversion_helpers import TINY, assert_one_line_error, cli
from cvt_core import CvtConfig
from cvt_core.shapes import stage_geometry
from hf_oracle import make_hf_checkpoint

CONFIG = dict(TINY, num_labels=3)  # three stages, the cls token on the last, image_size 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention")
    make_hf_checkpoint(str(root / "model"), CONFIG, seed=2)
    Image.fromarray(skimage.data.chelsea()).save(root / "cat.png")  # a real photo, 300 x 451
    return root


def test_one_map_per_stage_on_its_key_grid_from_rows_that_sum_to_one_in_both_frameworks(checkpoint):
    image, maps = attention_maps(str(checkpoint / "cat.png"), str(checkpoint / "model"), framework="torch")
    _, keras_maps = attention_maps(str(checkpoint / "cat.png"), str(checkpoint / "model"), framework="keras")
    height, width = image.shape[:2]
    assert image.dtype == np.float32 and 0.0 <= image.min() and image.max() <= 1.0
    geometry = stage_geometry(CvtConfig(**CONFIG), height, width)
    assert [(m.stage, m.layer, m.kind) for m in maps] == [(1, 0, "mean received"), (2, 1, "mean received"),
                                                         (3, 2, "cls token")]
    for item, keras_item, g in zip(maps, keras_maps, geometry):
        assert item.grid.shape == (g.key_height, g.key_width)
        np.testing.assert_allclose(item.probabilities.sum(axis=-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(keras_item.grid, item.grid, atol=1e-5)
    cls_map = maps[2]  # the cls token's attention over the grid: all of its row but the cls key itself
    assert abs(cls_map.grid.sum() + cls_map.probabilities[0, 0] - 1.0) < 1e-5


def test_cvt_attention_writes_the_png_for_a_chosen_stage_and_layer(checkpoint, tmp_path):
    out = tmp_path / "attention.png"
    code, stdout, err = cli("attention", checkpoint / "cat.png", "--model", checkpoint / "model", "--out", out,
                            "--stage", "2", "3", "--layer", "0")
    assert code == 0, err
    assert "stage 2, layer 0: mean received" in stdout and "stage 3, layer 0: cls token" in stdout
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.width > picture.height


@pytest.mark.parametrize("extra, fragments", [
    (["--stage", "4"], ["--stage 4", "stages 1 to 3"]),
    (["--layer", "5"], ["--layer 5", "stage 1 has 1 layer(s)"]),
])
def test_a_stage_or_layer_the_model_lacks_is_one_line_and_writes_nothing(checkpoint, tmp_path, extra, fragments):
    out = tmp_path / "attention.png"
    assert_one_line_error(*cli("attention", checkpoint / "cat.png", "--model", checkpoint / "model", "--out", out,
                               *extra), *fragments)
    assert not out.exists()


def test_an_existing_picture_is_replaced_only_with_force_and_a_missing_image_is_one_line(checkpoint, tmp_path):
    out = tmp_path / "attention.png"
    out.write_bytes(b"mine")
    assert_one_line_error(*cli("attention", checkpoint / "cat.png", "--model", checkpoint / "model", "--out", out),
                          "pass --force")
    assert out.read_bytes() == b"mine"
    assert_one_line_error(*cli("attention", tmp_path / "missing.png", "--model", checkpoint / "model", "--out",
                               tmp_path / "other.png"), "missing.png")
