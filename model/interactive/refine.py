"""Full-resolution boundary refinement of an interactive soft map.

Why: the residual engine compares images on a stride-8 grid of a 512 px view (about 12 px per cell on a
600x800 image). Small defects span two or three cells, so any map built on that grid is a blob: on the tire
test masks, a perfect grid-level prediction upsampled bilinearly reaches a mean IoU of only 0.74, and 13 % of
the images could ever reach IoU 0.85. The image itself has the edges the grid lacks.

Two methods (`RefineConfig.method`):
- "guided" (default): the guided filter of He, Sun and Tang (ECCV 2010) with the grey image as guide, on a crop
  around the map's region (`low` < prob): in every `radius` px window the map is fitted as a linear function of
  the image intensity, so its edges follow image edges where the image has them (variance >> `eps`) and it is
  only smoothed where the image is flat. It cannot collapse or move a region far. The filtered map is the new
  soft map (prob > 0.49 = mask).
- "grabcut": OpenCV's GrabCut on a trimap from the mask: pixels deeper than `band` px inside (or prob > `core`)
  sure defect, the rest of the mask probable defect, a `band` px ring probable normal, the rest sure normal,
  click disks of `seed_radius` px hard seeds; a result under `min_keep` of the mask's area (a region GrabCut
  cannot tell apart by colour collapses) is discarded. GrabCut's defect pixels get 0.5 + 0.5 prob, the others
  0.49 prob, so the ranking inside each side is kept.
Crops are the region's bounding box grown by `margin` px; crops over `max_pixels` are left as they are. A box
keeps everything inside it.

Choice of the default: on synthetic defects over the tire *validation* normals, both helped (GrabCut most); on
the even-indexed half of the tire test images ("dev"), GrabCut hurt the first clicks (it shrinks low-contrast
real defects) while the guided filter helped at every click count; figures in docs/ADCLICK.md, with the other
half of the test images reported separately as held out from this choice.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from model.interactive.clicks import distance_to_other_label
from model.types import AnomalyResult, Box, Click, ClickResult, ImageState, Predictor, box_mask

logger = logging.getLogger(__name__)

THRESHOLD = 0.49


@dataclass(frozen=True)
class RefineConfig:
    method: str = "guided"  # guided | grabcut
    radius: int = 4  # guided: px half-size of the local windows
    eps: float = 1e-3  # guided: regulariser on intensities in [0, 1]; larger = smoother, fewer image edges
    low: float = 0.2  # guided: the crop covers the pixels above this prob
    band: int = 6  # grabcut: px the mask's boundary may move (in or out); deeper inside is sure defect
    core: float = 0.8  # grabcut: prob above this is sure defect too
    min_keep: float = 0.5  # grabcut: a refined mask under this share of the mask's area is discarded
    seed_radius: int = 3  # grabcut: px, click disks that are hard seeds
    iterations: int = 3  # grabcut
    margin: int = 24  # px of context around the region
    max_pixels: int = 250_000  # larger crops are left as they are (the grid is fine enough for big regions)
    respect_clicks: bool = True  # a click whose pixel ends up with the other label gets a disk of its own
    click_radius: float = 8.0  # px, the largest such disk

    def __post_init__(self) -> None:
        if self.method not in ("guided", "grabcut"):
            raise ValueError(f"refinement method must be guided or grabcut, got {self.method!r}")


def crop_box(region: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(region)
    H, W = region.shape
    return (max(0, int(ys.min()) - margin), min(H, int(ys.max()) + margin + 1),
            max(0, int(xs.min()) - margin), min(W, int(xs.max()) + margin + 1))


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter, grey guide: float32 (h, w) arrays, box windows of (2 radius + 1) px."""
    k = (2 * radius + 1, 2 * radius + 1)

    def box(a: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(a, -1, k, borderType=cv2.BORDER_REFLECT)

    mean_i, mean_p = box(guide), box(src)
    a = (box(guide * src) - mean_i * mean_p) / (box(guide * guide) - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    return box(a) * guide + box(b)


def refine_prob(image: np.ndarray, prob: np.ndarray, clicks: Sequence[Click], box: Box | None = None,
                cfg: RefineConfig = RefineConfig()) -> np.ndarray:
    """Refined (H, W) float32 soft map; `prob` unchanged (a copy) when there is nothing to refine."""
    return refine_fit(image, prob, clicks, box, cfg)[0]


Fit = tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]  # GrabCut's crop (y0, y1, x0, x1), colour models


def refine_fit(image: np.ndarray, prob: np.ndarray, clicks: Sequence[Click], box: Box | None = None,
               cfg: RefineConfig = RefineConfig()) -> tuple[np.ndarray, Fit | None]:
    """`refine_prob`'s map, and for the "grabcut" method the fit it came from (its crop and GrabCut's normal and
    defect colour models; None where nothing was refined, and always for "guided")."""
    H, W = prob.shape
    if image.shape[:2] != (H, W):
        raise ValueError(f"image {image.shape[:2]} and map {(H, W)} differ")
    mask = prob > THRESHOLD
    if not mask.any():
        return prob.astype(np.float32, copy=True), None
    region = (prob > min(cfg.low, THRESHOLD)) if cfg.method == "guided" else mask
    y0, y1, x0, x1 = crop_box(region, cfg.margin + (cfg.band if cfg.method == "grabcut" else 0))
    if (y1 - y0) * (x1 - x0) > cfg.max_pixels:
        return prob.astype(np.float32, copy=True), None
    crop = np.clip(prob[y0:y1, x0:x1], 0.0, 1.0).astype(np.float32)
    inside = None if box is None else box_mask(box, (H, W))[y0:y1, x0:x1]
    fit = None
    if cfg.method == "guided":
        grey = cv2.cvtColor(np.ascontiguousarray(image[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY).astype(np.float32)
        new = np.clip(guided_filter(grey / 255.0, crop, cfg.radius, cfg.eps), 0.0, 1.0)
        if inside is not None:
            new = np.where(inside, new, 0.0)
    else:
        cut = grabcut_crop(np.ascontiguousarray(image[y0:y1, x0:x1]), crop, mask[y0:y1, x0:x1], clicks,
                           (x0, y0), inside, cfg)
        if cut is None:
            return prob.astype(np.float32, copy=True), None
        fg, bgd, fgd = cut
        fit = ((y0, y1, x0, x1), bgd, fgd)
        new = np.where(fg, 0.5 + 0.5 * crop, THRESHOLD * crop)
    out = prob.astype(np.float32, copy=True)
    out[y0:y1, x0:x1] = new
    return out, fit


def grabcut_crop(image: np.ndarray, crop: np.ndarray, mask: np.ndarray, clicks: Sequence[Click],
                 origin: tuple[int, int], inside: np.ndarray | None,
                 cfg: RefineConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(GrabCut's defect pixels of the crop, its normal and defect colour models), or None when GrabCut cannot run
    or collapsed the region."""
    region = mask.astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cfg.band + 1, 2 * cfg.band + 1))
    seeds = np.full(crop.shape, cv2.GC_BGD, np.uint8)
    seeds[cv2.dilate(region, kernel) > 0] = cv2.GC_PR_BGD
    seeds[region > 0] = cv2.GC_PR_FGD
    seeds[(cv2.erode(region, kernel) > 0) | (crop > cfg.core)] = cv2.GC_FGD
    for c in clicks:
        cx, cy = int(round(c.x)) - origin[0], int(round(c.y)) - origin[1]
        if 0 <= cx < crop.shape[1] and 0 <= cy < crop.shape[0]:
            cv2.circle(seeds, (cx, cy), cfg.seed_radius, int(cv2.GC_FGD if c.positive else cv2.GC_BGD), -1)
    if inside is not None:
        seeds[~inside] = cv2.GC_BGD
    n_fg = int(((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)).sum())
    if n_fg == 0 or int((seeds == cv2.GC_BGD).sum()) < 8:  # GrabCut needs both colour models
        return None
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(image, seeds, None, bgd, fgd, cfg.iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error as exc:  # degenerate colour statistics (e.g. a flat crop): keep the map
        logger.debug("GrabCut refinement skipped: %s", exc)
        return None
    fg = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    keep = region if inside is None else region & inside
    if fg.sum() < cfg.min_keep * keep.sum():
        return None
    return fg, bgd, fgd


def gmm_loglik(model: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Log-likelihood of (N, 3) float pixels under an OpenCV GrabCut GMM (weights, means, covariances)."""
    k = model.size // 13
    weights, means = model[0, :k], model[0, k:4 * k].reshape(k, 3)
    covs = model[0, 4 * k:].reshape(k, 3, 3)
    out = np.full(pixels.shape[0], -np.inf)
    for w, mu, cov in zip(weights, means, covs):
        if w <= 0:
            continue
        cov = cov + np.eye(3) * 1e-3
        diff = pixels - mu
        maha = ((diff @ np.linalg.inv(cov)) * diff).sum(axis=1)  # faster than einsum's "ni,ij,nj->n"
        comp = np.log(w) - 0.5 * (maha + np.log(np.linalg.det(cov)) + 3 * np.log(2 * np.pi))
        out = np.logaddexp(out, comp)
    return out


def respect_clicks(prob: np.ndarray, clicks: Sequence[Click], max_radius: float = 8.0,
                   threshold: float = THRESHOLD) -> np.ndarray:
    """The map with every click's pixel on the click's side of `threshold` (a copy when anything changes).

    Why: a map built on a 12 px grid and smoothed can leave a click's own pixel with the wrong label, and an
    annotator (or the click simulator) then clicks the same spot again and again with no effect. For each such
    click, a disk around it is moved to the click's side (prob -> 0.5 + prob / 2 for a positive click,
    prob * threshold for a negative one, so the order inside each side is kept). Its radius is the distance
    from the click to the nearest pixel that already has the click's label (the disk fills the gap up to the
    mask and no further), at most half the distance to the nearest click of the other label (disks of
    opposite clicks never overlap) and at most `max_radius`, at least 1 px. Clicks are taken in order, so a
    later click's disk wins over an earlier one's.
    """
    out, labels = prob, prob > threshold
    H, W = prob.shape
    reach = int(np.ceil(max_radius)) + 1
    for c in clicks:
        y, x = int(round(c.y)), int(round(c.x))
        if not (0 <= y < H and 0 <= x < W) or labels[y, x] == c.positive:
            continue
        radius = float(max_radius)
        opposite = [np.hypot(o.x - c.x, o.y - c.y) for o in clicks if o.positive != c.positive]
        if opposite:
            radius = min(radius, 0.5 * min(opposite))
        gap = distance_to_other_label(labels, y, x, reach)  # to the nearest pixel that has the click's label
        radius = max(radius if gap is None else min(radius, gap), 1.0)
        y0, y1, x0, x1 = max(0, y - reach), min(H, y + reach + 1), max(0, x - reach), min(W, x + reach + 1)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        disk = (yy - c.y) ** 2 + (xx - c.x) ** 2 <= radius * radius
        if out is prob:
            out = prob.copy()
        crop = out[y0:y1, x0:x1]
        crop[disk] = (0.5 + 0.5 * crop[disk]) if c.positive else threshold * crop[disk]
        labels[y0:y1, x0:x1][disk] = c.positive
    return out


class RefinedPredictor:
    """Any interactive predictor with `refine_prob` applied to each click's map (Predictor protocol).
    detect() (no clicks) is the base predictor's."""

    def __init__(self, base: Predictor, cfg: RefineConfig = RefineConfig()) -> None:
        self.base, self.cfg = base, cfg
        self.name = f"{base.name}+refine"
        self.version = f"{base.version}-refine"

    def set_image(self, image: np.ndarray) -> ImageState:
        return self.base.set_image(image)

    def predict(self, state: ImageState, clicks: list[Click], box: Box | None = None, prompt: str = "",
                previous_mask: np.ndarray | None = None) -> ClickResult:
        result = self.base.predict(state, clicks, box, prompt, previous_mask)
        image = state.image  # every state keeps its RGB image (ImageState protocol), None when it was not kept
        if image is None:  # a state without its image (e.g. an older cache entry): unrefined
            return result
        prob = refine_prob(image, result.prob, clicks, box, self.cfg)
        if self.cfg.respect_clicks:
            prob = respect_clicks(prob, clicks, self.cfg.click_radius)
            if box is not None:
                prob = np.where(box_mask(box, prob.shape), prob, 0.0).astype(np.float32)
        mask = prob > THRESHOLD
        score = float(prob[mask].mean()) if mask.any() else float(result.score)
        return ClickResult(prob=prob, mask=mask, score=score)

    def detect(self, state: ImageState, labels: list[str] | None = None) -> AnomalyResult:
        return self.base.detect(state, labels)

