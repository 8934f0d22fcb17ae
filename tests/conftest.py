"""Shared fixtures: tiny synthetic textures with painted defects (no ../shared data needed)."""
from __future__ import annotations

import numpy as np
import pytest


def texture(h: int = 96, w: int = 128, period: int = 16, shift: tuple[int, int] = (0, 0), seed: int = 0,
            noise: float = 4.0) -> np.ndarray:
    """A regular texture: bright rounded studs on a darker ribbed background, plus mild noise; uint8 RGB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy + shift[0], xx + shift[1]
    ribs = 60 + 25 * np.sin(2 * np.pi * yy / (period / 2))
    cy, cx = (yy % period) - period / 2, (xx % period) - period / 2
    studs = 110 * np.exp(-(cy ** 2 + cx ** 2) / (2 * (period / 6) ** 2))
    g = ribs + studs + rng.normal(0, noise, (h, w))
    img = np.stack([g, g * 0.9 + 10, g * 0.8 + 20], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def structured(h: int = 96, w: int = 128, seed: int = 0, jitter: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A non-periodic layout: eight different marks (shape x colour) at fixed positions, like the parts of one
    object, on a flat background with mild noise; each mark occurs once. (48, 64) is left empty."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 40, np.float32) + rng.normal(0, 3, (h, w, 3))
    colours = [(220, 60, 60), (60, 220, 60), (60, 60, 230), (220, 220, 60), (60, 220, 220), (220, 60, 220),
               (240, 240, 240), (140, 90, 30)]
    places = [(16, 16), (16, 64), (16, 104), (48, 24), (48, 104), (80, 16), (80, 64), (80, 104)]
    for k, ((y, x), col) in enumerate(zip(places, colours)):
        y, x = y + jitter[0], x + jitter[1]
        if k % 3 == 0:
            img[y - 6:y + 6, x - 6:x + 6] = col
        elif k % 3 == 1:
            img[y - 2:y + 2, x - 8:x + 8] = col
            img[y - 8:y + 8, x - 2:x + 2] = col
        else:
            img[y - 8:y + 8, x - 3:x + 3] = col
    return np.clip(img, 0, 255).astype(np.uint8)


def paint_defect(img: np.ndarray, y: int, x: int, r: int = 6, value=(250, 250, 250)) -> tuple[np.ndarray, np.ndarray]:
    """A copy of img with a bright irregular blob at (y, x); returns (image, bool mask)."""
    out = img.copy()
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    mask = ((yy - y) / r) ** 2 + ((xx - x) / (r * 1.4)) ** 2 <= 1.0
    out[mask] = value
    return out, mask


@pytest.fixture(scope="session")
def normal_textures() -> list[np.ndarray]:
    """Six defect-free textures, each slightly shifted like real captures."""
    shifts = [(0, 0), (1, 2), (2, -1), (-2, 1), (3, 3), (-1, -3)]
    return [texture(shift=s, seed=i) for i, s in enumerate(shifts)]


@pytest.fixture(scope="session")
def defect_texture() -> tuple[np.ndarray, np.ndarray]:
    """A texture (not among the normals) with a painted defect and its mask."""
    return paint_defect(texture(shift=(1, 1), seed=99), y=52, x=70)
