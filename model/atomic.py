"""Atomic file writes: write a temp file in the target folder, fsync, then os.replace, so readers (other
threads, workers or replicas) see either the old file or the new one, never a partial one. No torch import."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: Path | str, write: Callable[[IO[Any]], None], binary: bool = True) -> Path:
    """Call `write(fh)` on a temp file next to `path`, then publish it as `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's files are private; publish them readable like any other file
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path | str, obj: Any) -> Path:
    return atomic_write(path, lambda fh: json.dump(obj, fh, indent=1, sort_keys=True), binary=False)
