"""Per-project click calibration, measured on the project's own defect-free references when its bank is built.

The served map blends the learned network with the zero-training click mode (`BlendPredictor`): how much of
each (the network's `weight`) and at which blended level a pixel joins the mask (`threshold`) depend on the
product: how strong its residuals are, how blurred the map is against the size of its defects. Both are
calibrated here instead of being constants tuned on one data set:

1. up to `samples` references are held back in turn; each gets one synthetic defect of the training set's
   kinds (model/training/synth.py, in turn: hole, contamination, discoloration, scratch, cut, deformation,
   faint area, crack) and is matched against the bank without its own views (`exclude`, leave-one-out: a
   reference is never its own match);
2. the standard simulated annotator clicks (model.interactive.clicks.next_click): a first click, then a
   corrective second click on the error the default blend leaves;
3. every (weight, threshold) of a small grid is scored by the mean IoU of the blended mask after clicks 1 and
   2; the best is kept when it beats the defaults by `min_gain`, else the defaults stay (a handful of
   synthetic defects must not move the product away from defaults that were chosen on real data).

The result is a small dict (`ClickCalibration.to_dict`) stored in bank.meta["click_calibration"] and in a
JSON file next to the cached bank (keyed by the bank and the predictor's version, so other weights calibrate
again); BlendPredictor reads it. Costs about half a second per sample on 2 cores (one backbone pass each).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.atomic import write_json_atomic
from model.engine.residuals import load_image
from model.interactive.clicks import next_click
from model.metrics import iou
from model.types import Click

logger = logging.getLogger(__name__)

CALIBRATION_KINDS = ("hole", "contamination", "discoloration", "scratch", "cut", "deformation", "faint", "crack")


@dataclass(frozen=True)
class CalibrationConfig:
    samples: int = 12  # synthetic defects (one per held-back reference, references reused when fewer)
    weights: tuple[float, ...] = (0.25, 0.5, 0.75)  # the network's share in the blend
    thresholds: tuple[float, ...] = (0.35, 0.42, 0.49, 0.56, 0.63)  # blended level that makes the mask
    default_weight: float = 0.5
    default_threshold: float = 0.49
    min_gain: float = 0.02  # mean IoU a setting must add over the defaults to replace them
    clicks: int = 2  # simulated clicks per sample (the first and a corrective one)
    seed: int = 0


@dataclass(frozen=True)
class ClickCalibration:
    weight: float
    threshold: float
    iou: float  # mean IoU of the synthetic samples with (weight, threshold)
    default_iou: float  # ... with the defaults
    samples: int
    seconds: float
    grid: dict[str, float]  # "weight/threshold" -> mean IoU

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def changed(self) -> bool:
        return self.iou > self.default_iou


def held_back(keys: Sequence[str], n: int) -> list[int]:
    """Indices of up to `n` references spread over the bank's source order."""
    if not keys or n <= 0:
        return []
    step = max(1, len(keys) // n)
    return list(range(0, len(keys), step))[:n]


def synthetic_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """(image, mask) with one synthetic defect of `kind` over `image`; None when it came out under 16 px."""
    from model.training.synth import synthesize

    syn = synthesize(image, rng, (), n_defects=1, kinds=(kind,))
    if not syn.masks or int(syn.masks[0].sum()) < 16:
        return None
    return syn.image, syn.masks[0]


def calibrate(make_blend: Callable[[Any], Any], bank, references: Iterable[tuple[str, Any]],
              cfg: CalibrationConfig | None = None) -> ClickCalibration | None:
    """Calibrate the blend of `make_blend(bank) -> BlendPredictor` on `references` ((content hash, RGB image or
    path) of the bank's sources; only the held-back ones are read). None when fewer than two references (no
    leave-one-out possible)."""
    cfg = cfg or CalibrationConfig()
    start = time.perf_counter()
    present = set(bank.source_keys)
    refs = [(k, im) for k, im in dict(references).items() if k in present]
    if len(refs) < 2:
        return None
    order = held_back([k for k, _ in refs], cfg.samples)
    combos = [(w, t) for w in cfg.weights for t in cfg.thresholds]
    if (cfg.default_weight, cfg.default_threshold) not in combos:
        combos.append((cfg.default_weight, cfg.default_threshold))
    scores: dict[tuple[float, float], list[float]] = {c: [] for c in combos}
    blend = make_blend(bank)
    blend.use_calibration = False
    n = 0
    for i in range(cfg.samples):
        key, item = refs[order[i % len(order)]]
        kind = CALIBRATION_KINDS[i % len(CALIBRATION_KINDS)]
        made = synthetic_defect(load_image(item), kind, np.random.default_rng(cfg.seed * 7919 + i))
        if made is None:
            continue
        defect, gt = made
        learned = blend.learned
        state = learned.state_of(defect, learned.engine.compute(defect, bank, exclude=key))
        clicks: list[Click] = []
        pred = np.zeros_like(gt)
        for _ in range(cfg.clicks):
            click = next_click(gt, pred, clicks)
            if click is None:
                break
            clicks.append(click)
            a = blend.learned.predict(state, clicks).prob
            b = blend.click_mode.predict(state.residual, clicks).prob
            for w, t in combos:
                scores[(w, t)].append(iou((w * a + (1 - w) * b) > t, gt))
            d = cfg.default_weight
            pred = (d * a + (1 - d) * b) > cfg.default_threshold
        n += 1
    if n == 0:
        return None
    mean = {c: float(np.mean(v)) for c, v in scores.items() if v}
    default = (cfg.default_weight, cfg.default_threshold)
    best = max(mean, key=lambda c: (mean[c], -abs(c[0] - default[0]) - abs(c[1] - default[1])))
    if mean[best] < mean[default] + cfg.min_gain:
        best = default
    out = ClickCalibration(weight=best[0], threshold=best[1], iou=mean[best], default_iou=mean[default],
                           samples=n, seconds=round(time.perf_counter() - start, 2),
                           grid={f"{w:g}/{t:g}": round(v, 4) for (w, t), v in mean.items()})
    logger.info("click calibration on %d synthetic defects over the project's references: weight %.2f, "
                "threshold %.2f (mean IoU %.3f; defaults %.3f) in %.1f s", n, out.weight, out.threshold,
                out.iou, out.default_iou, out.seconds)
    return out


def calibration_path(cache_dir: Path | None, bank_key: str, version: str) -> Path | None:
    if cache_dir is None or not bank_key:
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in version)
    return Path(cache_dir) / f"{bank_key}.calibration-{safe}.json"


def calibrate_bank(make_blend: Callable[[Any], Any], bank, references: Iterable[tuple[str, Any]],
                   version: str, cache_dir: Path | None, cfg: CalibrationConfig | None = None) -> dict | None:
    """bank.meta["click_calibration"] from the JSON file of an earlier run (same bank, same predictor version)
    or calibrated now and written there atomically; None (nothing set) when calibration is not possible.
    `references` may be a generator: it is read only when there is no such file."""
    path = calibration_path(cache_dir, bank.key, version)
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text())
            bank.meta["click_calibration"] = data
            return data
        except (OSError, ValueError):
            logger.warning("unreadable click calibration %s; calibrating again", path)
    result = calibrate(make_blend, bank, references, cfg)
    if result is None:
        return None
    data = result.to_dict()
    bank.meta["click_calibration"] = data
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
    return data
