"""The losses of `CvtForImageClassification` (transformers' three problem types, with Keras' sample-weight rule)
and the check of class labels that `cvt_torch.training` shares."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# F.cross_entropy's default ignore_index: a label that adds nothing to the loss (transformers' padding convention)
IGNORE_INDEX = -100


def check_class_labels(labels: torch.Tensor, num_labels: int) -> None:
    """Raise `ValueError` unless every label is a class index in [0, num_labels) or `IGNORE_INDEX`, instead of an
    IndexError on CPU. One reduction; skipped while tracing, scripting, compiling or exporting, where the values are
    not known. On an accelerator the check is queued with the kernels (no host sync per step), so a bad label
    surfaces as a device-side assert carrying the same message."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() or labels.numel() == 0:
        return
    invalid = ((labels < 0) | (labels >= num_labels)) & (labels != IGNORE_INDEX)
    if labels.device.type != "cpu":
        torch._assert_async(~invalid.any(), f"labels must be class indices in [0, num_labels={num_labels})")
        return
    if bool(invalid.any()):
        bad = labels[invalid][0].item()
        raise ValueError(f"labels must be class indices in [0, num_labels={num_labels}); got {bad}")


def weighted_mean(per_sample: torch.Tensor, sample_weight, counted: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum(w * loss) / n in float32, n being the number of samples that are `counted` (all by default): Keras'
    `sum_over_batch_size` rule for its compiled losses, which the Keras model's own loss follows too; 0 when n is 0.
    In the dtype of `per_sample`."""
    weights = torch.as_tensor(sample_weight, device=per_sample.device).reshape(-1).to(torch.float32)
    if weights.numel() != per_sample.numel():
        raise ValueError(f"sample_weight must hold one weight per sample: got {weights.numel()} weights for "
                         f"{per_sample.numel()} samples")
    count = torch.tensor(float(per_sample.numel()), device=per_sample.device)
    if counted is not None:
        weights = weights * counted.to(torch.float32)
        count = counted.to(torch.float32).sum()
    total = (per_sample.to(torch.float32) * weights).sum()
    has_samples = count != 0
    loss = torch.where(has_samples, total / torch.where(has_samples, count, 1.0), 0.0)
    return loss.to(per_sample.dtype)


def classification_loss(problem_type: str, labels: torch.Tensor, logits: torch.Tensor, num_labels: int,
                        sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """transformers' loss for `problem_type`: MSE ("regression"), cross-entropy ignoring label `IGNORE_INDEX`
    ("single_label_classification") or BCE with logits ("multi_label_classification"), each a mean over the
    batch; with `sample_weight`, `weighted_mean`'s rule."""
    if problem_type == "regression":
        labels = labels.to(logits.dtype)
        if sample_weight is None:
            if num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if num_labels == 1:
            per_sample = F.mse_loss(logits.reshape(-1), labels.reshape(-1), reduction="none")
        else:
            per_sample = F.mse_loss(logits, labels, reduction="none").mean(dim=-1)
        return weighted_mean(per_sample, sample_weight)
    if problem_type == "single_label_classification":
        labels = labels.reshape(-1).long()
        check_class_labels(labels, num_labels)
        if sample_weight is None:
            return F.cross_entropy(logits.view(-1, num_labels), labels)
        per_sample = F.cross_entropy(logits.view(-1, num_labels), labels, reduction="none")
        return weighted_mean(per_sample, sample_weight, counted=labels != IGNORE_INDEX)
    labels = labels.to(logits.dtype)
    if sample_weight is None:
        return F.binary_cross_entropy_with_logits(logits, labels)
    per_sample = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=-1)
    return weighted_mean(per_sample, sample_weight)
