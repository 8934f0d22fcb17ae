"""Outbound HTTP for task images: one strict reading of a URL (the one requests/urllib3 will connect to), URLs
redacted for messages and logs, a session that keeps no cookies, and a wall-clock deadline enforced on the socket.

Why a strict reading: task data is written by whoever can import tasks. A URL such as
``http://127.0.0.2:9512\\@127.0.0.1:9511/x.jpg`` reads as host 127.0.0.1 to ``urllib.parse`` but requests
connects to 127.0.0.2 (the host ends at the backslash), so an origin check done with one parser and a download
done with another sends the Label Studio token to the wrong host. Here the URL is first prepared by requests
(exactly what it will put on the wire), then split by urllib3's ``parse_url`` (what the connection pool uses) and by
``urllib.parse``; URLs on which the two disagree, or with a backslash or a control character, are refused.

Why a deadline on the socket: a read timeout restarts with every byte and ``iter_content`` blocks until a whole
chunk has arrived, so a server that trickles 100 bytes every 0.5 s holds a download for minutes. Here every
connection used while a deadline is set (``deadline(...)``) is shut down when it passes, whatever phase the
download is in (status line, headers or body). Connecting is bounded by the connect timeout, the time left when
it starts (CPython's ssl applies it to the whole TLS handshake)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from typing import ClassVar
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util import parse_url

from backend.errors import BadRequest

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Target:
    """A URL as requests will send it, and the origin urllib3 will connect to."""

    url: str  # the prepared URL (what goes on the wire)
    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int  # explicit or the scheme's default
    path: str  # the path as sent (percent-encoded, dot segments not removed)
    has_userinfo: bool

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def display(self) -> str:
        """host[:port] (the port when not the scheme's default) without credentials, for messages and logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host + ("" if self.port == _DEFAULT_PORTS.get(self.scheme) else f":{self.port}")


def redact(url: str) -> str:
    """The URL with any ``user:pass@`` removed (best effort on malformed URLs); for messages and logs."""
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    authority_end = len(rest)
    for stop in "/?#":  # not at a backslash: "user:pass\\@host" must be redacted too
        idx = rest.find(stop)
        if idx != -1:
            authority_end = min(authority_end, idx)
    authority = rest[:authority_end]
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    return f"{scheme}://{authority}{rest[authority_end:]}"


def _short(url: str, limit: int = 200) -> str:
    text = redact(url)
    return text if len(text) <= limit else text[:limit] + "..."


def check_url(url: str) -> Target:
    """The Target requests/urllib3 will use for `url`, or BadRequest naming what is wrong (URL redacted)."""
    if not isinstance(url, str):
        raise BadRequest("an image URL must be a string")
    shown = _short(url)
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise BadRequest(f"image URL {shown!r} contains a control character")
    if "\\" in url:
        raise BadRequest(f"image URL {shown!r} contains a backslash (hosts disagree on where it ends the host)")
    try:
        prepared = requests.Request("GET", url).prepare().url or ""
        stable = requests.Request("GET", prepared).prepare().url == prepared  # what is sent is what is checked
        parsed = parse_url(prepared)
        split = urlsplit(prepared)
        split_port = split.port
    except (requests.RequestException, urllib3.exceptions.LocationParseError, ValueError, UnicodeError):
        raise BadRequest(
            f"image URL {shown!r} is not a valid URL (check the host and the port, 1-65535)"
        ) from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in _DEFAULT_PORTS:
        raise BadRequest(f"image URL {shown!r} must start with http:// or https://")
    host = (parsed.host or "").lower().strip("[]")
    if not host:
        raise BadRequest(f"image URL {shown!r} has no host")
    port = parsed.port or _DEFAULT_PORTS[scheme]
    other = ((split.scheme or "").lower(), (split.hostname or "").lower(), split_port or _DEFAULT_PORTS[scheme])
    if not stable:
        raise BadRequest(f"image URL {shown!r} changes when read twice (encoded dot segments such as %2e%2e?)")
    if other != (scheme, host, port) or bool(parsed.auth) != ("@" in split.netloc):
        raise BadRequest(f"image URL {shown!r} is ambiguous: URL parsers disagree on its host")
    return Target(prepared, scheme, host, port, split.path or "/", bool(parsed.auth))


# -- no cookies -------------------------------------------------------------------------------------------------
class _NoCookies(DefaultCookiePolicy):
    """Accept no cookie and send none: Label Studio's token auth needs no cookie, and one shared jar would carry
    a cookie Label Studio set (sessionid) to other ports of its host and to image hosts."""

    def set_ok(self, cookie, request) -> bool:
        return False

    def return_ok(self, cookie, request) -> bool:
        return False


# -- a deadline on the socket -----------------------------------------------------------------------------------
_local = threading.local()


class Deadline:
    """A wall-clock end for everything a download does. Each connection that starts waiting for an answer while
    the deadline is current gets a timer that shuts its socket down at the deadline; a blocked read then returns
    at once, and `expired` tells the caller why."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = False
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def watch(self, conn) -> None:
        """Shut `conn`'s socket down at the deadline, unless another request has taken the connection over by
        then (connections go back to the pool between redirect hops and may serve another thread). The socket is
        captured now: http.client drops `conn.sock` for a response that closes the connection, while the body is
        still read through it; once really closed, shutting it down is a harmless OSError."""
        sock = getattr(conn, "sock", None)
        if sock is None:
            return
        timer = threading.Timer(max(0.0, self.remaining()), self._shut, (conn, sock))
        timer.daemon = True
        with self._lock:
            self._timers.append(timer)
        timer.start()

    def _shut(self, conn, sock: socket.socket) -> None:
        if getattr(conn, "deadline_owner", None) is not self:  # taken over by another request meanwhile
            return
        self.expired = True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[Deadline]:
    """Run the block with a Deadline current in this thread (connections made through `session()`)."""
    current = Deadline(seconds)
    previous = getattr(_local, "deadline", None)
    _local.deadline = current
    try:
        yield current
    finally:
        _local.deadline = previous
        current.cancel()


class _Watched:
    deadline_owner: Deadline | None = None  # the Deadline of the request now using this connection

    def getresponse(self, *args, **kwargs):
        current = getattr(_local, "deadline", None)
        self.deadline_owner = current
        if current is not None:
            current.watch(self)
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _DeadlineAdapter(HTTPAdapter):
    _POOLS: ClassVar[dict[str, type]] = {"http": _HTTPPool, "https": _HTTPSPool}

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(self._POOLS)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(self._POOLS)
        return manager


def harden(sess: requests.Session) -> requests.Session:
    """Make `sess` keep no cookies and honour `deadline(...)` on its connections; returns it."""
    sess.cookies.set_policy(_NoCookies())
    sess.cookies.clear()
    adapter = _DeadlineAdapter()
    sess.mount("http://", adapter)
    sess.mount("https://", adapter)
    return sess


def session() -> requests.Session:
    return harden(requests.Session())
