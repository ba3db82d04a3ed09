"""`CvtImageProcessor`: turn photos into the `pixel_values` the released CvT checkpoints expect.

It computes what transformers 4.57.6's `ConvNextImageProcessor` (the processor the `microsoft/cvt-*` checkpoints
name in their `preprocessor_config.json`) computes, with NumPy and Pillow only:

1. convert to RGB (``PIL.Image.convert("RGB")`` for PIL images; grey and alpha-carrying arrays likewise), after
   scaling 16-bit and float grey PIL images (modes ``I;16*``, ``I``, ``F``) to 0..255 (see `_to_8bit` and
   docs/preprocessing.md), which ``convert("RGB")`` alone would clip to white;
2. resize with Pillow: if ``size["shortest_edge"] < 384`` the short side goes to ``int(shortest_edge / crop_pct)``
   (the long side to ``int(new_short * long / short)``) and a ``shortest_edge`` square is cut from the centre;
   otherwise the image is warped straight to ``shortest_edge x shortest_edge``;
3. rescale (``x * rescale_factor`` in float64, stored as float32), then normalise ``(x - mean) / std``;
4. stack as ``(batch, 3, H, W)`` float32 (or ``(batch, H, W, 3)`` with ``data_format="channels_last"``).

The constructor's defaults are the released checkpoints' settings (224, crop_pct 0.875, bicubic, ImageNet mean and
std), not the defaults of transformers' constructor (384, bilinear, mean/std 0.5), which match no checkpoint.

Where transformers' processor accepts an input, the result is the same to float32 rounding. We accept more:
grey and RGBA/LA/P PIL images and grey or 4-channel arrays (transformers raises on these; we convert to RGB
first, as `load_image` / `do_convert_rgb` do in transformers), and file paths (read as transformers'
`load_image` reads them: EXIF orientation applied, then converted to RGB).

Untrusted input is bounded (`cvt_core.untrusted.Limits`): every image file, here and in the other readers (`cvt
predict`, `cvt train --data`, the conversion cross-check), is read by `read_image_file`, which opens regular files
only, checks the size the header declares (``IMAGE_PIXELS`` pixels, ``IMAGE_SIDE`` a side) before decoding and
turns Pillow's errors into one `ImageLoadError` line naming the file; a resize whose output would exceed the same
bounds (a 1 x 60000 strip brought to a short side of 256) raises `ImageTooLargeError`; ``preprocessor_config.json``
is strict JSON with typed settings, ``shortest_edge`` and the resized short side at most `MAX_SIDE` (8192).

Neither PyTorch nor TensorFlow is imported unless ``return_tensors`` asks for their tensors.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .atomic import atomic_write
from .filenames import PREPROCESSOR_CONFIG_NAME
from .untrusted import Limits, check_regular_file, load_json_file, open_regular_file

try:
    from PIL import Image, ImageOps, UnidentifiedImageError
except ImportError as exc:  # pragma: no cover - exercised only without Pillow
    raise ImportError("cvt_core.image_processing needs Pillow: pip install pillow") from exc

__all__ = [
    "CvtImageProcessor",
    "ImageBatch",
    "HighBitDepthError",
    "ImageLoadError",
    "ImageTooLargeError",
    "read_image_file",
    "check_image_size",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "PREPROCESSOR_CONFIG_NAME",
]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# At or above this shortest edge transformers' ConvNext processor warps to a square instead of resize + crop.
WARP_THRESHOLD = 384
RELEASED_CROP_PCT = 224 / 256

# Pillow's filter numbers, which is what transformers stores as "resample" in preprocessor_config.json.
_RESAMPLE_BY_NAME = {
    "nearest": int(Image.Resampling.NEAREST),
    "lanczos": int(Image.Resampling.LANCZOS),
    "bilinear": int(Image.Resampling.BILINEAR),
    "bicubic": int(Image.Resampling.BICUBIC),
    "box": int(Image.Resampling.BOX),
    "hamming": int(Image.Resampling.HAMMING),
}

# What transformers' ConvNextImageProcessor assumes for a key missing from a preprocessor_config.json. A file means
# what transformers reads it as, so `from_dict` fills gaps with these, not with our (released-checkpoint) defaults.
_TRANSFORMERS_DEFAULTS: Dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 384},
    "crop_pct": 224 / 256,
    "resample": int(Image.Resampling.BILINEAR),
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
_PROCESSOR_TYPES = ("ConvNextImageProcessor", "ConvNextImageProcessorFast", "ConvNextFeatureExtractor", "CvtImageProcessor")
# Keys transformers (or the hub) writes that carry no preprocessing meaning.
_META_KEYS = ("image_processor_type", "feature_extractor_type", "processor_class", "_processor_class",
              "transformers_version")
_FIELDS = ("do_resize", "size", "crop_pct", "resample", "do_rescale", "rescale_factor", "do_normalize",
           "image_mean", "image_std", "do_center_crop")

_DATA_FORMATS = ("channels_first", "channels_last")
_INPUT_FORMATS = ("channels_first", "channels_last", "none")
_TENSOR_TYPES = ("np", "pt", "tf")


class ImageLoadError(ValueError):
    """An image file could not be read or decoded; the message names the file."""


class ImageTooLargeError(ImageLoadError):
    """An image (a file's header, or an image resized as the settings ask) larger than `Limits.IMAGE_PIXELS`
    pixels or `Limits.IMAGE_SIDE` pixels a side; refused before the pixels are decoded or allocated."""


class ImageBatch(dict):
    """The processor's output: a dict with ``"pixel_values"``, also readable as ``batch.pixel_values``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _enum_value(value: Any) -> Any:
    """`ChannelDimension.FIRST` / `TensorType.PYTORCH` style enums -> their string value."""
    return getattr(value, "value", value)


def _resample_id(resample: Any) -> int:
    value = _enum_value(resample)
    if isinstance(value, str):
        key = value.strip().lower()
        if key not in _RESAMPLE_BY_NAME:
            raise ValueError(f"resample={resample!r} is unknown; choose one of {sorted(_RESAMPLE_BY_NAME)} or a PIL filter number")
        return _RESAMPLE_BY_NAME[key]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or int(value) not in _RESAMPLE_BY_NAME.values():
        raise ValueError(f"resample={resample!r} is not a PIL resampling filter (0-5 or one of {sorted(_RESAMPLE_BY_NAME)})")
    return int(value)


def _show(value: Any) -> str:
    """A value as an error message shows it: its repr, shortened to one short line."""
    text = repr(value) if not isinstance(value, (list, tuple, dict)) or len(value) <= 8 else \
        f"<{type(value).__name__} of {len(value)} entries>"
    text = text.replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    """A real number, not a bool (JSON true is no number) nor a string."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _flag(name: str, value: Any) -> bool:
    """A switch: true or false (a JSON "false" string or a 0 is refused, not read as a truth value)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {_show(value)}")
    return bool(value)


def _finite_positive(name: str, value: Any) -> float:
    if not _is_number(value) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {_show(value)}")
    return float(value)


# The largest square the processor may produce (shortest_edge, and the short side it resizes to): its pixels fit
# Limits.IMAGE_PIXELS. 8192 for the 64 Mi pixels accepted.
MAX_SIDE = min(Limits.IMAGE_SIDE, int(Limits.IMAGE_PIXELS ** 0.5))


def _shortest_edge(size: Any) -> int:
    """`224` or `{"shortest_edge": 224}` (transformers' two spellings) -> 224; at most `MAX_SIDE`."""
    if isinstance(size, dict):
        if set(size) != {"shortest_edge"}:
            raise ValueError(
                f"size={_show(size)}: this processor (like transformers' ConvNextImageProcessor) takes "
                '{"shortest_edge": n} only; height/width sizes are not supported'
            )
        size = size["shortest_edge"]
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)) or int(size) < 1:
        raise ValueError(f"size must be a positive int or {{'shortest_edge': n}}, got {_show(size)}")
    if int(size) > MAX_SIDE:
        raise ValueError(f"size shortest_edge={int(size)} is too large: at most {MAX_SIDE} (a square of "
                         f"{MAX_SIDE * MAX_SIDE:,} pixels) is accepted")
    return int(size)


