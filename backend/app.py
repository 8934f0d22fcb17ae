"""Flask application factory: `create_app(settings, services=None, start_jobs=True)`. No import-time side effects;
typed exceptions become JSON {"error": "..."} answers here, tracebacks only go to the log. The process's
background threads (training jobs, warming the model and the known projects) start here once the services
exist (`start_jobs`), or in each gunicorn worker after its fork (backend/wsgi.py), never per request."""

from __future__ import annotations

import hmac
import logging
import os
import time

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.errors import BackendError
from backend.services import Services, build_services
from backend.settings import Settings
from backend.stats import RequestStats

logger = logging.getLogger(__name__)

OPEN_ROUTES = ("/health",)
# 5xx answers the client caused or that pass on their own: the task's image host failed (502), the project's
# reference bank is still being built (503). Logged at WARNING like a 4xx, not as a server fault.
CLIENT_CAUSED_5XX = (502, 503)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def _model_error_status(exc: Exception) -> int | None:
    try:
        from model.errors import BankError, CheckpointError, InputError, ModelError
    except ImportError:
        return None
    if isinstance(exc, InputError):
        return 400
    if isinstance(exc, (BankError, CheckpointError)):
        return 500
    if isinstance(exc, ModelError):
        return 500
    return None


def _register_errors(app: Flask, settings: Settings) -> None:
    """Client mistakes (4xx) and failures the client caused (502: the task's image host; 503: not ready yet)
    are logged at WARNING by `_log_refusal`; the server's own faults (500) at ERROR with the traceback,
    once."""

    @app.errorhandler(BackendError)
    def backend_error(exc: BackendError):
        if exc.status >= 500 and exc.status not in CLIENT_CAUSED_5XX:
            logger.error("%s on %s %s: %s", type(exc).__name__, request.method, request.path, exc.message,
                         exc_info=exc)
            g.logged_error = True
        return jsonify(error=exc.message), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if exc.code == 413:
            limit = settings.max_body_bytes / (1024 * 1024)
            return jsonify(error=f"request body is over the limit of {limit:g} MB (MAX_BODY_MB)"), 413
        return jsonify(error=f"{exc.name}: {exc.description}"), exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        status = _model_error_status(exc)
        if status is not None:  # the model's own typed errors carry a message meant for the client
            if status >= 500:
                logger.error("model error on %s %s: %s", request.method, request.path, exc, exc_info=exc)
                g.logged_error = True
            return jsonify(error=f"{type(exc).__name__}: {exc}"), status
        logger.exception("unhandled error on %s %s", request.method, request.path)
        g.logged_error = True
        return jsonify(error=f"internal error ({type(exc).__name__}); see the backend log"), 500


def _register_auth_and_stats(app: Flask, settings: Settings, stats: RequestStats) -> None:
    @app.before_request
    def before():
        g.t0 = time.perf_counter()
        if not settings.auth_enabled or request.path in OPEN_ROUTES:
            return None
        try:
            auth = request.authorization
        except (UnicodeError, ValueError):  # bytes werkzeug cannot decode (e.g. Latin-1): no credentials
            auth = None
        ok = (
            auth is not None
            and auth.type == "basic"
            and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
            and hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
        )
        if not ok:
            resp = jsonify(error="authentication required: HTTP basic auth (BASIC_AUTH_USER/BASIC_AUTH_PASS)")
            resp.status_code = 401
            resp.headers["WWW-Authenticate"] = 'Basic realm="adclick-backend"'
            return resp
        return None

    @app.after_request
    def after(response):
        rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        method = request.method if request.method in KNOWN_METHODS else "OTHER"  # keys stay bounded
        stats.record(f"{method} {rule}", response.status_code, time.perf_counter() - g.get("t0", 0.0))
        if response.status_code >= 400 and not g.get("logged_error"):
            _log_refusal(response)
        return response


def _log_refusal(response) -> None:
    """Every 4xx answer and every client-caused 5xx (CLIENT_CAUSED_5XX) at WARNING with the route, the status
    and the reason the client read (Label Studio tells its user to look at the backend's console). Never the
    request body or a header. Server faults were logged at ERROR, with the traceback, by the error
    handlers."""
    reason = ""
    if response.is_json:
        body = response.get_json(silent=True)
        if isinstance(body, dict):
            reason = str(body.get("error", ""))
    logger.warning("%s %s -> %d: %s", request.method, request.path, response.status_code,
                   reason[:500] or response.status)


def create_app(
    settings: Settings | None = None, services: Services | None = None, start_jobs: bool = True
) -> Flask:
    """`start_jobs`: start this process's background threads now (services.start_background); False where the
    process forks its workers after loading the app (gunicorn --preload), which start them after the fork."""
    settings = settings or Settings.from_env()
    services = services or build_services(settings)
    app = Flask("adclick-backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]  # Flask's DefaultJSONProvider has it
    stats = RequestStats()
    app.extensions["adclick"] = {"settings": settings, "services": services, "stats": stats}
    _register_errors(app, settings)
    _register_auth_and_stats(app, settings, stats)
    from backend.routes import blueprint

    app.register_blueprint(blueprint)
    if start_jobs:
        services.start_background()
    return app


def start_in_forked_workers(services: Services) -> None:
    """For an app loaded before the process forks its workers (gunicorn --preload loads it in the master): start
    the background threads in each direct child right after its fork, never in the loading process itself (its
    threads would not survive the fork, and the master must not run training jobs). Processes the workers fork
    themselves start nothing."""
    parent = os.getpid()

    def start() -> None:
        if os.getppid() == parent:
            services.start_background()

    os.register_at_fork(after_in_child=start)
