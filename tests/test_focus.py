"""Local corrections (model/interactive/focus.py): a click changes the mask only around itself."""
import cv2
import numpy as np

from model.evaluation.simulate import simulate
from model.interactive.focus import FocusPredictor, local_change
from model.types import Click, ClickResult
from tests.test_seeded import FixedMap

H, W = 120, 160


class Scripted(FixedMap):
    """A base predictor whose map for n clicks is maps[n - 1] (the last one from then on)."""

    name, version = "scripted", "0"

    def __init__(self, maps):
        super().__init__()
        self.maps = [m.astype(np.float32) for m in maps]
        self.calls = 0

    def predict(self, state, clicks, box=None, prompt="", previous_mask=None):
        self.calls += 1
        prob = self.maps[min(len(clicks), len(self.maps)) - 1].copy()
        return ClickResult(prob, prob > 0.49, 0.5)


def disk(cx, cy, r):
    m = np.zeros((H, W), np.uint8)
    cv2.circle(m, (cx, cy), r, 1, -1)
    return m > 0


def image():
    return np.full((H, W, 3), 100, np.uint8)


def test_first_click_is_the_base_result():
    m = disk(60, 60, 10)
    p = FocusPredictor(Scripted([np.where(m, 0.9, 0.1)]))
    out = p.predict(p.set_image(image()), [Click(60.0, 60.0, True)], previous_mask=None)
    assert (out.mask == m).all()


def test_negative_click_removes_spill_but_not_the_defect_the_base_map_dropped():
    defect = disk(50, 60, 12)
    spill = disk(80, 60, 14) & ~defect
    first = np.where(defect | spill, 0.9, 0.05)
    second = np.full((H, W), 0.05)  # the base map reacts to the negative click by dropping everything
    p = FocusPredictor(Scripted([first, second]))
    state = p.set_image(image())
    c1, c2 = Click(50.0, 60.0, True), Click(88.0, 60.0, False)
    m1 = p.predict(state, [c1]).mask
    m2 = p.predict(state, [c1, c2], previous_mask=m1).mask
    assert m2[defect].mean() == 1.0  # nearer the positive click: kept
    assert m2[spill].mean() < 0.45  # the spill nearer the negative click is gone
    assert not m2[60, 88]


def test_positive_click_only_adds_and_only_what_touches_it():
    defect = disk(40, 60, 10)
    missed = disk(100, 60, 10)
    far = disk(140, 20, 8)
    first = np.where(defect, 0.9, 0.05)
    # after the 2nd click the base map finds the missed part, shifts the first defect and adds a far blob
    second = np.where(disk(46, 60, 10) | missed | far, 0.9, 0.05)
    p = FocusPredictor(Scripted([first, second]))
    state = p.set_image(image())
    c1, c2 = Click(40.0, 60.0, True), Click(100.0, 60.0, True)
    m1 = p.predict(state, [c1]).mask
    m2 = p.predict(state, [c1, c2], previous_mask=m1).mask
    assert m2[missed].all()  # what the click asked for
    assert m2[defect].all()  # a positive click never removes
    assert not m2[far].any()  # a change not connected to the click is ignored
    assert (m2 & ~(defect | missed)).sum() == 0


def test_local_change_is_empty_when_the_map_did_not_follow_the_click():
    prev = disk(40, 60, 10)
    new = prev.copy()
    region = local_change(new, prev, [Click(40.0, 60.0, True), Click(100.0, 60.0, True)])
    assert not region.any()


def test_clicks_converge_instead_of_oscillating():
    """A base map that alternates between spill and a shrunken defect on each click: alone, the IoU bounces;
    with local corrections it only goes up."""
    gt = disk(80, 60, 20)
    spill = np.where(disk(80, 60, 32), 0.9, 0.05)
    shrunk = np.where(disk(80, 60, 9), 0.9, 0.05)
    maps = [spill, shrunk] * 10
    ious = {}
    for name, p in (("base", Scripted(maps)), ("focus", FocusPredictor(Scripted(maps)))):
        sim = simulate(p, p.set_image(image()), gt, max_clicks=12, keep_probs=None)
        ious[name] = sim.ious
    assert max(ious["base"]) - min(ious["base"][2:]) > 0.15 and max(ious["base"]) < 0.5  # bounces, stuck
    assert all(b >= a - 0.02 for a, b in zip(ious["focus"][1:], ious["focus"][2:])), ious["focus"]
    assert ious["focus"][-1] > 0.7