# Bounds that keep every preprocessed value finite in float32: |(255 * 1e4 + 1e4) / 1e-6| is about 2.6e12
MAX_STATISTIC = 1e4  # |mean|, std and rescale_factor
MIN_STD = 1e-6


def _channel_stats(name: str, value: Any) -> Tuple[float, float, float]:
    """A number, or a list of 1 or 3 finite numbers (one per RGB channel) -> 3 floats."""
    if _is_number(value):
        values = [value] * 3
    else:
        if not isinstance(value, (list, tuple, np.ndarray)) or not all(_is_number(v) for v in value):
            raise ValueError(f"{name} must be a number or 3 numbers (one per RGB channel), got {_show(value)}")
        values = list(value)
        if len(values) == 1:
            values = values * 3
        if len(values) != 3:
            raise ValueError(f"{name} must have 3 entries (one per RGB channel), got {len(values)}: {_show(value)}")
    if not all(np.isfinite(values)) or any(abs(v) > MAX_STATISTIC for v in values):
        raise ValueError(f"{name} must be finite and within +-{MAX_STATISTIC:g}, got {_show(value)}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _describe(image: Any) -> str:
    if isinstance(image, np.ndarray):
        return f"array of shape {image.shape} and dtype {image.dtype}"
    return type(image).__name__


class CvtImageProcessor:
    """Preprocessing of the released CvT checkpoints, equal to transformers' `ConvNextImageProcessor`.

    Args:
        do_resize: resize (and, below 384, centre-crop) to ``size``.
        size: ``{"shortest_edge": n}`` or ``n``. Below 384 the short side is resized to ``int(n / crop_pct)`` and an
            ``n x n`` centre crop is taken; at 384 or above the image is warped to ``n x n``.
        crop_pct: fraction of the resized image the crop keeps (only used below 384).
        resample: Pillow filter, as a number (3 = bicubic), a name ("bicubic") or ``PIL.Image.Resampling``.
        do_rescale, rescale_factor: multiply by ``rescale_factor`` (1/255 maps uint8 to [0, 1]).
        do_normalize, image_mean, image_std: ``(x - mean) / std`` per RGB channel.
        do_center_crop: set False to keep the whole short-side-resized image (below 384 only). transformers has no
            such switch; a processor saved with it False warns that transformers will still crop.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: Union[int, Dict[str, int], None] = None,
        crop_pct: Optional[float] = RELEASED_CROP_PCT,
        resample: Any = Image.Resampling.BICUBIC,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Union[float, Sequence[float], None] = IMAGENET_DEFAULT_MEAN,
        image_std: Union[float, Sequence[float], None] = IMAGENET_DEFAULT_STD,
        do_center_crop: bool = True,
    ):
        # Types are strict, as a preprocessor_config.json states them: switches take true / false, numbers finite
        # ints or floats (not strings, not bools); _check bounds what the settings would allocate.
        self.do_resize = _flag("do_resize", do_resize)
        self.size = {"shortest_edge": _shortest_edge(224 if size is None else size)}
        # transformers treats a missing/None crop_pct as 224/256 (backwards compatibility); so do we.
        self.crop_pct = _finite_positive("crop_pct", RELEASED_CROP_PCT if crop_pct is None else crop_pct)
        self.resample = _resample_id(resample)
        self.do_rescale = _flag("do_rescale", do_rescale)
        self.rescale_factor = _finite_positive("rescale_factor", rescale_factor)
        self.do_normalize = _flag("do_normalize", do_normalize)
        self.image_mean = list(_channel_stats("image_mean", IMAGENET_DEFAULT_MEAN if image_mean is None else image_mean))
        self.image_std = list(_channel_stats("image_std", IMAGENET_DEFAULT_STD if image_std is None else image_std))
        self.do_center_crop = _flag("do_center_crop", do_center_crop)
        self._check(self.size, self.crop_pct, self.rescale_factor, self.image_std)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def for_resolution(cls, resolution: int, **overrides: Any) -> "CvtImageProcessor":
        """The released settings for a model evaluated at ``resolution`` (224: resize 256 + crop; 384: warp)."""
        return cls(size={"shortest_edge": _shortest_edge(resolution)}, **overrides)

    @classmethod
    def for_config(cls, config: Any, **overrides: Any) -> "CvtImageProcessor":
        """The released settings for ``config.image_size`` (a `CvtConfig`, a transformers config or a dict);
        224 when the config names no size."""
        image_size = config.get("image_size") if isinstance(config, dict) else getattr(config, "image_size", None)
        if image_size is None:
            image_size = 224
        if isinstance(image_size, (list, tuple)):
            sides = list(image_size)
            if len(sides) == 1 or (len(sides) == 2 and sides[0] == sides[1]):
                image_size = sides[0]
            else:
                raise ValueError(
                    f"config.image_size={list(image_size)!r} is not square; the released preprocessing produces square "
                    f"images only: build CvtImageProcessor(size=...) yourself"
                )
        return cls.for_resolution(image_size, **overrides)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> Dict[str, Any]:
        """The ``preprocessor_config.json`` content, in transformers' field names."""
        out: Dict[str, Any] = {
            "crop_pct": self.crop_pct,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_processor_type": "ConvNextImageProcessor",
            "image_std": list(self.image_std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": dict(self.size),
        }
        if not self.do_center_crop:
            out["do_center_crop"] = False
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Dict[str, Any], **overrides: Any) -> "CvtImageProcessor":
        """Build from a ``preprocessor_config.json`` mapping (ours or transformers'); keyword arguments override it.

        Keys the file lacks take transformers' defaults, so the result preprocesses as transformers would.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a preprocessor config must be a JSON object, got {type(data).__name__}")
        for key in ("image_processor_type", "feature_extractor_type"):
            kind = data.get(key)
            if kind is not None and kind not in _PROCESSOR_TYPES:
                raise ValueError(
                    f"{key}={kind!r}: this config is for another processor; CvtImageProcessor reads "
                    f"{list(_PROCESSOR_TYPES)} configs only"
                )
        unknown = sorted(str(k) for k in data if k not in _FIELDS and k not in _META_KEYS)
        if unknown:
            shown = unknown[:20] + ([f"... and {len(unknown) - 20} more"] if len(unknown) > 20 else [])
            warnings.warn(f"preprocessor config keys {shown} are not used by CvtImageProcessor and were ignored",
                          UserWarning, stacklevel=2)
        kwargs = dict(_TRANSFORMERS_DEFAULTS)
        kwargs.update({k: v for k, v in data.items() if k in _FIELDS})
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **overrides: Any) -> "CvtImageProcessor":
        """Read ``preprocessor_config.json`` from a checkpoint directory, a JSON file given directly, or a hub
        repository (``org/name`` or ``hf://org/name``; ``revision=``, ``cache_dir=``, ``local_files_only=``, ``token=``
        go to huggingface_hub). Other keyword arguments override fields."""
        from .hub import resolve_file, split_hub_options

        name = os.fspath(path)
        hub_options = split_hub_options(overrides)
        path = resolve_file(name, PREPROCESSOR_CONFIG_NAME, **hub_options)
        if path is None:
            where = os.path.join(name, PREPROCESSOR_CONFIG_NAME) if os.path.isdir(name) else name
            if os.path.lexists(where) and where != name:
                check_regular_file(where, error=ValueError)  # a FIFO or a device: one line saying what it is
            raise FileNotFoundError(
                f"{where}: no such preprocessor config (give a checkpoint directory or hub repository holding "
                f"{PREPROCESSOR_CONFIG_NAME}, or the JSON file itself)"
            )
        # a regular file of bounded size, strict JSON (nesting, NaN, duplicate keys): one ValueError line otherwise
        data = load_json_file(path, "preprocessor config", ValueError)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a preprocessor config must hold a JSON object")
        try:
            return cls.from_dict(data, **overrides)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> str:
        """Write ``preprocessor_config.json`` into ``directory`` (created if needed), atomically; returns its path.

        transformers' ``ConvNextImageProcessor.from_pretrained(directory)`` / ``AutoImageProcessor`` load it and
        produce the same ``pixel_values``.
        """
        if not self.do_center_crop:
            warnings.warn(
                "do_center_crop=False has no counterpart in transformers' ConvNextImageProcessor: transformers will "
                "load this preprocessor_config.json but still centre-crop", UserWarning, stacklevel=2)
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, PREPROCESSOR_CONFIG_NAME)
        with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, CvtImageProcessor) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # ------------------------------------------------------------------ preprocessing
    def __call__(self, images: Any, **kwargs: Any) -> ImageBatch:
        return self.preprocess(images, **kwargs)

    def preprocess(
        self,
        images: Any,
        do_resize: Optional[bool] = None,
        size: Union[int, Dict[str, int], None] = None,
        crop_pct: Optional[float] = None,
        resample: Any = None,
        do_rescale: Optional[bool] = None,
        rescale_factor: Optional[float] = None,
        do_normalize: Optional[bool] = None,
        image_mean: Union[float, Sequence[float], None] = None,
        image_std: Union[float, Sequence[float], None] = None,
        do_center_crop: Optional[bool] = None,
        return_tensors: Optional[str] = None,
        data_format: str = "channels_first",
        input_data_format: Optional[str] = None,
    ) -> ImageBatch:
        """Preprocess one image or a batch; keyword arguments override the processor's settings for this call.

        Args:
            images: a PIL image, a NumPy array (H x W grey; H x W x C or C x H x W with C in 1/3/4, inferred as
                transformers does; N x ... for a batch), a torch/tf tensor, a file path (``str`` or
                ``os.PathLike``), or a (nested) list/tuple of those.
            return_tensors: None or "np" (NumPy), "pt" (torch), "tf" (TensorFlow).
            data_format: "channels_first" -> (batch, 3, H, W); "channels_last" -> (batch, H, W, 3).
            input_data_format: layout of array inputs ("channels_first", "channels_last", or "none" for H x W);
                inferred per image when not given.

        Returns:
            `ImageBatch` with ``"pixel_values"``: float32, stacked (a list of arrays only when ``return_tensors`` is
            None and the images differ in size, e.g. with ``do_resize=False``).
        """
        do_resize = self.do_resize if do_resize is None else _flag("do_resize", do_resize)
        shortest = _shortest_edge(self.size if size is None else size)
        crop_pct = self.crop_pct if crop_pct is None else _finite_positive("crop_pct", crop_pct)
        resample = self.resample if resample is None else _resample_id(resample)
        do_rescale = self.do_rescale if do_rescale is None else _flag("do_rescale", do_rescale)
        rescale_factor = self.rescale_factor if rescale_factor is None else _finite_positive("rescale_factor", rescale_factor)
        do_normalize = self.do_normalize if do_normalize is None else _flag("do_normalize", do_normalize)
        mean = self.image_mean if image_mean is None else list(_channel_stats("image_mean", image_mean))
        std = self.image_std if image_std is None else list(_channel_stats("image_std", image_std))
        do_center_crop = self.do_center_crop if do_center_crop is None else _flag("do_center_crop", do_center_crop)
        self._check({"shortest_edge": shortest}, crop_pct, rescale_factor, std)

        data_format = _enum_value(data_format)
        if data_format not in _DATA_FORMATS:
            raise ValueError(f"data_format={data_format!r} is unknown; choose one of {list(_DATA_FORMATS)}")
        if input_data_format is not None:
            input_data_format = _enum_value(input_data_format)
            if input_data_format not in _INPUT_FORMATS:
                raise ValueError(f"input_data_format={input_data_format!r} is unknown; choose one of {list(_INPUT_FORMATS)}")
        if return_tensors is not None:
            return_tensors = _enum_value(return_tensors)
            if return_tensors not in _TENSOR_TYPES:
                raise ValueError(f"return_tensors={return_tensors!r} is unknown; choose None or one of {list(_TENSOR_TYPES)}")

        items = _flatten(images)
        warned_scaled = False
        outputs: List[np.ndarray] = []
        for index, item in enumerate(items):
            where = "" if len(items) == 1 else f" (image {index} of the batch)"
            image = _to_rgb(item, input_data_format, where)
            if isinstance(item, (str, os.PathLike)):
                where = f" ({os.fspath(item)}){where}"  # later messages (a resize too large) name the file
            if do_rescale and not warned_scaled and isinstance(image, np.ndarray) and _looks_rescaled(image):
                warned_scaled = True
                warnings.warn(
                    "the input looks already rescaled to [0, 1] (float values within [0, 1]) and do_rescale=True will "
                    "scale it again by rescale_factor; pass do_rescale=False for such images", UserWarning, stacklevel=3)
            if do_resize:
                image = _resize(image, shortest, crop_pct, resample, do_center_crop, where)
            elif isinstance(image, Image.Image):
                image = np.asarray(image)
            outputs.append(_rescale_normalize(image, do_rescale, rescale_factor, do_normalize, mean, std))

        if data_format == "channels_first":
            outputs = [np.ascontiguousarray(x.transpose(2, 0, 1)) for x in outputs]
        shapes = {x.shape for x in outputs}
        if len(shapes) > 1:
            if return_tensors is not None:
                raise ValueError(
                    f"cannot stack images of different sizes {sorted(shapes)} into one {return_tensors!r} tensor; "
                    f"keep do_resize=True or pass return_tensors=None for a list"
                )
            return ImageBatch(pixel_values=outputs)
        pixel_values = np.stack(outputs).astype(np.float32, copy=False)
        if return_tensors == "pt":
            import torch

            pixel_values = torch.from_numpy(pixel_values)
        elif return_tensors == "tf":
            import tensorflow as tf

            pixel_values = tf.convert_to_tensor(pixel_values)
        return ImageBatch(pixel_values=pixel_values)

    @staticmethod
    def _check(size: Dict[str, int], crop_pct: float, rescale_factor: float, std: Sequence[float]) -> None:
        shortest = size["shortest_edge"]
        if not _is_number(crop_pct) or not np.isfinite(crop_pct) or crop_pct <= 0:
            raise ValueError(f"crop_pct must be a positive number, got {_show(crop_pct)}")
        if shortest < WARP_THRESHOLD:
            target = int(shortest / crop_pct)
            if target < 1:
                raise ValueError(f"crop_pct={crop_pct!r} with shortest_edge={shortest} resizes to {target} pixels")
            if target > MAX_SIDE:
                raise ValueError(f"crop_pct={crop_pct!r} with shortest_edge={shortest} resizes the short side to "
                                 f"{target} pixels; at most {MAX_SIDE} are accepted (raise crop_pct)")
        if (not _is_number(rescale_factor) or not np.isfinite(rescale_factor) or rescale_factor <= 0
                or rescale_factor > MAX_STATISTIC):
            raise ValueError(f"rescale_factor must be a finite number in (0, {MAX_STATISTIC:g}], got "
                             f"{_show(rescale_factor)}")
        if any(0 < s < MIN_STD for s in std):
            raise ValueError(f"image_std must be at least {MIN_STD:g}, got {list(std)!r}")
        if any(s == 0 for s in std):
            raise ValueError(f"image_std must not contain 0, got {list(std)!r}")
        if any(s < 0 for s in std):
            raise ValueError(f"image_std must be positive, got {list(std)!r}")


# ---------------------------------------------------------------------- helpers
def _flatten(images: Any) -> List[Any]:
    """One image, a 4-D array (a batch) or nested lists/tuples of those -> a flat list of single images."""
    out: List[Any] = []

    def visit(item: Any) -> None:
        if isinstance(item, (list, tuple)):
            for sub in item:
                visit(sub)
            return
        array = _as_array(item)
        if array is not None and array.ndim == 4:
            out.extend(array[i] for i in range(array.shape[0]))
        else:
            out.append(item if array is None else array)

    visit(images)
    if not out:
        raise ValueError("got an empty batch: pass at least one image")
    return out


def _as_array(item: Any) -> Optional[np.ndarray]:
    """NumPy arrays and torch / TensorFlow / JAX tensors -> ndarray (no framework import); anything else -> None."""
    if isinstance(item, np.ndarray):
        return item
    module = type(item).__module__.split(".")[0]
    if module == "torch":
        return item.detach().cpu().numpy()
    if module in ("tensorflow", "keras", "tf_keras", "jax", "jaxlib"):
        return np.asarray(item)
    return None


def _to_rgb(item: Any, input_data_format: Optional[str], where: str) -> Union["Image.Image", np.ndarray]:
    """A single image -> an RGB PIL image or an H x W x 3 array of the input's dtype."""
    if isinstance(item, (str, os.PathLike)):
        return _load(item, where)
    if isinstance(item, Image.Image):
        if item.mode == "RGB":
            return item
        item = _to_8bit(item, where)
        try:
            return item.convert("RGB")
        except (ValueError, OSError) as exc:
            raise ValueError(f"cannot convert a PIL image of mode {item.mode!r} to RGB{where}: {exc}") from None
    if isinstance(item, np.ndarray):
        return _array_to_hwc_rgb(item, input_data_format, where)
    if isinstance(item, (bytes, bytearray)):
        raise TypeError(f"unsupported image type bytes{where}: open it first, e.g. PIL.Image.open(io.BytesIO(data))")
    raise TypeError(
        f"unsupported image type {type(item).__name__}{where}: pass a PIL image, a NumPy array, a torch/tf tensor, "
        f"a file path (str or pathlib.Path), or a list/tuple of those"
    )


def _load(path: Union[str, os.PathLike], where: str) -> "Image.Image":
    """Read a file as transformers' `load_image` does: EXIF orientation applied, converted to RGB."""
    return read_image_file(path, where)


# Formats Pillow may decode a file as: an allow list of the photo formats whose header states the size that
# decoding produces, so the size check before decoding holds (and each tile Pillow will decode must lie inside that
# size, `_check_tiles`). Left out: containers whose header states another size than what they decode (ICO, CUR and
# ICNS decode an embedded PNG of any size, then shrink it; TIFF's tiles and strips may be far larger than its image,
# and libtiff inflates a whole tile into a buffer of the tile's size), formats rendered by other programs (EPS runs
# Ghostscript, WMF), and scientific and game formats (HDF5, FITS, GRIB, DDS...).
READ_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "GIF", "WEBP", "PPM", "TGA", "QOI")
# What Pillow raises on a corrupt, truncated or hostile file (its plugins let struct, index and EOF errors through).
_DECODE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError,
                  struct.error, IndexError, KeyError, TypeError, ZeroDivisionError, OverflowError, MemoryError)


