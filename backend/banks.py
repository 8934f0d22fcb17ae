"""Reference banks of the service: which images, in which order they join a progressively built bank, and the
memory they may hold.

- `reference_set_key`: projects whose reference images are the same files (paths, sizes, mtimes) under the
  same model share one bank (issue 15 D6).
- `screen_references`: a file in a reference folder that is not an image, or a decompression bomb, is skipped
  with a WARNING from its header alone (nothing decoded), instead of failing every click of the project.
- `spread_order` / `bank_stages`: a project's first bank holds a few references spread over the folder and is
  ready within seconds; the bank then grows in the background (issue 12 req 7).
- `BankLRU`: the banks held in memory, least recently used freed first beyond a byte budget."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Hashable, Iterable
from pathlib import Path

from PIL import Image

from backend.cache import ByteLRU, V

logger = logging.getLogger(__name__)


def reference_set_key(version: str, images: Iterable[Path], limit: int) -> str:
    """Identity of a project's reference set: the model version, the reference limit and every image's path,
    size and modification time (a replaced file gives a new key)."""
    h = hashlib.sha1(f"{version}|{limit}".encode())
    for path in images:
        try:
            st = path.stat()
            h.update(f"|{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"|{path}:missing".encode())
    return h.hexdigest()[:20]


def screen_references(images: Iterable[Path], max_pixels: int) -> list[Path]:
    """The images whose header reads as an image of at most `max_pixels` pixels; the others are skipped with a
    WARNING naming the file (its name only, never the server's folder) and why."""
    kept = []
    for path in images:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    width, height = im.size
        except Image.DecompressionBombError:
            reason = "a decompression bomb (too many pixels)"
        except (OSError, ValueError, SyntaxError):
            reason = "not a readable image"
        else:
            if width * height <= max_pixels:
                kept.append(path)
                continue
            reason = f"{width}x{height} pixels, more than the limit of {max_pixels}"
        logger.warning("reference image %s skipped: %s", path.name, reason)
    return kept


def spread_order(n: int) -> list[int]:
    """A permutation of range(n) whose every prefix is spread evenly over the range (van der Corput order:
    0, n/2, n/4, 3n/4, ...), so the first few references of a sorted folder cover all of it, not its start."""
    if n <= 0:
        return []
    bits = max(1, (n - 1).bit_length())
    out = dict.fromkeys(
        (int(format(k, f"0{bits}b")[::-1], 2) * n) >> bits for k in range(1 << bits)
    )
    return list(out)


def bank_stages(n: int, first: int, augment_below: int = 0, factor: int = 4) -> list[int]:
    """Sizes of the successive banks of a progressive build over n references: `first`, then x`factor` each
    step, then n. A set smaller than the engine's augmentation threshold gets a quick first bank of plain
    views before the augmented one."""
    if n <= 0:
        return [0]
    first = max(1, first)
    if n < augment_below:
        return [min(first, n), n]
    stages, size = [], first
    while size < n:
        stages.append(size)
        size *= factor
    return stages + [n]


class BankLRU(ByteLRU[V]):
    """Thread-safe map key -> value (a project model over one bank), bounded by the banks' bytes: beyond the
    budget the least recently used values are dropped (freed once no request holds them). The value just put
    is never dropped, even alone over the budget: a project must be able to serve."""

    def __init__(self, budget_bytes: int):
        super().__init__(budget_bytes, keep_newest=True)

    def put(self, key: Hashable, value: V, size: int | None = None) -> list[Hashable]:
        dropped = super().put(key, value, size)
        for old in dropped:
            logger.info("reference bank %s freed (bank memory over its budget of %d MB)", old,
                        self.budget >> 20)
        return dropped

    def snapshot(self) -> dict:
        with self._lock:
            return {"banks": len(self._items), "bytes": self._bytes, "budget_bytes": self.budget,
                    "evictions": self.stats.evictions}
