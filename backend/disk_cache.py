"""A size-bounded disk cache of downloaded bytes (under MODEL_DIR/downloads). Writes are atomic (temp file +
os.replace); a hit refreshes the file's mtime; when the total exceeds the bound the least recently used files
are deleted. Safe across threads and processes in the sense that a reader never sees a partial file."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


class DiskCache:
    def __init__(self, directory: Path, budget_bytes: int):
        self.dir = Path(directory)
        self.budget = int(budget_bytes)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.bin"

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
            os.utime(path)
        except OSError:
            with self._lock:
                self.misses += 1
            return None
        with self._lock:
            self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        if self.budget <= 0 or len(data) > self.budget:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self._path(key))
        except OSError as exc:
            logger.warning("download cache: cannot write %s: %s", key, exc)
            return
        self._evict()

    def _evict(self) -> None:
        with self._lock:
            entries = []
            for path in self.dir.glob("*.bin"):
                try:
                    st = path.stat()
                except OSError:
                    continue
                entries.append((st.st_mtime, st.st_size, path))
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):
                if total <= self.budget:
                    break
                path.unlink(missing_ok=True)
                total -= size

    def usage(self) -> dict:
        files = list(self.dir.glob("*.bin")) if self.dir.exists() else []
        return {
            "files": len(files),
            "bytes": sum(f.stat().st_size for f in files if f.exists()),
            "budget_bytes": self.budget,
            "hits": self.hits,
            "misses": self.misses,
        }
