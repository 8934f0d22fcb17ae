"""Click encoding and the next click of the standard simulated annotator (RITM / SimpleClick protocol).

Clicks are `Click(x, y, positive)` with x = column, y = row in pixels of the image; the simulator
places clicks on pixel indices (integer-valued x, y).

Next click: the false-negative and false-positive regions of the current prediction are
distance-transformed with a 1-pixel zero border (so the image edge counts as a region edge); the
next click goes to the interior-most point (maximum distance) of the region with the larger maximum,
positive when that region is a false negative. Points already clicked are excluded. The whole simulated
session (prediction `prob > thr`, thr = 0.49, at most 20 clicks) is model/evaluation/simulate.py.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import cv2
import numpy as np

from model.types import Click, ImageState, Predictor

logger = logging.getLogger(__name__)


def _interior_distance(region: np.ndarray) -> np.ndarray:
    padded = np.pad(region.astype(np.uint8), 1, mode="constant")
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist[1:-1, 1:-1]


def next_click(
    gt: np.ndarray, pred: np.ndarray, clicked: Iterable[Click] | None = None
) -> Click | None:
    """The click a simulated annotator makes next; None when `pred` already equals `gt`.

    gt, pred: (H, W) bool. Ties go to the first pixel in raster order.
    """
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"gt {gt.shape} and pred {pred.shape} differ")
    fn_dist = _interior_distance(gt & ~pred)
    fp_dist = _interior_distance(~gt & pred)
    for c in clicked or ():
        row, col = int(round(c.y)), int(round(c.x))
        if 0 <= row < gt.shape[0] and 0 <= col < gt.shape[1]:
            fn_dist[row, col] = fp_dist[row, col] = 0.0
    fn_max, fp_max = float(fn_dist.max()), float(fp_dist.max())
    if fn_max == 0.0 and fp_max == 0.0:
        return None
    positive = fn_max > fp_max
    dist = fn_dist if positive else fp_dist
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return Click(x=float(col), y=float(row), positive=bool(positive))


def box_level(values: np.ndarray) -> float | None:
    """The level that splits a box's map values into defect and background (Otsu's threshold), or None when
    the values are constant. A box says "the defect is in here and fills much of it": the split adapts to the
    product and the image instead of a fixed level."""
    from skimage.filters import threshold_otsu

    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2 or not np.isfinite(values).all() or float(values.max()) <= float(values.min()):
        return None
    return float(threshold_otsu(values))


def distance_to_other_label(mask: np.ndarray, y: int, x: int, reach: int) -> float | None:
    """Euclidean px (float32 precision) from (y, x) to the nearest pixel of the (H, W) bool `mask` whose label
    differs from mask[y, x], looked for within `reach` px; None when there is none that close. How far a click
    lies inside a region or outside it: the click mode and the refinement size their click disks with it."""
    H, W = mask.shape
    y0, y1, x0, x1 = max(0, y - reach), min(H, y + reach + 1), max(0, x - reach), min(W, x + reach + 1)
    crop = mask[y0:y1, x0:x1]
    other = crop != mask[y, x]
    if not other.any():
        return None
    dist = cv2.distanceTransform((~other).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return float(dist[y - y0, x - x0])


def _scaled_centre(click: Click, shape: tuple[int, int], src_shape: tuple[int, int] | None):
    if src_shape is None:
        return click.x, click.y
    sy, sx = shape[0] / src_shape[0], shape[1] / src_shape[1]
    return (click.x + 0.5) * sx - 0.5, (click.y + 0.5) * sy - 0.5


def encode_clicks(
    clicks: Sequence[Click],
    shape: tuple[int, int],
    radius: float = 5.0,
    src_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Disk maps (2, H, W) float32: channel 0 = positive clicks, 1 = negative; 1 inside a disk of `radius`.

    shape: (H, W) of the output; src_shape: (H, W) of the image the click coordinates refer to
    (default: the same as `shape`), so that clicks in original pixels can be drawn on a resized input.
    """
    h, w = shape
    maps = np.zeros((2, h, w), dtype=np.float32)
    r = float(radius)
    for click in clicks:
        cx, cy = _scaled_centre(click, shape, src_shape)
        x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)) + 1, w)
        y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)) + 1, h)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        channel = 0 if click.positive else 1
        maps[channel, y0:y1, x0:x1] = np.maximum(maps[channel, y0:y1, x0:x1], disk)
    return maps


