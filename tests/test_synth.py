"""Synthetic anomalies: every kind changes the image where (and mostly only where) its mask says."""
from __future__ import annotations

import numpy as np
import pytest

from model.training.synth import (
    GENERATORS,
    KIND_WORDS,
    KINDS,
    blob,
    foreground,
    perlin,
    skimage_textures,
    synthesize,
)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    base = np.full((160, 200, 3), 90, np.uint8)
    base[40:120, 50:150] = 160  # an "object" brighter than its background
    stripes = 25 * np.sin(np.arange(200) / 2.0)[None, :, None] * np.cos(np.arange(160) / 3.0)[:, None, None]
    return np.clip(base + stripes + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)


def test_perlin_is_bounded_and_varies():
    n = perlin((64, 80), 4, np.random.default_rng(0))
    assert n.shape == (64, 80) and np.abs(n).max() <= 1.5 and n.std() > 0.05


def test_blob_never_empty():
    rng = np.random.default_rng(0)
    assert all(blob(s, rng).any() for s in (6, 12, 40) for _ in range(5))


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_the_image_inside_its_mask(kind, image):
    rng = np.random.default_rng(3)
    out, mask = GENERATORS[kind](image, rng, skimage_textures())
    assert out.shape == image.shape and out.dtype == np.uint8 and mask.dtype == bool
    assert 4 <= mask.sum() < 0.2 * mask.size
    diff = np.abs(out.astype(int) - image.astype(int)).sum(-1)
    assert diff[mask].mean() > 3 * max(diff[~mask].mean(), 0.1)


def test_synthesize_is_seeded_and_prompts_cover_kinds(image):
    a = synthesize(image, np.random.default_rng(7))
    b = synthesize(image, np.random.default_rng(7))
    assert np.array_equal(a.image, b.image) and a.kinds == b.kinds
    assert len(a.masks) == len(a.kinds) >= 1 and all(m.sum() >= 4 for m in a.masks)
    assert set(KIND_WORDS) == set(KINDS)


def test_defects_land_on_the_object(image):
    fg = foreground(image)
    assert fg[80, 100] and not fg[5, 5]
    rng = np.random.default_rng(0)
    on = [synthesize(image, rng, on_object=1.0, n_defects=1, kinds=("hole",)).masks[0] for _ in range(10)]
    centres = [np.argwhere(m).mean(0).astype(int) for m in on]
    assert np.mean([fg[y, x] for y, x in centres]) >= 0.8
