"""Serving: the interactive model and everything a click or a batch prediction works with.

- `ModelLoader`: the engine and the `PredictorChoice` (model/interactive/choose.py), built lazily once per process
  behind a lock; `choose_predictor` is the ONE place the served predictor is chosen (learned ADClick when its
  weights are bundled and ADCLICK_PREDICTOR allows it, else the zero-training residual click mode, wrapped in the
  boundary refinement unless ADCLICK_REFINE=off), from `interactive_config(settings)`.
- `ProjectVersions`: a project's model_version and published versions (cheap; no model load).
- `ServingService`: per-project reference banks (shared by projects with one reference set, built in background
  threads, small first then grown), the per-image state cache (byte-budget LRU keyed by image, model version
  and bank) with each image's click history, and the warm-up of known projects at process start.

Training (backend/training.py) reuses `ModelLoader` and `ProjectVersions`, never `ServingService`."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from backend.banks import (
    BankLRU,
    bank_stages,
    reference_set_key,
    screen_references,
    spread_order,
)
from backend.cache import ByteLRU
from backend.errors import BackendError, NotReady
from backend.images import ImageLoader
from backend.projects import ProjectStore, list_images
from backend.settings import Settings, interactive_config
from model.interactive.choose import PredictorChoice, residual_choice, with_refinement, with_seeded
from model.interactive.clicks import ClickHistory
from model.types import Engine, ImageState, Predictor, ReferenceSet

if TYPE_CHECKING:
    from model.seg.versions import VersionInfo

logger = logging.getLogger(__name__)

REQUEST_SLOT_WAIT_S = 0.25  # longest wait of a request for a free download slot, then 503 (docs/SETTINGS.md)


def choose_predictor(settings: Settings, engine: Engine) -> PredictorChoice:
    """The served interactive predictor; unless ADCLICK_REFINE=off its maps get the full-resolution boundary
    refinement of model/interactive/refine.py (guided filter by default, or GrabCut), and unless ADCLICK_SEEDED=off
    the click-seeded stage of model/interactive/seeded.py on top."""
    config = interactive_config(settings)
    return with_seeded(with_refinement(_choose_base(settings, engine), config.refine), config.seeded)


def _choose_base(settings: Settings, engine: Engine) -> PredictorChoice:
    reason = "zero-training click mode: ADCLICK_PREDICTOR=residual"
    if settings.predictor in ("auto", "learned"):
        try:
            from model.interactive.learned import check_weights, load_interactive_predictor
        except ImportError:
            if settings.predictor == "learned":
                raise NotReady("ADCLICK_PREDICTOR=learned but model.interactive.learned is not available") from None
            reason = "zero-training click mode: the learned predictor (model.interactive.learned) is not available"
        else:
            config = interactive_config(settings)
            choice = load_interactive_predictor(engine, config)
            if choice is not None:
                return choice
            if settings.predictor == "learned":
                raise NotReady("ADCLICK_PREDICTOR=learned but no learned ADClick weights are bundled")
            reason = f"zero-training click mode: {check_weights(engine, config.weights_dir)[1]}"
    return residual_choice(engine, reason)


def build_engine(settings: Settings) -> Engine:
    from model.engine.features import BackboneConfig
    from model.engine.residuals import ResidualConfig, ResidualEngine

    return ResidualEngine(
        BackboneConfig(device=settings.device), ResidualConfig(), cache_dir=settings.model_dir / "banks"
    )


EngineFactory = Callable[[Settings], Engine]
PredictorChooser = Callable[[Settings, Engine], PredictorChoice]


class ModelLoader:
    """The engine and the predictor choice, built on first use, once per process, behind a lock."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory = build_engine,
                 predictor_chooser: PredictorChooser = choose_predictor):
        self.settings = settings
        self._engine_factory = engine_factory
        self._chooser = predictor_chooser
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._choice: PredictorChoice | None = None
        self._adapted: dict[str, PredictorChoice] = {}  # adapted weights folder -> its served choice
        self.loaded_at: float | None = None
        self.load_seconds: float | None = None

    def load(self) -> tuple[Engine, PredictorChoice]:
        with self._lock:
            if self._engine is None or self._choice is None:
                t0 = time.monotonic()
                engine = self._engine_factory(self.settings)
                choice = self._chooser(self.settings, engine)
                self._engine, self._choice = engine, choice
                self.load_seconds = round(time.monotonic() - t0, 3)
                self.loaded_at = time.time()
                logger.info("model loaded: %s (%s) in %.2f s", choice.kind, choice.version, self.load_seconds)
            return self._engine, self._choice

    def adapted_choice(self, weights_dir: Path) -> PredictorChoice:
        """The served chain (refinement, seeded stage) over the adapted weights in `weights_dir` (a published
        interactive version's folder), built once per folder; CheckpointError when they cannot be used."""
        key = str(weights_dir)
        with self._lock:
            choice = self._adapted.get(key)
        if choice is not None:
            return choice
        from model.errors import CheckpointError
        from model.interactive.learned import check_weights, load_interactive_predictor

        config = replace(interactive_config(self.settings), weights_dir=Path(weights_dir))
        base = load_interactive_predictor(self.engine, config)
        if base is None:
            raise CheckpointError(check_weights(self.engine, config.weights_dir)[1])
        choice = with_seeded(with_refinement(base, config.refine), config.seeded)
        with self._lock:
            self._adapted[key] = choice
            while len(self._adapted) > 64:
                self._adapted.pop(next(iter(self._adapted)))
        return choice

    @property
    def engine(self) -> Engine:
        return self.load()[0]

    @property
    def choice(self) -> PredictorChoice:
        return self.load()[1]

    @property
    def loaded(self) -> bool:
        return self._choice is not None


