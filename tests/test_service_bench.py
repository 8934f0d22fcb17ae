"""The `service` benchmark predictor (model/evaluation/service.py): the real service driven over HTTP as Label Studio
calls it gives the in-process served predictor's masks click by click, and a broken answer is an error, never an
empty mask. Tiny synthetic MVTec folder, no ../shared data."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from backend import ls_format
from model.cli import bench
from model.evaluation import predictors, runs
from model.evaluation.service import (
    ImageHost,
    LocalService,
    ServiceError,
    ServicePredictor,
    build_service_predictor,
    keypoint_region,
    label_config,
)
from model.evaluation.simulate import simulate
from model.training.datasets import load_mask, load_mvtec, load_rgb
from model.types import Click
from tests.api_support import RecordingServer, Route, TinyPredictor, make_app
from tests.conftest import paint_defect, texture
from tests.fixtures.images import save_png as save

H, W = 96, 128


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """train/good + validation/good (the same file name in both), two defect types of two images each."""
    root = tmp_path_factory.mktemp("svc-mvtec")
    for i in range(3):
        save(root / "train" / "good" / f"{i:03d}.png", texture(H, W, seed=10 + i))
    save(root / "validation" / "good" / "000.png", texture(H, W, seed=13))
    for defect, (y, x) in {"spot": (40, 70), "blob": (60, 30)}.items():
        for k in range(2):
            img, mask = paint_defect(texture(H, W, seed=20 + k), y + 5 * k, x + 7 * k, r=7)
            save(root / "test" / defect / f"{k:03d}.png", img)
            save(root / "ground_truth" / defect / f"{k:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root


def _items(dataset: Path):
    return [t for t in load_mvtec(dataset).test if t.is_anomalous]


# ---- what is sent ------------------------------------------------------------------------------------------
def test_a_click_at_a_pixels_centre_reads_back_as_that_pixel():
    """Label Studio's percent is of the continuous image plane (pixel i spans [i, i + 1)); the service reads a
    click at pixel (x, y)'s centre back as exactly (x, y), the simulator's click. Before, it read x + 0.5 (half a
    pixel off), and without its rounding to 1e-6 px 17% of the pixels of these sizes came back as e.g.
    62.000000000000014, each changing the served mask."""
    cfg = ls_format.parse_label_config(label_config(["Defect", "hole"]))
    rng = np.random.default_rng(0)
    for width, height in ((128, 96), (800, 600), (1130, 460), (1540, 645)):
        clicks = [Click(float(rng.integers(0, width)), float(rng.integers(0, height)), bool(rng.integers(2)))
                  for _ in range(300)] + [Click(0.0, 0.0), Click(width - 1.0, height - 1.0, False)]
        regions = [keypoint_region(c, width, height, "hole", k) for k, c in enumerate(clicks)]
        request = ls_format.parse_context({"result": regions}, cfg, max_clicks=1000)
        assert request is not None and request.label == "hole"
        assert request.clicks_px(width, height) == clicks
        # anywhere inside the pixel rounds to it
        inside = [dict(r, value={**r["value"], "x": r["value"]["x"] + 0.49 / width * 100 * (1 - 2 * (k % 2))})
                  for k, r in enumerate(regions)]
        back = ls_format.parse_context({"result": inside}, cfg, max_clicks=1000).clicks_px(width, height)
        assert [(round(b.x), b.y) for b in back] == [(c.x, c.y) for c in clicks]
    assert regions[0]["original_width"] == 1540 and regions[0]["value"]["keypointlabels"] == ["hole"]


# ---- the same masks ----------------------------------------------------------------------------------------
def test_tiny_service_over_http_gives_the_in_process_masks_click_by_click(dataset, tmp_path):
    """The app with the tiny test engine (no weights): the masks it answers over HTTP, with its own click history
    standing in for the previous mask, are the in-process predictor's over the same bank, click by click."""
    from backend.settings import Settings

    settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "m"), "ADCLICK_NORMAL_DIR": str(dataset / "train"),
                                  "WARM_ON_SETUP": "1", "LOG_LEVEL": "WARNING"})
    app, services, engine = make_app(settings)
    local = LocalService(app)
    service = ServicePredictor(local.url, files=[t.path for t in _items(dataset)])
    try:
        service.connect(expected_references=3)
        bank = services.serving.model_for("1").bank
        assert bank.n == 3
        local_predictor = TinyPredictor(engine, bank)
        before, clicks, negatives = service.requests, 0, 0
        for item in _items(dataset):
            image = load_rgb(item.path)
            painted = load_mask(item, image.shape[:2])
            # a truth the colour predictor never gets right (6 clicks each): the blob and a ring around it, or
            # the spot's right half alone (negative clicks on its left half)
            gt = ndimage.binary_dilation(painted, iterations=4) if item.defect == "blob" else \
                painted & (np.arange(W)[None, :] > np.nonzero(painted)[1].mean())
            ours = simulate(local_predictor, local_predictor.set_image(image), gt, max_clicks=6, thr=None)
            state = service.set_image(image)
            assert state.source == "file"  # the test image's own file is what the service downloads
            theirs = simulate(service, state, gt, max_clicks=6, thr=None)
            assert theirs.clicks == ours.clicks and theirs.ious == ours.ious
            local_state = local_predictor.set_image(image)
            for k in ours.probs:  # the tiny predictor's mask does not depend on the previous one
                assert np.array_equal(theirs.probs[k] > 0.49, local_predictor.predict(local_state, ours.clicks[:k]).mask)
            clicks += len(ours.clicks)
            negatives += sum(not c.positive for c in ours.clicks)
            assert len(ours.clicks) == 6
        assert negatives > 0
        assert service.requests - before == clicks  # one /predict per click
    finally:
        service.close()
        local.close()


