"""Full-resolution boundary refinement (model/refine.py): a coarse blob on a sharp defect snaps to its edges."""
from dataclasses import replace

import cv2
import numpy as np
import pytest

from model.refine import RefineConfig, RefinedPredictor, refine_prob, state_image
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
    img, truth, prob = scene
    out = refine_prob(img, prob, [Click(110, 82, True), Click(92, 72, False)], cfg=GRABCUT)
    assert out[72, 92] <= 0.49 and out[82, 110] > 0.49


@pytest.mark.parametrize("cfg", [RefineConfig(), GRABCUT], ids=["guided", "grabcut"])
def test_box_limits_the_refined_mask(scene, cfg):
    img, truth, prob = scene
    box = (90.0, 70.0, 109.0, 93.0)  # the defect's left half
    out = refine_prob(img, prob, [Click(100, 82, True)], box=box, cfg=cfg)
    mask = out > 0.49
    assert mask[78:90, 95:108].mean() > 0.9
    assert not mask[:, 111:].any() and not mask[:69].any()


def test_nothing_to_refine_returns_the_map_unchanged(scene):
    img, truth, prob = scene
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
    assert state_image(state) is img
    nested = type("AdState", (), {"residual": state})()  # AdClickState carries the image in .residual
    assert state_image(nested) is img
    res = pred.predict(state, [Click(110, 82, True)])
    assert np.array_equal(res.mask, res.prob > 0.49) and _iou(res.mask, truth) > 0.9
    assert pred.detect(state).anomaly_map is prob  # detection (no clicks) is not refined
    bare = pred.predict(type("S", (), {})(), [Click(110, 82, True)])  # a state without its image
    assert np.array_equal(bare.prob, prob)
