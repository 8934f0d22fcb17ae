"""Full-resolution boundary refinement (model/interactive/refine.py): a coarse blob on a sharp defect snaps to its edges."""
from dataclasses import replace

import cv2
import numpy as np
import pytest

from model.interactive.refine import RefineConfig, RefinedPredictor, refine_prob
from model.types import AnomalyResult, Click, ClickResult
from tests.conftest import texture


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


GRABCUT = RefineConfig(method="grabcut")


def _scene(shift: tuple[int, int]):
    """A bright 24x40 px defect on a dark texture, and the blurry blob a stride-16 map would give, `shift` px off."""
    img = (texture(h=160, w=200, seed=4).astype(np.float32) * 0.4).astype(np.uint8)
    truth = np.zeros((160, 200), bool)
    truth[70:94, 90:130] = True
    img[truth] = (220, 200, 150)
    coarse = cv2.resize(truth.astype(np.float32), (200 // 16, 160 // 16), interpolation=cv2.INTER_AREA)
    prob = cv2.GaussianBlur(cv2.resize(coarse, (200, 160), interpolation=cv2.INTER_LINEAR), (0, 0), 4)
    prob = np.roll(prob / prob.max(), shift, axis=(0, 1)).astype(np.float32)
    return img, truth, prob


@pytest.fixture()
def scene():
    return _scene((4, -5))


def test_guided_filter_moves_a_blurry_boundary_onto_the_image_edge():
    img, truth, prob = _scene((0, 0))
    before = _iou(prob > 0.49, truth)
    out = refine_prob(img, prob, [Click(110, 82, True)])  # default: guided
    after = _iou(out > 0.49, truth)
    assert before < 0.85 and after > 0.92, (before, after)
    assert out.dtype == np.float32 and out.shape == prob.shape and 0 <= out.min() and out.max() <= 1
    # on a flat image the filter has no edge to follow: the region stays where it was (no collapse, no drift)
    flat = np.full_like(img, 90)
    kept = refine_prob(flat, prob, [Click(110, 82, True)]) > 0.49
    assert _iou(kept, prob > 0.49) > 0.9


def test_grabcut_snaps_an_offset_blob_to_the_defect_edges(scene):
    img, truth, prob = scene
    before = _iou(prob > 0.49, truth)
    out = refine_prob(img, prob, [Click(110, 82, True)], cfg=GRABCUT)
    after = _iou(out > 0.49, truth)
    assert before < 0.75 and after > 0.9, (before, after)
    # the soft map keeps its ranking inside each side of the mask: defect pixels above 0.49, the rest below
    assert (out[out > 0.49] >= 0.5).all() and (out[out <= 0.49] <= 0.49).all()
    # no colour contrast: GrabCut may shrink the region towards its sure core, never below min_keep of it
    flat = np.full_like(img, 90)
    flat_mask = refine_prob(flat, prob, [Click(110, 82, True)], cfg=GRABCUT) > 0.49
    assert flat_mask.sum() >= 0.5 * (prob > 0.49).sum() and _iou(flat_mask, prob > 0.49) >= 0.5


def test_grabcut_negative_click_stays_normal_and_positive_click_stays_defect(scene):
    img, _truth, prob = scene
    out = refine_prob(img, prob, [Click(110, 82, True), Click(92, 72, False)], cfg=GRABCUT)
    assert out[72, 92] <= 0.49 and out[82, 110] > 0.49


@pytest.mark.parametrize("cfg", [RefineConfig(), GRABCUT], ids=["guided", "grabcut"])
def test_box_limits_the_refined_mask(scene, cfg):
    img, _truth, prob = scene
    box = (90.0, 70.0, 109.0, 93.0)  # the defect's left half
    out = refine_prob(img, prob, [Click(100, 82, True)], box=box, cfg=cfg)
    mask = out > 0.49
    assert mask[78:90, 95:108].mean() > 0.9
    assert not mask[:, 111:].any() and not mask[:69].any()


def test_nothing_to_refine_returns_the_map_unchanged(scene):
    img, _truth, prob = scene
    empty = prob * 0.3
    assert np.array_equal(refine_prob(img, empty, []), empty)
    small = replace(RefineConfig(), max_pixels=100)  # the crop is larger: left as it is
    assert np.array_equal(refine_prob(img, prob, [Click(110, 82, True)], cfg=small), prob)
    with pytest.raises(ValueError):
        refine_prob(img[:10], prob, [])
    with pytest.raises(ValueError):
        RefineConfig(method="crf")


class _Blob:
    """A base predictor answering the coarse blob whatever the clicks; its state is a ResidualState look-alike."""

    name, version = "blob", "blob-v1"

    def __init__(self, prob):
        self.prob = prob

    def set_image(self, image):
        return type("State", (), {"image": image})()

    def predict(self, state, clicks, box=None, prompt="", previous_mask=None):
        return ClickResult(prob=self.prob, mask=self.prob > 0.49, score=1.0)

    def detect(self, state, labels=None):
        return AnomalyResult(anomaly_map=self.prob, score=1.0, masks={}, label_scores={})


def test_refined_predictor_wraps_any_predictor(scene):
    img, truth, prob = scene
    pred = RefinedPredictor(_Blob(prob), GRABCUT)
    assert pred.version == "blob-v1-refine" and pred.name == "blob+refine"
    state = pred.set_image(img)
    res = pred.predict(state, [Click(110, 82, True)])
    assert np.array_equal(res.mask, res.prob > 0.49) and _iou(res.mask, truth) > 0.9
    assert pred.detect(state).anomaly_map is prob  # detection (no clicks) is not refined
    bare = pred.predict(type("S", (), {"image": None})(), [Click(110, 82, True)])  # a state that kept no image
    assert np.array_equal(bare.prob, prob)


def test_a_click_always_gets_its_own_label_and_the_disk_stops_at_the_mask():
    from model.interactive.refine import respect_clicks

    prob = np.zeros((60, 80), np.float32)
    prob[20:40, 20:40] = 0.9  # the mask: a 20 px square
    # right already (positive inside, negative far outside): the very same array back, nothing moved
    assert respect_clicks(prob, [Click(30, 30, True), Click(70, 50, False)]) is prob
    # a positive click 5 px right of the mask: its pixel joins the mask; the disk reaches the mask, not beyond
    out = respect_clicks(prob, [Click(30, 30, True), Click(45, 30, True)])
    added = (out > 0.49) & ~(prob > 0.49)
    assert out[30, 45] > 0.49 and added.any()
    assert np.hypot(*(np.nonzero(added)[i] - (30, 45)[i] for i in range(2))).max() <= 6.0
    assert (out[prob > 0.49] > 0.49).all()  # the mask stays the mask
    # a negative click 7 px from the nearest unmasked pixel cuts a hole of radius at most 7 px around itself
    hole = respect_clicks(prob, [Click(30, 26, False)])
    removed = (prob > 0.49) & ~(hole > 0.49)
    assert hole[26, 30] <= 0.49 and 20 < removed.sum() <= np.pi * 7.5 ** 2
    # a positive click 2 px from a negative one: the disks of opposite clicks never overlap (radius <= 1 px)
    near = respect_clicks(prob, [Click(50, 50, True), Click(52, 50, False)])
    assert near[50, 50] > 0.49 and not (near[50, 52] > 0.49) and ((near > 0.49) & ~(prob > 0.49)).sum() <= 5
    # the soft ranking inside each side is kept: moved pixels go to 0.5 + p / 2 or p * 0.49
    assert np.isclose(out[30, 45], 0.5) and np.isclose(hole[26, 30], 0.9 * 0.49)


def test_the_refined_predictor_respects_clicks_unless_told_not_to():
    prob = np.zeros((60, 80), np.float32)
    prob[20:40, 20:40] = 0.9

    class _Fixed:
        name, version = "fixed", "fixed-v1"

        def predict(self, state, clicks, box=None, prompt="", previous_mask=None):
            return ClickResult(prob=prob.copy(), mask=prob > 0.49, score=0.9)

    class _State:
        image = np.full((60, 80, 3), 90, np.uint8)

    clicks = [Click(30, 30, True), Click(30, 30 - 4, False)]
    on = RefinedPredictor(_Fixed()).predict(_State(), clicks)
    off = RefinedPredictor(_Fixed(), replace(RefineConfig(), respect_clicks=False)).predict(_State(), clicks)
    assert not on.mask[26, 30] and off.mask[26, 30]
    assert on.mask[30, 30] and on.mask.sum() < off.mask.sum()

