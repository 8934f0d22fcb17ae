"""What a training job does: `fit(project, event, ctx) -> {"model_version", ...figures}` (upstream name).

Zero-training mode (the residual engine needs no weights): read the project's annotated tasks from Label
Studio with the SDK (paginated), keep the images whose verdict is OK (or, in a config without a verdict
Choices tag, whose annotation holds no brush region) as the project's reference images under
MODEL_DIR/projects/<id>/references/, build the project's reference bank, and publish a new model_version for
it (references.json).

Learning loop: when at least one annotation locates a defect (a brush mask or a rectangle), ADClick-Seg is
trained on the project's labels (backend/seg_labels.py: newest annotation per task, masks per label, boxes,
verdicts; images through the service's loader, residuals against the new bank) and published atomically as
`adclick-seg-v<N>` (model/seg/train.py, model/seg/versions.py); that version then serves batch predictions.
Knobs (Settings, from the SEG_* environment variables in docs/SETTINGS.md; per-project `extra_params` override
them): seg_keep_versions (3), seg_fit_steps (60), seg_holdout (0.2), seg_max_ok_images (20).

`TrainingService` is what runs a fit, in a web process (backend/jobs.py's thread) or an RQ worker
(backend/worker.py): settings, the project store, the image loader, the model (backend.serving.ModelLoader: the
engine and the interactive version a references-only fit derives its version from), the Label Studio client
factory and the model-card title sync. It holds no image cache, no click sessions and starts no warm-up."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backend import ls_format
from backend.adaptation import ADAPT, adapt_interactive, labelled_images
from backend.banks import screen_references
from backend.errors import BackendError, LabelConfigError, NotReady
from backend.images import ImageLoader
from backend.locks import ProjectLock
from backend.projects import ProjectStore, label_studio_id
from backend.seg_labels import task_labels, to_example
from backend.serving import ModelLoader, ProjectVersions
from backend.settings import Settings, interactive_config
from model.atomic import write_image_atomic

if TYPE_CHECKING:
    from model.types import Engine, ReferenceSet

logger = logging.getLogger(__name__)


@dataclass
class TrainingContext:
    settings: Settings
    progress: Callable[[float, str], None]
    client_factory: Callable[[], Any]  # -> label_studio_sdk.client.LabelStudio
    image_loader: Any  # backend.images.ImageLoader
    engine: Engine
    projects: ProjectStore
    base_version: str = (
        ""  # the interactive model's version (a references-only fit derives its version from it)
    )
    interactive: Any = None  # InteractiveConfig of the served learned network; None: nothing to adapt


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
    config = getattr(client.projects.get(id=label_studio_id(project)), "label_config", None)
    if not config:
        raise LabelConfigError(f"project {project} has no label config")
    return config


def annotated_tasks(client: Any, project: str) -> Iterable[dict]:
    """Every task of the project that has an annotation (the SDK pager walks all pages)."""
    for task in client.tasks.list(project=label_studio_id(project), fields="all", only_annotated=True, page_size=100):
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
                write_image_atomic(folder / name, ctx.image_loader.load(ref, task.get("id")).array)
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
    return {
        "annotated_tasks": len(tasks),
        "ok_tasks": len(normal),
        "references_added_from_tasks": len(wanted),
        "references_removed": removed,
        "download_failures": failed[:20],
    }


_TEXT: dict[str, Any] = {}
_TEXT_LOCK = threading.Lock()


def _seg_knob(project: str, ctx: TrainingContext, name: str) -> float:
    """An ADClick-Seg knob: the project's extra_params override the Settings field of the same name."""
    settings = ctx.settings
    defaults = {"seg_keep_versions": settings.seg_keep_versions, "seg_fit_steps": settings.seg_fit_steps,
                "seg_holdout": settings.seg_holdout, "seg_max_ok_images": settings.seg_max_ok_images}
    extra = ctx.projects.extra_params(project) or {}
    return float(extra.get(name, defaults[name]))


def text_encoder() -> Any:
    """The prompt encoder (MiniLM from its wheel), loaded once per process."""
    from model.modeling.text import CachedTextEncoder, TextConfig, build_text_encoder

    with _TEXT_LOCK:
        if "enc" not in _TEXT:
            _TEXT["enc"] = CachedTextEncoder(build_text_encoder(TextConfig()))
        return _TEXT["enc"]