class ProjectVersions:
    """A project's versions: its trained ADClick-Seg versions, the version its last fit published for its
    references, the interactive model's version."""

    def __init__(self, settings: Settings, projects: ProjectStore, model: ModelLoader):
        self.settings = settings
        self.projects = projects
        self.model = model

    def trained_version(self, project: str) -> VersionInfo | None:
        """The project's published ADClick-Seg version, compared in memory (its record is re-read at most
        every model.atomic.RECORD_REFRESH_S seconds): no folder is listed on a click."""
        return self.projects.version_store(project).latest()

    def project_version(self, project: str) -> str:
        """The project's model_version, cheap (no model load): its latest trained ADClick-Seg version,
        else the version the last fit published for its references, else the interactive model's version."""
        trained = self.trained_version(project)
        if trained is not None:
            return trained.name
        refs = self.projects.references_info(project)
        return str(refs["model_version"]) if refs and refs.get("model_version") else self.model.choice.version

    def versions(self, project: str | None) -> list[str]:
        """The interactive model's version and the published versions of `project` (of every project that
        called /setup when none is named: Label Studio's GET /versions names none)."""
        names = [self.model.choice.version]
        for key in [project] if project else self.projects.known():
            refs = self.projects.references_info(key)
            names += [str(refs["model_version"])] if refs and refs.get("model_version") else []
            names += self.projects.version_store(key).published_names()
            names += self.projects.interactive_store(key).published_names()
        return list(dict.fromkeys(names))


@dataclass(frozen=True)
class CachedImage:
    """What the state cache keeps per (image, model version, bank): image size and predictor state."""

    height: int
    width: int
    state: ImageState
    history: ClickHistory = field(default_factory=ClickHistory, compare=False, repr=False)  # click prefixes

    @property
    def nbytes(self) -> int:
        return int(self.state.nbytes) + self.history.max_nbytes((self.height, self.width)) + 64


@dataclass(frozen=True)
class ProjectModel:
    """One reference bank and the predictor over it. Immutable: a growing bank is a sequence of these, each
    swapped in whole, so a request holds one consistent (bank, predictor) for all its work and the per-image
    cache, keyed by the bank's key, never mixes banks (the next click after a swap recomputes)."""

    signature: str  # key of the reference set (banks.reference_set_key); projects with one set share it
    bank: ReferenceSet
    predictor: Predictor
    n_references: int
    target: int = 0  # references the complete bank will hold
    complete: bool = True  # False while the bank still grows in the background
    adapted: str = ""  # the project's adapted interactive version serving it (backend/adaptation.py), if any


class BankBuildFailed(BackendError):
    """Building a reference bank failed: the server's own fault (its folders, memory, model)."""

    status = 500


