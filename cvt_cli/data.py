"""The training data of `cvt train`: an image-folder dataset, the handwritten digits of scikit-learn, the
stratified split and preprocessing through `CvtImageProcessor`, so a run in either framework sees the same images,
the same split and the same preprocessing (the batches come from `cvt_core.batching`).

    dataset = load_image_folder("flowers/")          # one subfolder per class
    dataset = load_digits_dataset()                  # 1797 8x8 grey digits, 10 classes
    train_idx, val_idx = stratified_split(dataset.labels, val_fraction=0.2, seed=0)
    pixels = preprocess(dataset, CvtImageProcessor(size=32, crop_pct=1.0))   # (N, 3, 32, 32) float32
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

# What counts as an image file in a class folder (compared lower-case). Other files (README, .DS_Store, ...) are
# skipped, and so are hidden files and folders.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DatasetError(ValueError):
    """A dataset that cannot be trained on (missing folder, no or one class, empty class, unreadable image).
    The message names the path and says what to change."""


@dataclass
class ImageDataset:
    """Images (file paths or PIL images) with integer labels and the class names they index.

    `images[i]` has class `class_names[labels[i]]`; `source` describes where the data came from.
    """

    images: List[object]
    labels: np.ndarray
    class_names: List[str]
    source: str
    notes: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def id2label(self) -> dict:
        return {i: name for i, name in enumerate(self.class_names)}

    def class_counts(self) -> List[int]:
        return np.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(self, indices: Sequence[int]) -> "ImageDataset":
        indices = np.asarray(indices, dtype=np.int64)
        return ImageDataset([self.images[i] for i in indices], self.labels[indices], list(self.class_names),
                            self.source, list(self.notes))


# ------------------------------------------------------------------------------------------------ sources
def _visible(name: str) -> bool:
    return not name.startswith(".") and not name.startswith("__")


def _check_regular(path: str) -> None:
    """Refuse an image name that is not a regular file (links are followed), from its metadata alone."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__}, e.g. a dangling link)") from None
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else \
            "a device" if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) else "not a regular file"
        raise DatasetError(f"{path}: is {kind}; only regular image files are read")


def load_image_folder(root: Union[str, os.PathLike]) -> ImageDataset:
    """Every image under `root/<class name>/` (nested folders included), classes in sorted name order.

    Raises `DatasetError` when the folder does not exist, holds fewer than two class folders, a class folder
    holds no image, or an image name is not a regular file (a named pipe, a device, a dangling link: reading it
    could block or never end). Unreadable images are reported by `preprocess`, which opens them through
    `cvt_core.image_processing.read_image_file` (declared sizes bounded before decoding).
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise DatasetError(f"{root}: no such dataset folder")
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: not a folder; --data takes a folder with one subfolder of images per class")
    class_names = sorted(name for name in os.listdir(root)
                         if _visible(name) and os.path.isdir(os.path.join(root, name)))
    if not class_names:
        stray = [n for n in os.listdir(root) if n.lower().endswith(IMAGE_EXTENSIONS)]
        hint = " (it holds images directly: move them into one subfolder per class)" if stray else ""
        raise DatasetError(f"{root}: no class subfolders{hint}; the dataset layout is "
                           f"{root}/<class name>/<image files>")
    if len(class_names) < 2:
        raise DatasetError(f"{root}: only one class ({class_names[0]!r}); a classifier needs at least two class "
                           f"subfolders")
    images: List[object] = []
    labels: List[int] = []
    for index, name in enumerate(class_names):
        files = []
        for folder, subfolders, names in os.walk(os.path.join(root, name)):
            subfolders[:] = sorted(d for d in subfolders if _visible(d))
            files.extend(os.path.join(folder, n) for n in sorted(names)
                         if _visible(n) and n.lower().endswith(IMAGE_EXTENSIONS))
        for path in files:
            _check_regular(path)
        if not files:
            raise DatasetError(f"{os.path.join(root, name)}: class folder holds no images (looked for "
                               f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        images.extend(files)
        labels.extend([index] * len(files))
    return ImageDataset(images, np.asarray(labels, np.int64), class_names, f"image folder {root}")


def load_digits_dataset() -> ImageDataset:
    """scikit-learn's handwritten digits (1797 grey 8x8 images, classes '0'..'9', values 0-16 scaled to 0-255),
    shipped inside scikit-learn, so no download is needed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("the default dataset (handwritten digits) comes with scikit-learn: pip install "
                           "scikit-learn, or pass --data DIR") from None
    from PIL import Image

    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = [Image.fromarray(image, mode="L") for image in pixels]
    return ImageDataset(images, digits.target.astype(np.int64), [str(i) for i in range(10)],
                        "scikit-learn handwritten digits (8x8 grey)")


# ------------------------------------------------------------------------------------------------ splits
def stratified_split(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): each class split by `val_fraction` (rounded), keeping at least one
    training image per class and, when a class has two or more images, at least one validation image."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(members) * val_fraction))
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        else:
            n_val = 0
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(val, np.int64))


# ------------------------------------------------------------------------------------------------ preprocessing
def digits_processor(image_size: int = 32):
    """The preprocessing of the digits runs: a plain bicubic resize of the whole image to `image_size` (crop_pct 1
    keeps it all), ImageNet mean/std, as stored in the checkpoint's preprocessor_config.json."""
    from cvt_core.image_processing import CvtImageProcessor

    return CvtImageProcessor(size=image_size, crop_pct=1.0)


def preprocess(dataset: ImageDataset, processor, chunk: int = 256,
               progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """All images of `dataset` through `processor` (a `CvtImageProcessor`): float32 (N, 3, H, W).

    An image that cannot be read raises `DatasetError` naming the file. `progress(done, total)` is called after
    each chunk.
    """
    from cvt_core.image_processing import ImageLoadError

    out = []
    total = len(dataset)
    for start in range(0, total, chunk):
        items = dataset.images[start:start + chunk]
        try:
            out.append(processor(items)["pixel_values"])
        except (ImageLoadError, OSError, ValueError):
            for item in items:  # run them one by one so the message names the culprit alone
                try:
                    processor(item)
                except (ImageLoadError, OSError, ValueError) as exc:
                    raise DatasetError(f"unreadable image in the dataset: {exc}") from None
            raise
        if progress is not None:
            progress(min(start + chunk, total), total)
    if not out:
        raise DatasetError(f"{dataset.source}: holds no images")
    return np.concatenate(out).astype(np.float32, copy=False)
