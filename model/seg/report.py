"""PNG report of a trained ADClick-Seg version: pixel precision-recall curve (model vs the unsupervised
residual map when given) and a few overlays of prediction vs label."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import precision_recall_curve

logger = logging.getLogger(__name__)


@dataclass
class Overlay:
    image: np.ndarray | None  # (H, W, 3) uint8, or None (then the map is drawn on grey)
    prob: np.ndarray  # (H, W) float predicted defect probability
    label: np.ndarray  # (H, W) bool labelled defect
    pred: np.ndarray  # (H, W) bool thresholded prediction
    title: str = ""


def _pr(ax, maps: list[np.ndarray], masks: list[np.ndarray], name: str, step: int = 4) -> None:
    scores = np.concatenate([m[::step, ::step].ravel() for m in maps])
    labels = np.concatenate([k[::step, ::step].ravel() for k in masks])
    if not labels.any() or labels.all():
        return
    prec, rec, _ = precision_recall_curve(labels, scores)
    ax.plot(rec, prec, label=name)


def write_report(path: str | Path, title: str, maps: list[np.ndarray], masks: list[np.ndarray],
                 overlays: list[Overlay], baseline: list[np.ndarray] | None = None,
                 figures: dict[str, float] | None = None) -> Path:
    """Write the PNG to `path` (its folder must exist). `maps`/`masks`: the evaluated (H, W) maps and labels."""
    path = Path(path)
    n = 1 + min(len(overlays), 4)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
    ax = axes[0, 0]
    if maps:
        _pr(ax, maps, masks, "ADClick-Seg")
        if baseline:
            _pr(ax, baseline, masks, "unsupervised")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="pixel PR")
    if figures:
        text = "\n".join(f"{k} {v:.3f}" for k, v in figures.items() if isinstance(v, float))
        ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=8, va="bottom")
    if ax.lines:
        ax.legend(loc="upper right", fontsize=8)
    for ov, ax in zip(overlays[:4], axes[0, 1:]):
        base = ov.image if ov.image is not None else np.full((*ov.prob.shape, 3), 128, np.uint8)
        ax.imshow(base)
        ax.imshow(ov.prob, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        if ov.label.any():
            ax.contour(ov.label, levels=[0.5], colors="lime", linewidths=1.0)
        if ov.pred.any():
            ax.contour(ov.pred, levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(ov.title or "green: label, red: prediction", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    logger.info("report written to %s", path)
    return path
