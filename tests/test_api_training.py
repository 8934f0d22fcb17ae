"""The zero-training fit end to end through the service: webhook -> job -> the project's annotated tasks read
with the real SDK client from a local stand-in Label Studio (paginated /api/tasks/) -> OK-verdict images
become references -> a new model_version that /setup, /versions and predictions report."""

import json
import time
from dataclasses import replace
from urllib.parse import parse_qs, urlparse

import numpy as np
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


def annotation(verdict=None, brush=False):
    result = []
    if verdict:
        result.append(
            {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": [verdict]}}
        )
    if brush:
        result.append(
            {
                "from_name": "mask",
                "to_name": "image",
                "type": "brushlabels",
                "value": {"format": "rle", "rle": [0], "brushlabels": ["Scratch"]},
            }
        )
    return {"id": 1, "result": result, "was_cancelled": False, "updated_at": "2026-01-01T00:00:00Z"}


class FakeLabelStudio:
    """Just the endpoints fit uses: GET /api/tasks/ (paginated, 2 per page) and the task images."""

    def __init__(self, server):
        self.server = server
        self.tasks = []
        server.routes["/api/tasks/"] = Route(handler=self._tasks)

    def add(self, task_id, verdict=None, brush=False, seed=0):
        img = np.clip(128 + np.random.default_rng(seed).normal(0, 6, (96, 128, 3)), 0, 255).astype(np.uint8)
        self.server.routes[f"/data/upload/1/{task_id}.png"] = Route(encode(img))
        self.tasks.append(
            {
                "id": task_id,
                "data": {"image": f"/data/upload/1/{task_id}.png"},
                "annotations": [annotation(verdict, brush)],
            }
        )

    def _tasks(self, handler, body):
        page = int(parse_qs(urlparse(handler.path).query).get("page", ["1"])[0])
        items = self.tasks[(page - 1) * 2 : page * 2]
        if not items and page > 1:
            return 404, {"Content-Type": "application/json"}, b'{"detail": "Invalid page."}'
        return (
            200,
            {"Content-Type": "application/json"},
            json.dumps({"tasks": items, "total": len(self.tasks)}).encode(),
        )


@pytest.fixture()
def world(tmp_path):
    with RecordingServer() as server:
        ls = FakeLabelStudio(server)
        settings = replace(
            Settings(),
            model_dir=tmp_path / "m",
            warm_on_setup=False,
            label_studio_url=server.url,
            label_studio_api_key="legacy-token",
        )
        app, service, engine = make_app(settings, start_jobs=True)
        yield app.test_client(), service, engine, ls, server
        service.jobs.stop()


def test_start_training_turns_ok_tasks_into_references_and_a_new_version(world):
    client, service, _engine, ls, server = world
    ls.add(1, "OK", seed=1)
    ls.add(2, "OK", seed=2)
    ls.add(3, "Anomalous", brush=True, seed=3)
    ls.add(4, "OK", seed=4)
    ls.add(5, None, seed=5)  # no verdict yet: not a reference
    assert (
        client.post("/setup", json={"project": "1.17", "schema": CONTRACT_CONFIG}).get_json()["model_version"]
        == "tiny-tiny0001"
    )
    resp = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert resp.status_code == 201
    assert service.jobs.wait_idle(20)
    job = client.get("/health").get_json()["training"]["jobs"]["1"]
    assert job["status"] == "done", job
    assert job["figures"]["ok_tasks"] == 3 and job["figures"]["reference_images"] == 3
    version = job["model_version"]
    assert version.startswith("tiny-tiny0001-refs-")
    refs = sorted(p.name.split("-")[1] for p in service.projects.references_dir("1").glob("*.png"))
    assert refs == ["1", "2", "4"]
    assert all(h == "Token legacy-token" for h in server.auth_headers("/api/tasks/"))
    # the version is what /setup, /versions, /metrics and predictions now report
    assert (
        client.post("/setup", json={"project": "1.18", "schema": CONTRACT_CONFIG}).get_json()["model_version"]
        == version
    )
    assert version in client.get("/versions?project=1").get_json()["versions"]
    assert version in client.get("/versions").get_json()["versions"]  # Label Studio names no project
    assert client.get("/metrics").get_json()["training"]["last"]["model_version"] == version
    img, _ = defect_image()
    server.routes["/q.png"] = Route(encode(img))
    pred = client.post(
        "/predict", json=interactive_body(f"{server.url}/q.png", [keypoint(62.5, 41.7)], project="1.19")
    ).get_json()["results"][0]
    assert pred["model_version"] == version and service.serving.model_for("1").n_references == 3


def test_a_verdict_changed_to_anomalous_leaves_the_references(world):
    client, service, _, ls, _ = world
    ls.add(1, "OK", seed=1)
    ls.add(2, "OK", seed=2)
    client.post("/setup", json={"project": "1", "schema": CONTRACT_CONFIG})
    client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert service.jobs.wait_idle(20)
    first = service.jobs.snapshot("1")["model_version"]
    ls.tasks[1]["annotations"] = [annotation("Anomalous", brush=True)]
    client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert service.jobs.wait_idle(20)
    state = service.jobs.snapshot("1")
    assert state["figures"]["references_removed"] == 1 and state["figures"]["reference_images"] == 1
    assert state["model_version"] != first


def test_a_failing_fit_is_reported_and_the_service_keeps_serving(world):
    client, service, _, _ls, server = world
    del server.routes["/api/tasks/"]  # Label Studio answers 404 to the task listing
    client.post("/setup", json={"project": "2", "schema": CONTRACT_CONFIG})
    client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 2}})
    assert service.jobs.wait_idle(20)
    state = client.get("/health").get_json()["training"]["jobs"]["2"]
    assert state["status"] == "failed" and state["reason"]
    assert client.get("/health").status_code == 200


def test_ok_verdict_images_join_a_full_reference_folder(tmp_path, world):
    """Issue 15 D9: with ADCLICK_NORMAL_DIR already holding ADCLICK_MAX_REFERENCES images, the OK-verdict images
    a fit collects still join the bank (the folder fills the room they leave), so its key and version change."""
    _, service, _engine, ls, server = world
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(6):
        (folder / f"n{i}.png").write_bytes(encode(np.full((96, 128, 3), 120 + i, np.uint8)))
    settings = replace(service.settings, normal_dir=str(folder), max_reference_images=4,
                       model_dir=tmp_path / "m2")
    app, service, _engine = make_app(settings, start_jobs=True)
    try:
        client = app.test_client()
        client.post("/setup", json={"project": "1", "schema": CONTRACT_CONFIG})
        before = service.serving.model_for("1")
        assert before.n_references == 4
        ls.add(1, "OK", seed=1)
        ls.add(2, "OK", seed=2)
        client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
        assert service.jobs.wait_idle(20)
        images = service.projects.reference_images("1", 4)
        assert sum(p.name.startswith("task-") for p in images) == 2 and len(images) == 4
        figures = service.jobs.snapshot("1")["figures"]
        assert figures["references_added_from_tasks"] == 2 and figures["references_from_tasks_in_bank"] == 2
        assert figures["reference_images"] == 4
        img, _ = defect_image()
        server.routes["/q.png"] = Route(encode(img))
        body = interactive_body(f"{server.url}/q.png", [keypoint(62.5, 41.7)], project="1")
        assert client.post("/predict", json=body).status_code == 200
        deadline = time.monotonic() + 10
        while service.serving.model_for("1").bank.key == before.bank.key and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.serving.model_for("1").bank.key != before.bank.key and service.serving.model_for("1").n_references == 4
    finally:
        service.jobs.stop()
