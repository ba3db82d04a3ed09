"""Shared by the tests/test_conversion_*.py modules: running the command in-process, small checkpoints, an
independent original-naming rule, h5 structure dumps and a transformers-TF child process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from typing import Dict, List, Tuple

import numpy as np

TINY = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], image_size=64)
# enough layers that the `cvt` group's weight_names attribute passes HDF5's 64 KiB limit and is split
# the smallest CvT with a classifier that the converter tests use: three stages, cls token on the last
TINY_CONFIG = dict(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 2], num_labels=3, image_size=32)
TINY_DEEP = dict(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 2, 11], image_size=32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str) -> Tuple[int, str, str]:
    """`cvt ARGS` in-process: (exit status, stdout, stderr)."""
    from cvt_cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, out: str, err: str, *fragments) -> None:
    """`cvt` refused its input the promised way: exit 2 and one line on stderr holding every fragment."""
    assert code == 2, (code, out, err)
    assert err.startswith("cvt: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert str(fragment) in err, (fragment, err)


def make_tiny_checkpoint(root):
    """In `root`: a random TINY_CONFIG checkpoint in transformers' layout (`src/`) and its config file
    (`tiny.json`); returns `root`."""
    import json

    from conversion.pipeline import make_random_checkpoint
    from cvt_core import CvtConfig

    make_random_checkpoint(str(root / "src"), CvtConfig(**TINY_CONFIG), seed=1)
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    return root


def leftovers(parent) -> List[str]:
    """Temporary folders the converter may have left beside its destination."""
    return sorted(n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n)


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def hf_to_original(name: str) -> str:
    """transformers' PyTorch name -> microsoft/CvT's, from the mapping in cvt-facts.md section 3 (written here
    independently of cvt_core's table, so a slip in the table shows)."""
    name = re.sub(r"^cvt\.", "", name)
    if name.startswith("layernorm."):
        return "norm." + name[len("layernorm."):]
    if name.startswith("classifier."):
        return "head." + name[len("classifier."):]
    m = re.match(r"encoder\.stages\.(\d+)\.(.*)$", name)
    stage, rest = m.group(1), m.group(2)
    pairs = [
        ("embedding.convolution_embeddings.projection.", "patch_embed.proj."),
        ("embedding.convolution_embeddings.normalization.", "patch_embed.norm."),
    ]
    for a, b in pairs:
        if rest.startswith(a):
            return f"stage{stage}.{b}{rest[len(a):]}"
    if rest == "cls_token":
        return f"stage{stage}.cls_token"
    m = re.match(r"layers\.(\d+)\.(.*)$", rest)
    block, rest = m.group(1), m.group(2)
    for role, short in (("query", "q"), ("key", "k"), ("value", "v")):
        rest = rest.replace(f"attention.attention.convolution_projection_{role}.convolution_projection.convolution.",
                            f"attn.conv_proj_{short}.conv.")
        rest = rest.replace(f"attention.attention.convolution_projection_{role}.convolution_projection.normalization.",
                            f"attn.conv_proj_{short}.bn.")
        rest = rest.replace(f"attention.attention.projection_{role}.", f"attn.proj_{short}.")
    rest = rest.replace("attention.output.dense.", "attn.proj.")
    rest = rest.replace("intermediate.dense.", "mlp.fc1.").replace("output.dense.", "mlp.fc2.")
    rest = rest.replace("layernorm_before.", "norm1.").replace("layernorm_after.", "norm2.")
    return f"stage{stage}.blocks.{block}.{rest}"


def quick_gelu_reference(model):
    """transformers' PyTorch CvT with every GELU replaced by QuickGELU x*sigmoid(1.702x): the original code's
    computation (cvt-facts.md section 1, verified there)."""
    import torch
    from torch import nn

    class QuickGELU(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(1.702 * x)

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.GELU):
                setattr(module, child_name, QuickGELU())
    return model


def h5_dump(path: str) -> Dict[str, object]:
    """Every attribute (with its HDF5 string kind) and dataset (dtype, shape, storage, bytes) of an h5 file."""
    import h5py

    out: Dict[str, object] = {}

    def attrs(obj):
        result = {}
        for key in obj.attrs:
            kind = obj.attrs.get_id(key).get_type()
            value = obj.attrs[key]
            value = value if isinstance(value, str) else np.asarray(value).tolist()
            result[key] = (type(kind).__name__, getattr(kind, "is_variable_str", lambda: None)(), value)
        return result

    with h5py.File(path, "r") as f:
        out["/"] = attrs(f)
        out["/groups"] = list(f.keys())

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.dtype.str, obj.shape, obj.chunks, obj.compression, obj[()].tobytes())
            else:
                out[name] = attrs(obj)

        f.visititems(visit)
    return out


_HF_TF_CHILD = r"""
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tf_keras
import transformers
for job in json.loads(sys.argv[1]):
    tf_keras.backend.clear_session()  # fresh layer-name counters: each model gets its plain scope name
    cls = transformers.TFCvtForImageClassification if job["with_head"] else transformers.TFCvtModel
    if job["kind"] == "save":  # transformers' own PyTorch -> tf_model.h5
        cls.from_pretrained(job["checkpoint"], from_pt=True).save_pretrained(job["output"])
        continue
    kwargs = {"use_safetensors": job["use_safetensors"]} if "use_safetensors" in job else {}
    model = cls.from_pretrained(job["checkpoint"], from_pt=False, **kwargs)  # our tf_model.h5
    x = np.load(job["pixel_values"])
    base = model.cvt(x, output_hidden_states=True, training=False)
    out = {f"hidden_states.{i}": h.numpy() for i, h in enumerate(base.hidden_states)}
    out["last_hidden_state"] = base.last_hidden_state.numpy()
    if base.cls_token_value is not None:
        out["cls_token_value"] = base.cls_token_value.numpy()
    if job["with_head"]:
        out["logits"] = model(x, training=False).logits.numpy()
    np.savez(job["output"], **out)
"""


def run_transformers_tf(jobs: list, timeout: int = 600) -> None:
    """transformers' TF CvT in ONE child process (Keras 2 stays out of the test process).

    Jobs: {"kind": "save", "checkpoint": PyTorch dir, "output": dir, "with_head"} -> transformers writes tf_model.h5;
    {"kind": "run", "checkpoint": dir with our tf_model.h5, "pixel_values": .npy, "output": .npz, "with_head",
    optional "use_safetensors"}.
    """
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", _HF_TF_CHILD, json.dumps(jobs)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"transformers TF child failed:\n{proc.stderr[-4000:]}")


def tree_listing(root) -> list:
    """Every path under `root` with each file's bytes (and each link's target): equal listings show that nothing
    under `root` changed."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs):
            found.append(os.path.relpath(os.path.join(folder, name), root) + "/")
        for name in sorted(files):
            path = os.path.join(folder, name)
            if os.path.islink(path):
                found.append((os.path.relpath(path, root), "->" + os.readlink(path)))
            else:
                with open(path, "rb") as f:
                    found.append((os.path.relpath(path, root), f.read()))
    return sorted(found, key=str)
