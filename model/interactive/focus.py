"""Local corrections: a new click changes the mask only where it was made (clicks converge instead of oscillating).

Why: the base predictor recomputes the whole map from all clicks each time. On small defects (ball-screw pits of
~100 px) and on products the network does not know, a click meant to remove a bit of spill often reshapes the whole
mask: the defect the first click found shrinks or vanishes, the next click brings it back with new spill, and the
IoU bounces between 0.3 and 0.7 for 20 clicks. Interactive tools keep the user's earlier work: a positive click
adds, a negative click removes, and only around itself (FocalClick's "focus" region is the same idea).

Method (`FocusPredictor.predict`, with the mask the user saw before the click, `previous_mask`):
1. The base predictor's map for all clicks, as usual (new = prob > 0.49).
2. The newest click c may change only pixels that (a) the new map gives c's label while the previous mask did
   not, (b) are nearer to a click of c's label than to any click of the other label, and (c) are 8-connected to
   c through such pixels. Everything else keeps its previous label.
3. The soft values keep the base map's order within each side (kept foreground 0.5 + p/2, kept background
   p x 0.49), and `respect_clicks` puts every click's own pixel on its side.
Without a previous mask (first click, or a client that does not send one) the base result is returned as is.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from model.interactive.refine import THRESHOLD, respect_clicks
from model.types import AnomalyResult, Box, Click, ClickResult, box_mask


@dataclass(frozen=True)
class FocusConfig:
    click_radius: float = 8.0  # respect_clicks
    start_click: int = 2  # local corrections from this click on (the first click's mask is the base's)


def _nearer_own_label(shape: tuple[int, int], clicks: Sequence[Click], label: bool,
                      window: tuple[int, int, int, int]) -> np.ndarray:
    """Within window (y0, y1, x0, x1): pixels nearer to a click of `label` than to any click of the other label."""
    y0, y1, x0, x1 = window
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    near = {True: np.full((y1 - y0, x1 - x0), np.inf, np.float32),
            False: np.full((y1 - y0, x1 - x0), np.inf, np.float32)}
    for c in clicks:
        d = (yy - float(c.y)) ** 2 + (xx - float(c.x)) ** 2
        np.minimum(near[bool(c.positive)], d, out=near[bool(c.positive)])
    return near[label] <= near[not label]


def local_change(new: np.ndarray, previous: np.ndarray, clicks: Sequence[Click]) -> np.ndarray:
    """The pixels the newest click may change (bool (H, W)), per the module docstring's step 2."""
    c = clicks[-1]
    label = bool(c.positive)
    H, W = new.shape
    y, x = int(round(c.y)), int(round(c.x))
    changed = (new == label) & (previous != label)
    out = np.zeros((H, W), bool)
    if not (0 <= y < H and 0 <= x < W) or not changed[y, x]:
        return out
    _n, comp = cv2.connectedComponents(changed.view(np.uint8), connectivity=8)
    region = comp == comp[y, x]
    ys, xs = np.nonzero(region)
    window = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    y0, y1, x0, x1 = window
    allowed = region[y0:y1, x0:x1] & _nearer_own_label((H, W), clicks, label, window)
    if not allowed[y - y0, x - x0]:
        return out
    _n, comp = cv2.connectedComponents(allowed.view(np.uint8), connectivity=8)
    out[y0:y1, x0:x1] = comp == comp[y - y0, x - x0]
    return out


class FocusPredictor:
    """Any interactive predictor whose newest click only changes the mask locally (Predictor protocol)."""

    def __init__(self, base, cfg: FocusConfig = FocusConfig()) -> None:
        self.base, self.cfg = base, cfg
        self.name = f"{getattr(base, 'name', 'predictor')}+focus"
        self.version = f"{getattr(base, 'version', 'predictor')}-focus"

    def set_image(self, image: np.ndarray):
        return self.base.set_image(image)

    def predict(self, state, clicks: list[Click], box: Box | None = None, prompt: str = "",
                previous_mask: np.ndarray | None = None) -> ClickResult:
        result = self.base.predict(state, clicks, box, prompt, previous_mask)
        prob = np.asarray(result.prob, np.float32)
        if (previous_mask is None or len(clicks) < max(2, self.cfg.start_click)
                or np.shape(previous_mask) != prob.shape):
            return result
        previous = np.asarray(previous_mask, bool)
        new = prob > THRESHOLD
        region = local_change(new, previous, clicks)
        keep = np.where(region, new, previous)
        out = np.where(keep, np.where(new, prob, 0.5 + 0.5 * prob), np.where(new, THRESHOLD * prob, prob))
        out = respect_clicks(out.astype(np.float32), clicks, self.cfg.click_radius)
        if box is not None:
            out = np.where(box_mask(box, (out.shape[0], out.shape[1])), out, 0.0).astype(np.float32)
        mask = out > THRESHOLD
        score = float(out[mask].mean()) if mask.any() else float(result.score)
        return ClickResult(prob=out, mask=mask, score=score)

    def detect(self, state, labels: list[str] | None = None) -> AnomalyResult:
        return self.base.detect(state, labels)
