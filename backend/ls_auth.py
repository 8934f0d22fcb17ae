"""Label Studio credentials for downloads. LABEL_STUDIO_API_KEY is either a legacy token (sent as
`Authorization: Token <key>`) or a personal access token, i.e. a JWT refresh token, exchanged at
POST /api/token/refresh/ for a short-lived access JWT sent as `Bearer` (refreshed before it expires and again
after a 401). Headers are produced only for URLs on the LABEL_STUDIO_URL origin (scheme, host, port, as
requests/urllib3 will connect: backend.outbound.check_url) whose path is one Label Studio serves files from
(FILE_PATHS); never for a URL carrying its own credentials. The refresh POST follows no redirect."""

from __future__ import annotations

import logging
import re
import threading
import time
from urllib.parse import unquote

import jwt
import requests

from backend.errors import BadRequest, ConfigError, ImageFetchError
from backend.outbound import Target, check_url

logger = logging.getLogger(__name__)

_EARLY_S = 30.0  # refresh this long before the access token expires


def _claims(token: str) -> dict | None:
    try:
        return jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
    except jwt.InvalidTokenError:
        return None


# The paths Label Studio 1.23 serves task files from (data_import/urls.py, io_storages/urls.py): uploads, the
# local-files view, the upload storage proxy and the cloud-URI resolvers (presign is the older name of resolve).
FILE_PATHS = re.compile(
    r"/(data/upload/[^?#]+|data/local-files/?|storage-data/uploaded/?|(tasks|projects)/[0-9]+/(presign|resolve)/?)"
)


def _has_dot_segment(path: str) -> bool:
    """True when any segment of `path` is '.' or '..' once percent-decoded (a proxy in front of Label Studio may
    normalise it away and serve another path than the one checked)."""
    return any(seg in (".", "..") for seg in unquote(unquote(path)).replace("\\", "/").split("/"))


class TokenProvider:
    def __init__(self, base_url: str, api_key: str, session: requests.Session, timeout_s: float = 10.0):
        self.base_url = base_url.rstrip("/")
        try:
            self._base: Target | None = check_url(self.base_url + "/") if self.base_url else None
        except BadRequest as exc:
            raise ConfigError(f"LABEL_STUDIO_URL: {exc.message}") from None
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
        self._access: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        self.refresh_count = 0

    @property
    def can_refresh(self) -> bool:
        return self.kind == "refresh"

    def is_ls_origin(self, target: Target) -> bool:
        """`target` connects to LABEL_STUDIO_URL's scheme, host and port."""
        return self._base is not None and target.origin == self._base.origin

    def ls_file_path(self, target: Target) -> str | None:
        """The Label Studio route of `target` (its path below LABEL_STUDIO_URL's path) when it is one that serves
        task files, else None."""
        if self._base is None or not self.is_ls_origin(target) or _has_dot_segment(target.path):
            return None
        prefix = self._base.path.rstrip("/")
        if not target.path.startswith(prefix + "/"):
            return None
        route = target.path[len(prefix) :]
        return route if FILE_PATHS.fullmatch(route) else None

    def may_authenticate(self, target: Target) -> bool:
        """The token may go to `target`: the exact LABEL_STUDIO_URL origin, a file-serving path, no URL
        credentials of its own."""
        return not target.has_userinfo and self.ls_file_path(target) is not None

    def headers_for(self, target: Target) -> dict[str, str]:
        if self.kind == "none" or not self.may_authenticate(target):
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
            resp = self.session.post(
                url, json={"refresh": self.api_key}, timeout=self.timeout_s, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise ImageFetchError(
                f"cannot refresh the Label Studio access token: {type(exc).__name__}"
            ) from exc
        if resp.is_redirect:
            resp.close()
            raise ImageFetchError(
                f"Label Studio answered the token refresh with a redirect (HTTP {resp.status_code}); the personal "
                "access token is never sent after a redirect: set LABEL_STUDIO_URL to the address it serves on"
            )
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
