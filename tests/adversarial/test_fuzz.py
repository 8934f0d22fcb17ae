"""3000+ malformed requests from a fixed seed against the real application under gunicorn (the flags of
`make serve`), over every route: no 500, every application error is JSON naming the problem, no server path in
any answer, the same worker alive at the end (no crash, no restart), flat memory, and no server-fault line in
the log (issue 15, requirement 3)."""

from __future__ import annotations

import io
import json
import os
import random
import re
import time
from collections import Counter

import pytest
from PIL import Image

from tests.adversarial.fuzz_cases import CaseGenerator
from tests.adversarial.harness import ROOT, Gunicorn, request, rss_bytes
from tests.api_support import RecordingServer, Route, defect_image, encode

SEED = 15
N_CASES = int(os.environ.get("FUZZ_CASES", "3200"))  # more for a longer soak (measured in docs/SECURITY.md)
WARMUP = 400  # cases run before the first memory reading (caches, lazy imports, first bank)
RSS_GROWTH_LIMIT = 48 * 1024 * 1024
FORBIDDEN = ("Traceback", "site-packages", 'File "', "/usr/lib/python", "/proc/")


def _bomb_png() -> bytes:
    """A small PNG that declares 30000 x 30000 pixels."""
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images():
    with RecordingServer() as srv:
        img, _ = defect_image()
        srv.routes["/ok.png"] = Route(encode(img))
        srv.routes["/text"] = Route(b"I am not an image")
        srv.routes["/missing.png"] = Route(b"no", status=404)
        srv.routes["/bomb.png"] = Route(_bomb_png())
        srv.routes["/empty"] = Route(b"")
        yield srv


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    env = {
        "MODEL_DIR": str(tmp / "models"),
        "WARM_ON_SETUP": "0",
        "IMAGE_TIMEOUT_S": "2",
        "LOG_LEVEL": "INFO",
        "MAX_IMAGE_MPIX": "5",
        "BANK_WAIT_S": "10",
        "TRAIN_DEBOUNCE_S": "3600",
        "MAX_BODY_MB": "8",
    }
    srv = Gunicorn("tests.adversarial.tiny_wsgi:app", env, tmp / "gunicorn.log", workers=1, threads=8)
    try:
        srv.wait_healthy()
        yield srv, tmp
    finally:
        srv.stop()


def _check(case, resp, secrets: tuple[str, ...]) -> list[str]:
    problems = []
    if resp.status >= 500 and resp.status not in (502, 503):
        problems.append(f"status {resp.status}")
    text = resp.body.decode("utf-8", "replace")
    for word in FORBIDDEN + secrets:
        if word in text:
            problems.append(f"answer holds {word!r}")
    if resp.status >= 400 and case.method != "HEAD":  # gunicorn's own refusals too (backend.gunicorn_conf)
        if not resp.headers.get("content-type", "").startswith("application/json"):
            problems.append(f"{resp.status} answer is {resp.headers.get('content-type')!r}, not JSON")
        else:
            body = json.loads(resp.body)
            if not (isinstance(body, dict) and isinstance(body.get("error"), str) and len(body["error"]) > 8):
                problems.append(f"{resp.status} answer names no problem: {text[:200]}")
    return problems


@pytest.mark.slow
def test_thousands_of_malformed_requests(server, images):
    srv, tmp = server
    cases = CaseGenerator(SEED, images.url).cases(N_CASES, srv.port)
    secrets = (str(tmp), str(ROOT))
    (worker,) = srv.workers()
    failures, statuses, t0 = [], Counter(), time.monotonic()
    rss_start = None
    for i, case in enumerate(cases):
        if i == WARMUP:
            rss_start = rss_bytes(worker)
        if i and i % 1600 == 0:
            print(f"after {i} cases: worker RSS {rss_bytes(worker) / 2**20:.0f} MB")
        try:
            resp = request(srv.port, case.method, case.path, case.body, case.headers, case.raw, timeout=60)
        except (OSError, ValueError) as exc:
            failures.append((i, case.name, f"no answer: {exc!r}"))
            continue
        statuses[resp.status] += 1
        problems = _check(case, resp, secrets)
        if problems:
            failures.append((i, case.name, problems, resp.status, resp.body[:300]))
    elapsed = time.monotonic() - t0
    rss_end = rss_bytes(worker)
    print(
        f"{len(cases)} cases in {elapsed:.1f} s; statuses {dict(sorted(statuses.items()))}; "
        f"worker RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MB"
    )
    kinds = Counter((f[1], str(f[2])) for f in failures)
    firsts = {}
    for f in failures:
        firsts.setdefault((f[1], str(f[2])), f)
    assert not failures, f"{len(failures)} bad answers: {dict(kinds)}; one of each: {list(firsts.values())}"
    assert srv.workers() == [worker], "the worker died or was restarted"
    assert request(srv.port, "GET", "/health").status == 200
    assert rss_end - rss_start < RSS_GROWTH_LIMIT, (rss_start, rss_end)
    log = srv.log.read_text()
    faults = [line for line in log.splitlines() if " ERROR backend.app" in line or "unhandled error" in line]
    assert not faults, faults[:5]
    assert "[CRITICAL] WORKER TIMEOUT" not in log and "Worker exiting" not in log


