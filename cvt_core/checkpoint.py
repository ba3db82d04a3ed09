"""Reading and writing transformers PyTorch checkpoints as NumPy arrays, with no framework and no pickle execution.

Both backends and the converter read `model.safetensors`, sharded `*.index.json` and `pytorch_model.bin` (also
sharded) through `open_checkpoint`, so the Keras side needs no PyTorch and no checkpoint can run code on load. It
returns a `LazyTensors`: names, shapes and dtypes up front, each tensor read when asked for. One reader per format:
safetensors here, `torch.save` files (zip and legacy layouts) in `cvt_core.torch_pickle`, `tf_model.h5` in
`cvt_core.tf_h5`. Nothing a file says is trusted: every safetensors entry must lie inside the file, every tensor
view inside its stored bytes, and every shard of an index must be a plain file in the index's folder; anything
else is one `CheckpointError` line, raised when the file is opened.

Safetensors is read and written here with NumPy, not with the `safetensors` package: the package is no
dependency of the library (only of its tests), and where it would serve, it would not serve alone: its NumPy side
has no bfloat16 (the Keras side without PyTorch needs ml_dtypes' through this reader anyway), its errors are not
the one-line `CheckpointError`s every reader here raises, and its `save_file` takes every tensor at once where the
converter's writer streams one at a time. Every write is atomic (`cvt_core.atomic.atomic_write`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .atomic import atomic_write
from .dtypes import bfloat16_dtype, is_bfloat16
from .errors import CheckpointError
from .filenames import CONFIG_NAME
from .tensor_file import MAX_DIMENSIONS, LazyTensors, is_index, read_exactly, shape_problem, short_repr
from .torch_pickle import open_torch_bin, open_torch_file
from .untrusted import load_json_file, open_regular_file, parse_json

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_BIN_NAME = "pytorch_model.bin"
PYTORCH_BIN_INDEX_NAME = "pytorch_model.bin.index.json"
# a folder's PyTorch weights, in the order from_pretrained prefers them
PYTORCH_WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_BIN_NAME, PYTORCH_BIN_INDEX_NAME)
TF_WEIGHTS_NAME = "tf_model.h5"  # transformers' TF weights (Keras 2 HDF5); read by cvt_core.tf_h5
# what from_pretrained reads, in order of preference: PyTorch weights first, transformers' TF weights last
PRETRAINED_WEIGHT_NAMES = PYTORCH_WEIGHT_NAMES + (TF_WEIGHTS_NAME,)
KERAS_WEIGHTS_NAME = "model.weights.h5"  # Keras 3's own files, written and read by conversion.keras_native
KERAS_MODEL_NAME = "model.keras"

_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("bool"),
}


_SAFETENSORS_COMPLEX = ("C64", "C128", "COMPLEX64", "COMPLEX128")
# the safetensors format's own bound on its header
SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024


def _safetensors_dtype(code: str, path: str) -> np.dtype:
    if code == "BF16":
        return bfloat16_dtype(path)
    if code in _SAFETENSORS_COMPLEX:
        raise CheckpointError(f"{path}: tensor dtype {short_repr(code)} is not supported: complex numbers are not "
                              f"weights of a CvT model")
    if code not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor dtype {short_repr(code)} is not supported")
    return _SAFETENSORS_DTYPES[code]


def safetensors_dtype_code(dtype: np.dtype) -> str:
    """The safetensors name of a NumPy dtype (`F32`, `BF16`, ...)."""
    if is_bfloat16(dtype):
        return "BF16"
    for code, known in _SAFETENSORS_DTYPES.items():
        if known == dtype.newbyteorder("<") or known == dtype:
            return code
    raise CheckpointError(f"cannot store dtype {dtype} in safetensors")


class SafetensorsHeader(NamedTuple):
    """A validated safetensors header: every tensor's dtype, shape and absolute byte range in the file."""

    tensors: Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int]]  # name -> (dtype, shape, begin, end)
    metadata: Dict[str, Any]


