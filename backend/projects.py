"""Per-project settings kept by the service under MODEL_DIR/projects/<id>/: the label config and extra_params
last sent to /setup (project.json, written atomically), and the folder of reference images the training job
collects from OK-verdict tasks (references/). Reference images of a project = ADCLICK_NORMAL_DIR +
extra_params.normal_dir + that folder."""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from pathlib import Path
from typing import Optional

from backend.errors import BadRequest
from model.atomic import write_json_atomic

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


MAX_PROJECT_ID = 2**63 - 1  # Label Studio's ids are database integers
_PROJECT_ID = re.compile(r"([1-9][0-9]{0,18})(?:\.[0-9]{1,20})?")


def is_project_id(key: str) -> bool:
    """True for the canonical form `parse_project` returns (a positive integer in decimal)."""
    return bool(re.fullmatch(r"[1-9][0-9]{0,18}", key)) and int(key) <= MAX_PROJECT_ID


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
    match = _PROJECT_ID.fullmatch(text[:64])
    if match is None or len(text) > 64 or int(match.group(1)) > MAX_PROJECT_ID:
        raise BadRequest(
            f"project must be a Label Studio project id (a positive integer, or 'id.timestamp'), "
            f"got {str(raw)[:40]!r}"
        )
    return match.group(1)


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
    def __init__(self, model_dir: Path, env_normal_dir: str = ""):
        self.root = Path(model_dir) / "projects"
        self.env_normal_dir = env_normal_dir
        self._lock = threading.Lock()
        self._memo: dict[str, dict] = {}

    def dir(self, project: str) -> Path:
        return self.root / project

    def known(self) -> list[str]:
        """Projects that called /setup before (they have a project.json)."""
        if not self.root.is_dir():
            return []
        return sorted(
            d.name for d in self.root.iterdir() if is_project_id(d.name) and (d / "project.json").is_file()
        )

    def references_dir(self, project: str) -> Path:
        return self.dir(project) / "references"

    def get(self, project: str) -> dict:
        with self._lock:
            if project not in self._memo:
                path = self.dir(project) / "project.json"
                try:
                    self._memo[project] = json.loads(path.read_text())
                except FileNotFoundError:
                    self._memo[project] = {}
                except (OSError, ValueError) as exc:
                    logger.error("unreadable %s (%s); using defaults", path, exc)
                    self._memo[project] = {}
            return dict(self._memo[project])

    def update(
        self, project: str, label_config: Optional[str] = None, extra_params: Optional[dict] = None
    ) -> dict:
        """Keep what is given; the rest stays as it was (extra_params survive a /setup without them)."""
        current = self.get(project)
        if label_config:
            current["label_config"] = label_config
        if extra_params is not None:
            current["extra_params"] = dict(extra_params)
        write_json_atomic(self.dir(project) / "project.json", current)
        with self._lock:
            self._memo[project] = dict(current)
        return current

    def extra_params(self, project: str) -> dict:
        return dict(self.get(project).get("extra_params") or {})

    def label_config(self, project: str) -> Optional[str]:
        return self.get(project).get("label_config")

    def references_info(self, project: str) -> Optional[dict]:
        """What the last fit published for the project's references (model_version, bank_key, counts)."""
        try:
            return json.loads((self.dir(project) / "references.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.error("unreadable references.json of project %s: %s", project, exc)
            return None

    def set_references_info(self, project: str, info: dict) -> None:
        write_json_atomic(self.dir(project) / "references.json", info)

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
