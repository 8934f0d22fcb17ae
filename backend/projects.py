"""The one owner of project ids and of what the service keeps per project under MODEL_DIR.

Ids: `parse_project(raw)` turns what Label Studio sends ("12.1700000000", 12, {"id": 12}) into the project's key
"12" or raises BadRequest (the HTTP boundary); `project_key(project)` is the same check for keys inside the
service (it also accepts plain names such as "default", used by tests and tools, and raises ValueError);
`label_studio_id(key)` is the integer Label Studio's API wants. Nothing else parses a project id.

Layout (`project_dir`, `lock_path`, `jobs_state_path`, and `ProjectStore`'s methods spell every path):

    MODEL_DIR/projects/<id>/project.json      label config + extra_params last sent to /setup (a record)
    MODEL_DIR/projects/<id>/references/       reference images the training job collects from OK-verdict tasks
    MODEL_DIR/projects/<id>/references.json   what the last fit published for them (a record)
    MODEL_DIR/projects/<id>/adclick-seg/      the trained ADClick-Seg versions (model/seg/versions.py) and their
                                              published.json record
    MODEL_DIR/projects/<id>/interactive/      its adapted interactive networks (backend/adaptation.py), same layout
    MODEL_DIR/projects/<id>/adaptation.json   what its last adaptation did and why (a record; /health shows it)
    MODEL_DIR/locks/<id>.<name>.lock          per-project cross-process locks (backend/locks.py)
    MODEL_DIR/jobs/state.json                 every project's training job (backend/jobs.py)

Records are small JSON files written atomically and read through model.atomic.read_record: a process sees what
another one published within model.atomic.RECORD_REFRESH_S, without listing folders or comparing mtimes.
Reference images of a project = ADCLICK_NORMAL_DIR + extra_params.normal_dir + its references/ folder."""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from backend.errors import BadRequest
from model.atomic import publish_record, read_record

if TYPE_CHECKING:
    from model.seg.versions import VersionStore

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

PROJECTS_DIR = "projects"
LOCKS_DIR = "locks"
SEG_VERSIONS_DIR = "adclick-seg"
INTERACTIVE_DIR = "interactive"  # the project's adapted interactive networks (backend/adaptation.py)
MAX_PROJECT_ID = 2**63 - 1  # Label Studio's ids are database integers
_PROJECT_ID = re.compile(r"([1-9][0-9]{0,18})(?:\.[0-9]{1,20})?")  # "12" or "12.1700000000" (id.timestamp)
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # keys that are no Label Studio id ("default"): never "..", "/", ""
MAX_VERSION_STORES = 1024  # per-project version stores a ProjectStore keeps (their cached published record)


def _label_studio_key(text: str) -> str | None:
    match = _PROJECT_ID.fullmatch(text[:64]) if len(text) <= 64 else None
    if match is None or int(match.group(1)) > MAX_PROJECT_ID:
        return None
    return match.group(1)


def is_project_id(key: str) -> bool:
    """True for the canonical form `parse_project` returns (a positive integer in decimal)."""
    return isinstance(key, str) and "." not in key and _label_studio_key(key) == key


def parse_project(raw: object) -> str:
    """Label Studio sends "12.1700000000" (id.timestamp), 12, or {"id": 12}; all mean project "12". Anything
    else (0, negative, fractional, 1e999, NaN, huge, text) is a BadRequest, before any job, lock or folder
    is created for it."""
    if isinstance(raw, dict):
        raw = raw.get("id")
    if raw is None or raw == "":
        raise BadRequest("request names no project")
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise BadRequest(
            f"project must be a Label Studio project id (a positive integer), got {type(raw).__name__}"
        )
    if isinstance(raw, float) and not math.isfinite(raw):
        text = "not finite"
    else:
        text = raw.strip() if isinstance(raw, str) else str(raw)
    key = _label_studio_key(text)
    if key is None:
        raise BadRequest(
            f"project must be a Label Studio project id (a positive integer, or 'id.timestamp'), "
            f"got {str(raw)[:40]!r}"
        )
    return key


def project_key(project: str | int) -> str:
    """The key a project's state is kept under: a Label Studio id as `parse_project` reads it ("12.1700000000"
    and 12 mean "12"), or a plain name of letters, digits, "_" and "-" ("default"). ValueError otherwise, so no
    key can leave MODEL_DIR/projects or MODEL_DIR/locks."""
    if isinstance(project, bool) or not isinstance(project, (str, int)):
        raise ValueError(f"invalid project id {project!r}")
    text = str(project)
    key = _label_studio_key(text)
    if key is not None:
        return key
    if _NAME.fullmatch(text):
        return text
    raise ValueError(f"invalid project id {str(project)[:80]!r}")


def label_studio_id(project: str | int) -> int:
    """The project's id for Label Studio's API; ValueError for a key that is no Label Studio id ("default")."""
    key = project_key(project)
    if not is_project_id(key):
        raise ValueError(f"project {key!r} is not a Label Studio project id")
    return int(key)


def interactive_prefix(project: str | int) -> str:
    """Name prefix of a project's adapted interactive versions: `adclick-adapted-p<id>` (-v<N> follows)."""
    return f"adclick-adapted-p{project_key(project)}"


def project_dir(model_dir: str | Path, project: str | int) -> Path:
    return Path(model_dir) / PROJECTS_DIR / project_key(project)