class _BankBuild:
    """A reference set's bank being built: `first` is set once a first (small) bank is usable or the build
    failed; `latest` is the last bank published."""

    def __init__(self, key: str, target: int):
        self.key = key
        self.target = target
        self.first = threading.Event()
        self.running = True
        self.error: Exception | None = None
        self.failed_at = 0.0
        self.latest: ProjectModel | None = None
        self.started = time.monotonic()


BANK_RETRY_S = 10.0  # a failed bank build is retried by the first request this long after the failure
MAX_TRACKED_PROJECTS = 1024  # projects whose bank choice is remembered (and listed by /health)
_SERVICES: weakref.WeakSet[ServingService] = weakref.WeakSet()


class _BuildStopped(Exception):
    """The process is exiting: a bank growth stops between two images."""


@atexit.register
def _stop_bank_builds() -> None:
    """At exit, growing banks stop between two images and their threads are joined: a daemon thread still
    inside torch when the interpreter finalizes aborts the process ("terminate called without an active
    exception", exit status 134)."""
    for service in list(_SERVICES):
        service.stop_builds()

class ServingService:
    """Per-project reference banks and predictors, the per-image state cache with each image's click history,
    and the background threads that build banks and warm known projects. One per web process."""

    def __init__(self, settings: Settings, model: ModelLoader, projects: ProjectStore, loader: ImageLoader):
        self.settings = settings
        self.model = model
        self.projects = projects
        self.loader = loader
        self.cache: ByteLRU[CachedImage] = ByteLRU(settings.state_cache_bytes)
        self._lock = threading.Lock()
        self.banks: BankLRU[ProjectModel] = BankLRU(settings.bank_cache_bytes)  # reference-set key -> ProjectModel, shared
        self._builds: dict[str, _BankBuild] = {}  # reference-set key -> its build (running, or failed lately)
        # project -> key of the bank it was last served / its reference images give now; the most recently
        # asked MAX_TRACKED_PROJECTS only (any request may name a new project id)
        self._serving: OrderedDict[str, str] = OrderedDict()
        self._wanted: OrderedDict[str, str] = OrderedDict()
        self._refsets: dict[tuple, tuple[str, list[Path]]] = {}
        self._foreground = 0  # per-image computations of requests in progress (bank growth yields to them)
        self._closing = threading.Event()
        self._build_threads: set[threading.Thread] = set()
        _SERVICES.add(self)
        self._warmed_pid: int | None = None
        self._env_refs: int | None = None
        self._compute = threading.BoundedSemaphore(max(1, settings.compute_concurrency))
        # (bank key, size, adapted version, folder) -> ProjectModel with the project's adapted network
        self._adapted_models: OrderedDict[tuple, ProjectModel] = OrderedDict()
        self._adapted_failed: set[tuple] = set()
        # called with (engine bank key, projects using it) when a bank is complete (backend/adaptation.py's hook)
        self.on_bank_complete: Callable[[str, list[str]], None] | None = None

    def reference_counts(self) -> dict:
        """Reference images: of ADCLICK_NORMAL_DIR (counted once per process: /health must stay fast) and of
        every project whose bank is loaded in this process."""
        if self._env_refs is None:
            folder = self.settings.normal_dir
            limit = self.settings.max_reference_images
            self._env_refs = len(list_images(Path(folder), limit)) if folder else 0
        projects = {p: info["size"] for p, info in self.bank_report()["projects"].items() if info["loaded"]}
        return {"normal_dir": self._env_refs, "projects": projects}

    def bank_report(self) -> dict:
        """/health's reference banks: per project the bank it is served from (size now, target, whether it
        still grows in the background, the reference-set key projects share it by) and the banks' memory."""
        with self._lock:
            wanted, serving = dict(self._wanted), dict(self._serving)
            builds = {k: b for k, b in self._builds.items() if b.running}
        projects = {}
        for project, key in wanted.items():
            build = builds.get(key)
            # while its new set is not built, a project is served from its old bank
            model = self.banks.peek(key) or self.banks.peek(serving.get(project, ""))
            if model is None and build is None:
                continue
            projects[project] = {
                "loaded": model is not None,
                "size": model.n_references if model is not None else 0,
                "target": build.target if build is not None else model.target if model is not None else 0,
                "building": build is not None,
                "key": key,
            }
        return {"projects": projects, "memory": self.banks.snapshot()}

    # -- per-project predictors ------------------------------------------------------------------------------
    def _reference_set(self, project: str) -> tuple[str, list[Path]]:
        """(key, images) of the project's reference set; listed again only when a folder's mtime changed."""
        limit = self.settings.max_reference_images
        folders = self.projects.reference_folders(project)
        cheap = (self.model.choice.version, limit, tuple((str(f), _mtime_ns(f)) for f in folders))
        with self._lock:
            hit = self._refsets.get(cheap)
        if hit is not None:
            return hit
        images = self.projects.reference_images(project, limit)
        found = (reference_set_key(self.model.choice.version, images, limit), images)
        with self._lock:
            if len(self._refsets) > 256:
                self._refsets.clear()
            self._refsets[cheap] = found
        return found

    def model_for(self, project: str, wait_s: float | None = None) -> ProjectModel:
        """The project's predictor over its reference bank (`bank_model_for`), with the project's adapted
        interactive network when one is published (backend/adaptation.py)."""
        return self._adapted(project, self.bank_model_for(project, wait_s))

    def _adapted(self, project: str, model: ProjectModel) -> ProjectModel:
        """`model` with the predictor of the project's published adapted network (its store's record is compared
        in memory, re-read at most every RECORD_REFRESH_S: another process's publication is served within that
        time); `model` itself when there is none, adaptation is off, or the version cannot be loaded."""
        if not self.settings.adapt or self.model.choice.kind != "adclick":
            return model
        info = self.projects.interactive_store(project).latest()
        if info is None:
            return model
        key = (model.signature, model.n_references, info.name, str(info.path))
        with self._lock:
            hit = self._adapted_models.get(key)
            if hit is not None:
                self._adapted_models.move_to_end(key)
                return hit
        engine = self.model.engine
        try:
            choice = self.model.adapted_choice(info.path)
            adapted = replace(model, predictor=choice.build(engine, model.bank), adapted=info.name)
        except Exception as exc:  # noqa: BLE001 - a damaged version folder: the shipped network keeps serving
            if key not in self._adapted_failed:
                self._adapted_failed.add(key)
                logger.error("project %s: interactive version %s cannot be loaded (%s); serving the shipped "
                             "network", project, info.name, exc)
            return model
        with self._lock:
            self._adapted_models[key] = adapted
            while len(self._adapted_models) > MAX_TRACKED_PROJECTS // 16:
                self._adapted_models.popitem(last=False)
        return adapted

    def bank_model_for(self, project: str, wait_s: float | None = None) -> ProjectModel:
        """The project's predictor over its reference bank. Banks are shared by projects with the same
        reference set and built in a background thread, small first (ADCLICK_FIRST_REFERENCES spread over the
        folder, ready in seconds), then grown and swapped in whole. A project with an older bank keeps it
        until the new one is at least as large; a project with none waits up to BANK_WAIT_S for the first
        one, then gets NotReady (503); once any bank is usable it is answered from it, never with a 503."""
        self.model.load()
        key, images = self._reference_set(project)
        with self._lock:
            self._wanted[project] = key
            self._wanted.move_to_end(project)
            while len(self._wanted) > MAX_TRACKED_PROJECTS:
                old, _ = self._wanted.popitem(last=False)
                self._serving.pop(old, None)
            previous_key = self._serving.get(project)
        model = self.banks.get(key)
        build = None if model is not None and model.complete else self._start_build(key, images)
        previous = self.banks.peek(previous_key) if previous_key and previous_key != key else None
        if model is None and build is not None:
            model = build.latest
        if model is not None and (
            previous is None or model.complete or model.n_references >= previous.n_references
        ):
            return self._serve(project, model)
        if previous is not None:
            return previous
        assert build is not None
        wait = self.settings.bank_wait_s if wait_s is None else wait_s
        if build.error is None and not build.first.wait(wait):
            raise NotReady(
                f"project {project}: the reference bank of {len(images)} images is still being built; "
                "retry in a few seconds"
            )
        if build.latest is not None:
            return self._serve(project, build.latest)
        error = build.error
        if isinstance(error, BackendError):  # its own status and message (e.g. 503: no model), per request
            raise type(error)(f"project {project}: {error.message}")
        reason = type(error).__name__
        raise BankBuildFailed(
            f"project {project}: building its reference bank failed ({reason}); see the backend log. "
            f"It is retried by the first request after {BANK_RETRY_S:.0f} s"
        )

    def _serve(self, project: str, model: ProjectModel) -> ProjectModel:
        with self._lock:
            if project in self._wanted:
                self._serving[project] = model.signature
        return model

    def _start_build(self, key: str, images: list[Path]) -> _BankBuild:
        with self._lock:
            build = self._builds.get(key)
            if build is not None and (build.running or time.monotonic() - build.failed_at < BANK_RETRY_S):
                return build
            build = self._builds[key] = _BankBuild(key, len(images))
        thread = threading.Thread(
            target=self._build, args=(build, images), name=f"bank-{key[:8]}", daemon=True
        )
        with self._lock:
            self._build_threads.add(thread)
        thread.start()
        return build

    def stop_builds(self, timeout_s: float = 30.0) -> None:
        """Stop the banks growing in the background (between two images) and wait for their threads."""
        self._closing.set()
        with self._lock:
            threads = list(self._build_threads)
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _projects_of(self, key: str) -> list[str]:
        with self._lock:
            return sorted(p for p, k in self._wanted.items() if k == key)

    def _build(self, build: _BankBuild, images: list[Path]) -> None:
        try:
            engine, choice = self.model.load()
            images = screen_references(images, self.settings.max_image_pixels)
            build.target = len(images)
            bank = engine.cached_bank(images)
            if bank is not None:
                self._calibrate(build, engine, choice, bank, images)
                self._publish(build, engine, choice, bank, complete=True)
            else:
                self._grow(build, engine, choice, images)
        except _BuildStopped:
            logger.info("reference bank %s: growth stopped, the process is exiting", build.key)
            build.error, build.failed_at = NotReady("the backend is shutting down"), time.monotonic()
        except Exception as exc:  # every waiting request reads it (a JSON 500 naming it); retried later
            logger.exception("reference bank %s of project(s) %s: building failed", build.key,
                             ", ".join(self._projects_of(build.key)))
            build.error, build.failed_at = exc, time.monotonic()
        finally:
            build.running = False
            build.first.set()
            with self._lock:
                if build.error is None and self._builds.get(build.key) is build:
                    del self._builds[build.key]
                self._build_threads.discard(threading.current_thread())

    def _grow(self, build: _BankBuild, engine: Engine, choice: PredictorChoice, images: list[Path]) -> None:
        """First bank: ADCLICK_FIRST_REFERENCES images spread over the (sorted) set, without augmented views;
        then x4 per step up to all of them, each step extending the previous bank (only the new images are
        read) and swapped in whole. Only the complete bank goes to the disk cache. Between two images the
        growth waits for the requests' own computations (up to 2 s), so clicks keep the CPU."""
        ordered = [images[i] for i in spread_order(len(images))]
        augment_below = int(engine.cfg.augment_below)
        stages = bank_stages(len(ordered), self.settings.first_references, augment_below)
        bank, done = None, 0
        for i, size in enumerate(stages):
            final = i == len(stages) - 1
            if i and self._closing.is_set():
                raise _BuildStopped()
            if i and not self._projects_of(build.key):
                logger.info("reference bank %s: no project uses it any more; growth stopped", build.key)
                return
            if bank is None or size <= done or (final and len(ordered) < augment_below):
                options = {} if final else {"augment": False, "save": False}
                bank = engine.build_bank(ordered[:size], progress=self._yield_to_requests, **options)
            else:
                bank = engine.extend(bank, ordered[done:size], progress=self._yield_to_requests, save=final)
            done = size
            if final:
                self._calibrate(build, engine, choice, bank, ordered)
            self._publish(build, engine, choice, bank, complete=final)

    def _calibrate(self, build: _BankBuild, engine: Engine, choice: PredictorChoice, bank: ReferenceSet,
                   images: list[Path]) -> None:
        """The complete bank's per-project click calibration (model/interactive/calibration.py), read from the
        bank cache's JSON when this bank and predictor version were calibrated before. Best effort: a failure
        is logged and the predictor keeps its defaults."""
        if choice.calibrate is None or len(bank.source_keys) < 2:
            return
        try:
            from model.engine.residuals import content_hash

            started = time.monotonic()
            # lazy: the files are hashed only when no calibration of this bank is cached yet
            result = choice.calibrate(engine, bank, ((content_hash(p), p) for p in images),
                                      getattr(engine, "cache_dir", None))
            if result is not None:
                logger.info("reference bank %s of project(s) %s: click calibration weight %.2f threshold %.2f "
                            "(synthetic defects' mean IoU %.3f, defaults %.3f; %.1f s)", build.key,
                            ", ".join(self._projects_of(build.key)), result["weight"], result["threshold"],
                            result["iou"], result["default_iou"], time.monotonic() - started)
        except _BuildStopped:
            raise
        except Exception:
            logger.exception("reference bank %s: click calibration failed; the defaults stay", build.key)

    def _publish(
        self, build: _BankBuild, engine: Engine, choice: PredictorChoice, bank: ReferenceSet, complete: bool
    ) -> None:
        n = len(bank.source_keys)
        model = ProjectModel(build.key, bank, choice.build(engine, bank), n, build.target, complete)
        build.latest = model
        current = self.banks.peek(build.key)
        if current is None or complete or current.n_references <= n:  # a retried growth never shrinks a bank
            self.banks.put(build.key, model, int(bank.nbytes))
        build.first.set()
        logger.info(
            "reference bank %s of project(s) %s: %d of %d references ready after %.1f s%s",
            build.key, ", ".join(self._projects_of(build.key)), n, build.target,
            time.monotonic() - build.started, "" if complete else "; growing in the background",
        )
        if complete and self.on_bank_complete is not None:
            self.on_bank_complete(str(bank.key), self._projects_of(build.key))

    def _yield_to_requests(self, *_: object) -> None:
        if self._closing.is_set():
            raise _BuildStopped()
        deadline = time.monotonic() + 2.0
        while self._foreground > 0 and time.monotonic() < deadline:
            time.sleep(0.02)

    def warm_known_projects(self) -> None:
        """Once per process (after a fork too): load the model in the background (the first /setup after
        connecting then only waits for a small bank) and warm every project that called /setup before, so the
        first click after a restart does not wait for the model and the reference bank."""
        with self._lock:
            if self._warmed_pid == os.getpid():
                return
            self._warmed_pid = os.getpid()
        known = self.projects.known()
        for project in known:
            self.warm(project)
        if not known:
            threading.Thread(target=self._load_quietly, name="warm-model", daemon=True).start()

    def _load_quietly(self) -> None:
        """The model, the predictor's weights on an empty bank and one image through it (the engine builds its
        backbone lazily, and the first forward pass pays for the kernels' set-up)."""
        try:
            engine, choice = self.model.load()
            import numpy as np

            predictor = choice.build(engine, engine.build_bank([], save=False))
            predictor.set_image(np.full((256, 256, 3), 128, np.uint8))
        except Exception:  # best effort; the first request that needs the model reports the error
            logger.exception("loading the model in the background failed")

    def warm(self, project: str) -> None:
        """Load the model and the project's bank in a background thread (called by /setup)."""

        def run() -> None:
            try:
                self.model_for(project)
            except Exception:  # warming is best effort; the next request reports the error properly
                logger.exception("warming project %s failed", project)

        threading.Thread(target=run, name=f"warm-{project}", daemon=True).start()

    def image_state(
        self, project: str, ref: str, task_id: int | None = None
    ) -> tuple[ProjectModel, CachedImage]:
        """The per-image work for a task's image, from the cache when this (image, model, bank) was seen:
        then nothing is downloaded, decoded or recomputed."""
        model = self.model_for(project)
        source = self.loader.resolve(ref, task_id)
        key = (source.key, model.predictor.version, model.bank.key)

        def compute() -> CachedImage:
            # a request thread waits only briefly for a download slot (DOWNLOAD_CONCURRENCY): ordinary downloads
            # free one in milliseconds, while slow image hosts cannot hold every server thread (and /health)
            image = self.loader.load_source(source, slot_wait_s=REQUEST_SLOT_WAIT_S)
            with self._lock:
                self._foreground += 1
            try:
                with self._compute:  # bounded: 8 annotators must not run 8 backbone passes at once
                    state = model.predictor.set_image(image.array)
            finally:
                with self._lock:
                    self._foreground -= 1
            return CachedImage(image.height, image.width, state)

        return model, self.cache.get_or_set(key, compute)



def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0
