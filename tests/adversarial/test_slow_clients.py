"""Slow clients (slowloris: connections that send one header line every few seconds and never finish) must
not stop /health, which Label Studio gives 1 s (issue 15, D11). gunicorn's gthread worker reads a request's
headers in a pool thread, so each such connection holds one thread while it trickles; the shipped defaults
(`make serve`, docker/) give every worker enough threads that 16 of them leave /health fast, and
docker/nginx.conf (a buffering proxy that hands gunicorn only complete requests) removes the limit:
with nginx in front, 64 slow connections change nothing. Debian's nginx-light is installed for the test
when missing (tests/debian.py)."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.adversarial.harness import ROOT, Gunicorn, free_port, request
from tests.debian import ensure_package

HEALTH_LIMIT_S = 1.0
ATTACK_S = 8.0


def makefile_default(name: str) -> int:
    match = re.search(rf"^{name} \?= (\d+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile has no default for {name}"
    return int(match.group(1))


class Slowloris:
    """`n` connections to `port`, each sending a request line and then one header line every `every_s`."""

    def __init__(self, port: int, n: int, every_s: float = 1.0):
        self.port, self.n, self.every_s = port, n, every_s
        self.socks: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)

    def __enter__(self) -> Slowloris:
        for i in range(self.n):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow-{i}: 0\r\n".encode())
            self.socks.append(s)
        self.thread.start()
        time.sleep(0.5)
        return self

    def _trickle(self) -> None:
        k = 0
        while not self.stop.wait(self.every_s):
            k += 1
            for s in self.socks:
                try:
                    s.sendall(f"X-More-{k}: {k}\r\n".encode())
                except OSError:
                    pass

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.socks:
            s.close()


def assert_fast(latencies: list[float]) -> None:
    """Every /health answered, all under 1 s but at most one sample (the test shares two cores with other
    work; a blocked server answers none: every sample is inf)."""
    slow = [x for x in latencies if x >= HEALTH_LIMIT_S]
    assert len(latencies) >= 10 and len(slow) <= 1 and max(latencies) < 3.0, [round(x, 3) for x in latencies]


def health_latencies(port: int, seconds: float) -> list[float]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            ok = request(port, "GET", "/health", timeout=5, half_close=False).status == 200
        except (OSError, ValueError):
            ok = False
        out.append(time.monotonic() - t0 if ok else float("inf"))
        time.sleep(0.2)
    return out


@pytest.fixture()
def gunicorn_default(tmp_path):
    env = {"MODEL_DIR": str(tmp_path / "models"), "WARM_ON_SETUP": "0"}
    srv = Gunicorn(
        "tests.adversarial.tiny_wsgi:app",
        env,
        tmp_path / "gunicorn.log",
        workers=makefile_default("WORKERS"),
        threads=makefile_default("THREADS"),
    )
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_health_stays_fast_while_16_slow_clients_trickle_headers(gunicorn_default):
    with Slowloris(gunicorn_default.port, 16):
        latencies = health_latencies(gunicorn_default.port, ATTACK_S)
    assert_fast(latencies)


NGINX = Path("/usr/sbin/nginx")  # Debian's nginx-light


@pytest.mark.slow
def test_behind_the_buffering_proxy_64_slow_clients_change_nothing(tmp_path):
    nginx = ensure_package(NGINX, "nginx-light")
    env = {"MODEL_DIR": str(tmp_path / "models"), "WARM_ON_SETUP": "0"}
    srv = Gunicorn("tests.adversarial.tiny_wsgi:app", env, tmp_path / "gunicorn.log", workers=1, threads=4)
    port = free_port()
    conf = render_nginx_conf(tmp_path, port, srv.port)
    proxy = subprocess.Popen(
        [str(nginx), "-c", str(conf), "-p", str(tmp_path), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "nginx.err", "w"),
    )
    try:
        srv.wait_healthy()
        deadline = time.monotonic() + 20
        while True:
            try:
                if request(port, "GET", "/health", timeout=2, half_close=False).status == 200:
                    break
            except (OSError, ValueError):
                pass
            assert time.monotonic() < deadline and proxy.poll() is None, (tmp_path / "nginx.err").read_text()
            time.sleep(0.2)
        with Slowloris(port, 64):
            latencies = health_latencies(port, ATTACK_S)
        assert_fast(latencies)
    finally:
        proxy.terminate()
        proxy.wait(10)
        srv.stop()


def render_nginx_conf(tmp: Path, listen: int, upstream: int) -> Path:
    """docker/nginx.conf with the container's names swapped for this test's loopback ports and folders."""
    text = (ROOT / "docker" / "nginx.conf").read_text()
    text = text.replace("listen 9090;", f"listen 127.0.0.1:{listen};")
    text = text.replace("server backend:9090;", f"server 127.0.0.1:{upstream};")
    text = re.sub(r"^user .*$", "", text, flags=re.MULTILINE)
    text = re.sub(r"^pid .*$", f"pid {tmp}/nginx.pid;", text, flags=re.MULTILINE)
    text = text.replace("/var/cache/nginx/", f"{tmp}/")
    text = text.replace("access_log /dev/stdout", f"access_log {tmp}/access.log")
    text = text.replace("error_log /dev/stderr", f"error_log {tmp}/error.log")
    conf = tmp / "nginx.conf"
    conf.write_text(text)
    return conf


def test_the_proxy_config_buffers_requests_and_times_out_slow_headers():
    """The settings that make nginx a buffer against slow clients are there (runs without nginx)."""
    text = (ROOT / "docker" / "nginx.conf").read_text()
    for directive in (
        "proxy_request_buffering on",
        "client_header_timeout",
        "client_body_timeout",
        "client_max_body_size",
        "proxy_pass http://backend",
        "proxy_read_timeout",
    ):
        assert directive in text, directive
    compose = (ROOT / "docker" / "docker-compose.yml").read_text()
    assert "nginx.conf" in compose and "proxy:" in compose
