"""Training data of the learned ADClick network: synthetic defects + their residuals, and click sampling.

`build_samples` draws synthetic defects (model/training/synth.py) over defect-free source images and runs a
residual-producing function on each (the residual engine against a bank that excludes the source image),
keeping what training needs at reduced size: residual tokens and grid (float16), optional image features,
the half-size image and half-size instance masks. `save_samples`/`load_samples` cache them on disk as one
torch file (weights_only-safe tensors and plain lists).

Click sampling follows RITM's recipe in a light form: 1-3 positive points inside the target (biased to its
interior), 0-3 negative points (around the target, on other defects, anywhere), then 0-3 rounds of
error-driven clicks by the standard simulator fed with the previous prediction (done in the training loop).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from model.interactive.clicks import half
from model.training.synth import KINDS, synthesize
from model.types import Click

logger = logging.getLogger(__name__)

# image (H, W, 3) uint8 -> residual (C, h, w), grid (h, w), features (C_f, h, w) or None
ResidualFn = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


@dataclass
class Sample:
    residual: torch.Tensor  # (C, h, w) float16
    grid: torch.Tensor  # (h, w) float16
    features: torch.Tensor | None  # (C_f, h, w) float16 or None
    image: torch.Tensor  # (3, H/2, W/2) uint8
    masks: torch.Tensor  # (n, H/2, W/2) bool, one per defect instance
    kinds: list[str]
    product: str


def half_mask(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    small = cv2.resize(mask.astype(np.float32), ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)
    return small >= 0.5


def synth_one(source: np.ndarray, rng: np.random.Generator, textures: Sequence[np.ndarray] = (),
              kinds: Sequence[str] = KINDS, at_border: float = 0.0,
              multi: float = 0.0) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """One synthetic defect image over `source` (flipped half the time): (image, half-size masks, kinds).
    `at_border` and `multi`: the chances of a defect cut by the image border and of several defects of one
    kind (see synth.synthesize)."""
    base = source[:, ::-1].copy() if rng.random() < 0.5 else source
    syn = synthesize(base, rng, textures, kinds=kinds, at_border=at_border, multi=multi)
    return syn.image, [half_mask(m) for m in syn.masks], list(syn.kinds)


def to_sample(image: np.ndarray, masks: Sequence[np.ndarray], kinds: Sequence[str], residual_fn: ResidualFn,
              product: str = "") -> Sample | None:
    """The training sample of one synthetic image (its residuals computed here); None when every defect
    vanished at half size."""
    keep = [j for j, m in enumerate(masks) if m.any()]
    if not keep:
        return None
    residual, grid, feats = residual_fn(image)
    return Sample(
        residual=residual.detach().to("cpu", torch.float16),
        grid=grid.detach().to("cpu", torch.float16),
        features=None if feats is None else feats.detach().to("cpu", torch.float16),
        image=torch.from_numpy(half(image)).permute(2, 0, 1).contiguous(),
        masks=torch.from_numpy(np.stack([masks[j] for j in keep])),
        kinds=[kinds[j] for j in keep],
        product=product,
    )


def build_samples(
    sources: Sequence[np.ndarray],
    residual_fn: ResidualFn,
    n: int,
    rng: np.random.Generator,
    textures: Sequence[np.ndarray] = (),
    product: str = "",
    kinds: Sequence[str] = KINDS,
) -> list[Sample]:
    """`n` synthetic samples over `sources` (cycled in random order) with their residuals."""
    out: list[Sample] = []
    for i in range(n):
        image, masks, ks = synth_one(sources[int(rng.integers(len(sources)))], rng, textures, kinds)
        sample = to_sample(image, masks, ks, residual_fn, product)
        if sample is not None:
            out.append(sample)
        if (i + 1) % 50 == 0:
            logger.info("built %d/%d synthetic samples (%s)", i + 1, n, product or "-")
    return out


def save_samples(samples: list[Sample], path: Path) -> None:
    from model.checkpoint import atomic_save

    payload = {f: [getattr(s, f) for s in samples] for f in Sample.__dataclass_fields__}
    atomic_save(payload, path)


def load_samples(path: Path) -> list[Sample]:
    """Memory-mapped: the tensors are read from the page cache on demand, so several runs (the main model and
    an ablation) share one copy of a multi-GB training set instead of each holding its own."""
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    n = len(payload["residual"])
    return [Sample(**{f: payload[f][i] for f in Sample.__dataclass_fields__}) for i in range(n)]


def _interior_points(region: np.ndarray, k: int, rng: np.random.Generator, interior: float) -> list[tuple]:
    if k <= 0 or not region.any():
        return []
    dist = cv2.distanceTransform(np.pad(region.astype(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    ok = dist >= interior * dist.max()
    ys, xs = np.nonzero(ok if ok.any() else region)
    idx = rng.choice(len(ys), size=min(k, len(ys)), replace=False)
    return [(float(xs[i]), float(ys[i])) for i in idx]


def initial_clicks(target: np.ndarray, others: np.ndarray, rng: np.random.Generator) -> list[Click]:
    """RITM-style first clicks on a mask grid: positives inside `target`, negatives near it / on `others`."""
    n_pos = 1 + int(rng.random() < 0.3) + int(rng.random() < 0.1)
    clicks = [Click(x, y, True) for x, y in _interior_points(target, n_pos, rng, rng.uniform(0.2, 0.7))]
    n_neg = int(rng.choice([0, 0, 1, 1, 2, 3]))
    if n_neg:
        r = int(rng.integers(2, 8))
        band = cv2.dilate(target.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
        pools = [band & ~target, others & ~target, ~target]
        for _ in range(n_neg):
            pool = pools[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
            clicks += [Click(x, y, False) for x, y in _interior_points(pool, 1, rng, 0.0)]
    return clicks
