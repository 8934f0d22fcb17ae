"""Label Studio credentials for downloads. LABEL_STUDIO_API_KEY is either a legacy token (sent as
`Authorization: Token <key>`) or a personal access token, i.e. a JWT refresh token, exchanged at
POST /api/token/refresh/ for a short-lived access JWT sent as `Bearer` (refreshed before it expires and again
after a 401). Headers are produced only for URLs on the LABEL_STUDIO_URL origin (scheme, host, port)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional
from urllib.parse import urlparse

import jwt
import requests

from backend.errors import ImageFetchError

logger = logging.getLogger(__name__)

_EARLY_S = 30.0  # refresh this long before the access token expires


def _claims(token: str) -> Optional[dict]:
    try:
        return jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
    except jwt.InvalidTokenError:
        return None


def _origin(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.scheme.lower(), f"{(parsed.hostname or '').lower()}:{port}"


class TokenProvider:
    def __init__(self, base_url: str, api_key: str, session: requests.Session, timeout_s: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.session = session
        self.timeout_s = timeout_s
        claims = _claims(api_key) if api_key else None
        self.kind = (
            "none"
            if not api_key
            else "legacy"
            if claims is None
            else ("refresh" if claims.get("token_type") == "refresh" else "access")
        )
        self._access: Optional[str] = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        self.refresh_count = 0

    @property
    def can_refresh(self) -> bool:
        return self.kind == "refresh"

    def is_ls_host(self, url: str) -> bool:
        return bool(self.base_url) and _origin(url) == _origin(self.base_url)

    def headers_for(self, url: str) -> dict[str, str]:
        if self.kind == "none" or not self.is_ls_host(url):
            return {}
        if self.kind == "legacy":
            return {"Authorization": f"Token {self.api_key}"}
        if self.kind == "access":
            return {"Authorization": f"Bearer {self.api_key}"}
        return {"Authorization": f"Bearer {self._access_token()}"}

    def invalidate(self) -> None:
        with self._lock:
            self._access, self._expires_at = None, 0.0

    def _access_token(self) -> str:
        with self._lock:
            if self._access is None or time.time() >= self._expires_at - _EARLY_S:
                self._access, self._expires_at = self._refresh()
            return self._access

    def _refresh(self) -> tuple[str, float]:
        url = f"{self.base_url}/api/token/refresh/"
        try:
            resp = self.session.post(url, json={"refresh": self.api_key}, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise ImageFetchError(
                f"cannot refresh the Label Studio access token: {type(exc).__name__}"
            ) from exc
        if resp.status_code != 200:
            raise ImageFetchError(
                f"Label Studio refused to refresh the personal access token (HTTP {resp.status_code}); "
                "check LABEL_STUDIO_API_KEY"
            )
        try:
            access = resp.json()["access"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ImageFetchError("Label Studio's token refresh answer has no 'access' token") from exc
        claims = _claims(access) or {}
        expires = float(claims.get("exp", time.time() + 300))
        self.refresh_count += 1
        logger.info("refreshed the Label Studio access token (valid for %.0f s)", expires - time.time())
        return access, expires
