"""gunicorn entry for the adversarial tier: the real application (backend.app.create_app: routes, auth, error
handlers, request limits, job manager) configured from the environment like backend/wsgi.py, over the tiny
test engine of tests/api_support.py instead of the network weights, so thousands of requests run in seconds on
two cores. Everything between the socket and the model is the production code."""

from __future__ import annotations

import logging

from backend.app import start_in_forked_workers
from backend.settings import Settings
from tests.api_support import make_app

settings = Settings.from_env()
logging.basicConfig(
    level=getattr(logging, settings.log_level, logging.INFO),
    format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
)
# as backend/wsgi.py: background threads start in each worker (after a --preload fork, or post_worker_init)
app, service, engine = make_app(settings, start_jobs=False)
start_in_forked_workers(service)