def seg_examples(project: str, tasks: list[dict], cfg: ls_format.LabelConfig, bank: ReferenceSet,
                 ctx: TrainingContext) -> tuple[list, dict]:
    """Residual examples of the labelled tasks (defects first, then at most seg_max_ok_images OK images)."""
    labelled = [tl for tl in (task_labels(t, cfg) for t in tasks) if tl is not None]
    figures = {"seg_labelled_tasks": len(labelled),
               "seg_located_defects": sum(tl.has_defect_location for tl in labelled)}
    if not figures["seg_located_defects"]:
        return [], figures
    defects = [tl for tl in labelled if tl.verdict is not False]
    ok = [tl for tl in labelled if tl.verdict is False]
    ok = ok[len(ok) - int(_seg_knob(project, ctx, "seg_max_ok_images")):] if ok else []
    chosen, examples, failed = defects + ok, [], 0
    for i, tl in enumerate(chosen):
        try:
            image = ctx.image_loader.load(tl.image_ref, tl.task_id).array
        except BackendError as exc:
            failed += 1
            logger.warning("project %s: image of task %s skipped: %s", project, tl.task_id, exc.message)
            continue
        state = ctx.engine.compute(image, bank)
        examples.append(to_example(tl, state.residual, image, state.features))
        ctx.progress(0.7 + 0.1 * (i + 1) / len(chosen), f"residuals of labelled images {i + 1}/{len(chosen)}")
    figures.update(seg_examples=len(examples), seg_download_failures=failed)
    return examples, figures


def train_seg(project: str, tasks: list[dict], cfg: ls_format.LabelConfig, bank: ReferenceSet,
              ctx: TrainingContext, event: dict) -> dict | None:
    """Train and publish a new ADClick-Seg version; None when no annotation locates a defect yet."""
    from model.seg.fit import FitConfig
    from model.seg.train import SegTrainConfig, prompt_matrix, train_version
    examples, figures = seg_examples(project, tasks, cfg, bank, ctx)
    if not any(e.masks or e.boxes for e in examples):
        logger.info("project %s: no located defect label yet, ADClick-Seg not trained", project)
        return None
    labels = list(cfg.brush_labels)
    obj = str((ctx.projects.extra_params(project) or {}).get("object") or "")
    prompts = prompt_matrix(text_encoder(), labels, obj)
    fit_cfg = FitConfig(steps=int(_seg_knob(project, ctx, "seg_fit_steps")))
    train_cfg = SegTrainConfig(fit=fit_cfg, holdout=_seg_knob(project, ctx, "seg_holdout"))
    store = ctx.projects.version_store(project, keep=int(_seg_knob(project, ctx, "seg_keep_versions")))
    info, seg = train_version(
        examples, labels, prompts, store, train_cfg,
        progress=lambda f, m: ctx.progress(0.8 + 0.08 * f, m),
        meta={"project": project, "trigger": event.get("action"), "bank_key": str(bank.key),
              "engine": ctx.engine.config_hash(), "object": obj},
    )
    return {"model_version": info.name, **figures, "seg_metrics": seg["metrics"],
            "seg_thresholds": seg["thresholds"], "seg_train_images": seg["n_train"],
            "seg_heldout_images": seg["n_heldout"], "seg_evaluated_on": seg["evaluated_on"],
            "seg_fit_seconds": seg["fit_seconds"], "seg_report": str(info.path / "report.png")}


def fit(project: str, event: dict, ctx: TrainingContext) -> dict:
    t0 = time.monotonic()
    ctx.progress(0.02, "reading the project's annotations from Label Studio")
    client = ctx.client_factory()
    cfg = ls_format.parse_label_config(_label_config(project, ctx, client))
    tasks = list(annotated_tasks(client, project))
    figures = sync_references(project, tasks, cfg, ctx)
    ctx.progress(0.65, "building the reference bank")
    images = ctx.projects.reference_images(project, ctx.settings.max_reference_images)
    images = screen_references(images, ctx.settings.max_image_pixels)  # as the service does: same bank key
    bank = ctx.engine.build_bank(images)
    own = ctx.projects.references_dir(project)
    figures.update(references_from_tasks_in_bank=sum(p.parent == own for p in images))
    base = ctx.base_version or f"residual-click-{ctx.engine.config_hash()}"
    info = {
        "model_version": f"{base}-refs-{str(bank.key)[:8]}",
        "bank_key": str(bank.key),
        "reference_images": len(images),
        "trigger": event.get("action"),
        "created": time.time(),
    }
    ctx.projects.set_references_info(project, info)
    figures.update(reference_images=len(images))
    version = info["model_version"]
    seg = train_seg(project, tasks, cfg, bank, ctx, event)
    if seg is not None:
        version = seg.pop("model_version")
        figures.update(seg)
    if ctx.interactive is not None and ctx.settings.adapt:
        ctx.progress(0.88, "adapting the interactive network to the project's references and annotations")
        labelled = labelled_images(tasks, cfg, ctx, project)
        figures.update(adapt_interactive(project, ctx, labelled, str(event.get("action") or ""), bank, images,
                                         progress=lambda f, m: ctx.progress(0.88 + 0.11 * f, f"adaptation: {m}")))
    figures.update(fit_seconds=round(time.monotonic() - t0, 2))
    ctx.progress(1.0, "done")
    logger.info("project %s: %s with %d reference images", project, version, len(images))
    return {"model_version": version, **figures}


