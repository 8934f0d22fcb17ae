"""Typed errors of the service. Each carries the HTTP status it maps to at the boundary (backend/app.py);
the message is what the client reads in {"error": "..."} — never a traceback."""

from __future__ import annotations


class BackendError(Exception):
    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigError(BackendError):
    """A setting of the environment is invalid (raised at start-up)."""


class BadRequest(BackendError):
    status = 400


class LabelConfigError(BackendError):
    """The project's label config lacks what the backend needs, or a request names an unknown label."""

    status = 422


class ImageTooLarge(BackendError):
    status = 413


class UnsupportedImage(BackendError):
    """The bytes are not a decodable image."""

    status = 415


class ImageFetchError(BackendError):
    """The image could not be obtained from its source (unreachable, HTTP error, timeout)."""

    status = 502


class NotReady(BackendError):
    status = 503
