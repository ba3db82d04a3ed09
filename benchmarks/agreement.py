"""bf16 against fp32 on real photos: views of the scikit-image sample photos and how well the top-1 survives.

With random weights the 1000-class logits carry no meaning and many top-1 margins are tiny, so besides the top-1
agreement on that head `agreement_stats` reports the logit error, the fp32 margins, the share of decisive images,
and top-1 agreement of a retrieval head whose classes are the photos (which photo a view comes from).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np


def photo_views(max_views: int, seed: int = 0):
    """~`max_views` views of the scikit-image sample photos: the photo itself, its mirror image and random crops
    (60-100% of each side), preprocessed by cvt_core.CvtImageProcessor. Returns (pixels, source photo index,
    names); the first view of every photo is the photo itself."""
    import skimage.data
    from PIL import Image

    from cvt_core import CvtImageProcessor

    names = ["astronaut", "chelsea", "coffee", "rocket", "cat", "camera", "coins", "moon", "page", "clock",
             "hubble_deep_field", "immunohistochemistry", "brick", "grass", "gravel", "text", "horse", "logo",
             "colorwheel", "retina", "eagle", "motorcycle"]
    photos, used = [], []
    for name in names:
        try:
            if name == "motorcycle":
                image = skimage.data.stereo_motorcycle()[0]
            else:
                image = getattr(skimage.data, name)()
        except Exception:  # not bundled with this scikit-image and no network: skip it
            continue
        image = np.asarray(image)
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.dtype != np.uint8:
            image = (255 * (image - image.min()) / max(1e-9, float(image.max() - image.min()))).astype(np.uint8)
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        photos.append(Image.fromarray(image[..., :3]).convert("RGB"))
        used.append(name)
    rng = np.random.default_rng(seed)
    photos, used = photos[:max(1, max_views // 2)], used[:max(1, max_views // 2)]  # at least 2 views per photo
    per_photo = max(2, -(-max_views // max(1, len(photos))))
    views, sources = [], []
    for index, photo in enumerate(photos):
        width, height = photo.size
        for v in range(per_photo):
            if v == 0:
                view = photo
            elif v == 1:
                view = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            else:
                fw, fh = rng.uniform(0.6, 1.0, size=2)
                cw, ch = max(32, int(width * fw)), max(32, int(height * fh))
                x0, y0 = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
                view = photo.crop((x0, y0, x0 + cw, y0 + ch))
                if rng.random() < 0.5:
                    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            views.append(view)
            sources.append(index)
    pixels = CvtImageProcessor()(views, return_tensors="np")["pixel_values"].astype(np.float32)
    return pixels, np.asarray(sources), used


def agreement_stats(reference: np.ndarray, candidate: np.ndarray, sources: np.ndarray) -> Dict[str, float]:
    """Top-1 agreement of `candidate` logits with the float32 `reference`, on the random 1000-class head and on a
    retrieval head (cosine similarity of each view's logits to the float32 logits of every source photo, whose
    classes are the photos), with the margins that decide how robust that agreement is."""
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    top2 = np.sort(reference, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    error = np.abs(candidate - reference).max(axis=1)
    first = np.array([np.flatnonzero(sources == s)[0] for s in range(sources.max() + 1)])

    def retrieval(logits):
        unit = logits / np.linalg.norm(logits, axis=1, keepdims=True)
        protos = reference[first] / np.linalg.norm(reference[first], axis=1, keepdims=True)
        return unit @ protos.T

    ref_ret, cand_ret = retrieval(reference), retrieval(candidate)
    ret_sorted = np.sort(ref_ret, axis=1)
    return {
        "images": int(len(reference)),
        "top1_agreement": float(np.mean(reference.argmax(1) == candidate.argmax(1))),
        "fp32_margin_median": float(np.median(margin)),
        "fp32_margin_p10": float(np.percentile(margin, 10)),
        "max_abs_logit_diff_median": float(np.median(error)),
        "max_abs_logit_diff_max": float(error.max()),
        "decisive_fraction": float(np.mean(margin > 2 * error)),
        "retrieval_top1_agreement": float(np.mean(ref_ret.argmax(1) == cand_ret.argmax(1))),
        "retrieval_accuracy_fp32": float(np.mean(ref_ret.argmax(1) == sources)),
        "retrieval_accuracy_candidate": float(np.mean(cand_ret.argmax(1) == sources)),
        "retrieval_margin_median": float(np.median(ret_sorted[:, -1] - ret_sorted[:, -2])),
    }


def photo_agreement(workers: Dict[str, Any], num_photos: int, workdir: str, log) -> Dict[str, Any]:
    """Real photos through the float32 and bfloat16 models of each implementation (`workers`: kind -> Worker);
    returns the photos used, the number of views and `agreement_stats` of each bf16 variant."""
    try:
        pixels, sources, names = photo_views(num_photos)
    except Exception as exc:
        log(f"no real-photo check: {exc}")
        return {"error": str(exc)}
    path = os.path.join(workdir, "photos.npy")
    np.save(path, pixels)
    log(f"bf16 agreement on {len(pixels)} views of {len(names)} scikit-image photos")
    pairs = [("hf-pt", "fp32", "hf-pt", "bf16"), ("hf-pt", "fp32", "hf-pt", "autocast"),
             ("ours-pt", "fp32", "ours-pt", "bf16"), ("ours-pt", "fp32", "ours-pt", "autocast"),
             ("ours-pt-fast", "fp32", "ours-pt-fast", "bf16"), ("ours-pt-fast", "fp32", "ours-pt-fast", "autocast"),
             ("hf-tf", "fp32", "hf-tf-bf16", "bf16"), ("ours-keras", "fp32", "ours-keras-bf16", "bf16")]
    cache: Dict[str, Optional[np.ndarray]] = {}

    def logits(kind, variant):
        key = f"{kind}:{variant}"
        if key not in cache:
            cache[key] = None
            if kind in workers and not workers[kind].error:
                reply = workers[kind].call(cmd="logits", variant=variant, pixels=path)
                if "logits" in reply:
                    cache[key] = np.load(reply["logits"])
                workers[kind].call(cmd="release")
        return cache[key]

    out: Dict[str, Any] = {"photos": names, "views": int(len(pixels))}
    for ref_kind, ref_variant, kind, variant in pairs:
        ref, cand = logits(ref_kind, ref_variant), logits(kind, variant)
        if ref is None or cand is None:
            continue
        stats = agreement_stats(ref, cand, sources)
        out[f"{kind}:{variant}"] = stats
        log(f"    {kind}:{variant:<9s} top-1 agreement {stats['top1_agreement'] * 100:5.1f}% (retrieval head "
            f"{stats['retrieval_top1_agreement'] * 100:5.1f}%), max |dlogit| median "
            f"{stats['max_abs_logit_diff_median']:.3f}, fp32 top-1 margin median {stats['fp32_margin_median']:.3f}")
    return out
