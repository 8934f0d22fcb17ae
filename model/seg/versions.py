"""Per-project checkpoint store for trained ADClick-Seg models.

Layout under `root` (one store per project, e.g. MODEL_DIR/projects/<project>/adclick-seg):

    adclick-seg-v1/ model.pt meta.json [report.png ...]
    adclick-seg-v2/ ...
    counter.json            highest number ever issued (versions stay monotonic after pruning)
    .tmp-*/                 a write in progress; removed on the next commit if a crash left one behind

A version is written entirely inside a temporary directory and published with one `os.rename`, so a
reader sees either the complete directory or nothing: a crash mid-write leaves the last good version
serving. Only the last `keep` versions are kept.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.atomic import write_json_atomic

logger = logging.getLogger(__name__)

PREFIX = "adclick-seg"
CHECKPOINT_FILE = "model.pt"
META_FILE = "meta.json"
_COUNTER = "counter.json"
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


class VersionNotFound(LookupError):
    """The requested model version does not exist in this store."""


@dataclass(frozen=True)
class VersionInfo:
    name: str  # e.g. "adclick-seg-v3"
    number: int
    path: Path  # the version directory
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE


def version_name(number: int, prefix: str = PREFIX) -> str:
    return f"{prefix}-v{number}"


def project_store(model_dir: str | Path, project: str | int, keep: int = 3) -> VersionStore:
    """The store of one Label Studio project under MODEL_DIR (project ids like "12.1700000000" -> "12")."""
    pid = str(project).split(".")[0]
    if not re.fullmatch(r"[A-Za-z0-9_-]+", pid):
        raise ValueError(f"invalid project id {project!r}")
    return VersionStore(Path(model_dir) / "projects" / pid / PREFIX, keep=keep)


def _thread_lock(root: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(root.resolve()), threading.Lock())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionStore:
    """Monotonic, atomic, pruned store of `<prefix>-v<N>` directories. Thread- and process-safe writes."""

    def __init__(self, root: str | Path, keep: int = 3, prefix: str = PREFIX):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.root = Path(root)
        self.keep = keep
        self.prefix = prefix
        self._pattern = re.compile(rf"{re.escape(prefix)}-v(\d+)")

    # ---- reading -------------------------------------------------------------------------------
    def list(self) -> list[VersionInfo]:
        """Complete versions, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            m = self._pattern.fullmatch(child.name)
            if m and (child / META_FILE).is_file() and (child / CHECKPOINT_FILE).is_file():
                found.append((int(m.group(1)), child))
        return [self._info(n, p) for n, p in sorted(found)]

    def latest(self) -> VersionInfo | None:
        versions = self.list()
        return versions[-1] if versions else None

    def get(self, name: str) -> VersionInfo:
        m = self._pattern.fullmatch(name)
        path = self.root / name
        if not m or not (path / META_FILE).is_file():
            raise VersionNotFound(f"no model version {name!r} in {self.root}")
        return self._info(int(m.group(1)), path)

    def load(self, name: str | None = None) -> tuple[dict[str, Any], VersionInfo]:
        """The checkpoint dict ({arch, config, state_dict, meta}) of `name` (default: latest)."""
        info = self.get(name) if name else self.latest()
        if info is None:
            raise VersionNotFound(f"no model version in {self.root}")
        ckpt = torch.load(info.checkpoint, map_location="cpu", weights_only=True)
        return ckpt, info

    def _info(self, number: int, path: Path) -> VersionInfo:
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError) as exc:
            logger.warning("unreadable %s in %s: %s", META_FILE, path, exc)
            meta = {}
        return VersionInfo(name=version_name(number, self.prefix), number=number, path=path, meta=meta)

    # ---- writing -------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with _thread_lock(self.root), open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _next_number(self) -> int:
        issued = 0
        counter = self.root / _COUNTER
        if counter.is_file():
            try:
                issued = int(json.loads(counter.read_text()).get("issued", 0))
            except (OSError, ValueError) as exc:
                logger.warning("unreadable %s: %s", counter, exc)
        existing = [v.number for v in self.list()]
        return max([issued, *existing]) + 1

    def _clean_temporaries(self) -> None:
        for child in self.root.glob(".tmp-*"):
            if child.is_dir():
                logger.warning("removing an unfinished version write %s", child)
                shutil.rmtree(child, ignore_errors=True)

    def commit(
        self,
        checkpoint: dict[str, Any],
        meta: dict[str, Any],
        write_extra: Callable[[Path, str], None] | None = None,
    ) -> VersionInfo:
        """Publish a new version. `write_extra(tmp_dir, name)` may add files (a report) before publishing.
        Either the whole version appears or none of it does."""
        with self._locked():
            self._clean_temporaries()
            number = self._next_number()
            name = version_name(number, self.prefix)
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{name}-"))
            try:
                full_meta = {**meta, "model_version": name, "created": time.time()}
                torch.save({**checkpoint, "meta": {**checkpoint.get("meta", {}), **full_meta}},
                           tmp / CHECKPOINT_FILE)
                if write_extra is not None:
                    write_extra(tmp, name)
                with open(tmp / META_FILE, "w") as fh:
                    json.dump(full_meta, fh, indent=1, sort_keys=True, default=str)
                    fh.flush()
                    os.fsync(fh.fileno())
                for f in tmp.iterdir():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                os.rename(tmp, self.root / name)
                _fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            write_json_atomic(self.root / _COUNTER, {"issued": number})
            self._prune()
            logger.info("published %s in %s", name, self.root)
            return self.get(name)

    def _prune(self) -> None:
        versions = self.list()
        for old in versions[: max(0, len(versions) - self.keep)]:
            trash = self.root / f".tmp-trash-{old.name}"
            os.rename(old.path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            logger.info("pruned %s", old.name)
