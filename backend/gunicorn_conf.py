"""gunicorn hooks (`gunicorn -c python:backend.gunicorn_conf ...`, as `make serve` and the Docker image run it).

post_worker_init: each worker starts loading the model (backbone, one forward pass, the predictor's weights)
and warming the projects that called /setup before as soon as it boots, in a background thread, instead of on
its first request. Connecting the model in Label Studio is then the first request, and the first click after it
waits only for the project's small first reference bank (issue 12 req 7). WARM_ON_SETUP=0 turns it off."""

from __future__ import annotations

from typing import Any


def post_worker_init(worker: Any) -> None:
    adclick = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("adclick")
    if adclick and adclick["settings"].warm_on_setup:
        adclick["services"].warm_known_projects()
