"""Zero-training click mode over the residual anomaly map (the Predictor protocol of model/types.py).

predict(): every positive click seeds a region on the anomaly map. Its threshold is adaptive: halfway
(`grow_frac`) between the image's background level (median of the map) and the peak of the map near the click
(within `seed_radius` px); the region is the connected component of {map >= threshold} that holds that peak.
Negative clicks carve: a negative click inside a grown region raises that region's threshold above the map value
at the negative click (if that leaves the positive click's peak, the region is split between the clicks by
nearest-click assignment); a `click_radius` disk around every negative click is removed, one around every
positive click is kept. A box restricts everything to its inside; with no positive click, the region is the
part of the box above the level that splits its map values in two (Otsu, `model.interactive.clicks.box_level`): an
annotator's box holds the whole defect, also when it is several pieces, and the defect fills much of it.
`box_seeds` gives the learned network one click per anomalous part of such a box. prob > 0.5 exactly on the mask; outside it prob is the map scaled below 0.5. (Boundary refinement at full resolution is model/interactive/refine.py, applied by the service.)

detect(): regions of the map above an adaptive threshold, kept when larger than `min_area` px; possibly none.
The threshold is `detect_margin` x the highest leave-one-out score of defect-free references (bank calibration,
bank.meta["normal_scores"]); without calibration (empty or one-image bank) it is median + `detect_k` x robust
sigma of the image's own map.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy import ndimage

from model.engine.references import ReferenceBank
from model.engine.residuals import ResidualEngine, ResidualState
from model.errors import InputError
from model.interactive.clicks import box_level, distance_to_other_label
from model.types import AnomalyResult, Box, Click, ClickResult, box_mask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClickModeConfig:
    grow_frac: float = 0.5  # threshold = bg + grow_frac * (peak - bg)
    bg_window: int = 64  # px: half size of the window around the seed whose `bg_pct` percentile is bg
    bg_pct: float = 80.0
    seed_radius: int = 12  # px: where the peak near a positive click is looked for
    click_radius: int = 6  # px: disk kept around positive / removed around negative clicks
    max_click_radius: int = 16  # px: a correcting click's disk may grow to its distance from the mask edge
    detect_margin: float = 1.0  # detect threshold = margin x max normal score of the bank's calibration
    detect_k: float = 10.0  # without calibration: median + detect_k x robust sigma (1.4826 MAD) of the map
    min_area: int = 16  # px: smallest region reported by detect (and smallest extra part a box seeds)
    box_parts: int = 5  # a box with no positive click seeds at most this many anomalous parts (1: its peak only)


def _disk(shape: tuple[int, int], x: int, y: int, r: int) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    cv2.circle(m, (x, y), r, 1, -1)
    return m.astype(bool)


def _component_at(binary: np.ndarray, y: int, x: int) -> np.ndarray:
    if not binary[y, x]:
        return np.zeros_like(binary)
    _, labels = cv2.connectedComponents(binary.astype(np.uint8), connectivity=8)
    return labels == labels[y, x]


class ResidualClickPredictor:
    name = "residual"

    def __init__(self, engine: ResidualEngine, bank: ReferenceBank, cfg: ClickModeConfig | None = None):
        self.engine = engine
        self.bank = bank
        self.cfg = cfg or ClickModeConfig()
        self.version = f"residual-click-{engine.config_hash()}"

    def set_image(self, image: np.ndarray) -> ResidualState:
        return self.engine.compute(image, self.bank)

    # ---- clicks ---------------------------------------------------------------------------------------------
    def predict(self, state: ResidualState, clicks: list[Click], box: Box | None = None, prompt: str = "",
                previous_mask: np.ndarray | None = None) -> ClickResult:
        amap = state.anomaly_map
        H, W = amap.shape
        pts = [(c, *self._pixel(c, H, W)) for c in clicks]
        inside = None if box is None else box_mask(box, (H, W))
        bg = float(np.median(amap))
        seeds = [(y, x) for c, y, x in pts if c.positive]
        negs = [(y, x) for c, y, x in pts if not c.positive]
        mask = np.zeros((H, W), bool)
        if not seeds and inside is not None:
            mask = self._box_region(amap, inside, negs)
        for y, x in seeds:
            mask |= self._grow(amap, bg, y, x, negs, inside)
        for c, y, x in pts:
            disk = _disk((H, W), x, y, self._click_radius(mask, c.positive, y, x))
            mask = mask | disk if c.positive else mask & ~disk
        if inside is not None:
            mask &= inside
        prob = self._prob(amap, mask, bg)
        score = float(prob[mask].mean()) if mask.any() else 0.0
        return ClickResult(prob=prob, mask=mask, score=score)

    def _box_region(self, amap: np.ndarray, inside: np.ndarray, negs: list[tuple[int, int]]) -> np.ndarray:
        """A box with no positive click: the box's pixels above its Otsu level; a negative click inside keeps
        only the pixels nearer to the box's peak than to the negative clicks."""
        level = box_level(amap[inside])
        py, px = np.unravel_index(int(np.argmax(np.where(inside, amap, -np.inf))), amap.shape)
        region = inside & (amap > level) if level is not None else _disk(amap.shape, int(px), int(py), 1) & inside
        blocking = [(ny, nx) for ny, nx in negs if region[ny, nx]]
        return self._split(region, (int(py), int(px)), blocking) if blocking else region

    def box_seeds(self, amap: np.ndarray, inside: np.ndarray, bg: float) -> list[tuple[int, int]]:
        """(y, x) seeds of a box with no positive click: the box's peak first, then the peak of every other part
        inside the box that is anomalous by the detect threshold (calibrated on the bank's references) and at
        least `min_area` px, largest first, `box_parts` in all. Each seed then grows its own region."""
        py, px = np.unravel_index(int(np.argmax(np.where(inside, amap, -np.inf))), amap.shape)
        seeds = [(int(py), int(px))]
        if self.cfg.box_parts <= 1:
            return seeds
        peak = float(amap[py, px])
        detect = self.detect_threshold(amap)
        binary = inside & (amap >= min(detect, bg + self.cfg.grow_frac * (peak - bg)))
        labels, n = ndimage.label(binary)
        if n <= 1:
            return seeds
        index = np.arange(1, n + 1)
        sizes = ndimage.sum_labels(binary, labels, index)
        peaks = ndimage.maximum(amap, labels, index)
        where = ndimage.maximum_position(amap, labels, index)
        for i in np.argsort(-sizes):
            if len(seeds) >= self.cfg.box_parts:
                break
            if index[i] != labels[py, px] and sizes[i] >= self.cfg.min_area and peaks[i] >= detect:
                seeds.append((int(where[i][0]), int(where[i][1])))
        return seeds

    def _click_radius(self, mask: np.ndarray, positive: bool, y: int, x: int) -> int:
        """Disk radius of a correcting click: an annotator clicks the middle of the error, so a positive click
        outside the mask (negative click inside it) at distance d from its edge marks an error about d deep;
        the disk spans that distance (at least `click_radius`, at most `max_click_radius`)."""
        r = self.cfg.click_radius
        if self.cfg.max_click_radius <= r or mask[y, x] != (not positive):
            return r
        m = self.cfg.max_click_radius
        d = distance_to_other_label(mask, y, x, m)
        return r if d is None else int(min(m, max(r, round(d))))

    def _grow(self, amap, bg, y, x, negs, inside) -> np.ndarray:
        """Region of one positive click: the component holding the click of {map >= thr}; thr is halfway between
        the local background and the peak near the click, lowered to the map value at the click (the click says
        that pixel is defect) but never to the local background, raised above every negative click inside."""
        r = self.cfg.seed_radius
        y0, y1, x0, x1 = max(0, y - r), min(amap.shape[0], y + r + 1), max(0, x - r), min(amap.shape[1], x + r + 1)
        win = amap[y0:y1, x0:x1]
        py, px = np.unravel_index(int(np.argmax(win)), win.shape)
        py, px = py + y0, px + x0
        peak = float(amap[py, px])
        b = self.cfg.bg_window
        local = amap[max(0, py - b):py + b + 1, max(0, px - b):px + b + 1]
        bg = max(bg, float(np.percentile(local, self.cfg.bg_pct)))
        thr = bg + self.cfg.grow_frac * (peak - bg)
        at_click = float(amap[y, x])
        if at_click > bg:
            thr = min(thr, at_click)
        binary = amap >= thr
        if inside is not None:
            binary &= inside
        sy, sx = (y, x) if binary[y, x] else (py, px)
        region = _component_at(binary, sy, sx)
        blocking = [(ny, nx) for ny, nx in negs if region[ny, nx]]
        if blocking:
            thr = max(thr, max(float(amap[ny, nx]) for ny, nx in blocking) * 1.0001)
            if binary[sy, sx] and amap[sy, sx] >= thr:
                region = _component_at(binary & (amap >= thr), sy, sx)
            else:
                region = self._split(region, (y, x), blocking)
        return region

    @staticmethod
    def _split(region: np.ndarray, pos: tuple[int, int], negs: list[tuple[int, int]]) -> np.ndarray:
        """Keep the pixels of region closer to the positive click than to every negative click."""
        yy, xx = np.nonzero(region)
        d_pos = (yy - pos[0]) ** 2 + (xx - pos[1]) ** 2
        d_neg = np.min([(yy - ny) ** 2 + (xx - nx) ** 2 for ny, nx in negs], axis=0)
        out = np.zeros_like(region)
        keep = d_pos < d_neg
        out[yy[keep], xx[keep]] = True
        return out

    @staticmethod
    def _prob(amap: np.ndarray, mask: np.ndarray, bg: float) -> np.ndarray:
        top = float(amap.max())
        scaled = np.clip((amap - bg) / max(top - bg, 1e-6), 0.0, 1.0)
        return np.where(mask, 0.5 + 0.5 * scaled, 0.49 * scaled).astype(np.float32)

    @staticmethod
    def _pixel(c: Click, H: int, W: int) -> tuple[int, int]:
        if not (np.isfinite(c.x) and np.isfinite(c.y)) or not (0 <= c.x < W + 0.5 and 0 <= c.y < H + 0.5):
            raise InputError(f"click ({c.x}, {c.y}) outside the {W}x{H} image")
        return min(H - 1, round(c.y)), min(W - 1, round(c.x))

    # ---- batch ---------------------------------------------------------------------------------------------
    def detect(self, state: ResidualState, labels: list[str] | None = None) -> AnomalyResult:
        """Masks of regions found anomalous (key "" = any defect: the residual map has no defect types)."""
        amap = state.anomaly_map
        thr = self.detect_threshold(amap)
        n, labels_img, stats, _ = cv2.connectedComponentsWithStats((amap >= thr).astype(np.uint8), connectivity=8)
        keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= self.cfg.min_area]
        masks = {}
        if keep:
            masks[""] = np.isin(labels_img, keep)
        score = bounded_score(state.score, thr)
        return AnomalyResult(anomaly_map=amap, score=score, masks=masks, label_scores={"": score})

    def detect_threshold(self, amap: np.ndarray) -> float:
        """The residual level above which a region is reported: calibrated on the bank's defect-free images
        when it has them, else a robust outlier level of this image's own map."""
        normal = (self.bank.meta.get("normal_scores") if self.bank is not None else None) or []
        if normal:
            return self.cfg.detect_margin * float(max(normal))
        bg = float(np.median(amap))
        sigma = 1.4826 * float(np.median(np.abs(amap - bg)))
        return bg + self.cfg.detect_k * max(sigma, 1e-6)

    def config(self) -> dict:
        return asdict(self.cfg)


def bounded_score(raw: float, threshold: float) -> float:
    """A residual magnitude as an anomaly score in [0, 1): raw / (raw + threshold), 0.5 at the detect
    threshold and monotone, so the Data Manager sorts tasks as the raw score would (Label Studio shows a
    prediction score x 100 as a percentage)."""
    raw, threshold = max(float(raw), 0.0), max(float(threshold), 1e-6)
    return raw / (raw + threshold)
