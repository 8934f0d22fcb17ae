"""The serving side's seams (issue 14): a malformed click context is refused before any image work, the RQ
worker's fit builds only what training needs, background threads start at process start (not per request),
and the interactive predictor's configuration has one set of defaults."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from backend.images import ImageLoader
from backend.settings import Settings, interactive_config
from model.interactive.choose import InteractiveConfig
from tests.api_support import (
    RecordingServer,
    Route,
    defect_image,
    encode,
    interactive_body,
    keypoint,
    make_app,
)


class CountingLoader(ImageLoader):
    """The real loader, counting what the service asked of it."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.calls = 0

    def resolve(self, ref, task_id=None):
        self.calls += 1
        return super().resolve(ref, task_id)

    def load_source(self, source, slot_wait_s=None):
        self.calls += 1
        return super().load_source(source, slot_wait_s)


@pytest.fixture()
def counted(tmp_path):
    settings = replace(Settings(), model_dir=tmp_path / "m", warm_on_setup=False)
    loader = CountingLoader(settings)
    app, services, engine = make_app(settings, loader=loader)
    with RecordingServer() as srv:
        srv.routes["/d.png"] = Route(encode(defect_image()[0]))
        yield app.test_client(), services, engine, loader, srv


def _mixed_labels():
    return [keypoint(60, 40, "Scratch"), keypoint(20, 20, "Dent")]


def _no_number():
    bad = keypoint(60, 40)
    bad["value"]["x"] = "left"
    return [bad]


def _outside():
    return [keypoint(160, 40)]


def _unknown_label():
    return [keypoint(60, 40, "Crack")]


@pytest.mark.parametrize("context, status, words", [
    (lambda: {"result": "nope"}, 400, "context.result must be a list"),
    (lambda: {"result": [1]}, 400, "must be an object"),
    (lambda: {"result": _mixed_labels()}, 400, "mixes several labels"),
    (lambda: {"result": _no_number()}, 400, "must be a number"),
    (lambda: {"result": _outside()}, 400, "click"),
    (lambda: {"result": _unknown_label()}, 422, "Crack"),  # a label the config lacks: the config's fault
    (lambda: {"result": [keypoint(60, 40)] * 51}, 400, "more than 50 clicks"),
])
def test_a_malformed_context_is_refused_before_any_image_work(counted, context, status, words):
    client, services, engine, loader, srv = counted
    body = interactive_body(f"{srv.url}/d.png", [])
    body["params"] = {"context": context()}
    resp = client.post("/predict", json=body)
    assert resp.status_code == status and words in resp.get_json()["error"]
    assert loader.calls == 0 and not srv.requests  # nothing resolved, nothing downloaded
    assert engine.set_image_calls == 0 and engine.banks_built == 0 and not services.model.loaded
    # the same request with a valid context does the work (the counters above can count)
    ok = client.post("/predict", json=interactive_body(f"{srv.url}/d.png", [keypoint(62.5, 41.7)]))
    assert ok.status_code == 200 and loader.calls >= 2 and engine.set_image_calls == 1


def test_the_worker_fit_builds_only_what_training_needs(tmp_path, monkeypatch):
    from backend import training, worker

    seen = {}

    def fake_fit(project, event, ctx):
        seen["ctx"] = ctx
        return {"model_version": "v-worker"}

    monkeypatch.setattr(training, "fit", fake_fit)
    monkeypatch.setattr("rq.get_current_job", lambda: None)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("ADCLICK_PREDICTOR", "residual")
    monkeypatch.setenv("LS_SYNC_CARD_TITLE", "0")
    built = []
    real_init = training.TrainingService.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(training.TrainingService, "__init__", counting_init)

    def serving_piece(self, *args, **kwargs):
        raise AssertionError(f"the worker built {type(self).__name__}")

    from backend import detection, serving

    monkeypatch.setattr(serving.ServingService, "__init__", serving_piece)  # banks, image cache, click sessions
    monkeypatch.setattr(detection.DetectorCache, "__init__", serving_piece)
    before = {t.name for t in threading.enumerate()}
    assert worker.train_job("3", {"action": "START_TRAINING"}) == {"model_version": "v-worker"}
    assert built == [training.TrainingService]
    ctx = seen["ctx"]
    assert ctx.base_version.startswith("residual-click-") and ctx.projects.references_dir("3").parent.name == "3"
    new = {t.name for t in threading.enumerate()} - before
    assert not {n for n in new if n.startswith(("warm", "bank-", "training-jobs"))}


