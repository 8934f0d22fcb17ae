"""/predict: interactive (one task + a context of smart regions -> one brush mask) and batch (context null ->
one prediction per task: anomalous regions, the verdict choice, the image anomaly score). Mirrors the upstream
`predict(tasks, context)` of label-studio-ml-backend.

An interactive request is checked whole (the task's image reference, the context's clicks, box and label)
before its image is downloaded or any model work starts: a malformed context costs no computation."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from backend import ls_format
from backend.errors import BackendError, BadRequest
from backend.ls_format import LabelConfig
from backend.services import Services
from backend.serving import ProjectModel
from model.types import AnomalyResult, ImageState

if TYPE_CHECKING:
    from model.engine.residuals import ResidualState

logger = logging.getLogger(__name__)

MAX_REGIONS = 20  # batch: at most this many brush regions per task (largest first)


def _task_image_ref(task: Any, cfg: LabelConfig) -> tuple[str, int | None]:
    if not isinstance(task, dict):
        raise BadRequest("each task must be an object")
    data = task.get("data")
    if not isinstance(data, dict):
        raise BadRequest(f"task {task.get('id')} has no data object")
    ref = data.get(cfg.image_key)
    if not isinstance(ref, str) or not ref:
        raise BadRequest(f"task {task.get('id')} has no image under data.{cfg.image_key}")
    task_id = task.get("id")
    return ref, task_id if isinstance(task_id, int) else None


def predict(service: Services, project: str, tasks: list, cfg: LabelConfig, context: Any) -> list[dict]:
    """`context` None (batch, Retrieve Predictions / prelabeling) -> one prediction per task; an object
    (a smart tool's request) -> one prediction for the first task."""
    if not tasks:
        raise BadRequest("tasks is empty: nothing to predict")
    if context is not None:
        return [predict_interactive(service, project, tasks[0], cfg, context)]
    predictions = []
    for task in tasks:
        try:
            predictions.append(predict_batch_one(service, project, task, cfg))
        except BackendError as exc:  # name the task: Label Studio may send many in one request
            task_id = task.get("id") if isinstance(task, dict) else None
            if len(tasks) == 1 or exc.message.startswith("task "):
                raise
            raise type(exc)(f"task {task_id}: {exc.message}") from exc
    return predictions


def predict_interactive(
    service: Services, project: str, task: Any, cfg: LabelConfig, context: Any
) -> dict:
    # everything in the request is checked before the image is downloaded or any model work starts
    ref, task_id = _task_image_ref(task, cfg)
    extra = service.projects.extra_params(project)
    fallback = draft_text(task, cfg) or str(extra.get("prompt") or "")
    request = ls_format.parse_context(
        context, cfg, extra_prompt=fallback, max_clicks=service.settings.max_clicks
    )
    if request is None:  # the editor's context after a submit: nothing to segment, nothing to fail
        return ls_format.prediction([], 0.0, service.versions.project_version(project))
    model, cached = service.serving.image_state(project, ref, task_id)
    clicks, box = request.clicks_px(cached.width, cached.height), request.box_px(cached.width, cached.height)
    # the clicks replayed one by one with the previous mask, as the network is trained (cached per prefix)
    out = cached.history.predict(model.predictor, cached.state, clicks, box, request.prompt)
    score = float(np.clip(out.score, 0.0, 1.0))
    region = ls_format.brush_region(np.asarray(out.mask, dtype=bool), request.label, cfg, score)
    # the project's adapted interactive network, when it made this mask, names it (backend/adaptation.py)
    return ls_format.prediction([region], score, model.adapted or service.versions.project_version(project))


def draft_text(task: Any, cfg: LabelConfig) -> str:
    """The TextArea text of the task's newest saved draft. Label Studio 1.23.2 does not put the TextArea
    into a smart request's context, but it sends the task with its drafts, and the editor saves a draft of
    what the annotator typed."""
    drafts = task.get("drafts") if isinstance(task, dict) else None
    if not isinstance(drafts, list) or not cfg.textarea_names:
        return ""
    dated = [d for d in drafts if isinstance(d, dict) and isinstance(d.get("result"), list)]
    dated.sort(key=lambda d: (str(d.get("updated_at") or d.get("created_at") or ""), str(d.get("id", ""))))
    for draft in reversed(dated):
        texts = [t for region in draft["result"] if isinstance(region, dict)
                 and region.get("type") == "textarea" and region.get("from_name") in cfg.textarea_names
                 and isinstance(region.get("value"), dict) for t in ls_format.region_texts(region["value"])]
        if texts:
            return ", ".join(texts)[:200]
    return ""


def _residual_state(state: ImageState) -> ResidualState | None:
    """The engine's ResidualState of a predictor's per-image state: the click mode's state is one, the learned
    predictors' AdClickState carries one; None for other predictors (they have no trained detector)."""
    from model.engine.residuals import ResidualState
    from model.interactive.learned import AdClickState

    if isinstance(state, ResidualState):
        return state
    if isinstance(state, AdClickState):
        return state.residual
    return None


def _detect(service: Services, project: str, model: ProjectModel, state: ImageState, cfg: LabelConfig
            ) -> tuple[AnomalyResult, str]:
    """`model` is the one the state was computed with (a growing bank may have been swapped since)."""
    detector = service.detection.detector(project)
    residual = _residual_state(state) if detector is not None else None
    if detector is not None and residual is not None:
        return detector.detect(residual, list(cfg.brush_labels)), detector.version
    return model.predictor.detect(state, list(cfg.brush_labels)), service.versions.project_version(project)


def _component_label(component: np.ndarray, result: AnomalyResult, cfg: LabelConfig) -> str:
    """The BrushLabels value whose mask covers most of the component (ties: higher label score). Only labels
    the trained ADClick-Seg version learned have masks; with none (no trained version yet, or one trained only
    on OK/defective verdicts) the first BrushLabels value of the label config names every region (README:
    "Which label do pre-annotations get?")."""
    best, best_key = cfg.brush_labels[0], (-1, -np.inf)
    for label in cfg.brush_labels:
        mask = result.masks.get(label)
        if mask is None:
            continue
        key = (int(np.count_nonzero(mask[component])), result.label_scores.get(label, -np.inf))
        if key > best_key:
            best, best_key = label, key
    return best


def anomaly_regions(result: AnomalyResult, cfg: LabelConfig, shape: tuple[int, int]) -> list[dict]:
    """One brush region per connected anomalous component, labelled by the label masks."""
    masks = result.masks
    union = masks.get("")
    if union is None:
        union = np.zeros(shape, dtype=bool)
        for mask in masks.values():
            union |= np.asarray(mask, dtype=bool)
    labelled, count = ndimage.label(np.asarray(union, dtype=bool))
    if count == 0:
        return []
    sizes = ndimage.sum_labels(np.ones(shape), labelled, index=np.arange(1, count + 1))
    regions = []
    for idx in np.argsort(-sizes)[:MAX_REGIONS]:
        component = labelled == idx + 1
        peak = float(result.anomaly_map[component].max()) if result.anomaly_map is not None else result.score
        label = _component_label(component, result, cfg)
        score = result.label_scores.get(label, peak)
        regions.append(ls_format.brush_region(component, label, cfg, score))
    return regions


def predict_batch_one(service: Services, project: str, task: Any, cfg: LabelConfig) -> dict:
    ref, task_id = _task_image_ref(task, cfg)
    model, cached = service.serving.image_state(project, ref, task_id)
    result, version = _detect(service, project, model, cached.state, cfg)
    regions = anomaly_regions(result, cfg, (cached.height, cached.width))
    verdict = (cfg.anomalous_choice if regions else cfg.ok_choice) if cfg.choices_name else None
    if verdict is not None:  # a Choices tag without a matching choice gets no verdict
        regions.append(ls_format.choice_region(verdict, cfg, result.score))
    return ls_format.prediction(regions, result.score, version)
