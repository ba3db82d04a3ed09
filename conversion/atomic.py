"""Where a command may write, what it may replace, and writing it atomically: the one destination check of every
`cvt` command that writes (convert, export, demo --out, train --out, attention --out).

The destination check (`check_destination` for folders, `check_file_destination` for single files) refuses:

- an empty path (an unset shell variable);
- a source, a folder holding a source or a path inside a source: the model folder, an input image, a config file,
  any path the command reads. Paths are compared after resolving symbolic links, and by inode where they exist (a
  second name of a source folder, or a hard link to one of its files, counts as the source);
- the working folder or a folder holding it;
- an existing destination without `--force`, and with `--force` one that cvt cannot prove it wrote.

Ownership is proven by records cvt writes, never by file names:

- A folder: every folder a command writes (the outputs of convert, export and demo --out, a `train --out` run
  folder and its checkpoint/ and converted-*/ folders) holds `.cvt-manifest.json`, written as the last file
  inside the temporary folder before the rename: its format and version, the command, every folder and, for
  every file, its relative path, size and sha256. `--force` replaces an existing folder only when it is empty,
  or when its manifest parses (strictly, bounded size) and every entry in the folder is listed in it, a file with
  the same size and sha256. A file added or changed since, a symbolic link, a FIFO or a folder not listed is
  refused with a line naming it; so is a folder without a manifest (written by hand, or by an older cvt).
- A single file (`cvt attention --out PNG`): the PNG carries a `tEXt` chunk `cvt-written` holding the sha256 of
  the file without that chunk; an existing file is replaced with `--force` only when that record is there and the
  digest matches (a picture edited or re-saved since, or one cvt never wrote, is refused). No sidecar file.

`atomic_directory` builds a folder in a temporary folder beside the destination and renames it into place;
`write_file` does the same for one file. A failure, Ctrl-C, SIGTERM or SIGHUP while writing leaves no
half-written destination and no temporary folder: the check is repeated just before the rename, the rename and
the clean-up run with those signals held back (`deferred_signals`), no rename follows an interrupt request even
when its KeyboardInterrupt was lost (`request_interrupt`), and an existing destination (replaced only with
`--force`) stays as it was until the rename. `committed_destinations` lists what this process has put in
place, so that an interrupt after a rename is not reported as "nothing was written".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import tempfile
import threading
import zlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from cvt_core.atomic import atomic_write, current_umask
from cvt_core.untrusted import parse_json, read_regular_file

from .errors import ConversionError

MANIFEST_NAME = ".cvt-manifest.json"
MANIFEST_FORMAT = "cvt-manifest"
MANIFEST_VERSION = 1
MANIFEST_MAX_BYTES = 4 * 1024 * 1024  # far beyond any output's listing (about 150 bytes per file)
PNG_RECORD_KEY = b"cvt-written"
PNG_MAX_BYTES = 256 * 1024 * 1024  # a larger file is never taken for one cvt wrote
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SCAN_LIMIT = 100_000  # entries looked at in a folder being checked (a larger one is refused)
_SOURCE_FILES_LIMIT = 10_000  # files of a source folder whose inodes a destination file is compared with
_DEFERRED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

_command: Optional[str] = None
_committed: List[str] = []
_interrupt_requested = False
# (dev, inode, size, mtime_ns, ctime_ns) -> sha256: a file hashed by the first check is not read again by the
# second; any write to it changes its ctime, which no user can set
_digests: Dict[Tuple[int, int, int, int, int], str] = {}


# ------------------------------------------------------------------------------------------------- bookkeeping
@contextlib.contextmanager
def running_command(name: str) -> Iterator[None]:
    """Name the command whose manifests are written meanwhile (`cvt convert`, ...), and start afresh the list of
    committed destinations and the interrupt request."""
    global _command, _interrupt_requested
    previous, _command = _command, name
    del _committed[:]
    _interrupt_requested = False
    try:
        yield
    finally:
        _command = previous


def committed_destinations() -> List[str]:
    """The destinations this process put in place (since `running_command`) that are still there."""
    return [path for path in _committed if os.path.lexists(path)]


def request_interrupt() -> None:
    """Remember that the user asked the command to stop (called by `cvt`'s signal handlers, which then raise
    KeyboardInterrupt). CPython drops an exception raised in a weakref callback or `__del__`, and a handler can
    run inside one; the request is remembered so that no rename happens after it anyway (`raise_if_interrupted`)."""
    global _interrupt_requested
    _interrupt_requested = True


def interrupt_requested() -> bool:
    return _interrupt_requested


def raise_if_interrupted() -> None:
    """KeyboardInterrupt if an interrupt was requested, even one whose exception was lost on the way."""
    if _interrupt_requested:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back during the block (a rename and its clean-up), then deliver them to
    the handlers that were installed before it. Outside the main thread, where handlers cannot be set, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []
    previous = {}
    try:
        for signum in _DEFERRED_SIGNALS:
            previous[signum] = signal.signal(signum, lambda number, frame: caught.append(number))
    except (ValueError, OSError):  # pragma: no cover - not settable here
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


# ---------------------------------------------------------------------------------------------- folder records
class _ManifestError(Exception):
    pass


def _sha256(path: str) -> str:
    """The sha256 of a regular file, opened without following a link (and without blocking on a FIFO)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in _digests:
            return _digests[key]
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    _digests[key] = digest.hexdigest()
    return _digests[key]


