"""Per-project adaptation of the interactive network, in the service (the model side is
model/interactive/adapt.py).

When it runs (always as a background job of backend/jobs.py: coalesced, one per project, crash-safe, on RQ
workers when REDIS_URL is set):

- `ADAPT_INTERACTIVE` jobs: a project's reference bank was completed or grew (backend/serving.py calls
  `AdaptationHook` for the projects using that bank; once per bank: the project's adaptation.json record names
  the bank last adapted for). References only, no labels.
- every training job (webhook / *Start Training*, backend/training.py's `fit`): after ADClick-Seg, on the
  references and the project's accepted annotations (brush masks; rectangles through the shipped network's
  box answer).

Each run fine-tunes the shipped weights for at most ADCLICK_ADAPT_MINUTES (extra_params `adapt_minutes`
overrides it per project) and publishes a version `adclick-adapted-p<id>-v<N>` in the project's interactive
store (model/seg/versions.py's VersionStore: written whole then renamed, the last ADCLICK_ADAPT_KEEP kept) only
when it validates better than the shipped network and than the version served now. What happened, and why,
goes to the project's adaptation.json record (/health shows it). Serving picks a published version up within
model.atomic.RECORD_REFRESH_S in every process (backend/serving.py `ServingService.model_for`); a restart
serves the last published one.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from backend.banks import screen_references
from backend.jobs import ADAPT, hide_paths

# `ctx` below is backend/training.py's TrainingContext (not imported: training imports this module)
TrainingContext = Any

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adclick"  # the manifest entry of a version folder (as in weights/manifest.json)
CHECKPOINT_FILE = "model.pt"  # model/seg/versions.py's file name


class AdaptationStopped(RuntimeError):
    """The process began exiting during an adaptation (nothing was published or recorded)."""


_EXITING = threading.Event()
_ACTIVE = threading.Condition()
_COUNT = [0]  # adaptations running in this process


@contextmanager
def _running() -> Iterator[None]:
    with _ACTIVE:
        _COUNT[0] += 1
    try:
        yield
    finally:
        with _ACTIVE:
            _COUNT[0] -= 1
            _ACTIVE.notify_all()


@atexit.register
def _stop_adaptations(timeout_s: float = 30.0) -> None:
    """At exit, a running adaptation stops at its next step and is waited for: a daemon thread still inside torch
    when the interpreter finalizes aborts the process (as backend/serving.py's bank builds)."""
    _EXITING.set()
    with _ACTIVE:
        _ACTIVE.wait_for(lambda: _COUNT[0] == 0, timeout_s)


def adaptation_minutes(ctx: TrainingContext, project: str) -> float:
    extra = ctx.projects.extra_params(project) or {}
    try:
        return max(0.0, float(extra.get("adapt_minutes", ctx.settings.adapt_minutes)))
    except (TypeError, ValueError):
        logger.warning("project %s: extra_params adapt_minutes %r is not a number; using %s", project,
                       extra.get("adapt_minutes"), ctx.settings.adapt_minutes)
        return ctx.settings.adapt_minutes


def publish_version(store, net, base_entry: dict, meta: dict):
    """Publish `net` as the project's next interactive version in `store` (a VersionStore): model.pt and a
    manifest.json naming the version, written whole in a temporary folder then renamed; returns its VersionInfo."""
    from model.interactive.adapt import checkpoint_of, manifest_entry
    from weights import write_entry

    def manifest(folder: Path, name: str) -> None:
        write_entry(folder, WEIGHTS_NAME, manifest_entry(base_entry, CHECKPOINT_FILE, name,
                                                         {k: meta.get(k) for k in ("bank_key", "trigger")}))

    return store.commit(checkpoint_of(net), {**meta, "base_sha256": base_entry.get("sha256")},
                        write_extra=manifest)


def labelled_images(tasks: list[dict], cfg, ctx: TrainingContext, project: str) -> list:
    """The project's accepted defect annotations as adaptation examples: per task its newest annotation's brush
    masks (one union) or, without a mask, each rectangle; images through the service's loader."""
    import numpy as np

    from backend.errors import BackendError
    from backend.seg_labels import task_labels, to_example
    from model.interactive.adapt import Labelled

    out = []
    for tl in (task_labels(t, cfg) for t in tasks):
        if tl is None or not tl.has_defect_location:
            continue
        try:
            image = ctx.image_loader.load(tl.image_ref, tl.task_id).array
        except BackendError as exc:
            logger.warning("project %s: image of task %s skipped for adaptation: %s", project, tl.task_id,
                           exc.message)
            continue
        example = to_example(tl, None, image)  # masks and boxes at the image's size
        masks = [m for m in example.masks.values() if m.any()]
        if masks:
            out.append(Labelled(image, np.logical_or.reduce(masks), f"task-{tl.task_id}"))
        else:
            out += [Labelled(image, None, f"task-{tl.task_id}", box) for _, box in example.boxes]
    return out


def adapt_interactive(project: str, ctx: TrainingContext, labelled: list | None = None, trigger: str = "",
                      bank=None, images: list | None = None,
                      progress: Callable[[float, str], None] | None = None) -> dict:
    """Adapt the project's interactive network (references, plus `labelled` when given); returns figures for
    the job's result. Never raises for "nothing to adapt": the reason is recorded and returned."""
    settings, engine = ctx.settings, ctx.engine
    progress = progress or ctx.progress
    started = time.time()
    record: dict[str, Any] = {"trigger": trigger, "started": started, "labelled": len(labelled or [])}
    if not settings.adapt:
        return {"interactive_adaptation": "off (ADCLICK_ADAPT=off)"}
    if ctx.interactive is None:
        return {"interactive_adaptation": "the served click predictor has no learned network to adapt"}
    minutes = adaptation_minutes(ctx, project)
    if minutes <= 0:
        return {"interactive_adaptation": "off for this project (adapt_minutes 0)"}
    from model.engine.residuals import content_hash
    from model.interactive.adapt import STOPPED, AdaptConfig, adapt_network
    from model.interactive.learned import predictor_for, shipped_network

    if bank is None or images is None:
        images = screen_references(ctx.projects.reference_images(project, settings.max_reference_images),
                                   settings.max_image_pixels)
        bank = engine.build_bank(images)
    record["bank_key"] = str(bank.key)
    store = ctx.projects.interactive_store(project, keep=settings.adapt_keep)
    served = store.latest(refresh=True)
    try:
        base, entry = shipped_network(engine, ctx.interactive.weights_dir)
        incumbent = None
        if served is not None:
            try:
                incumbent = shipped_network(engine, served.path)[0]  # checked and cached as serving loads it
            except Exception as exc:  # noqa: BLE001 - a damaged served version is not served either (serving.py)
                logger.warning("project %s: served version %s cannot be loaded (%s); compared with the shipped "
                               "network only", project, served.name, exc)
        config = ctx.interactive
        with _running():
            result = adapt_network(
                base, engine, bank, [(content_hash(p), p) for p in images],
                lambda net: predictor_for(engine, bank, net, config, chain=True), labelled or [],
                AdaptConfig(minutes=minutes), incumbent, progress, _EXITING.is_set,
            )
        if result.reason == STOPPED:  # no record: the next process adapts for this bank again
            raise AdaptationStopped("the adaptation stopped: the process is exiting")
    except AdaptationStopped:
        raise
    except Exception as exc:
        record.update(status="failed", reason=hide_paths(f"{type(exc).__name__}: {exc}")[:500],
                      finished=time.time())
        ctx.projects.set_adaptation_info(project, record)
        raise
    record.update(reason=result.reason, figures=result.figures, finished=time.time(),
                  base_score=result.base_score, score=result.score, incumbent_score=result.incumbent_score)
    if result.better:
        meta = {"project": project, "trigger": trigger, "bank_key": str(bank.key), "reason": result.reason,
                "figures": result.figures}
        info = publish_version(store, result.net, entry, meta)
        record.update(status="published", version=info.name)
        logger.info("project %s: interactive version %s published (%s)", project, info.name, result.reason)
    else:
        record.update(status="kept", version=served.name if served is not None else None)
        logger.info("project %s: interactive network not replaced: %s", project, result.reason)
    ctx.projects.set_adaptation_info(project, record)
    return {"interactive_adaptation": record["status"], "interactive_version": record.get("version"),
            "interactive_reason": result.reason, "interactive_score": result.score,
            "interactive_base_score": result.base_score,
            "interactive_adapt_seconds": result.figures.get("seconds")}


class AdaptationHook:
    """Called by the serving process when a reference bank is complete: queues an ADAPT_INTERACTIVE job for each
    project using it that was not adapted for this bank yet (nor is being trained now)."""

    def __init__(self, settings, projects, jobs, model):
        self.settings, self.projects, self.jobs, self.model = settings, projects, jobs, model

    def __call__(self, bank_key: str, projects: list[str]) -> None:
        if not self.settings.adapt or not self.model.loaded or self.model.choice.kind != "adclick":
            return
        for project in projects:
            try:
                extra = self.projects.extra_params(project) or {}
                if float(extra.get("adapt_minutes", self.settings.adapt_minutes)) <= 0:
                    continue
                info = self.projects.adaptation_info(project) or {}
                if info.get("bank_key") == bank_key:
                    continue
                state = self.jobs.snapshot(project)
                if state.get("status") in ("running", "queued"):
                    continue
                logger.info("project %s: reference bank %s complete; adapting its interactive network in the "
                            "background", project, bank_key[:8])
                self.jobs.submit(project, ADAPT)
            except Exception:  # best effort: a bank must never fail to serve because of this
                logger.exception("project %s: could not queue the adaptation of its interactive network", project)