def _post_raw(srv, route: str, head: str, body: bytes):
    raw = (
        f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"{head}\r\n"
    ).encode() + body
    return request(srv.port, "POST", route, raw=raw)


def test_the_named_cases_of_issue_15_under_gunicorn(server):
    srv, _ = server
    resp = _post_raw(srv, "/predict", "Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n")
    assert resp.status == 400 and "request body could not be read" in resp.json()["error"]
    for route in ("/predict", "/setup", "/webhook"):
        deep = b"[" * 990 + b"]" * 990
        resp = _post_raw(srv, route, f"Content-Length: {len(deep)}\r\n", deep)
        assert resp.status == 400 and "nested too deeply" in resp.json()["error"], resp.body
    body = json.dumps({"project": 1, "schema": ["<View/>"]}).encode()
    resp = _post_raw(srv, "/setup", f"Content-Length: {len(body)}\r\n", body)
    assert resp.status == 400 and "label_config must be a string" in resp.json()["error"]
    body = b'{"action": "START_TRAINING", "project": 1e999}'
    resp = _post_raw(srv, "/webhook", f"Content-Length: {len(body)}\r\n", body)
    assert resp.status == 400 and "project" in resp.json()["error"]
    chunk = b"[" + b" " * (1 << 20)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(9)) + b"0\r\n\r\n"
    resp = _post_raw(srv, "/predict", "Transfer-Encoding: chunked\r\n", chunked)  # 9 MB, no Content-Length
    assert resp.status == 413 and "MAX_BODY_MB" in resp.json()["error"]
    jobs = request(srv.port, "GET", "/health").json()["training"]["jobs"]
    assert all(key.isdigit() and not key.startswith("0") for key in jobs), list(jobs)


BAD_AUTH = [
    "",
    "Basic",
    "Basic !!!",
    "Basic dTpw",
    "Basic dTp4",
    "Bearer u:p",
    "Basic " + "A" * 6000,
    "Basic dTpwOg==",
    "Basic OnA=",
    "Digest username=u",
    "Basic \u00fc",
    "basic  dTp4 ",
    "Token p",
]


@pytest.mark.slow
def test_basic_auth_holds_for_every_malformed_request(tmp_path, images):
    """With BASIC_AUTH_USER/PASS set, 800 of the fuzz's requests with no or wrong credentials (13 malformed
    Authorization headers) get 401 on every route but /health, whatever their body, method or framing."""
    env = {
        "MODEL_DIR": str(tmp_path / "models"),
        "WARM_ON_SETUP": "0",
        "BASIC_AUTH_USER": "u",
        "BASIC_AUTH_PASS": "secret-pass",
    }
    srv = Gunicorn("tests.adversarial.tiny_wsgi:app", env, tmp_path / "gunicorn.log", workers=1, threads=8)
    try:
        srv.wait_healthy()
        cases = CaseGenerator(SEED + 1, images.url).cases(800, srv.port)
        rng = random.Random(SEED)
        wrong = []
        for case in cases:
            auth = rng.choice(BAD_AUTH)
            headers = {**case.headers, **({"Authorization": auth} if auth else {})}
            resp = request(srv.port, case.method, case.path, case.body, headers, case.raw)
            opened = re.sub("/+", "/", case.path.split("?")[0]) == "/health"  # "//health" is /health
            if resp.status >= 500 or "secret-pass" in resp.body.decode("latin-1"):
                wrong.append((case.name, resp.status))
            elif case.kind == "app" and case.raw is None and not opened and resp.status != 401:
                wrong.append((case.name, case.method, case.path[:40], auth[:20], resp.status, resp.body[:80]))
        assert not wrong, wrong[:10]
        resp = request(srv.port, "GET", "/metrics", headers={"Authorization": "Basic dTpzZWNyZXQtcGFzcw=="})
        assert resp.status == 200
    finally:
        srv.stop()