def _walk(directory: str, enter: Callable[[str], bool] = lambda folder: True
          ) -> Iterator[Tuple[str, os.stat_result]]:
    """(relative path with "/" separators, lstat) of every entry under `directory`, a folder's path ending in "/"
    (its entries follow when `enter(path)`), links not followed; the top-level manifest is left out."""
    pending = [""]
    while pending:
        relative = pending.pop()
        with os.scandir(os.path.join(directory, relative) if relative else directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if not relative and entry.name == MANIFEST_NAME:
                    continue
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    yield relative + entry.name + "/", st
                    if enter(relative + entry.name + "/"):
                        pending.append(relative + entry.name + "/")
                else:
                    yield relative + entry.name, st


def write_manifest(directory: str, command: Optional[str] = None) -> str:
    """Write `directory`/.cvt-manifest.json listing every folder and every file (size, sha256) in it; returns its
    path. Called as the last write into a folder, just before it is renamed into place."""
    folders, files = [], []
    for relative, st in _walk(directory):
        if stat.S_ISDIR(st.st_mode):
            folders.append(relative)
        elif stat.S_ISREG(st.st_mode):
            files.append({"path": relative, "size": st.st_size,
                          "sha256": _sha256(os.path.join(directory, relative))})
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                "command": command or _command or "the conversion library (a Python call)",
                "folders": folders, "files": files}
    path = os.path.join(directory, MANIFEST_NAME)
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
    return path


def _valid_relative(path, folder: bool) -> bool:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or "\0" in path:
        return False
    if folder != path.endswith("/"):
        return False
    parts = path[:-1].split("/") if folder else path.split("/")
    return all(part not in ("", ".", "..") for part in parts) and path != MANIFEST_NAME


def _read_manifest(directory: str) -> Optional[Tuple[Dict[str, Tuple[int, str]], Set[str]]]:
    """(files: path -> (size, sha256), folders) from `directory`'s manifest; None when there is none. A manifest
    that is not a regular file, too large, not strict JSON or not of the expected shape raises _ManifestError."""
    path = os.path.join(directory, MANIFEST_NAME)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise _ManifestError("it is not a regular file")
    value = parse_json(read_regular_file(path, MANIFEST_MAX_BYTES, "manifest", _ManifestError), MANIFEST_NAME,
                       _ManifestError, max_bytes=MANIFEST_MAX_BYTES)
    keys = {"format", "version", "command", "folders", "files"}
    if not isinstance(value, dict) or set(value) != keys:
        raise _ManifestError(f"expected an object with exactly the keys {sorted(keys)}")
    if value["format"] != MANIFEST_FORMAT or type(value["version"]) is not int:
        raise _ManifestError(f"not a {MANIFEST_FORMAT} record")
    if value["version"] != MANIFEST_VERSION:
        raise _ManifestError(f"version {value['version']}, this cvt reads version {MANIFEST_VERSION}")
    if not isinstance(value["command"], str) or not isinstance(value["folders"], list) \
            or not isinstance(value["files"], list):
        raise _ManifestError("command, folders or files of the wrong type")
    folders: Set[str] = set()
    for folder in value["folders"]:
        if not _valid_relative(folder, True) or folder in folders:
            raise _ManifestError(f"bad or repeated folder entry {str(folder)[:80]!r}")
        folders.add(folder)
    files: Dict[str, Tuple[int, str]] = {}
    for item in value["files"]:
        if not isinstance(item, dict) or set(item) != {"path", "size", "sha256"}:
            raise _ManifestError("a file entry is not {path, size, sha256}")
        name, size, digest = item["path"], item["size"], item["sha256"]
        if not _valid_relative(name, False) or name in files:
            raise _ManifestError(f"bad or repeated file entry {str(name)[:80]!r}")
        if type(size) is not int or size < 0 or not isinstance(digest, str) or len(digest) != 64 \
                or any(c not in "0123456789abcdef" for c in digest):
            raise _ManifestError(f"bad size or sha256 for {name!r}")
        files[name] = (size, digest)
    return files, folders


