"""Helpers of the benchmark CLI: summaries per defect type, tables, JSON output, memory figures."""
from __future__ import annotations

import json
import math
import resource
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import numpy as np

T = TypeVar("T")

ANOMALY_KEYS = ("pixel_auroc", "pixel_ap", "au_pro", "image_auroc", "ms_per_image", "n_images")
CLICK_KEYS = ("noc85", "noc90", "miou@1", "miou@3", "miou@5", "ap@5", "first_click_ms_p50",
              "first_click_ms_p95", "next_click_ms_p50", "next_click_ms_p95", "n_images")
BANK_KEYS = ("n_refs", "bank_built", "bank_build_s", "bank_load_s", "bank_views", "bank_mb", "peak_rss_mb")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def per_defect(items: Sequence[T], defect_of: Callable[[T], str], summarize: Callable[[list[T]], dict],
               include: Iterable[str] = ()) -> dict[str, dict]:
    """summarize() of the items of each defect type (plus the items whose type is in `include`)."""
    extra = set(include)
    defects = sorted({defect_of(i) for i in items} - extra)
    return {d: summarize([i for i in items if defect_of(i) in ({d} | extra)]) for d in defects}


def clean_json(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, recursively, so the output is strict JSON."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(report: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(clean_json(report), indent=2, sort_keys=False) + "\n")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def print_table(title: str, sections: dict[str, dict], keys: Sequence[str],
                out: TextIO | None = None) -> None:
    """One row per section (e.g. overall + each defect type), one column per key."""
    out = out or sys.stdout
    name_w = max([len(title)] + [len(s) for s in sections]) + 2
    widths = [max(len(k), 8) + 2 for k in keys]
    out.write(title.ljust(name_w) + "".join(k.rjust(w) for k, w in zip(keys, widths)) + "\n")
    for name, values in sections.items():
        cells = "".join(_fmt(values.get(k)).rjust(w) for k, w in zip(keys, widths))
        out.write(name.ljust(name_w) + cells + "\n")
    out.write("\n")


def print_config(config: dict, keys: Sequence[str], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write("  ".join(f"{k}={_fmt(config.get(k))}" for k in keys if k in config) + "\n\n")
