"""HTTP routes, in the shapes Label Studio 1.23 sends and expects: parse -> service -> serialize."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend import ls_format
from backend.errors import BadRequest, LabelConfigError
from backend.jobs import TRAINING_EVENTS
from backend.predict import predict
from backend.projects import parse_project
from backend.services import Services
from backend.serving import ModelLoader

logger = logging.getLogger(__name__)

try:  # the body reader of gunicorn raises its parser errors (InvalidChunkSize, ...) inside the view
    from gunicorn.http.errors import ParseException as _GunicornParseError

    _BODY_READ_ERRORS: tuple = (OSError, ValueError, _GunicornParseError)
except ImportError:  # served by another WSGI server
    _BODY_READ_ERRORS = (OSError, ValueError)

blueprint = Blueprint("adclick", __name__)
MODEL_CLASS = "ADClickBackend"
MAX_EXTRA_PARAMS_CHARS = 64 * 1024
_STARTED = time.time()


def _services() -> Services:
    return current_app.extensions["adclick"]["services"]


def _read_body() -> bytes:
    """The raw body, at most MAX_BODY_MB (413 past it). werkzeug checks the limit against Content-Length only:
    a chunked body (no Content-Length; gunicorn marks its stream terminated) would be read whole, however
    large, so it is read here in steps up to the limit. A malformed transfer (a chunk size that is not hex, a
    chunk without its terminator, a client that stops mid-body) surfaces as the server's parser error: 400."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    try:
        if request.content_length is not None or limit is None:
            return request.get_data(cache=True)
        parts, size = [], 0
        while size <= limit:
            part = request.stream.read(min(1 << 20, limit + 1 - size))
            if not part:
                break
            parts.append(part)
            size += len(part)
    except HTTPException:  # 413 over MAX_BODY_MB, client disconnects: answered by the app's HTTP handler
        raise
    except _BODY_READ_ERRORS as exc:
        raise BadRequest(f"the request body could not be read ({type(exc).__name__}): send a complete body "
                         "with a valid Content-Length or chunked encoding") from None
    if size > limit:
        raise RequestEntityTooLarge()
    return b"".join(parts)


def _json_body() -> dict:
    data = _read_body()
    body = None
    if request.is_json:
        try:
            body = current_app.json.loads(data)
        except RecursionError:  # the json module gives up around 1000 levels
            raise BadRequest(
                "request body is nested too deeply (JSON arrays/objects inside each other)"
            ) from None
        except ValueError:  # not JSON, not UTF-8/16/32, an integer of more than 4300 digits
            body = None
    if body is None:
        raise BadRequest("request body is not valid JSON (Content-Type application/json expected)")
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _model_info(model: ModelLoader) -> dict:
    if not model.loaded:
        return {"loaded": False, "kind": None, "version": None}
    choice = model.choice
    return {
        "loaded": True,
        "kind": choice.kind,
        "version": choice.version,
        "reason": choice.reason,
        "load_seconds": model.load_seconds,
    }


def _adaptations(svc: Services) -> dict:
    """Per project that adapted its interactive network: the version served (or none) and why (its last
    adaptation's record, backend/adaptation.py), without the figures' details."""
    out = {}
    for project in svc.projects.known()[:256]:
        info = svc.projects.adaptation_info(project)
        if info:
            out[project] = {k: info.get(k) for k in ("status", "version", "reason", "trigger", "finished",
                                                      "score", "base_score", "bank_key")}
    return {"enabled": svc.settings.adapt, "minutes": svc.settings.adapt_minutes, "projects": out}


@blueprint.get("/")
@blueprint.get("/health")
def health():
    svc = _services()
    jobs = svc.jobs.snapshot()
    return jsonify(
        status="UP",
        model_class=MODEL_CLASS,
        model=_model_info(svc.model),
        reference_images=svc.serving.reference_counts(),
        reference_banks=svc.serving.bank_report(),
        training={
            "active": [p for p, s in jobs.items() if s["status"] == "running"],
            "queued": [p for p, s in jobs.items() if s["status"] == "queued"],
            "jobs": jobs,
        },
        interactive_adaptation=_adaptations(svc),
        uptime_s=round(time.time() - _STARTED, 1),
    )


@blueprint.post("/setup")
def setup():
    svc = _services()
    body = _json_body()
    project = parse_project(body.get("project"))
    schema = body.get("schema") or body.get("label_config") or svc.projects.label_config(project)
    cfg = ls_format.parse_label_config(schema) if schema else None
    if cfg is None:
        raise LabelConfigError("setup carries no label config (schema)")
    ls_format.check_smart_labels(cfg)
    extra = parse_extra_params(body.get("extra_params"))
    svc.projects.update(project, label_config=schema, extra_params=extra)
    if svc.settings.warm_on_setup:
        svc.serving.warm(project)
    version = svc.versions.project_version(project)
    svc.training.sync_card_title(project, version)
    return jsonify(model_version=version, capabilities=cfg.capabilities)