def _read_formats() -> List[str]:
    Image.init()
    return [name for name in READ_FORMATS if name in Image.OPEN]


def check_image_size(width: int, height: int, what: str) -> None:
    """Raise `ImageTooLargeError` (one line starting with `what`) unless a `width` x `height` image has at most
    `Limits.IMAGE_PIXELS` pixels and `Limits.IMAGE_SIDE` a side; `ImageLoadError` for an empty one."""
    if width < 1 or height < 1:
        raise ImageLoadError(f"{what}: the image is {width}x{height} pixels, i.e. empty")
    if width > Limits.IMAGE_SIDE or height > Limits.IMAGE_SIDE or width * height > Limits.IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"{what}: the image is {width}x{height} pixels ({width * height:,}); at most {Limits.IMAGE_PIXELS:,} pixels "
            f"and {Limits.IMAGE_SIDE:,} a side are read")


def read_image_file(path: Union[str, os.PathLike], where: str = "") -> "Image.Image":
    """The one way an image file is read (the processor, `cvt predict`, `cvt train --data`, the conversion
    cross-check): an RGB 8-bit PIL image, EXIF orientation applied, as transformers' `load_image` reads it.

    Only a regular file is opened (a FIFO is refused without blocking, as are devices and folders); its header is
    read and the declared size checked against `Limits.IMAGE_PIXELS` / `Limits.IMAGE_SIDE` before a pixel is
    decoded (a 69-byte PNG declaring 30000 x 30000 is refused, not allocated); what Pillow raises on a corrupt or
    truncated file becomes one `ImageLoadError` line naming the file. A missing file is a `FileNotFoundError`.
    Pillow's global `Image.MAX_IMAGE_PIXELS` is left as it is."""
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if name.startswith(("http://", "https://")):
        raise ValueError(f"{name}: URLs are not fetched; download the image and pass the file or a PIL image{where}")
    if not os.path.exists(name):
        raise FileNotFoundError(f"{name}: no such image file{where}")
    try:
        handle = open_regular_file(name, ImageLoadError)
    except ImageLoadError as exc:
        raise ImageLoadError(f"{exc}{where}") from None
    what = f"{name}{where}"
    with handle:
        try:
            with warnings.catch_warnings():
                # Pillow's warnings (its bomb warning above its own bound, which ours is below; corrupt EXIF, tags
                # past the end) would be extra lines: the file is either read whole or refused in one line
                warnings.simplefilter("ignore")
                opened = Image.open(handle, formats=_read_formats())
        except Image.DecompressionBombError as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            declared = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow reads"
            raise ImageTooLargeError(f"{what}: the image declares {declared}; at most {Limits.IMAGE_PIXELS:,} pixels "
                                     f"and {Limits.IMAGE_SIDE:,} a side are read") from None
        except UnidentifiedImageError:
            raise ImageLoadError(f"{what}: cannot read this file as an image: not in a format read here "
                                 f"({', '.join(READ_FORMATS)}); convert it to PNG or JPEG") from None
        except _DECODE_ERRORS as exc:
            raise ImageLoadError(f"{what}: cannot read this file as an image ({_error_text(exc)})") from None
        with opened:
            check_image_size(*opened.size, what)  # the header's size, before decoding
            _check_tiles(opened, what)
            if opened.format == "JPEG":
                _check_jpeg_scans(handle, what)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opened.load()
                check_image_size(*opened.size, what)  # a format may settle its size while decoding
                image = ImageOps.exif_transpose(opened)
                image = _to_8bit(image, f" ({name}){where}")
                return image.convert("RGB")
            except (HighBitDepthError, ImageTooLargeError):
                raise
            except _DECODE_ERRORS as exc:
                raise ImageLoadError(f"{what}: cannot read this file as an image ({_error_text(exc)})") from None


