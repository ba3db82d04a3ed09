"""Where a checkpoint name leads: a local folder, or a Hugging Face hub repository fetched through huggingface_hub.

`from_pretrained` in both frameworks, `CvtImageProcessor.from_pretrained` and the converter resolve names here, so a
hub id means the same everywhere. A name is a hub repository when it is written `hf://org/name`, or `org/name` with
no such local path. The download, its cache (`HF_HOME`, `cache_dir`), offline mode (`HF_HUB_OFFLINE`,
`local_files_only`), tokens and revisions follow huggingface_hub's own rules: nothing here re-implements them.
A preset name (`cvt-13`) is an architecture without weights and is refused with directions to both.
"""

from __future__ import annotations

import fnmatch
import os
import re
from typing import Any, Dict, Optional

from .errors import CheckpointError
from .filenames import CONFIG_NAME, PREPROCESSOR_CONFIG_NAME

HUB_PREFIX = "hf://"
# The keyword arguments `from_pretrained` passes on to huggingface_hub, as transformers names them.
HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "token", "force_download")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FILE_SUFFIXES = (".json", ".h5", ".keras", ".safetensors", ".bin", ".pth", ".pt", ".pt2", ".onnx", ".tflite")
# Weight files in order of preference: the first group the repository holds is the one fetched.
WEIGHT_FILE_GROUPS = (
    ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"),
    ("tf_model.h5",),
)


class HubError(CheckpointError):
    """A hub repository could not be fetched (offline without a cached copy, unknown repository, no CvT weights)."""


def hub_repo_id(name: str) -> Optional[str]:
    """The repository id `name` denotes, or None when it is a local path (existing, or not shaped `org/name`)."""
    if name.startswith(HUB_PREFIX):
        repo_id = name[len(HUB_PREFIX):].strip("/")
        if not _HUB_ID.match(repo_id):
            raise HubError(f"{name}: not a hub repository id; write hf://org/name")
        return repo_id
    if os.path.exists(name) or not _HUB_ID.match(name) or name.endswith(_FILE_SUFFIXES):
        return None
    return name


def split_hub_options(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Remove the huggingface_hub options from `kwargs` (in place) and return them."""
    return {key: kwargs.pop(key) for key in HUB_OPTIONS if key in kwargs}


def is_preset_name(name: str) -> bool:
    """Whether `name` is a bare architecture name (`cvt-13`, `cvt-13-384`) and no local path: no weights behind it."""
    from .config import preset_key

    return "/" not in name and preset_key(name) is not None and not os.path.exists(name)


def _preset_refusal(name: str) -> Optional[str]:
    if not is_preset_name(name):
        return None
    return (f"{name}: is a preset, an architecture without weights. For random weights build the model from "
            f"CvtConfig.from_preset({name!r}); for the released weights load the hub repository "
            f"'microsoft/{name.lower()}'")


def resolve_pretrained(name_or_path: str | os.PathLike, **hub_options: Any) -> str:
    """A local folder for `name_or_path`: the path itself, or a snapshot of the hub repository it names holding
    config.json, preprocessor_config.json (when the repository has one) and one set of weights."""
    name = os.fspath(name_or_path)
    unknown = set(hub_options) - set(HUB_OPTIONS)
    if unknown:
        raise TypeError(f"unknown hub option(s) {sorted(unknown)}; accepted: {list(HUB_OPTIONS)}")
    repo_id = hub_repo_id(name)
    if repo_id is None:
        refusal = _preset_refusal(name)
        if refusal:
            raise CheckpointError(refusal)
        return name
    return download_snapshot(repo_id, name, **hub_options)


def resolve_file(name_or_path: str | os.PathLike, filename: str, **hub_options: Any) -> Optional[str]:
    """One file of a local folder or hub repository (`preprocessor_config.json`, say), or None when it has none."""
    name = os.fspath(name_or_path)
    repo_id = hub_repo_id(name)
    if repo_id is None:
        path = os.path.join(name, filename) if os.path.isdir(name) else name
        return path if os.path.isfile(path) else None
    hub = _import_hub(name)
    try:
        return hub.hf_hub_download(repo_id, filename, **hub_options)
    except Exception as exc:
        if "EntryNotFoundError" in {cls.__name__ for cls in type(exc).__mro__}:
            return None
        raise HubError(f"{name}: could not fetch {filename} from the hub repository {repo_id} "
                       f"({_reason(exc)}); {_advice(repo_id)}") from None


def download_snapshot(repo_id: str, name: Optional[str] = None, **hub_options: Any) -> str:
    """A local snapshot of `repo_id` (through huggingface_hub's cache) with config.json and the first weight-file
    group the repository holds."""
    name = name or repo_id
    hub = _import_hub(name)
    last_error = None
    for patterns in WEIGHT_FILE_GROUPS:
        try:
            folder = hub.snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, PREPROCESSOR_CONFIG_NAME, *patterns],
                                           **hub_options)
        except Exception as exc:  # connection errors, offline mode, unknown or gated repository, bad revision, ...
            last_error = exc
            break
        present = os.listdir(folder)
        if CONFIG_NAME in present and any(fnmatch.fnmatch(f, p) for f in present for p in patterns):
            return folder
    raise HubError(f"{name}: is not a local path and could not be fetched from the hub repository {repo_id} "
                   f"({_reason(last_error)}); {_advice(repo_id)}")


def push_to_hub(directory: str, repo_id: str, token: Optional[str] = None, private: Optional[bool] = None,
                commit_message: Optional[str] = None, revision: Optional[str] = None) -> str:
    """Upload the files of `directory` to the hub repository `repo_id` (created if needed); returns its URL."""
    hub = _import_hub(repo_id)
    api = hub.HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=directory, repo_id=repo_id, revision=revision,
                      commit_message=commit_message or "Upload CvT checkpoint")
    return str(url)


def _import_hub(name: str):
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(f"{name}: is not a local path, and reaching the model hub needs huggingface_hub (pip install "
                       f"huggingface_hub)") from None
    return huggingface_hub


def _advice(repo_id: str) -> str:
    local = repo_id.split("/")[-1]
    return (f"download it where the network allows (e.g. `huggingface-cli download {repo_id} --local-dir {local}`) "
            f"and pass the local directory instead")


def _reason(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "the repository holds no CvT weights (safetensors, pytorch_model.bin or tf_model.h5)"
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "OfflineModeIsEnabled" in names or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return "HF_HUB_OFFLINE is set and no copy is cached"
    if "RepositoryNotFoundError" in names or "GatedRepoError" in names:
        return "no such repository, or it needs a login (token=)"
    if "RevisionNotFoundError" in names:
        return "no such revision"
    if "LocalEntryNotFoundError" in names or "ConnectionError" in names or "Timeout" in names:
        return "no network connection, and no copy is cached"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160] + '...' if len(text) > 160 else text}"
