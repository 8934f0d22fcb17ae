"""Label Studio formats: the label config (read with the SDK's LabelInterface), the interactive context
(percent coordinates -> clicks and a box in pixels), and brush RLE / choice results. Pure functions, no I/O.

Coordinates follow model/types.py: (x, y) in pixels of the original image, x = column."""

from __future__ import annotations

import functools
import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from label_studio_sdk.converter.brush import mask2rle
from label_studio_sdk.label_interface import LabelInterface

from backend.errors import BadRequest, LabelConfigError
from model.types import Box, Click

logger = logging.getLogger(__name__)

_OK_WORDS = ("ok", "normal", "good", "pass", "no defect", "defect-free", "clean")
_BAD_WORDS = ("anomal", "defect", "bad", "fail", "reject")


@dataclass(frozen=True)
class LabelConfig:
    """What the backend needs from a project's label config. Tag names are free; types and labels count."""

    image_name: str  # the Image tag's name (regions' to_name)
    image_key: str  # the task data key of the image ($image -> "image")
    brush_name: str
    brush_labels: tuple[str, ...]
    keypoint_names: tuple[str, ...] = ()
    rectangle_names: tuple[str, ...] = ()
    textarea_names: tuple[str, ...] = ()
    choices_name: str | None = None
    ok_choice: str | None = None
    anomalous_choice: str | None = None
    smart_labels: tuple[str, ...] = ()  # labels of the KeyPointLabels/RectangleLabels tags
    interface: Any = field(default=None, compare=False, repr=False)

    def match_label(self, label: str) -> str:
        """The BrushLabels value a smart-tool label stands for (exact, then case-insensitive)."""
        if label in self.brush_labels:
            return label
        for value in self.brush_labels:
            if value.casefold() == label.casefold():
                return value
        raise LabelConfigError(
            f"label {label!r} is not a value of BrushLabels {self.brush_name!r} "
            f"(values: {', '.join(self.brush_labels)}); add it there so masks can carry it"
        )

    @property
    def capabilities(self) -> list[str]:
        caps = ["brush"]
        caps += ["keypoints"] if self.keypoint_names else []
        caps += ["rectangle"] if self.rectangle_names else []
        caps += ["prompt"] if self.textarea_names else []
        caps += ["verdict"] if self.choices_name else []
        return caps


def _verdict_choices(values: list[str]) -> tuple[str | None, str | None]:
    ok = next((v for v in values if v.strip().casefold() in _OK_WORDS), None)
    bad = next(
        (
            v
            for v in values
            if v != ok and (v.casefold() == "ng" or any(w in v.casefold() for w in _BAD_WORDS))
        ),
        None,
    )
    if ok is not None and bad is None and len(values) == 2:
        bad = next(v for v in values if v != ok)
    return ok, bad


MAX_LABEL_CONFIG_CHARS = 1_000_000  # Label Studio configs are a few KB; thousands of labels stay far below
MAX_PROMPT_CHARS = 500  # label + TextArea / extra-param text (the text encoder reads ~256 tokens)


def parse_label_config(xml: Any) -> LabelConfig:
    """Parse a label config; BadRequest when it is not a string or is huge (checked before the cache, which
    would fail on an unhashable value and keep huge ones), LabelConfigError when it cannot serve this
    backend."""
    if xml is not None and not isinstance(xml, str):
        raise BadRequest(
            f"label_config must be a string (the project's XML label config), got {type(xml).__name__}"
        )
    if xml is not None and len(xml) > MAX_LABEL_CONFIG_CHARS:
        raise BadRequest(f"label_config is {len(xml)} characters, over the limit of {MAX_LABEL_CONFIG_CHARS}")
    return _parse_label_config(xml or "")


