"""Label Studio annotations -> ADClick-Seg labels.

Per task only the newest annotation counts (by updated_at, then created_at, then id); skipped/cancelled
annotations (`was_cancelled`) are ignored. From it: brush regions (RLE decoded per label, several regions of
one label are merged), rectangles as weak box labels (percent -> pixels), and the verdict Choices
(OK -> all-normal image, the anomalous choice -> defective somewhere). Without a verdict tag, an annotation
with no region at all means a normal image (the same rule as the reference images of the zero-training fit).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle

from backend.errors import LabelConfigError
from backend.ls_format import LabelConfig
from model.seg.data import ANY, SegExample
from model.types import Box

logger = logging.getLogger(__name__)


@dataclass
class TaskLabels:
    task_id: Any
    image_ref: str
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # label -> (h, w) bool at the region's size
    boxes: list[tuple[str, Box]] = field(default_factory=list)  # (label, box in pixels of `size`)
    verdict: bool | None = None  # True anomalous, False OK
    size: tuple[int, int] | None = None  # (H, W) the regions were drawn on

    @property
    def has_defect_location(self) -> bool:
        return any(m.any() for m in self.masks.values()) or bool(self.boxes)


def newest_annotation(task: dict) -> dict | None:
    """The task's newest annotation that was not skipped/cancelled, or None."""
    kept = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not kept:
        return None
    return max(kept, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""),
                                    str(a.get("created_at") or ""), int(a.get("id") or 0)))


def _label(region: dict, key: str, cfg: LabelConfig) -> str:
    values = (region.get("value") or {}).get(key) or []
    if not values:
        return ANY
    try:
        return cfg.match_label(str(values[0]))
    except LabelConfigError:  # a label the brush tag does not have: it still marks a defect
        return ANY


def decode_brush(region: dict) -> np.ndarray | None:
    """(H, W) bool mask of a brushlabels region (RLE alpha channel), or None when it cannot be decoded."""
    try:
        h, w = int(region["original_height"]), int(region["original_width"])
        flat = decode_rle(region["value"]["rle"])
        return np.asarray(flat[: h * w * 4]).reshape(h, w, 4)[:, :, 3] > 0
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        logger.warning("brush region %s not decodable: %s", region.get("id"), exc)
        return None


def rectangle_box(region: dict) -> Box | None:
    """Pixel box (x0, y0, x1, y1) of a rectanglelabels region (percent coordinates, rotation ignored)."""
    try:
        v, w, h = region["value"], float(region["original_width"]), float(region["original_height"])
        x0, y0 = float(v["x"]) * w / 100.0, float(v["y"]) * h / 100.0
        x1, y1 = x0 + float(v["width"]) * w / 100.0, y0 + float(v["height"]) * h / 100.0
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("rectangle region %s unreadable: %s", region.get("id"), exc)
        return None
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return (max(0.0, x0), max(0.0, y0), min(w, x1), min(h, y1))


def task_labels(task: dict, cfg: LabelConfig) -> TaskLabels | None:
    """The ADClick-Seg labels of a task's newest annotation; None when it teaches nothing."""
    ann = newest_annotation(task)
    if ann is None:
        return None
    out = TaskLabels(task.get("id"), str((task.get("data") or {}).get(cfg.image_key, "")))
    regions = ann.get("result") or []
    for region in regions:
        kind = region.get("type")
        if region.get("original_height") and region.get("original_width"):
            out.size = (int(region["original_height"]), int(region["original_width"]))
        if kind == "brushlabels":
            mask = decode_brush(region)
            if mask is not None and mask.any():
                label = _label(region, "brushlabels", cfg)
                out.masks[label] = out.masks[label] | mask if label in out.masks else mask
        elif kind == "rectanglelabels":
            box = rectangle_box(region)
            if box is not None:
                out.boxes.append((_label(region, "rectanglelabels", cfg), box))
        elif kind == "choices" and cfg.choices_name and region.get("from_name") == cfg.choices_name:
            choices = (region.get("value") or {}).get("choices") or []
            if cfg.ok_choice in choices:
                out.verdict = False
            elif cfg.anomalous_choice in choices:
                out.verdict = True
    if not cfg.choices_name and not regions:
        out.verdict = False
    if out.has_defect_location and out.verdict is False:
        out.verdict = True  # a drawn defect outweighs an inconsistent OK
    if not out.has_defect_location and out.verdict is None:
        return None
    return out


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape == size:
        return mask
    return cv2.resize(mask.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 0


def to_example(labels: TaskLabels, residual: Any, image: np.ndarray, features: Any = None) -> SegExample:
    """A SegExample at the downloaded image's size (regions drawn at another size are rescaled); `features`:
    the image's feature tokens (ADClick-Seg's optional second input)."""
    size = (int(image.shape[0]), int(image.shape[1]))
    masks = {k: _resize_mask(m, size) for k, m in labels.masks.items()}
    boxes = labels.boxes
    if labels.size and labels.size != size:
        sy, sx = size[0] / labels.size[0], size[1] / labels.size[1]
        boxes = [(k, (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)) for k, b in boxes]
    return SegExample(residual=residual, features=features, image_size=size, masks=masks, boxes=list(boxes),
                      verdict=labels.verdict, key=f"task-{labels.task_id}", image=image[::4, ::4].copy())
