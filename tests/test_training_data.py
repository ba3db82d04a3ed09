"""Training data (`cvt_cli.data`, `cvt_core.batching`): the image-folder reader and its errors, the embedded digits, the split,
preprocessing and the mini-batches both frameworks and every process of a distributed run draw from."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cvt_cli.data import DatasetError, load_digits_dataset, load_image_folder, preprocess, stratified_split
from cvt_core.batching import Augmentation, iterate_batches, random_translate
from cvt_core.image_processing import CvtImageProcessor


def write_folder(root, classes=("cat", "dog"), per_class=3, size=(12, 10)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_image_folder_reads_one_class_per_subfolder_in_sorted_order_and_skips_other_files(tmp_path):
    root = write_folder(tmp_path / "data", classes=("zebra", "ant"), per_class=2)
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / "zebra" / "nested").mkdir()
    Image.new("RGB", (5, 5)).save(root / "zebra" / "nested" / "deep.jpg")
    dataset = load_image_folder(root)
    assert dataset.class_names == ["ant", "zebra"]
    assert dataset.class_counts() == [2, 3]
    assert all(str(path).endswith((".png", ".jpg")) for path in dataset.images)
    assert dataset.id2label == {0: "ant", 1: "zebra"}


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such dataset folder"),
    ("empty", "no class subfolders"),
    ("loose-images", "move them into one subfolder per class"),
    ("one-class", "only one class"),
    ("empty-class", "holds no images"),
])
def test_bad_dataset_folders_raise_dataset_error_naming_the_problem(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "loose-images":
        Image.new("RGB", (4, 4)).save(root / "a.png")
    if layout == "one-class":
        write_folder(root / "x", classes=("only",))
        root = root / "x"
    if layout == "empty-class":
        write_folder(root, classes=("a",))
        (root / "b").mkdir()
    with pytest.raises(DatasetError, match=message):
        load_image_folder(root)


def test_unreadable_image_is_reported_with_its_path_when_preprocessed(tmp_path):
    root = write_folder(tmp_path / "data")
    broken = root / "dog" / "broken.png"
    broken.write_bytes(b"this is not a png")
    dataset = load_image_folder(root)
    with pytest.raises(DatasetError, match=r"broken\.png.*cannot read"):
        preprocess(dataset, CvtImageProcessor(size=16, crop_pct=1.0))


def test_digits_are_the_embedded_sklearn_set_as_grey_images_with_ten_classes():
    dataset = load_digits_dataset()
    assert len(dataset) == 1797 and dataset.class_names == [str(i) for i in range(10)]
    assert dataset.images[0].mode == "L" and dataset.images[0].size == (8, 8)
    assert max(np.asarray(image).max() for image in dataset.images[:20]) == 255  # 0..16 scaled to 0..255
    pixels = preprocess(dataset.subset(range(5)), CvtImageProcessor(size=32, crop_pct=1.0))
    assert pixels.shape == (5, 3, 32, 32) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[:, 0] * 0.229 + 0.485, pixels[:, 1] * 0.224 + 0.456, atol=1e-6)  # grey in RGB


def test_stratified_split_keeps_class_shares_and_every_class_on_both_sides():
    labels = np.repeat(np.arange(3), [10, 5, 2])
    train, val = stratified_split(labels, val_fraction=0.2, seed=3)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(17))
    assert np.bincount(labels[val]).tolist() == [2, 1, 1]
    assert np.bincount(labels[train]).tolist() == [8, 4, 1]
    again = stratified_split(labels, val_fraction=0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val)))
    assert len(stratified_split(labels, val_fraction=0.0)[1]) == 0


def test_process_shares_of_a_global_batch_reassemble_the_single_process_batches():
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((21, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 21)
    augmentation = Augmentation(max_shift=2, horizontal_flip=True)
    single = list(iterate_batches(pixels, labels, 6, shuffle=True, seed=5, epoch=2, augmentation=augmentation,
                                  drop_remainder=True))
    shares = [list(iterate_batches(pixels, labels, 6, shuffle=True, seed=5, epoch=2, augmentation=augmentation,
                                   rank=r, world_size=2)) for r in range(2)]
    assert len(single) == len(shares[0]) == len(shares[1]) == 3
    for whole, first, second in zip(single, *shares):
        np.testing.assert_array_equal(whole[0], np.concatenate([first[0], second[0]]))
        np.testing.assert_array_equal(whole[1], np.concatenate([first[1], second[1]]))
    epoch_3 = next(iterate_batches(pixels, labels, 6, shuffle=True, seed=5, epoch=3))
    epoch_2 = next(iterate_batches(pixels, labels, 6, shuffle=True, seed=5, epoch=2))
    assert not np.array_equal(epoch_3[1], epoch_2[1])
    with pytest.raises(ValueError, match="divide"):
        next(iterate_batches(pixels, labels, 5, world_size=2))


def test_random_translation_moves_content_by_whole_pixels_within_the_limit():
    image = np.zeros((1, 1, 9, 9), np.float32)
    image[0, 0, 4, 4] = 1.0
    rng = np.random.default_rng(0)
    positions = set()
    for _ in range(40):
        moved = random_translate(image, 2, rng)
        (y,), (x,) = np.nonzero(moved[0, 0] == 1.0)
        assert abs(y - 4) <= 2 and abs(x - 4) <= 2 and moved.sum() == 1.0
        positions.add((y, x))
    assert len(positions) > 5
