"""Zero-training click mode: region growing on the residual map, negative clicks carve, a box restricts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.engine.features import BackboneConfig
from model.engine.residuals import ResidualConfig, ResidualEngine, ResidualState
from model.errors import InputError
from model.interactive.clickmode import ClickModeConfig, ResidualClickPredictor, bounded_score
from model.metrics import iou
from model.types import Click

H, W = 80, 120


def blob(y, x, r, amp):
    yy, xx = np.mgrid[0:H, 0:W]
    return amp * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * r ** 2))


def state_of(amap: np.ndarray) -> ResidualState:
    amap = amap.astype(np.float32)
    return ResidualState(torch.zeros(1, 10, 15), torch.zeros(1, 10, 15), np.zeros((10, 15), np.float32), amap,
                         float(amap.max()), amap.shape)


@pytest.fixture()
def two_blobs():
    """Defect A at (30, 30) and a weaker, connected false alarm B at (30, 62)."""
    rng = np.random.default_rng(0)
    amap = 1.0 + 0.05 * rng.standard_normal((H, W)) + blob(30, 30, 6, 4.0) + blob(30, 46, 10, 1.8)
    amap += blob(30, 62, 6, 3.0)
    return amap


@pytest.fixture()
def predictor():
    return ResidualClickPredictor(ResidualEngine(BackboneConfig(input_size=128, device="cpu"), ResidualConfig()),
                                  bank=None)


def test_positive_click_covers_the_clicked_defect(predictor, two_blobs):
    st = state_of(two_blobs)
    res = predictor.predict(st, [Click(31, 29)])  # a few px off the peak
    truth = blob(30, 30, 6, 1.0) > 0.5
    assert res.mask[30, 30] and not res.mask[30, 110] and not res.mask[70, 30]
    assert iou(res.mask, truth) > 0.5
    assert res.prob.shape == (H, W) and res.prob.dtype == np.float32
    assert np.array_equal(res.prob > 0.5, res.mask) and 0 < res.score <= 1


def test_negative_click_removes_its_region(predictor, two_blobs):
    st = state_of(two_blobs)
    low = ResidualClickPredictor(predictor.engine, None, ClickModeConfig(grow_frac=0.2))
    grown = low.predict(st, [Click(30, 30)])
    assert grown.mask[30, 62]  # at a low threshold the false alarm B is merged with A
    carved = low.predict(st, [Click(30, 30), Click(62, 30, positive=False)])
    assert carved.mask[30, 30] and not carved.mask[30, 62]
    assert carved.mask.sum() < grown.mask.sum()


def test_negative_click_on_the_seed_peak_splits_the_region(predictor):
    amap = 1.0 + blob(40, 60, 14, 4.0)
    res = predictor.predict(state_of(amap), [Click(52, 40), Click(68, 40, positive=False)])
    assert res.mask[40, 50] and not res.mask[40, 70]


def test_box_restricts_and_seeds(predictor, two_blobs):
    st = state_of(two_blobs)
    only_box = predictor.predict(st, [], box=(50, 15, 80, 45))  # around B only
    assert only_box.mask[30, 62] and not only_box.mask[30, 30]
    assert not only_box.mask[:, :50].any() and not only_box.mask[:, 81:].any()
    clipped = predictor.predict(st, [Click(30, 30)], box=(20, 20, 40, 40))
    assert clipped.mask[30, 30] and not clipped.mask[:19].any() and not clipped.mask[:, 42:].any()


def test_box_alone_covers_every_anomalous_part_inside(predictor):
    """Issue 12 item 8: a smart rectangle around a defect of several pieces gave only the central blob. With no
    positive click the region is the box's part above its Otsu level; every part above the detect threshold
    is a seed for the learned network; noise is not."""
    rng = np.random.default_rng(3)
    amap = 1.0 + 0.05 * rng.standard_normal((H, W)) + blob(40, 40, 5, 4.0) + blob(40, 75, 4, 2.5)
    amap += blob(20, 58, 3, 2.0)
    box = (25, 10, 95, 60)
    pieces = [(40, 40), (40, 75), (20, 58)]
    whole = predictor.predict(state_of(amap), [], box=box)
    assert all(whole.mask[y, x] for y, x in pieces)
    assert not whole.mask[55, 30] and not whole.mask[12, 90]  # background inside the box stays out
    inside = np.zeros((H, W), bool)
    inside[10:60, 25:95] = True
    seeds = predictor.box_seeds(amap, inside, float(np.median(amap)))
    assert sorted(seeds) == sorted(pieces)
    peak_only = ResidualClickPredictor(predictor.engine, None, ClickModeConfig(box_parts=1))
    assert peak_only.box_seeds(amap, inside, float(np.median(amap))) == [(40, 40)]
    carved = predictor.predict(state_of(amap), [Click(75, 40, positive=False)], box=box)
    assert carved.mask[40, 40] and not carved.mask[40, 75]
    noise = 1.0 + 0.05 * rng.standard_normal((H, W)) + blob(40, 40, 5, 4.0)
    assert len(predictor.box_seeds(noise, np.ones((H, W), bool), float(np.median(noise)))) == 1


def test_no_clicks_no_box_gives_empty_mask(predictor, two_blobs):
    res = predictor.predict(state_of(two_blobs), [])
    assert not res.mask.any() and res.score == 0.0 and (res.prob < 0.5).all()


def test_bad_clicks_and_boxes_are_rejected(predictor, two_blobs):
    st = state_of(two_blobs)
    with pytest.raises(InputError):
        predictor.predict(st, [Click(W + 5, 10)])
    with pytest.raises(InputError):
        predictor.predict(st, [Click(float("nan"), 10)])
    with pytest.raises(InputError):
        predictor.predict(st, [Click(5, 5)], box=(30, 30, 10, 10))


def test_detect_finds_strong_regions_and_nothing_in_noise(predictor, two_blobs):
    found = predictor.detect(state_of(two_blobs))
    assert found.masks[""][30, 30] and found.masks[""][30, 62] and not found.masks[""][70, 100]
    noise = 1.0 + 0.05 * np.random.default_rng(1).standard_normal((H, W))
    assert predictor.detect(state_of(noise)).masks == {}


def test_end_to_end_on_synthetic_defect(normal_textures, defect_texture):
    engine = ResidualEngine(BackboneConfig(input_size=256, device="cpu"), ResidualConfig())  # 4 px cells
    pred = ResidualClickPredictor(engine, engine.build_bank(normal_textures))
    assert pred.version == f"residual-click-{engine.config_hash()}"
    img, mask = defect_texture
    st = pred.set_image(img)
    ys, xs = np.nonzero(mask)
    res = pred.predict(st, [Click(float(xs.mean()), float(ys.mean()))])
    assert iou(res.mask, mask) > 0.4 and res.mask[int(ys.mean()), int(xs.mean())]
    assert len(pred.bank.meta["normal_scores"]) == len(normal_textures)  # leave-one-out calibration
    found = pred.detect(st)
    assert found.masks[""][mask].mean() > 0.5 and found.masks[""].sum() < 0.15 * mask.size
    from tests.conftest import texture
    assert pred.detect(pred.set_image(texture(shift=(2, 1), seed=77))).masks == {}


def test_correcting_click_disk_reaches_the_mask_edge(predictor):
    amap = 1.0 + blob(40, 40, 5, 4.0)
    first = predictor.predict(state_of(amap), [Click(40, 40)])
    edge = max(x for x in range(W) if first.mask[40, x])
    far = edge + 12  # a positive click 12 px right of the mask, where the map sees nothing
    second = predictor.predict(state_of(amap), [Click(40, 40), Click(far, 40)])
    assert second.mask[40, edge + 6]  # the gap between mask and click is filled ...
    assert not second.mask[40, min(W - 1, far + 14)]  # ... but the disk stays bounded
    lone = predictor.predict(state_of(amap), [Click(40, 40), Click(100, 70)])  # far from the mask
    assert lone.mask[70, 100] and lone.mask[70, 100 + 6] and not lone.mask[70, 100 + 8]


def test_detect_score_is_bounded_and_keeps_the_order(predictor, two_blobs):
    """Label Studio shows a prediction score x 100 as a percentage: the raw residual magnitude gave "2844.61%".
    The bounded score stays in [0, 1), is 0.5 at the detect threshold and keeps the order of raw magnitudes."""
    result = predictor.detect(state_of(two_blobs))
    assert 0.0 <= result.score < 1.0
    assert result.label_scores[""] == result.score
    raw = [0.0, 0.01, 0.5, 3.0, 28.4, 1e6]
    bounded = [bounded_score(r, 0.5) for r in raw]
    assert all(0.0 <= b < 1.0 for b in bounded)
    assert bounded == sorted(bounded) and len(set(bounded)) == len(bounded)
    assert bounded_score(0.5, 0.5) == pytest.approx(0.5)
