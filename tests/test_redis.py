"""REDIS_URL deployments: fits go through RQ on a real redis-server and run in `python -m backend.worker`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
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
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(model_dir),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "LOG_LEVEL": "INFO",
        **extra,
    }


def run_worker(env: dict, queue: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend.worker", "--burst", "--queue", queue],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_without_redis_url_training_stays_in_process():
    def local(project, event, progress):
        return {"model_version": "x"}

    assert build_runner("", local) is local


def test_worker_command_refuses_to_start_without_redis_url(tmp_path):
    env = {k: v for k, v in worker_env("", tmp_path).items() if k != "REDIS_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "backend.worker", "--burst"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "REDIS_URL" in done.stderr


def test_dispatch_runs_on_the_worker_and_relays_progress(redis_url, tmp_path):
    queue = f"test-{uuid.uuid4().hex[:8]}"
    dispatcher = RQDispatcher(
        redis_url, queue_name=queue, function="tests.rq_jobs.echo_with_progress", poll_s=0.05
    )
    job = dispatcher.enqueue("12", {"action": "START_TRAINING"})
    seen, out = [], {}
    waiter = threading.Thread(
        target=lambda: out.update(result=dispatcher.wait(job, lambda f, m: seen.append((f, m))))
    )
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


@pytest.mark.slow
def test_webhook_fit_goes_through_redis_to_the_worker(redis_url, tmp_path):
    """A server with REDIS_URL enqueues the fit instead of running it; `python -m backend.worker` runs the
    real fit (reads the fake Label Studio, publishes a version under the shared MODEL_DIR); the server
    reports it."""
    from redis import Redis
    from rq import Queue
    from rq.registry import FinishedJobRegistry

    from backend.queue import QUEUE_NAME
    from tests.api_support import CONTRACT_CONFIG
    from tests.test_multiprocess import PROJECT, TOKEN, FakeLabelStudio, Server, wait_training_finished

    Redis.from_url(redis_url).flushdb()
    ls = FakeLabelStudio(listing_delay_s=0.0)
    model_dir = tmp_path / "models"
    server = Server("R", model_dir, ls.url, workers=1, log_dir=tmp_path, redis_url=redis_url)
    try:
        server.wait_healthy()
        before = server.post("/setup", {"project": PROJECT, "schema": CONTRACT_CONFIG})["model_version"]
        server.post("/webhook", {"action": "START_TRAINING", "project": {"id": int(PROJECT)}})
        queue = Queue(QUEUE_NAME, connection=Redis.from_url(redis_url))
        deadline = time.monotonic() + 60
        while queue.count == 0:
            assert time.monotonic() < deadline, "the server did not enqueue the fit"
            time.sleep(0.1)
        assert ls.listings == [], "with REDIS_URL the server must not fit in-process"
        done = run_worker(
            worker_env(
                redis_url,
                model_dir,
                LABEL_STUDIO_URL=ls.url,
                LABEL_STUDIO_API_KEY=TOKEN,
                DEVICE="cpu",
                ADCLICK_PREDICTOR="residual",
            ),
            QUEUE_NAME,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(ls.listings) == 1, "the worker ran the fit once"
        assert FinishedJobRegistry(queue=queue).count == 1
        jobs = wait_training_finished(server, timeout=60)  # the server relays the worker's result
        body = server.get("/versions", params={"project": PROJECT})
        assert body["model_version"] != before
        assert (
            jobs[PROJECT]["last_status"] == "done" and jobs[PROJECT]["model_version"] == body["model_version"]
        )
        assert jobs[PROJECT]["figures"]["ok_tasks"] == len(ls.tasks)
    finally:
        server.stop()
        ls.close()
