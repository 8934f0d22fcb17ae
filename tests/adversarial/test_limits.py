"""Bounded work per request and no undocumented 500 for the inputs issue 15 found (through Flask's test
client; the gunicorn-level cases are in test_fuzz.py): project ids Label Studio never sends, label configs
that are not strings, JSON nested past the parser's recursion limit, too many clicks / tasks / bytes,
arbitrary HTTP methods, and which failures are logged as server faults."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace

import pytest

from backend.settings import Settings
from tests.api_support import (
    CONTRACT_CONFIG,
    RecordingServer,
    Route,
    defect_image,
    encode,
    interactive_body,
    keypoint,
    make_app,
)

BAD_PROJECT_IDS = ["1e999", "NaN", "-0", "-1", "0", "inf", "1e3", "9" * 40, "0x10", " ", "a/b", "..", "x"]
BAD_RAW_IDS = [
    b"1e999",
    b"-1e999",
    b"NaN",
    b"Infinity",
    b"-0",
    b"-7",
    b"0",
    b"1.5e300",
    b"9" * 400,
    b"[1]",
    b"true",
    b"0.5",
]


@pytest.fixture()
def settings(tmp_path):
    return replace(Settings(), model_dir=tmp_path / "models", warm_on_setup=False, image_timeout_s=2.0)


@pytest.fixture()
def api(settings):
    app, service, _ = make_app(settings)
    return app.test_client(), service


@pytest.fixture(scope="module")
def images():
    with RecordingServer() as srv:
        img, _ = defect_image()
        srv.routes["/ok.png"] = Route(encode(img))
        yield srv


def _raw(client, path: str, text: bytes):
    return client.post(path, data=text, content_type="application/json")


def _bodies(raw_id: bytes) -> list[tuple[str, bytes]]:
    return [
        ("/webhook", b'{"action": "START_TRAINING", "project": %s}' % raw_id),
        ("/webhook", b'{"action": "START_TRAINING", "project": {"id": %s}}' % raw_id),
        ("/webhook", b'{"action": "ANNOTATION_CREATED", "annotation": {"project": %s}}' % raw_id),
        ("/train", b'{"project": %s}' % raw_id),
        ("/setup", b'{"project": %s, "schema": %s}' % (raw_id, json.dumps(CONTRACT_CONFIG).encode())),
        (
            "/predict",
            b'{"project": %s, "tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": %s}'
            % (raw_id, json.dumps(CONTRACT_CONFIG).encode()),
        ),
    ]


def test_project_ids_label_studio_never_sends_are_400_and_leave_nothing_behind(api, settings):
    client, service = api
    raw_ids = BAD_RAW_IDS + [json.dumps(p).encode() for p in BAD_PROJECT_IDS]
    for raw_id in raw_ids:
        for path, body in _bodies(raw_id):
            resp = _raw(client, path, body)
            assert resp.status_code == 400, (path, raw_id, resp.get_json())
            assert "project" in resp.get_json()["error"], (path, raw_id, resp.get_json())
    for bad in BAD_PROJECT_IDS:
        resp = client.get("/versions", query_string={"project": bad})
        assert resp.status_code == 400 and "project" in resp.get_json()["error"], bad
    training = client.get("/health").get_json()["training"]
    assert training == {"active": [], "queued": [], "jobs": {}}
    assert not (settings.model_dir / "locks").exists() or not list((settings.model_dir / "locks").iterdir())
    assert not (settings.model_dir / "projects").exists() or not list(
        (settings.model_dir / "projects").iterdir()
    )
    assert service.jobs.snapshot() == {}


def test_the_ids_label_studio_sends_still_name_the_project(api):
    client, _service = api
    for raw, key in [
        ("12.1700000000", "12"),
        (12, "12"),
        ({"id": 12}, "12"),
        ("12", "12"),
        (12.0, "12"),
        ({"id": "9.1"}, "9"),
        (2**63 - 1, str(2**63 - 1)),
    ]:
        resp = client.post("/webhook", json={"action": "START_TRAINING", "project": raw})
        assert resp.status_code == 201 and resp.get_json()["project"] == key, (raw, resp.get_json())


def test_junk_left_by_an_older_version_is_not_listed(api, settings):
    client, _service = api
    path = settings.model_dir / "jobs" / "state.json"
    path.parent.mkdir(parents=True)
    junk = {p: {"project": p, "status": "queued"} for p in ("inf", "nan", "-0", "x")}
    path.write_text(json.dumps({"projects": {**junk, "3": {"project": "3", "status": "done"}}}))
    assert list(client.get("/health").get_json()["training"]["jobs"]) == ["3"]
    assert list(client.get("/metrics").get_json()["training"]["jobs"]) == ["3"]


@pytest.mark.parametrize("field", ["label_config", "schema"])
@pytest.mark.parametrize("value", [["<View/>"], {"a": 1}, 12, True])
def test_a_label_config_that_is_not_a_string_is_400(api, field, value):
    client, _ = api
    if field == "schema":
        resp = client.post("/setup", json={"project": 1, "schema": value})
    else:
        resp = client.post(
            "/predict",
            json={"project": 1, "label_config": value, "tasks": [{"id": 1, "data": {"image": "x"}}]},
        )
    assert resp.status_code == 400, resp.get_json()
    assert "label_config must be a string" in resp.get_json()["error"]


def test_a_huge_label_config_is_400(api):
    client, _ = api
    huge = CONTRACT_CONFIG.replace("<View>", "<View>" + " " * 1_000_001, 1)
    resp = client.post("/setup", json={"project": 1, "schema": huge})
    assert resp.status_code == 400 and "over the limit" in resp.get_json()["error"]


@pytest.mark.parametrize("depth", [990, 1000, 5000, 100_000])
@pytest.mark.parametrize("route", ["/predict", "/setup", "/webhook", "/train"])
def test_json_nested_past_the_recursion_limit_is_400(api, route, depth):
    client, _ = api
    for opener, closer in (("[", "]"), ('{"a":', "}")):
        resp = _raw(client, route, (opener * depth + "1" + closer * depth).encode())
        assert resp.status_code == 400, resp.get_json()
        assert "nested too deeply" in resp.get_json()["error"] or "JSON object" in resp.get_json()["error"]


def test_nested_extra_params_are_400(api):
    client, _ = api
    nested = '{"a":' * 950 + "1" + "}" * 950
    for extra in (nested, json.loads('{"a":' * 500 + "1" + "}" * 500)):
        resp = client.post("/setup", json={"project": 1, "schema": CONTRACT_CONFIG, "extra_params": extra})
        assert resp.status_code in (200, 400), resp.get_json()
        assert resp.status_code == 200 or "nested" in resp.get_json()["error"]
    resp = client.post(
        "/setup", json={"project": 1, "schema": CONTRACT_CONFIG, "extra_params": {"x": "y" * 70_000}}
    )
    assert resp.status_code == 400 and "extra_params is over the limit" in resp.get_json()["error"]


def _clicks(n: int) -> list[dict]:
    rng = random.Random(n)
    return [keypoint(rng.uniform(5, 95), rng.uniform(5, 95), positive=i % 4 != 3) for i in range(n)]


def test_clicks_per_request_are_capped(api, images):
    client, _service = api
    url = f"{images.url}/ok.png?cap"
    resp = client.post("/predict", json=interactive_body(url, _clicks(51)))
    assert resp.status_code == 400, resp.get_json()
    assert (
        "more than 50 clicks" in resp.get_json()["error"] and "ADCLICK_MAX_CLICKS" in resp.get_json()["error"]
    )
    assert not [r for r in images.requests if r[1] == "/ok.png?cap"], "refused before any download"
    assert client.post("/predict", json=interactive_body(url, _clicks(50))).status_code == 200


def test_the_click_cap_is_a_setting(settings, images):
    assert Settings.from_env({"ADCLICK_MAX_CLICKS": "3"}).max_clicks == 3
    assert Settings.from_env({}).max_clicks == 50
    app, _, _ = make_app(replace(settings, max_clicks=3))
    client = app.test_client()
    url = f"{images.url}/ok.png"
    assert client.post("/predict", json=interactive_body(url, _clicks(3))).status_code == 200
    resp = client.post("/predict", json=interactive_body(url, _clicks(4)))
    assert resp.status_code == 400 and "more than 3 clicks" in resp.get_json()["error"]


def test_tasks_per_request_are_capped(settings):
    assert Settings.from_env({"MAX_TASKS_PER_REQUEST": "7"}).max_tasks == 7
    app, _, _ = make_app(replace(settings, max_tasks=3))
    body = {
        "project": 1,
        "label_config": CONTRACT_CONFIG,
        "params": {"context": None},
        "tasks": [{"id": i, "data": {"image": "x"}} for i in range(4)],
    }
    resp = app.test_client().post("/predict", json=body)
    assert (
        resp.status_code == 400 and "4 tasks in one request, over the limit of 3" in resp.get_json()["error"]
    )


def test_the_body_size_is_capped_with_a_json_answer(settings):
    assert Settings.from_env({"MAX_BODY_MB": "2"}).max_body_bytes == 2 * 1024 * 1024
    app, _, _ = make_app(replace(settings, max_body_bytes=1000))
    resp = app.test_client().post("/predict", data=b"[" + b" " * 2000 + b"]", content_type="application/json")
    assert resp.status_code == 413
    assert "over the limit of" in resp.get_json()["error"] and "MAX_BODY_MB" in resp.get_json()["error"]


def test_arbitrary_methods_do_not_grow_the_route_statistics(api):
    client, _ = api
    rng = random.Random(0)
    for _ in range(300):
        method = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(8))
        resp = client.open("/nope-" + str(rng.randrange(10**6)), method=method)
        assert resp.status_code in (404, 405) and resp.is_json
    assert len(client.get("/metrics").get_json()["routes"]) <= 4


def test_client_caused_failures_are_warnings_server_faults_errors_with_traceback(api, caplog):
    client, service = api
    body = interactive_body("http://127.0.0.1:9/x.png", [keypoint(50, 50)])
    with caplog.at_level(logging.INFO):
        assert client.post("/predict", json=body).status_code == 502  # the task's image host is unreachable
        assert client.post("/predict", json={"tasks": 1}).status_code == 400
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any(r.levelno == logging.WARNING and "-> 502" in r.getMessage() for r in caplog.records)
    caplog.clear()

    def broken(*a, **kw):
        raise RuntimeError("a bug of the server")

    service.serving.image_state = broken
    with caplog.at_level(logging.INFO):
        resp = client.post("/predict", json=body)
    assert resp.status_code == 500 and "a bug" not in resp.get_json()["error"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "-> 500" in r.getMessage()] == []


def test_a_backend_500_is_logged_with_its_traceback(api, caplog):
    from backend.errors import BackendError

    client, service = api

    def broken(*a, **kw):
        raise BackendError("state file is unreadable")

    service.serving.image_state = broken
    with caplog.at_level(logging.INFO):
        resp = client.post("/predict", json=interactive_body("http://127.0.0.1:9/x.png", [keypoint(50, 50)]))
    assert resp.status_code == 500
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


def _readme_status(words: str) -> int:
    from tests.adversarial.harness import ROOT

    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| 4")]
    found = {int(line.split("|")[1].strip()[:3]) for line in rows if words in line}
    assert len(found) == 1, f"README's error table should name one status for {words!r}: {found}"
    return found.pop()


def test_the_readme_names_the_status_the_code_answers(api, images):
    """N5: README and code agree (the contract only asks for a 4xx JSON answer naming the problem)."""
    client, _ = api
    body = interactive_body(f"{images.url}/ok.png", [keypoint(50, 50, label="Crack")])
    resp = client.post("/predict", json=body)
    assert resp.status_code == _readme_status("unknown label"), resp.get_json()
    assert "'Crack' is not a value of BrushLabels" in resp.get_json()["error"]
    resp = client.post("/predict", json=interactive_body(f"{images.url}/ok.png", _clicks(51)))
    assert resp.status_code == _readme_status("ADCLICK_MAX_CLICKS")


def test_an_authorization_header_that_is_not_ascii_is_a_401(settings):
    app, _, _ = make_app(replace(settings, basic_auth_user="u", basic_auth_pass="p"))
    client = app.test_client()
    for value in ("Basic \u00fc", "Basic \u00ff\u00fe", "\u00e9"):
        resp = client.get("/metrics", headers={"Authorization": value})
        assert resp.status_code == 401 and "authentication required" in resp.get_json()["error"], value
    assert client.get("/metrics", headers={"Authorization": "Basic dTpw"}).status_code == 200
