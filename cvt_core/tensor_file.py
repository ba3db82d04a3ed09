"""What every checkpoint reader shares: the lazy mapping they all return (`LazyTensors`), the one positioned read
they read tensors with, and the checks and wording for values taken from files that are not trusted.

A reader validates a file's whole layout when it opens it (so a crafted file is refused before any tensor is
built) and returns a `LazyTensors`: every name, shape and dtype known up front, each tensor read only when it is
asked for, so a conversion or a `from_pretrained` holds about one tensor of the checkpoint at a time.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

from .errors import CheckpointError


class LazyTensors(Mapping):
    """The tensors of an open checkpoint: a read-only mapping whose values are read from the file on access (a new
    array each time). Names, shapes and dtypes are known without reading. `close()` (or a `with` block) releases the
    file; `closer` is what `close()` calls, once; None when nothing is held open."""

    def __init__(self, shapes: Mapping[str, Tuple[int, ...]], dtypes: Mapping[str, np.dtype],
                 loader: Callable[[str], np.ndarray], closer: Optional[Callable[[], None]] = None):
        self._shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self._dtypes = {k: np.dtype(dtypes[k]) for k in self._shapes}
        self._loader = loader
        self._closer = closer

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._shapes:
            raise KeyError(key)
        return self._loader(key)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor to find out
        return key in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> np.dtype:
        return self._dtypes[key]

    @property
    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return dict(self._shapes)

    @property
    def dtypes(self) -> Dict[str, np.dtype]:
        return dict(self._dtypes)

    def renamed(self, sources: Mapping[str, str]) -> "LazyTensors":
        """A view under new names: `sources` maps each new name to the name here it reads; closing it closes this."""
        return LazyTensors({new: self._shapes[old] for new, old in sources.items()},
                           {new: self._dtypes[old] for new, old in sources.items()},
                           lambda new: self[sources[new]], self.close)

    def close(self) -> None:
        closer, self._closer = self._closer, None
        if closer is not None:
            closer()

    def __enter__(self) -> "LazyTensors":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_exactly(fd: int, offset: int, out: np.ndarray, path: str) -> np.ndarray:
    """Fill the C-contiguous array `out` with the bytes of file descriptor `fd` from `offset` on (positioned reads:
    nothing is memory-mapped, so resident memory does not grow with the file); returns `out`."""
    view = out.reshape(-1).view(np.uint8)
    done = 0
    while done < view.size:
        count = os.preadv(fd, [memoryview(view[done:])], offset + done)
        if count <= 0:
            raise CheckpointError(f"{path}: truncated while reading (did the file change while it was read?)")
        done += count
    return out


def is_index(value: Any) -> bool:
    """Whether a value read from a file is a plain integer (bool, which is an int in Python, is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


# The most dimensions a tensor read from a file may have (NumPy 1 holds at most 32; a CvT weight has at most 4)
MAX_DIMENSIONS = 32


def shape_problem(shape: Any, itemsize: int) -> Optional[str]:
    """Why `shape` (from a file) cannot be a NumPy array's shape for elements of `itemsize` bytes, or None: it must
    be a tuple or list of non-negative integers, at most `MAX_DIMENSIONS` of them, whose non-zero ones multiply
    to fewer than 2**62 bytes (NumPy refuses bigger shapes even for an empty array, where one dimension is 0)."""
    if not (isinstance(shape, (tuple, list)) and all(is_index(d) and d >= 0 for d in shape)):
        return f"shape {short_repr(shape)} is not a list of non-negative integers"
    if len(shape) > MAX_DIMENSIONS:
        return f"a shape of {len(shape)} dimensions (at most {MAX_DIMENSIONS} are read)"
    nbytes = itemsize
    for d in shape:
        nbytes *= max(d, 1)
        if nbytes >= 2 ** 62:
            return f"shape {short_repr(tuple(shape))} is too large for any array"
    return None


def short_repr(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, for quoting untrusted values in one-line messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