def test_background_threads_start_with_the_app_not_with_requests(tmp_path):
    settings = replace(Settings(), model_dir=tmp_path / "m", warm_on_setup=True)
    app, services, _ = make_app(settings, start_jobs=True)
    try:
        assert services.jobs._thread is not None and services.jobs._thread.is_alive()  # before any request
        started = services.jobs._thread
        for _ in range(3):
            assert app.test_client().get("/health").status_code == 200
        assert services.jobs._thread is started
    finally:
        services.jobs.stop()
    quiet_app, quiet, _ = make_app(replace(settings, model_dir=tmp_path / "q"), start_jobs=False)
    assert quiet_app.test_client().get("/health").status_code == 200
    assert quiet.jobs._thread is None and not quiet.model.loaded  # a request starts nothing


def test_one_set_of_interactive_defaults():
    served = interactive_config(Settings())
    assert served == InteractiveConfig()
    assert interactive_config(Settings.from_env({})) == InteractiveConfig()
    env = {"ADCLICK_USE_PROMPT": "1", "ADCLICK_LEARNED_WEIGHT": "1", "ADCLICK_REFINE": "off", "ADCLICK_SEEDED": "off"}
    assert interactive_config(Settings.from_env(env)) == InteractiveConfig(use_prompt=True, learned_weight=1.0,
                                                                            refine="off", seeded=False)
    assert InteractiveConfig().seeded and Settings.from_env({"ADCLICK_SEEDED": "1"}).seeded
    with pytest.raises(ValueError):
        InteractiveConfig(refine="sharpen")


FORK_SCRIPT = r"""
import os, sys
from pathlib import Path
from dataclasses import replace
from backend.app import start_in_forked_workers
from backend.settings import Settings
from tests.api_support import make_app

settings = replace(Settings(), model_dir=Path(sys.argv[1]), warm_on_setup=False)
app, services, _ = make_app(settings, start_jobs=False)
start_in_forked_workers(services)
assert services.jobs._thread is None  # the loading process (gunicorn's master with --preload) starts nothing
pid = os.fork()
if pid == 0:  # a worker: its threads run
    ok = services.jobs._thread is not None and services.jobs._thread.is_alive()
    grandchild = os.fork()
    if grandchild == 0:  # a process the worker forks itself: nothing is started there
        os._exit(0 if not services.jobs._thread.is_alive() else 3)
    _, status = os.waitpid(grandchild, 0)
    os._exit(0 if ok and os.waitstatus_to_exitcode(status) == 0 else 2)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status) or (services.jobs._thread is not None))
"""


def test_a_preloaded_app_starts_its_threads_in_each_forked_worker_only(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(tmp_path / "m")], cwd=root, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_served_chain_follows_the_settings():
    """ADCLICK_REFINE and ADCLICK_SEEDED decide the wrappers, and the version names them (a cached state or a
    published version of one chain is never taken for another's)."""
    from backend.serving import choose_predictor

    class Engine:
        def config_hash(self):
            return "cafe1234"

    def chain(env):
        return choose_predictor(Settings.from_env({"ADCLICK_PREDICTOR": "residual", **env}), Engine())

    assert chain({}).version == "residual-click-cafe1234-refine-seeded"
    assert "click-seeded stage on" in chain({}).reason
    assert chain({"ADCLICK_SEEDED": "off"}).version == "residual-click-cafe1234-refine"
    assert chain({"ADCLICK_SEEDED": "off", "ADCLICK_REFINE": "off"}).version == "residual-click-cafe1234"
    assert chain({"ADCLICK_REFINE": "off"}).version == "residual-click-cafe1234-seeded"