def adapt_only(project: str, event: dict, ctx: TrainingContext) -> dict:
    """An ADAPT_INTERACTIVE job: the interactive network adapted to the project's references (no labels read);
    the project's model_version stays what it was."""
    figures = adapt_interactive(project, ctx, None, ADAPT)
    ctx.progress(1.0, "done")
    return figures


def lower_priority(nice: int) -> int:
    """Lower the calling thread's CPU priority by `nice` (Linux: per thread; the torch worker threads it starts
    inherit it), so a training job yields the cores to requests. Returns the thread's nice value after."""
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if nice > 0 and current < min(19, nice):
            os.setpriority(os.PRIO_PROCESS, tid, min(19, nice))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted: train at normal priority
        logger.info("training priority unchanged: %s", exc)
        return 0


class TrainingService:
    """One fit of a project (`run_training`, the jobs' runner) and the model card's title in Label Studio."""

    def __init__(self, settings: Settings, projects: ProjectStore, model: ModelLoader, versions: ProjectVersions,
                 loader: ImageLoader, client_factory: Callable[[], Any] | None = None):
        self.settings = settings
        self.projects = projects
        self.model = model
        self.versions = versions
        self.loader = loader
        self.client_factory = client_factory or self.default_client

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainingService:
        """What an RQ worker builds: only what a fit needs."""
        projects = ProjectStore(settings.model_dir, settings.normal_dir)
        model = ModelLoader(settings)
        return cls(settings, projects, model, ProjectVersions(settings, projects, model), ImageLoader(settings))

    def default_client(self) -> Any:
        from label_studio_sdk.client import LabelStudio

        if not self.settings.label_studio_url or not self.settings.label_studio_api_key:
            raise NotReady(
                "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are needed to read the project's labels"
            )
        # no redirects: the SDK would follow a 307 of /api/token/refresh/ and POST the personal access token to
        # wherever it points (the Label Studio routes it calls answer without redirecting)
        return LabelStudio(
            base_url=self.settings.label_studio_url,
            api_key=self.settings.label_studio_api_key,
            follow_redirects=False,
        )

    def _syncs_card_title(self) -> bool:
        return bool(self.settings.sync_card_title and self.settings.label_studio_url
                    and self.settings.label_studio_api_key)

    def sync_card_title(self, project: str, version: str) -> None:
        """Rename this backend's model card in Label Studio to `version`, in the background (backend/ls_card.py);
        only when LS_SYNC_CARD_TITLE is on and Label Studio's address and key are configured."""
        from backend import ls_card

        if self._syncs_card_title():
            ls_card.sync_in_background(self.client_factory, project, version,
                                       tuple(self.versions.versions(project)))

    def context(self, progress: Callable[[float, str], None]) -> TrainingContext:
        """What a fit works with (the model loaded here)."""
        return TrainingContext(
            settings=self.settings,
            progress=progress,
            client_factory=self.client_factory,
            image_loader=self.loader,
            engine=self.model.engine,
            projects=self.projects,
            base_version=self.model.choice.version,
            interactive=interactive_config(self.settings) if self.model.choice.kind == "adclick" else None,
        )

    def run_training(self, project: str, event: dict, progress: Callable[[float, str], None]) -> dict:
        """One fit of `project` (`fit`) inside its cross-process ProjectLock. Serving processes notice the new
        references / version by the project's signature and swap the predictor when rebuilt."""
        lower_priority(self.settings.train_nice)
        ctx = self.context(progress)
        with ProjectLock(self.settings.model_dir, project, "train"):
            if event.get("action") == ADAPT:
                result = {"model_version": self.versions.project_version(project),
                          **adapt_only(project, event, ctx)}
            else:
                result = fit(project, event, ctx)
        if result.get("model_version") and self._syncs_card_title():
            from backend import ls_card

            # in the job itself: an RQ work-horse exits when the job returns, a daemon thread would die with it
            try:
                ls_card.sync_card_title(self.client_factory(), project, str(result["model_version"]),
                                        tuple(self.versions.versions(project)), attempts=1)
            except Exception as exc:  # noqa: BLE001 - the version is published; the card title is a convenience
                logger.warning("project %s: could not rename the model card: %s", project, str(exc)[:300])
        return result
