"""ModelService: everything behind the routes. The model is built lazily, once per process, behind a lock;
per-project predictors share it; per-image work is cached by (image key, model version, bank) in a byte-budget
LRU; training runs in backend/jobs.py, never inside a request.

The interactive predictor is chosen in ONE place, `choose_predictor` (learned ADClick when its weights are
bundled and ADCLICK_PREDICTOR allows it, else the zero-training residual click mode)."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from backend.cache import ByteLRU
from backend.errors import NotReady
from backend.images import ImageLoader
from backend.jobs import JobManager
from backend.locks import ProjectLock
from backend.projects import ProjectStore, is_project_id, list_images
from backend.settings import Settings
from model.clicks import ClickHistory
from model.types import Predictor

logger = logging.getLogger(__name__)

REQUEST_SLOT_WAIT_S = 0.25  # longest wait of a request for a free download slot, then 503 (docs/SETTINGS.md)


@dataclass
class PredictorChoice:
    """Which interactive predictor this process serves: `kind`, a cheap `version` (no weights loaded) and
    `build(engine, bank) -> Predictor` (one predictor per reference bank; weights shared via the engine)."""

    kind: str
    version: str
    build: Callable[[Any, Any], Predictor]
    reason: str = ""  # why this predictor (shown in /health)


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


def choose_predictor(settings: Settings, engine: Any) -> PredictorChoice:
    """The served interactive predictor; unless ADCLICK_REFINE=off its maps get the full-resolution boundary
    refinement of model/refine.py (guided filter by default, or GrabCut)."""
    choice = _choose_base(settings, engine)
    method = getattr(settings, "refine", "off")
    if method == "off":
        return choice
    from model.refine import RefineConfig, RefinedPredictor

    cfg, base_build = RefineConfig(method=method), choice.build

    def build(eng: Any, bank: Any) -> Predictor:
        return RefinedPredictor(base_build(eng, bank), cfg)

    suffix = "" if method == "guided" else f"-{method}"
    note = f"{method} boundary refinement on"
    reason = getattr(choice, "reason", "")
    return PredictorChoice(choice.kind, f"{choice.version}-refine{suffix}", build,
                           f"{reason}; {note}" if reason else note)


def _choose_base(settings: Settings, engine: Any) -> PredictorChoice:
    reason = "zero-training click mode: ADCLICK_PREDICTOR=residual"
    if settings.predictor in ("auto", "learned"):
        try:
            from model.predictor import check_weights, load_interactive_predictor
        except ImportError:
            if settings.predictor == "learned":
                raise NotReady("ADCLICK_PREDICTOR=learned but model.predictor is not available") from None
            reason = "zero-training click mode: the learned predictor (model.predictor) is not available"
        else:
            choice = load_interactive_predictor(engine=engine, settings=settings)
            if choice is not None:
                return choice
            if settings.predictor == "learned":
                raise NotReady("ADCLICK_PREDICTOR=learned but no learned ADClick weights are bundled")
            reason = f"zero-training click mode: {check_weights(engine, getattr(settings, 'weights_dir', None))[1]}"
    from model.clickmode import ResidualClickPredictor

    return PredictorChoice(
        "residual-click",
        f"residual-click-{engine.config_hash()}",
        lambda eng, bank: ResidualClickPredictor(eng, bank),
        reason,
    )


def build_engine(settings: Settings) -> Any:
    from model.features import BackboneConfig
    from model.residuals import ResidualConfig, ResidualEngine

    return ResidualEngine(
        BackboneConfig(device=settings.device), ResidualConfig(), cache_dir=settings.model_dir / "banks"
    )


@dataclass(frozen=True)
class CachedImage:
    """What the state cache keeps per (image, model version, bank): image size and predictor state."""

    height: int
    width: int
    state: Any
    history: ClickHistory = field(default_factory=ClickHistory, compare=False, repr=False)  # click prefixes

    @property
    def nbytes(self) -> int:
        return int(getattr(self.state, "nbytes", 0)) + self.history.max_nbytes((self.height, self.width)) + 64


@dataclass
class ProjectModel:
    signature: tuple
    bank: Any
    predictor: Predictor
    n_references: int


class ModelService:
    def __init__(
        self,
        settings: Settings,
        loader: Optional[ImageLoader] = None,
        engine_factory: Callable[[Settings], Any] = build_engine,
        predictor_chooser: Callable[[Settings, Any], PredictorChoice] = choose_predictor,
        client_factory: Optional[Callable[[], Any]] = None,
    ):
        self.settings = settings
        self.loader = loader or ImageLoader(settings)
        self.cache = ByteLRU(settings.state_cache_bytes)
        self.projects = ProjectStore(settings.model_dir, settings.normal_dir)
        from backend.queue import build_runner

        self.jobs = JobManager(
            settings.model_dir / "jobs" / "state.json",
            build_runner(settings.redis_url, self.run_training),
            settings.train_after_annotations,
            settings.train_debounce_s,
            max_requeues=settings.train_max_requeues,
            valid_project=is_project_id,
        )
        self._engine_factory = engine_factory
        self._chooser = predictor_chooser
        self._client_factory = client_factory or self._default_client
        self._lock = threading.Lock()
        self._engine: Any = None
        self._choice: Optional[PredictorChoice] = None
        self._project_locks: dict[str, threading.Lock] = {}
        self._models: dict[str, ProjectModel] = {}
        self._builds: dict[str, tuple[tuple, threading.Event]] = {}
        self._warmed_pid: Optional[int] = None
        self._env_refs: Optional[int] = None
        self._build_errors: dict[str, Exception] = {}
        self._compute = threading.BoundedSemaphore(max(1, settings.compute_concurrency))
        self._detectors: dict[tuple[str, str], Any] = {}
        self.loaded_at: Optional[float] = None
        self.load_seconds: Optional[float] = None

    # -- the model, once per process -------------------------------------------------------------------------
    def _ensure_loaded(self) -> tuple[Any, PredictorChoice]:
        with self._lock:
            if self._choice is None:
                t0 = time.monotonic()
                engine = self._engine_factory(self.settings)
                choice = self._chooser(self.settings, engine)
                self._engine, self._choice = engine, choice
                self.load_seconds = round(time.monotonic() - t0, 3)
                self.loaded_at = time.time()
                logger.info("model loaded: %s (%s) in %.2f s", choice.kind, choice.version, self.load_seconds)
            return self._engine, self._choice

    @property
    def engine(self) -> Any:
        return self._ensure_loaded()[0]

    @property
    def choice(self) -> PredictorChoice:
        return self._ensure_loaded()[1]

    @property
    def loaded(self) -> bool:
        return self._choice is not None

    def _project_lock(self, project: str) -> threading.Lock:
        with self._lock:
            return self._project_locks.setdefault(project, threading.Lock())

    # -- versions --------------------------------------------------------------------------------------------
    def trained_version(self, project: str) -> Optional[Any]:
        from model.versions import project_store

        return project_store(self.settings.model_dir, project).latest()

    def project_version(self, project: str) -> str:
        """The project's model_version, cheap (no model load): its latest trained ADClick-Seg version,
        else the version the last fit published for its references, else the interactive model's version."""
        trained = self.trained_version(project)
        if trained is not None:
            return trained.name
        refs = self.projects.references_info(project)
        return str(refs["model_version"]) if refs and refs.get("model_version") else self.choice.version

    def versions(self, project: Optional[str]) -> list[str]:
        """The interactive model's version and the published versions of `project` (of every project that
        called /setup when none is named: Label Studio's GET /versions names none)."""
        from model.versions import project_store

        names = [self.choice.version]
        for key in [project] if project else self.projects.known():
            refs = self.projects.references_info(key)
            names += [str(refs["model_version"])] if refs and refs.get("model_version") else []
            names += [v.name for v in project_store(self.settings.model_dir, key).list()]
        return list(dict.fromkeys(names))

    def reference_counts(self) -> dict:
        """Reference images: of ADCLICK_NORMAL_DIR (counted once per process: /health must stay fast) and of
        every project whose bank is loaded in this process."""
        if self._env_refs is None:
            folder = self.settings.normal_dir
            limit = self.settings.max_reference_images
            self._env_refs = len(list_images(Path(folder), limit)) if folder else 0
        with self._lock:
            projects = {p: m.n_references for p, m in self._models.items()}
        return {"normal_dir": self._env_refs, "projects": projects}

    # -- per-project predictors ------------------------------------------------------------------------------
    def _signature(self, project: str) -> tuple:
        folder = self.projects.references_dir(project)
        mtime = folder.stat().st_mtime if folder.exists() else 0.0
        info = self.projects.references_info(project) or {}
        return (
            self.choice.version,
            str(self.projects.reference_folders(project)),
            mtime,
            info.get("model_version"),
        )

    def model_for(self, project: str, wait_s: Optional[float] = None) -> ProjectModel:
        """The project's predictor over its reference bank, built in a background thread: a project with
        an older model keeps using it until the new one is ready; a project without one waits up to
        BANK_WAIT_S, then gets NotReady (503) naming the build, instead of a request that hangs."""
        self._ensure_loaded()
        signature = self._signature(project)
        current = self._models.get(project)
        if current is not None and current.signature == signature:
            return current
        done = self._start_build(project, signature)
        if current is not None:
            return current
        if not done.wait(self.settings.bank_wait_s if wait_s is None else wait_s):
            n = len(self.projects.reference_images(project, self.settings.max_reference_images))
            raise NotReady(
                f"project {project}: the reference bank of {n} images is still being built; "
                "retry in a few seconds"
            )
        with self._lock:
            error = self._build_errors.pop(project, None)
        if error is not None:
            raise error
        return self._models[project]

    def _start_build(self, project: str, signature: tuple) -> threading.Event:
        with self._lock:
            running = self._builds.get(project)
            if running is not None and running[0] == signature:
                return running[1]
            done = threading.Event()
            self._builds[project] = (signature, done)
        threading.Thread(
            target=self._build, args=(project, signature, done), name=f"bank-{project}", daemon=True
        ).start()
        return done

    def _build(self, project: str, signature: tuple, done: threading.Event) -> None:
        engine, choice = self._ensure_loaded()
        try:
            with self._project_lock(project):
                images = self.projects.reference_images(project, self.settings.max_reference_images)
                t0 = time.monotonic()
                bank = engine.build_bank(images)
                model = ProjectModel(signature, bank, choice.build(engine, bank), len(images))
            logger.info(
                "project %s: reference bank of %d images ready in %.1f s",
                project,
                len(images),
                time.monotonic() - t0,
            )
            with self._lock:
                self._models[project] = model
        except Exception as exc:  # handed to the waiting request, which maps it to a JSON error
            logger.exception("project %s: building the reference bank failed", project)
            with self._lock:
                self._build_errors[project] = exc
        finally:
            with self._lock:
                if self._builds.get(project, (None,))[0] == signature:
                    del self._builds[project]
            done.set()

    def warm_known_projects(self) -> None:
        """Once per process (after a fork too): warm every project that called /setup before, so the first
        click after a restart does not wait for the model and the reference bank."""
        with self._lock:
            if self._warmed_pid == os.getpid():
                return
            self._warmed_pid = os.getpid()
        for project in self.projects.known():
            self.warm(project)

    def warm(self, project: str) -> None:
        """Load the model and the project's bank in a background thread (called by /setup)."""

        def run() -> None:
            try:
                self.model_for(project)
            except Exception:  # warming is best effort; the next request reports the error properly
                logger.exception("warming project %s failed", project)

        threading.Thread(target=run, name=f"warm-{project}", daemon=True).start()

    def image_state(
        self, project: str, ref: str, task_id: Optional[int] = None
    ) -> tuple[ProjectModel, "CachedImage"]:
        """The per-image work for a task's image, from the cache when this (image, model, bank) was seen:
        then nothing is downloaded, decoded or recomputed."""
        model = self.model_for(project)
        source = self.loader.resolve(ref, task_id)
        key = (source.key, model.predictor.version, getattr(model.bank, "key", ""))

        def compute() -> CachedImage:
            # a request thread waits only briefly for a download slot (DOWNLOAD_CONCURRENCY): ordinary downloads
            # free one in milliseconds, while slow image hosts cannot hold every server thread (and /health)
            image = self.loader.load_source(source, slot_wait_s=REQUEST_SLOT_WAIT_S)
            with self._compute:  # bounded: 8 annotators must not run 8 backbone passes at once
                state = model.predictor.set_image(image.array)
            return CachedImage(image.height, image.width, state)

        return model, self.cache.get_or_set(key, compute)

    def detector(self, project: str) -> Optional[Any]:
        """The trained ADClick-Seg detector of the project's latest version, or None (use the predictor)."""
        trained = self.trained_version(project)
        if trained is None:
            return None
        key = (project, trained.name)
        with self._project_lock(project):
            if key not in self._detectors:
                from model.seg_predict import SegDetector
                from model.versions import project_store

                ckpt, info = project_store(self.settings.model_dir, project).load(trained.name)
                self._detectors = {k: v for k, v in self._detectors.items() if k[0] != project}
                self._detectors[key] = SegDetector(ckpt, info.name)
            return self._detectors[key]

    def _syncs_card_title(self) -> bool:
        return bool(self.settings.sync_card_title and self.settings.label_studio_url
                    and self.settings.label_studio_api_key)

    def sync_card_title(self, project: str, version: str) -> None:
        """Rename this backend's model card in Label Studio to `version`, in the background (backend/ls_card.py);
        only when LS_SYNC_CARD_TITLE is on and Label Studio's address and key are configured."""
        from backend import ls_card

        if self._syncs_card_title():
            ls_card.sync_in_background(self._client_factory, project, version, tuple(self.versions(project)))

    # -- training --------------------------------------------------------------------------------------------
    def _default_client(self) -> Any:
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

    def run_training(self, project: str, event: dict, progress: Callable[[float, str], None]) -> dict:
        """One fit of `project` (backend.training.fit) inside its cross-process ProjectLock. Serving processes
        notice the new references / version by the project's signature and swap the predictor when rebuilt."""
        from backend import training

        lower_priority(self.settings.train_nice)
        ctx = training.TrainingContext(
            settings=self.settings,
            progress=progress,
            client_factory=self._client_factory,
            image_loader=self.loader,
            engine=self.engine,
            projects=self.projects,
            base_version=self.choice.version,
        )
        with ProjectLock(self.settings.model_dir, project, "train"):
            result = training.fit(project, event, ctx)
        if result.get("model_version") and self._syncs_card_title():
            from backend import ls_card

            # in the job itself: an RQ work-horse exits when the job returns, a daemon thread would die with it
            try:
                ls_card.sync_card_title(self._client_factory(), project, str(result["model_version"]),
                                        tuple(self.versions(project)), attempts=1)
            except Exception as exc:  # noqa: BLE001 - the version is published; the card title is a convenience
                logger.warning("project %s: could not rename the model card: %s", project, str(exc)[:300])
        return result
