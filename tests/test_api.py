"""The HTTP service through Flask's test client: routes and shapes Label Studio 1.23 uses, basic auth,
setup/extra_params/versions, interactive and batch predictions checked by the SDK, caching, webhooks."""

import base64
import logging
from dataclasses import replace

import numpy as np
import pytest

from backend import ls_format
from backend.settings import Settings
from tests.api_support import (
    CONTRACT_CONFIG,
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


@pytest.fixture()
def server():
    with RecordingServer() as srv:
        yield srv


@pytest.fixture()
def settings(tmp_path):
    return replace(Settings(), model_dir=tmp_path / "models", warm_on_setup=False, image_timeout_s=2.0)


@pytest.fixture()
def api(settings):
    app, service, engine = make_app(settings)
    return app.test_client(), service, engine


def serve_defect(server, path="/img.png", **kw):
    img, mask = defect_image(**kw)
    server.routes[path] = Route(encode(img))
    return f"{server.url}{path}", mask


def test_health_is_fast_open_and_reports_the_model(api):
    client, service, _ = api
    for path in ("/health", "/"):
        resp = client.get(path)
        assert resp.status_code == 200
        body = resp.get_json()
        assert body["status"] == "UP" and body["model"]["loaded"] is False  # /health never loads the model
        assert set(body["training"]) == {"active", "queued", "jobs"}
    client.get("/versions")
    assert client.get("/health").get_json()["model"] == {
        "loaded": True,
        "kind": "tiny",
        "version": "tiny-tiny0001",
        "reason": "tiny test predictor",
        "load_seconds": service.model.load_seconds,
    }


def test_basic_auth_guards_every_route_but_health(settings):
    app, _, _ = make_app(replace(settings, basic_auth_user="ann", basic_auth_pass="s3cret"))
    client = app.test_client()
    assert client.get("/health").status_code == 200
    for method, path in (
        ("get", "/"),
        ("get", "/metrics"),
        ("get", "/versions"),
        ("post", "/setup"),
        ("post", "/predict"),
        ("post", "/webhook"),
    ):
        resp = getattr(client, method)(path, json={})
        assert resp.status_code == 401 and "basic auth" in resp.get_json()["error"]
    bad = base64.b64encode(b"ann:wrong").decode()
    assert client.get("/metrics", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    good = base64.b64encode(b"ann:s3cret").decode()
    assert client.get("/metrics", headers={"Authorization": f"Basic {good}"}).status_code == 200


def test_setup_returns_the_version_and_keeps_extra_params(api):
    client, service, _ = api
    body = {
        "project": "3.1712345678",
        "schema": CONTRACT_CONFIG,
        "hostname": "http://ls",
        "access_token": "x",
        "extra_params": {"normal_dir": "/nowhere", "object": "tire"},
    }
    resp = client.post("/setup", json=body)
    assert resp.status_code == 200
    assert resp.get_json()["model_version"] == "tiny-tiny0001"
    resp = client.post("/setup", json={"project": "3.1712399999", "schema": CONTRACT_CONFIG})
    assert resp.status_code == 200
    assert service.projects.extra_params("3") == {"normal_dir": "/nowhere", "object": "tire"}


def test_setup_never_overwrites_a_trained_version(api, settings):
    import torch

    from backend.projects import ProjectStore

    client, _, _ = api
    ProjectStore(settings.model_dir).version_store("4").commit(
        {"arch": "x", "config": {}, "state_dict": {"w": torch.zeros(1)}}, {"kind": "test"}
    )
    resp = client.post("/setup", json={"project": "4.1", "schema": CONTRACT_CONFIG})
    assert resp.get_json()["model_version"] == "adclick-seg-v1"
    assert client.get("/versions?project=4").get_json() == {
        "versions": ["tiny-tiny0001", "adclick-seg-v1"],
        "model_version": "adclick-seg-v1",
    }


@pytest.mark.parametrize(
    "schema, status, words",
    [
        ("<View><Image name='i' value='$image'/></View>", 422, "BrushLabels"),
        (
            """<View><Image name="image" value="$image"/>
              <BrushLabels name="m" toName="image"><Label value="A"/></BrushLabels>
              <KeyPointLabels name="k" toName="image" smart="true"><Label value="B"/>
              </KeyPointLabels></View>""",
            422,
            "missing from BrushLabels",
        ),
        (None, 422, "no label config"),
    ],
)
def test_setup_rejects_configs_it_cannot_serve(api, schema, status, words):
    client, _, _ = api
    resp = client.post("/setup", json={"project": "5", "schema": schema})
    assert resp.status_code == status and words in resp.get_json()["error"]


def test_interactive_clicks_give_one_valid_brush_mask_on_the_defect(api, server):
    client, _, _ = api
    url, truth = serve_defect(server, center=(80, 40), radius=12)
    clicks = [
        keypoint(80 / 128 * 100, 40 / 96 * 100),
        keypoint(84 / 128 * 100, 44 / 96 * 100),
        keypoint(20 / 128 * 100, 70 / 96 * 100, positive=False),
    ]
    resp = client.post("/predict", json=interactive_body(url, clicks))
    assert resp.status_code == 200, resp.get_json()
    results = resp.get_json()["results"]
    assert len(results) == 1 and len(results[0]["result"]) == 1
    region = results[0]["result"][0]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Scratch"]
    assert isinstance(region["id"], str) and (region["original_width"], region["original_height"]) == (
        128,
        96,
    )
    mask = decode_mask(region)
    assert iou(mask, truth) > 0.9 and not mask[70, 20]
    assert 0 < region["score"] <= 1 and results[0]["model_version"] == "tiny-tiny0001"
    cfg = ls_format.parse_label_config(CONTRACT_CONFIG)
    assert ls_format.validation_errors(cfg, results[0]) == []


def test_a_second_click_on_the_same_image_reuses_the_cached_work(api, server):
    client, _, engine = api
    url, _ = serve_defect(server)
    first = client.post("/predict", json=interactive_body(url, [keypoint(62.5, 41.7)]))
    second = client.post(
        "/predict", json=interactive_body(url, [keypoint(62.5, 41.7), keypoint(10, 10, positive=False)])
    )
    assert first.status_code == second.status_code == 200
    assert engine.set_image_calls == 1
    assert len([r for r in server.requests if r[1] == "/img.png"]) == 1
    metrics = client.get("/metrics").get_json()
    assert metrics["state_cache"]["hits"] >= 1 and metrics["state_cache"]["misses"] == 1
    assert metrics["download_cache"]["hits"] == 0  # a cached state needs neither the download nor a decode


def test_rectangle_prompt_segments_inside_the_box(api, server):
    client, _, _ = api
    url, truth = serve_defect(server, center=(40, 50), radius=10)
    box = {
        "id": "r",
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 128,
        "original_height": 96,
        "value": {
            "x": 20 / 128 * 100,
            "y": 30 / 96 * 100,
            "width": 40 / 128 * 100,
            "height": 40 / 96 * 100,
            "rectanglelabels": ["Dent"],
        },
    }
    resp = client.post("/predict", json=interactive_body(url, [box]))
    region = resp.get_json()["results"][0]["result"][0]
    assert region["value"]["brushlabels"] == ["Dent"] and iou(decode_mask(region), truth) > 0.9


def test_batch_predictions_for_every_task_with_regions_verdict_and_score(api, server):
    client, _, _ = api
    url, truth = serve_defect(server, center=(30, 30), radius=9)
    clean = np.clip(128 + np.random.default_rng(3).normal(0, 6, (96, 128, 3)), 0, 255).astype(np.uint8)
    server.routes["/clean.png"] = Route(encode(clean))
    body = {
        "tasks": [{"id": 1, "data": {"image": url}}, {"id": 2, "data": {"image": f"{server.url}/clean.png"}}],
        "project": "6.1",
        "label_config": CONTRACT_CONFIG,
        "params": {"context": None},
    }
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.get_json()
    defect, ok = resp.get_json()["results"]
    cfg = ls_format.parse_label_config(CONTRACT_CONFIG)
    for pred in (defect, ok):
        assert ls_format.validation_errors(cfg, pred) == [] and pred["model_version"] == "tiny-tiny0001"
    brushes = [r for r in defect["result"] if r["type"] == "brushlabels"]
    assert len(brushes) == 1 and iou(decode_mask(brushes[0]), truth) > 0.8
    assert [r["value"]["choices"] for r in defect["result"] if r["type"] == "choices"] == [["Anomalous"]]
    assert [r["value"]["choices"] for r in ok["result"] if r["type"] == "choices"] == [["OK"]]
    assert defect["score"] > ok["score"]


def test_references_from_extra_params_are_used_and_counted(api, server, tmp_path):
    client, service, engine = api
    normals = tmp_path / "normals"
    normals.mkdir()
    for i in range(3):
        (normals / f"n{i}.png").write_bytes(encode(np.full((96, 128, 3), 128, np.uint8)))
    client.post(
        "/setup",
        json={"project": "7", "schema": CONTRACT_CONFIG, "extra_params": {"normal_dir": str(normals)}},
    )
    url, _ = serve_defect(server)
    assert (
        client.post("/predict", json=interactive_body(url, [keypoint(62.5, 41.7)], project="7.1")).status_code
        == 200
    )
    assert service.serving.model_for("7").n_references == 3 and engine.banks_built == 1
    assert client.get("/health").get_json()["reference_images"]["projects"] == {"7": 3}


def test_webhooks_answer_at_once_and_queue_training_events(api):
    client, _service, _ = api
    resp = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 8, "title": "t"}})
    assert resp.status_code == 201 and resp.get_json()["status"] == "queued"
    resp = client.post(
        "/webhook", json={"action": "ANNOTATIONS_CREATED", "annotations": [{"id": 1, "project": 8}]}
    )
    assert resp.status_code == 201 and resp.get_json()["job"]["pending_events"] == 1
    resp = client.post("/train", json={"project": {"id": 9}})
    assert resp.status_code == 201 and resp.get_json()["job"]["force"] is True
    resp = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 8}})
    assert resp.status_code == 200 and resp.get_json()["status"] == "ignored"
    health = client.get("/health").get_json()
    assert sorted(health["training"]["queued"]) == ["8", "9"]


