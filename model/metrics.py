"""Pure evaluation metrics (numpy in, floats out).

Pixel metrics pool every pixel of every image given. AUROC and AP are exact (ties handled like
scikit-learn, which the tests compare against). Tens of millions of pixels are never argsorted: each
image's normal pixels are sorted once (`ImagePixels`) and the curves are evaluated only at the distinct
defect-pixel scores by binary search, which yields the same curves (see `Curves`); subsets of a
benchmark (per defect type) reuse the per-image preparation.

AU-PRO follows the MVTec AD evaluation: ground-truth regions are the 8-connected components of each
image's mask; at each threshold the PRO is the mean over all regions of the fraction of the region
above the threshold, the FPR is the fraction of all normal pixels above it; the PRO(FPR) curve
(anchored at (0, 0) and (1, 1)) is integrated with the trapezoid rule up to FPR = 0.3 (interpolated
there) and divided by 0.3.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

ArrayOrList = np.ndarray | Sequence[np.ndarray]
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _as_list(arrays: ArrayOrList) -> list[np.ndarray]:
    if isinstance(arrays, np.ndarray) and arrays.ndim == 2:
        return [arrays]
    return [np.asarray(a) for a in arrays]


@dataclass(frozen=True)
class ImagePixels:
    """One image reduced to what the pixel metrics need: its normal-pixel scores sorted ascending, its
    defect-pixel scores, and each defect pixel's weight 1/|region| (8-connected regions of this image)."""

    neg_sorted: np.ndarray  # (n_neg,) float32 ascending
    pos: np.ndarray  # (n_pos,) float32
    pos_weight: np.ndarray  # (n_pos,) float64
    n_regions: int

    @classmethod
    def from_map(cls, score: np.ndarray, mask: np.ndarray) -> ImagePixels:
        score = np.asarray(score, dtype=np.float32)
        mask = np.asarray(mask, dtype=bool)
        if score.shape != mask.shape:
            raise ValueError(f"score map {score.shape} and mask {mask.shape} differ")
        labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
        return cls(np.sort(score[~mask]), score[mask], 1.0 / sizes[labels[mask]], int(n))