MAX_JPEG_SCANS = 100  # a progressive JPEG has about 10; libjpeg decodes every scan over the whole image


def _check_jpeg_scans(handle, what: str) -> None:
    """Refuse a JPEG with more than `MAX_JPEG_SCANS` scans before decoding: each scan costs a pass over the whole
    image, so a 1 MB file of 10,000 tiny scans kept a core busy for 100 s. Start-of-scan markers (FF DA) cannot
    occur inside entropy-coded data (an FF there is followed by 00), so counting them counts the scans."""
    position = handle.tell()
    handle.seek(0)
    scans, tail = 0, b""
    while True:
        chunk = handle.read(1 << 20)
        if not chunk:
            break
        scans += (tail + chunk).count(b"\xff\xda")
        tail = chunk[-1:]
        if scans > MAX_JPEG_SCANS:
            raise ImageTooLargeError(f"{what}: a JPEG of more than {MAX_JPEG_SCANS} scans; each is a pass over the "
                                     f"whole image (re-save it as a baseline JPEG or PNG)")
    handle.seek(position)


def _check_tiles(opened: "Image.Image", what: str) -> None:
    """Refuse a file whose decoder tiles (Pillow's plan of what it decodes where) reach outside the size its header
    states: a GIF frame larger than its screen, for instance, would be decoded at the frame's size."""
    width, height = opened.size
    for tile in getattr(opened, "tile", None) or ():
        box = tile[1] if len(tile) > 1 else None
        if not (isinstance(box, tuple) and len(box) == 4):
            continue
        x0, y0, x1, y1 = box
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ImageTooLargeError(f"{what}: the image's data ({x1 - x0}x{y1 - y0} at {x0},{y0}) reaches outside the "
                                     f"{width}x{height} pixels its header states; re-save it as PNG or JPEG")


