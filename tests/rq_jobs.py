"""Job bodies for tests/test_redis.py, imported by a real `python -m backend.worker` process."""

from __future__ import annotations

import os
import time

from rq import get_current_job


def echo_with_progress(project: str, event: dict) -> dict:
    job = get_current_job()
    for step in (1, 2, 3):
        job.meta.update(progress=step / 4, message=f"step {step}")
        job.save_meta()
        time.sleep(0.4)
    return {"model_version": f"echo-{project}", "action": event["action"], "pid": os.getpid()}


def boom(project: str, event: dict) -> dict:
    raise ValueError(f"no labels in project {project}")