def read_safetensors_header(path: str) -> SafetensorsHeader:
    """The header of a `.safetensors` file, checked so that every tensor lies inside the file's data: a JSON
    object whose entries have a known dtype, a shape of non-negative integers and `data_offsets` whose length is
    exactly the shape's size. Only a regular file is read (`untrusted.open_regular_file`). Raises
    `CheckpointError` (one line) on anything else."""
    with open_regular_file(path) as f:
        return _safetensors_header_of(f.fileno(), path)


def _safetensors_header_of(fd: int, path: str) -> SafetensorsHeader:
    """`read_safetensors_header` of the open regular file `fd` (positioned reads; sizes checked before reading)."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise CheckpointError(f"{path}: truncated (no safetensors header)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > size - 8 or header_len > SAFETENSORS_HEADER_BYTES:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors header (declares {header_len} bytes)")
    raw = read_exactly(fd, 8, np.empty(header_len, np.uint8), path).tobytes()
    header = parse_json(raw, f"{path}: corrupt safetensors header", max_bytes=SAFETENSORS_HEADER_BYTES)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_start = 8 + header_len
    data_len = size - data_start
    tensors: Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r} (needs dtype, shape and data_offsets)")
        dtype = _safetensors_dtype(info["dtype"], path)
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(is_index(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}: shape {short_repr(shape)} is not a list of "
                                  f"non-negative integers")
        if len(shape) > MAX_DIMENSIONS:  # before the product of its dimensions is taken
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}: a shape of {len(shape)} dimensions (at "
                                  f"most {MAX_DIMENSIONS} are read)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_index(x) for x in offsets)):
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}: data_offsets {short_repr(offsets)} is not two "
                                  f"integers")
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= data_len or end - begin != expected:
            raise CheckpointError(f"{path}: truncated or corrupt: tensor {name!r} ({info['dtype']}{short_repr(shape)}, "
                                  f"{expected} bytes) claims bytes {begin}..{end} of {data_len}")
        problem = shape_problem(shape, dtype.itemsize)  # an empty tensor's other dimensions, which no byte backs
        if problem is not None:
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}: {problem}")
        tensors[name] = (dtype, tuple(shape), data_start + begin, data_start + end)
    # no two tensors may claim the same bytes (as the safetensors library requires): reading every tensor then
    # never takes more memory than the file holds
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in tensors.items() if end > begin)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: truncated or corrupt: tensors {first!r} and {second!r} claim overlapping "
                                  f"bytes")
    return SafetensorsHeader(tensors, metadata)


def open_safetensors(path: str) -> LazyTensors:
    """The tensors of a `.safetensors` file (header checked by `read_safetensors_header`), each read on access with
    one positioned read into a new array of exactly the bytes the header gives it inside the file: nothing stays
    memory-mapped, so resident memory does not grow with the file. The file (a regular file only) stays open, the
    same one read throughout, until the result is closed."""
    f = open_regular_file(path)
    try:
        return _open_safetensors_file(f, path)
    except BaseException:
        f.close()
        raise


def _open_safetensors_file(f, path: str) -> LazyTensors:
    """`open_safetensors` of the open regular file `f`; the result owns `f` (on an error it is left to the caller)."""
    header = _safetensors_header_of(f.fileno(), path)

    def load(key: str) -> np.ndarray:
        dtype, shape, begin, _ = header.tensors[key]
        if f.closed:
            raise CheckpointError(f"{path}: tensor {key!r} asked for after the checkpoint was closed")
        try:
            return read_exactly(f.fileno(), begin, np.empty(shape, dtype), path)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None

    return LazyTensors({k: shape for k, (_, shape, _, _) in header.tensors.items()},
                       {k: dtype for k, (dtype, _, _, _) in header.tensors.items()}, load, f.close)


def _looks_like_safetensors(fd: int) -> bool:
    """Whether the open file starts as safetensors does (a header length that fits the file, then a JSON object)."""
    head = os.pread(fd, 9, 0)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.fstat(fd).st_size


def read_shard_index(path: str) -> Dict[str, List[str]]:
    """The shards a `*.index.json` names, as {shard path: names of the tensors it holds}, in shard-name order.

    Each shard must be a plain file name in the index's own folder (no path, no `..`, not an index itself) that
    exists there (a symlink is fine, as in Hugging Face caches); anything else is refused with one line. The index
    is read as strict JSON from a regular file (`untrusted.load_json_file`); each shard is opened (as a regular file
    only) by `open_checkpoint`."""
    index = load_json_file(path, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: corrupt shard index (needs a 'weight_map' object)")
    folder = os.path.dirname(path)
    own_name = os.path.basename(path)
    shards: Dict[str, List[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{path}: corrupt shard index: tensor {name!r} names shard {short_repr(shard)}, not a "
                                  f"file name")
        if shard == own_name or shard.endswith(".index.json"):
            raise CheckpointError(f"{path}: corrupt shard index: tensor {name!r} names the index file {shard!r} as "
                                  f"its shard")
        if (not shard or shard in (".", "..") or "/" in shard or "\\" in shard or "\0" in shard
                or os.path.isabs(shard)):
            raise CheckpointError(f"{path}: refusing shard {short_repr(shard)} (for tensor {name!r}): a shard must be "
                                  f"a plain file name in the index's folder")
        shards.setdefault(shard, []).append(name)
    out: Dict[str, List[str]] = {}
    for shard in sorted(shards):
        shard_path = os.path.join(folder, shard)
        if not os.path.exists(shard_path):
            raise CheckpointError(f"{shard_path}: no such file, though the shard index {own_name} lists it for "
                                  f"{len(shards[shard])} tensors (e.g. {shards[shard][0]})")
        out[shard_path] = shards[shard]
    return out


def _open_index(path: str) -> LazyTensors:
    """The tensors of a sharded checkpoint: each shard (safetensors or torch.save) opened through `open_checkpoint`."""
    opened: List[LazyTensors] = []
    owner: Dict[str, LazyTensors] = {}

    def close() -> None:
        while opened:
            opened.pop().close()

    try:
        for shard_path, names in read_shard_index(path).items():
            shard = open_checkpoint(shard_path)
            opened.append(shard)
            absent = sorted(name for name in names if name not in shard)
            if absent:
                raise CheckpointError(f"{shard_path}: shard lacks {len(absent)} tensors its index lists, e.g. "
                                      f"{absent[0]}")
            owner.update((name, shard) for name in names)
    except BaseException:
        close()
        raise
    return LazyTensors({k: t.shape(k) for k, t in owner.items()}, {k: t.dtype(k) for k, t in owner.items()},
                       lambda key: owner[key][key], close)


def open_checkpoint(path: str) -> LazyTensors:
    """The one reader of PyTorch-side weight files: `.safetensors`, a `torch.save` file (`pytorch_model.bin`,
    `.pth`, zip or legacy layout) or a shard index (`*.index.json`) of either, told apart by name and content.
    Every check is made here, before any tensor is read; close the result when done. Only a regular file is read
    (`untrusted.open_regular_file`: a FIFO, a device or a folder is refused before a byte is read), and the file
    told apart is the one read."""
    if path.endswith(".index.json"):
        return _open_index(path)
    f = open_regular_file(path)
    try:
        if path.endswith(".safetensors") or _looks_like_safetensors(f.fileno()):
            return _open_safetensors_file(f, path)
        return open_torch_file(f, path)
    except BaseException:
        f.close()
        raise


def _read_all(tensors: LazyTensors) -> Dict[str, np.ndarray]:
    with tensors:
        return dict(tensors)


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file, read into memory."""
    return _read_all(open_safetensors(path))


