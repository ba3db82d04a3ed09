"""Output directories: the one check of where a command may write, and atomic writes.

`check_destination` decides whether a destination may be written: never an empty path (an unset shell variable),
never the source, a folder holding the source or a folder inside it, never the working folder, and with `force`
an existing destination only when it is empty or holds nothing but what cvt itself writes there.
`atomic_directory` builds the output in a temporary folder beside the destination and renames it into place, so a
failure, Ctrl-C or SIGTERM while writing leaves no half-written destination: the temporary folder is removed and an
existing destination (replaced only with `force`) stays as it was until the final rename. Each file in it is
written atomically too, by `cvt_core.atomic.atomic_write`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from typing import Callable, Iterable, Iterator, List, Optional

from cvt_core.atomic import current_umask

from .errors import ConversionError

# What cvt writes into a checkpoint folder (converter outputs, `cvt train`'s checkpoint/ and converted-*/):
# transformers' PyTorch and TF weights (single or sharded), Keras 3's files, the config and the preprocessing.
CHECKPOINT_FILE_PATTERNS = (
    "config.json", "preprocessor_config.json", "*.safetensors", "model.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model*.bin.index.json", "tf_model*.h5", "tf_model.h5.index.json",
    "model.weights.h5", "*.keras",
)

# foreign(directory) -> the entries of an existing directory that the command did not write (folders end in "/")
Foreign = Callable[[str], List[str]]


def _entry_name(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    return name + "/" if os.path.isdir(path) and not os.path.islink(path) else name


def is_checkpoint_file(directory: str, name: str) -> bool:
    """Whether `directory/name` is a plain file with the name of a checkpoint file cvt writes."""
    path = os.path.join(directory, name)
    return (os.path.isfile(path) and not os.path.islink(path)
            and any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_FILE_PATTERNS))


def foreign_in_checkpoint(directory: str) -> List[str]:
    """The entries of a checkpoint folder that cvt does not write (empty for a converter output)."""
    return sorted(_entry_name(directory, n) for n in os.listdir(directory) if not is_checkpoint_file(directory, n))


def _list(names: List[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _overlap(real: str, sources: Iterable[str]) -> Optional[str]:
    """How the destination (a resolved path) collides with a source or the working folder, if it does."""
    for source in sources:
        if not source or not os.path.lexists(source):
            continue
        other = os.path.realpath(source)
        common = os.path.commonpath([real, other])
        if real == other:
            return f"is the source {source}; write to another folder"
        if common == real:
            return f"contains the source {source}; write to a folder outside it"
        if common == other:
            return f"lies inside the source {source}; write to a folder outside it"
    cwd = os.path.realpath(os.getcwd())
    if os.path.commonpath([real, cwd]) == real:
        return ("is the working folder; name a new folder for the output" if real == cwd else
                "contains the working folder; name a new folder for the output")
    return None


def _replace_problem(dst: str, force: bool, foreign: Foreign, empty_ok: bool) -> Optional[str]:
    """Why the existing `dst` may not be replaced, or None when it may."""
    if os.path.islink(dst):
        return "is a symbolic link; cvt does not replace links, remove it or pick another destination"
    if not os.path.isdir(dst):
        return "is a file, not a folder cvt wrote; remove it or pick another destination"
    try:
        others = foreign(dst)
        empty = not os.listdir(dst)
    except OSError as exc:
        return f"cannot read what is in it ({exc.strerror or exc}); pick another destination"
    if others:
        return (f"already exists and holds files cvt did not write ({_list(others)}), so even --force would not "
                f"replace it; remove them or pick another destination")
    if force or (empty and empty_ok):
        return None
    return "already exists; pass --force to replace it"


def check_destination(dst: str, force: bool, sources: Iterable[str] = (), foreign: Foreign = foreign_in_checkpoint,
                      empty_ok: bool = False) -> None:
    """Raise ConversionError unless `dst` may be written (see the module docstring).

    `sources` are the paths the command reads (the destination must not be, hold or lie inside any of them);
    `foreign` lists what in an existing destination the command did not write (default: a checkpoint folder's
    non-checkpoint entries); with `empty_ok`, an existing empty folder is reused without `force`.
    """
    dst = os.fspath(dst)
    if not dst.strip():
        raise ConversionError(None, f"the destination {dst!r} is empty (an unset shell variable?); name the folder "
                                    f"to write")
    problem = _overlap(os.path.realpath(dst), sources)
    if problem is None and os.path.lexists(dst):
        problem = _replace_problem(dst, force, foreign, empty_ok)
    if problem is not None:
        raise ConversionError(dst, problem)
    parent = os.path.dirname(os.path.abspath(dst))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ConversionError(dst, f"cannot create it: {parent} is a file, not a directory")


def _created_parents(path: str) -> List[str]:
    """The missing ancestors of `path`, outermost first."""
    missing = []
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    return missing[::-1]


@contextlib.contextmanager
def atomic_directory(dst: str, force: bool = False, sources: Iterable[str] = (),
                     foreign: Foreign = foreign_in_checkpoint, empty_ok: bool = False) -> Iterator[str]:
    """Yield a fresh temporary directory on `dst`'s filesystem; on success it becomes `dst`.

    `dst` is checked first with `check_destination` (same arguments) and the existing destination checked again
    just before it is replaced. On any exception (KeyboardInterrupt included) the temporary directory, and any
    parent directories this call created, are removed and the exception propagates; `dst` is untouched.
    """
    sources = list(sources)
    check_destination(dst, force, sources, foreign, empty_ok)
    dst = os.path.abspath(dst)
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
        _commit(tmp, dst, force, foreign, empty_ok)
        committed = True
    finally:
        if not committed:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_empty(new_parents)


def _commit(tmp: str, dst: str, force: bool, foreign: Foreign, empty_ok: bool) -> None:
    os.chmod(tmp, 0o777 & ~current_umask())
    if not os.path.lexists(dst):
        os.replace(tmp, dst)
        return
    # What is there now may not be what was checked before writing (created or filled meanwhile).
    problem = _replace_problem(dst, force, foreign, empty_ok)
    if problem is not None:
        raise ConversionError(dst, f"{problem} (found when about to replace it; nothing was written)")
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
    old = os.path.join(aside, "old")
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)  # put the previous destination back
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


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
