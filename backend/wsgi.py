"""gunicorn entry point: `gunicorn -c python:backend.gunicorn_conf backend.wsgi:app` (as `make serve` and the
Docker image run it). Logging is configured here, once.

Background threads (training jobs, warming the model and the known projects) start once per serving process,
never in the process that only loads the app before forking: with --preload the app is built in gunicorn's
master, so they start in each worker right after its fork (an at-fork hook, for workers forked by this
process); gunicorn_conf.post_worker_init starts them too (a worker that loaded the app itself, without
--preload). Both are idempotent per process."""

from __future__ import annotations

import logging

import model.engine.residuals

# The heavy imports (torch, the backbone and predictor modules, ~4-5 s on 2 cores) happen here, when gunicorn
# loads the app: once in the master with --preload (before forking; nothing here starts a thread pool), or in
# each worker at boot otherwise. No request pays for them, /setup included (Label Studio gives it 3 s).
import model.interactive.clickmode
import model.interactive.learned  # noqa: F401
from backend.app import create_app, start_in_forked_workers
from backend.settings import Settings

settings = Settings.from_env()
logging.basicConfig(
    level=getattr(logging, settings.log_level, logging.INFO),
    format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
)
app = create_app(settings, start_jobs=False)
start_in_forked_workers(app.extensions["adclick"]["services"])