def read_torch_bin(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a `torch.save` file (`pytorch_model.bin`, zip or legacy layout) without executing pickled
    code, read into memory."""
    return _read_all(open_torch_bin(path))


def read_weights_file(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a `.safetensors`, `.bin` or sharded `*.index.json` file, read into memory."""
    return _read_all(open_checkpoint(path))


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write `tensors` to `path` atomically (a temporary file in the same folder, then a rename)."""
    arrays = {name: np.asarray(array) for name, array in tensors.items()}
    write_safetensors_streaming(path, [(name, a.shape, a.dtype) for name, a in arrays.items()], arrays.__getitem__, metadata)


def write_safetensors_streaming(path: str, layout: Sequence[Tuple[str, Sequence[int], np.dtype]],
                                fetch: Callable[[str], np.ndarray], metadata: Optional[Dict[str, str]] = None,
                                iterate: Callable[[Iterable], Iterable] = iter) -> None:
    """Write tensors named in `layout` (name, shape, dtype), asking `fetch(name)` for one at a time, so a
    conversion never holds more than one tensor in memory. Atomic (`atomic_write`); the file gets the usual
    permissions (umask applied). `iterate` may wrap the loop, e.g. in a progress bar."""
    metadata = {"format": "pt", **(metadata or {})}
    header: Dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in layout:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": safetensors_dtype_code(dtype), "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype in iterate(layout):
            array = np.asarray(fetch(name))
            begin, end = header[name]["data_offsets"]
            if tuple(array.shape) != tuple(int(d) for d in shape) or array.nbytes != end - begin or \
                    array.dtype != np.dtype(dtype):
                raise CheckpointError(f"{path}: tensor {name!r} is {array.dtype}{tuple(array.shape)}, "
                                      f"expected {np.dtype(dtype)}{tuple(shape)}")
            f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


# ------------------------------------------------------------------------------------------ checkpoint folders
def pretrained_weights_file(directory: str) -> Optional[str]:
    """The weights file `from_pretrained` reads in a checkpoint folder (the first of `PRETRAINED_WEIGHT_NAMES`
    present), or None."""
    for name in PRETRAINED_WEIGHT_NAMES:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def load_pretrained_state(directory: str) -> LazyTensors:
    """The state dict (transformers PyTorch names and layouts) of a checkpoint folder, read lazily: its PyTorch
    weights, or, in a folder that holds only transformers' TF weights (`tf_model.h5`, as `save_pretrained` of
    transformers' TF classes or `cvt convert --to hf-tf` write it), those. Close it when done."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory (expected a checkpoint folder with config.json and weights)")
    path = pretrained_weights_file(directory)
    if path is None:
        present = sorted(os.listdir(directory))
        hint = ""
        if {KERAS_MODEL_NAME, KERAS_WEIGHTS_NAME} & set(present):
            hint = ("; Keras 3 files load with keras.models.load_model / model.load_weights, or convert the folder "
                    "with `cvt convert DIR OUT --to torch`")
        raise CheckpointError(f"{directory}: no weights found (looked for {', '.join(PRETRAINED_WEIGHT_NAMES)}); the "
                              f"folder holds {present or 'nothing'}{hint}")
    if os.path.basename(path) == TF_WEIGHTS_NAME:
        # Read against the folder's own config, so that a model built with other sizes (a new head, say) still gets
        # its strict / ignore_mismatched_sizes report from the load plan, as with PyTorch weights.
        from .config import CvtConfig
        from .tf_h5 import open_tf_h5

        return open_tf_h5(path, CvtConfig.from_pretrained(directory))
    return open_checkpoint(path)


def check_pretrained_folder(directory: str, needs_config: bool = True) -> None:
    """Raise `CheckpointError` in one line unless `directory` is a folder (holding config.json if `needs_config`):
    what `from_pretrained` is given instead, a weights file or config.json itself, would otherwise be read as JSON."""
    if os.path.isfile(directory):
        raise CheckpointError(f"{directory}: is a file; pass the folder that holds config.json")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such folder; pass the folder that holds config.json and the weights, "
                              f"or a hub repository id (org/name)")
    if needs_config and not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        present = sorted(os.listdir(directory))
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} in this folder (it holds {present or 'nothing'}); pass "
                              f"the folder that holds config.json, or give config=")


