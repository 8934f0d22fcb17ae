"""A training job that kills the process running it (out of memory, a segfault in a native library) is queued
again at most TRAIN_MAX_REQUEUES times, then marked failed with the reason, which /health shows; it no longer
takes every worker down in turn (issue 15, N6). A later START_TRAINING runs it again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from backend.jobs import JobManager
from backend.settings import Settings
from tests.adversarial.harness import ROOT

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from backend.jobs import JobManager

    def runner(project, event, progress):
        progress(0.1, "about to die")
        if sys.argv[3] == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        return {"model_version": "v-ok"}

    mgr = JobManager(sys.argv[1], runner, poll_s=0.02, max_requeues=int(sys.argv[2]))
    mgr.ensure_started()
    print("idle" if mgr.wait_idle(30) else "busy", flush=True)
    """
)


def _worker(state: str, max_requeues: int, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, state, str(max_requeues), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT)},
    )


def _never(project, event, progress):
    raise AssertionError("the parent never runs a job")


def test_a_job_that_kills_its_worker_is_requeued_at_most_n_times_then_failed(tmp_path):
    state = tmp_path / "jobs" / "state.json"
    JobManager(state, _never).submit("5", "START_TRAINING")
    codes = [_worker(str(state), 2, "die").returncode for _ in range(3)]
    assert codes == [-9, -9, -9], "the first run and two re-queues each killed their process"
    last = _worker(str(state), 2, "die")
    assert last.returncode == 0 and last.stdout.strip() == "idle", last.stderr[-2000:]
    job = JobManager(state, _never).snapshot("5")
    assert job["status"] == "failed" and job["requeues"] == 3
    assert "died 3 times" in job["reason"] and "TRAIN_MAX_REQUEUES" in job["reason"]
    assert not job["force"] and job["pending_events"] == 0

    JobManager(state, _never).submit("5", "START_TRAINING")  # asked again: runs again
    again = _worker(str(state), 2, "live")
    assert again.returncode == 0, again.stderr[-2000:]
    job = JobManager(state, _never).snapshot("5")
    assert job["status"] == "done" and job["model_version"] == "v-ok" and job["requeues"] == 0


def test_the_requeue_limit_is_a_setting():
    assert Settings.from_env({}).train_max_requeues == 2
    assert Settings.from_env({"TRAIN_MAX_REQUEUES": "0"}).train_max_requeues == 0


def test_a_failed_job_reason_shows_no_server_path(tmp_path):
    """/health (no auth) lists each job's failure reason; a path of the server in it is cut to its name."""
    secret = tmp_path / "models" / "projects" / "5" / "references.json"

    def runner(project, event, progress):
        raise FileNotFoundError(2, "No such file or directory", str(secret))

    mgr = JobManager(tmp_path / "jobs" / "state.json", runner, poll_s=0.02)
    mgr.submit("5", "START_TRAINING")
    mgr.ensure_started()
    try:
        assert mgr.wait_idle(10)
    finally:
        mgr.stop()
    reason = mgr.snapshot("5")["reason"]
    assert reason.startswith("FileNotFoundError") and ".../references.json" in reason
    assert str(tmp_path) not in reason and "/projects/" not in reason
