"""State on disk shared by threads, workers and replicas. No torch import.

- Atomic writes (`atomic_write`, `write_json_atomic`, `write_bytes_atomic`, `write_image_atomic`): a temp file
  in the target folder, fsync, then os.replace, so readers see either the old file or the new one, never a
  partial one.
- Records (`read_record`, `publish_record`): small JSON files written atomically and read through one
  in-memory copy per process, re-read from disk at most every RECORD_REFRESH_S seconds (or when a caller asks
  with refresh=True). A record is how one process tells the others that something was published (a model
  version, a project's settings): readers compare it in memory instead of listing folders or comparing mtimes.
- `FileLock(path)`: an exclusive flock on `path` plus the process's thread lock for that path (flock alone does
  not exclude two threads of one process). All thread locks come from one registry (`thread_lock`).
"""
from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

RECORD_REFRESH_S = 1.0  # a record published by another process is seen by this one at most this late
MAX_RECORDS = 4096  # records kept in memory per process (least recently read dropped first)


def atomic_write(path: Path | str, write: Callable[[IO[Any]], object], binary: bool = True) -> Path:
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


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def write_image_atomic(path: Path | str, image: Any, format: str = "PNG") -> Path:
    """An image (an HxW or HxWxC uint8 array, or a PIL image) encoded as `format` and published atomically.
    Encoded in memory first, so an image PIL cannot encode leaves no file behind."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format=format)
    return write_bytes_atomic(path, buf.getvalue())


# ---- records -----------------------------------------------------------------------------------------------
_RECORDS: OrderedDict[str, tuple[float, dict | None]] = OrderedDict()  # path -> (read at, value)
_RECORDS_GUARD = threading.Lock()
_now = time.monotonic  # the records' clock (tests replace it)


def _record_key(path: Path | str) -> str:
    return os.path.abspath(os.fspath(path))


def _remember(key: str, at: float, value: dict | None) -> None:
    with _RECORDS_GUARD:
        _RECORDS[key] = (at, value)
        _RECORDS.move_to_end(key)
        while len(_RECORDS) > MAX_RECORDS:
            _RECORDS.popitem(last=False)


def read_record(path: Path | str, refresh: bool = False) -> dict | None:
    """The JSON object in `path` (None when there is none), from this process's copy unless that is older than
    RECORD_REFRESH_S or `refresh` is set. An unreadable or damaged file keeps the last good value (logged)."""
    key = _record_key(path)
    now = _now()
    with _RECORDS_GUARD:
        hit = _RECORDS.get(key)
        if hit is not None and not refresh and now - hit[0] < RECORD_REFRESH_S:
            _RECORDS.move_to_end(key)
            return _copy(hit[1])
    value: dict | None
    try:
        value = json.loads(Path(path).read_text())
        if not isinstance(value, dict):
            raise ValueError(f"a JSON object was expected, got {type(value).__name__}")
    except FileNotFoundError:
        value = None
    except (OSError, ValueError) as exc:
        logger.error("unreadable record %s (%s); keeping the last good one", path, exc)
        value = hit[1] if hit is not None else None
    _remember(key, now, value)
    return _copy(value)


def publish_record(path: Path | str, obj: dict) -> dict:
    """Write the record atomically (temp file + rename: a reader never sees half of it); this process sees
    the new value at once, the others within RECORD_REFRESH_S."""
    write_json_atomic(path, obj)
    _remember(_record_key(path), _now(), _copy(obj))
    return obj


def _copy(value: dict | None) -> dict | None:
    """A private copy of a record (JSON data: the round trip is cheaper than deepcopy and needs one stack
    frame per level, not several)."""
    return None if value is None else json.loads(json.dumps(value))


# ---- locks -------------------------------------------------------------------------------------------------
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def thread_lock(key: Path | str) -> threading.Lock:
    """The process's one thread lock for `key` (a lock file's resolved path): every FileLock on that path and
    every in-process user of the same key share it."""
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(str(key), threading.Lock())


class FileLock:
    """Exclusive, non-reentrant lock on `path` across threads (the registry's thread lock) and processes
    (flock; the kernel drops it when its holder dies, so a crashed process never leaves a stale lock)."""

    def __init__(self, path: Path | str):
        self.path = Path(path).resolve()
        self._thread_lock = thread_lock(self.path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True, timeout: float | None = None, poll_s: float = 0.05) -> bool:
        """Take the lock; False when `blocking` is False (or `timeout` s passed) and someone else holds it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._thread_lock.acquire(blocking, -1 if (timeout is None or not blocking) else timeout):
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not blocking or (deadline is not None and time.monotonic() >= deadline):
                        os.close(fd)
                        self._thread_lock.release()
                        return False
                    time.sleep(poll_s)
        except BaseException:
            self._thread_lock.release()
            raise
        self._fd = fd
        self._acquired(fd)
        return True

    def _acquired(self, fd: int) -> None:
        """Called with the lock file's descriptor once the lock is held (subclasses note the holder)."""

    def release(self) -> None:
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not held by this object")
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            self._thread_lock.release()

    def locked_elsewhere(self) -> bool:
        """True while another process (or another object of this process) holds the flock."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
