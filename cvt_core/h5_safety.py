"""HDF5 files (`tf_model.h5`, Keras 3 `model.weights.h5`) and `.keras` archives from untrusted sources, made safe
by construction: every HDF5 file is walked WHOLE, before any dataset is read, and refused in one
`CheckpointError` line naming the file and the problem unless it is as plain as what Keras and transformers write.

Why: HDF5 lets a file pull bytes from elsewhere when a dataset is read (h5py follows it all silently), so a crafted
`tf_model.h5` would copy local files (`/etc/passwd`) into a converted checkpoint; and it lets a tiny file declare a
huge dataset. The walk (`check_h5`) therefore requires:

- links: every link is a hard link (no soft link, external link or user-defined link); cycles and shared objects
  are visited once; at most `Limits.H5_LINKS` links;
- objects: only groups and datasets (a named datatype, or any other object, is refused);
- datasets: no external raw storage (`get_external_count() == 0`), not virtual, no filters at all (Keras and
  transformers write none; gzip would be a decompression bomb), contiguous or compact layout, a simple or scalar
  dataspace, storage allocated equal to the declared bytes (no huge dataset filled from a fill value), data inside
  the file, and all datasets together no larger than the file, so reading them all allocates at most the file's
  size (plus, per tensor, one native-order copy for the callers that convert);
- values: IEEE float16/32/64. In a `tf_model.h5` (read by `read_dataset` here) either byte order: big-endian data is
  converted to native order by HDF5 while it is read, into a native array (no second copy). In Keras files (read by
  Keras itself, on any backend) little-endian only, integers only under the optimizer's state (`optimizer/`) and
  int8 (the kernels of layers quantized with `quantize("int8")` or `"int4"`; cvt_tf loads an integer tensor only
  where the model holds an integer variable); Keras' bfloat16 (2-byte opaque) is accepted there too;
- attributes: strings or numbers, each at most `Limits.H5_ATTRIBUTE_BYTES` stored; in Keras files a
  variable-length one is a scalar (Keras reads `attrs["dtype"]`). Name lists (tf_keras' `layer_names` /
  `weight_names`) are read only through `read_name_list`, into fixed-size buffers (variable-length strings can all
  point at one large heap object: read naively, a small file would expand without bound).

Files are opened only as regular files (`cvt_core.untrusted.open_regular_file`; a FIFO or /dev/zero is refused),
and h5py reads that very file object (the same inode that was checked), with file locking off. Datasets are opened
for reading with dataset-access properties whose external-file and virtual-dataset prefixes name a folder that does
not exist (defence in depth: the walk has already refused both, and HDF5 applies prefixes to relative names only).

`.keras` archives (`check_keras_archive`): a bounded member list (no duplicate, absolute or `..` name), declared
sizes within `Limits.ZIP_RATIO` of what is stored and of the archive's size, `config.json` parsed with
`parse_json`, and the `model.weights.h5` inside walked as above before Keras reads it.

h5py is imported inside the functions: cvt_core itself needs neither h5py nor any framework.
"""

from __future__ import annotations

import io
import math
import os
import posixpath
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import numpy as np

from .errors import CheckpointError
from .untrusted import Limits, open_regular_file, parse_json

TF_KIND = "tf_model.h5"  # transformers / tf_keras HDF5: floats of either byte order everywhere, name-list attributes
KERAS_KIND = "keras"  # Keras 3 weights: little-endian floats; integers under optimizer/; scalar variable-length attrs
KERAS_ARCHIVE_CONFIG = "config.json"
KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"
NO_SUCH_PREFIX = "/nonexistent-cvt-refuses-files-outside-the-checkpoint"  # for HDF5's external / virtual prefixes


def h5py_module(path: str):
    """h5py, or a one-line CheckpointError saying that reading or writing `path` needs it."""
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency of the tf and keras extras
        raise CheckpointError(f"{path}: reading or writing it needs h5py (pip install h5py)") from None
    return h5py