@dataclass
class Curves:
    """Exact ROC / PRO curves reduced to the thresholds where defect pixels change.

    For each distinct defect-pixel score u (descending): fp_gt / fp_ge = normal pixels scoring > u / >= u,
    tp = defect pixels >= u, pro = sum over regions of the fraction covered at u. Between consecutive u
    only normal pixels move (y constant); at u, tied normal and defect pixels move together (one straight
    segment), so the points (fp_gt(u), y(previous u)), (fp_ge(u), y(u)) trace the full curve exactly.
    """

    fp_gt: np.ndarray
    fp_ge: np.ndarray
    tp: np.ndarray
    pro: np.ndarray
    n_pos: int
    n_neg: int
    n_regions: int

    def polyline(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Points (fpr, y) from (0, 0) to (1, 1), FPR non-decreasing."""
        xs = np.empty(2 * y.size + 2)
        ys = np.empty_like(xs)
        xs[0], ys[0], xs[-1], ys[-1] = 0.0, 0.0, 1.0, 1.0
        xs[1:-1:2], xs[2:-1:2] = self.fp_gt / self.n_neg, self.fp_ge / self.n_neg
        ys[1:-1:2], ys[2:-1:2] = np.r_[0.0, y[:-1]], y
        return xs, ys


def prepare(scores: ArrayOrList, masks: ArrayOrList) -> list[ImagePixels]:
    """Per-image preparation of (H, W) score maps and boolean masks (one map or a list)."""
    maps, gts = _as_list(scores), _as_list(masks)
    if len(maps) != len(gts):
        raise ValueError(f"{len(maps)} score maps but {len(gts)} masks")
    return [ImagePixels.from_map(s, m) for s, m in zip(maps, gts)]


def curves(images: Sequence[ImagePixels]) -> Curves:
    """Pool the pixels of `images` into exact curves."""
    pos = np.concatenate([im.pos for im in images])
    weight = np.concatenate([im.pos_weight for im in images])
    order = np.argsort(-pos, kind="stable")
    pos, weight = pos[order], weight[order]
    last = np.r_[np.flatnonzero(np.diff(pos)), pos.size - 1] if pos.size else np.zeros(0, dtype=np.int64)
    u = pos[last]
    n_neg = sum(im.neg_sorted.size for im in images)
    fp_ge = np.full(u.size, n_neg, dtype=np.int64)
    fp_gt = fp_ge.copy()
    for im in images:
        fp_ge -= np.searchsorted(im.neg_sorted, u, side="left")
        fp_gt -= np.searchsorted(im.neg_sorted, u, side="right")
    pro = np.cumsum(weight)[last] if pos.size else np.zeros(0)
    return Curves(fp_gt, fp_ge, last + 1, pro, int(pos.size), int(n_neg), sum(im.n_regions for im in images))


def _require_both_classes(c: Curves, what: str) -> None:
    if c.n_pos == 0 or c.n_neg == 0:
        raise ValueError(f"{what} needs both defect and normal pixels (got {c.n_pos} and {c.n_neg})")


def auroc_from_curves(c: Curves) -> float:
    _require_both_classes(c, "AUROC")
    fpr, tpr = c.polyline(c.tp / c.n_pos)
    return float(np.trapezoid(tpr, fpr))


def ap_from_curves(c: Curves) -> float:
    """Average precision as scikit-learn defines it: sum over thresholds of (R_n - R_{n-1}) * P_n."""
    _require_both_classes(c, "AP")
    precision = c.tp / (c.tp + c.fp_ge)
    return float(np.sum(np.diff(np.r_[0, c.tp]) / c.n_pos * precision))


def pro_curve(c: Curves) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) from (0, 0) to (1, 1), FPR non-decreasing."""
    if c.n_regions == 0 or c.n_neg == 0:
        raise ValueError("AU-PRO needs at least one defect region and one normal pixel")
    return c.polyline(np.minimum(c.pro / c.n_regions, 1.0))


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


def au_pro_from_curves(c: Curves, fpr_limit: float = 0.3) -> float:
    fpr, pro = pro_curve(c)
    return trapezoid_up_to(fpr, pro, fpr_limit) / fpr_limit


def pixel_auroc(scores: ArrayOrList, masks: ArrayOrList) -> float:
    return auroc_from_curves(curves(prepare(scores, masks)))


def pixel_ap(scores: ArrayOrList, masks: ArrayOrList) -> float:
    return ap_from_curves(curves(prepare(scores, masks)))


def au_pro(scores: ArrayOrList, masks: ArrayOrList, fpr_limit: float = 0.3) -> float:
    """MVTec AU-PRO; `scores`/`masks` are one (H, W) map or a list of per-image maps."""
    return au_pro_from_curves(curves(prepare(scores, masks)), fpr_limit)


def metrics_of(images: Sequence[ImagePixels], fpr_limit: float = 0.3) -> dict[str, float]:
    """pixel_auroc, pixel_ap and au_pro of prepared images (subsets of a benchmark reuse the preparation)."""
    c = curves(images)
    return {"pixel_auroc": auroc_from_curves(c), "pixel_ap": ap_from_curves(c),
            "au_pro": au_pro_from_curves(c, fpr_limit)}


def pixel_metrics(scores: ArrayOrList, masks: ArrayOrList, fpr_limit: float = 0.3) -> dict[str, float]:
    """pixel_auroc, pixel_ap and au_pro of score maps against masks (one map or a list)."""
    return metrics_of(prepare(scores, masks), fpr_limit)


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


def tolerant_counts(pred: np.ndarray, gt: np.ndarray, tol: int = 1) -> tuple[int, int, int, int]:
    """(predicted pixels within `tol` px of the ground truth, predicted pixels, ground-truth pixels within `tol` px
    of the prediction, ground-truth pixels): the counts of a boundary-tolerant pixel F1 (as the boundary F-measure
    of contour benchmarks, over whole masks). Polygon annotations of defects a few pixels wide are not exact to the
    pixel; with `tol` = 1 a one-pixel disagreement along the outline is not an error."""
    import cv2

    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {g.shape}")
    kernel = np.ones((2 * tol + 1, 2 * tol + 1), np.uint8)
    g_near = cv2.dilate(g.view(np.uint8), kernel) > 0
    p_near = cv2.dilate(p.view(np.uint8), kernel) > 0
    return (int(np.count_nonzero(p & g_near)), int(np.count_nonzero(p)), int(np.count_nonzero(g & p_near)),
            int(np.count_nonzero(g)))


def pooled_tolerant_f1(counts: Sequence[tuple[int, int, int, int]]) -> float:
    """The boundary-tolerant F1 pooled over images from their `tolerant_counts`."""
    ok_p, n_p, ok_g, n_g = (sum(c[i] for c in counts) for i in range(4))
    if n_g == 0 and n_p == 0:
        return float("nan")
    precision = ok_p / n_p if n_p else 0.0
    recall = ok_g / n_g if n_g else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


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
