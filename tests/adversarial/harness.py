"""A gunicorn server started like `make serve` (same flags; the app module is chosen by the test) and a raw
HTTP/1.1 client that can send what well-behaved clients cannot: broken chunked bodies, odd methods, lying
Content-Length, bytes that are not UTF-8."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


class Gunicorn:
    """`gunicorn --workers W --threads T --timeout 300 --preload <app>` on a free loopback port."""

    def __init__(
        self, app: str, env: dict, log: Path, workers: int = 1, threads: int = 8, extra_args: tuple = ()
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
        full_env.pop("REDIS_URL", None)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "python:backend.gunicorn_conf",  # as make serve: JSON for gunicorn's own refusals, boot-time load
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(workers),
                "--threads",
                str(threads),
                "--timeout",
                "300",
                "--graceful-timeout",
                "3",
                *extra_args,
                "--preload",
                app,
            ],
            cwd=ROOT,
            env=full_env,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
        )

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.log.read_text()[-3000:]}")
            try:
                if request(self.port, "GET", "/health", timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn not healthy after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def workers(self) -> list[int]:
        return children(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    raw: bytes | None = None,
    timeout: float = 30.0,
    half_close: bool = True,
) -> Response:
    """One request on its own connection (Connection: close). `raw`: the exact bytes sent instead. With
    `half_close` the client shuts its sending side after the request, so a body shorter than announced ends
    at once instead of waiting for the server (nginx takes that as the client going away: off for it)."""
    if raw is None:
        head = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
        if body is not None and "Transfer-Encoding" not in head:
            head.setdefault("Content-Length", str(len(body)))
        lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        if half_close:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    return parse_response(b"".join(chunks))


def parse_response(data: bytes) -> Response:
    while data.startswith(b"HTTP/1.1 100 "):  # interim answers to "Expect: 100-continue"
        data = data.partition(b"\r\n\r\n")[2]
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise ValueError(f"no HTTP response: {data[:200]!r}")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    return Response(status, headers, body)


def dechunk(data: bytes) -> bytes:
    out, rest = [], data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(out)
