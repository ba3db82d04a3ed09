"""Model hub ids (`microsoft/cvt-13`): fetched with huggingface_hub when the network allows."""

from __future__ import annotations

import os
import re
from typing import Optional

from .errors import ConversionError, one_line

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Weight files in order of preference; the first pattern group that yields weights is used.
_PATTERN_GROUPS = (
    ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
    ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"],
    ["tf_model.h5"],
)


def looks_like_hub_id(src: str) -> bool:
    return not os.path.exists(src) and bool(_HUB_ID.match(src)) and not src.endswith((".json", ".h5", ".keras",
                                                                                       ".safetensors", ".bin", ".pth"))


def _advice(repo_id: str) -> str:
    local = repo_id.split("/")[-1]
    return (f"download it where the network allows (e.g. `huggingface-cli download {repo_id} --local-dir {local}`) "
            f"and pass the local directory instead")


def download(repo_id: str, revision: Optional[str] = None) -> str:
    """A local snapshot folder of `repo_id` holding config.json and one set of weights."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConversionError(repo_id, f"is not a local path, and fetching it from the model hub needs huggingface_hub "
                                       f"(pip install huggingface_hub); or {_advice(repo_id)}") from None
    last_error = None
    for patterns in _PATTERN_GROUPS:
        try:
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=["config.json", *patterns])
        except Exception as exc:  # connection errors, offline mode, unknown repo, gated repo, ...
            last_error = exc
            break
        names = set(os.listdir(folder))
        if "config.json" in names and names - {"config.json", ".gitattributes"}:
            return folder
    raise ConversionError(repo_id, f"is not a local path and could not be fetched from the model hub "
                                   f"({_reason(last_error)}); {_advice(repo_id)}")


def _reason(exc) -> str:
    if exc is None:
        return "the repository holds no CvT weights (safetensors, pytorch_model.bin or tf_model.h5)"
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "OfflineModeIsEnabled" in names or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return "HF_HUB_OFFLINE is set and no copy is cached"
    if "LocalEntryNotFoundError" in names or "ConnectionError" in names or "Timeout" in names:
        return "no network connection, and no copy is cached"
    if "RepositoryNotFoundError" in names or "GatedRepoError" in names:
        return "no such repository, or it needs a login"
    if "RevisionNotFoundError" in names:
        return "no such revision"
    text = one_line(str(exc))
    return f"{type(exc).__name__}: {text[:160] + '...' if len(text) > 160 else text}"
