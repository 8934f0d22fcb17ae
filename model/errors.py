"""Typed exceptions of the model package; the service maps them to HTTP codes at its boundary."""
from __future__ import annotations


class ModelError(Exception):
    """Base class of every error raised by model/."""


class ConfigError(ModelError, ValueError):
    """A configuration value is invalid or names something unknown."""


class CheckpointError(ModelError):
    """A checkpoint is missing, corrupt, or does not match the expected architecture/keys."""


class InputError(ModelError, ValueError):
    """An image, click or box given to a predictor is malformed."""


class BankError(ModelError):
    """A reference bank cannot be built, loaded, or used with the given engine."""
