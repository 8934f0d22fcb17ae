"""GrabCut-from-clicks baseline (OpenCV), with the Predictor protocol of model/types.py.

The annotator's clicks seed GrabCut inside a region of interest: the box when one is given, otherwise
the bounding box of the positive clicks grown by `margin` pixels. Inside it, disks of `seed_radius`
around positive clicks are sure foreground, disks of `grow_radius` around them probable foreground,
negative clicks and the ROI border sure background, the rest probable background. Outside the ROI
everything is background.

Soft map: GrabCut only returns hard labels, so the posterior P(fg) of its two colour GMMs ranks the
pixels, squeezed into [0.5, 1] inside GrabCut's mask and [0, 0.48] outside, so `prob > 0.49` is
exactly GrabCut's mask. No anomaly detection: this is a click-only baseline.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from model.errors import ConfigError, InputError
from model.interactive.refine import gmm_loglik
from model.types import AnomalyResult, Box, Click, ClickResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrabCutConfig:
    margin: int = 40  # px added around the positive clicks to form the ROI
    seed_radius: int = 3  # sure-foreground disk around each positive click
    grow_radius: int = 12  # probable-foreground disk around each positive click
    neg_radius: int = 5  # sure-background disk around each negative click
    iterations: int = 5


@dataclass(frozen=True)
class GrabCutState:
    image: np.ndarray  # (H, W, 3) uint8 RGB

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes)


def _disk(mask: np.ndarray, x: int, y: int, radius: int, value: int) -> None:
    cv2.circle(mask, (x, y), radius, int(value), thickness=-1)


class GrabCutPredictor:
    name = "grabcut"

    def __init__(self, cfg: GrabCutConfig = GrabCutConfig()):
        self.cfg = cfg
        self.version = f"grabcut-m{cfg.margin}-g{cfg.grow_radius}-i{cfg.iterations}"

    def set_image(self, image: np.ndarray) -> GrabCutState:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"expected (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        return GrabCutState(np.ascontiguousarray(image))

    def _roi(self, shape, clicks: list[Click], box: Box | None) -> tuple[int, int, int, int]:
        h, w = shape
        if box is not None:
            x0, y0, x1, y1 = box
            m = 2
        else:
            pos = [c for c in clicks if c.positive]
            x0, x1 = min(c.x for c in pos), max(c.x for c in pos)
            y0, y1 = min(c.y for c in pos), max(c.y for c in pos)
            m = self.cfg.margin
        return (max(int(x0) - m, 0), max(int(y0) - m, 0), min(int(np.ceil(x1)) + m + 1, w),
                min(int(np.ceil(y1)) + m + 1, h))

    def _seed_mask(self, roi, clicks: list[Click], box: Box | None) -> np.ndarray:
        x0, y0, x1, y1 = roi
        seeds = np.full((y1 - y0, x1 - x0), cv2.GC_PR_BGD, dtype=np.uint8)
        if box is not None:
            bx0, by0, bx1, by1 = (int(round(v)) for v in box)
            seeds[max(by0 - y0, 0):by1 - y0 + 1, max(bx0 - x0, 0):bx1 - x0 + 1] = cv2.GC_PR_FGD
        seeds[[0, -1], :] = cv2.GC_BGD
        seeds[:, [0, -1]] = cv2.GC_BGD
        points = [(int(round(c.x)) - x0, int(round(c.y)) - y0, c.positive)
                  for c in clicks]
        for x, y, positive in points:
            if positive:
                _disk(seeds, x, y, self.cfg.grow_radius, cv2.GC_PR_FGD)
        for x, y, positive in points:
            if positive:
                _disk(seeds, x, y, self.cfg.seed_radius, cv2.GC_FGD)
            else:
                _disk(seeds, x, y, self.cfg.neg_radius, cv2.GC_BGD)
        return seeds

    def predict(
        self,
        state: GrabCutState,
        clicks: list[Click],
        box: Box | None = None,
        prompt: str = "",
        previous_mask: np.ndarray | None = None,
    ) -> ClickResult:
        h, w = state.image.shape[:2]
        prob = np.zeros((h, w), dtype=np.float32)
        if box is None and not any(c.positive for c in clicks):
            return ClickResult(prob=prob, mask=prob > 0.49, score=0.0)
        roi = self._roi((h, w), clicks, box)
        x0, y0, x1, y1 = roi
        if x1 - x0 < 3 or y1 - y0 < 3:
            return ClickResult(prob=prob, mask=prob > 0.49, score=0.0)
        crop = np.ascontiguousarray(state.image[y0:y1, x0:x1])
        seeds = self._seed_mask(roi, clicks, box)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        try:
            cv2.grabCut(crop, seeds, None, bgd, fgd, self.cfg.iterations, cv2.GC_INIT_WITH_MASK)
        except cv2.error as exc:  # e.g. a seed set with a single colour: fall back to the seeds themselves
            logger.debug("grabCut failed (%s); using the seeds", exc)
        fg = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
        posterior = self._posterior(crop, bgd, fgd, fg)
        prob[y0:y1, x0:x1] = np.where(fg, 0.5 + 0.5 * posterior, 0.48 * posterior)
        mask = prob > 0.49
        score = float(prob[mask].mean()) if mask.any() else 0.0
        return ClickResult(prob=prob, mask=mask, score=score)

    @staticmethod
    def _posterior(crop: np.ndarray, bgd: np.ndarray, fgd: np.ndarray, fg: np.ndarray) -> np.ndarray:
        if not fgd.any() or not bgd.any():
            return fg.astype(np.float32)
        pixels = crop.reshape(-1, 3).astype(np.float64)
        logit = gmm_loglik(fgd, pixels) - gmm_loglik(bgd, pixels)
        return (1.0 / (1.0 + np.exp(-np.clip(logit, -50, 50)))).reshape(fg.shape).astype(np.float32)

    def detect(self, state: GrabCutState, labels: list[str] | None = None) -> AnomalyResult:
        raise ConfigError("GrabCut is a click-only baseline; it has no anomaly detection (use it with clicks)")
