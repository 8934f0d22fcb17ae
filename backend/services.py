"""The web process's pieces, built and wired in one place (`build_services`); each piece has one job:

- `model` (backend.serving.ModelLoader): the engine and the interactive predictor choice, loaded once.
- `versions` (backend.serving.ProjectVersions): a project's model_version and published versions.
- `serving` (backend.serving.ServingService): reference banks, the per-image state cache, click sessions.
- `detection` (backend.detection.DetectorCache): each project's trained ADClick-Seg detector.
- `training` (backend.training.TrainingService): one fit of a project, the model card's title.
- `jobs` (backend.jobs.JobManager): when fits run (in this process, or on RQ workers with REDIS_URL).

Routes take the piece they need (`current_app.extensions["adclick"]["services"].serving`, ...).
`start_background()` starts this process's threads (the jobs' thread, warming the model and the known projects);
the app factory calls it, or gunicorn's post_worker_init in each worker (backend/wsgi.py, gunicorn_conf.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backend.adaptation import AdaptationHook
from backend.detection import DetectorCache
from backend.images import ImageLoader
from backend.jobs import JobManager
from backend.projects import ProjectStore, is_project_id, jobs_state_path
from backend.serving import (
    EngineFactory,
    ModelLoader,
    PredictorChooser,
    ProjectVersions,
    ServingService,
    build_engine,
    choose_predictor,
)
from backend.settings import Settings
from backend.training import TrainingService


@dataclass(frozen=True)
class Services:
    settings: Settings
    projects: ProjectStore
    loader: ImageLoader
    model: ModelLoader
    versions: ProjectVersions
    serving: ServingService
    detection: DetectorCache
    training: TrainingService
    jobs: JobManager

    def start_background(self) -> None:
        """This process's background work: the training jobs' thread and (WARM_ON_SETUP) the model load and
        the banks of the projects that called /setup before. Idempotent per process (after a fork too)."""
        self.jobs.ensure_started()
        if self.settings.warm_on_setup:
            self.serving.warm_known_projects()


def build_services(
    settings: Settings,
    loader: ImageLoader | None = None,
    engine_factory: EngineFactory = build_engine,
    predictor_chooser: PredictorChooser = choose_predictor,
    client_factory: Callable[[], Any] | None = None,
) -> Services:
    from backend.queue import build_runner

    loader = loader or ImageLoader(settings)
    projects = ProjectStore(settings.model_dir, settings.normal_dir)
    model = ModelLoader(settings, engine_factory, predictor_chooser)
    versions = ProjectVersions(settings, projects, model)
    training = TrainingService(settings, projects, model, versions, loader, client_factory)
    jobs = JobManager(
        jobs_state_path(settings.model_dir),
        build_runner(settings.redis_url, training.run_training),
        settings.train_after_annotations,
        settings.train_debounce_s,
        max_requeues=settings.train_max_requeues,
        valid_project=is_project_id,
    )
    serving = ServingService(settings, model, projects, loader)
    serving.on_bank_complete = AdaptationHook(settings, projects, jobs, model)
    return Services(
        settings=settings,
        projects=projects,
        loader=loader,
        model=model,
        versions=versions,
        serving=serving,
        detection=DetectorCache(settings, versions),
        training=training,
        jobs=jobs,
    )
