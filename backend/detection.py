"""The per-project trained detector cache: the ADClick-Seg detector of a project's latest published version
(model/seg/predict.py), loaded once per version and process; batch predictions use it instead of the
interactive predictor's unsupervised map once a project has one."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from backend.locks import local_lock
from backend.serving import ProjectVersions
from backend.settings import Settings

if TYPE_CHECKING:
    from model.seg.predict import SegDetector


class DetectorCache:
    def __init__(self, settings: Settings, versions: ProjectVersions):
        self.settings = settings
        self.versions = versions
        self._detectors: dict[tuple[str, str], SegDetector] = {}

    def _project_lock(self, project: str) -> threading.Lock:
        """The process's lock for loading the project's detector (backend/locks.py's registry)."""
        return local_lock(self.settings.model_dir, project, "detector")

    def detector(self, project: str) -> SegDetector | None:
        """The trained ADClick-Seg detector of the project's latest version, or None (use the predictor)."""
        trained = self.versions.trained_version(project)
        if trained is None:
            return None
        key = (project, trained.name)
        with self._project_lock(project):
            if key not in self._detectors:
                from model.seg.predict import SegDetector
                ckpt, info = self.versions.projects.version_store(project).load(trained.name)
                self._detectors = {k: v for k, v in self._detectors.items() if k[0] != project}
                self._detectors[key] = SegDetector(ckpt, info.name)
            return self._detectors[key]
