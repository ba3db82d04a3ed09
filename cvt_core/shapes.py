"""Per-stage shape rules of CvT, shared by both frameworks.

Everything here is plain integer arithmetic so each backend can check an input before it reaches a layer, and
so the average-pooling projection (`qkv_projection_method="avg"`) computes PyTorch's `ceil_mode=True` geometry
identically in Keras. `attention_projection` says which spatial operation, stride and padding each q/k/v
projection of a stage uses; both models build their projections from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Sequence, Tuple

from .untrusted import Limits

if TYPE_CHECKING:  # annotations only: config.py reads the shapes (its size budget), not the other way round
    from .config import CvtConfig

DEFAULT_IMAGE_SIZE = 224  # the released CvT models' resolution, for configs that name none


class InputTooSmallError(ValueError):
    """The image is smaller than the network's strided convolutions can reduce."""


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """floor((size + 2*padding - kernel) / stride) + 1, the size of a convolution's output along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def avg_pool_ceil_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output size of PyTorch's `AvgPool2d(..., ceil_mode=True)` along one axis.

    ceil instead of floor, but a last window that would start inside the right padding is dropped.
    """
    out = -(-(size + 2 * padding - kernel) // stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out


def avg_pool_ceil_window_counts(size: int, kernel: int, stride: int, padding: int) -> List[int]:
    """Divisor of each output position of `AvgPool2d(ceil_mode=True, count_include_pad=True)` along one axis.

    Padding cells count, but the part of a ceil-mode window hanging past the padded input does not. The 2-D divisor
    is the outer product of the per-axis counts.
    """
    out = avg_pool_ceil_output_size(size, kernel, stride, padding)
    counts = []
    for i in range(out):
        start = i * stride - padding
        end = min(start + kernel, size + padding)
        counts.append(end - start)
    return counts


def avg_pool_ceil_extra_padding(size: int, kernel: int, stride: int, padding: int) -> int:
    """Zeros to add after the symmetric padding so a 'valid' pooling yields the ceil-mode output size."""
    out = avg_pool_ceil_output_size(size, kernel, stride, padding)
    return max(0, (out - 1) * stride + kernel - (size + 2 * padding))


@dataclass(frozen=True)
class StageGeometry:
    """Token grid sizes of one stage for a given input size."""

    stage: int
    height: int  # stage output (patch embedding) grid
    width: int
    query_height: int
    query_width: int
    key_height: int
    key_width: int
    with_cls_token: bool

    @property
    def num_tokens(self) -> int:
        return self.height * self.width + int(self.with_cls_token)

    @property
    def num_query_tokens(self) -> int:
        return self.query_height * self.query_width + int(self.with_cls_token)

    @property
    def num_key_tokens(self) -> int:
        return self.key_height * self.key_width + int(self.with_cls_token)


PROJECTION_ROLES = ("query", "key", "value")


class AttentionProjection(NamedTuple):
    """The spatial operation of one of a stage's q/k/v projections."""

    method: str  # "dw_bn" (depthwise conv + BatchNorm), "avg" (ceil-mode average pooling) or "linear" (none)
    kernel_size: int
    stride: int
    padding: int


def attention_projection(config: CvtConfig, stage: int, role: str) -> AttentionProjection:
    """The q/k/v projection of `stage` for `role` ("query", "key" or "value"): the query uses stride_q /
    padding_q, the key and value stride_kv / padding_kv; with "avg" the query has no spatial operation ("linear"),
    as in the original code."""
    if role not in PROJECTION_ROLES:
        raise ValueError(f"role={role!r} is unknown; choose one of {list(PROJECTION_ROLES)}")
    method = config.qkv_projection_method[stage]
    if role == "query":
        method = "linear" if method == "avg" else method
        return AttentionProjection(method, config.kernel_qkv[stage], config.stride_q[stage], config.padding_q[stage])
    return AttentionProjection(method, config.kernel_qkv[stage], config.stride_kv[stage], config.padding_kv[stage])


def _projection_size(size: int, config: CvtConfig, stage: int, role: str) -> int:
    projection = attention_projection(config, stage, role)
    kernel, stride, padding = projection.kernel_size, projection.stride, projection.padding
    if projection.method == "avg":
        return avg_pool_ceil_output_size(size, kernel, stride, padding)
    if projection.method == "dw_bn":
        return conv_output_size(size, kernel, stride, padding)
    return size


def _try_stage_geometry(config: CvtConfig, height: int, width: int) -> Tuple[List[StageGeometry], str]:
    """The grids of every stage, or the grids so far and why the next stage has none."""
    out: List[StageGeometry] = []
    h, w = height, width
    for s in range(config.num_stages):
        k, st, p = config.patch_sizes[s], config.patch_stride[s], config.patch_padding[s]
        h, w = conv_output_size(h, k, st, p), conv_output_size(w, k, st, p)
        if h < 1 or w < 1:
            return out, (f"stage {s}'s patch embedding (kernel {k}, stride {st}, padding {p}) leaves a "
                         f"{max(h, 0)}x{max(w, 0)} grid")
        qh, qw = _projection_size(h, config, s, "query"), _projection_size(w, config, s, "query")
        kh, kw = _projection_size(h, config, s, "key"), _projection_size(w, config, s, "key")
        if min(qh, qw, kh, kw) < 1:
            return out, f"stage {s}'s attention projection leaves an empty grid (query {qh}x{qw}, key {kh}x{kw})"
        out.append(StageGeometry(s, h, w, qh, qw, kh, kw, bool(config.cls_token[s])))
    return out, ""


def partial_stage_geometry(config: CvtConfig, height: int, width: int) -> List[StageGeometry]:
    """The grids of the stages an input of `height` x `width` reaches (all of them unless it is too small); never
    raises. `CvtConfig.validate` sizes a model's activations from it."""
    return _try_stage_geometry(config, height, width)[0]


def stage_geometry(config: CvtConfig, height: int, width: int) -> List[StageGeometry]:
    """Grid sizes of every stage for an input of `height` x `width`; raises `InputTooSmallError` if any is empty."""
    geometry, problem = _try_stage_geometry(config, height, width)
    if problem:
        side = minimum_input_size(config)
        raise InputTooSmallError(f"input {height}x{width} is too small: {problem}; this config needs at least "
                                 f"{side}x{side} pixels")
    return geometry


def stage_output_sizes(config: CvtConfig, height: int, width: int) -> List[Tuple[int, int]]:
    """(height, width) of every stage's output grid, e.g. [(56, 56), (28, 28), (14, 14)] for cvt-13 at 224."""
    return [(g.height, g.width) for g in stage_geometry(config, height, width)]


def default_input_size(config: CvtConfig) -> Tuple[int, int]:
    """(height, width) the config's `image_size` names (an int or a pair), else 224 x 224."""
    size = config.image_size if config.image_size is not None else DEFAULT_IMAGE_SIZE
    if isinstance(size, (list, tuple)):
        return (int(size[0]), int(size[-1]))
    return (int(size), int(size))


def minimum_input_size(config: CvtConfig) -> int:
    """Smallest square side every stage accepts."""
    side = 1
    # Every stage shrinks its input by a bounded factor, so the search ends well before this bound.
    while _try_stage_geometry(config, side, side)[1]:
        side += 1
        if side > 1 << 20:
            raise ValueError("no input size fits this config")
    return side


def check_pixel_values_shape(config: CvtConfig, shape: Sequence[int], channels_last: bool = False) -> Tuple[int, int]:
    """Validate an input shape (NCHW, or NHWC with `channels_last`) and return (height, width).

    Unknown (None) batch or spatial sizes pass; the check is repeated once they are known.
    """
    layout = "(batch, height, width, channels)" if channels_last else "(batch, channels, height, width)"
    if len(shape) != 4:
        raise ValueError(f"pixel_values must be 4-D {layout}, got shape {tuple(shape)} ({len(shape)}-D)")
    channels = shape[3] if channels_last else shape[1]
    height, width = (shape[1], shape[2]) if channels_last else (shape[2], shape[3])
    if channels is not None and channels != config.num_channels:
        hint = ""
        if not channels_last and shape[3] == config.num_channels:
            hint = "; it looks channels-last: pass data_format='channels_last'"
        elif channels_last and shape[1] == config.num_channels:
            hint = "; it looks channels-first: pass data_format='channels_first'"
        raise ValueError(
            f"pixel_values has {channels} channels but the config expects num_channels={config.num_channels} "
            f"(shape {tuple(shape)}, layout {layout}){hint}"
        )
    if height is not None and width is not None:
        stage_geometry(config, int(height), int(width))
        problem = activation_problem(config, int(height), int(width))
        if problem:
            raise ModelTooLargeError(f"pixel_values of {int(height)}x{int(width)}: {problem}")
    return height, width


class ModelTooLargeError(ValueError):
    """A config (or an input size) whose model would need more parameters or activation memory than `Limits`
    accepts."""


def activation_elements(config: CvtConfig, height: Optional[int] = None, width: Optional[int] = None) -> Tuple[int, str]:
    """Activation elements one image of `height` x `width` (default: the config's `image_size`, 224 when unset)
    needs at the widest point, and
    where that is: the largest of the input image and, for each stage, its tokens times its widest layer (embed_dim
    or the MLP's hidden width) plus its attention maps (heads x query tokens x key tokens), and each zero-padded grid
    a convolution reads (the patch embedding's input, the q/k/v projections' inputs)."""
    if height is None or width is None:
        height, width = default_input_size(config)
    worst = height * width * config.num_channels
    where = f"the {height}x{width} input image"
    in_height, in_width = height, width
    for geo in partial_stage_geometry(config, height, width):
        s = geo.stage
        widest = max(config.embed_dim[s], config.mlp_hidden_dim(s))
        maps = config.num_heads[s] * geo.num_query_tokens * geo.num_key_tokens
        elements = geo.num_tokens * widest + maps
        if elements > worst:
            worst = elements
            where = (f"stage {s} of a {height}x{width} image: {geo.num_tokens:,} tokens of width {widest:,} and "
                     f"{config.num_heads[s]} attention maps of {geo.num_query_tokens:,}x{geo.num_key_tokens:,}")
        # the zero-padded grids the convolutions read (a framework may pad explicitly, as Keras does)
        padded = [(f"the patch embedding's padded input ({config.stage_in_channels(s)} channels)",
                   config.stage_in_channels(s), in_height + 2 * config.patch_padding[s],
                   in_width + 2 * config.patch_padding[s])]
        if config.qkv_projection_method[s] != "linear":
            for name in ("padding_q", "padding_kv"):
                pad = getattr(config, name)[s]
                padded.append((f"the q/k/v projection's input padded by {name}={pad}", config.embed_dim[s],
                               geo.height + 2 * pad, geo.width + 2 * pad))
        for what, channels, padded_height, padded_width in padded:
            elements = channels * padded_height * padded_width
            if elements > worst:
                worst = elements
                where = f"stage {s} of a {height}x{width} image: {what}, {padded_height:,}x{padded_width:,}"
        in_height, in_width = geo.height, geo.width
    return worst, where


def activation_problem(config: CvtConfig, height: Optional[int] = None, width: Optional[int] = None) -> Optional[str]:
    """Why one image of `height` x `width` (default: the config's image size) needs more activation memory than
    `Limits.ACTIVATION_ELEMENTS`, or None. Checked for the config when it is validated, and for every input the
    models are given (`check_pixel_values_shape`): an input larger than the config's image size, from a
    preprocessing config or a caller, is held to the same bound."""
    elements, where = activation_elements(config, height, width)
    if elements <= Limits.ACTIVATION_ELEMENTS:
        return None
    return (f"one image would need {elements:,} activation elements ({elements * 4 / 1e9:.1f} GB in float32) in "
            f"{where}; at most {Limits.ACTIVATION_ELEMENTS:,} are accepted (lower the image size, embed_dim or a "
            f"padding, or raise patch_stride or stride_kv)")