class Pretrained(NamedTuple):
    """What both models' `from_pretrained` start from (see `read_pretrained`)."""
    directory: str  # the local folder read: the path given, or the hub snapshot it names
    config: Any
    state: LazyTensors  # lazy: the caller closes it
    plan: Any  # the checked `LoadPlan` mapping the state onto the model's weight table
    image_processor: Any  # the folder's preprocessor_config.json as a CvtImageProcessor, or None


def read_pretrained(name_or_path: str, with_head: bool, config=None, strict: bool = True,
                    ignore_mismatched_sizes: bool = False, hub_options: Optional[Mapping[str, Any]] = None,
                    **config_overrides: Any) -> Pretrained:
    """Resolve `name_or_path` (a folder, or a hub id fetched with `hub_options`), read its config (unless given, with
    overrides applied), its state dict and its preprocessing, and check the plan mapping the state onto the model's
    weight table. Raises `WeightLoadError` as `LoadPlan.check` does, `CheckpointError` for a bad folder or name."""
    from .config import CvtConfig
    from .hub import resolve_pretrained
    from .weights import plan_load

    directory = resolve_pretrained(name_or_path, **dict(hub_options or {}))
    check_pretrained_folder(directory, needs_config=config is None)
    if config is None:
        config = CvtConfig.from_pretrained(directory, **config_overrides)
    elif config_overrides:
        config = config.copy(**config_overrides)
    image_processor = _folder_image_processor(directory)
    state = load_pretrained_state(directory)
    try:
        plan = plan_load(config, with_head, state.shapes)
        plan.check(directory, strict=strict, ignore_mismatched_sizes=ignore_mismatched_sizes)
    except BaseException:
        state.close()
        raise
    return Pretrained(directory, config, state, plan, image_processor)


