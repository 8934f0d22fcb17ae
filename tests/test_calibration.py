"""Per-project click calibration (model/interactive/calibration.py): the blend's weight and threshold are
chosen on synthetic defects over the project's own references, matched leave-one-out, and kept on disk."""
from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from model.interactive.calibration import CalibrationConfig, calibrate, calibrate_bank, calibration_path
from model.interactive.learned import THRESHOLD, BlendPredictor, to_threshold
from model.types import ClickResult

H, W = 120, 160


def reference(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    g = 110 + 20 * np.sin(yy / 7.0) * np.cos(xx / 5.0) + rng.normal(0, 2, (H, W))
    return np.clip(np.repeat(g[..., None], 3, 2), 0, 255).astype(np.uint8)


class FakeEngine:
    """Residual = where the image differs from the reference it was made from (known to the test)."""

    def __init__(self, refs: dict[str, np.ndarray]):
        self.refs, self.excluded = refs, []

    def compute(self, image, bank, exclude=None):
        self.excluded.append(exclude)
        base = self.refs[exclude]  # the test's defect image was drawn on this reference
        diff = np.abs(image.astype(int) - base.astype(int)).sum(-1) > 0
        return SimpleNamespace(anomaly_map=diff.astype(np.float32), diff=diff)


class Overgrown:
    """A map that is 0.9 on the defect and `ring` on an 8 px ring around it: a blurred map (threshold matters)."""

    version = "fake"

    def __init__(self, engine, ring: float):
        self.engine, self.ring = engine, ring

    def state_of(self, image, rs):
        return SimpleNamespace(residual=rs, image_shape=image.shape[:2])

    def prob(self, rs):
        grown = cv2.dilate(rs.diff.astype(np.uint8), np.ones((17, 17), np.uint8)) > 0
        return np.where(rs.diff, 0.9, np.where(grown, self.ring, 0.0)).astype(np.float32)

    def predict(self, state, clicks, box=None, prompt="", previous_mask=None):
        p = self.prob(state.residual)
        return ClickResult(p, p > THRESHOLD, 0.9)


class ClickMode(Overgrown):
    def __init__(self, engine, ring, bank):
        super().__init__(engine, ring)
        self.bank = bank

    def predict(self, rs, clicks, box=None, prompt="", previous_mask=None):
        p = self.prob(rs)
        return ClickResult(p, p > THRESHOLD, 0.9)


def setup(ring: float, n_refs: int = 4):
    refs = {f"ref{i:02d}": reference(i) for i in range(n_refs)}
    bank = SimpleNamespace(source_keys=list(refs), key="bankkey", meta={})
    engine = FakeEngine(refs)

    def make_blend(b):
        return BlendPredictor(Overgrown(engine, ring), ClickMode(engine, ring, b), weight=0.5)

    return refs, bank, engine, make_blend


CFG = CalibrationConfig(samples=6)


def test_an_overgrowing_map_is_calibrated_to_a_higher_threshold_leave_one_out():
    refs, bank, engine, make_blend = setup(ring=0.6)
    result = calibrate(make_blend, bank, list(refs.items()), CFG)
    assert result is not None and result.samples >= 4
    # at 0.49 the 0.6 ring joins the mask; only thresholds above 0.6 give the defect alone
    assert result.threshold > 0.6 and result.iou > result.default_iou + 0.2
    assert result.weight == 0.5  # both maps agree: the weight nearest the default among the tied best
    # every residual was computed without the reference the defect was drawn on
    assert engine.excluded and all(e in refs for e in engine.excluded)


def test_defaults_stay_when_no_setting_is_clearly_better():
    refs, bank, _, make_blend = setup(ring=0.2)  # the ring is below every threshold: all settings tie
    result = calibrate(make_blend, bank, list(refs.items()), CFG)
    assert (result.weight, result.threshold) == (0.5, 0.49)
    assert result.iou == pytest.approx(result.default_iou)


def test_one_reference_cannot_be_calibrated():
    refs, bank, _, make_blend = setup(ring=0.6, n_refs=1)
    assert calibrate(make_blend, bank, list(refs.items()), CFG) is None


def test_the_calibration_is_kept_next_to_the_bank_and_read_back(tmp_path):
    refs, bank, engine, make_blend = setup(ring=0.6)
    first = calibrate_bank(make_blend, bank, list(refs.items()), "v1", tmp_path, CFG)
    assert bank.meta["click_calibration"] == first and calibration_path(tmp_path, "bankkey", "v1").is_file()
    calls = len(engine.excluded)
    again = SimpleNamespace(source_keys=list(refs), key="bankkey", meta={})
    read = []
    lazy = (read.append(k) or (k, im) for k, im in refs.items())  # as the service passes them: hashed on demand
    assert calibrate_bank(make_blend, again, lazy, "v1", tmp_path, CFG) == first
    assert len(engine.excluded) == calls and read == []  # read from disk: nothing recomputed, no file hashed
    other = SimpleNamespace(source_keys=list(refs), key="bankkey", meta={})
    calibrate_bank(make_blend, other, list(refs.items()), "v2", tmp_path, CFG)  # other weights: calibrated again
    assert len(engine.excluded) > calls


def test_the_blend_serves_the_calibrated_weight_and_threshold():
    _refs, bank, _engine, make_blend = setup(ring=0.6)
    blend = make_blend(bank)
    assert blend.params() == (0.5, 0.49)
    bank.meta["click_calibration"] = {"weight": 0.75, "threshold": 0.63}
    assert blend.params() == (0.75, 0.63)
    blend.use_calibration = False
    assert blend.params() == (0.5, 0.49)


def test_to_threshold_moves_the_level_onto_the_cut_and_keeps_the_order():
    p = np.linspace(0, 1, 101, dtype=np.float32)
    assert np.array_equal(to_threshold(p, THRESHOLD), p)
    q = to_threshold(p, 0.63)
    assert np.all(np.diff(q) >= 0) and q[0] == 0 and q[-1] == pytest.approx(1.0)
    assert np.array_equal(q > THRESHOLD, p > 0.63)
