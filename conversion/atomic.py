"""Atomic output directories: build in a temporary folder beside the destination, then rename it into place.

A failure, Ctrl-C or SIGTERM while writing leaves no half-written destination: the temporary folder is removed
and an existing destination (replaced only with `force`) stays as it was until the final rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, List

from .errors import ConversionError


def _created_parents(path: str) -> List[str]:
    """The missing ancestors of `path`, outermost first."""
    missing = []
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    return missing[::-1]


def check_destination(dst: str, force: bool) -> None:
    """Refuse an existing destination unless `force`; refuse a destination inside a file."""
    if os.path.lexists(dst) and not force:
        raise ConversionError(dst, "already exists; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(dst))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ConversionError(dst, f"cannot create it: {parent} is a file, not a directory")


@contextlib.contextmanager
def atomic_directory(dst: str, force: bool = False) -> Iterator[str]:
    """Yield a fresh temporary directory on `dst`'s filesystem; on success it becomes `dst`.

    On any exception (KeyboardInterrupt included) the temporary directory, and any parent directories this call
    created, are removed and the exception propagates; `dst` is untouched.
    """
    dst = os.path.abspath(dst)
    check_destination(dst, force)
    new_parents = _created_parents(dst)
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=os.path.dirname(dst))
    except OSError as exc:
        _remove_empty(new_parents)
        raise ConversionError(dst, f"cannot create the output folder ({exc.strerror or exc})") from None
    committed = False
    try:
        yield tmp
        _commit(tmp, dst, force)
        committed = True
    finally:
        if not committed:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_empty(new_parents)


def _commit(tmp: str, dst: str, force: bool) -> None:
    os.chmod(tmp, 0o777 & ~_umask())
    if not os.path.lexists(dst):
        os.replace(tmp, dst)
        return
    if not force:  # appeared while we were writing
        raise ConversionError(dst, "already exists (created while converting); pass --force to replace it")
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
    old = os.path.join(aside, "old")
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)  # put the previous destination back
        shutil.rmtree(aside, ignore_errors=True)
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.unlink(old)
        os.rmdir(aside)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_empty(directories: List[str]) -> None:
    for directory in reversed(directories):
        try:
            os.rmdir(directory)
        except OSError:
            break


@contextlib.contextmanager
def temporary_directory(prefix: str = "cvt-") -> Iterator[str]:
    """A temporary directory removed on exit, whatever happens."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
