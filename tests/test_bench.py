"""Dataset reader, GrabCut baseline and the benchmark CLI end to end on a tiny synthetic MVTec folder."""
import json
import sys
import types

import numpy as np
import pytest

from model.cli import bench
from model.errors import ConfigError
from model.evaluation import predictors, runs
from model.evaluation.baselines import GrabCutPredictor
from model.evaluation.simulate import simulate
from model.training.datasets import DatasetError, limit_per_defect, load_mask, load_mvtec, load_rgb
from model.types import Click, ClickResult
from tests.fixtures.images import save_png as save

H, W = 96, 128


def texture(rng):
    yy, xx = np.mgrid[0:H, 0:W]
    base = 90 + 40 * np.sin(xx / 3.0) * np.sin(yy / 4.0)
    img = np.repeat(base[..., None], 3, axis=2) + rng.normal(0, 3, (H, W, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def painted(rng, defect):
    img = texture(rng)
    mask = np.zeros((H, W), dtype=bool)
    y, x = rng.integers(15, H - 30), rng.integers(15, W - 30)
    if defect == "spot":
        mask[y:y + 12, x:x + 14] = True
        img[mask] = (230, 40, 40)
    else:  # a thin dark line
        mask[y:y + 4, x:x + 24] = True
        img[mask] = (10, 10, 10)
    return img, mask


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    rng = np.random.default_rng(0)
    for i in range(4):
        save(root / "train" / "good" / f"{i:03d}.png", texture(rng))
    save(root / "validation" / "good" / "000.png", texture(rng))
    for i in range(2):
        save(root / "test" / "good" / f"{i:03d}.png", texture(rng))
    for defect in ("spot", "line"):
        for i in range(3):
            img, mask = painted(rng, defect)
            save(root / "test" / defect / f"{i:03d}.png", img)
            save(root / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root


def test_reader_indexes_normals_tests_and_masks(dataset):
    data = load_mvtec(dataset)
    assert len(data.normals) == 5 and data.defects == ["line", "spot"]
    assert len(load_mvtec(dataset, include_validation=False).normals) == 4
    spot = next(t for t in data.test if t.defect == "spot")
    img = load_rgb(spot.path)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert load_mask(spot, img.shape[:2]).sum() == 12 * 14
    good = next(t for t in data.test if t.defect == "good")
    assert good.mask_path is None and not load_mask(good, (H, W)).any()
    assert [t.defect for t in limit_per_defect(data.test, 1)] == ["good", "line", "spot"]


def test_reader_rejects_bad_layouts(tmp_path, dataset):
    with pytest.raises(DatasetError):
        load_mvtec(tmp_path)
    save(tmp_path / "train" / "good" / "0.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "test" / "cut" / "0.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="no ground-truth mask"):
        load_mvtec(tmp_path)


def test_grabcut_segments_a_coloured_blob_and_obeys_negative_clicks():
    rng = np.random.default_rng(1)
    img, gt = painted(rng, "spot")
    pred = GrabCutPredictor()
    state = pred.set_image(img)
    cy, cx = np.argwhere(gt).mean(0)
    res = pred.predict(state, [Click(cx, cy, True)])
    assert np.array_equal(res.mask, res.prob > 0.49)
    inter, union = (res.mask & gt).sum(), (res.mask | gt).sum()
    assert inter / union > 0.8
    neg = pred.predict(state, [Click(cx, cy, True), Click(cx + 2, cy, False)])
    assert not neg.mask[int(cy), int(cx) + 2]
    assert not pred.predict(state, []).mask.any()
    with pytest.raises(ConfigError, match="click-only"):
        pred.detect(state)


def test_grabcut_beats_nothing_in_the_simulator():
    rng = np.random.default_rng(2)
    img, gt = painted(rng, "spot")
    pred = GrabCutPredictor()
    sim = simulate(pred, pred.set_image(img), gt, max_clicks=5)
    assert sim.ious[0] > 0.8 and sim.clicks[0].positive


def run_cli(args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    assert bench.main(args + ["--json", str(out), "--backbone-opt", "input_size=128"]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_anomaly_cli_reports_every_metric_per_defect(dataset, tmp_path, capsys):
    report = run_cli(["anomaly", "--dataset", str(dataset), "--refs", "all,2"], tmp_path, "anomaly")
    keys = {"pixel_auroc", "pixel_ap", "au_pro", "image_auroc", "ms_per_image"}
    assert keys <= set(report["overall"]) and set(report["per_defect"]) == {"line", "spot"}
    assert all(keys <= set(v) for v in report["per_defect"].values())
    assert report["per_defect"]["spot"]["n_images"] == 5  # 3 defective + 2 good
    assert report["overall"]["pixel_auroc"] > 0.9  # painted defects on a regular texture
    cfg = report["config"]
    assert cfg["n_refs"] == 5 and cfg["bank_build_s"] > 0 and cfg["peak_rss_mb"] > 0 and "bank_load_s" in cfg
    assert [r["refs"] for r in report["runs"]] == ["all", "2"]
    assert "pixel_auroc" in capsys.readouterr().out


class CentreSquare:
    """A fake registered predictor: a 9x9 square at every positive click."""

    name, version = "square", "0"

    def set_image(self, image):
        return types.SimpleNamespace(image=image, shape=image.shape[:2], nbytes=0)  # an ImageState

    def predict(self, state, clicks, box=None, prompt="", previous_mask=None):
        prob = np.zeros(state.shape, dtype=np.float32)
        for c in clicks:
            if c.positive:
                prob[max(int(c.y) - 4, 0):int(c.y) + 5, max(int(c.x) - 4, 0):int(c.x) + 5] = 1.0
        return ClickResult(prob, prob > 0.5, 1.0)


@pytest.mark.slow
def test_clicks_cli_with_a_registered_predictor_and_grabcut(dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(predictors.PREDICTORS, "square", lambda engine, bank, args: CentreSquare())
    report = run_cli(["clicks", "--dataset", str(dataset), "--predictor", "square,residual", "--max-clicks", "8"],
                     tmp_path, "clicks")
    keys = {"noc85", "noc90", "miou@1", "miou@3", "miou@5", "ap@5", "first_click_ms_p50", "next_click_ms_p50",
            "first_click_ms_p95", "next_click_ms_p95"}
    for section in (report, report["baselines"]["grabcut"], report["others"]["residual"]):
        assert keys <= set(section["overall"])
        assert set(section["per_defect"]) == {"line", "spot"}
        assert section["overall"]["n_images"] == 6
    assert 1 <= report["overall"]["noc85"] <= 8
    assert report["baselines"]["grabcut"]["overall"]["miou@5"] > 0.6  # colour blobs are GrabCut's home turf
    assert report["others"]["residual"]["overall"]["miou@5"] > 0.3  # painted defects stand out in the residuals
    assert report["config"]["predictors"] == ["square", "residual", "grabcut"]
    assert report["config"]["bank_build_s"] > 0


def test_refine_suffix_and_dev_split(dataset, tmp_path, monkeypatch):
    """NAME+refine wraps a predictor in the boundary refinement (RefineConfig from --refine-opt); --split even /
    odd gives complementary halves of every defect type."""
    from model.interactive.refine import RefinedPredictor

    made = []

    def square(engine, bank, args):
        made.append(CentreSquare())
        return made[-1]

    monkeypatch.setitem(predictors.PREDICTORS, "square", square)
    built = predictors.get_builder("square+refine")(None, None, types.SimpleNamespace(refine_opt=["radius=2"]))
    assert isinstance(built, RefinedPredictor) and built.base is made[-1] and built.cfg.radius == 2
    with pytest.raises(ConfigError, match="suffix"):
        predictors.get_builder("square+crf")
    items = [t for t in load_mvtec(dataset).test if t.is_anomalous]
    even, odd = runs.split_items(items, "even"), runs.split_items(items, "odd")
    assert sorted(map(str, (t.path for t in even + odd))) == sorted(map(str, (t.path for t in items)))
    assert not {t.path for t in even} & {t.path for t in odd}
    assert {t.defect for t in even} == {t.defect for t in odd} == {t.defect for t in items}
    report = run_cli(["clicks", "--dataset", str(dataset), "--predictor", "square+refine", "--max-clicks", "6",
                      "--split", "odd", "--no-grabcut"], tmp_path, "clicks")
    assert report["overall"]["n_images"] == len(odd) and report["config"]["split"] == "odd"


def test_unknown_predictor_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown predictor"):
        predictors.get_builder("no-such-predictor")


def test_python_m_bench_finds_the_learned_predictors(dataset, tmp_path):
    """Under `python -m model.bench` the plugin predictors register into the imported module's registry; the
    CLI must look there (it once answered "unknown predictor 'adclick'")."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "model.cli.bench", "clicks", "--dataset", str(dataset), "--predictor", "adclick",
         "--no-grabcut", "--weights-dir", str(tmp_path), "--threads", "1", "--cache-dir", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "unknown predictor" not in proc.stderr
    assert "no weights manifest" in proc.stderr  # the learned predictor was found and explains what is missing


def test_fit_subcommand_dispatches_to_bench_fit(monkeypatch):
    seen = {}
    fake = types.ModuleType("model.cli.bench_fit")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "model.cli.bench_fit", fake)
    assert bench.main(["fit", "--dataset", "x"]) == 0
    assert seen["argv"] == ["--dataset", "x"]


def test_grabcut_box_alone_segments_the_blob_inside():
    rng = np.random.default_rng(3)
    img, gt = painted(rng, "spot")
    ys, xs = np.nonzero(gt)
    box = (xs.min() - 6.0, ys.min() - 6.0, xs.max() + 6.0, ys.max() + 6.0)
    pred = GrabCutPredictor()
    res = pred.predict(pred.set_image(img), [], box=box)
    assert (res.mask & gt).sum() / (res.mask | gt).sum() > 0.8
    assert not res.mask[: int(box[1]) - 1].any()  # nothing above the box
