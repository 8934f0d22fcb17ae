"""Cross-process locks on MODEL_DIR: one training job per project across threads, gunicorn workers, RQ workers
and replicas that share the directory.

`ProjectLock` is an exclusive `flock` on `<dir>/locks/<project>.<name>.lock` plus a per-process thread
lock (flock alone does not exclude two threads of one process). The kernel drops the lock
when its holder dies, so a crashed worker never leaves a stale lock. On NFS, Linux emulates flock with POSIX
byte-range locks, so replicas on different hosts exclude each other too (the volume must support locking).

Two uses. "train": every fit runs inside it (`ModelService.run_training`, in a gunicorn worker or an RQ
worker), so even a job queued twice (a worker presumed dead, a replayed Redis job) trains after the other,
never beside it. "job": backend/jobs.py holds it while a process owns a project's job, so a job whose owner
died (any host, any container) is recognised by its free lock and queued again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def project_key(project: str | int) -> str:
    """Label Studio sends "12.1700000000" (id.timestamp) or 12; both mean project "12"."""
    key = str(project).split(".")[0]
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key):
        raise ValueError(f"invalid project id {project!r}")
    return key


def _thread_lock(path: Path) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(str(path), threading.Lock())


class ProjectLock:
    """Exclusive, non-reentrant lock `name` on one project, shared by every process using `model_dir`."""

    def __init__(self, model_dir: str | Path, project: str | int, name: str = "train"):
        self.path = (Path(model_dir) / "locks" / f"{project_key(project)}.{name}.lock").resolve()
        self._thread_lock = _thread_lock(self.path)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True, timeout: Optional[float] = None, poll_s: float = 0.05) -> bool:
        """Take the lock; False when `blocking` is False (or `timeout` s passed) and someone else holds it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._thread_lock.acquire(blocking, -1 if (timeout is None or not blocking) else timeout):
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not blocking or (deadline is not None and time.monotonic() >= deadline):
                        os.close(fd)
                        self._thread_lock.release()
                        return False
                    time.sleep(poll_s)
        except BaseException:
            self._thread_lock.release()
            raise
        self._fd = fd
        self._write_holder()
        return True

    def release(self) -> None:
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not held by this object")
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            self._thread_lock.release()

    def holder(self) -> Optional[dict[str, Any]]:
        """Who holds the lock now (pid, host, since), or None when it is free. Diagnostic only."""
        if self._fd is None and not self._is_locked_elsewhere():
            return None
        try:
            text = self.path.read_text()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}

    def _is_locked_elsewhere(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _write_holder(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def __enter__(self) -> "ProjectLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
