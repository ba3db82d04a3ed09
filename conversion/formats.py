"""Every checkpoint format: detection, reading into a canonical state, writing from one.

Source formats (`--from`):
  hf        transformers PyTorch: model.safetensors, sharded *.safetensors.index.json, pytorch_model.bin (also
            sharded; zip or legacy torch.save layout); all read by cvt_core's `open_checkpoint`, whose unpickler
            never runs pickled code
  hf-tf     transformers TF: tf_model.h5
  keras     Keras 3: model.keras, or model.weights.h5 with a config.json
  original  microsoft/CvT: a torch.save'd state dict (.pth) in the original naming; needs --config

Targets (`--to`), each written into the destination folder beside one config.json:
  torch     model.safetensors
  hf-tf     tf_model.h5
  keras     model.weights.h5 and model.keras
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from cvt_core.checkpoint import (
    CONFIG_NAME,
    PYTORCH_BIN_INDEX_NAME,
    PYTORCH_BIN_NAME,
    PYTORCH_WEIGHT_NAMES,
    SAFETENSORS_INDEX_NAME,
    SAFETENSORS_NAME,
    CheckpointError,
    default_image_processor,
    open_checkpoint,
    write_safetensors_streaming,
)
from cvt_core.config import PRESETS, CvtConfig
from cvt_core.tensor_file import LazyTensors

from . import original as original_format
from .errors import ConversionError, describe, one_line
from .hf_tf_h5 import TF_WEIGHTS_INDEX_NAME, TF_WEIGHTS_NAME, read_tf_h5, write_tf_h5
from .keras_native import KERAS_MODEL_NAME, KERAS_WEIGHTS_NAME
from .progress import progress
from .state import FLOAT_DTYPES, CanonicalState, make_state

SOURCE_FORMATS = ("auto", "hf", "hf-tf", "keras", "original")
TARGETS = ("torch", "hf-tf", "keras")
TARGET_FILES = {"torch": (SAFETENSORS_NAME,), "hf-tf": (TF_WEIGHTS_NAME,), "keras": (KERAS_WEIGHTS_NAME, KERAS_MODEL_NAME)}
ORIGINAL_SUFFIXES = (".pth", ".pt", ".pth.tar", ".ckpt", ".bin", ".safetensors")
ARCHITECTURES = {True: "CvtForImageClassification", False: "CvtModel"}


# ------------------------------------------------------------------------------------------------ configs
def load_config_arg(value: str) -> Tuple[CvtConfig, bool]:
    """`--config`: a preset name (cvt-13, cvt-21-384, microsoft/cvt-w24-384-22k, ...) or a config.json (or the
    folder holding one). Returns (config, is_preset)."""
    if os.path.exists(value):
        path = os.path.join(value, CONFIG_NAME) if os.path.isdir(value) else value
        return read_config_file(path), False
    try:
        return CvtConfig.from_preset(value), True
    except ValueError:
        pass
    if value.endswith(".json") or os.sep in value:
        raise ConversionError(value, "no such config file")
    raise ConversionError(value, f"unknown preset; choose one of {sorted(PRESETS)} (optionally with -384 or "
                                 f"-384-22k) or pass the path of a config.json")


def read_config_file(path: str) -> CvtConfig:
    if not os.path.isfile(path):
        raise ConversionError(path, "no such config file")
    try:
        return CvtConfig.from_json_file(path)
    except (ValueError, TypeError) as exc:
        text = one_line(str(exc))
        if text.startswith(path + ":"):
            text = text[len(path) + 1:].strip()
        raise ConversionError(path, f"invalid config: {text}") from None


# ------------------------------------------------------------------------------------------------ torch files
def open_torch_weights(path: str) -> LazyTensors:
    """model.safetensors / *.index.json / pytorch_model.bin / an original .pth, opened lazily by cvt_core's
    `open_checkpoint` (never executing pickled code); its refusals become one-line `ConversionError`s."""
    if not os.path.exists(path):
        raise ConversionError(path, "no such file")
    try:
        return open_checkpoint(path)
    except CheckpointError as exc:
        raise describe(exc) from None


def write_safetensors_from_state(path: str, state: CanonicalState) -> str:
    """model.safetensors from the state, one tensor in memory at a time."""
    entries = state.entries()
    by_name = {state.name(entry): entry for entry in entries}
    layout = [(name, entry.shape, state.stored_dtype(entry)) for name, entry in by_name.items()]
    write_safetensors_streaming(path, layout, lambda name: state.array(by_name[name]),
                                iterate=lambda items: progress(items, desc=f"writing {SAFETENSORS_NAME}", total=len(items)))
    return path


# ------------------------------------------------------------------------------------------------ detection
@dataclass
class SourceSpec:
    fmt: str  # hf | hf-tf | keras | original
    weights: str  # the file to read
    config_path: Optional[str]  # config.json found beside it, if any


def _listing(directory: str) -> str:
    names = sorted(os.listdir(directory))
    return ", ".join(names[:12]) + (f", ... ({len(names)} files)" if len(names) > 12 else "") if names else "nothing"


def _original_candidates(directory: str) -> List[str]:
    out = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and name.endswith(ORIGINAL_SUFFIXES) and name not in PYTORCH_WEIGHT_NAMES:
            out.append(path)
    return out


_EXPECTED = {
    "hf": f"{SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, {PYTORCH_BIN_NAME} or {PYTORCH_BIN_INDEX_NAME}",
    "hf-tf": TF_WEIGHTS_NAME,
    "keras": f"{KERAS_MODEL_NAME} or {KERAS_WEIGHTS_NAME}",
    "original": "one original microsoft/CvT checkpoint file (.pth)",
}


def detect_directory(directory: str, fmt: str = "auto") -> SourceSpec:
    config_path = os.path.join(directory, CONFIG_NAME)
    config_path = config_path if os.path.isfile(config_path) else None
    found: Dict[str, str] = {}
    for name in PYTORCH_WEIGHT_NAMES:
        if os.path.isfile(os.path.join(directory, name)):
            found.setdefault("hf", os.path.join(directory, name))
    if os.path.isfile(os.path.join(directory, TF_WEIGHTS_NAME)):
        found["hf-tf"] = os.path.join(directory, TF_WEIGHTS_NAME)
    for name in (KERAS_MODEL_NAME, KERAS_WEIGHTS_NAME):
        if os.path.isfile(os.path.join(directory, name)):
            found.setdefault("keras", os.path.join(directory, name))
    originals = _original_candidates(directory)
    if len(originals) == 1:
        found["original"] = originals[0]
    if fmt == "auto":
        for candidate in ("hf", "hf-tf", "keras", "original"):
            if candidate in found:
                return SourceSpec(candidate, found[candidate], config_path)
        if os.path.isfile(os.path.join(directory, TF_WEIGHTS_INDEX_NAME)):
            raise ConversionError(directory, f"sharded {TF_WEIGHTS_NAME} checkpoints are not supported; load them with "
                                             f"transformers and save unsharded, or convert from the PyTorch weights")
        if len(originals) > 1:
            raise ConversionError(directory, f"holds several checkpoint files ({', '.join(map(os.path.basename, originals))}); "
                                             f"pass the one to convert")
        raise ConversionError(directory, f"no checkpoint found (looked for {_EXPECTED['hf']}, {TF_WEIGHTS_NAME}, "
                                         f"{KERAS_MODEL_NAME}, {KERAS_WEIGHTS_NAME}, *.pth); the folder holds "
                                         f"{_listing(directory)}")
    if fmt == "hf" and "hf" not in found and "original" in found:
        found["hf"] = found["original"]
    if fmt == "original" and "original" not in found and "hf" in found:
        found["original"] = found["hf"]  # a pytorch_model.bin in the original naming; the key check decides
    if fmt not in found:
        raise ConversionError(directory, f"--from {fmt} needs {_EXPECTED[fmt]}, but the folder holds {_listing(directory)}")
    return SourceSpec(fmt, found[fmt], config_path)


def detect_file(path: str, fmt: str = "auto") -> SourceSpec:
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_NAME)
    config_path = beside if os.path.isfile(beside) else None
    name = os.path.basename(path)
    if name.endswith(TF_WEIGHTS_INDEX_NAME):
        raise ConversionError(path, f"sharded {TF_WEIGHTS_NAME} checkpoints are not supported")
    if name.endswith(".keras"):
        kind = "keras"
    elif name.endswith((".h5", ".hdf5")):
        kind = _h5_kind(path)
    elif name.endswith(".json") and not name.endswith(".index.json"):
        raise ConversionError(path, "is a config file, not weights; pass the checkpoint folder or weights file as SRC "
                                    "(and the config with --config)")
    else:
        kind = "torch"  # hf or original: decided by the names inside
    if fmt == "auto":
        return SourceSpec(kind, path, config_path)
    compatible = {"torch": ("hf", "original"), "hf-tf": ("hf-tf",), "keras": ("keras",)}[kind]
    if fmt not in compatible:
        what = {"torch": "a PyTorch weights file", "hf-tf": f"transformers' {TF_WEIGHTS_NAME}",
                "keras": "a Keras file"}[kind]
        hint = {"torch": "--from hf or --from original", "hf-tf": "--from hf-tf", "keras": "--from keras"}[kind]
        raise ConversionError(path, f"--from {fmt} does not fit: this is {what}; use {hint} (or --from auto)")
    return SourceSpec(fmt, path, config_path)


def _h5_kind(path: str) -> str:
    """hf-tf or keras, from the root attributes only (no dataset is read; the reader then walks the whole file).
    Opened as a regular file through `cvt_core.h5_safety` (a FIFO or device is refused)."""
    from cvt_core.h5_safety import h5_reason, h5py_module
    from cvt_core.untrusted import open_regular_file

    try:
        h5py = h5py_module(path)
        with open_regular_file(path, CheckpointError) as fileobj:
            try:
                with h5py.File(fileobj, "r", locking=False) as f:
                    return "hf-tf" if ("layer_names" in f.attrs or "layer_names0" in f.attrs) else "keras"
            except (OSError, RuntimeError, ValueError) as exc:
                raise ConversionError(path, f"not a readable HDF5 file (truncated or corrupt: {h5_reason(exc)})") \
                    from None
    except CheckpointError as exc:
        raise ConversionError(None, one_line(str(exc))) from None


# ------------------------------------------------------------------------------------------------ reading
def open_source(src: str, fmt: str = "auto", config: Optional[str] = None, hidden_act: Optional[str] = None,
                dtype: Optional[str] = None) -> CanonicalState:
    """Read SRC (folder or file) as a canonical state. `config`: the --config argument (preset or json)."""
    if fmt not in SOURCE_FORMATS:
        raise ConversionError(fmt, f"unknown --from format; choose one of {list(SOURCE_FORMATS)}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ConversionError(dtype, f"unknown --dtype; choose one of {['keep', *FLOAT_DTYPES]}")
    if not os.path.exists(src):
        raise ConversionError(src, "no such file or directory")
    spec = detect_directory(src, fmt) if os.path.isdir(src) else detect_file(src, fmt)
    explicit, from_preset = (load_config_arg(config) if config else (None, False))

    def resolved_config() -> CvtConfig:
        if explicit is not None:
            return explicit
        if spec.config_path is None:
            raise ConversionError(spec.weights, f"no {CONFIG_NAME} beside it; pass --config PRESET_OR_JSON")
        return read_config_file(spec.config_path)

    if spec.fmt == "hf-tf":
        state = read_tf_h5(spec.weights, resolved_config())
    elif spec.fmt == "keras":
        from .keras_native import read_keras

        cfg = None if spec.weights.endswith(".keras") else resolved_config()
        state = read_keras(spec.weights, cfg)
        if explicit is not None and spec.weights.endswith(".keras") and explicit != state.config:
            raise ConversionError(spec.weights, "--config differs from the config stored in the .keras file; drop --config")
    else:
        requested = spec.fmt if fmt != "auto" else None
        state = _read_torch_source(spec.weights, requested, explicit, from_preset, hidden_act, resolved_config)
    if hidden_act and state.config.hidden_act != hidden_act:
        state.config = state.config.copy(hidden_act=hidden_act)
    state.cast = dtype
    return state


def _read_torch_source(path: str, requested: Optional[str], explicit: Optional[CvtConfig], from_preset: bool,
                       hidden_act: Optional[str], resolved_config: Callable[[], CvtConfig]) -> CanonicalState:
    """A PyTorch-side weights file as a state: in transformers' naming (`hf`) or microsoft/CvT's (`original`), as
    `requested` by --from or, when None, as the names say."""
    tensors = open_torch_weights(path)
    try:
        is_original = original_format.looks_original(list(tensors))
        kind = requested or ("original" if is_original else "hf")
        if kind == "original" and not is_original:
            example = min(tensors, key=len) if len(tensors) else "nothing"
            raise ConversionError(path, f"--from original, but the weights are not in the original naming "
                                        f"(e.g. {example}); use --from hf")
        if kind == "hf" and is_original:
            raise ConversionError(path, "--from hf, but the weights use microsoft/CvT's original names "
                                        "(stage0.patch_embed...); use --from original --config PRESET")
        if kind == "original":
            if explicit is None:
                guesses = original_format.guess_presets(tensors.shapes)
                hint = f" (the shapes match {' or '.join(guesses)})" if guesses else ""
                raise ConversionError(path, f"an original CvT checkpoint carries no config: pass --config "
                                            f"PRESET_OR_JSON{hint}")
            cfg = original_format.original_config(explicit, tensors.shapes, from_preset, hidden_act)
            return original_format.read_original(path, tensors, cfg)
        cfg = resolved_config()
    except BaseException:
        tensors.close()
        raise
    return make_state(cfg, tensors, path, "hf", "torch")


# ------------------------------------------------------------------------------------------------ writing
def config_for_output(state: CanonicalState) -> CvtConfig:
    config = copy.deepcopy(state.config)
    config.extra["architectures"] = [ARCHITECTURES[state.with_head]]
    written = state.float_dtype
    if state.cast is not None or "dtype" in config.extra or "torch_dtype" in config.extra:
        config.extra["dtype"] = written
        if "torch_dtype" in config.extra:
            config.extra["torch_dtype"] = written
    return config


def write_preprocessor(directory: str, source: str, config: CvtConfig, height: Optional[int] = None,
                       width: Optional[int] = None) -> str:
    """preprocessor_config.json beside the written weights: the source folder's (or the folder of a source file),
    its size set to a square `height` x `width` when given; else the released CvT preprocessing at that size, or at
    the config's resolution. Returns its path."""
    from cvt_core.image_processing import PREPROCESSOR_CONFIG_NAME, CvtImageProcessor

    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    path = os.path.join(folder, PREPROCESSOR_CONFIG_NAME)
    side = height if height is not None and height == width else None
    if os.path.isfile(path):
        try:
            processor = CvtImageProcessor.from_pretrained(path)
            if side is not None:
                processor = CvtImageProcessor.from_dict(processor.to_dict(), size=side)
        except ValueError as exc:
            raise ConversionError(path, f"invalid preprocessor config: {one_line(str(exc))}") from None
    elif height is not None:
        processor = CvtImageProcessor.for_resolution(side or min(height, width))
    else:
        processor = default_image_processor(config)
    return processor.save_pretrained(directory)


