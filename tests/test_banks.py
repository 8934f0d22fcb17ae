"""Reference banks of the service: a small bank first and grown in the background (the first click does not
wait for 200 references, never a 503 once one is usable, answers stay valid across swaps); banks shared by
projects with the same references and freed least-recently-used beyond their byte budget; a failed build or a
bad file in a reference folder answered clearly (issue 12 req 7, issue 15 D6 and the bank 500s)."""

from __future__ import annotations

import gc
import itertools
import logging
import struct
import threading
import time
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from backend.banks import BankLRU, bank_stages, screen_references, spread_order
from backend.settings import Settings
from tests.api_support import (
    CONTRACT_CONFIG,
    RecordingServer,
    Route,
    TinyPredictor,
    decode_mask,
    defect_image,
    encode,
    interactive_body,
    iou,
    keypoint,
    make_app,
    tiny_chooser,
)

CLICK = keypoint(62.5, 41.7)  # on the defect of defect_image() (80, 40)


@pytest.fixture()
def server():
    with RecordingServer() as srv:
        img, truth = defect_image()
        srv.routes["/a.png"] = Route(encode(img))
        srv.truth = truth
        yield srv


def normals(folder: Path, n: int, start: int = 0) -> Path:
    """n small grey reference images, a different grey level each (so every bank size has its own mean)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (folder / f"n{i:03d}.png").write_bytes(encode(np.full((12, 16, 3), 110 + i % 40, np.uint8)))
    return folder


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


# ---- progressive bank (issue 12 req 7) ---------------------------------------------------------------------


def test_spread_order_prefixes_cover_the_folder():
    order = spread_order(200)
    assert sorted(order) == list(range(200))
    assert order[:4] == [0, 100, 50, 150]
    for k in (2, 4, 16, 64):  # every prefix is spread: no gap between chosen indices much wider than 200/k
        chosen = sorted(order[:k]) + [200]
        assert max(b - a for a, b in itertools.pairwise(chosen)) <= 2 * 200 / k
    assert spread_order(1) == [0] and spread_order(0) == []
    assert sorted(spread_order(7)) == list(range(7))


def test_bank_stages():
    assert bank_stages(200, 4, augment_below=10) == [4, 16, 64, 200]
    assert bank_stages(3, 4) == [3]
    assert bank_stages(6, 4, augment_below=10) == [4, 6]  # plain views first, then the augmented bank
    assert bank_stages(0, 4) == [0]


def test_the_first_click_answers_before_the_full_bank_is_built(tmp_path, server):
    """40 references at 0.15 s each: the whole bank takes 6 s; the first mask after /setup must not wait for it."""
    import model.seg.versions  # noqa: F401  (imported by /setup; a cold torch import must not blur the timing)

    folder = normals(tmp_path / "good", 40)
    settings = replace(Settings(), model_dir=tmp_path / "m", normal_dir=str(folder), first_references=4)
    app, _service, engine = make_app(settings, build_delay_s=0.15, delay_per=1)
    client = app.test_client()
    t0 = time.monotonic()
    assert client.post("/setup", json={"project": "1", "schema": CONTRACT_CONFIG}).status_code == 200
    resp = client.post("/predict", json=interactive_body(f"{server.url}/a.png", [CLICK]))
    first_mask_s = time.monotonic() - t0
    assert resp.status_code == 200, resp.get_json()
    assert first_mask_s < 3.0, first_mask_s  # the first bank: 4 x 0.15 s
    assert iou(decode_mask(resp.get_json()["results"][0]["result"][0]), server.truth) > 0.9
    bank = client.get("/health").get_json()["reference_banks"]["projects"]["1"]
    assert bank["size"] < 40 and bank["target"] == 40 and bank["building"] is True
    assert wait_for(lambda: not client.get("/health").get_json()["reference_banks"]["projects"]["1"]["building"])
    bank = client.get("/health").get_json()["reference_banks"]["projects"]["1"]
    assert bank == {"loaded": True, "size": 40, "target": 40, "building": False, "key": bank["key"]}
    assert engine.bank_sizes == [4, 16, 40]


def test_the_first_bank_is_spread_over_the_folder(tmp_path):
    folder = normals(tmp_path / "good", 40)
    settings = replace(Settings(), model_dir=tmp_path / "m", normal_dir=str(folder), first_references=4)
    _, service, engine = make_app(settings)
    seen = []
    real = engine.build_bank
    engine.build_bank = lambda images, **kw: seen.append([Path(p).name for p in images]) or real(images, **kw)
    service.serving.model_for("1")
    assert sorted(seen[0]) == ["n000.png", "n010.png", "n020.png", "n030.png"]


def test_no_503_once_a_reference_is_usable_and_swaps_keep_answers_valid(tmp_path, server):
    folder = normals(tmp_path / "good", 40)
    settings = replace(Settings(), model_dir=tmp_path / "m", normal_dir=str(folder), first_references=4,
                       bank_wait_s=0.05, warm_on_setup=False)
    app, service, engine = make_app(settings, build_delay_s=0.04, delay_per=1)
    client = app.test_client()
    body = interactive_body(f"{server.url}/a.png", [CLICK, keypoint(40.0, 50.0, positive=False)])
    resp = client.post("/predict", json=body)
    assert resp.status_code == 503 and "still being built" in resp.get_json()["error"]  # nothing usable yet

    def usable() -> bool:
        return client.get("/health").get_json()["reference_banks"]["projects"].get("1", {}).get("size", 0) > 0

    assert wait_for(usable)
    statuses, sizes, masks = [], set(), []
    while True:
        building = client.get("/health").get_json()["reference_banks"]["projects"]["1"]["building"]
        resp = client.post("/predict", json=body)
        statuses.append(resp.status_code)
        if resp.status_code != 200:
            break
        masks.append(decode_mask(resp.get_json()["results"][0]["result"][0]))
        sizes.add(service.serving.model_for("1").n_references)
        if not building:
            break
    assert set(statuses) == {200}, statuses
    assert len(sizes) >= 2, sizes  # the clicks were answered from at least two banks
    assert all(iou(m, server.truth) > 0.9 for m in masks)
    # the answer after the swaps is the one a service that had the whole bank from the start gives
    fresh_app, fresh, _ = make_app(replace(settings, model_dir=tmp_path / "m2", bank_wait_s=30,
                                           first_references=1000))  # one stage: the whole bank
    again = fresh_app.test_client().post("/predict", json=body)
    assert np.array_equal(masks[-1], decode_mask(again.get_json()["results"][0]["result"][0]))
    assert fresh.serving.model_for("1").bank.key == service.serving.model_for("1").bank.key
    assert engine.set_image_calls >= 2  # every swap made the next click recompute the image's state


def test_a_project_with_a_bank_keeps_it_while_a_larger_set_grows(tmp_path, server):
    folder = normals(tmp_path / "good", 8)
    settings = replace(Settings(), model_dir=tmp_path / "m", normal_dir=str(folder), first_references=4,
                       warm_on_setup=False)
    app, service, engine = make_app(settings, build_delay_s=0.05, delay_per=1)
    client = app.test_client()
    body = interactive_body(f"{server.url}/a.png", [CLICK])
    assert client.post("/predict", json=body).status_code == 200
    assert wait_for(lambda: service.serving.model_for("1").n_references == 8)
    normals(folder, 40, start=8)  # a fit or the admin adds references: a new set of 48
    served = []
    while service.serving.model_for("1").n_references != 48:
        served.append(service.serving.model_for("1").n_references)
        assert client.post("/predict", json=body).status_code == 200
        time.sleep(0.02)
    assert served and min(served) == 8  # never the new set's first bank of 4, smaller than the one it had
    assert engine.bank_sizes == [4, 8, 4, 16, 48]


def test_growth_stops_between_two_images_when_the_process_exits(tmp_path):
    """At exit the growing bank's thread must end before the interpreter finalizes (a thread inside torch then
    aborts the process with status 134)."""
    folder = normals(tmp_path / "good", 40)
    settings = replace(Settings(), model_dir=tmp_path / "m", normal_dir=str(folder), first_references=4)
    _, service, _engine = make_app(settings, build_delay_s=0.1, delay_per=1)
    assert service.serving.model_for("1").n_references == 4
    t0 = time.monotonic()
    service.serving.stop_builds(timeout_s=5)
    assert time.monotonic() - t0 < 1.0
    key = service.serving.bank_report()["projects"]["1"]["key"]  # this service's bank (earlier tests' may still grow)
    assert not [t for t in threading.enumerate() if t.name == f"bank-{key[:8]}"]
    assert service.serving.bank_report()["projects"]["1"]["building"] is False
    assert service.serving.model_for("1").n_references == 4  # still served from what was built


# ---- shared banks under a byte budget (issue 15 D6) --------------------------------------------------------


def test_projects_with_the_same_references_share_one_bank(tmp_path, server):
    folder = normals(tmp_path / "good", 3)
    settings = replace(Settings(), model_dir=tmp_path / "m", warm_on_setup=False)
    app, service, engine = make_app(settings)
    client = app.test_client()
    for p in range(1, 6):
        extra = {"normal_dir": str(folder)}
        assert client.post("/setup", json={"project": str(p), "schema": CONTRACT_CONFIG,
                                           "extra_params": extra}).status_code == 200
        resp = client.post("/predict", json=interactive_body(f"{server.url}/a.png", [CLICK], project=str(p)))
        assert resp.status_code == 200
    assert engine.banks_built == 1
    banks = client.get("/health").get_json()["reference_banks"]
    assert banks["memory"]["banks"] == 1 and len({b["key"] for b in banks["projects"].values()}) == 1
    assert len({id(service.serving.model_for(str(p)).bank) for p in range(1, 6)}) == 1
    assert service.serving.cache.snapshot()["items"] == 1  # one image state serves the five projects


def test_banks_beyond_the_budget_are_freed_least_recently_used_first(tmp_path, server):
    folders = [normals(tmp_path / f"good{i}", 3, start=i) for i in range(3)]
    one = 3 * 12 * 16 * 3 * 4  # TinyBank.nbytes of 3 references
    settings = replace(Settings(), model_dir=tmp_path / "m", warm_on_setup=False, bank_cache_bytes=2 * one)
    app, service, engine = make_app(settings)
    client = app.test_client()
    for p, folder in enumerate(folders[:2], start=1):
        client.post("/setup", json={"project": str(p), "schema": CONTRACT_CONFIG,
                                    "extra_params": {"normal_dir": str(folder)}})
        assert client.post("/predict", json=interactive_body(f"{server.url}/a.png", [CLICK],
                                                             project=str(p))).status_code == 200
    first = weakref.ref(service.serving.model_for("1").bank)
    service.serving.model_for("2")  # project 1's bank is now the least recently used
    client.post("/setup", json={"project": "3", "schema": CONTRACT_CONFIG,
                                "extra_params": {"normal_dir": str(folders[2])}})
    assert client.post("/predict", json=interactive_body(f"{server.url}/a.png", [CLICK],
                                                         project="3")).status_code == 200
    gc.collect()
    assert first() is None  # freed, not just forgotten
    memory = client.get("/health").get_json()["reference_banks"]["memory"]
    assert memory["banks"] == 2 and memory["bytes"] <= 2 * one and memory["evictions"] == 1
    # project 1 still works: its bank is built again
    assert client.post("/predict", json=interactive_body(f"{server.url}/a.png", [CLICK],
                                                         project="1")).status_code == 200
    assert engine.banks_built == 4


def test_many_project_ids_share_one_bank_and_are_not_all_remembered(tmp_path, server, monkeypatch):
    import backend.serving

    monkeypatch.setattr(backend.serving, "MAX_TRACKED_PROJECTS", 5)
    settings = replace(Settings(), model_dir=tmp_path / "m", warm_on_setup=False)
    app, service, engine = make_app(settings)
    client = app.test_client()
    for p in range(1, 21):  # /predict with a label config: any project id works without /setup
        assert client.post("/predict", json=interactive_body(f"{server.url}/a.png", [CLICK],
                                                             project=str(p))).status_code == 200
    assert engine.banks_built == 1
    report = service.serving.bank_report()
    assert sorted(report["projects"], key=int) == ["16", "17", "18", "19", "20"] and report["memory"]["banks"] == 1


def test_bank_lru_keeps_the_newest_even_alone_over_budget():
    lru = BankLRU(100)
    assert lru.put("a", "A", 60) == [] and lru.put("b", "B", 60) == ["a"]
    assert lru.put("c", "C", 500) == ["b"] and lru.get("c") == "C"


# ---- failures (issue 15) -----------------------------------------------------------------------------------


def test_eight_first_requests_on_a_failing_build_all_get_a_clear_error(tmp_path, server, caplog):
    settings = replace(Settings(), model_dir=tmp_path / "m", warm_on_setup=False)
    app, _service, engine = make_app(settings)

    builds = []

    def fail(images, **_):
        builds.append(1)
        time.sleep(0.3)
        raise MemoryError()

    engine.build_bank = fail
    barrier = threading.Barrier(8)

    def click(_):
        barrier.wait()
        return app.test_client().post("/predict", json=interactive_body(f"{server.url}/a.png", [CLICK]))

    with caplog.at_level(logging.WARNING), ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(click, range(8)))
    assert [a.status_code for a in answers] == [500] * 8
    for a in answers:
        error = a.get_json()["error"]
        assert "building its reference bank failed (MemoryError)" in error and "internal error" not in error
    assert "KeyError" not in caplog.text
    # within the retry delay a click is answered at once, without another build
    before = len(builds)
    assert app.test_client().post("/predict", json=interactive_body(f"{server.url}/a.png", [CLICK])).status_code == 500
    assert len(builds) == before


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (a decompression bomb by its header) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_bomb_and_a_non_image_in_the_reference_folder_are_skipped(tmp_path, server, caplog):
    folder = normals(tmp_path / "secret-folder" / "good", 3)
    (folder / "bomb.png").write_bytes(png_header(20000, 20000))
    (folder / "big.png").write_bytes(png_header(9000, 9000))  # under PIL's limit, over MAX_IMAGE_MPIX (50)
    (folder / "notes.png").write_text("not an image")
    settings = replace(Settings(), model_dir=tmp_path / "m", warm_on_setup=False, normal_dir=str(folder))
    app, service, _ = make_app(settings)
    with caplog.at_level(logging.WARNING):
        resp = app.test_client().post("/predict", json=interactive_body(f"{server.url}/a.png", [CLICK]))
    assert resp.status_code == 200, resp.get_json()
    assert service.serving.model_for("1").n_references == 3
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 3 and all(r.levelname == "WARNING" for r in caplog.records if "skipped" in r.getMessage())
    assert any("bomb.png" in m and "decompression bomb" in m for m in skipped)
    assert any("big.png" in m and "81000000 pixels" not in m and "9000x9000" in m for m in skipped)
    assert any("notes.png" in m and "not a readable image" in m for m in skipped)
    assert "secret-folder" not in caplog.text and "secret-folder" not in resp.get_data(as_text=True)


def test_screen_references_reads_headers_only(tmp_path):
    folder = normals(tmp_path / "good", 2)
    (folder / "bomb.png").write_bytes(png_header(30000, 30000))
    t0 = time.monotonic()
    kept = screen_references(sorted(folder.iterdir()), 50_000_000)
    assert [p.name for p in kept] == ["n000.png", "n001.png"] and time.monotonic() - t0 < 1.0


# ---- per-project click calibration (issue 13 req 2) --------------------------------------------------------------


def _calibrating_app(tmp_path, calibrate, n: int = 40):
    folder = normals(tmp_path / "good", n)
    settings = replace(Settings(), model_dir=tmp_path / "m", normal_dir=str(folder), first_references=4)
    base = tiny_chooser()
    built = []

    def chooser(s, engine):
        choice = base(s, engine)

        def build(eng, bank):
            built.append((len(bank), dict(calibrated)))
            return TinyPredictor(eng, bank)

        return replace(choice, build=build, calibrate=calibrate)

    calibrated: dict = {}
    app, service, engine = make_app(settings, chooser=chooser)
    return app, service, engine, built, calibrated, folder


def test_only_the_complete_bank_is_calibrated_before_it_is_served(tmp_path, server):
    calls = []

    def calibrate(engine, bank, references, cache_dir=None):
        calls.append((len(bank), references))
        calibrated[len(bank)] = True
        return {"weight": 0.75, "threshold": 0.42, "iou": 0.6, "default_iou": 0.5}

    app, _service, _engine, built, calibrated, folder = _calibrating_app(tmp_path, calibrate)
    client = app.test_client()
    assert client.post("/setup", json={"project": "1", "schema": CONTRACT_CONFIG}).status_code == 200
    resp = client.post("/predict", json=interactive_body(f"{server.url}/a.png", [CLICK]))
    assert resp.status_code == 200, resp.get_json()
    assert wait_for(lambda: not client.get("/health").get_json()["reference_banks"]["projects"]["1"]["building"])
    assert [n for n, _ in calls] == [40]  # the partial banks (4, 16) are never calibrated
    refs = calls[0][1]
    assert sorted(Path(p).name for _, p in refs) == sorted(p.name for p in folder.iterdir())
    assert all(len(h) >= 16 for h, _ in refs)  # content hashes, as the bank's source keys
    assert built[-1] == (40, {40: True})  # the complete bank's predictor is built after its calibration


def test_a_failing_calibration_keeps_the_defaults_and_the_bank(tmp_path, server, caplog):
    def calibrate(engine, bank, references, cache_dir=None):
        raise RuntimeError("calibration exploded")

    app, service, _engine, _built, _calibrated, _folder = _calibrating_app(tmp_path, calibrate, n=8)
    client = app.test_client()
    assert client.post("/setup", json={"project": "1", "schema": CONTRACT_CONFIG}).status_code == 200
    with caplog.at_level(logging.ERROR):
        assert wait_for(lambda: service.serving.model_for("1").complete)
    resp = client.post("/predict", json=interactive_body(f"{server.url}/a.png", [CLICK]))
    assert resp.status_code == 200 and iou(decode_mask(resp.get_json()["results"][0]["result"][0]), server.truth) > 0.9
    assert "click calibration failed" in caplog.text
