"""Training job queue: coalescing (N events or T seconds), START_TRAINING, one job per project at a time,
failures with a reason, atomic persisted state that survives a restart."""

import json
import os
import threading

import pytest

from backend.jobs import JobManager


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Recorder:
    def __init__(self, fail=False):
        self.calls = []
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, project, event, progress):
        progress(0.5, "halfway")
        self.started.set()
        self.gate.wait(10)
        self.calls.append((project, event["action"], event["coalesced_events"]))
        if self.fail:
            raise RuntimeError("no labelled masks yet")
        return {"model_version": f"v{len(self.calls)}", "images": 3}


@pytest.fixture()
def make(tmp_path):
    managers = []

    def factory(runner, **kw):
        kw.setdefault("after_n", 3)
        kw.setdefault("debounce_s", 30.0)
        mgr = JobManager(tmp_path / "jobs" / "state.json", runner, poll_s=0.02, **kw)
        managers.append(mgr)
        return mgr

    yield factory
    for mgr in managers:
        mgr.stop()


def test_annotation_events_coalesce_until_n(make):
    runner, clock = Recorder(), Clock()
    mgr = make(runner, clock=clock)
    mgr.ensure_started()
    for _ in range(2):
        assert mgr.submit("4", "ANNOTATION_CREATED")["status"] == "queued"
    assert mgr.wait_idle(2) and runner.calls == []  # 2 < N and T not passed: nothing runs
    mgr.submit("4", "ANNOTATIONS_CREATED")
    assert mgr.wait_idle(5)
    assert runner.calls == [("4", "ANNOTATIONS_CREATED", 3)]
    state = mgr.snapshot("4")
    assert state["status"] == "done" and state["model_version"] == "v1" and state["figures"] == {"images": 3}


def test_annotation_events_run_after_the_debounce_time(make):
    runner, clock = Recorder(), Clock()
    mgr = make(runner, clock=clock)
    mgr.ensure_started()
    mgr.submit("4", "ANNOTATION_UPDATED")
    assert mgr.wait_idle(1) and runner.calls == []
    clock.now += 31
    assert mgr.wait_idle(5)
    assert runner.calls == [("4", "ANNOTATION_UPDATED", 1)]


def test_start_training_runs_at_once_and_other_actions_are_ignored(make):
    runner = Recorder()
    mgr = make(runner)
    assert mgr.submit("9", "PROJECT_UPDATED")["status"] == "idle"
    mgr.ensure_started()
    mgr.submit("9", "START_TRAINING")
    assert mgr.wait_idle(5)
    assert runner.calls == [("9", "START_TRAINING", 0)]


def test_one_job_per_project_events_during_a_run_start_the_next_one(make):
    runner = Recorder()
    runner.gate.clear()
    mgr = make(runner)
    mgr.ensure_started()
    mgr.submit("1", "START_TRAINING")
    assert runner.started.wait(5)
    state = mgr.snapshot("1")
    assert state["status"] == "running" and state["progress"] == 0.5 and state["message"] == "halfway"
    mgr.submit("1", "START_TRAINING")  # while running: recorded, not started in parallel
    assert mgr.snapshot("1")["status"] == "running"
    runner.gate.set()
    assert mgr.wait_idle(5)
    assert [c[0] for c in runner.calls] == ["1", "1"]
    assert mgr.snapshot("1")["runs"] == 2


def test_failure_is_recorded_with_its_reason_and_the_worker_survives(make):
    runner = Recorder(fail=True)
    mgr = make(runner)
    mgr.ensure_started()
    mgr.submit("2", "START_TRAINING")
    assert mgr.wait_idle(5)
    state = mgr.snapshot("2")
    assert state["status"] == "failed" and "no labelled masks yet" in state["reason"]
    runner.fail = False
    mgr.submit("2", "START_TRAINING")
    assert mgr.wait_idle(5) and mgr.snapshot("2")["status"] == "done"
    assert mgr.last_finished()["project"] == "2"


def test_queued_job_survives_a_restart(make, tmp_path):
    first = make(Recorder())  # never started: the process "dies" with a queued job
    first.submit("5", "START_TRAINING")
    saved = json.loads((tmp_path / "jobs" / "state.json").read_text())
    assert saved["projects"]["5"]["status"] == "queued"
    runner = Recorder()
    second = make(runner)
    second.ensure_started()
    assert second.wait_idle(5)
    assert runner.calls == [("5", "START_TRAINING", 0)]


def test_a_running_job_of_a_dead_process_is_queued_again(make, tmp_path):
    path = tmp_path / "jobs" / "state.json"
    path.parent.mkdir(parents=True)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that no longer exists
    import socket

    path.write_text(
        json.dumps(
            {
                "projects": {
                    "6": {
                        "project": "6",
                        "status": "running",
                        "owner": {"pid": pid, "host": socket.gethostname()},
                    }
                }
            }
        )
    )
    runner = Recorder()
    mgr = make(runner)
    mgr.ensure_started()
    assert mgr.wait_idle(5)
    assert runner.calls == [("6", "START_TRAINING", 0)]


def test_state_file_is_valid_json_after_every_change(make, tmp_path):
    mgr = make(Recorder())
    for i in range(20):
        mgr.submit(str(i % 3), "ANNOTATION_CREATED")
        json.loads((tmp_path / "jobs" / "state.json").read_text())
    assert not list((tmp_path / "jobs").glob(".jobs-*.tmp"))


def test_training_runs_at_a_lower_cpu_priority_than_requests(tmp_path, monkeypatch):
    """Issue 12 item 9: task opens took 8 s while a training job ran. run_training lowers only its own thread's
    priority (TRAIN_NICE), so request threads keep the cores."""
    import os
    import threading
    from dataclasses import replace as _replace

    from backend import training
    from backend.settings import Settings
    from tests.api_support import make_app

    seen = {}

    def fake_fit(project, event, ctx):
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return {"model_version": "v-test"}

    monkeypatch.setattr(training, "fit", fake_fit)
    settings = _replace(Settings(), model_dir=tmp_path / "m", train_nice=7, sync_card_title=False)
    _, service, _ = make_app(settings)
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    worker = threading.Thread(target=service.training.run_training, args=("3", {"action": "START_TRAINING"}, lambda f, m: None))
    worker.start()
    worker.join(30)
    assert seen["nice"] == max(7, main_before)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before