@pytest.mark.slow
def test_served_predictor_over_http_matches_the_benchmark_click_by_click(dataset, tmp_path):
    """The real app (bundled weights, served defaults) started as the benchmark starts it: its masks over HTTP
    are identical, click by click, to the in-process `adclick-blend+refine+seeded`; the bank comes from
    the benchmark's cache (not rebuilt, the cache survives the service's clean-up)."""
    cache = tmp_path / "cache"
    args = bench.parse_args(["clicks", "--dataset", str(dataset), "--no-grabcut", "--cache-dir", str(cache)])
    engine = runs.make_engine(args, "window", str(cache))
    bank, stats = runs.build_bank(engine, runs.select_refs(load_mvtec(dataset), "all", 0))
    assert stats["n_refs"] == 4  # train/good and validation/good, both with a 000.png
    cached = sorted(cache.iterdir())
    ours_predictor = predictors.get_builder("adclick-blend+refine+seeded")(engine, bank, args)
    service = build_service_predictor(engine, args)
    try:
        assert service.version.startswith("adclick-") and service.version.endswith("-noprompt-blend0.5-refine-seeded")
        for item in _items(dataset):
            image = load_rgb(item.path)
            gt = load_mask(item, image.shape[:2])
            ours = simulate(ours_predictor, ours_predictor.set_image(image), gt, max_clicks=4)
            theirs = simulate(service, service.set_image(image), gt, max_clicks=4)
            assert theirs.clicks == ours.clicks
            for k in ours.probs:
                assert np.array_equal(theirs.probs[k] > 0.49, ours.probs[k] > 0.49), (item.path, k)
    finally:
        service.close()
    assert sorted(cache.iterdir()) == cached  # loaded from the cache, not built again; the link did not delete it


