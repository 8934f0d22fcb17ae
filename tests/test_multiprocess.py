"""Several gunicorn workers and replicas on one MODEL_DIR (issue 6, requirement 4), with real servers:
server A (`gunicorn --workers 2 backend.wsgi:app`, the production entry) and server B (a second replica)
share a MODEL_DIR and talk to a local fake Label Studio. Training through A while B is asked to train the
same project runs one job at a time (the second request is folded into a follow-up run, never run beside
the first); B serves the version A's job published, and both pick up versions published elsewhere, all
without a restart."""

from __future__ import annotations

import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests
from PIL import Image

from tests.api_support import CONTRACT_CONFIG
from tests.conftest import texture

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "3"
TOKEN = "mp-test-token-0123456789"


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(texture(96, 128, seed=seed, shift=(seed % 3, seed % 2))).save(buf, format="PNG")
    return buf.getvalue()


class FakeLabelStudio:
    """Just what a fit reads: GET /api/tasks/ (paginated like LS 1.23) and the task images. Listing page 1
    takes `listing_delay_s`, which holds a fit open long enough to send a concurrent request; each listing's
    (start, end) is recorded to check fits never overlap."""

    def __init__(self, n_tasks: int = 4, listing_delay_s: float = 3.0):
        self.images = {f"/data/upload/{PROJECT}/ok-{i}.png": _png(i) for i in range(n_tasks)}
        ok = {"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": ["OK"]}}
        self.tasks = [
            {
                "id": 100 + i,
                "project": int(PROJECT),
                "data": {"image": path},
                "annotations": [
                    {
                        "id": 500 + i,
                        "result": [ok],
                        "was_cancelled": False,
                        "created_at": "2026-11-28T10:00:00Z",
                    }
                ],
            }
            for i, path in enumerate(self.images)
        ]
        self.listing_delay_s = listing_delay_s
        self.listings: list[list[float]] = []
        self.bad_auth = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlparse(self.path)
                if self.headers.get("Authorization") not in (f"Token {TOKEN}", f"Bearer {TOKEN}"):
                    outer.bad_auth += 1
                    return self._send(401, b'{"detail": "no auth"}', "application/json")
                if url.path == "/api/tasks/":
                    return self._send(200, outer.listing(parse_qs(url.query)), "application/json")
                if url.path in outer.images:
                    return self._send(200, outer.images[url.path], "image/png")
                return self._send(404, b"{}", "application/json")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def listing(self, query: dict) -> bytes:
        page = int(query.get("page", ["1"])[0])
        tasks = []
        if page == 1:
            span = [time.time(), 0.0]
            self.listings.append(span)
            time.sleep(self.listing_delay_s)
            tasks = self.tasks
            span[1] = time.time()
        return json.dumps(
            {
                "tasks": tasks,
                "total": len(self.tasks),
                "total_annotations": len(self.tasks),
                "total_predictions": 0,
            }
        ).encode()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self, name: str, model_dir: Path, ls_url: str, workers: int, log_dir: Path, redis_url: str = ""
    ):
        self.name, self.port = name, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "MODEL_DIR": str(model_dir),
            "LABEL_STUDIO_URL": ls_url,
            "LABEL_STUDIO_API_KEY": TOKEN,
            "DEVICE": "cpu",
            "ADCLICK_PREDICTOR": "residual",
            "WARM_ON_SETUP": "0",
            "OMP_NUM_THREADS": "1",
            "LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
        }
        env.pop("REDIS_URL", None)
        if redis_url:
            env["REDIS_URL"] = redis_url
        self.log = log_dir / f"server-{name}.log"
        # the flags of `make serve` / the Dockerfile CMD
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(workers),
                "--threads",
                "4",
                "--timeout",
                "300",
                "--graceful-timeout",  # only to stop quickly at the end of the test
                "3",
                "--preload",
                "backend.wsgi:app",
            ],
            cwd=ROOT,
            env=env,
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
        )

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server {self.name} not healthy after {timeout} s")

    def get(self, path: str, **kw) -> dict:
        r = requests.get(self.url + path, timeout=60, **kw)
        assert r.ok, (r.status_code, r.text)
        return r.json()

    def post(self, path: str, body: dict) -> dict:
        r = requests.post(self.url + path, json=body, timeout=60)
        assert r.ok, (r.status_code, r.text)
        return r.json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def cluster(tmp_path):
    ls = FakeLabelStudio()
    model_dir = tmp_path / "models"
    servers = [
        Server("A", model_dir, ls.url, workers=2, log_dir=tmp_path),
        Server("B", model_dir, ls.url, workers=1, log_dir=tmp_path),
    ]
    try:
        for s in servers:
            s.wait_healthy()
        yield ls, model_dir, servers
    finally:
        for s in servers:
            s.stop()
        ls.close()


