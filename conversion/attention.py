"""Attention maps to look at (`cvt attention`): per chosen layer, its attention averaged over heads and laid out on
the stage's key grid, and a PNG of the image beside them.

In a stage with a cls token the map is the cls token's attention over the grid positions; elsewhere it is the mean
attention each grid position receives from all queries. Keys sit on the key/value grid (stride 2 for the released
configs), so each map has that grid's size; `draw_attention` upsamples it onto the image the model saw.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from cvt_core.config import CvtConfig
from cvt_core.shapes import stage_geometry

from .errors import ConversionError, one_line

FRAMEWORKS = ("torch", "keras")


@dataclass
class AttentionMap:
    stage: int  # 1-based, as in the backbone's stage names ("stage1", ...)
    layer: int  # the layer's index within its stage, from 0
    kind: str  # "cls token" or "mean received"
    grid: np.ndarray  # (key_height, key_width): the attention mass on each grid position
    probabilities: np.ndarray  # (queries, keys), averaged over heads: every row sums to 1 over the keys


def layer_ranges(config: CvtConfig) -> List[range]:
    """The positions of each stage's layers in the model's `attentions` tuple."""
    ranges, start = [], 0
    for depth in config.depth:
        ranges.append(range(start, start + depth))
        start += depth
    return ranges


def choose_layers(config: CvtConfig, stages: Optional[Sequence[int]] = None, layer: int = -1) -> List[Tuple[int, int]]:
    """(stage from 1, layer within it from 0) for each chosen stage (default: every stage); `layer` counts from 0
    within the stage, negative from its end (default: the last layer)."""
    count = config.num_stages
    stages = list(range(1, count + 1)) if not stages else list(stages)
    chosen = []
    for stage in stages:
        if not 1 <= stage <= count:
            raise ConversionError(None, f"--stage {stage}: this model has stages 1 to {count}")
        depth = config.depth[stage - 1]
        if not -depth <= layer < depth:
            raise ConversionError(None, f"--layer {layer}: stage {stage} has {depth} layer(s), 0 to {depth - 1} "
                                        f"(or -{depth} to -1)")
        chosen.append((stage, layer % depth))
    return chosen


def maps_from_attentions(config: CvtConfig, attentions: Sequence[np.ndarray], height: int, width: int,
                         chosen: Sequence[Tuple[int, int]]) -> List[AttentionMap]:
    """The maps of the `chosen` layers from a model's `attentions` (one (1, heads, queries, keys) array per layer)
    on a height x width image."""
    geometry = stage_geometry(config, height, width)
    ranges = layer_ranges(config)
    maps = []
    for stage, layer in chosen:
        g = geometry[stage - 1]
        probabilities = np.asarray(attentions[ranges[stage - 1][layer]], np.float64)[0].mean(axis=0)
        offset = int(g.with_cls_token)
        if g.with_cls_token:
            grid, kind = probabilities[0, offset:], "cls token"
        else:
            grid, kind = probabilities[offset:, offset:].mean(axis=0), "mean received"
        maps.append(AttentionMap(stage, layer, kind, grid.reshape(g.key_height, g.key_width), probabilities))
    return maps


def load_backbone(directory: str, framework: Optional[str] = None):
    """(framework, model): the bare CvT of a transformers-format checkpoint folder (a classifier's head is left
    out), in PyTorch when it is installed, else Keras."""
    from cvt_core.checkpoint import pretrained_weights_file

    if not os.path.isdir(directory):
        raise ConversionError(directory, "no such checkpoint folder")
    if pretrained_weights_file(directory) is None:
        raise ConversionError(directory, "holds no model.safetensors, pytorch_model.bin or tf_model.h5; convert it "
                                         "with `cvt convert DIR OUT --to torch`")
    if framework is None:
        import importlib.util

        framework = "torch" if importlib.util.find_spec("torch") is not None else "keras"
    if framework == "torch":
        from cvt_torch import CvtModel

        return framework, CvtModel.from_pretrained(directory)
    from .models import import_keras_models

    return framework, import_keras_models()[1].from_pretrained(directory)


def run_attentions(framework: str, model, pixel_values: np.ndarray) -> List[np.ndarray]:
    if framework == "torch":
        import torch

        with torch.no_grad():
            outputs = model(torch.from_numpy(pixel_values), output_attentions=True)
        return [a.float().numpy() for a in outputs.attentions]
    return [np.asarray(a, np.float32) for a in model(pixel_values, output_attentions=True).attentions]


def attention_maps(image, directory: str, stages: Optional[Sequence[int]] = None, layer: int = -1,
                   framework: Optional[str] = None) -> Tuple[np.ndarray, List[AttentionMap]]:
    """The work behind `cvt attention`, for notebooks too: (the image as the model saw it, RGB floats in [0, 1]
    of shape (H, W, 3); one `AttentionMap` per chosen stage). `image`: a file path or a PIL image, preprocessed as
    the folder's preprocessor_config.json says (else the released CvT preprocessing)."""
    from cvt_core.image_processing import PREPROCESSOR_CONFIG_NAME, CvtImageProcessor, ImageLoadError

    framework, model = load_backbone(directory, framework)
    config = model.config
    chosen = choose_layers(config, stages, layer)
    processor_path = os.path.join(directory, PREPROCESSOR_CONFIG_NAME)
    processor = (CvtImageProcessor.from_pretrained(processor_path) if os.path.isfile(processor_path)
                 else CvtImageProcessor.for_config(config))
    try:
        pixel_values = np.asarray(processor(image, return_tensors="np")["pixel_values"], np.float32)
    except (ImageLoadError, FileNotFoundError, ValueError) as exc:
        raise ConversionError(None, one_line(str(exc))) from None
    height, width = pixel_values.shape[-2:]
    maps = maps_from_attentions(config, run_attentions(framework, model, pixel_values), height, width, chosen)
    seen = pixel_values[0]
    if processor.do_normalize:
        seen = (seen * np.asarray(processor.image_std, np.float32).reshape(3, 1, 1)
                + np.asarray(processor.image_mean, np.float32).reshape(3, 1, 1))
    if not processor.do_rescale:
        seen = seen / 255.0
    seen = np.clip(seen, 0.0, 1.0).transpose(1, 2, 0)
    return seen, maps


