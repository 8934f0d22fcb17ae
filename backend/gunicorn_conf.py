"""gunicorn hooks (`gunicorn -c python:backend.gunicorn_conf ...`, as `make serve` and the Docker image run it).

post_worker_init: each worker starts its background work as soon as it boots (`Services.start_background`): the
training jobs' thread, and loading the model (backbone, one forward pass, the predictor's weights) and warming
the projects that called /setup before, instead of on its first request. Connecting the model in Label Studio is
then the first request, and the first click after it waits only for the project's small first reference bank
(issue 12 req 7). WARM_ON_SETUP=0 turns the warming off (not the jobs). Idempotent with backend/wsgi.py's own
start after a --preload fork.

Loading this module also makes the requests gunicorn's own HTTP parser refuses before the application (invalid
headers, oversized headers, both framings) answer with a JSON {"error": ...} like every other refusal, instead of
gunicorn's HTML page (issue 15 req 4): `gunicorn.util.write_error` is what gunicorn's workers call for them."""

from __future__ import annotations

import json
from typing import Any

from gunicorn import util


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error with a JSON body naming the problem (mesg is gunicorn's own description)."""
    body = json.dumps({"error": f"{reason}: {mesg}" if mesg else str(reason)})
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body.encode('utf-8'))}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1", "replace") + body.encode("utf-8"))


util.write_error = write_json_error


def post_worker_init(worker: Any) -> None:
    adclick = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("adclick")
    if adclick:
        adclick["services"].start_background()