def test_metrics_report_routes_latency_and_caches(api, server):
    client, _, _ = api
    client.get("/health")
    client.post("/predict", data="{not json", content_type="application/json")
    body = client.get("/metrics").get_json()
    assert body["routes"]["GET /health"]["count"] == 1
    assert body["routes"]["POST /predict"]["by_status"] == {"400": 1}
    assert set(body["routes"]["GET /health"]["latency_ms"]) == {"p50", "p90", "p99", "max", "window"}
    assert {"state_cache", "download_cache", "training", "model"} <= set(body)


def test_a_restarted_process_warms_known_projects_before_the_first_click(settings):
    import time

    client = make_app(settings)[0].test_client()
    assert client.post("/setup", json={"project": "12", "schema": CONTRACT_CONFIG}).status_code == 200
    app, service, engine = make_app(
        replace(settings, warm_on_setup=True), start_jobs=True
    )  # "after a restart"
    try:
        assert app.test_client().get("/health").status_code == 200
        deadline = time.monotonic() + 10
        while "12" not in service.serving.reference_counts()["projects"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.banks_built == 1 and "12" in service.serving.reference_counts()["projects"]
    finally:
        service.jobs.stop()


def test_health_counts_the_environment_reference_folder(settings, tmp_path):
    normals = tmp_path / "env-normals" / "sub"
    normals.mkdir(parents=True)
    for i in range(2):
        (normals / f"n{i}.jpg").write_bytes(encode(np.full((8, 8, 3), 128, np.uint8), fmt="JPEG"))
    (normals / "notes.txt").write_text("not an image")
    app, _, _ = make_app(replace(settings, normal_dir=str(tmp_path / "env-normals")))
    assert app.test_client().get("/health").get_json()["reference_images"] == {"normal_dir": 2, "projects": {}}


def test_interactive_requests_feed_the_previous_click_mask_like_the_simulator(api, server, monkeypatch):
    """Label Studio sends all clicks each time and never the previous mask: the service replays them one by
    one (remembering each prefix), so the predictor sees the same previous masks as in the benchmark."""
    from tests.api_support import TinyPredictor

    seen = []
    original = TinyPredictor.predict

    def recording(self, state, clicks, box=None, prompt="", previous_mask=None):
        seen.append((len(clicks), None if previous_mask is None else int(previous_mask.sum())))
        return original(self, state, clicks, box, prompt, previous_mask)

    monkeypatch.setattr(TinyPredictor, "predict", recording)
    client, _, _ = api
    url, _ = serve_defect(server, center=(80, 40), radius=12)
    first = [keypoint(80 / 128 * 100, 40 / 96 * 100)]
    one = client.post("/predict", json=interactive_body(url, first))
    two = client.post("/predict", json=interactive_body(url, first + [keypoint(20, 70, positive=False)]))
    assert one.status_code == two.status_code == 200
    mask_one = decode_mask(one.get_json()["results"][0]["result"][0])
    # one predictor call per request; the second got the first answer's mask as its previous mask
    assert seen == [(1, None), (2, int(mask_one.sum()))] and mask_one.sum() > 100


@pytest.mark.parametrize("sent, stored", [
    ('{"normal_dir": "/typed", "object": "tire"}', {"normal_dir": "/typed", "object": "tire"}),  # the UI form
    ({"normal_dir": "/api"}, {"normal_dir": "/api"}),  # the API
    ("", {"object": "kept"}),  # the form with the box left empty keeps what is stored
    ("  ", {"object": "kept"}),
    (None, {"object": "kept"}),
    ("[object Object]", {"object": "kept"}),  # Edit on an API-stored object shows and sends this
])
def test_setup_accepts_extra_params_as_label_studio_sends_them(api, sent, stored):
    client, service, _ = api
    assert client.post("/setup", json={"project": "31", "schema": CONTRACT_CONFIG,
                                       "extra_params": {"object": "kept"}}).status_code == 200
    resp = client.post("/setup", json={"project": "31", "schema": CONTRACT_CONFIG, "extra_params": sent})
    assert resp.status_code == 200, resp.get_json()
    assert service.projects.extra_params("31") == stored


@pytest.mark.parametrize("sent, words", [
    ("{normal_dir: /x}", "not valid JSON"),
    ('["a", "b"]', "must be a JSON object"),
    ('"text"', "must be a JSON object"),
    (5, "must be a JSON object"),
    ("[" * 5000 + "]" * 5000, "extra_params"),
])
def test_setup_refuses_extra_params_that_are_not_an_object(api, sent, words):
    client, _, _ = api
    resp = client.post("/setup", json={"project": "32", "schema": CONTRACT_CONFIG, "extra_params": sent})
    assert resp.status_code == 400
    assert words in resp.get_json()["error"]


def test_refused_requests_are_logged_with_route_status_and_reason(api, caplog):
    client, _, _ = api
    with caplog.at_level(logging.WARNING, logger="backend.app"):
        resp = client.post("/setup", json={"project": "33", "schema": CONTRACT_CONFIG,
                                           "extra_params": "{bad", "access_token": "SECRET-TOKEN"})
    assert resp.status_code == 400
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("POST /setup -> 400" in line and "not valid JSON" in line for line in lines), lines
    assert not any("SECRET-TOKEN" in line for line in lines)


@pytest.mark.parametrize("context", [{"result": []}, {}, {"result": [{"type": "textarea", "value": {"text": "x"}}]}])
def test_context_without_smart_regions_is_an_empty_prediction_without_image_work(api, server, context):
    """Label Studio's editor sends /predict with such a context after every submit (issue 12, item 3)."""
    client, _service, engine = api
    url, _ = serve_defect(server)
    body = interactive_body(url, [])
    body["params"]["context"] = context
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.get_json()
    (pred,) = resp.get_json()["results"]
    assert pred["result"] == [] and 0.0 <= pred["score"] <= 1.0
    assert server.requests == [] and engine.set_image_calls == 0  # nothing downloaded, no model work


def test_a_malformed_context_is_refused_before_the_image_is_fetched(api, server):
    client, _, engine = api
    url, _ = serve_defect(server)
    resp = client.post("/predict", json=interactive_body(url, [keypoint(50, 50, label="Hole")]))
    assert resp.status_code in (400, 422) and "Hole" in resp.get_json()["error"]
    resp = client.post("/predict", json=interactive_body(url, [keypoint(150, 50)]))
    assert resp.status_code == 400 and "outside the image" in resp.get_json()["error"]
    assert server.requests == [] and engine.set_image_calls == 0


def _record_prompts(monkeypatch, score=None):
    from tests.api_support import TinyPredictor

    seen, original = [], TinyPredictor.predict

    def spy(self, state, clicks, box=None, prompt="", previous_mask=None):
        seen.append(prompt)
        out = original(self, state, clicks, box, prompt, previous_mask)
        if score is not None:
            out.score = score
        return out

    monkeypatch.setattr(TinyPredictor, "predict", spy)
    return seen


def test_the_textarea_text_of_the_saved_draft_is_the_prompt(api, server, monkeypatch):
    """Label Studio 1.23.2 sends no TextArea in the click context, but the task's drafts (issue 12, item 5)."""
    client, _service, _ = api
    seen = _record_prompts(monkeypatch)
    url, _ = serve_defect(server)
    body = interactive_body(url, [keypoint(54.7, 54.2)])
    body["tasks"][0]["drafts"] = [
        {"id": 1, "updated_at": "2026-12-01T10:00:00Z",
         "result": [{"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": ["old"]}}]},
        {"id": 2, "updated_at": "2026-12-01T10:05:00Z",
         "result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                     "value": {"text": ["thin radial crack"]}}]},
    ]
    assert client.post("/predict", json=body).status_code == 200
    assert seen[-1] == "Scratch, thin radial crack"
    # without a draft, the project's "prompt" extra param stands in
    client.post("/setup", json={"project": "1", "schema": CONTRACT_CONFIG, "extra_params": '{"prompt": "pit"}'})
    seen.clear()
    assert client.post("/predict", json=interactive_body(url, [keypoint(54.7, 54.2)], task_id=2)).status_code == 200
    assert seen[-1] == "Scratch, pit"


def test_interactive_scores_stay_between_0_and_1(api, server, monkeypatch):
    """The editor shows score x 100 as a percentage: a raw residual magnitude showed as 2844.61 %."""
    client, _, _ = api
    _record_prompts(monkeypatch, score=28.4461)
    url, _ = serve_defect(server)
    (pred,) = client.post("/predict", json=interactive_body(url, [keypoint(54.7, 54.2)])).get_json()["results"]
    assert 0.0 <= pred["score"] <= 1.0 and all(0.0 <= r["score"] <= 1.0 for r in pred["result"])


def test_batch_regions_take_the_label_whose_map_wins_else_the_first():
    """Issue 12 item 4: a region is named by the learned label masks covering it; with no learned label (the
    click-mode detector, or a version trained on verdicts only) the first BrushLabels value names it."""
    from backend.predict import anomaly_regions
    from model.types import AnomalyResult

    cfg = ls_format.parse_label_config(CONTRACT_CONFIG)
    assert list(cfg.brush_labels[:2]) == ["Scratch", "Dent"]
    blob = np.zeros((40, 60), dtype=bool)
    blob[5:15, 5:15] = True
    other = np.zeros_like(blob)
    other[25:35, 40:55] = True
    amap = (blob | other).astype(np.float32)
    learned = AnomalyResult(amap, 0.9, masks={"": blob | other, "Dent": blob, "Scratch": other},
                            label_scores={"Dent": 0.9, "Scratch": 0.8})
    got = {r["value"]["brushlabels"][0]: decode_mask(r) for r in anomaly_regions(learned, cfg, (40, 60))}
    assert set(got) == {"Dent", "Scratch"} and got["Dent"][10, 10] and got["Scratch"][30, 50]
    unlearned = AnomalyResult(amap, 0.9, masks={"": blob | other}, label_scores={})
    names = [r["value"]["brushlabels"][0] for r in anomaly_regions(unlearned, cfg, (40, 60))]
    assert names == ["Scratch", "Scratch"]


def test_a_gunicorn_worker_starts_loading_the_model_when_it_boots(tmp_path):
    """Issue 12 req 7: the model load used to start with the worker's first request (Label Studio's Connect),
    so the first click after connecting waited for it. backend.gunicorn_conf.post_worker_init starts it at boot."""
    import time as _time

    from backend import gunicorn_conf

    settings = replace(Settings(), model_dir=tmp_path / "models", warm_on_setup=True)
    app, service, _ = make_app(settings)
    assert not service.model.loaded
    gunicorn_conf.post_worker_init(type("Worker", (), {"wsgi": app})())
    deadline = _time.monotonic() + 20
    while not service.model.loaded and _time.monotonic() < deadline:
        _time.sleep(0.05)
    assert service.model.loaded
    off = replace(settings, warm_on_setup=False, model_dir=tmp_path / "m2")
    app2, service2, _ = make_app(off)
    gunicorn_conf.post_worker_init(type("Worker", (), {"wsgi": app2})())
    _time.sleep(0.3)
    assert not service2.model.loaded
