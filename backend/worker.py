"""Training worker for REDIS_URL deployments: `python -m backend.worker [--burst]`.

Takes fits from the RQ queue that the web processes fill (backend/queue.py) and runs them with the same
code as the in-process mode (`TrainingService.run_training`, backend/training.py: the project's labels from Label Studio, a new
version published atomically under MODEL_DIR, inside the project's cross-process lock). Run as many workers
as there are GPUs or hosts; they must share MODEL_DIR (and reach LABEL_STUDIO_URL) with the web processes.
A job builds only what a fit needs (`TrainingService.from_settings`): no image-state cache, no click sessions,
no reference-bank or warm-up threads.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from backend.queue import QUEUE_NAME, redis_connection
from backend.settings import Settings

logger = logging.getLogger(__name__)


def train_job(project: str, event: dict) -> dict:
    """The RQ job body: one fit of `project`; progress goes to the job's meta for the waiting web process."""
    from rq import get_current_job

    from backend.training import TrainingService

    job = get_current_job()

    def progress(fraction: float, message: str = "") -> None:
        if job is not None:
            job.meta.update(progress=float(fraction), message=str(message)[:300])
            job.save_meta()

    settings = Settings.from_env()
    logger.info(
        "project %s: training (%s) in worker, MODEL_DIR %s", project, event.get("action"), settings.model_dir
    )
    return TrainingService.from_settings(settings).run_training(str(project), dict(event), progress)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m backend.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--burst", action="store_true", help="exit once the queue is empty (batch runs, tests)"
    )
    parser.add_argument("--queue", default=QUEUE_NAME, help=f"RQ queue name (default {QUEUE_NAME})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from rq import Queue, Worker

    args = parse_args(argv)
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        logger.error(
            "REDIS_URL is not set: without it training runs inside the web processes, no worker needed"
        )
        return 2
    connection = redis_connection(settings.redis_url)
    connection.ping()
    worker = Worker([Queue(args.queue, connection=connection)], connection=connection)
    logger.info("worker %s listening on %s (burst=%s)", worker.name, args.queue, args.burst)
    worker.work(burst=args.burst, logging_level=settings.log_level, with_scheduler=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
