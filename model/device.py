"""Device resolution in one place: "auto" picks CUDA when available, else CPU."""
from __future__ import annotations

import logging

import torch

from model.errors import ConfigError

logger = logging.getLogger(__name__)

_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """Map "auto" | "cpu" | "cuda" (or "cuda:N") to a torch.device; "cuda" without CUDA is an error."""
    key = (name or "auto").strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        return torch.device(key)
    raise ConfigError(f"unknown device {name!r}; expected one of {_CHOICES}")
