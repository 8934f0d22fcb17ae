"""`python -m model.bench fit` on a tiny synthetic MVTec-style folder: the JSON has the unsupervised run and
one run per size for masks and boxes, with the anomaly benchmark's metric keys; the train CLI publishes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.cli import bench, train
from model.evaluation.seg_runs import as_boxes
from model.seg.data import SegExample
from model.seg.versions import VersionStore

torch.set_num_threads(1)
H, W = 64, 80
METRICS = {"pixel_ap", "au_pro", "pixel_auroc", "image_auroc"}


def _texture(rng: np.random.Generator) -> np.ndarray:
    _, xx = np.mgrid[0:H, 0:W]
    base = 100 + 40 * np.sin(xx / 2.5)[..., None] * np.ones(3) + rng.normal(0, 5, (H, W, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_mvtec")
    rng = np.random.default_rng(0)
    for split, n in (("train/good", 4), ("test/good", 2)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_texture(rng)).save(root / split / f"{i:03d}.png")
    for defect, colour in (("spot", (250, 250, 250)), ("stain", (20, 20, 120))):
        (root / "test" / defect).mkdir(parents=True)
        (root / "ground_truth" / defect).mkdir(parents=True)
        for i in range(3):
            img, mask = _texture(rng), np.zeros((H, W), bool)
            r, c = int(rng.integers(8, H - 20)), int(rng.integers(8, W - 20))
            mask[r:r + 10, c:c + 12] = True
            img[mask] = colour
            Image.fromarray(img).save(root / "test" / defect / f"{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


COMMON = ["--backbone-opt", "input_size=128", "--threads", "1", "--steps", "6"]


@pytest.mark.slow
def test_fit_bench_json_has_learning_curves_for_masks_and_boxes(dataset, tmp_path, capsys) -> None:
    out = tmp_path / "fit.json"
    args = ["fit", "--dataset", str(dataset), "--sizes", "1,2", "--json", str(out), *COMMON]
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    assert METRICS <= set(report["unsupervised"])
    for kind in ("masks", "boxes"):
        assert set(report[kind]) == {"1", "2"}
        for run in report[kind].values():
            assert METRICS <= set(run) and run["fit_s"] > 0
            assert 0.0 <= run["pixel_ap"] <= 1.0
    assert report["masks"]["2"]["n_train"] == 2
    assert report["config"]["n_test"] == 4 + 2  # 6 defective - 2 in the pool, + 2 good
    assert report["unsupervised"]["n_images"] == report["masks"]["1"]["n_images"] == 6
    assert "unsupervised" in capsys.readouterr().out


@pytest.mark.slow
def test_train_cli_publishes_a_version(dataset, tmp_path) -> None:
    store_dir = tmp_path / "store"
    args = ["seg", "--dataset", str(dataset), "--out", str(store_dir), "--n-train", "3", "--labels", "boxes",
            *COMMON]
    assert train.main(args) == 0
    info = VersionStore(store_dir).latest()
    assert info.name == "adclick-seg-v1" and info.meta["n_boxes"] >= 3 and info.meta["n_masks"] == 0
    assert (info.path / "report.png").is_file()


def test_as_boxes_keeps_one_box_per_component_and_drops_masks() -> None:
    mask = np.zeros((20, 20), bool)
    mask[2:5, 2:5] = True
    mask[10:15, 12:18] = True
    ex = SegExample(torch.zeros(3, 4, 4), (20, 20), masks={"spot": mask})
    boxed = as_boxes(ex)
    assert not boxed.masks and [label for label, _ in boxed.boxes] == ["spot", "spot"]
    assert ex.masks  # the original is left as it was
