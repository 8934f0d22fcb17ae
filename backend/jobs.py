"""Per-project background training jobs.

Webhook events enter with `submit(project, action)` and return at once. START_TRAINING always runs a job;
annotation events are coalesced: a job runs after `after_n` new events or `debounce_s` seconds after the first
pending one, whichever comes first. One job per project at a time; events that arrive while a job runs are
kept for the next one. The state of every project (queued, running + progress, done, failed + reason) lives in
one JSON file under MODEL_DIR, rewritten atomically under an flock after each change. That file is the source
of truth: gunicorn workers sharing MODEL_DIR see one state, only one of them takes a due job, and queued jobs
survive a restart (a running job whose process is gone is queued again)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from backend.locks import ProjectLock
from backend.projects import project_key
from model.atomic import write_json_atomic
from model.types import Progress

logger = logging.getLogger(__name__)

START = "START_TRAINING"
ANNOTATION_EVENTS = frozenset(
    {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"}
)
TRAINING_EVENTS = ANNOTATION_EVENTS | {START}
# the service's own job (backend/adaptation.py): adapt the interactive network to a project's completed reference
# bank. Runs like START (at once), but reads no labels; a START or annotation events pending make it a full fit.
ADAPT = "ADAPT_INTERACTIVE"

# runner(project, event, progress) -> {"model_version": str, ...figures}; progress(fraction, message)
Runner = Callable[[str, dict, Progress], dict]


_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/:,;()\[\]]+/)+([^\s'\"/:,;()\[\]]*)")


def hide_paths(text: str) -> str:
    """Server paths out of a message shown to clients: '/srv/models/projects/3/x.json' -> '.../x.json' (URLs,
    whose paths follow 'host', are kept)."""
    return _ABS_PATH.sub(lambda m: f".../{m.group(1)}", text)


def _blank(project: str) -> dict:
    return {
        "project": project,
        "status": "idle",
        "pending_events": 0,
        "force": False,
        "first_pending_at": None,
        "trigger": None,
        "progress": 0.0,
        "message": "",
        "reason": None,
        "queued_at": None,
        "started_at": None,
        "finished_at": None,
        "model_version": None,
        "figures": {},
        "runs": 0,
        "last_status": None,
        "duration_s": None,
        "owner": None,
        "requeues": 0,  # times in a row the process running this job died (killed, out of memory, ...)
        "adapt_only": False,  # the job due is an ADAPT_INTERACTIVE one (no START, no annotation event pending)
    }


class JobManager:
    def __init__(
        self,
        state_path: Path,
        runner: Runner,
        after_n: int = 5,
        debounce_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        poll_s: float = 0.5,
        max_requeues: int = 2,
        valid_project: Callable[[str], bool] = lambda project: True,
    ):
        self.state_path = Path(state_path)
        self.runner = runner
        self.after_n = max(1, int(after_n))
        self.debounce_s = float(debounce_s)
        self.clock = clock
        self.poll_s = poll_s
        self.max_requeues = max(0, int(max_requeues))
        self.valid_project = valid_project
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._owner_pid: int | None = None
        self._stopping = False
        # -- owner liveness (backend/locks.py): the process running a project's job holds its "job" flock from
        # _take to the end of _run; the kernel drops it when that process dies, on any host or container, so
        # "running" with a free lock means the owner is gone (no pid/hostname guessing).
        self._job_locks: dict[str, ProjectLock] = {}

    def _job_lock(self, project: str) -> ProjectLock:
        return ProjectLock(self.state_path.parent, project, "job")

    def _owner_alive(self, project: str) -> bool:
        return project in self._job_locks or self._job_lock(project).holder() is not None

    # -- persistence -----------------------------------------------------------------------------------------
    def _read(self) -> dict[str, dict]:
        try:
            raw = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.error("job state %s is unreadable (%s); starting with no jobs", self.state_path, exc)
            return {}
        states = raw.get("projects") if isinstance(raw, dict) else None
        return {
            p: {**_blank(p), **s}
            for p, s in (states if isinstance(states, dict) else {}).items()
            if isinstance(s, dict) and self.valid_project(p)  # an older version accepted ids like "inf"
        }

    @contextmanager
    def _transaction(self) -> Iterator[dict[str, dict]]:
        """Read-modify-write of the state file under the in-process lock and an flock across processes."""
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        with self._cond:
            with open(self.state_path.with_suffix(".lock"), "a+") as lock_fh:
                fcntl.flock(lock_fh, fcntl.LOCK_EX)
                try:
                    states = self._read()
                    yield states
                    write_json_atomic(self.state_path, {"projects": states})
                finally:
                    fcntl.flock(lock_fh, fcntl.LOCK_UN)
            self._cond.notify_all()

    # -- public API ------------------------------------------------------------------------------------------
    def submit(self, project: str, action: str) -> dict:
        """Record a training event; returns the project's job state. Other actions change nothing."""
        project = project_key(project)
        if action not in TRAINING_EVENTS and action != ADAPT:
            return self.snapshot(project)
        with self._transaction() as states:
            state = states.setdefault(project, _blank(project))
            now = self.clock()
            if action == ADAPT:
                state["adapt_only"] = not state["force"] or bool(state.get("adapt_only"))
                state["force"] = True
            elif action == START:
                state["force"] = True
                state["adapt_only"] = False
            else:
                state["pending_events"] += 1
                state["first_pending_at"] = state["first_pending_at"] or now
            if action == START or not state["force"] or state["adapt_only"]:
                state["trigger"] = action
            if state["status"] not in ("running", "queued"):
                state["requeues"] = 0  # asked anew: a job that failed by crashing may run again
            if state["status"] != "running":
                state["status"] = "queued"
                state["queued_at"] = state["queued_at"] or now
            return dict(state)

    def snapshot(self, project: str | None = None) -> dict:
        """Lock-free read (the file is replaced atomically), so /health stays fast during training."""
        states = self._read()
        if project is not None:
            return states.get(str(project)) or _blank(str(project))
        return states

    def last_finished(self) -> dict | None:
        done = [s for s in self._read().values() if s["finished_at"]]
        return max(done, key=lambda s: s["finished_at"]) if done else None

    def ensure_started(self) -> None:
        """Start the worker thread in this process (idempotent; safe after a fork: gunicorn --preload)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive() and self._owner_pid == os.getpid():
                return
            self._stopping = False
            self._owner_pid = os.getpid()
            self._thread = threading.Thread(target=self._loop, name="training-jobs", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once no job is due or running (for tests and shutdown)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            now = self.clock()
            if not any(s["status"] == "running" or self._due(s, now) for s in self._read().values()):
                return True
            with self._cond:
                self._cond.wait(0.05)
        return False

    # -- worker ----------------------------------------------------------------------------------------------
    def _due(self, state: dict, now: float) -> bool:
        if state["status"] == "running":
            return False
        if state["force"] or state["pending_events"] >= self.after_n:
            return True
        first = state["first_pending_at"]
        return state["pending_events"] > 0 and first is not None and now - first >= self.debounce_s

    def _take(self) -> tuple[str, dict] | None:
        with self._transaction() as states:
            now = self.clock()
            for state in states.values():
                if state["status"] == "running" and not self._owner_alive(state["project"]):
                    self._requeue_or_fail(state, now)
            due = [s for s in states.values() if self._due(s, now)]
            due.sort(key=lambda s: s["queued_at"] or now)
            for state in due:
                lock = self._job_lock(state["project"])
                if lock.acquire(blocking=False):
                    self._job_locks[state["project"]] = lock
                    break
            else:
                return None
            adapt_only = bool(state.get("adapt_only")) and not state["pending_events"]
            event = {
                "action": ADAPT if adapt_only else START if state["force"] else (state["trigger"] or "ANNOTATION_CREATED"),
                "project": {"id": state["project"]},
                "coalesced_events": state["pending_events"],
            }
            state.update(
                status="running",
                force=False,
                adapt_only=False,
                pending_events=0,
                first_pending_at=None,
                queued_at=None,
                progress=0.0,
                message="started",
                reason=None,
                started_at=now,
                trigger=event["action"],
                owner={"pid": os.getpid(), "host": socket.gethostname()},
            )
            return state["project"], event

    def _requeue_or_fail(self, state: dict, now: float) -> None:
        """A "running" job whose process is gone: queued again, at most `max_requeues` times in a row (a
        job that kills its process, e.g. out of memory, would otherwise take every worker down in turn)."""
        state["requeues"] = int(state.get("requeues") or 0) + 1
        if state["requeues"] <= self.max_requeues:
            logger.warning(
                "project %s: the process running its training job is gone; queued again (%d of %d)",
                state["project"], state["requeues"], self.max_requeues,
            )
            state.update(status="queued", force=True, message="re-queued after a restart", owner=None,
                         adapt_only=state.get("trigger") == ADAPT)
            return
        reason = (
            f"the process running this job died {state['requeues']} times in a row (killed, out of memory?); "
            f"not retried after {self.max_requeues} re-queues (TRAIN_MAX_REQUEUES): "
            "check the backend's memory and log, then send START_TRAINING to try again"
        )
        logger.error("project %s: training job failed: %s", state["project"], reason)
        state.update(
            status="failed", last_status="failed", reason=reason, message="failed", owner=None, force=False,
            pending_events=0, first_pending_at=None, queued_at=None, finished_at=now,
        )

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
            try:
                taken = self._take()
            except OSError as exc:
                logger.error("job state %s: %s", self.state_path, exc)
                taken = None
            if taken is not None:
                self._run(*taken)
                continue
            with self._cond:
                if not self._stopping:
                    self._cond.wait(self.poll_s)

    def _progress(self, project: str) -> Progress:
        def report(fraction: float, message: str = "") -> None:
            with self._transaction() as states:
                state = states.setdefault(project, _blank(project))
                state["progress"] = round(min(max(float(fraction), 0.0), 1.0), 4)
                state["message"] = str(message)[:300]

        return report

    def _run(self, project: str, event: dict) -> None:
        logger.info(
            "training job for project %s starts (%s, %d coalesced events)",
            project,
            event["action"],
            event["coalesced_events"],
        )
        t0 = time.monotonic()
        try:
            result = self.runner(project, event, self._progress(project)) or {}
            update = {
                "status": "done",
                "progress": 1.0,
                "message": "finished",
                "model_version": result.get("model_version"),
                "figures": {k: v for k, v in result.items() if k != "model_version"},
            }
            logger.info(
                "training job for project %s done in %.1f s: %s",
                project,
                time.monotonic() - t0,
                update["model_version"],
            )
        except Exception as exc:  # a failed job must never kill the worker; its reason is shown in /health
            logger.exception("training job for project %s failed", project)
            reason = hide_paths(f"{type(exc).__name__}: {exc}")[:500]  # /health shows it without auth
            update = {"status": "failed", "reason": reason, "message": "failed"}
        try:
            with self._transaction() as states:
                state = states.setdefault(project, _blank(project))
                state.update(
                    update,
                    last_status=update["status"],
                    finished_at=self.clock(),
                    runs=state["runs"] + 1,
                    duration_s=round(time.monotonic() - t0, 3),
                    owner=None,
                    requeues=0,
                )
                if state["force"] or state["pending_events"]:
                    state["status"] = (
                        "queued"  # events arrived while it ran; the result fields keep the last run
                    )
                    state["queued_at"] = self.clock()
        finally:
            self._job_locks.pop(project).release()
