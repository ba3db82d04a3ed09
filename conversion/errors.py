"""User-facing errors of the converter: one line, naming the file and the problem."""

from __future__ import annotations

import zipfile
from typing import Optional


class ConversionError(Exception):
    """A problem the user can fix (bad path, corrupt or unsafe file, config and weights that disagree, ...).

    `str(error)` is one line of the form `<file>: <problem>`; the command line prints it as
    `cvt: error: <file>: <problem>` and exits with status 2.
    """

    def __init__(self, path: Optional[str], problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}" if path else problem)


class CrossCheckFailed(Exception):
    """The written checkpoint does not reproduce the source's outputs within tolerance (exit status 1)."""


def one_line(text: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def describe(exc: BaseException, path: Optional[str] = None) -> ConversionError:
    """Turn an exception raised while reading `path` into a one-line `ConversionError`."""
    from cvt_core.checkpoint import CheckpointError
    from cvt_core.weights import WeightLoadError

    if isinstance(exc, ConversionError):
        return exc
    if isinstance(exc, WeightLoadError):
        return ConversionError(exc.source, summarise_mismatch(exc))
    if isinstance(exc, CheckpointError):
        return ConversionError(None, one_line(str(exc)))  # cvt_core's messages already start with the path
    if isinstance(exc, FileNotFoundError):
        return ConversionError(exc.filename or path, "no such file or directory")
    if isinstance(exc, IsADirectoryError):
        return ConversionError(exc.filename or path, "is a directory, expected a file")
    if isinstance(exc, PermissionError):
        return ConversionError(exc.filename or path, "permission denied")
    if isinstance(exc, zipfile.BadZipFile):
        return ConversionError(path, f"truncated or corrupt archive ({one_line(str(exc))})")
    text = one_line(str(exc)) or type(exc).__name__
    return ConversionError(path, text)


def summarise_mismatch(exc) -> str:
    """One line for a cvt_core `WeightLoadError`: counts and the first example of each kind."""
    return exc.summary()
