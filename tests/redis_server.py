"""A real redis-server on 127.0.0.1 for tests (not a fake): found on PATH, else installed with apt-get
(Debian package redis-server) when the test process may, else the tests that need it skip with the reason."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _install() -> str | None:
    """apt-get install redis-server; returns why it could not, or None."""
    if shutil.which("apt-get") is None:
        return "redis-server is not installed and apt-get is not available"
    if os.geteuid() != 0:
        return "redis-server is not installed and installing it needs root (apt-get install redis-server)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-300:]}"
    return None


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        reason = _install()
        found = shutil.which("redis-server")
        if found is None:
            pytest.skip(reason or "redis-server could not be installed")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> Iterator[str]:
    """Run redis-server (no persistence) until the generator is closed; yields its URL."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        from redis import Redis
        from redis.exceptions import ConnectionError as RedisDown
        from redis.exceptions import TimeoutError as RedisSlow

        deadline = time.monotonic() + 15
        while True:
            try:
                Redis.from_url(url, socket_timeout=1).ping()
                break
            except (RedisDown, RedisSlow):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