def _unlisted(directory: str, files: Dict[str, Tuple[int, str]], folders: Set[str], hashes: bool) -> List[str]:
    """The entries of `directory` its manifest does not account for (a folder not listed is named, not entered);
    sizes are always compared, contents only with `hashes`."""
    found: List[str] = []
    for seen, (relative, st) in enumerate(_walk(directory, enter=folders.__contains__)):
        if seen >= _SCAN_LIMIT:
            found.append(f"more than {_SCAN_LIMIT} entries")
            break
        if stat.S_ISDIR(st.st_mode):
            if relative not in folders:
                found.append(relative)
        elif not stat.S_ISREG(st.st_mode) or relative not in files or files[relative][0] != st.st_size:
            found.append(relative)
        elif hashes and _sha256(os.path.join(directory, relative)) != files[relative][1]:
            found.append(relative)
    return found


def _list(names: List[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def ownership_problem(directory: str, hashes: bool = True) -> Optional[str]:
    """Why the existing folder `directory` cannot be shown to hold only what cvt wrote, or None when it can (an
    empty folder, or one whose manifest accounts for every entry; contents compared only with `hashes`)."""
    try:
        names = sorted(os.listdir(directory))
        if not names:
            return None
        try:
            manifest = _read_manifest(directory)
        except _ManifestError as exc:
            return (f"its {MANIFEST_NAME} cannot be read ({exc}), so cvt cannot tell what in it it wrote; even "
                    f"--force does not replace it; move the folder away or choose another destination")
        if manifest is None:
            shown = [n + "/" if os.path.isdir(os.path.join(directory, n)) and not
                     os.path.islink(os.path.join(directory, n)) else n for n in names]
            return (f"already exists and holds files cvt did not write ({_list(shown)}): it has no {MANIFEST_NAME}, "
                    f"the record cvt keeps of what it wrote (a folder written by hand or by an older cvt has none), "
                    f"so even --force does not replace it; move them away or choose another destination")
        foreign = _unlisted(directory, *manifest, hashes=hashes)
    except OSError as exc:
        return f"cannot read what is in it ({exc.strerror or exc}); choose another destination"
    if not foreign:
        return None
    one = len(foreign) == 1
    return (f"{_list(foreign)} {'was' if one else 'were'} not written by cvt (or {'was' if one else 'were'} changed "
            f"since), so even --force does not replace this folder; move {'it' if one else 'them'} away or choose "
            f"another destination")


# ------------------------------------------------------------------------------------------------ file records
def _png_chunks(data: bytes) -> List[Tuple[int, int, bytes, bytes]]:
    """(start, end, type, content) of each chunk of a PNG up to IEND; ValueError when it is not one."""
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG")
    chunks, offset = [], len(_PNG_SIGNATURE)
    while True:
        if offset + 12 > len(data):
            raise ValueError("truncated PNG")
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        end = offset + 12 + length
        if end > len(data):
            raise ValueError("truncated PNG")
        chunks.append((offset, end, kind, data[offset + 8:offset + 8 + length]))
        offset = end
        if kind == b"IEND":
            return chunks


def _png_without_record(data: bytes) -> Tuple[bytes, List[bytes]]:
    """The PNG without its cvt-written chunks, and their texts."""
    body, records, position = [], [], 0
    for start, end, kind, content in _png_chunks(data):
        if kind == b"tEXt" and content.startswith(PNG_RECORD_KEY + b"\0"):
            body.append(data[position:start])
            records.append(content[len(PNG_RECORD_KEY) + 1:])
            position = end
    body.append(data[position:])
    return b"".join(body), records


def png_with_record(data: bytes) -> bytes:
    """The PNG `data` with a tEXt chunk `cvt-written` = `sha256=<digest of the PNG without that chunk>` before
    IEND: the proof `png_written_by_cvt` looks for."""
    body, _ = _png_without_record(data)
    content = PNG_RECORD_KEY + b"\0" + b"sha256=" + hashlib.sha256(body).hexdigest().encode("ascii")
    chunk = struct.pack(">I", len(content)) + b"tEXt" + content + struct.pack(">I", zlib.crc32(b"tEXt" + content))
    iend = _png_chunks(body)[-1][0]
    return body[:iend] + chunk + body[iend:]


def png_written_by_cvt(path: str) -> bool:
    """Whether the regular file `path` is a PNG carrying cvt's record, with a digest that matches the rest."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        data = read_regular_file(path, PNG_MAX_BYTES, "picture", ValueError)
        body, records = _png_without_record(data)
    except (OSError, ValueError):
        return False
    return records == [b"sha256=" + hashlib.sha256(body).hexdigest().encode("ascii")]


# ------------------------------------------------------------------------------------------------ the one check
def _stat(path: str) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _same(a: Optional[os.stat_result], b: Optional[os.stat_result]) -> bool:
    return a is not None and b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _within(path: str, folder: Optional[os.stat_result]) -> bool:
    """Whether an existing ancestor of `path` (resolved) is the folder `folder`, compared by inode."""
    if folder is None or not stat.S_ISDIR(folder.st_mode):
        return False
    parent = os.path.dirname(os.path.realpath(path))
    while True:
        if _same(_stat(parent), folder):
            return True
        up = os.path.dirname(parent)
        if up == parent:
            return False
        parent = up


def _source_files(source: str) -> Set[Tuple[int, int]]:
    """The (device, inode) of a source file, or of the files in a source folder (up to a bound)."""
    found: Set[Tuple[int, int]] = set()
    if os.path.isfile(source):
        st = _stat(source)
        return {(st.st_dev, st.st_ino)} if st else found
    for root, _, names in os.walk(source):
        for name in names:
            st = _stat(os.path.join(root, name))
            if st is not None and stat.S_ISREG(st.st_mode):
                found.add((st.st_dev, st.st_ino))
            if len(found) >= _SOURCE_FILES_LIMIT:
                return found
    return found


def _overlap(dst: str, sources: Iterable[str]) -> Optional[str]:
    """How the destination collides with a source or the working folder, if it does."""
    real = os.path.realpath(dst)
    here = _stat(dst)
    for source in sources:
        source = os.fspath(source) if source is not None else ""
        if not source or not os.path.lexists(source):
            continue
        other = os.path.realpath(source)
        there = _stat(source)
        common = os.path.commonpath([real, other])
        if real == other or _same(here, there):
            return f"is the source {source}; choose another destination"
        if common == real or (here is not None and _within(source, here)):
            return f"contains the source {source}; write to a folder outside it"
        if common == other or _within(dst, there):
            return f"lies inside the source {source}; write to a folder outside it"
        if here is not None and stat.S_ISREG(here.st_mode) and (here.st_dev, here.st_ino) in _source_files(source):
            return (f"is a second name (a hard link) of a file of the source {source}; choose another "
                    f"destination")
    cwd = os.path.realpath(os.getcwd())
    if real == cwd or _same(here, _stat(cwd)):
        return "is the working folder; name a new folder for the output"
    if os.path.commonpath([real, cwd]) == real or (here is not None and _within(cwd, here)):
        return "contains the working folder; name a new folder for the output"
    return None


def _refuse_empty(dst: str) -> None:
    if not dst.strip():
        raise ConversionError(None, f"the destination {dst!r} is empty (an unset shell variable?); name the "
                                    f"destination to write")


def _replace_problem(dst: str, force: bool, empty_ok: bool, hashes: bool) -> Optional[str]:
    """Why the existing folder `dst` may not be replaced, or None when it may."""
    if os.path.islink(dst):
        return "is a symbolic link; cvt does not replace links, remove it or choose another destination"
    if not os.path.isdir(dst):
        return "is a file, not a folder cvt wrote; remove it or choose another destination"
    try:
        empty = not os.listdir(dst)
    except OSError as exc:
        return f"cannot read what is in it ({exc.strerror or exc}); choose another destination"
    if empty:
        return None if force or empty_ok else "already exists; pass --force to replace it"
    problem = ownership_problem(dst, hashes=hashes and force)
    if problem is not None:
        return problem
    return None if force else "already exists; pass --force to replace it"


def check_destination(dst: str, force: bool, sources: Iterable[str] = (), empty_ok: bool = False) -> None:
    """Raise ConversionError unless the folder `dst` may be written (see the module docstring).

    `sources` are the paths the command reads (the destination must not be, hold or lie inside any of them); with
    `empty_ok`, an existing empty folder is used without `force`.
    """
    dst = os.fspath(dst)
    _refuse_empty(dst)
    problem = _overlap(dst, list(sources))
    if problem is None and os.path.lexists(dst):
        problem = _replace_problem(dst, force, empty_ok, hashes=True)
    if problem is not None:
        raise ConversionError(dst, problem)
    parent = os.path.dirname(os.path.abspath(dst))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ConversionError(dst, f"cannot create it: {parent} is a file, not a directory")


def check_file_destination(dst: str, force: bool, sources: Iterable[str] = (),
                           proof: Callable[[str], bool] = png_written_by_cvt) -> None:
    """Raise ConversionError unless the single file `dst` may be written: the rules of `check_destination`, an
    existing folder refused, and an existing file replaced only with `force` and only when `proof(dst)` shows that
    cvt wrote it. Its folder must exist."""
    dst = os.fspath(dst)
    _refuse_empty(dst)
    problem = _overlap(dst, list(sources))
    if problem is None and os.path.lexists(dst):
        mode = os.lstat(dst).st_mode
        if stat.S_ISLNK(mode):
            problem = "is a symbolic link; cvt does not replace links, remove it or choose another destination"
        elif stat.S_ISDIR(mode):
            problem = "is a folder; name the file to write"
        elif not stat.S_ISREG(mode):
            problem = "is not a regular file; choose another destination"
        elif not force:
            problem = "exists; pass --force to replace it (--force replaces only a file cvt wrote)"
        elif not proof(dst):
            problem = "was not written by cvt (or was changed since); move it away or choose another destination"
    if problem is not None:
        raise ConversionError(dst, problem)
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise ConversionError(folder, f"no such folder to write {os.path.basename(dst)} into")


# ----------------------------------------------------------------------------------------------------- writing
def write_file(dst: str, data: bytes, force: bool = False, sources: Iterable[str] = (),
               proof: Callable[[str], bool] = png_written_by_cvt) -> str:
    """Write `data` to the file `dst` atomically, after `check_file_destination` (repeated just before the
    rename); returns `dst`."""
    dst = os.fspath(dst)
    sources = list(sources)
    check_file_destination(dst, force, sources, proof)
    folder = os.path.dirname(os.path.abspath(dst))
    tmp = None
    try:
        with deferred_signals():
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="." + os.path.basename(dst), dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        with deferred_signals():
            raise_if_interrupted()
            check_file_destination(dst, force, sources, proof)  # what is there now may have changed meanwhile
            os.replace(tmp, dst)
            tmp = None
            _committed.append(os.path.abspath(dst))
    except OSError as exc:
        raise ConversionError(dst, f"cannot write it ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            with deferred_signals(), contextlib.suppress(OSError):
                os.unlink(tmp)
    return dst


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
                     empty_ok: bool = False) -> Iterator[str]:
    """Yield a fresh temporary directory on `dst`'s filesystem; on success it gets its manifest and becomes `dst`.

    `dst` is checked first with `check_destination` (same arguments) and checked again just before the rename.
    On any exception (KeyboardInterrupt included) the temporary directory, and any parent directories this call
    created, are removed and the exception propagates; `dst` is untouched.
    """
    sources = list(sources)
    check_destination(dst, force, sources, empty_ok)
    dst = os.path.abspath(dst)
    new_parents = _created_parents(dst)
    tmp: Optional[str] = None
    committed = False
    try:
        with deferred_signals():
            try:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=os.path.dirname(dst))
            except OSError as exc:
                raise ConversionError(dst, f"cannot create the output folder ({exc.strerror or exc})") from None
        yield tmp
        write_manifest(tmp)  # the last file written inside
        with deferred_signals():
            raise_if_interrupted()
            _commit(tmp, dst, force, sources, empty_ok)
            committed = True
            _committed.append(dst)
    finally:
        if not committed:
            with deferred_signals():
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                _remove_empty(new_parents)


def _commit(tmp: str, dst: str, force: bool, sources: List[str], empty_ok: bool) -> None:
    os.chmod(tmp, 0o777 & ~current_umask())
    # What is there now may not be what was checked before writing (created, filled or changed meanwhile).
    problem = _overlap(dst, sources)
    if problem is None and os.path.lexists(dst):
        problem = _replace_problem(dst, force, empty_ok, hashes=True)
    if problem is not None:
        raise ConversionError(dst, f"{problem} (found when about to replace it; nothing was written)")
    if not os.path.lexists(dst):
        os.replace(tmp, dst)
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
    try:
        old = os.path.join(aside, "old")
        os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old, dst)  # put the previous destination back
            raise
    finally:
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
        with deferred_signals():
            shutil.rmtree(path, ignore_errors=True)