def _error_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class HighBitDepthError(ImageLoadError):
    """A high-bit-depth image (a file or a PIL image) whose value range fits no convention this processor knows
    (see `_to_8bit`)."""


def _to_8bit(image: "Image.Image", where: str) -> "Image.Image":
    """High-bit-depth grey PIL images -> mode "L", scaled to 0..255, so that ``convert("RGB")`` (which clips every
    value above 255 to white) sees 8-bit values. Rounds to the nearest level; other modes are returned as they are.

    - ``I;16`` / ``I;16B`` / ``I;16L`` / ``I;16N`` (16-bit PNG, ...): ``round(v * 255 / 65535)``, i.e. v / 257.
    - ``I`` (32-bit integer; 16-bit PGM/PPM open so): values within 0..255 are already 8-bit and kept; else values
      within 0..65535 are taken as 16-bit and scaled as above.
    - ``F`` (32-bit float): values within 0..1 are scaled by 255; else within 0..255 kept; else within 0..65535
      scaled as 16-bit.
    Anything else (negative, above 65535, NaN) raises `HighBitDepthError`: no guess would be safe.
    Pillow itself already reduces 16-bit RGB(A) and grey+alpha files to 8 bits (their high byte) when it opens them.
    """
    mode = image.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return image
    values = np.asarray(image)
    with np.errstate(invalid="ignore", over="ignore"):  # a NaN or huge float pixel is refused below, in one line
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 65535:
        raise HighBitDepthError(
            f"cannot tell the bit depth of a mode {mode!r} image{where} with values in [{low:g}, {high:g}]: 16-bit "
            f"(0..65535), 8-bit (0..255) and, for float images, 0..1 are understood; scale it to 8 bits yourself")
    if mode == "F" and high <= 1:
        scale = 255.0
    elif not mode.startswith("I;16") and high <= 255:
        scale = 1.0
    else:
        scale = 255.0 / 65535.0
    # integer images: float32 gives every 16-bit level exactly as float64 rounds it, in half the memory, scaled in
    # place; float images keep float64, whose rounding float32 does not reproduce at every level
    scaled = values.astype(np.float64 if mode == "F" else np.float32)
    scaled *= scale
    np.rint(scaled, out=scaled)
    return Image.fromarray(scaled.astype(np.uint8))