def parse_extra_params(raw: Any) -> dict | None:
    """The model's *Extra params* as Label Studio sends them: an object through the API, a JSON *string* from
    the Connect Model form (``""`` when the box was left empty), or null. None means "keep what is stored";
    an empty box or ``{}`` keeps the stored params too (the form cannot show them, see README troubleshooting)."""
    if raw is None:
        return None
    if isinstance(raw, str):
        text = raw.strip()
        if not text or text == "[object Object]":  # LS's Edit form shows an API-stored object like this
            return None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequest(
                f"extra_params is not valid JSON ({exc.msg} at character {exc.pos}); "
                'type a JSON object such as {"normal_dir": "/data/good"} or leave the box empty'
            ) from None
        except RecursionError:
            raise BadRequest("extra_params is nested too deeply") from None
    if not isinstance(raw, dict):
        raise BadRequest(
            f"extra_params must be a JSON object such as {{\"normal_dir\": \"/data/good\"}}, "
            f"got {type(raw).__name__}"
        )
    if _depth(raw) > MAX_EXTRA_PARAMS_DEPTH:  # first: json.dumps below recurses once per level
        raise BadRequest(f"extra_params is nested too deeply (more than {MAX_EXTRA_PARAMS_DEPTH} levels)")
    if len(json.dumps(raw)) > MAX_EXTRA_PARAMS_CHARS:  # kept in project.json and read on every request
        raise BadRequest(f"extra_params is over the limit of {MAX_EXTRA_PARAMS_CHARS} characters as JSON")
    minutes = raw.get("adapt_minutes")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, int | float)
                                or not 0 <= minutes <= MAX_ADAPT_MINUTES):
        raise BadRequest(f"extra_params.adapt_minutes must be a number of minutes from 0 (off) to "
                         f"{MAX_ADAPT_MINUTES}, got {json.dumps(minutes)[:40]}")
    return raw or None


MAX_ADAPT_MINUTES = 240  # one adaptation's time budget at most (extra_params.adapt_minutes)


MAX_EXTRA_PARAMS_DEPTH = 16  # settings are flat key/value pairs; a few levels leave room for lists of folders


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (1 for a flat object), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _context(body: dict) -> Any:
    params = body.get("params")
    if params is not None and not isinstance(params, dict):
        raise BadRequest("params must be an object")
    return (params or {}).get("context", body.get("context"))


@blueprint.post("/predict")
def predict_route():
    svc = _services()
    body = _json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise BadRequest("tasks must be a list of Label Studio tasks")
    if not tasks:
        raise BadRequest("tasks is empty: nothing to predict")
    if len(tasks) > svc.settings.max_tasks:
        raise BadRequest(
            f"{len(tasks)} tasks in one request, over the limit of {svc.settings.max_tasks} "
            "(MAX_TASKS_PER_REQUEST); send them in smaller batches"
        )
    project = parse_project(
        body.get("project") or (tasks[0].get("project") if tasks and isinstance(tasks[0], dict) else None)
    )
    schema = body.get("label_config") or svc.projects.label_config(project)
    if not schema:
        raise LabelConfigError(
            f"no label config for project {project}: send label_config or call /setup first"
        )
    cfg = ls_format.parse_label_config(schema)
    results = predict(svc, project, tasks, cfg, _context(body))
    return jsonify(results=results)


def _webhook_project(body: dict) -> Any:
    project = body.get("project")
    if project is None:
        for key in ("annotation", "task"):
            item = body.get(key)
            if isinstance(item, dict) and item.get("project") is not None:
                return item.get("project")
        annotations = body.get("annotations")
        if isinstance(annotations, list) and annotations and isinstance(annotations[0], dict):
            return annotations[0].get("project")
    return project


@blueprint.post("/webhook")
def webhook():
    svc = _services()
    body = _json_body()
    action = body.get("action")
    if not isinstance(action, str):
        raise BadRequest("webhook payload has no action")
    if action not in TRAINING_EVENTS:
        return jsonify(status="ignored", action=action), 200
    raw = _webhook_project(body)
    project = parse_project(raw)
    config = raw.get("label_config") if isinstance(raw, dict) else None
    if isinstance(config, str) and len(config) <= ls_format.MAX_LABEL_CONFIG_CHARS:
        svc.projects.update(project, label_config=config)
    job = svc.jobs.submit(project, action)
    return jsonify(status=job["status"], action=action, project=project, job=job), 201


@blueprint.post("/train")
def train():
    """Older Label Studio versions call /train for "Start training"; same as a START_TRAINING webhook."""
    svc = _services()
    body = _json_body()
    project = parse_project(_webhook_project(body))
    job = svc.jobs.submit(project, "START_TRAINING")
    return jsonify(status=job["status"], action="START_TRAINING", project=project, job=job), 201


@blueprint.get("/versions")
def versions():
    svc = _services()
    raw = request.args.get("project")
    project = parse_project(raw) if raw else None
    current = svc.versions.project_version(project) if project else svc.model.choice.version
    return jsonify(versions=svc.versions.versions(project), model_version=current)


@blueprint.get("/metrics")
def metrics():
    svc = _services()
    stats = current_app.extensions["adclick"]["stats"]
    return jsonify(
        routes=stats.snapshot(),
        state_cache=svc.serving.cache.snapshot(),
        download_cache=svc.loader.disk.usage(),
        token_refreshes=svc.loader.auth.refresh_count,
        model=_model_info(svc.model),
        training={"last": svc.jobs.last_finished(), "jobs": svc.jobs.snapshot()},
    )
