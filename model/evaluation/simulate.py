"""The standard click simulator of the benchmark (RITM / SimpleClick protocol): a simulated annotator clicks
on an image until the prediction is right or the clicks run out.

Each next click comes from `model.interactive.clicks.next_click` (interior-most point of the larger error
region); the prediction after each click is `prob > thr` with thr = 0.49, at most 20 clicks, and the previous
mask is passed back to the predictor (as `ClickHistory` does in the service). Serving does not use this module.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from model.interactive.clicks import next_click
from model.metrics import iou
from model.types import Click, ImageState, Predictor

logger = logging.getLogger(__name__)


@dataclass
class SimResult:
    """One simulated annotation session on one image."""

    ious: list[float] = field(default_factory=list)  # IoU after click 1, 2, ...
    clicks: list[Click] = field(default_factory=list)
    predict_ms: list[float] = field(default_factory=list)  # time of each predict call
    probs: dict[int, np.ndarray] = field(default_factory=dict)  # click number -> soft map kept


def simulate(
    predictor: Predictor,
    state: ImageState,
    gt: np.ndarray,
    max_clicks: int = 20,
    thr: float | None = 0.49,
    keep_probs: Iterable[int] | None = None,
    stop_iou: float | None = None,
    min_clicks: int = 5,
    prompt: str = "",
) -> SimResult:
    """Click on `state` like an annotator until `max_clicks` (or `stop_iou` after `min_clicks`).

    The prediction after each click is `prob > thr` (thr None: the predictor's own mask); the previous
    mask is passed back to the predictor. keep_probs: click numbers whose soft maps are returned
    (None: all). prompt: the defect-type text sent with every click ("" = none).
    """
    gt = np.asarray(gt, dtype=bool)
    keep = None if keep_probs is None else set(keep_probs)
    out = SimResult()
    pred = np.zeros_like(gt)
    previous: np.ndarray | None = None
    for k in range(1, max_clicks + 1):
        click = next_click(gt, pred, out.clicks)
        if click is None:  # already perfect: nothing left to click
            break
        out.clicks.append(click)
        start = time.perf_counter()
        result = predictor.predict(state, list(out.clicks), prompt=prompt, previous_mask=previous)
        out.predict_ms.append((time.perf_counter() - start) * 1000.0)
        pred = result.mask.astype(bool) if thr is None else result.prob > thr
        previous = pred
        out.ious.append(iou(pred, gt))
        if keep is None or k in keep:
            out.probs[k] = result.prob
        if stop_iou is not None and k >= min_clicks and out.ious[-1] >= stop_iou:
            break
    logger.debug("simulated %d clicks, final IoU %.3f", len(out.ious), out.ious[-1] if out.ious else 1.0)
    return out
