"""Inference side of ADClick-Seg: block maps -> image maps, per-label thresholds, evaluation, checkpoints,
and `SegDetector`, the batch pre-annotation detector of one trained project version."""
from __future__ import annotations

import logging
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from sklearn.metrics import precision_recall_curve

from model import metrics
from model.modeling.adclick_seg import ARCH, AdClickSeg, SegConfig, SegEnsemble, build_seg
from model.seg.data import ANY, SegExample, seg_tokens
from model.types import AnomalyResult

logger = logging.getLogger(__name__)


class HasResidual(Protocol):
    """What `detect` needs of a residual-engine state (`model.engine.residuals.ResidualState` has it)."""

    @property
    def residual(self) -> Any: ...  # (C, h, w) signed residual tokens, torch tensor or numpy array

    @property
    def features(self) -> Any: ...  # (C, h, w) the image's feature tokens, or None (trained without them)

    @property
    def image_shape(self) -> tuple[int, int] | None: ...  # (H, W), or None (then `detect` needs image_size)


def predict_grid(model: AdClickSeg | SegEnsemble, residual: torch.Tensor, prompts: torch.Tensor,
                 flips: int = 2) -> np.ndarray:
    """(C, h, w) residual -> (L, h, w) float32 defect probabilities, one map per prompt, averaged over
    `flips` test-time flips (1 = none, 2 = + horizontal, 4 = + vertical and both)."""
    x = torch.as_tensor(residual).float()[None]
    dims = [[], [-1], [-2], [-2, -1]][: max(1, min(flips, 4))]
    with torch.inference_mode():
        probs = [torch.sigmoid(model(torch.flip(x, d) if d else x, prompts)) for d in dims]
        probs = [torch.flip(p, d) if d else p for p, d in zip(probs, dims)]
    return torch.stack(probs).mean(0)[0].numpy().astype(np.float32)


SMOOTH_SIGMA = 4.0  # px, Gaussian smoothing at image resolution (as the residual engine's anomaly map)


def to_image(grid: np.ndarray, size: tuple[int, int], sigma: float = SMOOTH_SIGMA) -> np.ndarray:
    """(h, w) block map -> (H, W) map: bilinear (the token grid spans the whole image), then smoothed."""
    H, W = size
    out = cv2.resize(grid.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    return out.astype(np.float32)


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray, default: float = 0.5) -> float:
    """Threshold maximising F1 of `scores >= t` against boolean `labels` (default when no positive)."""
    if not labels.any() or labels.all():
        return default
    prec, rec, thr = precision_recall_curve(labels.ravel(), scores.ravel())
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
    return float(thr[int(np.argmax(f1))])