def _array_to_hwc_rgb(array: np.ndarray, input_data_format: Optional[str], where: str) -> np.ndarray:
    if array.dtype == np.bool_:
        raise TypeError(f"unsupported array dtype bool{where}: convert masks to uint8 first (e.g. mask.astype(np.uint8) * 255)")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise TypeError(f"unsupported array dtype {array.dtype}{where}: pass real numbers (uint8 0-255 or floats)")
    if array.ndim == 2:
        if input_data_format not in (None, "none"):
            raise ValueError(f"a 2-D array{where} is a grey H x W image; input_data_format={input_data_format!r} does not fit")
        hwc = array[:, :, None]
    elif array.ndim == 3:
        layout = input_data_format if input_data_format is not None else _infer_layout(array, where)
        if layout == "none":
            raise ValueError(f"input_data_format='none' means an H x W array, got shape {array.shape}{where}")
        hwc = array.transpose(1, 2, 0) if layout == "channels_first" else array
    else:
        raise ValueError(
            f"wrong array shape {array.shape}{where}: expected H x W (grey), H x W x C or C x H x W with C in (1, 3, 4), "
            f"or N x ... for a batch"
        )
    channels = hwc.shape[2]
    if hwc.shape[0] == 0 or hwc.shape[1] == 0:
        raise ValueError(f"wrong array shape {array.shape}{where}: the image is empty")
    if channels == 1:
        return np.repeat(hwc, 3, axis=2)  # what PIL's L -> RGB conversion does
    if channels == 3:
        return hwc
    if channels == 4:
        return hwc[:, :, :3]  # what PIL's RGBA -> RGB conversion does: drop alpha
    raise ValueError(f"wrong array shape {array.shape}{where}: {channels} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")