def lock_path(model_dir: str | Path, project: str | int, name: str) -> Path:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid lock name {name!r}")
    return Path(model_dir) / LOCKS_DIR / f"{project_key(project)}.{name}.lock"


def jobs_state_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / "jobs" / "state.json"


def spread(files: list, limit: int) -> list:
    """At most `limit` items of the list, spread evenly over it (the list itself when it is short enough)."""
    if len(files) > limit > 0:
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def list_images(folder: Path, limit: int) -> list[Path]:
    """Image files under `folder`, recursively, sorted; at most `limit`, spread evenly over the list."""
    if not folder.is_dir():
        logger.warning("reference folder %s does not exist", folder)
        return []
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return spread(files, limit)


class ProjectStore:
    """Per-project settings and paths under MODEL_DIR/projects (see the module's docstring)."""

    def __init__(self, model_dir: Path, env_normal_dir: str = ""):
        self.model_dir = Path(model_dir)
        self.root = self.model_dir / PROJECTS_DIR
        self.env_normal_dir = env_normal_dir
        self._lock = threading.Lock()
        self._stores: OrderedDict[str, VersionStore] = OrderedDict()

    def dir(self, project: str) -> Path:
        return project_dir(self.model_dir, project)

    def known(self) -> list[str]:
        """Projects that called /setup before (they have a project.json)."""
        if not self.root.is_dir():
            return []
        return sorted(
            d.name for d in self.root.iterdir() if is_project_id(d.name) and (d / "project.json").is_file()
        )

    def references_dir(self, project: str) -> Path:
        return self.dir(project) / "references"

    def versions_dir(self, project: str) -> Path:
        return self.dir(project) / SEG_VERSIONS_DIR

    def version_store(self, project: str, keep: int | None = None) -> VersionStore:
        """The project's ADClick-Seg version store. Without `keep`, the one this ProjectStore keeps per project
        (serving: its published record is compared in memory); with `keep` (a training run's pruning), a new
        store over the same folder."""
        return self._store(project, "seg", keep)

    def interactive_store(self, project: str, keep: int | None = None) -> VersionStore:
        """The project's store of adapted interactive networks (`adclick-adapted-p<id>-v<N>`, backend/adaptation.py),
        kept and refreshed like `version_store`."""
        return self._store(project, "interactive", keep)

    def _store(self, project: str, kind: str, keep: int | None) -> VersionStore:
        from model.seg.versions import VersionStore

        key = project_key(project)
        folder, prefix = ((self.versions_dir(key), "adclick-seg") if kind == "seg"
                          else (self.dir(key) / INTERACTIVE_DIR, interactive_prefix(key)))
        if keep is not None:
            return VersionStore(folder, keep=keep, prefix=prefix)
        with self._lock:
            store = self._stores.get(f"{kind}:{key}")
            if store is None:
                store = self._stores[f"{kind}:{key}"] = VersionStore(folder, prefix=prefix)
                while len(self._stores) > MAX_VERSION_STORES:
                    self._stores.popitem(last=False)
            self._stores.move_to_end(f"{kind}:{key}")
            return store

    def adaptation_info(self, project: str) -> dict | None:
        """What the project's last adaptation of the interactive network did (backend/adaptation.py)."""
        return read_record(self.dir(project) / "adaptation.json")

    def set_adaptation_info(self, project: str, info: dict) -> None:
        publish_record(self.dir(project) / "adaptation.json", info)

    def get(self, project: str) -> dict:
        """project.json as a record: a /setup answered by another worker is seen within RECORD_REFRESH_S."""
        return read_record(self.dir(project) / "project.json") or {}

    def update(
        self, project: str, label_config: str | None = None, extra_params: dict | None = None
    ) -> dict:
        """Keep what is given; the rest stays as it was (extra_params survive a /setup without them)."""
        path = self.dir(project) / "project.json"
        with self._lock:
            current = read_record(path, refresh=True) or {}
            if label_config:
                current["label_config"] = label_config
            if extra_params is not None:
                current["extra_params"] = dict(extra_params)
            publish_record(path, current)
        return dict(current)

    def extra_params(self, project: str) -> dict:
        return dict(self.get(project).get("extra_params") or {})

    def label_config(self, project: str) -> str | None:
        return self.get(project).get("label_config")

    def references_info(self, project: str) -> dict | None:
        """What the last fit published for the project's references (model_version, bank_key, counts)."""
        return read_record(self.dir(project) / "references.json")

    def set_references_info(self, project: str, info: dict) -> None:
        publish_record(self.dir(project) / "references.json", info)

    def reference_folders(self, project: str) -> list[Path]:
        folders = [self.env_normal_dir, str(self.extra_params(project).get("normal_dir") or "")]
        out = [Path(f).expanduser() for f in folders if f]
        return out + [self.references_dir(project)]

    def reference_images(self, project: str, limit: int) -> list[Path]:
        """At most `limit` reference images. The OK-verdict images the fits collected (references/) always
        join: the folders (ADCLICK_NORMAL_DIR, extra_params.normal_dir) fill the room they leave, spread
        evenly over their files, instead of taking all of it first (issue 15 D9)."""
        own_dir = self.references_dir(project)
        own = list_images(own_dir, limit) if own_dir.exists() else []
        others: list[Path] = []
        for folder in self.reference_folders(project):
            if folder != own_dir:
                others += list_images(folder, limit)
        others = [p for p in dict.fromkeys(others) if p not in set(own)]
        room = limit - len(own)
        return (spread(others, room) if room > 0 else []) + own