def wait_training_finished(server: Server, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        training = server.get("/health")["training"]
        if not training["active"] and not training["queued"]:
            return training["jobs"]
        time.sleep(0.3)
    raise AssertionError(f"training still running after {timeout} s: {training}")


def served_version(server: Server, expected: str) -> dict:
    """/versions of the project once it serves `expected`: a version another process published is seen within
    model.atomic.RECORD_REFRESH_S (the last answer after twice that, for the assertion to show)."""
    from model.atomic import RECORD_REFRESH_S

    deadline = time.monotonic() + 2 * RECORD_REFRESH_S + 1.0
    while True:
        body = server.get("/versions", params={"project": PROJECT})
        if body["model_version"] == expected or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_two_servers_share_one_model_dir(cluster):
    ls, model_dir, (a, b) = cluster
    pids = [a.proc.pid, b.proc.pid]
    first = a.post("/setup", {"project": f"{PROJECT}.1764300000", "schema": CONTRACT_CONFIG})["model_version"]
    assert b.get("/versions", params={"project": PROJECT})["model_version"] == first

    # train through A; while its fit runs, ask B to train the same project
    assert a.post("/webhook", {"action": "START_TRAINING", "project": {"id": int(PROJECT)}})["status"] in (
        "queued",
        "running",
    )
    _wait(lambda: len(ls.listings) == 1, 60, "the first fit to read the project's tasks")
    second = b.post("/webhook", {"action": "START_TRAINING", "project": {"id": int(PROJECT)}})
    assert second["job"]["status"] == "running", "B must see A's running job, not start its own"
    assert b.get("/health")["training"]["active"] == [PROJECT]
    jobs = wait_training_finished(b)

    # one job at a time: B's request became one follow-up run, after the first, never beside it
    assert len(ls.listings) == 2, ls.listings
    assert ls.listings[1][0] >= ls.listings[0][1], f"two fits of one project overlapped: {ls.listings}"
    assert jobs[PROJECT]["runs"] == 2 and jobs[PROJECT]["last_status"] == "done", jobs[PROJECT]
    assert ls.bad_auth == 0

    # B (which did not necessarily run the fit) serves the version the fit published; so does A
    trained = jobs[PROJECT]["model_version"]
    assert trained and trained != first
    for server in (a, b):
        body = served_version(server, trained)
        assert body["model_version"] == trained and trained in body["versions"]

    # a checkpoint published by another process (an RQ worker, another replica) is served by both within
    # RECORD_REFRESH_S (its published.json record), each version appearing whole (temp dir + rename)
    from backend.projects import ProjectStore

    store = ProjectStore(model_dir).version_store(PROJECT)
    for expected in ("adclick-seg-v1", "adclick-seg-v2"):
        info = store.commit({"arch": "adclick-seg", "config": {}, "state_dict": {}}, {"labels": ["Scratch"]})
        assert info.name == expected
        for server in (a, b):
            body = served_version(server, expected)
            assert body["model_version"] == expected, (server.name, body)
        assert a.post("/setup", {"project": PROJECT, "schema": CONTRACT_CONFIG})["model_version"] == expected
    assert [a.proc.pid, b.proc.pid] == pids and all(s.proc.poll() is None for s in (a, b)), "no restart"
