"""Request counters and latency percentiles per route, for GET /metrics. Latencies are kept in a bounded
ring per route (the last `window` requests), so memory stays constant however long the server runs."""

from __future__ import annotations

import threading
from collections import defaultdict, deque

import numpy as np


class RequestStats:
    def __init__(self, window: int = 2048):
        self._window = window
        self._lock = threading.Lock()
        self._counts: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self._latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=self._window))

    def record(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._counts[route][int(status)] += 1
            self._latency[route].append(float(seconds))

    def snapshot(self) -> dict:
        with self._lock:
            counts = {r: dict(c) for r, c in self._counts.items()}
            lat = {r: np.asarray(d, dtype=np.float64) for r, d in self._latency.items()}
        routes = {}
        for route, by_status in sorted(counts.items()):
            ms = lat[route] * 1000.0
            routes[route] = {
                "count": int(sum(by_status.values())),
                "by_status": {str(k): v for k, v in sorted(by_status.items())},
                "latency_ms": {
                    "p50": round(float(np.percentile(ms, 50)), 2),
                    "p90": round(float(np.percentile(ms, 90)), 2),
                    "p99": round(float(np.percentile(ms, 99)), 2),
                    "max": round(float(ms.max()), 2),
                    "window": int(ms.size),
                },
            }
        return routes