def draw_attention(image: np.ndarray, maps: Sequence[AttentionMap], path: str, title: str = "",
                   force: bool = True, sources: Sequence[str] = ()) -> str:
    """A PNG: the image, then each map upsampled onto it (nearest key-grid cell) as a heat overlay.

    Written as `conversion.atomic.write_file` writes a single file: atomically, never onto one of `sources` (the
    files read), and over an existing file only with `force` and only when it is a picture cvt wrote (the PNG
    carries a `cvt-written` record with its own digest, which this adds)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import check_file_destination, png_with_record, write_file

    check_file_destination(path, force, sources)
    height, width = image.shape[:2]
    figure, axes = plt.subplots(1, len(maps) + 1, figsize=(3.2 * (len(maps) + 1), 3.6))
    try:
        axes[0].imshow(image)
        axes[0].set_title("input", fontsize=9)
        for ax, item in zip(axes[1:], maps):
            rows = np.minimum((np.arange(height) * item.grid.shape[0]) // height, item.grid.shape[0] - 1)
            columns = np.minimum((np.arange(width) * item.grid.shape[1]) // width, item.grid.shape[1] - 1)
            heat = item.grid[rows][:, columns]
            ax.imshow(image)
            ax.imshow(heat, cmap="inferno", alpha=0.6)
            ax.set_title(f"stage {item.stage}, layer {item.layer}: {item.kind}\n"
                         f"{item.grid.shape[0]}x{item.grid.shape[1]} key grid", fontsize=9)
        for ax in axes:
            ax.axis("off")
        if title:
            figure.suptitle(title, fontsize=10)
        figure.tight_layout(rect=(0, 0, 1, 0.9) if title else None)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(figure)
    return write_file(path, png_with_record(buffer.getvalue()), force, sources)
