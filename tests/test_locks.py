"""backend/locks.py: one training job per project across threads and processes sharing MODEL_DIR."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from backend.jobs import JobManager
from backend.locks import ProjectLock, local_lock
from backend.projects import project_key
from model.atomic import FileLock, thread_lock

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys, time
    from backend.locks import ProjectLock
    lock = ProjectLock(sys.argv[1], sys.argv[2], *sys.argv[4:])
    assert lock.acquire(blocking=False)
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
""")


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True, **kw
    )


def test_project_key_normalises_and_rejects():
    assert project_key("12.1700000000") == project_key(12) == "12"
    for bad in ("../etc", "", "a b"):
        with pytest.raises(ValueError):
            project_key(bad)


def test_lock_excludes_other_process_and_dies_with_it(tmp_path):
    holder = _python(HOLDER, str(tmp_path), "3", "30")
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = ProjectLock(tmp_path, 3)
        assert not lock.acquire(blocking=False)
        assert not lock.acquire(timeout=0.3)
        assert lock.holder()["pid"] == holder.pid
        assert ProjectLock(tmp_path, 4).acquire(blocking=False), "other projects are independent"
        holder.send_signal(signal.SIGKILL)  # a crashed worker must not leave a stale lock
        holder.wait(timeout=10)
        assert lock.acquire(timeout=5)
        assert lock.holder()["pid"] == os.getpid()
        lock.release()
        assert lock.holder() is None
    finally:
        holder.kill()
        holder.wait()


def test_lock_excludes_threads_of_one_process(tmp_path):
    inside, overlaps = [], []

    def work():
        for _ in range(20):
            with ProjectLock(tmp_path, "p"):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                time.sleep(0.001)
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not overlaps


def test_one_registry_of_per_project_locks(tmp_path):
    """ProjectLock, DetectorCache._project_lock and the version store's writers' lock all take their thread lock
    from model.atomic's one registry: the same project and name is the same lock, whoever asks."""
    from dataclasses import replace

    from backend.services import build_services
    from backend.settings import Settings

    lock = ProjectLock(tmp_path, "12.1700000000", "detector")
    assert local_lock(tmp_path, 12, "detector") is local_lock(tmp_path / ".", "12", "detector")
    assert local_lock(tmp_path, 12, "detector") is not local_lock(tmp_path, 12, "train")
    service = build_services(replace(Settings(), model_dir=tmp_path)).detection
    other = build_services(replace(Settings(), model_dir=tmp_path)).detection
    assert service._project_lock("12") is other._project_lock("12") is local_lock(tmp_path, "12", "detector")
    with lock:  # a ProjectLock held in this process holds the service's lock of that project and name
        assert not service._project_lock("12").acquire(blocking=False)
    assert service._project_lock("12").acquire(blocking=False)
    service._project_lock("12").release()

    from model.seg.versions import VersionStore

    store = VersionStore(tmp_path / "v")
    writers = store._locked()
    assert isinstance(writers, FileLock) and writers._thread_lock is thread_lock((tmp_path / "v" / ".lock").resolve())
    published = threading.Event()
    with FileLock(tmp_path / "v" / ".lock"):  # e.g. another writer: a commit waits for it
        worker = threading.Thread(
            target=lambda: (store.commit({"arch": "x", "config": {}, "state_dict": {}}, {}), published.set())
        )
        worker.start()
        assert not published.wait(0.5)
    assert published.wait(30)
    worker.join()


def test_lock_names_cannot_leave_the_locks_folder(tmp_path):
    for project, name in (("../x", "train"), ("3", "../train"), ("3", "a/b"), ("", "train")):
        with pytest.raises(ValueError):
            ProjectLock(tmp_path, project, name)
    assert ProjectLock(tmp_path, "default").path == (tmp_path / "locks" / "default.train.lock").resolve()


def test_lock_misuse_is_an_error(tmp_path):
    lock = ProjectLock(tmp_path, 1)
    with pytest.raises(RuntimeError):
        lock.release()
    lock.acquire()
    with pytest.raises(RuntimeError):
        lock.acquire()
    lock.release()


def test_a_running_job_is_requeued_only_once_its_owner_lock_is_free(tmp_path):
    """backend/jobs.py judges a "running" job by its owner's "job" lock, not by pid/hostname: a job owned by
    another host or container stays untouched while its owner lives, and runs again as soon as it dies."""
    state = tmp_path / "jobs" / "state.json"
    state.parent.mkdir(parents=True)
    owner = {"pid": 1, "host": "another-replica"}
    state.write_text(json.dumps({"projects": {"9": {"project": "9", "status": "running", "owner": owner}}}))
    holder = _python(HOLDER, str(state.parent), "9", "60", "job")  # the other replica, alive
    calls = []
    manager = JobManager(
        state, lambda p, e, progress: calls.append((p, e["action"])) or {"model_version": "v"}, poll_s=0.05
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        manager.ensure_started()
        time.sleep(1.0)
        assert calls == [] and manager.snapshot("9")["status"] == "running"
        holder.kill()  # the replica dies mid-job: the kernel frees its lock
        holder.wait(timeout=10)
        assert manager.wait_idle(10)
        assert calls == [("9", "START_TRAINING")]
        assert manager.snapshot("9")["last_status"] == "done"
        released = time.monotonic() + 5  # released right after the final state write
        while ProjectLock(state.parent, "9", "job").holder() is not None:
            assert time.monotonic() < released, "the job lock must be released after the run"
            time.sleep(0.02)
    finally:
        manager.stop()
        holder.kill()
        holder.wait()
