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

from backend.locks import ProjectLock, is_pending, project_key, run_exclusive

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys, time
    from backend.locks import ProjectLock
    lock = ProjectLock(sys.argv[1], sys.argv[2])
    assert lock.acquire(blocking=False)
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
""")

GATE = textwrap.dedent("""
    import json, os, sys, time
    from backend.locks import run_exclusive
    model_dir, log = sys.argv[1], sys.argv[2]
    def fit():
        start = time.time()
        time.sleep(0.3)
        with open(log, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "start": start, "end": time.time()}) + "\\n")
    requested = time.time()
    runs = run_exclusive(model_dir, "7.1700000000", fit)
    print(json.dumps({"requested": requested, "runs": runs}))
""")


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True, **kw)


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


def test_lock_misuse_is_an_error(tmp_path):
    lock = ProjectLock(tmp_path, 1)
    with pytest.raises(RuntimeError):
        lock.release()
    lock.acquire()
    with pytest.raises(RuntimeError):
        lock.acquire()
    lock.release()


def test_run_exclusive_runs_inline_when_free(tmp_path):
    calls = []
    assert run_exclusive(tmp_path, 5, lambda: calls.append(1)) == 1
    assert calls == [1] and not is_pending(tmp_path, 5)


def test_run_exclusive_hands_over_to_the_running_holder(tmp_path):
    """Concurrent requests from 4 processes: never two fits at once, and every request is covered by a fit that
    started after it (a late request is not lost), with fewer fits than requests."""
    log = tmp_path / "fits.jsonl"
    procs = []
    for i in range(4):
        procs.append(_python(GATE, str(tmp_path), str(log)))
        time.sleep(0.1 * (i % 2))
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    fits = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda f: f["start"])
    for before, after in zip(fits, fits[1:]):
        assert after["start"] >= before["end"], "two fits of one project overlapped"
    assert sum(r["runs"] for r in results) == len(fits)
    assert 1 <= len(fits) < len(results)
    assert max(r["requested"] for r in results) <= fits[-1]["start"]
    assert not is_pending(tmp_path, 7)
