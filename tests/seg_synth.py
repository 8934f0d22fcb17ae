"""Tiny synthetic residual data for the ADClick-Seg tests: the unsupervised residual norm is fooled by
high-norm nuisance blobs (normal variation), while real defects carry a fixed channel signature."""
from __future__ import annotations

import numpy as np
import torch

from model.seg.data import SegExample

C, GRID, BLOCK = 12, (24, 32), 8  # channels, token grid, pixels per block


def _blob(rng: np.random.Generator, grid: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    r = int(rng.integers(0, grid[0] - size))
    c = int(rng.integers(0, grid[1] - size))
    return r, c, r + size, c + size


def make_example(rng: np.random.Generator, defective: bool, label: str = "scratch") -> SegExample:
    h, w = GRID
    res = rng.normal(0, 1, (C, h, w)).astype(np.float32)
    for _ in range(2):  # nuisance: strong residuals in random directions, not defects
        r0, c0, r1, c1 = _blob(rng, GRID, 3)
        res[:, r0:r1, c0:c1] += rng.normal(0, 2.2, (C, 1, 1))
    mask = np.zeros((h * BLOCK, w * BLOCK), bool)
    if defective:
        r0, c0, r1, c1 = _blob(rng, GRID, 3)
        signature = np.zeros((C, 1, 1), np.float32)
        signature[:3] = 1.6 if label == "scratch" else -1.6
        res[:, r0:r1, c0:c1] += signature
        mask[r0 * BLOCK:r1 * BLOCK, c0 * BLOCK:c1 * BLOCK] = True
    return SegExample(residual=torch.from_numpy(res), image_size=mask.shape,
                      masks={label: mask} if defective else {}, verdict=None if defective else False,
                      key=f"{label}-{rng.integers(1 << 30)}")


def make_set(seed: int, n_def: int, n_ok: int, labels=("scratch",)) -> list[SegExample]:
    rng = np.random.default_rng(seed)
    out = [make_example(rng, True, labels[i % len(labels)]) for i in range(n_def)]
    return out + [make_example(rng, False) for _ in range(n_ok)]
