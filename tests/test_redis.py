"""REDIS_URL deployments: fits go through RQ on a real redis-server and run in `python -m backend.worker`."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from backend.queue import RQDispatcher, TrainingQueueError, build_runner
from tests.redis_server import start_redis

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> str:
    gen = start_redis(tmp_path_factory.mktemp("redis"))
    url = next(gen)
    yield url
    gen.close()


def worker_env(redis_url: str, model_dir: Path, **extra: str) -> dict:
    return {**os.environ, "REDIS_URL": redis_url, "MODEL_DIR": str(model_dir), "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1", "LOG_LEVEL": "INFO", **extra}


def run_worker(env: dict, queue: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend.worker", "--burst", "--queue", queue], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_without_redis_url_training_stays_in_process():
    def local(project, event, progress):
        return {"model_version": "x"}

    assert build_runner("", local) is local


def test_worker_command_refuses_to_start_without_redis_url(tmp_path):
    env = {k: v for k, v in worker_env("", tmp_path).items() if k != "REDIS_URL"}
    done = subprocess.run([sys.executable, "-m", "backend.worker", "--burst"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "REDIS_URL" in done.stderr


def test_dispatch_runs_on_the_worker_and_relays_progress(redis_url, tmp_path):
    queue = f"test-{uuid.uuid4().hex[:8]}"
    dispatcher = RQDispatcher(redis_url, queue_name=queue, function="tests.rq_jobs.echo_with_progress", poll_s=0.05)
    job = dispatcher.enqueue("12", {"action": "START_TRAINING"})
    seen, out = [], {}
    waiter = threading.Thread(target=lambda: out.update(result=dispatcher.wait(job, lambda f, m: seen.append((f, m)))))
    waiter.start()
    done = run_worker(worker_env(redis_url, tmp_path), queue)
    waiter.join(timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out["result"]["model_version"] == "echo-12" and out["result"]["action"] == "START_TRAINING"
    assert out["result"]["pid"] != os.getpid(), "the job ran in the worker, not here"
    assert [m for _, m in seen] == ["step 1", "step 2", "step 3"]
    assert [f for f, _ in seen] == [0.25, 0.5, 0.75]


def test_failed_job_raises_with_its_reason(redis_url, tmp_path):
    queue = f"test-{uuid.uuid4().hex[:8]}"
    dispatcher = RQDispatcher(redis_url, queue_name=queue, function="tests.rq_jobs.boom", poll_s=0.05)
    job = dispatcher.enqueue("5", {"action": "START_TRAINING"})
    assert run_worker(worker_env(redis_url, tmp_path), queue).returncode == 0
    with pytest.raises(TrainingQueueError, match="ValueError: no labels in project 5"):
        dispatcher.wait(job, lambda f, m: None)