def write_targets(state: CanonicalState, directory: str, targets: Sequence[str], config_json: bool = True) -> List[str]:
    """Write config.json with preprocessor_config.json (unless `config_json` is False) and every target's files into
    `directory`; returns the written paths."""
    written = ([config_for_output(state).save_pretrained(directory), write_preprocessor(directory, state.source,
                                                                                         state.config)]
               if config_json else [])
    for target in targets:
        if target == "torch":
            written.append(write_safetensors_from_state(os.path.join(directory, SAFETENSORS_NAME), state))
        elif target == "hf-tf":
            written.append(write_tf_h5(state, os.path.join(directory, TF_WEIGHTS_NAME)))
        elif target == "keras":
            from .keras_native import write_keras

            written.extend(write_keras(state, directory))
        else:
            raise ConversionError(target, f"unknown --to target; choose one of {[*TARGETS, 'all']}")
    return written


def formats_in_directory(directory: str) -> List[Tuple[str, str]]:
    """(label, path) of every checkpoint format found in a folder, in cross-check order."""
    found = []
    for name in PYTORCH_WEIGHT_NAMES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            found.append(("torch", path))
            break
    for label, name in (("hf-tf", TF_WEIGHTS_NAME), ("keras .weights.h5", KERAS_WEIGHTS_NAME),
                        ("keras .keras", KERAS_MODEL_NAME)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            found.append((label, path))
    return found


def target_framework(label: str) -> str:
    """The framework whose model a written format is loaded into for the cross-check."""
    return "torch" if label == "torch" else "keras"


def read_target(label: str, path: str, config: CvtConfig, with_head: Optional[bool] = None):
    """Load one written format back: (framework, model). torch and hf-tf go through our readers; the Keras files
    through Keras itself (`load_weights`, `keras.models.load_model`)."""
    from . import keras_native, models

    if label == "torch":
        state = make_state(config, open_torch_weights(path), path, "hf", "torch", with_head=with_head)
        try:
            return "torch", models.build_torch_model(state, desc=f"loading {os.path.basename(path)}")
        finally:
            state.close()
    if label == "hf-tf":
        state = read_tf_h5(path, config, with_head=with_head)
        try:
            return "keras", models.build_keras_model(state, desc=f"loading {os.path.basename(path)}")
        finally:
            state.close()
    if label.startswith("keras") and path.endswith(".keras"):
        return "keras", keras_native.load_keras_model_file(path)
    return "keras", keras_native.load_keras_weights_model(path, config, with_head)

