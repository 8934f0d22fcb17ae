"""Per-project checkpoint store for trained ADClick-Seg models.

Layout under `root` (the folder is given by the caller: the service's is backend/projects.py's
`ProjectStore.versions_dir(project)`; this module knows nothing of MODEL_DIR):

    adclick-seg-v1/ model.pt meta.json [report.png ...]
    adclick-seg-v2/ ...
    counter.json            highest number ever issued (versions stay monotonic after pruning)
    published.json          the published version: {"version", "number", "sequence", "time", "versions"}
    .lock                   the writers' lock (model.atomic.FileLock)
    .tmp-*/                 a write in progress; removed on the next commit if a crash left one behind

A version is written entirely inside a temporary directory and published with one `os.rename`, so a
reader sees either the complete directory or nothing: a crash mid-write leaves the last good version
serving. Only the last `keep` versions are kept.

What is served is the published record, not the folders: `commit` writes published.json (temp file + rename,
model.atomic.publish_record) after the version's folder is in place and before older ones are pruned;
`sequence` grows by one at least with every publication. Readers (`published`, `latest`, `published_names`)
compare the record in memory and re-read it at most every model.atomic.RECORD_REFRESH_S seconds (or at once
with refresh=True), so a version published by another process (an RQ worker) is served within that time and
a click never lists the version folders. A store written before records existed gets its record from its
folders once (`latest`).
"""
from __future__ import annotations

import builtins
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.atomic import FileLock, publish_record, read_record, write_json_atomic

logger = logging.getLogger(__name__)

PREFIX = "adclick-seg"
CHECKPOINT_FILE = "model.pt"
META_FILE = "meta.json"
_COUNTER = "counter.json"
PUBLISHED = "published.json"


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


def _sequence(record: dict | None) -> int:
    try:
        return int((record or {}).get("sequence") or 0)
    except (TypeError, ValueError):
        return 0


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
        self._latest: tuple[tuple | None, VersionInfo | None] = (None, None)  # (record identity, info)
        self._adopted: dict | None = None  # set once a store without a record was checked for old versions

    @property
    def record_path(self) -> Path:
        return self.root / PUBLISHED

    # ---- reading -------------------------------------------------------------------------------
    def list(self) -> builtins.list[VersionInfo]:
        """Complete versions, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            m = self._pattern.fullmatch(child.name)
            if m and (child / META_FILE).is_file() and (child / CHECKPOINT_FILE).is_file():
                found.append((int(m.group(1)), child))
        return [self._info(n, p) for n, p in sorted(found)]

    def published(self, refresh: bool = False) -> dict | None:
        """The published record ({"version", "number", "sequence", "time", "versions"}) or None, from memory
        unless it is older than RECORD_REFRESH_S or `refresh` is set."""
        return read_record(self.record_path, refresh=refresh)

    def latest(self, refresh: bool = False) -> VersionInfo | None:
        """The published version (what serving uses); its meta.json is read once per publication."""
        record = self.published(refresh)
        if record is None:
            if self._adopted is None:
                self._adopted = self._adopt() or {}
            record = self._adopted
        if record is None or not record.get("version"):
            return None
        identity = (record.get("sequence"), record.get("version"))
        cached_identity, info = self._latest
        if cached_identity != identity:
            try:
                info = self.get(str(record["version"]))
            except VersionNotFound:
                logger.error("%s names %s, which is not in the store", self.record_path, record["version"])
                info = None
            self._latest = (identity, info)
        return info

    def published_names(self, refresh: bool = False) -> builtins.list[str]:
        """The kept versions as the last publication listed them, oldest first (no folder listing)."""
        self.latest(refresh)  # adopts a store written before records existed
        record = self.published() or self._adopted
        return [str(v) for v in (record or {}).get("versions") or []]

    def _adopt(self) -> dict | None:
        """A store whose versions were written before records existed: publish its newest version once."""
        if not self.root.is_dir() or not self.list():
            return None
        try:
            with self._locked():
                record = self.published(refresh=True)
                if record is None:
                    versions = self.list()
                    if not versions:
                        return None
                    record = self._publish(versions[-1], [v.name for v in versions], sequence=versions[-1].number)
                return record
        except OSError as exc:  # a read-only MODEL_DIR: serve the newest folder without a record
            logger.warning("cannot write %s (%s); serving the newest version folder", self.record_path, exc)
            versions = self.list()
            return {"version": versions[-1].name, "number": versions[-1].number, "sequence": 0,
                    "versions": [v.name for v in versions]} if versions else None

    def get(self, name: str) -> VersionInfo:
        m = self._pattern.fullmatch(name)
        path = self.root / name
        if not m or not (path / META_FILE).is_file():
            raise VersionNotFound(f"no model version {name!r} in {self.root}")
        return self._info(int(m.group(1)), path)

    def load(self, name: str | None = None) -> tuple[dict[str, Any], VersionInfo]:
        """The checkpoint dict ({arch, config, state_dict, meta}) of `name` (default: the published one)."""
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
    def _locked(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / ".lock")

    def _publish(self, info: VersionInfo, kept: builtins.list[str], sequence: int) -> dict:
        record = {"version": info.name, "number": info.number, "sequence": sequence, "time": time.time(),
                  "versions": kept}
        publish_record(self.record_path, record)
        self._latest = ((sequence, info.name), info)
        return record

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
            info = self.get(name)
            versions = self.list()
            cut = max(0, len(versions) - self.keep)
            sequence = max(_sequence(self.published(refresh=True)) + 1, number)
            # the record names the new version before the oldest ones go: a reader never meets a pruned name
            self._publish(info, [v.name for v in versions[cut:]], sequence)
            self._prune(versions[:cut])
            logger.info("published %s in %s (sequence %d)", name, self.root, sequence)
            return info

    def _prune(self, versions: builtins.list[VersionInfo]) -> None:
        for old in versions:
            trash = self.root / f".tmp-trash-{old.name}"
            os.rename(old.path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            logger.info("pruned %s", old.name)