# ---- errors ------------------------------------------------------------------------------------------------
def _health(project: str = "1") -> Route:
    body = {"status": "UP", "model": {"kind": "fake"},
            "reference_banks": {"projects": {project: {"loaded": True, "building": False, "size": 3,
                                                          "target": 3}}}}
    return Route(json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def _json(body, status: int = 200) -> Route:
    return Route(json.dumps(body).encode(), status=status, headers={"Content-Type": "application/json"})


def _brush(h: int, w: int, rle=None, label: str = "Defect") -> dict:
    from label_studio_sdk.converter.brush import mask2rle

    mask = np.zeros((h, w), np.uint8)
    mask[10:20, 10:30] = 255
    return {"type": "brushlabels", "original_width": w, "original_height": h,
            "value": {"format": "rle", "rle": [int(v) for v in mask2rle(mask)] if rle is None else rle,
                      "brushlabels": [label]}, "score": 0.7}


@pytest.mark.parametrize("route, message", [
    (_json({"error": "image download failed: 404"}, 502), "HTTP 502: image download failed: 404"),
    (Route(b"<html>oops</html>", headers={"Content-Type": "text/html"}), "not a JSON object"),
    (_json({"results": []}), "expected results with one prediction"),
    (_json({"results": [{"result": []}]}), "expected one brushlabels item"),
    (_json({"results": [{"result": [_brush(H, W), _brush(H, W)]}]}), "expected one brushlabels item"),
    (_json({"results": [{"result": [_brush(H + 1, W)]}]}), f"brush mask of {W}x{H + 1}"),
    (_json({"results": [{"result": [_brush(H, W, rle=[1, 2, 3])]}]}), "RLE"),
    (_json({"results": [{"result": [_brush(H, W, label="Other")]}]}), "carries the label"),
])
def test_a_broken_answer_is_a_clear_error_not_an_empty_mask(route, message):
    image = texture(H, W, seed=1)
    gt = np.zeros((H, W), bool)
    gt[40:60, 50:80] = True
    with RecordingServer() as server:
        server.routes.update({"/health": _health(), "/setup": _json({"model_version": "v1"}), "/predict": route})
        service = ServicePredictor(server.url)
        try:
            service.connect()
            assert service.version == "v1"
            with pytest.raises(ServiceError, match=message.replace("(", r"\(")):
                simulate(service, service.set_image(image), gt, max_clicks=3)
        finally:
            service.close()
        sent = json.loads(next(b for m, p, _, b in server.requests if p == "/predict"))
        keypoint = sent["params"]["context"]["result"][0]
        assert keypoint["type"] == "keypointlabels" and keypoint["is_positive"] is True
        assert keypoint["value"]["keypointlabels"] == ["Defect"] and keypoint["original_width"] == W


def test_a_good_answer_decodes_and_an_unreachable_service_is_an_error():
    image = texture(H, W, seed=1)
    with RecordingServer() as server:
        server.routes.update({"/health": _health(), "/setup": _json({"model_version": "v1"}),
                              "/predict": _json({"results": [{"result": [_brush(H, W)], "score": 0.7}]})})
        service = ServicePredictor(server.url)
        service.connect()
        result = service.predict(service.set_image(image), [Click(15.0, 12.0)])
        service.close()
    assert result.mask.sum() == 200 and result.mask[15, 20] and result.score == pytest.approx(0.7)
    assert np.array_equal(result.prob > 0.49, result.mask)
    dead = ServicePredictor(server.url)  # the server is gone
    with pytest.raises(ServiceError, match="no answer from the service"):
        dead.predict(dead.set_image(image), [Click(15.0, 12.0)])
    dead.close()


def test_a_keypoint_without_its_label_is_refused_by_the_real_app(dataset, tmp_path, monkeypatch):
    """Label Studio drops the label after each smart keypoint: a click placed without selecting it again reaches
    the service without one, and the 400 naming that surfaces as a ServiceError."""
    import model.evaluation.service as module
    from backend.settings import Settings

    settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "m"), "ADCLICK_NORMAL_DIR": str(dataset / "train"),
                                  "LOG_LEVEL": "WARNING"})
    app, _, _ = make_app(settings)
    local = LocalService(app)
    service = ServicePredictor(local.url)

    def unlabelled(click, width, height, label, k):
        region = keypoint_region(click, width, height, label, k)
        if k == 1:  # the second click: the label was not selected again
            region["value"].pop("keypointlabels")
        return region

    monkeypatch.setattr(module, "keypoint_region", unlabelled)
    try:
        service.connect()
        state = service.set_image(texture(H, W, seed=2))
        assert service.predict(state, [Click(10.0, 10.0)]).mask.shape == (H, W)
        with pytest.raises(ServiceError, match="HTTP 400: .*carries no label"):
            service.predict(state, [Click(10.0, 10.0), Click(50.0, 40.0, False)])
    finally:
        service.close()
        local.close()


# ---- the command line --------------------------------------------------------------------------------------
def test_bench_cli_drives_a_running_service_given_by_url(dataset, tmp_path, caplog):
    """`--predictor service --service-url URL`: the benchmark's clicks go to that service (here the app with the
    tiny engine, on its own port) and its figures are reported like any predictor's."""
    from backend.settings import Settings

    settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "m"), "ADCLICK_NORMAL_DIR": str(dataset / "train"),
                                  "LOG_LEVEL": "WARNING"})
    app, services, _ = make_app(settings)
    local = LocalService(app)
    seen: list[int] = []
    lock = threading.Lock()
    original = services.serving.image_state

    def counting(*a, **k):
        with lock:
            seen.append(1)
        return original(*a, **k)

    services.serving.image_state = counting
    out = tmp_path / "report.json"
    try:
        assert bench.main(["clicks", "--dataset", str(dataset), "--predictor", "service", "--service-url",
                           local.url, "--no-grabcut", "--max-clicks", "3", "--all-clicks", "--refs", "1",
                           "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    finally:
        local.close()
    report = json.loads(out.read_text())
    assert report["config"]["predictors"] == ["service"] and report["overall"]["n_images"] == 4
    # the colour predictor gets each painted defect right with its first click: the simulator stops there
    assert report["overall"]["miou@1"] == 1.0 and len(seen) == 4
    assert "its bank holds 3 references, the benchmark's 1" in caplog.text  # a mismatch is told


def test_image_host_serves_files_and_arrays(tmp_path):
    import requests

    host = ImageHost()
    try:
        path = tmp_path / "a.png"
        save(path, texture(H, W, seed=3))
        url = host.add_file("k1", path)
        assert url.endswith("/k1.png") and requests.get(url, timeout=5).content == path.read_bytes()
        assert requests.get(f"{host.url}/missing.png", timeout=5).status_code == 404
    finally:
        host.close()
