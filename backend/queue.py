"""Where training jobs run.

Without REDIS_URL, in the web process: backend/jobs.py's thread calls the fit runner directly. With REDIS_URL,
the same runner is dispatched to RQ workers (`python -m backend.worker`, any number, any host that shares
MODEL_DIR): the web process enqueues the fit, follows its progress and returns its result, so jobs.py keeps
its per-project state, coalescing and /health reporting unchanged. Either way the fit itself
(`TrainingService.run_training`, backend/training.py) runs inside the project's `ProjectLock` (backend/locks.py), so one project never
trains twice at once across gunicorn workers, RQ workers and replicas.

Runner contract (backend/jobs.py): runner(project, event, progress) -> {"model_version": str, ...figures}.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

from model.types import Progress

Runner = Callable[[str, dict, Progress], dict]

QUEUE_NAME = "adclick-train"
WORKER_FUNCTION = "backend.worker.train_job"


class TrainingQueueError(RuntimeError):
    """A queued training job failed, vanished or timed out."""


def redis_connection(url: str) -> Any:
    from redis import Redis

    return Redis.from_url(url)


class RQDispatcher:
    """A Runner that enqueues the fit on RQ and blocks until a worker finishes it (progress relayed)."""

    def __init__(
        self,
        redis_url: str,
        queue_name: str = QUEUE_NAME,
        function: str = WORKER_FUNCTION,
        job_timeout_s: int = 6 * 3600,
        poll_s: float = 0.5,
        lost_after_s: float = 24 * 3600,
    ):
        from rq import Queue

        self.queue = Queue(queue_name, connection=redis_connection(redis_url))
        self.function = function
        self.job_timeout_s = job_timeout_s
        self.poll_s = poll_s
        self.lost_after_s = lost_after_s

    def enqueue(self, project: str, event: dict) -> Any:
        job = self.queue.enqueue(
            self.function,
            project,
            event,
            job_timeout=self.job_timeout_s,
            result_ttl=7 * 24 * 3600,
            failure_ttl=7 * 24 * 3600,
            description=f"train project {project} ({event.get('action')})",
        )
        logger.info("project %s: training job %s enqueued on %s", project, job.id, self.queue.name)
        return job

    def __call__(self, project: str, event: dict, progress: Progress) -> dict:
        job = self.enqueue(project, event)
        progress(0.0, f"queued on {self.queue.name} as {job.id}")
        return self.wait(job, progress)

    def wait(self, job: Any, progress: Progress) -> dict:
        from rq.exceptions import NoSuchJobError
        from rq.job import JobStatus

        start, seen = time.monotonic(), None
        while True:
            try:
                job.refresh()
            except NoSuchJobError as exc:
                raise TrainingQueueError(f"training job {job.id} disappeared from Redis") from exc
            status = job.get_status(refresh=False)
            if status == JobStatus.FINISHED:
                return dict(job.return_value() or {})
            if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                raise TrainingQueueError(f"training job {job.id} {status.value}: {_last_line(job)}")
            reported = (job.meta.get("progress"), job.meta.get("message"))
            if reported != seen and reported[0] is not None:
                seen = reported
                progress(float(reported[0]), str(reported[1] or ""))
            if time.monotonic() - start > self.lost_after_s:
                raise TrainingQueueError(
                    f"training job {job.id} still {status.value} after {self.lost_after_s} s"
                )
            time.sleep(self.poll_s)


def _last_line(job: Any) -> str:
    result = job.latest_result()
    text = getattr(result, "exc_string", None) or ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error recorded"


def build_runner(redis_url: str, local_runner: Runner) -> Runner:
    """The runner jobs.py calls: RQ dispatch when `redis_url` is set, else `local_runner` in this process."""
    if redis_url:
        logger.info("training jobs go to RQ queue %s", QUEUE_NAME)
        return RQDispatcher(redis_url)
    return local_runner
