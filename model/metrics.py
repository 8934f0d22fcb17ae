"""Pure evaluation metrics (numpy in, floats out).

Pixel metrics pool every pixel of every image given. AUROC and AP are exact (ties handled like
scikit-learn, which the tests compare against); they share one sort with AU-PRO so that a full
benchmark (tens of millions of pixels) sorts once per subset.

AU-PRO follows the MVTec AD evaluation: ground-truth regions are the 8-connected components of each
image's mask; at each threshold the PRO is the mean over all regions of the fraction of the region
above the threshold, the FPR is the fraction of all normal pixels above it; the PRO(FPR) curve
(anchored at (0, 0)) is integrated with the trapezoid rule up to FPR = 0.3 (interpolated there) and
divided by 0.3.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

ArrayOrList = Union[np.ndarray, Sequence[np.ndarray]]
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


@dataclass
class RankedCurves:
    """Cumulative counts at each distinct score, highest score first."""

    tp: np.ndarray  # positives with score >= threshold
    fp: np.ndarray  # negatives with score >= threshold
    pro: np.ndarray  # sum over regions of the covered fraction (only when regions were given)
    n_pos: int
    n_neg: int
    n_regions: int


def _flatten(arrays: ArrayOrList, dtype) -> np.ndarray:
    if isinstance(arrays, np.ndarray):
        return arrays.astype(dtype, copy=False).ravel()
    return np.concatenate([np.asarray(a).astype(dtype, copy=False).ravel() for a in arrays])


def _as_list(arrays: ArrayOrList) -> list[np.ndarray]:
    if isinstance(arrays, np.ndarray) and arrays.ndim == 2:
        return [arrays]
    return [np.asarray(a) for a in arrays]


def region_weights(masks: ArrayOrList) -> tuple[np.ndarray, int]:
    """Per-pixel weight 1/|region| for defect pixels (8-connected regions, per image), 0 elsewhere."""
    weights, n_regions = [], 0
    for mask in _as_list(masks):
        labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT_CONNECTED)
        sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
        inv = np.zeros(n + 1, dtype=np.float64)
        inv[1:] = 1.0 / sizes[1:]
        weights.append(inv[labels].ravel())
        n_regions += n
    return np.concatenate(weights), n_regions


def ranked_curves(scores: ArrayOrList, masks: ArrayOrList, with_pro: bool = True) -> RankedCurves:
    """Sort all pixels once and accumulate TP, FP and (optionally) region overlap per distinct score."""
    s = _flatten(scores, np.float32)
    y = _flatten(masks, bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size} px) and masks ({y.size} px) differ in size")
    order = np.argsort(s)[::-1]
    s_sorted = s[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]  # last index of each tie group
    del s_sorted
    y_sorted = y[order]
    tp = np.cumsum(y_sorted, dtype=np.int64)[last]
    fp = (last + 1) - tp
    pro, n_regions = np.zeros(0), 0
    if with_pro:
        w, n_regions = region_weights(masks)
        pro = np.cumsum(w[order])[last]
    return RankedCurves(tp, fp, pro, int(y.sum()), int(y.size - y.sum()), n_regions)


def _require_both_classes(c: RankedCurves, what: str) -> None:
    if c.n_pos == 0 or c.n_neg == 0:
        raise ValueError(f"{what} needs both defect and normal pixels (got {c.n_pos} and {c.n_neg})")


def auroc_from_curves(c: RankedCurves) -> float:
    _require_both_classes(c, "AUROC")
    tpr = np.r_[0.0, c.tp / c.n_pos]
    fpr = np.r_[0.0, c.fp / c.n_neg]
    return float(np.trapezoid(tpr, fpr))


def ap_from_curves(c: RankedCurves) -> float:
    """Average precision as scikit-learn defines it: sum over thresholds of (R_n - R_{n-1}) * P_n."""
    _require_both_classes(c, "AP")
    precision = c.tp / (c.tp + c.fp)
    recall = c.tp / c.n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pro_curve(c: RankedCurves) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) from (0, 0) to (1, 1), FPR non-decreasing."""
    if c.n_regions == 0 or c.n_neg == 0:
        raise ValueError("AU-PRO needs at least one defect region and one normal pixel")
    fpr = np.r_[0.0, c.fp / c.n_neg, 1.0]
    pro = np.r_[0.0, c.pro / c.n_regions, 1.0]
    return np.clip(fpr, 0.0, 1.0), np.clip(pro, 0.0, 1.0)


def trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under y(x) for x in [x[0], x_max], y linearly interpolated at x_max; x sorted ascending."""
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max:
        nxt = int(np.searchsorted(x, x_max, side="right"))
        if nxt < x.size:  # interpolate between the last point inside and the first point beyond
            x0, x1, y0, y1 = xs[-1], x[nxt], ys[-1], y[nxt]
            y_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            xs, ys = np.r_[xs, x_max], np.r_[ys, y_max]
    return float(np.trapezoid(ys, xs))


def au_pro_from_curves(c: RankedCurves, fpr_limit: float = 0.3) -> float:
    fpr, pro = pro_curve(c)
    return trapezoid_up_to(fpr, pro, fpr_limit) / fpr_limit


def pixel_auroc(scores: ArrayOrList, masks: ArrayOrList) -> float:
    return auroc_from_curves(ranked_curves(scores, masks, with_pro=False))


def pixel_ap(scores: ArrayOrList, masks: ArrayOrList) -> float:
    return ap_from_curves(ranked_curves(scores, masks, with_pro=False))


def au_pro(scores: ArrayOrList, masks: ArrayOrList, fpr_limit: float = 0.3) -> float:
    """MVTec AU-PRO; `scores`/`masks` are one (H, W) map or a list of per-image maps."""
    return au_pro_from_curves(ranked_curves(scores, masks), fpr_limit)


def pixel_metrics(scores: ArrayOrList, masks: ArrayOrList, fpr_limit: float = 0.3) -> dict[str, float]:
    """pixel_auroc, pixel_ap and au_pro from one sort of the pooled pixels."""
    c = ranked_curves(scores, masks)
    return {
        "pixel_auroc": auroc_from_curves(c),
        "pixel_ap": ap_from_curves(c),
        "au_pro": au_pro_from_curves(c, fpr_limit),
    }


def image_auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """AUROC of image scores (label True = defective); NaN when only one class is present."""
    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {g.shape}")
    union = np.logical_or(p, g).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


def _iou_after(ious: Sequence[float], k: int) -> float:
    """IoU after the k-th click; a run that stopped early (target reached) keeps its last IoU."""
    if k < 1:
        raise ValueError("k counts clicks from 1")
    if len(ious) == 0:
        raise ValueError("empty IoU sequence")
    return float(ious[min(k, len(ious)) - 1])


def miou_at_k(per_image_ious: Sequence[Sequence[float]], k: int) -> float:
    """Mean over images of the IoU after the k-th click."""
    return float(np.mean([_iou_after(ious, k) for ious in per_image_ious]))


def noc(ious: Sequence[float], thr: float, max_clicks: int = 20) -> int:
    """Number of clicks needed to reach IoU >= thr (1-based); max_clicks when never reached."""
    for k, value in enumerate(ious[:max_clicks], start=1):
        if value >= thr:
            return k
    return max_clicks


def mean_noc(per_image_ious: Sequence[Sequence[float]], thr: float, max_clicks: int = 20) -> float:
    return float(np.mean([noc(ious, thr, max_clicks) for ious in per_image_ious]))
