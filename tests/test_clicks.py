import numpy as np
import pytest

from model.evaluation.simulate import simulate
from model.interactive.clicks import encode_clicks, next_click
from model.types import Click, ClickResult


def rect(shape, y0, y1, x0, x1):
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_first_click_is_positive_at_the_centre_of_the_defect():
    gt = rect((30, 40), 10, 21, 5, 16)  # 11x11 square centred at (x=10, y=15)
    click = next_click(gt, np.zeros_like(gt))
    assert click == Click(x=10.0, y=15.0, positive=True)


def test_larger_false_positive_region_gets_a_negative_click():
    gt = rect((40, 40), 0, 3, 0, 3)
    pred = gt | rect((40, 40), 20, 31, 20, 31)  # FP square far larger than the (empty) FN
    click = next_click(gt, pred)
    assert click is not None and not click.positive
    assert (click.x, click.y) == (25.0, 25.0)


def test_image_border_counts_as_region_edge():
    gt = rect((32, 30), 5, 26, 0, 7)  # a strip along the left border, 7 px wide
    click = next_click(gt, np.zeros_like(gt))
    assert click.x == 3.0  # middle of the strip, not the border column
    assert click.y == 8.0  # first row 4 px inside the strip's top edge


def test_clicked_points_are_excluded_and_perfect_prediction_gives_none():
    gt = np.zeros((10, 10), dtype=bool)
    gt[2, 2] = gt[7, 7] = True
    first = next_click(gt, np.zeros_like(gt))
    second = next_click(gt, np.zeros_like(gt), clicked=[first])
    assert {(first.x, first.y), (second.x, second.y)} == {(2.0, 2.0), (7.0, 7.0)}
    assert next_click(gt, gt.copy()) is None


def test_encode_clicks_draws_disks_per_polarity():
    maps = encode_clicks([Click(10, 10, True), Click(30, 5, False)], (20, 40), radius=3)
    assert maps.shape == (2, 20, 40) and maps.dtype == np.float32
    assert maps[0].sum() == 29  # lattice points with dx^2 + dy^2 <= 9
    assert maps[0, 10, 10] == 1 and maps[0, 10, 13] == 1 and maps[0, 10, 14] == 0
    assert maps[1, 5, 30] == 1 and maps[1, 10, 10] == 0
    assert maps[0, :, 25:].sum() == 0


def test_encode_clicks_rescales_from_source_resolution_and_clips():
    maps = encode_clicks([Click(99.5, 49.5, True)], (50, 100), radius=1, src_shape=(100, 200))
    # centre maps to (x=49.5, y=24.5): the 4 pixels around it are within radius 1
    assert maps[0].sum() == 4 and maps[0, 24, 49] == maps[0, 25, 50] == 1
    edge = encode_clicks([Click(0, 0, False)], (8, 8), radius=2)
    assert edge[1].sum() == 6  # quarter of the radius-2 disk inside the image


class SquarePredictor:
    """Paints a 9x9 square around each positive click, then erases one around each negative click."""

    name = "fake"
    version = "0"

    def __init__(self):
        self.previous_seen = []

    def predict(self, state, clicks, box=None, prompt="", previous_mask=None):
        self.previous_seen.append(None if previous_mask is None else previous_mask.copy())
        prob = np.zeros(state.shape, dtype=np.float32)
        for c in sorted(clicks, key=lambda c: not c.positive):
            y, x = int(c.y), int(c.x)
            prob[max(y - 4, 0):y + 5, max(x - 4, 0):x + 5] = 0.9 if c.positive else 0.0
        return ClickResult(prob=prob, mask=prob > 0.5, score=1.0)


def test_simulate_records_iou_per_click_and_feeds_previous_mask():
    gt = rect((60, 60), 20, 41, 20, 41)  # 21x21 square centred at (30, 30)
    state = np.zeros((60, 60))
    pred = SquarePredictor()
    res = simulate(pred, state, gt, max_clicks=8, keep_probs=[2])
    assert len(res.ious) == len(res.clicks) == len(res.predict_ms)
    assert res.clicks[0] == Click(30.0, 30.0, True)
    assert res.ious[0] == pytest.approx(81 / 441)
    assert res.ious[-1] > 0.6 and res.ious[-1] > res.ious[0]  # the squares tile the defect
    assert all(c.positive for c in res.clicks)
    assert list(res.probs) == [2]
    assert pred.previous_seen[0] is None and pred.previous_seen[1].sum() == 81


def test_simulate_stops_at_target_after_min_clicks():
    gt = rect((60, 60), 20, 41, 20, 41)
    # IoUs run 0.18, 0.31, 0.42, 0.53, 0.63, 0.67, ...
    res = simulate(SquarePredictor(), np.zeros((60, 60)), gt, max_clicks=20, stop_iou=0.65, min_clicks=5)
    assert len(res.ious) == 6 and res.ious[-1] >= 0.65
    res = simulate(SquarePredictor(), np.zeros((60, 60)), gt, max_clicks=20, stop_iou=0.5, min_clicks=5)
    assert len(res.ious) == 5  # reached at click 4, but at least min_clicks are made


class _Recorder:
    """Predictor whose mask is the union of 5 px squares at its positive clicks plus the previous mask, and
    which records the previous mask it was given on each call."""

    def __init__(self):
        self.calls: list[tuple[int, object]] = []

    def predict(self, state, clicks, box=None, prompt="", previous_mask=None):
        self.calls.append((len(clicks), None if previous_mask is None else previous_mask.copy()))
        mask = np.zeros((40, 50), bool) if previous_mask is None else previous_mask.copy()
        for c in clicks:
            mask[int(c.y) - 2:int(c.y) + 3, int(c.x) - 2:int(c.x) + 3] = c.positive
        return ClickResult(mask.astype(np.float32), mask, 1.0)


def test_click_history_replays_previous_masks_and_costs_one_call_per_new_click():
    from model.interactive.clicks import ClickHistory

    clicks = [Click(10, 10, True), Click(30, 20, True), Click(11, 10, False), Click(40, 30, True)]
    fresh, rec = ClickHistory(), _Recorder()
    # nothing remembered: the four clicks are replayed one at a time, each with the mask before it
    out = fresh.predict(rec, None, clicks)
    assert [n for n, _ in rec.calls] == [1, 2, 3, 4] and rec.calls[0][1] is None
    assert rec.calls[2][1][20, 30] and not rec.calls[1][1][20, 30]  # call 3 saw click 2's square
    # the usual session: one request per click, each costs exactly one call, and the masks are the same
    inc, rec2 = ClickHistory(), _Recorder()
    for k in range(1, 5):
        last = inc.predict(rec2, None, clicks[:k])
    assert [n for n, _ in rec2.calls] == [1, 2, 3, 4] and np.array_equal(last.mask, out.mask)
    # an undo (the last click removed) and a different third click: one call, from the remembered prefix
    rec2.calls.clear()
    inc.predict(rec2, None, clicks[:2] + [Click(45, 35, True)])
    assert [n for n, _ in rec2.calls] == [3] and rec2.calls[0][1][20, 30]
    # a different prompt or box is another session
    rec2.calls.clear()
    inc.predict(rec2, None, clicks[:2], prompt="scratch")
    assert [n for n, _ in rec2.calls] == [1, 2]
    # bounded memory: only the newest max_entries prefixes stay
    small = ClickHistory(max_entries=2)
    small.predict(_Recorder(), None, clicks)
    assert len(small) == 2