@functools.lru_cache(maxsize=64)
def _parse_label_config(xml: str) -> LabelConfig:
    if not xml.strip():
        raise LabelConfigError("label_config is missing or empty")
    try:
        li = LabelInterface(xml)
    except Exception as exc:  # the SDK raises assorted parser errors
        raise LabelConfigError(f"label_config is not valid XML for Label Studio: {exc}") from exc
    brushes = [c for c in li.controls if c.tag == "BrushLabels"]
    if not brushes:
        raise LabelConfigError("label_config has no <BrushLabels> tag; the backend answers with brush masks")
    brush = brushes[0]
    images = {o.name: o for o in li.objects if o.tag == "Image"}
    image_name = next((n for n in brush.to_name if n in images), None)
    if image_name is None:
        raise LabelConfigError(f"<BrushLabels name={brush.name!r}> does not point at an <Image> tag")
    value = images[image_name].value or ""
    labels = tuple(brush.labels or ())
    if not labels:
        raise LabelConfigError(f"<BrushLabels name={brush.name!r}> has no <Label> values")

    def on_image(tag: str) -> list:
        return [c for c in li.controls if c.tag == tag and image_name in c.to_name]

    keypoints, rects = on_image("KeyPointLabels"), on_image("RectangleLabels")
    choices = on_image("Choices")
    ok, bad = _verdict_choices(list(choices[0].labels)) if choices else (None, None)
    verdict = ok is not None and bad is not None
    smart = tuple(dict.fromkeys(lbl for c in keypoints + rects for lbl in (c.labels or ())))
    return LabelConfig(
        image_name=image_name,
        image_key=value.lstrip("$"),
        brush_name=brush.name,
        brush_labels=labels,
        keypoint_names=tuple(c.name for c in keypoints),
        rectangle_names=tuple(c.name for c in rects),
        textarea_names=tuple(c.name for c in on_image("TextArea")),
        choices_name=choices[0].name if verdict else None,
        ok_choice=ok if verdict else None,
        anomalous_choice=bad if verdict else None,
        smart_labels=smart,
        interface=li,
    )


def check_smart_labels(cfg: LabelConfig) -> None:
    """Every label of the smart tools must exist in BrushLabels (checked at /setup)."""
    unknown = []
    for label in cfg.smart_labels:
        try:
            cfg.match_label(label)
        except LabelConfigError:
            unknown.append(label)
    if unknown:
        raise LabelConfigError(
            f"labels {unknown} of the KeyPointLabels/RectangleLabels tags are missing from BrushLabels "
            f"{cfg.brush_name!r} (values: {', '.join(cfg.brush_labels)})"
        )


@dataclass(frozen=True)
class InteractiveRequest:
    """One smart request, validated before any image work: clicks and box in percent of the image (Label
    Studio's unit), converted to pixels by `clicks_px` / `box_px` once the image size is known."""

    label: str  # a BrushLabels value
    clicks_pct: tuple[tuple[float, float, bool], ...]  # (x %, y %, positive)
    box_pct: tuple[float, float, float, float] | None  # (x0 %, y0 %, x1 %, y1 %)
    prompt: str

    def clicks_px(self, width: int, height: int) -> list[Click]:
        """Clicks as pixel indices (model/types.py: pixel i's centre is at i). Label Studio's percent is of the
        continuous image plane, where pixel i spans [i, i + 1): a click at p lands on p - 0.5, so a click anywhere
        inside pixel i rounds to i, and one at its centre is exactly i (the benchmark's simulated click)."""
        return [Click(_to_px(x, width, 0.5), _to_px(y, height, 0.5), positive) for x, y, positive in self.clicks_pct]

    def box_px(self, width: int, height: int) -> Box | None:
        """The rectangle's edges on the continuous plane (x1 = last column + 1, as the benchmark's `gt_box`)."""
        if self.box_pct is None:
            return None
        x0, y0, x1, y1 = self.box_pct
        return (_to_px(x0, width), _to_px(y0, height), _to_px(x1, width), _to_px(y1, height))


def _percent(value: dict, key: str, default: float | None = None) -> float:
    raw = value.get(key, default)
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise BadRequest(f"context region value {key!r} must be a number, got {type(raw).__name__}")
    try:
        number = float(raw)
    except (ValueError, OverflowError):
        raise BadRequest(f"context region value {key!r} must be a number, got {str(raw)[:40]!r}") from None
    if not math.isfinite(number):
        raise BadRequest(f"context region value {key!r} must be finite, got {str(raw)[:40]!r}")
    return number


def _inside(x: float, y: float, what: str) -> None:
    if not (0.0 <= x <= 100.0 and 0.0 <= y <= 100.0):
        raise BadRequest(f"{what} at x={x:.2f}%, y={y:.2f}% lies outside the image (0-100%)")


def _to_px(pct: float, size: int, shift: float = 0.0) -> float:
    """Percent -> px (minus `shift`), rounded to 1e-6 px: the round trip px / size * 100 / 100 * size otherwise
    leaves float noise (62 -> 62.000000000000014) that moves the edge pixels of the click disks the predictors
    draw."""
    return min(max(round(pct / 100.0 * size - shift, 6), 0.0), size - 1.0)


def _region_label(region: dict, kind: str) -> str:
    labels = (region.get("value") or {}).get(kind) or []
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], str):
        raise BadRequest(
            f"a {kind} region of the context carries no label: select a label of the smart tool before "
            "clicking (Label Studio drops the selection after each smart region)"
        )
    return labels[0]


