"""Self-describing checkpoints {arch, config, state_dict, meta}, saved atomically, loaded safely."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from model.atomic import atomic_write
from model.errors import CheckpointError

logger = logging.getLogger(__name__)

_REQUIRED = ("arch", "config", "state_dict", "meta")


def atomic_save(obj: Any, path: Path | str) -> Path:
    """torch.save to a temp file in the target folder, fsync, then os.replace: readers never see a partial file."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def make_checkpoint(arch: str, config: dict, state_dict: dict, meta: dict | None = None) -> dict:
    return {"arch": arch, "config": dict(config), "state_dict": state_dict, "meta": dict(meta or {})}


def load_checkpoint(path: Path | str, expected_arch: str | None = None) -> dict:
    """Load with map_location="cpu", weights_only=True; check the layout and (optionally) the arch name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED):
        raise CheckpointError(f"{path} is not a {{arch, config, state_dict, meta}} checkpoint")
    if expected_arch is not None and ckpt["arch"] != expected_arch:
        raise CheckpointError(f"{path} holds arch {ckpt['arch']!r}, expected {expected_arch!r}")
    return ckpt
