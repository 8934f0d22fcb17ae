"""The stress set (model/evaluation/stress.py): each kind's masks are exact and have the stated properties, the
draws are deterministic, and `model.bench clicks --stress` measures them like a real test set."""
import json

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage.morphology import skeletonize

from model.cli import bench
from model.errors import ConfigError
from model.evaluation import predictors, stress
from model.training.datasets import load_mvtec
from model.types import ClickResult
from tests.fixtures.images import save_png as save

H, W = 300, 360


def tread(rng):
    """A dark ribbed surface with noise, like a tire's."""
    yy, xx = np.mgrid[0:H, 0:W]
    g = 60 + 20 * np.sin(yy / 5.0) * np.cos(xx / 7.0) + rng.normal(0, 4, (H, W))
    return np.clip(np.repeat(g[..., None], 3, axis=2), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("stress_mvtec")
    rng = np.random.default_rng(1)
    for i in range(3):
        save(root / "train" / "good" / f"{i:03d}.png", tread(rng))
    for i in range(4):
        save(root / "test" / "good" / f"{i:03d}.png", tread(rng))
    img = tread(rng)
    mask = np.zeros((H, W), bool)
    mask[100:120, 100:140] = True
    img[mask] = 200
    save(root / "test" / "cut" / "000.png", img)
    save(root / "ground_truth" / "cut" / "000_mask.png", mask.astype(np.uint8) * 255)
    return root


@pytest.fixture(scope="module")
def samples(dataset):
    data = load_mvtec(dataset)
    return {k: list(stress.generate(data, [k], 4, seed=3, split="all")) for k in stress.KINDS}


def diff_of(sample, dataset):
    """|image - the image it was drawn on| in grey levels, max over channels."""
    if sample.base.startswith("skimage:"):
        return None
    base = np.asarray(Image.open(dataset / "test" / "good" / sample.base).convert("RGB"), np.int16)
    return np.abs(sample.image.astype(np.int16) - base).max(axis=-1)


def components(mask):
    n, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return n - 1


def touches_border(mask):
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_lowcontrast_is_large_faint_and_soft(samples, dataset):
    for s in samples["lowcontrast"]:
        d = diff_of(s, dataset)
        assert 0.10 <= s.mask.mean() <= 0.40 and components(s.mask) == 1
        assert 5 <= s.info["shift"] - 2 and s.info["shift"] + 2 <= 15
        assert d.max() <= 16  # at most a 15-level shift (+1 rounding)
        assert (d[s.mask] > 0).all()  # exact: every mask pixel changed
        assert d[~s.mask].max() <= 8  # outside, the ramp is below half way
        deep = cv2.erode(s.mask.astype(np.uint8), np.ones((61, 61), np.uint8)) > 0
        rim = s.mask & ~(cv2.erode(s.mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
        assert d[deep].mean() >= 5 and d[rim].mean() < 0.8 * d[deep].mean()  # soft edges
        far = cv2.dilate(s.mask.astype(np.uint8), np.ones((101, 101), np.uint8)) == 0
        assert not d[far].any()


def test_crack_is_long_thin_and_inside(samples, dataset):
    widths = set()
    for s in samples["crack"]:
        d = diff_of(s, dataset)
        assert 50 <= s.info["length"] <= 300 and s.info["width"] in (1, 2, 3)
        widths.add(s.info["width"])
        assert components(s.mask) == 1 and not touches_border(s.mask)
        inner = cv2.distanceTransform(np.pad(s.mask, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        assert inner.max() <= 2.0  # nowhere wider than 3 px
        centre = int(skeletonize(s.mask).sum())
        assert centre >= 35 and s.mask.sum() / centre <= 3.5  # long, and about width px per px of length
        assert ((d > 0) == s.mask).all()  # exact
        assert d[s.mask].mean() >= 25
    assert len(widths) >= 2


def test_border_defects_touch_the_border(samples, dataset):
    for s in samples["border"]:
        d = diff_of(s, dataset)
        assert touches_border(s.mask) and components(s.mask) == 1
        assert 0.005 <= s.mask.mean() <= 0.07
        assert ((d > 0) == s.mask).all()


def test_multi_gives_several_separate_defects(samples, dataset):
    counts = set()
    for s in samples["multi"]:
        d = diff_of(s, dataset)
        n = components(s.mask)
        assert n == s.info["n"] >= 2 and not touches_border(s.mask)
        counts.add(n)
        grown = cv2.dilate(s.mask.astype(np.uint8), np.ones((7, 7), np.uint8))
        assert components(grown) == n  # at least ~8 px apart
        assert ((d > 0) == s.mask).all()
    assert len(counts) >= 2


def test_texture_defects_sit_on_strong_texture(samples):
    for s in samples["texture"]:
        assert s.base.split(":")[1] in stress.TEXTURES and s.image.shape == (H, W, 3)
        grey = cv2.cvtColor(s.image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        local_sd = np.sqrt(np.maximum(cv2.blur(grey ** 2, (25, 25)) - cv2.blur(grey, (25, 25)) ** 2, 0))
        assert np.median(local_sd[~s.mask]) >= 20  # strongly textured background (grey sd in 25 px windows)
        assert 0.005 <= s.mask.mean() <= 0.09 and components(s.mask) >= 1


def test_texture_masks_are_exact():
    rng = np.random.default_rng(5)
    base = stress.texture_image("gravel", (H, W), rng)
    for i in range(6):
        out, mask, info = stress.texture(base, np.random.default_rng(i), "gravel")
        d = np.abs(out.astype(np.int16) - base).max(axis=-1)
        assert ((d > 0) == mask).all(), info


def test_deterministic_and_split_dependent(dataset):
    data = load_mvtec(dataset)
    a = list(stress.generate(data, ["crack", "multi"], 2, seed=7, split="even"))
    b = list(stress.generate(data, ["crack", "multi"], 2, seed=7, split="even"))
    c = list(stress.generate(data, ["crack", "multi"], 2, seed=8, split="even"))
    odd = list(stress.generate(data, ["lowcontrast"], 3, seed=7, split="odd"))
    even = list(stress.generate(data, ["lowcontrast"], 3, seed=7, split="even"))
    assert all((x.image == y.image).all() and (x.mask == y.mask).all() for x, y in zip(a, b))
    assert any((x.mask != y.mask).any() for x, y in zip(a, c))
    assert {s.base for s in even} <= {"000.png", "002.png"} and {s.base for s in odd} <= {"001.png", "003.png"}
    with pytest.raises(ConfigError, match="unknown stress kind"):
        stress.parse_kinds("crack,holes")
    assert stress.parse_kinds("all") == list(stress.KINDS)


class Square:
    """A fake predictor: a 15x15 square at every positive click."""

    name, version = "square", "0"

    def set_image(self, image):
        return np.zeros(image.shape[:2])

    def predict(self, state, clicks, box=None, prompt="", previous_mask=None):
        prob = np.zeros(state.shape, dtype=np.float32)
        for c in clicks:
            if c.positive:
                prob[max(int(c.y) - 7, 0):int(c.y) + 8, max(int(c.x) - 7, 0):int(c.x) + 8] = 1.0
        return ClickResult(prob, prob > 0.5, 1.0)


def test_bench_clicks_stress_runs_the_kinds_as_defect_types(dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(predictors.PREDICTORS, "square", lambda engine, bank, args: Square())
    out = tmp_path / "stress.json"
    assert bench.main(["clicks", "--dataset", str(dataset), "--predictor", "square", "--stress", "crack,multi",
                       "--stress-n", "2", "--max-clicks", "3", "--all-clicks", "--no-grabcut", "--threads", "1",
                       "--backbone-opt", "input_size=128", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["per_defect"]) == {"crack", "multi"}  # the test set's "cut" is not used
    assert report["overall"]["n_images"] == 4
    for section in report["per_defect"].values():
        assert 0.0 < section["f1_last"] <= 1.0