def _infer_layout(array: np.ndarray, where: str) -> str:
    """transformers' rule: channels first if the first axis is 1 or 3 (also when both ends are), else channels last
    if the last axis is; extended to 4-channel (RGBA) arrays, which transformers cannot take."""
    first, last = array.shape[0], array.shape[2]
    for channels in ((1, 3), (4,)):
        if first in channels:
            return "channels_first"
        if last in channels:
            return "channels_last"
    raise ValueError(
        f"wrong array shape {array.shape}{where}: cannot tell the channel axis (neither the first nor the last axis "
        f"has 1, 3 or 4 entries)"
    )


def _looks_rescaled(image: np.ndarray) -> bool:
    return image.dtype != np.uint8 and image.size > 0 and float(np.min(image)) >= 0 and float(np.max(image)) <= 1


def _to_pil(hwc: np.ndarray, where: str) -> Tuple["Image.Image", bool]:
    """H x W x 3 array -> RGB PIL image, as transformers converts arrays before resizing: uint8 as is; integer-valued
    numbers in [0, 255] cast; other floats in [0, 1] scaled by 255 (float64, stored float32) then truncated to uint8.
    Returns the image and whether it was scaled (the resized result is then scaled back by 1/255)."""
    if hwc.dtype == np.uint8:
        scaled = False
    elif np.allclose(hwc, hwc.astype(int)):
        if not (np.all(hwc >= 0) and np.all(hwc <= 255)):
            raise ValueError(
                f"cannot resize an image{where} with values in [{hwc.min()}, {hwc.max()}]: integer-valued pixels must lie "
                f"in [0, 255]"
            )
        scaled = False
    elif np.all(hwc >= 0) and np.all(hwc <= 1):
        scaled = True
    else:
        raise ValueError(
            f"cannot resize an image{where} with values in [{hwc.min()}, {hwc.max()}]: pass uint8 (0-255) or floats in "
            f"[0, 1] (transformers' rule), or resize it yourself and pass do_resize=False"
        )
    if scaled:
        hwc = (hwc.astype(np.float64) * 255).astype(np.float32)
    return Image.fromarray(np.ascontiguousarray(hwc.astype(np.uint8))), scaled


