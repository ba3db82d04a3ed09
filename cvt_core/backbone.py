"""What a CvT backbone hands to dense-task heads, for both frameworks: the stage names, which of them a backbone
returns (`out_features` / `out_indices`, chosen as transformers' backbones choose them), and each stage's width and
total stride.

`stage_names` are transformers': `["stem", "stage1", ..., "stageN"]`, the stem being the pixel input, so
`out_indices=[1, 2, 3]` are the three stages of a three-stage model. The strides are the products of the stages'
patch strides (4, 8, 16 for the released configs).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

from .config import CvtConfig

STEM = "stem"


def stage_names(config: CvtConfig) -> List[str]:
    return [STEM] + [f"stage{stage + 1}" for stage in range(config.num_stages)]


def stage_channels(config: CvtConfig) -> List[int]:
    """The width of each of `stage_names`: the image channels, then each stage's embedding width."""
    return [config.num_channels] + list(config.embed_dim)


def stage_strides(config: CvtConfig) -> List[int]:
    """The total stride of each of `stage_names` (1 for the stem), the product of the patch strides so far."""
    strides = [1]
    for stride in config.patch_stride:
        strides.append(strides[-1] * int(stride))
    return strides


def chosen_channels_and_strides(config: CvtConfig, out_indices: Sequence[int]) -> Tuple[List[int], List[int]]:
    """(channels, strides) of the stages at `out_indices` (indices into `stage_names`)."""
    widths, strides = stage_channels(config), stage_strides(config)
    return [widths[i] for i in out_indices], [strides[i] for i in out_indices]


def resolve_out_features(config: CvtConfig, out_features: Optional[Sequence[str]] = None,
                         out_indices: Optional[Sequence[int]] = None) -> Tuple[List[str], List[int]]:
    """(out_features, out_indices), each derived from the other; neither given: the last stage. Indices count in
    `stage_names` and may be negative. Raises ValueError (one line naming the valid choices) for an unknown name,
    an index out of range, a repeat, an order other than the stages', or two choices that disagree."""
    names = stage_names(config)
    if out_features is None and out_indices is None:
        return [names[-1]], [len(names) - 1]
    features = indices = None
    if out_features is not None:
        if isinstance(out_features, str):
            raise ValueError(f"out_features must be a list of stage names, got the string {out_features!r}; "
                             f"e.g. [{out_features!r}]")
        unknown = [f for f in out_features if f not in names]
        if unknown:
            raise ValueError(f"out_features {list(out_features)}: unknown stage name(s) {unknown}; this config's "
                             f"stages are {names}")
        features = list(out_features)
        indices = [names.index(f) for f in features]
    if out_indices is not None:
        chosen = []
        for index in out_indices:
            if not -len(names) <= int(index) < len(names):
                raise ValueError(f"out_indices {list(out_indices)}: index {index} is out of range for the "
                                 f"{len(names)} stage names {names}")
            chosen.append(int(index) % len(names))
        if indices is not None and chosen != indices:
            raise ValueError(f"out_features {features} and out_indices {list(out_indices)} name different stages "
                             f"({[names[i] for i in chosen]}); give one of them, or both for the same stages")
        indices = chosen
        features = [names[i] for i in indices]
    if len(set(indices)) != len(indices) or indices != sorted(indices):
        raise ValueError(f"out_features {features}: each stage at most once and in the order of {names}")
    return features, indices


def intermediate_stages(count: int, indices: Optional[Union[int, Sequence[int]]]) -> List[int]:
    """timm's `forward_intermediates` indices over `count` stages: None, every stage; an int n, the last n; a list,
    those stages (negative from the end), sorted and once each. ValueError for one out of range."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"indices={indices}: an int takes the last n of the {count} stages, 1 to {count}")
        return list(range(count - indices, count))
    if any(not -count <= int(i) < count for i in indices):
        raise ValueError(f"indices {list(indices)}: stages are numbered 0 to {count - 1} (or -{count} to -1)")
    return sorted({int(i) % count for i in indices})
