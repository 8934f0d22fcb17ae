"""Where the Label Studio token and cookies go (issue 15 D1, D2, D3, D8, N2, N4 and the URL 500s). A fake Label
Studio on 127.0.0.1 sets a `sessionid` cookie on every answer; recording "attacker" servers listen on another
loopback address (127.0.0.2) and on another port of Label Studio's own address. Hostile task image URLs go through
the real app (/predict); afterwards the attackers must have seen neither the token (legacy key, personal access
token or the access JWTs issued for it), nor an Authorization header, nor any cookie."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace

import jwt
import pytest

from backend.errors import BadRequest, ConfigError, ImageFetchError
from backend.images import ImageLoader
from backend.settings import Settings
from tests.api_support import (
    CONTRACT_CONFIG,
    RecordingServer,
    Route,
    defect_image,
    encode,
    make_app,
)

LEGACY = "legacy-SECRET-0123456789"
LS_COOKIE = "sessionid=LSCOOKIE-secret; Path=/"


def _jwt(kind: str, ttl: float) -> str:
    claims = {"token_type": kind, "exp": int(time.time() + ttl), "jti": str(time.time_ns())}
    return jwt.encode(claims, "test-secret-key-of-thirty-two-bytes!", algorithm="HS256")


PNG = encode(defect_image()[0])


class FakeLabelStudio(RecordingServer):
    """Serves /data/upload/1/a.png (only with the right credentials), issues access JWTs for the PAT, and sets a
    session cookie on every answer, as a logged-in Label Studio would."""

    def __init__(self, key: str):
        super().__init__("127.0.0.1")
        self.key = key
        self.issued: list[str] = []

        def refresh(handler, body):
            assert json.loads(body) == {"refresh": key}
            self.issued.append(_jwt("access", 300))
            return 200, {"Content-Type": "application/json", "Set-Cookie": LS_COOKIE}, json.dumps(
                {"access": self.issued[-1]}
            ).encode()

        def image(handler, body):
            good = {f"Token {key}"} | {f"Bearer {t}" for t in self.issued}
            if handler.headers.get("Authorization") not in good:
                return 401, {"Set-Cookie": LS_COOKIE}, b"{}"
            return 200, {"Set-Cookie": LS_COOKIE, "Content-Type": "image/png"}, PNG

        self.routes["/api/token/refresh/"] = Route(handler=refresh)
        self.routes["/data/upload/1/a.png"] = Route(handler=image)
        self.routes["/api/projects/0/"] = Route(b'{"secret": "project"}', headers={"Set-Cookie": LS_COOKIE})

    def secrets(self) -> list[str]:
        return [self.key, *self.issued, "LSCOOKIE-secret"]


def attacker(host: str) -> RecordingServer:
    srv = RecordingServer(host)
    for path in ("/x.jpg", "/data/upload/1/a.png", "/"):
        srv.routes[path] = Route(PNG, headers={"Set-Cookie": "evil=1; Path=/"})
    return srv


def make_client(tmp_path, ls_url: str, key: str, **kw):
    settings = replace(
        Settings(),
        label_studio_url=ls_url,
        label_studio_api_key=key,
        model_dir=tmp_path / "models",
        warm_on_setup=False,
        image_timeout_s=2.0,
        download_cache_bytes=0,
        **kw,
    )
    app, _, _ = make_app(settings)
    return app.test_client()


def predict(client, image: str, task_id: int = 1):
    body = {
        "tasks": [{"id": task_id, "data": {"image": image}}],
        "project": "1",
        "label_config": CONTRACT_CONFIG,
        "params": {"context": None},
    }
    return client.post("/predict", json=body)


def assert_clean(srv: RecordingServer, secrets: list[str]) -> None:
    seen = srv.seen()
    for secret in secrets:
        assert secret not in seen, f"{srv.url} was sent a secret"
    for _, path, headers, _ in srv.requests:
        lower = {k.lower(): v for k, v in headers.items()}
        assert "cookie" not in lower, (path, headers)
        # the only Authorization allowed is Basic from the URL's own user:pass@ (its author's choice)
        assert lower.get("authorization", "Basic ").startswith("Basic "), (path, headers)


@pytest.mark.parametrize("kind", ["legacy", "pat"])
def test_hostile_image_urls_never_carry_the_token_or_a_cookie_elsewhere(tmp_path, kind):
    key = LEGACY if kind == "legacy" else _jwt("refresh", 3600)
    with FakeLabelStudio(key) as ls, attacker("127.0.0.2") as far, attacker("127.0.0.1") as near:
        p, q, r = ls.port, far.port, near.port
        ls.routes["/tasks/7/presign/"] = Route(status=303, headers={"Location": f"{far.url}/x.jpg"})
        ls.routes["/tasks/8/presign/"] = Route(status=307, headers={"Location": f"{near.url}/x.jpg"})
        ls.routes["/tasks/9/presign/"] = Route(
            status=302, headers={"Location": f"http://127.0.0.2:{q}\\@127.0.0.1:{p}/x.jpg"}
        )
        far.routes["/bounce"] = Route(status=302, headers={"Location": f"{ls.url}/data/upload/1/a.png"})
        client = make_client(tmp_path, ls.url, key)

        # the token is used at all: Label Studio's own file, then its cookie is set in our direction
        assert predict(client, f"{ls.url}/data/upload/1/a.png").status_code == 200
        assert predict(client, "/data/upload/1/a.png").status_code == 200
        hostile = [
            f"http://127.0.0.2:{q}\\@127.0.0.1:{p}/x.jpg",  # the D1: urllib.parse reads 127.0.0.1
            f"http://127.0.0.1:{p}\\@127.0.0.2:{q}/x.jpg",
            f"http://127.0.0.2:{q}%5C@127.0.0.1:{p}/data/upload/1/a.png",
            f"http://127.0.0.1:{p}@127.0.0.2:{q}/data/upload/1/a.png",  # Label Studio as userinfo
            f"http://127.0.0.1:{p}:x@127.0.0.2:{q}/data/upload/1/a.png",
            f"http://127.0.0.2:{q}#@127.0.0.1:{p}/data/upload/1/a.png",
            f"http://127.0.0.2:{q}?@127.0.0.1:{p}/data/upload/1/a.png",
            f"http://127.0.0.2:{q}\t@127.0.0.1:{p}/x.jpg",
            f"http://127.0.0.2:{q}/data/upload/1/a.png",  # the same path on another host
            f"http://127.0.0.1:{r}/data/upload/1/a.png",  # and on another port of Label Studio's host
            f"HTTP://127.0.0.2:{q}/data/upload/1/a.png",
            f"http://127.0.0.2:{q}/bounce",  # an attacker redirecting to Label Studio: no token added on the way
        ]
        statuses = {url: predict(client, url).status_code for url in hostile}
        for task_id in (7, 8, 9):  # Label Studio's presign redirecting elsewhere
            statuses[f"presign {task_id}"] = predict(client, "s3://bucket/x.png", task_id=task_id).status_code
        assert 500 not in statuses.values(), statuses
        assert statuses[hostile[0]] == 400 and statuses[hostile[1]] == 400
        assert far.requests and near.requests  # the attackers were reached: the check is not vacuous
        for srv in (far, near):
            assert_clean(srv, ls.secrets())
        # Label Studio's own cookie never comes back either: the backend keeps no cookie jar
        assert all("cookie" not in {k.lower() for k in h} for _, _, h, _ in ls.requests)
        if kind == "pat":
            assert ls.issued and all(f"Bearer {key}" not in ls.seen() for _ in [0])


def test_refresh_answered_with_a_redirect_sends_the_token_nowhere(tmp_path):
    key = _jwt("refresh", 3600)
    with FakeLabelStudio(key) as ls, attacker("127.0.0.2") as far:
        ls.routes["/api/token/refresh/"] = Route(status=307, headers={"Location": f"{far.url}/api/token/refresh/"})
        client = make_client(tmp_path, ls.url, key)
        resp = predict(client, "/data/upload/1/a.png")
        assert resp.status_code == 502 and "redirect" in resp.get_json()["error"]
        assert far.requests == []
        assert [m for m, p, _, _ in ls.requests if p == "/api/token/refresh/"] == ["POST"]


def test_the_sdk_client_does_not_follow_a_refresh_redirect_either(tmp_path):
    """Training and the model card use label-studio-sdk with the same key; its httpx client would re-POST the
    personal access token on a 307 unless redirects are off."""
    key = _jwt("refresh", 3600)
    with FakeLabelStudio(key) as ls, attacker("127.0.0.2") as far:
        far.routes["/api/token/refresh/"] = Route(b'{"access": "x"}', headers={"Content-Type": "application/json"})
        ls.routes["/api/token/refresh/"] = Route(status=307, headers={"Location": f"{far.url}/api/token/refresh/"})
        ls.routes["/api/tasks/"] = Route(b'{"tasks": [], "total": 0}', headers={"Content-Type": "application/json"})
        settings = replace(Settings(), label_studio_url=ls.url, label_studio_api_key=key, model_dir=tmp_path / "m")
        _, service, _ = make_app(settings)
        try:
            list(service.training.default_client().tasks.list(project=1))
        except Exception:  # the SDK's own error for the unfollowed 307; what counts is where the key went
            pass
        assert [m for m, p, _, _ in ls.requests if p == "/api/token/refresh/"] == ["POST"]
        assert far.requests == [], far.seen()


def test_a_failed_refresh_is_not_retried_through_the_upload_fallback(tmp_path):
    """The /data/upload -> /storage-data fallback is for an HTTP 404 of the image only (status code, not text)."""
    key = _jwt("refresh", 3600)
    with FakeLabelStudio(key) as ls:
        ls.routes["/api/token/refresh/"] = Route(b"HTTP 404 not here", status=404)
        loader = ImageLoader(replace(Settings(), label_studio_url=ls.url, label_studio_api_key=key,
                                     model_dir=tmp_path / "m"))
        with pytest.raises(ImageFetchError, match="refused to refresh"):
            loader.load("/data/upload/1/a.png")
        assert [p for _, p, _, _ in ls.requests] == ["/api/token/refresh/"]


@pytest.mark.parametrize(
    "ref",
    [
        "/api/projects/0/",
        "/etc/passwd",
        "/data/upload/../../api/projects/0/",
        "/data/upload/%2e%2e/%2e%2e/api/projects/0/",
        "/data/upload/1/%2e%2e/%2e%2e/%2e%2e/api/projects/0/",
        "/data/upload/",
        "/tasks/abc/presign/?fileuri=eA==",
        "/storage-data/../api/projects/0/",
        "/api/token/refresh/",
    ],
)
def test_label_studio_paths_that_serve_no_files_are_refused(tmp_path, ref):
    with FakeLabelStudio(LEGACY) as ls:
        client = make_client(tmp_path, ls.url, LEGACY)
        resp = predict(client, ref)
        error = resp.get_json()["error"]
        assert resp.status_code == 400 and ("not a Label Studio file path" in error or "%2e%2e" in error), error
        assert ls.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "{ls}/api/projects/0/",
        "{ls}/admin/",
        "{ls}/data/upload/../../api/projects/0/",
        "{ls}/data/upload/%2e%2e/%2e%2e/api/projects/0/",
        "{ls}/data/upload/1/..%2f..%2f..%2fapi/projects/0/",
        "http://u:p@127.0.0.1:{port}/data/upload/1/a.png",
    ],
)
def test_absolute_urls_to_other_label_studio_pages_go_without_the_token(tmp_path, url):
    """Another page on Label Studio's origin (a proxy may serve images there too) is fetched like any host's:
    without the token, and never a 500."""
    with FakeLabelStudio(LEGACY) as ls:
        client = make_client(tmp_path, ls.url, LEGACY)
        resp = predict(client, url.format(ls=ls.url, port=ls.port))
        assert resp.status_code in (400, 415, 502), resp.get_json()
        assert_clean(ls, [LEGACY])


def test_label_studio_under_a_path_prefix_gets_its_file_paths_only(tmp_path):
    with FakeLabelStudio(LEGACY) as ls:
        ls.routes["/ls/data/upload/1/a.png"] = ls.routes["/data/upload/1/a.png"]
        client = make_client(tmp_path, ls.url + "/ls", LEGACY)
        assert predict(client, "/data/upload/1/a.png").status_code == 200
        assert predict(client, f"{ls.url}/data/upload/1/a.png").status_code == 502  # outside: no token, 401
        assert ls.auth_headers("/") == [f"Token {LEGACY}", None]


def test_url_credentials_never_appear_in_answers_or_logs(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with attacker("127.0.0.2") as far:
        client = make_client(tmp_path, "", "")
        urls = [
            f"http://alice:PASS-w0rd@127.0.0.2:{far.port}/missing.png",  # 404 -> 502
            "http://alice:PASS-w0rd@127.0.0.1:9/x.png",  # unreachable -> 502
            "ftp://alice:PASS-w0rd@example.com/x.png",  # unsupported -> 400
            "http://alice:PASS-w0rd@[::1/x.png",  # malformed -> 400
            "http://alice:PASS-w0rd@h:99999/x.png",
            "http://alice:PASS-w0rd@h\\x/x.png",
            "http://alice:PASS-w0rd\\@h/x.png",
        ]
        bodies = []
        for url in urls:
            resp = predict(client, url)
            assert resp.status_code in (400, 502), (url, resp.status_code)
            bodies.append(resp.get_data(as_text=True))
        assert far.requests  # the first one was really fetched (and refused by the server)
    assert "PASS-w0rd" not in "".join(bodies)
    assert "PASS-w0rd" not in caplog.text
    assert "alice" not in "".join(bodies)


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://[::1", "not a valid URL"),
        ("http://[::1]:99999/x.png", "not a valid URL"),
        ("http://127.0.0.1:99999/x.png", "not a valid URL"),
        ("http://127.0.0.1:abc/x.png", "not a valid URL"),
        ("http://host:9511:80/x.png", "not a valid URL"),
        ("http:///x.png", "not a valid URL"),
        ("http://h/x\x00.png", "control character"),
    ],
)
def test_malformed_image_urls_are_a_400_naming_the_url(tmp_path, url, words):
    client = make_client(tmp_path, "", "")
    resp = predict(client, url)
    assert resp.status_code == 400 and words in resp.get_json()["error"], resp.get_json()


def test_local_files_symlinks_out_of_the_root_and_null_bytes_are_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "imgs").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(PNG)
    (root / "imgs" / "ok.png").write_bytes(PNG)
    os.symlink(outside / "secret.png", root / "imgs" / "link.png")
    os.symlink(outside, root / "dirlink")
    os.symlink(root / "imgs" / "ok.png", root / "inner.png")  # a link that stays inside the root is fine
    client = make_client(tmp_path, "", "", local_files_root=str(root))
    assert predict(client, "/data/local-files/?d=imgs/ok.png").status_code == 200
    assert predict(client, "/data/local-files/?d=inner.png").status_code == 200
    for ref in ("/data/local-files/?d=imgs/link.png", "/data/local-files/?d=dirlink/secret.png"):
        resp = predict(client, ref)
        assert resp.status_code == 400 and "outside LOCAL_FILES_DOCUMENT_ROOT" in resp.get_json()["error"]
        assert str(tmp_path) not in resp.get_data(as_text=True)
    resp = predict(client, "/data/local-files/?d=x%00y.jpg")
    assert resp.status_code == 400 and "null byte" in resp.get_json()["error"]



@pytest.mark.timeout(30)
def test_local_files_that_are_not_regular_files_are_refused_without_blocking(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pipe.png")  # opening a FIFO for reading blocks until a writer comes
    (root / "dir.png").mkdir()
    client = make_client(tmp_path, "", "", local_files_root=str(root))
    t0 = time.monotonic()
    resp = predict(client, "/data/local-files/?d=pipe.png")
    assert resp.status_code == 400 and "not a regular file" in resp.get_json()["error"]
    assert time.monotonic() - t0 < 5
    resp = predict(client, "/data/local-files/?d=dir.png")
    assert resp.status_code == 400 and "not a regular file" in resp.get_json()["error"]


def test_only_one_of_the_basic_auth_settings_refuses_to_start():
    for env in ({"BASIC_AUTH_USER": "ann"}, {"BASIC_AUTH_PASS": "s3cret"}, {"BASIC_AUTH_USER": "ann",
                                                                            "BASIC_AUTH_PASS": ""}):
        with pytest.raises(ConfigError, match="only one of BASIC_AUTH_USER / BASIC_AUTH_PASS"):
            Settings.from_env(env)
    assert Settings.from_env({"BASIC_AUTH_USER": "ann", "BASIC_AUTH_PASS": "s3cret"}).auth_enabled
    assert not Settings.from_env({}).auth_enabled


def test_gunicorn_refuses_to_start_with_only_one_basic_auth_setting(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "MODEL_DIR": str(tmp_path / "m"), "BASIC_AUTH_USER": "ann"}
    env.pop("BASIC_AUTH_PASS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:0", "--workers", "1", "--preload",
         "tests.adversarial.tiny_wsgi:app"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "only one of BASIC_AUTH_USER / BASIC_AUTH_PASS is set (BASIC_AUTH_PASS is empty)" in proc.stderr


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://u:SECRET@ls:8080", "must not carry user:pass@"),
        ("http://ls:99999", "not a valid URL"),
        ("http://ls\\@other:8080", "backslash"),
        ("ftp://ls", "must start with http"),
    ],
)
def test_a_label_studio_url_the_token_cannot_safely_follow_refuses_to_start(url, words):
    with pytest.raises(ConfigError, match=words) as info:
        Settings.from_env({"LABEL_STUDIO_URL": url})
    assert "SECRET" not in str(info.value)


def test_check_url_reads_the_host_requests_connects_to():
    from backend.outbound import check_url, redact

    with pytest.raises(BadRequest, match="backslash"):
        check_url("http://127.0.0.2:9512\\@127.0.0.1:9511/x.jpg")
    t = check_url("http://127.0.0.1:9511@127.0.0.2:9512/x.jpg")
    assert (t.host, t.port, t.has_userinfo) == ("127.0.0.2", 9512, True)
    t = check_url("http://127.0.0.2:9512#@127.0.0.1:9511/x.jpg")
    assert (t.host, t.port) == ("127.0.0.2", 9512)
    assert redact("http://u:p@h:1/x?y=1@2") == "http://***@h:1/x?y=1@2"
    assert redact("http://u:PASS\\@h:1/x") == "http://***@h:1/x"