def _folder_image_processor(directory: str):
    from .image_processing import PREPROCESSOR_CONFIG_NAME, CvtImageProcessor

    path = os.path.join(directory, PREPROCESSOR_CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        return CvtImageProcessor.from_pretrained(path)
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a usable preprocessor config ({' '.join(str(exc).split())})") from None


def default_image_processor(config):
    """The preprocessing written beside weights that come without their own: the released checkpoints' recipe at
    the config's resolution (the shorter side of a non-square `image_size`, 224 when it sets none)."""
    from .image_processing import CvtImageProcessor
    from .shapes import default_input_size

    return CvtImageProcessor.for_resolution(min(default_input_size(config)))


def save_pretrained_folder(directory: str, config, with_head: bool, architecture: str,
                           tensors: Mapping[str, np.ndarray], image_processor=None, push_to_hub: bool = False,
                           repo_id: Optional[str] = None, **push_options: Any) -> str:
    """What both models' `save_pretrained` write: config.json (naming `architecture`), model.safetensors and
    preprocessor_config.json (`image_processor`, else the released checkpoints' preprocessing at the config's
    resolution), each atomically; then, with `push_to_hub`, the folder is uploaded to `repo_id` (default: the folder's
    name). Warns once when transformers could not build or reproduce the config. Returns `directory`."""
    import copy
    import warnings

    from .config import transformers_differences

    directory = os.fspath(directory)
    config = copy.deepcopy(config)
    config.extra["architectures"] = [architecture]
    config.validate()
    os.makedirs(directory, exist_ok=True)
    save_pretrained_state(directory, tensors)
    config.save_pretrained(directory)
    (image_processor or default_image_processor(config)).save_pretrained(directory)
    differences = transformers_differences(config, with_head)
    if differences:
        warnings.warn(f"{directory}: transformers cannot build this model or computes other outputs from it: "
                      f"{'; '.join(differences)}. It loads unchanged with cvt_torch / cvt_tf (docs/conversion.md).",
                      UserWarning, stacklevel=3)
    if push_to_hub:
        from .hub import push_to_hub as push

        push(directory, repo_id or os.path.basename(os.path.abspath(directory)), **push_options)
    return directory


def save_pretrained_state(directory: str, tensors: Mapping[str, np.ndarray]) -> str:
    """Write `model.safetensors` into `directory` atomically; removes a stale `pytorch_model.bin` twin."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SAFETENSORS_NAME)
    write_safetensors(path, tensors)
    for stale in (PYTORCH_BIN_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_BIN_INDEX_NAME):
        # a leftover older-format file would shadow or contradict the new weights
        stale_path = os.path.join(directory, stale)
        if os.path.exists(stale_path):
            os.unlink(stale_path)
    return path

