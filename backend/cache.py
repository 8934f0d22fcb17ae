"""A thread-safe LRU bounded by bytes, for per-image work keyed by (image key, model version).

`get_or_set(key, factory)` computes a missing value once even when several threads ask for the same key at
the same time (the others wait for the first), and different keys compute in parallel."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)


def nbytes_of(value: object) -> int:
    """Bytes held by a cached value: `.nbytes` when it has one (numpy arrays, ImageState), else a sum over
    tuples/lists/dicts of such values; anything else counts a nominal 64 bytes."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    size = getattr(value, "nbytes", None)
    if isinstance(size, (int, np.integer)):
        return int(size)
    if isinstance(value, (tuple, list)):
        return sum(nbytes_of(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes_of(v) for v in value.values())
    return 64


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    oversize: int = 0  # values larger than the whole budget: returned but not kept


V = TypeVar("V")


class ByteLRU(Generic[V]):
    """`keep_newest`: the value just put is never dropped, even alone over the budget (a value that must be
    served, e.g. a reference bank); otherwise a value larger than the whole budget is returned but not kept."""

    def __init__(self, budget_bytes: int, sizeof: Callable[[object], int] = nbytes_of, keep_newest: bool = False):
        self.budget = int(budget_bytes)
        self._sizeof = sizeof
        self.keep_newest = keep_newest
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pending: dict[Hashable, threading.Event] = {}
        self.stats = CacheStats()

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def peek(self, key: Hashable) -> V | None:
        """The value without making it recently used (for reports)."""
        with self._lock:
            item = self._items.get(key)
            return None if item is None else item[0]

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items)

    def put(self, key: Hashable, value: V, size: int | None = None) -> list[Hashable]:
        """Store (replacing the key's previous value); `size` defaults to `sizeof(value)`. Returns the keys
        dropped to stay within the budget."""
        size = self._sizeof(value) if size is None else int(size)
        with self._lock:
            return self._put_locked(key, value, size)

    def _put_locked(self, key: Hashable, value: V, size: int) -> list[Hashable]:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if size > self.budget and not self.keep_newest:
            self.stats.oversize += 1
            logger.warning("cache: value of %d bytes exceeds the budget of %d; not cached", size, self.budget)
            return []
        self._items[key] = (value, size)
        self._bytes += size
        dropped = []
        while self._bytes > self.budget and len(self._items) > (1 if self.keep_newest else 0):
            evicted_key, (_, evicted) = self._items.popitem(last=False)
            self._bytes -= evicted
            self.stats.evictions += 1
            dropped.append(evicted_key)
        return dropped

    def get_or_set(self, key: Hashable, factory: Callable[[], V]) -> V:
        while True:
            with self._lock:
                item = self._items.get(key)
                if item is not None:
                    self._items.move_to_end(key)
                    self.stats.hits += 1
                    return item[0]
                waiter = self._pending.get(key)
                if waiter is None:
                    self._pending[key] = threading.Event()
                    self.stats.misses += 1
                    break
            waiter.wait()  # another thread computes this key; then look again (it may have failed)
        try:
            value = factory()
            size = self._sizeof(value)
            with self._lock:
                self._put_locked(key, value, size)
            return value
        finally:
            with self._lock:
                self._pending.pop(key).set()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "items": len(self._items),
                "bytes": self._bytes,
                "budget_bytes": self.budget,
                "hits": self.stats.hits,
                "misses": self.stats.misses,
                "evictions": self.stats.evictions,
                "oversize": self.stats.oversize,
            }
