"""Concurrent annotators: 8 threads clicking on 8 different images at once get their own correct masks, the
state cache stays within its byte budget, and threads on the same image share one computation."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from backend.cache import ByteLRU
from backend.settings import Settings
from tests.api_support import (
    RecordingServer,
    Route,
    decode_mask,
    defect_image,
    encode,
    interactive_body,
    iou,
    keypoint,
    make_app,
)

STATE_BYTES = 96 * 128 * 16  # TinyState: float32 image (3 channels) + float32 distance map


@pytest.fixture()
def server():
    with RecordingServer() as srv:
        yield srv


def test_eight_threads_on_eight_images(tmp_path, server):
    truths = {}
    for i in range(8):
        center = (20 + 12 * i, 25 + 6 * i)
        img, truth = defect_image(center=center, radius=8, seed=i)
        server.routes[f"/{i}.png"] = Route(encode(img))
        truths[i] = (center, truth)
    budget = int(3.5 * STATE_BYTES)
    settings = replace(Settings(), model_dir=tmp_path / "m", warm_on_setup=False, state_cache_bytes=budget)
    app, service, engine = make_app(settings, delay_s=0.05)
    barrier = threading.Barrier(8)

    def annotate(i):
        client = app.test_client()
        (cx, cy), truth = truths[i]
        barrier.wait()
        ious = []
        for _ in range(3):  # three clicks per annotator, all at the same time as the others
            body = interactive_body(
                f"{server.url}/{i}.png", [keypoint(cx / 128 * 100, cy / 96 * 100)], task_id=i
            )
            resp = client.post("/predict", json=body)
            assert resp.status_code == 200, resp.get_json()
            ious.append(iou(decode_mask(resp.get_json()["results"][0]["result"][0]), truth))
            assert service.serving.cache.bytes_used <= budget
        return ious

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(annotate, range(8)))
    assert all(min(r) > 0.9 for r in results), results
    snap = service.serving.cache.snapshot()
    assert snap["bytes"] <= budget and snap["items"] <= 3 and snap["evictions"] >= 5
    assert engine.banks_built == 1  # one project, one bank, built once despite 8 simultaneous first requests
    assert engine.max_running <= settings.compute_concurrency  # backbone passes are bounded


def test_a_slow_first_bank_answers_503_then_serves_and_a_rebuild_keeps_serving(tmp_path, server):
    img, _truth = defect_image()
    server.routes["/a.png"] = Route(encode(img))
    settings = replace(Settings(), model_dir=tmp_path / "m", warm_on_setup=False, bank_wait_s=0.1)
    app, service, engine = make_app(settings, build_delay_s=0.6)
    client = app.test_client()
    body = interactive_body(f"{server.url}/a.png", [keypoint(62.5, 41.7)])
    resp = client.post("/predict", json=body)
    assert resp.status_code == 503 and "still being built" in resp.get_json()["error"]
    assert client.get("/health").status_code == 200
    deadline = time.monotonic() + 10
    while resp.status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
        resp = client.post("/predict", json=body)
    assert resp.status_code == 200 and engine.banks_built == 1
    # new references arrive (as a fit would write them): the old model serves while the new bank builds
    refs = service.projects.references_dir("1")
    refs.mkdir(parents=True)
    (refs / "task-1.png").write_bytes(encode(img))
    assert client.post("/predict", json=body).status_code == 200
    while service.serving.model_for("1").n_references != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.serving.model_for("1").n_references == 1 and engine.banks_built == 2


def test_threads_on_the_same_image_compute_it_once(tmp_path, server):
    img, _truth = defect_image()
    server.routes["/same.png"] = Route(encode(img))
    settings = replace(Settings(), model_dir=tmp_path / "m", warm_on_setup=False)
    app, _, engine = make_app(settings, delay_s=0.2)

    def click(_):
        body = interactive_body(f"{server.url}/same.png", [keypoint(62.5, 41.7)])
        return app.test_client().post("/predict", json=body).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(click, range(8))) == [200] * 8
    assert engine.set_image_calls == 1


def test_byte_lru_evicts_least_recently_used_and_skips_oversize():
    import numpy as np

    cache = ByteLRU(300)
    for key in "abc":
        cache.put(key, np.zeros(100, np.uint8))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", np.zeros(100, np.uint8))
    assert cache.get("b") is None and cache.get("a") is not None and cache.bytes_used == 300
    cache.put("huge", np.zeros(1000, np.uint8))
    assert cache.get("huge") is None and cache.stats.oversize == 1 and cache.bytes_used <= 300


def test_byte_lru_failed_factory_does_not_block_the_key():
    cache = ByteLRU(10_000)

    def boom():
        raise ValueError("bad image")

    with pytest.raises(ValueError):
        cache.get_or_set("k", boom)
    assert cache.get_or_set("k", lambda: b"x" * 10) == b"x" * 10
