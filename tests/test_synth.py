"""Synthetic anomalies: every kind changes the image where (and mostly only where) its mask says."""
from __future__ import annotations

import cv2
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


def test_faint_areas_are_large_soft_and_low_contrast(image):
    """The faint kind: a large area (several % of the image) shifted by a few grey levels only."""
    rng = np.random.default_rng(11)
    shares = []
    for _ in range(8):
        out, mask = GENERATORS["faint"](image, rng, ())
        diff = np.abs(out.astype(int) - image.astype(int)).max(-1)
        shares.append(mask.mean())
        assert 2 <= np.median(diff[mask]) <= 20  # a shift of 4-16 levels, uneven
    assert min(shares) >= 0.01 and np.median(shares) >= 0.05 and max(shares) <= 0.6


def test_cracks_are_long_and_thin(image):
    rng = np.random.default_rng(5)
    _out, mask = GENERATORS["crack"](image, rng, ())
    depth = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    assert np.percentile(depth[mask], 90) <= 3.0  # 1-3 px wide (where it does not cross itself)
    ys, xs = np.nonzero(mask)
    assert max(np.ptp(ys), np.ptp(xs)) >= 20  # long: spans tens of pixels on this 160x200 image


def test_border_defects_touch_the_image_border(image):
    rng = np.random.default_rng(2)
    for _ in range(6):
        syn = synthesize(image, rng, n_defects=1, kinds=("hole", "contamination"), at_border=1.0)
        m = syn.masks[0]
        assert m[:4].any() or m[-4:].any() or m[:, :4].any() or m[:, -4:].any()


def test_multi_draws_several_separate_defects_of_one_kind_under_one_label(image):
    rng = np.random.default_rng(4)
    syn = synthesize(image, rng, kinds=("hole",), multi=1.0)
    assert len(syn.kinds) >= 2 and set(syn.kinds) == {"hole"}
    union = np.any(syn.masks, axis=0)
    assert cv2.connectedComponents(union.astype(np.uint8))[0] - 1 >= 2


def test_products_of_other_sizes_are_brought_to_the_training_grid():
    from model.training.prepare import TEXTURE_SIZE, fit_to_grid

    wide = np.zeros((460, 1130, 3), np.uint8)
    wide[:, :565] = 200  # left half bright: after the quarter turn it is the bottom... or top half
    out = fit_to_grid(wide)
    assert out.shape[:2] == TEXTURE_SIZE
    assert len(np.unique(out[..., 0])) >= 2  # both halves survive the centre crop
    same = np.zeros(TEXTURE_SIZE + (3,), np.uint8)
    assert fit_to_grid(same) is same