def _resize(image: Union["Image.Image", np.ndarray], shortest: int, crop_pct: float, resample: int,
            do_center_crop: bool, where: str) -> np.ndarray:
    scaled = False
    if isinstance(image, np.ndarray):
        image, scaled = _to_pil(image, where)
    width, height = image.size
    if shortest < WARP_THRESHOLD:
        target = int(shortest / crop_pct)
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(target * long / short)
        out_h, out_w = (new_long, target) if width <= height else (target, new_long)
        crop = (shortest, shortest) if do_center_crop else None
    else:
        out_h, out_w = shortest, shortest
        crop = None
    if out_w > Limits.IMAGE_SIDE or out_h > Limits.IMAGE_SIDE or out_w * out_h > Limits.IMAGE_PIXELS:
        # a thin strip (1 x 60000) resized to a short side of 256 would be 256 x 15,360,000 pixels
        raise ImageTooLargeError(
            f"cannot resize the {width}x{height} image{where} to {out_w}x{out_h} pixels (short side "
            f"{min(out_w, out_h)}): at most {Limits.IMAGE_PIXELS:,} pixels and {Limits.IMAGE_SIDE:,} a side are "
            f"accepted; crop it to a less elongated shape first")
    resized = np.asarray(image.resize((out_w, out_h), resample=resample))
    if resized.ndim == 2:
        resized = resized[:, :, None]
    if crop is not None:
        resized = _center_crop(resized, *crop)
    if scaled:
        resized = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    return resized


def _center_crop(hwc: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' centre crop: top = (H - h) // 2; zero-padding (centred, extra pixel before) where too small."""
    height, width = hwc.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return hwc[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w) + hwc.shape[2:], dtype=hwc.dtype)
    top_pad, left_pad = -(-(new_h - height) // 2), -(-(new_w - width) // 2)
    padded[top_pad:top_pad + height, left_pad:left_pad + width] = hwc
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def _rescale_normalize(hwc: np.ndarray, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                       mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """transformers' order and dtypes: rescale in float64 stored as float32; normalise in the image's float dtype
    (float32 for integer images)."""
    if do_rescale:
        hwc = (hwc.astype(np.float64) * rescale_factor).astype(np.float32)
    if do_normalize:
        if not np.issubdtype(hwc.dtype, np.floating):
            hwc = hwc.astype(np.float32)
        hwc = (hwc - np.array(mean, dtype=hwc.dtype)) / np.array(std, dtype=hwc.dtype)
    return hwc.astype(np.float32, copy=False)