def choose_thresholds(model: AdClickSeg | SegEnsemble, examples: list[SegExample], labels: list[str],
                      prompts: torch.Tensor, scale: int = 4) -> dict[str, float]:
    """Per-map F1-optimal pixel thresholds on the mask-labelled (and OK) examples, at 1/`scale` resolution.
    A label without any mask gets the any-defect threshold."""
    keys = [ANY, *labels]
    scores: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    gts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for ex in examples:
        if not ex.masks and ex.verdict is not False:
            continue
        H, W = ex.image_size
        size = (max(1, H // scale), max(1, W // scale))
        probs = predict_grid(model, ex.tokens, prompts)
        for i, key in enumerate(keys):
            gt = ex.union_mask() if key == ANY else ex.masks.get(key, np.zeros(ex.image_size, bool))
            scores[key].append(to_image(probs[i], size).ravel())
            gts[key].append(cv2.resize(gt.astype(np.uint8), (size[1], size[0]),
                                       interpolation=cv2.INTER_NEAREST).ravel().astype(bool))
    out: dict[str, float] = {}
    for key in keys:
        if scores[key] and np.concatenate(gts[key]).any():
            out[key] = best_f1_threshold(np.concatenate(scores[key]), np.concatenate(gts[key]))
    out.setdefault(ANY, 0.5)
    for key in labels:
        out.setdefault(key, out[ANY])
    return out


def evaluate_maps(maps: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    """pixel_ap, au_pro, pixel_auroc over the pooled pixels; image_auroc from the map maxima."""
    out: dict[str, float] = {"n_images": float(len(maps))}
    if not maps:
        return out
    if any(m.any() for m in masks) and not all(m.all() for m in masks):
        out.update(metrics.pixel_metrics(maps, masks))
    image_labels = [bool(m.any()) for m in masks]
    if len(set(image_labels)) == 2:
        out["image_auroc"] = metrics.image_auroc([float(m.max()) for m in maps], image_labels)
    return out


def evaluate(model: AdClickSeg | SegEnsemble, examples: list[SegExample],
             prompts: torch.Tensor) -> dict[str, float]:
    """Metrics of the any-defect map on held-out examples with masks (or an OK verdict)."""
    maps, masks = [], []
    for ex in examples:
        if not ex.masks and ex.verdict is not False:
            continue
        maps.append(to_image(predict_grid(model, ex.tokens, prompts[:1])[0], ex.image_size))
        masks.append(ex.union_mask())
    return evaluate_maps(maps, masks)


def make_checkpoint(model: AdClickSeg | SegEnsemble, labels: list[str], prompts: torch.Tensor,
                    thresholds: dict[str, float], meta: dict[str, Any],
                    learned_labels: list[str] | None = None) -> dict[str, Any]:
    """`learned_labels`: the labels with at least one mask or box in the training images (default: all)."""
    return {
        "arch": ARCH,  # members: what the module holds (a lone AdClickSeg is one, whatever its cfg says)
        "config": {**model.cfg.to_dict(), "members": len(getattr(model, "members", [model]))},
        "state_dict": model.state_dict(),
        "prompts": prompts.detach().clone(),
        "labels": list(labels),
        "learned_labels": list(labels if learned_labels is None else learned_labels),
        "thresholds": {k: float(v) for k, v in thresholds.items()},
        "meta": meta,
    }


class SegDetector:
    """Batch detector of one trained ADClick-Seg version: `detect(state, labels) -> AnomalyResult`.

    `state` is a residual-engine state (anything with `.residual` (C, h, w), and `.features` (F, h, w) for a
    model trained with features); `image_size` is read from
    `state.image_size` / `state.anomaly_map.shape` when present. Only the labels the version learned (at least
    one mask or box of that label among its training images: `learned_labels`) compete for the any-defect mask,
    pixel by pixel by their own maps; a label it never saw gets no mask, so it cannot win a region by default.
    With no learned label, `masks` holds only the any-defect mask and the caller picks the label."""

    name = ARCH

    def __init__(self, ckpt: dict[str, Any], version: str):
        if ckpt.get("arch") != ARCH:
            raise ValueError(f"checkpoint arch {ckpt.get('arch')!r} is not {ARCH!r}")
        self.model = build_seg(SegConfig(**ckpt["config"]))
        self.model.load_state_dict(ckpt["state_dict"], strict=True)
        self.model.eval()
        self.version = version
        self.labels: list[str] = list(ckpt["labels"])
        self.thresholds: dict[str, float] = dict(ckpt["thresholds"])
        self._prompts = {key: row for key, row in zip([ANY, *self.labels], ckpt["prompts"].float())}
        # versions written before learned_labels was recorded: every label they were given counts as learned
        self.learned: list[str] = [lab for lab in ckpt.get("learned_labels", self.labels) if lab in self._prompts]
        self.meta: dict[str, Any] = dict(ckpt.get("meta", {}))

    def _prompt(self, label: str) -> torch.Tensor | None:
        return self._prompts.get(label)

    def _tokens(self, state: HasResidual) -> torch.Tensor:
        if self.model.cfg.feat_channels <= 0:
            return seg_tokens(state.residual)
        features = state.features
        if features is None:
            raise ValueError(f"{self.version} needs the image's feature tokens (state.features), the state has none")
        return seg_tokens(state.residual, features)

    def detect(self, state: HasResidual, labels: list[str] | None = None,
               image_size: tuple[int, int] | None = None) -> AnomalyResult:
        labels = list(self.labels if labels is None else labels)
        size = image_size or state.image_shape
        if size is None:
            raise ValueError("image size unknown: pass image_size or a state with image_shape")
        size = (int(size[0]), int(size[1]))
        rows = [self._prompt(ANY)]
        keyed = [lab for lab in labels if lab in self.learned]
        rows += [self._prompts[lab] for lab in keyed]
        probs = predict_grid(self.model, self._tokens(state), torch.stack(rows))
        any_map = to_image(probs[0], size)
        any_mask = any_map >= self.thresholds.get(ANY, 0.5)
        masks: dict[str, np.ndarray] = {ANY: any_mask}
        label_scores: dict[str, float] = {}
        if keyed:
            label_maps = np.stack([to_image(p, size) for p in probs[1:]])
            winner = np.argmax(label_maps, axis=0)
            for i, lab in enumerate(keyed):
                masks[lab] = any_mask & (winner == i)
                label_scores[lab] = float(probs[1 + i].max())
        return AnomalyResult(anomaly_map=any_map, score=float(any_map.max()), masks=masks,
                             label_scores=label_scores)
