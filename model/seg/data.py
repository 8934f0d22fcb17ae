"""Labels for ADClick-Seg: one labelled image as residual tokens plus its masks, boxes and verdict, and the
conversion of those labels into per-block training targets.

Target codes per block and per prompt map (map 0 = "any defect", then one map per defect label):
  1 defect, 0 normal, IGNORE (-1) not trained (ignore band, or another label's box),
  UNLABELLED (-2) inside a box: trained semi-supervised (label guessing) and by the box's bag constraint.
Bags: block -> 1-based index of the box that contains it (0 = none); at least one block of a bag is a defect.

Semantics of an annotation: a brush mask or a box means everything outside the masks and boxes is normal;
a verdict OK with no regions means the whole image is normal; a verdict "anomalous" with no regions makes
the whole image one bag; an annotation with neither regions nor a verdict teaches nothing and is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from scipy import ndimage

from model.types import Box

ANY = ""  # key of the "any defect" map in masks, thresholds and AnomalyResult.masks
IGNORE = -1.0
UNLABELLED = -2.0


def seg_tokens(residual: Any, features: Any = None) -> torch.Tensor:
    """(C [+ F], h, w) float32 ADClick-Seg input from a residual and optional feature tokens."""
    residual = torch.as_tensor(residual).float()
    if features is None:
        return residual
    return torch.cat([residual, torch.as_tensor(features).float()], dim=0)


@dataclass
class SegExample:
    residual: torch.Tensor  # (C, h, w) signed residual tokens of the image
    image_size: tuple[int, int]  # (H, W) of the original image
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # label -> (H, W) bool
    boxes: list[tuple[str, Box]] = field(default_factory=list)  # (label, (x0, y0, x1, y1)) weak labels
    verdict: bool | None = None  # True anomalous, False OK, None not given
    key: str = ""
    image: np.ndarray | None = None  # (H, W, 3) uint8, kept only for report overlays
    features: torch.Tensor | None = None  # (F, h, w) the query image's own feature tokens (optional input)

    @property
    def tokens(self) -> torch.Tensor:
        """The model input: residual channels, then the feature channels when there are any."""
        return seg_tokens(self.residual, self.features)

    @property
    def usable(self) -> bool:
        return bool(self.masks or self.boxes or self.verdict is not None)

    def union_mask(self) -> np.ndarray:
        """(H, W) bool union of all masks (all False for an OK verdict or no mask)."""
        out = np.zeros(self.image_size, dtype=bool)
        for m in self.masks.values():
            out |= m
        return out


@dataclass(frozen=True)
class BlockRule:
    pos_fraction: float = 0.25  # a block is a defect when at least this fraction of it is defect
    min_fraction: float = 0.02  # a small component still marks its best block when it covers this much
    soft_band: bool = False  # partially covered blocks: their fraction as a soft target instead of ignored


@dataclass
class Targets:
    target: torch.Tensor  # (L, h, w) float codes (see module doc)
    bags: torch.Tensor  # (L, h, w) int64 bag ids (0 = none)


def block_fraction(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each block covered by the (H, W) mask, on the (h, w) token grid (area resampling)."""
    h, w = grid
    return cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)


def block_labels(mask: np.ndarray, grid: tuple[int, int], rule: BlockRule) -> np.ndarray:
    """(h, w) float codes from one (H, W) mask: 1 defect, 0 normal, IGNORE for the partial-coverage band.
    Each connected defect component keeps at least its best-covered block as a defect."""
    frac = block_fraction(mask, grid)
    band = frac if rule.soft_band else IGNORE
    out = np.where(frac >= rule.pos_fraction, 1.0, np.where(frac > 1e-6, band, 0.0)).astype(np.float32)
    comps, n = ndimage.label(frac > 1e-6)
    for i in range(1, n + 1):
        sel = comps == i
        if out[sel].max() < 1.0:
            best = np.argmax(np.where(sel, frac, -1.0))
            if frac.flat[best] >= rule.min_fraction:
                out.flat[best] = 1.0
    return out


def box_to_blocks(box: Box, image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[slice, slice]:
    """Rows/cols slices of the blocks that overlap the box (x0, y0, x1, y1) in image pixels."""
    (H, W), (h, w) = image_size, grid
    x0, y0, x1, y1 = box
    c0 = int(np.clip(np.floor(x0 * w / W), 0, w - 1))
    r0 = int(np.clip(np.floor(y0 * h / H), 0, h - 1))
    c1 = int(np.clip(np.ceil(x1 * w / W), c0 + 1, w))
    r1 = int(np.clip(np.ceil(y1 * h / H), r0 + 1, h))
    return slice(r0, r1), slice(c0, c1)


def build_targets(ex: SegExample, labels: list[str], rule: BlockRule = BlockRule()) -> Targets:
    """Per-map block targets for maps [ANY, *labels] on the example's token grid."""
    grid = tuple(ex.residual.shape[-2:])
    n_maps = 1 + len(labels)
    target = np.zeros((n_maps, *grid), dtype=np.float32)
    bags = np.zeros((n_maps, *grid), dtype=np.int64)
    if not ex.masks and not ex.boxes:
        if ex.verdict:  # anomalous, location unknown: the any-map is one bag, the label maps are unknown
            target[0] = UNLABELLED
            bags[0] = 1
            target[1:] = IGNORE
        return Targets(torch.from_numpy(target), torch.from_numpy(bags))
    _apply_masks(ex, labels, rule, grid, target)
    _apply_boxes(ex, labels, grid, target, bags)
    return Targets(torch.from_numpy(target), torch.from_numpy(bags))


def _apply_masks(ex: SegExample, labels: list[str], rule: BlockRule, grid, target: np.ndarray) -> None:
    if not ex.masks:
        return
    target[0] = block_labels(ex.union_mask(), grid, rule)
    for i, label in enumerate(labels, start=1):
        own = block_labels(ex.masks[label], grid, rule) if label in ex.masks else np.zeros(grid, np.float32)
        # blocks of other labels' defects are normal for this label's map unless this label also covers them
        target[i] = own


def _apply_boxes(ex: SegExample, labels: list[str], grid, target: np.ndarray, bags: np.ndarray) -> None:
    for k, (label, box) in enumerate(ex.boxes, start=1):
        rows, cols = box_to_blocks(box, ex.image_size, grid)
        region = target[0, rows, cols]
        if (region == 1.0).any():  # the box is already explained by a mask: nothing to guess
            continue
        target[0, rows, cols] = np.where(region == 0.0, UNLABELLED, region)
        bags[0, rows, cols] = k
        for i, other in enumerate(labels, start=1):
            sub = target[i, rows, cols]
            if other == label:
                target[i, rows, cols] = np.where(sub == 0.0, UNLABELLED, sub)
                bags[i, rows, cols] = k
            else:
                target[i, rows, cols] = np.where(sub == 0.0, IGNORE, sub)


def boxes_from_mask(mask: np.ndarray, min_area: int = 1, pad: int = 2) -> list[Box]:
    """Axis-aligned boxes around the connected components of an (H, W) mask (benchmark weak labels)."""
    comps, _ = ndimage.label(mask)
    boxes: list[Box] = []
    H, W = mask.shape
    for sl in ndimage.find_objects(comps):
        if sl is None:
            continue
        rows, cols = sl
        if (rows.stop - rows.start) * (cols.stop - cols.start) < min_area:
            continue
        boxes.append((float(max(0, cols.start - pad)), float(max(0, rows.start - pad)),
                      float(min(W, cols.stop + pad)), float(min(H, rows.stop + pad))))
    return boxes