def region_texts(value: dict) -> list[str]:
    text = value.get("text", [])
    return [t.strip() for t in (text if isinstance(text, list) else [text]) if isinstance(t, str) and t.strip()]


def parse_context(
    context: Any, cfg: LabelConfig, extra_prompt: str = "", max_clicks: int = 50
) -> InteractiveRequest | None:
    """Every keypoint (positive unless is_positive is false), at most one rectangle (the last one wins), and
    the TextArea text of the context (Label Studio 1.23.2's editor sends none; `extra_prompt`, the project's
    prompt from extra_params, stands in). None when the context holds no smart region at all: the editor
    sends such a context after a submit, and it is answered with an empty prediction, not an error.
    More than `max_clicks` keypoints (ADCLICK_MAX_CLICKS) is a BadRequest: the clicks are replayed one by one,
    so the work grows faster than their number (measured 1.6 s for 50 clicks, 109 s for 600)."""
    if not isinstance(context, dict):
        raise BadRequest("context must be an object with a result list")
    regions = context.get("result", [])
    if regions is None:
        regions = []
    if not isinstance(regions, list):
        raise BadRequest("context.result must be a list of regions")
    clicks: list[tuple[float, float, bool]] = []
    box: tuple[float, float, float, float] | None = None
    labels: list[str] = []
    texts: list[str] = []
    for region in regions:
        if not isinstance(region, dict):
            raise BadRequest("each context.result item must be an object")
        kind = str(region.get("type", "")).lower()
        value = region.get("value")
        if not isinstance(value, dict):
            raise BadRequest(f"context region of type {kind[:40]!r} has no value object")
        if kind == "keypointlabels":
            if len(clicks) >= max_clicks:
                raise BadRequest(
                    f"context holds more than {max_clicks} clicks, the limit per request "
                    "(ADCLICK_MAX_CLICKS); start a new region or raise the limit"
                )
            x, y = _percent(value, "x"), _percent(value, "y")
            _inside(x, y, "click")
            positive = region.get("is_positive", value.get("is_positive", True))
            clicks.append((x, y, positive is not False))
            labels.append(_region_label(region, kind))
        elif kind == "rectanglelabels":
            x, y = _percent(value, "x"), _percent(value, "y")
            w, h = _percent(value, "width", 0.0), _percent(value, "height", 0.0)
            _inside(x, y, "rectangle corner")
            _inside(x + w, y + h, "rectangle corner")
            if box is not None:
                logger.info("context holds more than one rectangle; using the last one")
            box = (x, y, x + w, y + h)
            labels.append(_region_label(region, kind))
        elif kind == "textarea":
            texts += region_texts(value)
        else:
            logger.debug("ignoring a context region of type %r", kind)
    if not clicks and box is None:
        return None
    distinct = list(dict.fromkeys(labels))
    if len(distinct) > 1:
        raise BadRequest(f"context mixes several labels {distinct}; send one label per request")
    label = cfg.match_label(distinct[0])
    words = texts or ([extra_prompt.strip()] if extra_prompt.strip() else [])
    prompt = ", ".join([label] + words)[:MAX_PROMPT_CHARS]
    return InteractiveRequest(label=label, clicks_pct=tuple(clicks), box_pct=box, prompt=prompt)


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def brush_region(mask: np.ndarray, label: str, cfg: LabelConfig, score: float) -> dict:
    """One `brushlabels` result item (RLE of the (H, W) bool mask) for a BrushLabels value."""
    height, width = mask.shape
    rle = mask2rle(np.where(mask, 255, 0).astype(np.uint8))
    return {
        "id": _region_id(),
        "from_name": cfg.brush_name,
        "to_name": cfg.image_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": [int(v) for v in rle], "brushlabels": [label]},
        "score": round(float(score), 4),
        "readonly": False,
    }


def choice_region(choice: str, cfg: LabelConfig, score: float) -> dict:
    return {
        "id": _region_id(),
        "from_name": cfg.choices_name,
        "to_name": cfg.image_name,
        "type": "choices",
        "value": {"choices": [choice]},
        "score": round(float(score), 4),
    }


def prediction(result: list[dict], score: float, model_version: str) -> dict:
    return {"model_version": model_version, "score": round(float(score), 4), "result": result}


def validation_errors(cfg: LabelConfig, pred: dict) -> list[str]:
    """The SDK's own check of a prediction against the label config (empty list = valid)."""
    return list(cfg.interface.validate_prediction(pred, return_errors=True))
