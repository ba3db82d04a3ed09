"""The one atomic file write: every file the project writes (config.json, preprocessor_config.json, safetensors,
tf_model.h5, Keras files) is written to a temporary file beside its destination and renamed over it when complete.

So a failure, Ctrl-C or a full disk mid-write never leaves a half-written file under the real name, and an existing
file stays as it was until the rename. Whole output folders are made atomic one level up, by
`conversion.atomic.atomic_directory`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no other way to read it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[str]:
    """Yield the path of a new, empty temporary file in `path`'s folder for the caller to write (by name, so that
    h5py and Keras can write it too); its name ends in `path`'s name, so writers that check suffixes accept it.

    When the block ends normally the file gets the permissions of a newly created file (0o666 less the umask;
    mkstemp makes it 0o600), is flushed to disk and renamed to `path`. On any exception, KeyboardInterrupt
    included, the temporary file is removed and `path` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="." + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # after the writer: some writers replace the file they are given
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
