"""The training-curve plot of `cvt train`: loss and accuracy per epoch (matplotlib, drawn off-screen)."""

from __future__ import annotations

from typing import Dict, List, Sequence

def plot_history(history: Sequence[Dict[str, float]], path: str, title: str = "") -> str:
    """Loss (left) and accuracy (right) per epoch, training and validation, as a PNG at `path`. Needs matplotlib
    (drawn off-screen, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    epochs = [int(r["epoch"]) for r in history]
    figure = Figure(figsize=(10, 4), dpi=100)
    for position, (metric, label) in enumerate((("loss", "cross-entropy loss"), ("accuracy", "top-1 accuracy"))):
        axes = figure.add_subplot(1, 2, position + 1)
        for split, style in (("train", "-o"), ("val", "-s")):
            values: List[float] = [r.get(f"{split}_{metric}") for r in history]
            if any(v is not None for v in values):
                points = [(e, v) for e, v in zip(epochs, values) if v is not None]
                axes.plot([p[0] for p in points], [p[1] for p in points], style, markersize=3,
                          label="training" if split == "train" else "validation")
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
        if metric == "accuracy":
            axes.set_ylim(top=1.0)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    return path