class ClickHistory:
    """An image's interactive session as the service sees it: each request carries all the clicks so far.

    The network is trained, and the benchmark simulates, with the previous click's mask as an input; Label
    Studio does not send it. `predict` therefore replays the clicks one at a time, feeding each prediction's
    mask to the next, and remembers the mask of every click prefix it computed (bit-packed, the newest
    `max_entries`), so the usual request - the previous clicks plus one - costs one predictor call, and a
    request after an undo (a shorter prefix) costs none beyond its own. Thread-safe; the result for a click
    list does not depend on what was cached (a replay from an empty history gives the same masks).
    """

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = int(max_entries)
        self._masks: OrderedDict[tuple, tuple[tuple[int, int], np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(clicks: Sequence[Click], box: tuple | None, prompt: str) -> tuple:
        return (tuple((float(c.x), float(c.y), bool(c.positive)) for c in clicks),
                None if box is None else tuple(float(v) for v in box), prompt)

    def _get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            hit = self._masks.get(key)
            if hit is None:
                return None
            self._masks.move_to_end(key)
        shape, packed = hit
        return np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape).astype(bool)

    def _put(self, key: tuple, mask: np.ndarray) -> None:
        with self._lock:
            self._masks[key] = (mask.shape, np.packbits(mask.astype(bool), axis=None))
            self._masks.move_to_end(key)
            while len(self._masks) > self.max_entries:
                self._masks.popitem(last=False)

    def __len__(self) -> int:
        return len(self._masks)

    def max_nbytes(self, shape: tuple[int, int]) -> int:
        """Upper bound of the memory it can hold for an image of `shape` (the service's cache budget counts it)."""
        return self.max_entries * (int(shape[0]) * int(shape[1]) // 8 + 200)

    def predict(self, predictor: Predictor, state: ImageState, clicks: Sequence[Click],
                box: tuple | None = None, prompt: str = "") -> Any:
        clicks = list(clicks)
        if not clicks:  # a box alone: nothing to replay
            return predictor.predict(state, clicks, box, prompt=prompt)
        start, previous = len(clicks) - 1, None
        while start > 0:  # the longest remembered prefix shorter than the request (none: from the first click)
            previous = self._get(self._key(clicks[:start], box, prompt))
            if previous is not None:
                break
            start -= 1
        if len(clicks) - start > 1:
            logger.debug("replaying clicks %d..%d to rebuild the previous masks", start + 1, len(clicks))
        for k in range(start + 1, len(clicks) + 1):
            result = predictor.predict(state, clicks[:k], box, prompt=prompt, previous_mask=previous)
            previous = np.asarray(result.mask, bool)
            self._put(self._key(clicks[:k], box, prompt), previous)
        return result


# ---- the interactive network's inputs (shared by serving and training) ----------------------------------
def half(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (ceil(H/2), ceil(W/2), 3) by area averaging (the network's stem input)."""
    h, w = image.shape[:2]
    return cv2.resize(image, ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)


def click_maps(clicks: Sequence[Click], prev: np.ndarray | None, shape: tuple[int, int],
               src_shape: tuple[int, int], radius: float = 1.0) -> np.ndarray:
    """(3, h2, w2) float32: positive disks, negative disks, previous mask (area-resized), click grid."""
    disks = encode_clicks(list(clicks), shape, radius=radius, src_shape=src_shape)
    if prev is None:
        p = np.zeros(shape, np.float32)
    else:
        p = cv2.resize(prev.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return np.concatenate([disks, p[None]], 0)
