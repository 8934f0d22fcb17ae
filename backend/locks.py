"""Cross-process locks on MODEL_DIR: one training job per project across threads, gunicorn workers, RQ workers
and replicas that share the directory. The one registry of per-project locks.

`ProjectLock` is a `model.atomic.FileLock`, an exclusive `flock` on `<dir>/locks/<project>.<name>.lock`
(the path is spelled by backend/projects.py) plus the process's thread lock for that path (flock alone does not
exclude two threads of one process). The kernel drops the lock when its holder dies, so a crashed worker never
leaves a stale lock. On NFS, Linux emulates flock with POSIX byte-range locks, so replicas on different hosts
exclude each other too (the volume must support locking).

Uses. "train": every fit runs inside it (`TrainingService.run_training`, in a gunicorn worker or an RQ worker), so
even a job queued twice (a worker presumed dead, a replayed Redis job) trains after the other, never beside it.
"job": backend/jobs.py holds it while a process owns a project's job, so a job whose owner died (any host, any
container) is recognised by its free lock and queued again. `local_lock(model_dir, project, name)` is the
in-process half alone (the same thread lock a ProjectLock of that name takes): for work each process does for
itself, such as loading a project's trained detector once (`DetectorCache._project_lock`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from backend.projects import lock_path, project_key
from model.atomic import FileLock, thread_lock

__all__ = ["ProjectLock", "local_lock", "project_key"]


def local_lock(model_dir: str | Path, project: str | int, name: str) -> threading.Lock:
    """The process's thread lock of project lock `name` (shared with every ProjectLock of that name)."""
    return thread_lock(lock_path(model_dir, project, name).resolve())


class ProjectLock(FileLock):
    """Exclusive, non-reentrant lock `name` on one project, shared by every process using `model_dir`."""

    def __init__(self, model_dir: str | Path, project: str | int, name: str = "train"):
        super().__init__(lock_path(model_dir, project, name))

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock now (pid, host, since), or None when it is free. Diagnostic only."""
        if self._fd is None and not self.locked_elsewhere():
            return None
        try:
            text = self.path.read_text()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}

    def _acquired(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        data = json.dumps(info).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def __enter__(self) -> ProjectLock:
        self.acquire()
        return self