def h5_reason(exc: BaseException) -> str:
    """The useful part of an h5py / HDF5 error message, on one line."""
    text = str(exc)
    if "(" in text and ")" in text:
        text = text[text.find("(") + 1: text.rfind(")")]
    text = " ".join(text.split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


def _shown(name: Any) -> str:
    """An object or link name from the file, for a one-line message (it may hold any bytes)."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "backslashreplace")
    text = repr(str(name))
    return text if len(text) <= 160 else text[:157] + "...'"


@dataclass(frozen=True)
class H5Dataset:
    """What the walk learned of one dataset: its first path, shape, the native-order NumPy dtype it reads as,
    its bytes, and whether it is stored big-endian."""

    path: str
    shape: Tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    big_endian: bool = False


# --------------------------------------------------------------------------------------------------- the walk
_FLOAT_TYPES = None  # [(h5t little-endian, h5t big-endian, numpy dtype)], built on first use (needs h5py)
_INT_TYPES = None


def _type_tables(h5py):
    global _FLOAT_TYPES, _INT_TYPES
    if _FLOAT_TYPES is None:
        h5t = h5py.h5t
        _FLOAT_TYPES = [(h5t.IEEE_F16LE, h5t.IEEE_F16BE, np.dtype(np.float16)),
                        (h5t.IEEE_F32LE, h5t.IEEE_F32BE, np.dtype(np.float32)),
                        (h5t.IEEE_F64LE, h5t.IEEE_F64BE, np.dtype(np.float64))]
        _INT_TYPES = [(getattr(h5t, f"STD_{s}{b}LE"), getattr(h5t, f"STD_{s}{b}BE"), np.dtype(f"{s.lower()}{b // 8}"))
                      for s in ("I", "U") for b in (8, 16, 32, 64)]
    return _FLOAT_TYPES, _INT_TYPES


def _class_name(h5py, cls: int, size: int) -> str:
    h5t = h5py.h5t
    names = {h5t.INTEGER: f"{size * 8}-bit integer", h5t.FLOAT: f"non-IEEE {size * 8}-bit float",
             h5t.STRING: "string", h5t.COMPOUND: "compound (complex or record)", h5t.ENUM: "enum (boolean)",
             h5t.VLEN: "variable-length", h5t.ARRAY: "array", h5t.OPAQUE: "opaque", h5t.REFERENCE: "reference",
             h5t.BITFIELD: "bitfield", h5t.TIME: "time"}
    return names.get(cls, f"HDF5 type class {cls}")


class _Walk:
    def __init__(self, h5py, source: str, size: int, kind: str):
        self.h5py, self.source, self.size, self.kind = h5py, source, size, kind
        self.datasets: Dict[Tuple[int, int], H5Dataset] = {}
        self.total = 0
        self.links = 0
        self.string_bytes = 0  # characters of the variable-length string attributes read so far

    def refuse(self, problem: str):
        raise CheckpointError(f"{self.source}: {problem}")

    # -------------------------------------------------------------- objects
    def run(self, root) -> Dict[Tuple[int, int], H5Dataset]:
        h5py = self.h5py
        info = h5py.h5o.get_info(root)
        seen = {(info.fileno, info.addr)}
        self.check_attributes(root, "/")
        stack = [(root, "/")]
        while stack:
            group, path = stack.pop()
            names: List[bytes] = []
            group.links.iterate(names.append)  # H5Literate: lists the links, follows none
            for name in names:
                self.links += 1
                if self.links > Limits.H5_LINKS:
                    self.refuse(f"holds more than {Limits.H5_LINKS} links; a weights file holds far fewer")
                child = posixpath.join(path, name.decode("utf-8", "backslashreplace"))
                link = group.links.get_info(name)
                if link.type != h5py.h5l.TYPE_HARD:
                    what = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link (to "
                            "another file)"}.get(link.type, f"a user-defined link (type {link.type})")
                    self.refuse(f"{_shown(child)} is {what}; only hard links are accepted in weights files")
                obj = h5py.h5o.open(group, name)  # one hard link: nothing outside the file is reached
                info = h5py.h5o.get_info(obj)
                key = (info.fileno, info.addr)
                if key in seen:
                    continue
                seen.add(key)
                if info.type == h5py.h5o.TYPE_GROUP:
                    self.check_attributes(obj, child)
                    stack.append((obj, child))
                elif info.type == h5py.h5o.TYPE_DATASET:
                    self.check_attributes(obj, child)
                    facts = self.check_dataset(obj, child)
                    self.datasets[key] = facts
                    self.total += facts.nbytes
                    if self.total > self.size:
                        self.refuse(f"its datasets declare more bytes ({self.total} so far) than the file holds "
                                    f"({self.size}): truncated, or data counted twice")
                elif info.type == h5py.h5o.TYPE_NAMED_DATATYPE:
                    self.refuse(f"{_shown(child)} is a named datatype; weights files hold only groups and datasets")
                else:
                    self.refuse(f"{_shown(child)} is an HDF5 object of unknown kind {info.type}")
        return self.datasets

    # -------------------------------------------------------------- datasets
    def check_dataset(self, dset, path: str) -> H5Dataset:
        h5py = self.h5py
        shown = _shown(path)
        plist = dset.get_create_plist()
        if plist.get_external_count():
            self.refuse(f"dataset {shown} declares external raw storage (its bytes would be read from other files); "
                        f"refused")
        layout = plist.get_layout()
        if layout == h5py.h5d.VIRTUAL:
            self.refuse(f"dataset {shown} is a virtual dataset (its bytes would be read from other datasets or "
                        f"files); refused")
        if plist.get_nfilters():
            name = plist.get_filter(0)[3]
            name = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
            self.refuse(f"dataset {shown} is compressed or filtered ({_shown(name)}); Keras and transformers write "
                        f"no filters, so none are accepted")
        if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.COMPACT):
            what = "chunked" if layout == h5py.h5d.CHUNKED else f"layout {layout}"
            self.refuse(f"dataset {shown} has {what} storage; Keras and transformers write contiguous datasets")
        space = dset.get_space()
        if space.get_simple_extent_type() not in (h5py.h5s.SCALAR, h5py.h5s.SIMPLE):
            self.refuse(f"dataset {shown} has no dataspace (a null dataset)")
        shape = tuple(int(d) for d in space.shape)
        dtype, big_endian = self.value_type(dset.get_type(), path)
        itemsize = dset.get_type().get_size()
        nbytes = math.prod(shape) * itemsize
        stored = dset.get_storage_size()
        if stored != nbytes:
            self.refuse(f"dataset {shown} of shape {shape} declares {nbytes} bytes but has {stored} stored "
                        f"(unallocated or truncated)")
        if layout == h5py.h5d.CONTIGUOUS and nbytes:
            offset = dset.get_offset()
            if offset is None or offset < 0 or offset + nbytes > self.size:
                self.refuse(f"dataset {shown}: its data lies past the end of the file (truncated)")
        if nbytes > self.size:
            self.refuse(f"dataset {shown} declares {nbytes} bytes, more than the whole file ({self.size})")
        return H5Dataset(path, shape, dtype, nbytes, big_endian)

    def value_type(self, tid, path: str) -> Tuple[np.dtype, bool]:
        h5py = self.h5py
        floats, ints = _type_tables(h5py)
        cls, size = tid.get_class(), tid.get_size()
        keras = self.kind == KERAS_KIND
        table = floats
        if cls == h5py.h5t.INTEGER and keras and path.lstrip("/").split("/")[0] == "optimizer":
            table = ints  # the optimizer's iteration counter
        elif cls == h5py.h5t.INTEGER and keras and size == 1:
            table = [entry for entry in ints if entry[2] == np.dtype(np.int8)]  # quantized (int8, int4) kernels
        for little, big, dtype in table:
            if tid.equal(little):
                return dtype, False
            if tid.equal(big):
                if keras:
                    self.refuse(f"dataset {_shown(path)} holds big-endian values; Keras writes little-endian "
                                f"weights, and its loaders do not convert them on every backend")
                return dtype, True
        if keras and cls == h5py.h5t.OPAQUE and size == 2:
            return np.dtype("V2"), False  # Keras' bfloat16 (it reads them with attrs["dtype"] == "bfloat16")
        kind = _class_name(h5py, cls, size)
        if cls == h5py.h5t.FLOAT and size in (2, 4, 8):
            kind = f"{size * 8}-bit float of a non-IEEE layout"
        self.refuse(f"dataset {_shown(path)} holds {kind} values; weights must be float16, float32 or float64")

    # -------------------------------------------------------------- attributes
    def check_attributes(self, obj, path: str) -> None:
        h5py = self.h5py
        names: List[bytes] = []
        h5py.h5a.iterate(obj, names.append)
        for name in names:
            attr = h5py.h5a.open(obj, name)
            shown = f"attribute {_shown(name)} of {_shown(path)}"
            space = attr.get_space()
            count = math.prod(int(d) for d in space.shape) if space.get_simple_extent_type() == h5py.h5s.SIMPLE \
                else (1 if space.get_simple_extent_type() == h5py.h5s.SCALAR else 0)
            if count == 0:
                continue
            tid = attr.get_type()
            cls = tid.get_class()
            if cls not in (h5py.h5t.STRING, h5py.h5t.FLOAT, h5py.h5t.INTEGER):
                self.refuse(f"{shown} holds {_class_name(h5py, cls, tid.get_size())} values; weights files hold "
                            f"string and number attributes only")
            try:
                stored = attr.get_storage_size()
            except RuntimeError:
                stored = 0
            if stored > Limits.H5_ATTRIBUTE_BYTES:
                self.refuse(f"{shown} stores {stored} bytes; at most {Limits.H5_ATTRIBUTE_BYTES} are accepted")
            if cls == h5py.h5t.STRING and tid.is_variable_str() and self.kind == KERAS_KIND and count > 1:
                self.refuse(f"{shown} is a list of {count} variable-length strings; Keras writes scalars")
            if cls == h5py.h5t.STRING and tid.is_variable_str() and count == 1:
                self.check_variable_string(attr, shown)

    def check_variable_string(self, attr, shown: str) -> None:
        """A variable-length string attribute stores 16 bytes and points at a string in the file's heap, which many
        attributes may share: whoever reads them all (Keras' legacy loader does) allocates their lengths added up.
        They are read here one at a time, and refused once together they are longer than the file."""
        value = np.empty((), dtype=self.h5py.string_dtype(encoding="ascii"))
        attr.read(value)
        item = value[()]
        self.string_bytes += len(item) if isinstance(item, (bytes, str)) else 0
        if self.string_bytes > self.size + Limits.H5_ATTRIBUTE_BYTES:
            self.refuse(f"{shown}: the variable-length string attributes together hold {self.string_bytes} bytes, "
                        f"more than the {self.size}-byte file (strings shared between attributes)")


def _size_of(h5file) -> int:
    return int(h5file.id.get_filesize())


def check_h5(h5file, source: str, kind: str = TF_KIND, size: Optional[int] = None) -> Dict[Tuple[int, int], H5Dataset]:
    """Walk the whole open HDF5 file `h5file` (an `h5py.File`) before any dataset is read, as the module says;
    raise a one-line `CheckpointError` naming `source` at the first problem. `size`: the file's size in bytes
    (default: what HDF5 measures). Returns {(fileno, object address): H5Dataset} of every dataset."""
    h5py = h5py_module(source)
    try:
        size = _size_of(h5file) if size is None else int(size)
        return _Walk(h5py, source, size, kind).run(h5file["/"].id)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{source}: truncated or corrupt HDF5 file ({h5_reason(exc)})") from None


# --------------------------------------------------------------------------------------------------- files
class CheckedH5:
    """An HDF5 file opened from a regular file and walked whole (`open_h5`): `file` is the `h5py.File`;
    `dataset(group, name)` resolves a weight, `read(facts_and_dataset)` reads it; `close()` releases both."""

    def __init__(self, h5py, file, fileobj: Optional[BinaryIO], source: str, size: int, kind: str,
                 datasets: Dict[Tuple[int, int], H5Dataset]):
        self.h5py, self.file, self._fileobj = h5py, file, fileobj
        self.source, self.size, self.kind, self.datasets = source, size, kind, datasets
        self._names_read = 0

    def __enter__(self) -> "CheckedH5":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            if self._fileobj is not None:
                self._fileobj.close()

    def refuse(self, problem: str):
        raise CheckpointError(f"{self.source}: {problem}")

    def get(self, group, name: str):
        """(h5py object, H5Dataset or None) at `name` under `group` (a path from the file's own attributes),
        or (None, None) when there is nothing there. Datasets are opened with dataset-access properties whose
        external-file and virtual-dataset prefixes name a folder that does not exist."""
        h5py = self.h5py
        try:
            if name not in group:
                return None, None
            encoded = name.encode("utf-8")
            info = h5py.h5o.get_info(group.id, encoded)
            if info.type != h5py.h5o.TYPE_DATASET:
                return group[name], None
            facts = self.datasets.get((info.fileno, info.addr))
            if facts is None:  # every object reachable by hard links was walked: this cannot happen
                self.refuse(f"{_shown(name)} was not seen by the safety walk; refused")
            dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
            dapl.set_efile_prefix(NO_SUCH_PREFIX.encode())
            dapl.set_virtual_prefix(NO_SUCH_PREFIX.encode())
            return h5py.Dataset(h5py.h5d.open(group.id, encoded, dapl)), facts
        except CheckpointError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeError) as exc:
            self.refuse(f"cannot resolve {_shown(name)} ({h5_reason(exc)})")

    def dataset(self, group, name: str, what: str):
        """(h5py.Dataset, H5Dataset) of the weight `name` under `group`; one line when it is missing or not a
        dataset (`what` names it in the message)."""
        obj, facts = self.get(group, name)
        if obj is None:
            self.refuse(f"truncated or corrupt: {what} {_shown(name)} is missing")
        if facts is None:
            kind = "a group" if isinstance(obj, self.h5py.Group) else type(obj).__name__
            self.refuse(f"{what} {_shown(name)} is {kind}, not a dataset of weights")
        return obj, facts

    def read(self, dataset, facts: H5Dataset) -> np.ndarray:
        """The dataset's values as a new native-order array (big-endian data converted by HDF5 while reading);
        its storage is checked again first, in case the file changed."""
        h5py = self.h5py
        try:
            dsid = dataset.id
            again = _Walk(h5py, self.source, self.size, self.kind).check_dataset(dsid, facts.path)
            if again.shape != facts.shape or again.dtype != facts.dtype:
                self.refuse(f"dataset {_shown(facts.path)} changed while it was read")
            out = np.empty(facts.shape, facts.dtype)
            if out.size:
                dsid.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
            return out
        except CheckpointError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            self.refuse(f"truncated or corrupt: cannot read {_shown(facts.path)} ({h5_reason(exc)})")

    def read_name_list(self, obj, name: str) -> List[str]:
        """tf_keras' string-list attribute `name` of `obj` (whole, or split into `name0`, `name1`, ... as
        `save_attributes_to_hdf5_group` splits it), read into fixed-size buffers within `Limits.H5_NAMES` names of
        at most `Limits.H5_NAME_CHARS` bytes in the whole file."""
        if name in obj.attrs:
            return self._read_names(obj, name)
        out: List[str] = []
        chunk = 0
        while f"{name}{chunk}" in obj.attrs:
            out.extend(self._read_names(obj, f"{name}{chunk}"))
            chunk += 1
        return out

    def _read_names(self, obj, name: str) -> List[str]:
        h5py = self.h5py
        where = f"attribute {name!r} of {_shown(obj.name)}"
        try:
            attr = h5py.h5a.open(obj.id, name.encode())
            shape = tuple(int(d) for d in attr.shape or ())
            count = math.prod(shape)
            if count == 0:
                return []
            tid = attr.get_type()
            if tid.get_class() != h5py.h5t.STRING:
                self.refuse(f"{where} holds {_class_name(h5py, tid.get_class(), tid.get_size())} values, not names")
            self._names_read += count
            if self._names_read > Limits.H5_NAMES:
                self.refuse(f"lists more than {Limits.H5_NAMES} names; a weights file lists far fewer")
            width = Limits.H5_NAME_CHARS
            mtype = h5py.h5t.C_S1.copy()
            mtype.set_size(width)
            mtype.set_cset(tid.get_cset())
            mtype.set_strpad(h5py.h5t.STR_NULLPAD)
            buffer = np.zeros(shape, f"S{width}")
            attr.read(buffer, mtype=mtype)  # variable-length strings are cut at `width`: never more memory
        except CheckpointError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            self.refuse(f"truncated or corrupt: cannot read {where} ({h5_reason(exc)})")
        names = []
        for raw in buffer.reshape(-1).tolist():
            if len(raw) >= width:
                self.refuse(f"{where} holds a name of {width} bytes or more; real names are far shorter")
            try:
                names.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                self.refuse(f"{where} holds a name that is not UTF-8 text")
        return names


def _open_h5py(h5py, fileobj, source: str):
    try:
        return h5py.File(fileobj, "r", locking=False)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{source}: not a readable HDF5 file (truncated or corrupt: {h5_reason(exc)})") from None


def open_h5(path: str, kind: str = TF_KIND) -> CheckedH5:
    """Open the regular file `path` read-only (one file object: the inode checked is the inode read), open it with
    h5py (file locking off) and walk it whole (`check_h5`). One-line `CheckpointError` for anything refused."""
    path = os.fspath(path)
    h5py = h5py_module(path)
    fileobj = open_regular_file(path)
    try:
        size = os.fstat(fileobj.fileno()).st_size
        f = _open_h5py(h5py, fileobj, path)
        try:
            datasets = check_h5(f, path, kind, size)
        except BaseException:
            f.close()
            raise
    except BaseException:
        fileobj.close()
        raise
    return CheckedH5(h5py, f, fileobj, path, size, kind, datasets)


def check_h5_file(path: str, kind: str = KERAS_KIND) -> None:
    """`open_h5` and close: the walk alone, for a file another reader (Keras) reads next."""
    open_h5(path, kind).close()


def check_keras_weights_path(path: str) -> None:
    """The whole-file checks for any path Keras' `load_weights` accepts, before Keras opens it: a `.keras` archive
    (`check_keras_archive`), a `.weights.h5` file (walked as Keras weights), a sharded `.weights.json` (strict JSON;
    every shard it names, a plain file name beside it, and every `<base>_NNNNN.weights.h5` Keras may open beside it,
    each walked), or a legacy `.h5` / `.hdf5` file (walked as tf_keras' layout). Other paths are left to Keras,
    which refuses them."""
    path = os.fspath(path)
    if path.endswith(".keras"):
        check_keras_archive(path)
    elif path.endswith(".weights.h5"):
        check_h5_file(path, KERAS_KIND)
    elif path.endswith(".weights.json"):
        for shard in keras_shard_paths(path):
            check_h5_file(shard, KERAS_KIND)
    elif path.endswith((".h5", ".hdf5")):
        check_h5_file(path, TF_KIND)


def keras_shard_index(path: str) -> Dict[str, List[str]]:
    """The `weight_map` of the sharded Keras weights index `path`: {layer path: the shard file names Keras reads
    it from, the first one first}; each a plain `.weights.h5` file name, else a one-line `CheckpointError`."""
    from .untrusted import load_json_file

    index = load_json_file(path, "sharded Keras weights index", max_bytes=Limits.JSON_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: not a sharded Keras weights index (needs a 'weight_map' object)")
    shards = {}
    for layer, value in weight_map.items():
        shards[layer] = value if isinstance(value, list) else [value]
        for name in shards[layer]:
            if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
                    or "\0" in name or not name.endswith(".weights.h5")):
                raise CheckpointError(f"{path}: refusing shard {_shown(name)}: a shard must be a plain "
                                      f".weights.h5 file name in the index's folder")
    return shards


def keras_shard_paths(path: str, listed_only: bool = False,
                      weight_map: Optional[Dict[str, List[str]]] = None) -> List[str]:
    """The shards of the sharded Keras weights index `path`: each file its `weight_map` names (a plain
    `.weights.h5` file name in the index's folder, else a one-line `CheckpointError`) and, unless `listed_only`,
    every `<base>_NNNNN.weights.h5` beside it, which Keras opens by name. `weight_map`: the index's, when the
    caller has read it already (`keras_shard_index`)."""
    weight_map = keras_shard_index(path) if weight_map is None else weight_map
    names = {name for listed in weight_map.values() for name in listed}
    folder = os.path.dirname(path) or "."
    base = os.path.basename(path)[: -len(".weights.json")]
    if not listed_only:
        names.update(n for n in os.listdir(folder) if n.startswith(base + "_") and n.endswith(".weights.h5"))
    return [os.path.join(folder, n) for n in sorted(names)]


def check_h5_bytes(data: bytes, source: str, kind: str = KERAS_KIND) -> None:
    """The walk over an HDF5 file held in memory (the weights inside a `.keras` archive)."""
    h5py = h5py_module(source)
    buffer = io.BytesIO(data)
    f = _open_h5py(h5py, buffer, source)
    try:
        check_h5(f, source, kind, len(data))
    finally:
        f.close()


# --------------------------------------------------------------------------------------------------- .keras
@dataclass
class KerasArchive:
    """What `check_keras_archive` read: the parsed `config.json`, and the archive's member names."""

    config: Any
    members: List[str]


def _refuse_zip(path: str, problem: str):
    raise CheckpointError(f"{path}: {problem}")


def check_keras_archive(path: str, check_weights: bool = True, fileobj: Optional[BinaryIO] = None) -> KerasArchive:
    """Check a `.keras` archive before Keras reads it: a regular file and a readable zip, at most
    `Limits.ZIP_MEMBERS` members with plain unique names, no member declaring more than `Limits.ZIP_RATIO` times
    its stored size (above `Limits.ZIP_SMALL_MEMBER` bytes) nor all together more than `Limits.ZIP_RATIO` times the
    archive plus `Limits.ZIP_SMALL_MEMBER`; `config.json` present and strict, bounded JSON (`parse_json`); and
    (`check_weights`) the `model.weights.h5` inside walked whole (`check_h5`, Keras rules). One-line
    `CheckpointError` for anything refused. `fileobj`: the archive already opened with `open_regular_file` (so
    that the caller hands Keras the very file checked); it is left open."""
    path = os.fspath(path)
    if fileobj is None:
        with open_regular_file(path) as opened:
            return check_keras_archive(path, check_weights, opened)
    fileobj.seek(0)
    size = os.fstat(fileobj.fileno()).st_size
    try:
        archive = zipfile.ZipFile(fileobj, "r")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        _refuse_zip(path, f"not a .keras archive (truncated or corrupt zip file: {h5_reason(exc)})")
    with archive:
        infos = archive.infolist()
        if len(infos) > Limits.ZIP_MEMBERS:
            _refuse_zip(path, f"holds {len(infos)} zip members; at most {Limits.ZIP_MEMBERS} are accepted")
        seen = set()
        total = 0
        for info in infos:
            name = info.filename
            parts = name.replace("\\", "/").split("/")
            if name in seen:
                _refuse_zip(path, f"zip member {_shown(name)} appears twice")
            seen.add(name)
            if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
                _refuse_zip(path, f"zip member {_shown(name)} has a path outside the archive")
            if info.compress_size > size:
                _refuse_zip(path, f"zip member {_shown(name)} declares {info.compress_size} stored bytes, more "
                                  f"than the archive's {size} (truncated or corrupt)")
            if (info.file_size > Limits.ZIP_SMALL_MEMBER
                    and info.file_size > Limits.ZIP_RATIO * max(info.compress_size, 1)):
                _refuse_zip(path, f"zip member {_shown(name)} declares {info.file_size} bytes from "
                                  f"{info.compress_size} stored (a decompression bomb); at most {Limits.ZIP_RATIO} "
                                  f"times its stored size is accepted")
            total += info.file_size
        if total > Limits.ZIP_RATIO * size + Limits.ZIP_SMALL_MEMBER:
            _refuse_zip(path, f"zip members declare {total} bytes in all from a {size}-byte archive (a "
                              f"decompression bomb)")
        if KERAS_ARCHIVE_CONFIG not in seen:
            _refuse_zip(path, f"not a .keras archive: it has no {KERAS_ARCHIVE_CONFIG}")
        config_info = archive.getinfo(KERAS_ARCHIVE_CONFIG)
        if config_info.file_size > Limits.JSON_BYTES:
            _refuse_zip(path, f"{KERAS_ARCHIVE_CONFIG} of {config_info.file_size} bytes is larger than the "
                              f"{Limits.JSON_BYTES} accepted")
        config = parse_json(_read_member(archive, config_info, path), f"{path} ({KERAS_ARCHIVE_CONFIG})")
        if check_weights and KERAS_ARCHIVE_WEIGHTS in seen:
            data = _read_member(archive, archive.getinfo(KERAS_ARCHIVE_WEIGHTS), path)
            check_h5_bytes(data, f"{path} ({KERAS_ARCHIVE_WEIGHTS})", KERAS_KIND)
            del data
    return KerasArchive(config, [info.filename for info in infos])


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytes:
    """A member read whole: zipfile stops at the declared size and checks the CRC."""
    try:
        with archive.open(info, "r") as member:
            data = member.read(info.file_size + 1)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as exc:
        _refuse_zip(path, f"truncated or corrupt archive: cannot read {_shown(info.filename)} ({h5_reason(exc)})")
    if len(data) != info.file_size:
        _refuse_zip(path, f"truncated or corrupt archive: {_shown(info.filename)} holds {len(data)} bytes, not the "
                          f"{info.file_size} declared")
    return data


def keras_archive_class(config: Any) -> str:
    """The class a `.keras` archive's config.json says it holds ("module.ClassName"), for messages."""
    if not isinstance(config, dict):
        return f"a {type(config).__name__} instead of a model config"
    name = config.get("class_name")
    module = config.get("module")
    if isinstance(module, str) and isinstance(name, str):
        return f"{module}.{name}"
    return str(name) if isinstance(name, str) else "no class_name"
