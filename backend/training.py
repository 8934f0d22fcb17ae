"""What a training job does: `fit(project, event, ctx) -> {"model_version", ...figures}` (upstream name).

Zero-training mode (the residual engine needs no weights): read the project's annotated tasks from Label
Studio with the SDK (paginated), keep the images whose verdict is OK (or, in a config without a verdict
Choices tag, whose annotation holds no brush region) as the project's reference images under
MODEL_DIR/projects/<id>/references/, build the project's reference bank, and publish a new model_version for
it (references.json). The ADClick-Seg training of the learning loop plugs in here and publishes `adclick-
seg-v<N>` through model/versions.py."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from backend import ls_format
from backend.errors import BackendError, LabelConfigError
from backend.projects import ProjectStore
from backend.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class TrainingContext:
    settings: Settings
    progress: Callable[[float, str], None]
    client_factory: Callable[[], Any]  # -> label_studio_sdk.client.LabelStudio
    image_loader: Any  # backend.images.ImageLoader
    engine: Any  # model.residuals.ResidualEngine
    projects: ProjectStore
    base_version: str = (
        ""  # the interactive model's version (a references-only fit derives its version from it)
    )


def _as_dict(obj: Any) -> dict:
    if isinstance(obj, dict):
        return obj
    for method in ("model_dump", "dict"):
        if hasattr(obj, method):
            return getattr(obj, method)()
    raise TypeError(f"cannot read a Label Studio object of type {type(obj).__name__}")


def _label_config(project: str, ctx: TrainingContext, client: Any) -> str:
    saved = ctx.projects.label_config(project)
    if saved:
        return saved
    config = getattr(client.projects.get(id=int(project)), "label_config", None)
    if not config:
        raise LabelConfigError(f"project {project} has no label config")
    return config


def annotated_tasks(client: Any, project: str) -> Iterable[dict]:
    """Every task of the project that has an annotation (the SDK pager walks all pages)."""
    for task in client.tasks.list(project=int(project), fields="all", only_annotated=True, page_size=100):
        task = _as_dict(task)
        if task.get("annotations"):
            yield task


def is_normal(task: dict, cfg: ls_format.LabelConfig) -> bool:
    """The latest non-cancelled annotation says OK (verdict tag), or has no brush region (no verdict tag)."""
    annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not annotations:
        return False
    latest = max(annotations, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
    result = latest.get("result") or []
    if cfg.choices_name:
        choices = [
            c
            for r in result
            if r.get("from_name") == cfg.choices_name
            for c in (r.get("value") or {}).get("choices", [])
        ]
        return choices == [cfg.ok_choice]
    return not any(r.get("type") == "brushlabels" for r in result)


def _write_png(path: Path, image: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sync_references(
    project: str, tasks: list[dict], cfg: ls_format.LabelConfig, ctx: TrainingContext
) -> dict:
    """Make the project's references folder hold exactly the OK tasks' images; returns counts."""
    folder = ctx.projects.references_dir(project)
    folder.mkdir(parents=True, exist_ok=True)
    wanted, failed = set(), []
    normal = [t for t in tasks if is_normal(t, cfg)]
    for i, task in enumerate(normal):
        ref = (task.get("data") or {}).get(cfg.image_key)
        name = f"task-{task.get('id')}-{hashlib.sha1(str(ref).encode()).hexdigest()[:8]}.png"
        wanted.add(name)
        if not (folder / name).exists():
            try:
                _write_png(folder / name, ctx.image_loader.load(ref, task.get("id")).array)
            except BackendError as exc:
                wanted.discard(name)
                failed.append({"task": task.get("id"), "error": exc.message})
                logger.warning(
                    "project %s: reference image of task %s skipped: %s", project, task.get("id"), exc.message
                )
        ctx.progress(0.1 + 0.5 * (i + 1) / max(len(normal), 1), f"reference images {i + 1}/{len(normal)}")
    removed = 0
    for stale in folder.glob("task-*.png"):
        if stale.name not in wanted:
            stale.unlink(missing_ok=True)
            removed += 1
    os.utime(folder)  # the service notices the change by the folder's mtime
    return {
        "annotated_tasks": len(tasks),
        "ok_tasks": len(normal),
        "references_added_from_tasks": len(wanted),
        "references_removed": removed,
        "download_failures": failed[:20],
    }


def fit(project: str, event: dict, ctx: TrainingContext) -> dict:
    t0 = time.monotonic()
    ctx.progress(0.02, "reading the project's annotations from Label Studio")
    client = ctx.client_factory()
    cfg = ls_format.parse_label_config(_label_config(project, ctx, client))
    tasks = list(annotated_tasks(client, project))
    figures = sync_references(project, tasks, cfg, ctx)
    ctx.progress(0.65, "building the reference bank")
    images = ctx.projects.reference_images(project, ctx.settings.max_reference_images)
    bank = ctx.engine.build_bank(images)
    base = ctx.base_version or f"residual-click-{ctx.engine.config_hash()}"
    info = {
        "model_version": f"{base}-refs-{str(bank.key)[:8]}",
        "bank_key": str(bank.key),
        "reference_images": len(images),
        "trigger": event.get("action"),
        "created": time.time(),
    }
    ctx.projects.set_references_info(project, info)
    figures.update(reference_images=len(images), fit_seconds=round(time.monotonic() - t0, 2))
    ctx.progress(1.0, "done")
    logger.info("project %s: %s with %d reference images", project, info["model_version"], len(images))
    return {"model_version": info["model_version"], **figures}
