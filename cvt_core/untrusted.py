"""Opening and parsing files that are not trusted: the one place every reader gets its bytes and its JSON from.

docs/security.md states the promises; this module is where the file-level ones are kept:

- only regular files are opened (`open_regular_file`): a FIFO, a device (`/dev/zero`), a socket or a folder is
  refused before a byte is read, and a FIFO cannot block the open (it is opened non-blocking, then checked);
- a file's size is known before it is read, and whole-file reads are bounded (`read_regular_file`);
- JSON is parsed strictly (`parse_json`): bounded size and nesting, no NaN or Infinity (written or reached by an
  exponent like `1e999`), no integer over 64 digits, no duplicate keys.

The limits are data, in `Limits` below, so the documentation, the tests and the readers quote the same numbers.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, BinaryIO, Type

from .errors import CheckpointError


class Limits:
    """Bounds on untrusted input, far beyond any real CvT file and far below what would exhaust a 24 GiB machine."""

    JSON_BYTES = 64 * 1024 * 1024  # a config, preprocessing config or shard index
    JSON_DEPTH = 64  # nesting of arrays and objects
    JSON_STRING = 1024 * 1024  # characters in one JSON string (labels, names)
    PICKLE_BYTES = 256 * 1024 * 1024  # one data.pkl (a state dict's pickle holds names and views, not tensor data)
    PICKLE_MEMO = 1_000_000  # memo entries of one pickle
    PICKLE_CONTAINER = 1_000_000  # items in one pickled list, tuple or dict
    PICKLE_DEPTH = 64  # nesting of pickled containers
    # estimated bytes of the Python objects one pickle builds, beyond the pickle's own length (a state dict's
    # pickle builds about 2.5 KB per tensor: 25000 tensors fit)
    PICKLE_OBJECTS = 64 * 1024 * 1024
    IMAGE_PIXELS = 64 * 1024 * 1024  # pixels of one decoded image (8192 x 8192)
    IMAGE_SIDE = 65536  # one side of an image, even when the product is small (1 x 60000 strips)
    # A config is refused when its model would need more than this: parameters, and activation elements of one
    # image at its image size (the largest stage's tokens times its widest layer, and its attention maps)
    MODEL_PARAMETERS = 2_000_000_000
    ACTIVATION_ELEMENTS = 2_000_000_000
    MODEL_BLOCKS = 128  # transformer blocks in all stages (the released CvT-W24 has 24)
    # HDF5 files (tf_model.h5, model.weights.h5; cvt_core.h5_safety): links walked in one file (a CvT-W24
    # tf_model.h5 has a few thousand), the stored size of one attribute, and the names read from name-list
    # attributes (how many in one file, and the characters of one)
    H5_LINKS = 100_000
    H5_ATTRIBUTE_BYTES = 1024 * 1024
    H5_NAMES = 100_000
    H5_NAME_CHARS = 512
    # .keras archives (zip): members, and how far members may expand: a member over ZIP_SMALL_MEMBER bytes may
    # declare at most ZIP_RATIO times its compressed size, and all members together at most ZIP_RATIO times the
    # archive's size plus ZIP_SMALL_MEMBER (Keras 3 stores members uncompressed: ratio 1)
    ZIP_MEMBERS = 10_000
    ZIP_RATIO = 20
    ZIP_SMALL_MEMBER = 16 * 1024 * 1024


def _describe_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular_file(path: str, error: Type[Exception] = CheckpointError) -> BinaryIO:
    """`path` opened for binary reading, after checking through the open descriptor itself that it is a regular
    file (symbolic links are followed, as Hugging Face caches use them). Anything else raises `error` with one
    line naming the path and what it is; the open never blocks (a FIFO is opened non-blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, expected a file") from None
    except PermissionError:
        raise error(f"{path}: permission denied") from None
    except OSError as exc:
        raise error(f"{path}: cannot be opened ({exc.strerror or type(exc).__name__})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: is {_describe_kind(mode)}; only regular files are read")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular_file(path: str, error: Type[Exception] = CheckpointError) -> int:
    """The size of `path` in bytes, after checking that it is a regular file (see `open_regular_file`)."""
    with open_regular_file(path, error) as f:
        return os.fstat(f.fileno()).st_size


def read_regular_file(path: str, max_bytes: int, what: str = "file", error: Type[Exception] = CheckpointError) -> bytes:
    """The whole content of the regular file `path`, refused with one line when it is larger than `max_bytes`
    (checked from its size before reading, and again while reading, in case it grows)."""
    with open_regular_file(path, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise error(f"{path}: {what} of {size} bytes is larger than the {max_bytes} bytes accepted")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{path}: {what} grew past the {max_bytes} bytes accepted while it was read")
    return data


def json_nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON text, counted without parsing (brackets inside strings
    are skipped), so a document nested 100000 deep is measured without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


class _StrictJsonError(ValueError):
    pass


def _refuse_constant(name: str):
    raise _StrictJsonError(f"{name} is not a number JSON allows")


MAX_INTEGER_DIGITS = 64  # far past any size, count or offset a file can hold; Python itself stops at 4300


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _StrictJsonError(f"an integer of {len(text.lstrip('-'))} digits is longer than the "
                               f"{MAX_INTEGER_DIGITS} accepted")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise _StrictJsonError(f"{text[:40]} is not a finite number")
    return value


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _StrictJsonError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _check_strings(value: Any, limit: int) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if len(item) > limit:
                raise _StrictJsonError(f"a string of {len(item)} characters is longer than the {limit} accepted")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_json(data: bytes | str, source: str, error: Type[Exception] = CheckpointError,
               max_bytes: int = Limits.JSON_BYTES, max_depth: int = Limits.JSON_DEPTH) -> Any:
    """JSON from an untrusted source, strictly: UTF-8, at most `max_bytes` and `max_depth` levels of nesting, no
    NaN / Infinity, no key twice in one object, no string over `Limits.JSON_STRING` characters. Anything else
    raises `error` with one line that starts with `source`."""
    if len(data) > max_bytes:
        raise error(f"{source}: {len(data)} bytes of JSON is more than the {max_bytes} accepted")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"{source}: not a JSON file (binary content, not UTF-8 text)") from None
    else:
        text = data
    depth = json_nesting_depth(text)
    if depth > max_depth:
        raise error(f"{source}: JSON nested {depth} levels deep; at most {max_depth} are accepted")
    try:
        value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates,
                           parse_int=_bounded_int, parse_float=_finite_float)
        _check_strings(value, Limits.JSON_STRING)
    except _StrictJsonError as exc:
        raise error(f"{source}: refused JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:  # pragma: no cover - the depth bound comes first
        raise error(f"{source}: JSON nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # anything else the decoder raises is still one line naming the file
        raise error(f"{source}: refused JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    return value


def load_json_file(path: str, what: str = "JSON file", error: Type[Exception] = CheckpointError,
                   max_bytes: int = Limits.JSON_BYTES) -> Any:
    """`parse_json` of a regular file read whole under `max_bytes`."""
    return parse_json(read_regular_file(path, max_bytes, what, error), path, error, max_bytes)
