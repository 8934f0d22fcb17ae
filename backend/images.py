"""Task image reference -> (H, W, 3) uint8 RGB array.

References: absolute http(s) URLs, data: URIs, Label Studio paths (/data/upload/..., /data/local-files/?d=...,
/storage-data/...) and cloud URIs (s3://, gs://, azure-blob://) that Label Studio presigns
(/tasks/<id>/presign/?fileuri=<base64>, as the SDK's get_local_path does).

Outbound requests (docs/SECURITY.md, "Outbound requests: where the token goes"): every URL is read once, the way
requests/urllib3 will connect (backend.outbound.check_url); the Label Studio token goes only to the exact
LABEL_STUDIO_URL origin and only to the paths Label Studio serves files from (a Label Studio path outside them is a
400); redirects are followed here, hop by hop, each hop checked again, and the token is never sent again once a
hop has left that origin; the session keeps no cookies; URL credentials never appear in a message. A download
has a wall-clock deadline (IMAGE_TIMEOUT_S) enforced on the socket, and at most DOWNLOAD_CONCURRENCY run at once
per process. Limits (timeout, bytes, pixels) raise typed errors that name the problem. Downloads are cached on
disk."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import posixpath
import stat
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import numpy as np
import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import (
    concat_urls,
    encode_presign_fileuri,
    is_cloud_storage_uri,
    safe_build_path,
)
from PIL import Image, ImageOps, UnidentifiedImageError

from backend import outbound
from backend.disk_cache import DiskCache
from backend.errors import BadRequest, ImageFetchError, ImageTooLarge, NotReady, UnsupportedImage
from backend.ls_auth import TokenProvider
from backend.outbound import Target, check_url, redact
from backend.settings import Settings

logger = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_MAX_REDIRECTS = 5


class HTTPStatusError(ImageFetchError):
    """The image source answered with an HTTP error status (kept as `http_status`)."""

    def __init__(self, message: str, http_status: int):
        super().__init__(message)
        self.http_status = http_status


@dataclass(frozen=True)
class Source:
    kind: str  # "url" (download), "file" (read from disk), "inline" (data: URI)
    location: str  # URL, file path, or the data URI
    fallback: str | None = None  # a second URL to try when the first answers HTTP 404 (legacy /data/upload)

    @property
    def key(self) -> str:
        return hashlib.sha1(f"{self.kind}:{self.location}".encode()).hexdigest()


@dataclass
class LoadedImage:
    key: str  # stable per source, used for caching per-image work
    array: np.ndarray  # (H, W, 3) uint8 RGB, EXIF orientation applied

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    @property
    def height(self) -> int:
        return int(self.array.shape[0])


class ImageLoader:
    def __init__(self, settings: Settings, session: requests.Session | None = None):
        self.settings = settings
        self.session = outbound.harden(session or requests.Session())
        self._slots = threading.BoundedSemaphore(settings.download_concurrency)
        self.auth = TokenProvider(
            settings.label_studio_url,
            settings.label_studio_api_key,
            self.session,
            timeout_s=settings.image_timeout_s,
        )
        self.disk = DiskCache(settings.model_dir / "downloads", settings.download_cache_bytes)

    # -- resolution ------------------------------------------------------------------------------------------
    def _ls(self, path: str, ref: str) -> str:
        if not self.settings.label_studio_url:
            raise ImageFetchError(
                f"LABEL_STUDIO_URL is not set, so the Label Studio path {redact(ref)[:200]!r} cannot be downloaded"
            )
        url = concat_urls(self.settings.label_studio_url, path)
        self._check_ls_url(check_url(url), ref)
        return url

    def _check_ls_url(self, target: Target, ref: str) -> None:
        """A Label Studio path from task data (sent with the token) must be one Label Studio serves task files
        from: /api/... or any other page of Label Studio is refused. (An absolute URL to another page of Label
        Studio's origin is fetched like any other host's, without the token.)"""
        if self.auth.ls_file_path(target) is None:
            raise BadRequest(
                f"image reference {redact(ref)[:200]!r} is not a Label Studio file path: only /data/upload/..., "
                "/data/local-files/?d=..., /storage-data/uploaded/?filepath=... and "
                "/tasks/<id>/presign/?fileuri=... are fetched from Label Studio"
            )

    def resolve(self, ref: str, task_id: int | None = None) -> Source:
        if not isinstance(ref, str) or not ref.strip():
            raise BadRequest("task has no image reference (empty data value)")
        ref = ref.strip()
        if ref.startswith("data:"):
            return Source("inline", ref)
        if ref.lower().startswith(("http://", "https://")):
            check_url(ref)  # a malformed or ambiguous URL is a 400 here; the token is decided per hop (_follow)
            return Source("url", ref)
        if is_cloud_storage_uri(ref):
            if task_id is None:
                raise BadRequest(
                    f"cloud storage URI {redact(ref)[:200]!r} needs the task id to be presigned by Label Studio"
                )
            return Source(
                "url", self._ls(f"/tasks/{int(task_id)}/presign/?fileuri={encode_presign_fileuri(ref)}", ref)
            )
        if ref.startswith(("upload/", "/upload/")):
            ref = "/data/" + ref.lstrip("/")
        if ref.startswith("/data/local-files") and "d=" in ref:
            if self.settings.local_files_root:
                return Source("file", self._local_path(ref))
            return Source("url", self._ls(ref, ref))
        if ref.startswith("/data/upload/"):
            legacy = self._ls(ref, ref)
            return Source(
                "url",
                legacy,
                fallback=self._ls(f"/storage-data/uploaded/?filepath={ref[len('/data/') :]}", ref),
            )
        if ref.startswith("/"):
            return Source("url", self._ls(ref, ref))
        raise BadRequest(
            f"unsupported image reference {redact(ref)[:200]!r}: expected an http(s) URL, a Label Studio "
            "path or a cloud storage URI"
        )

    def _local_path(self, ref: str) -> str:
        """/data/local-files/?d=<rel> -> a real file path inside LOCAL_FILES_DOCUMENT_ROOT. The check is made on
        the resolved path (symbolic links followed), so a link inside the root pointing outside it is refused."""
        rel = (parse_qs(urlsplit(ref).query).get("d") or [""])[-1]
        if "\x00" in rel:
            raise BadRequest("local file path contains a null byte")
        root = self.settings.local_files_root
        try:
            path = safe_build_path(root, posixpath.normpath(rel).lstrip("/"))
        except ValueError as exc:
            raise BadRequest(f"local file path {rel[:200]!r} escapes LOCAL_FILES_DOCUMENT_ROOT") from exc
        real_root, real = os.path.realpath(root), os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise BadRequest(
                f"local file path {rel[:200]!r} leads outside LOCAL_FILES_DOCUMENT_ROOT (a symbolic link)"
            )
        return real

    # -- bytes -----------------------------------------------------------------------------------------------
    def _download(self, url: str) -> bytes:
        """GET `url` within one wall-clock deadline (IMAGE_TIMEOUT_S for all hops, the token refresh and the
        body), following at most _MAX_REDIRECTS redirects by hand."""
        timeout = self.settings.image_timeout_s
        shown = check_url(url).display
        late = f"image download from {shown} timed out after {timeout:g} s (IMAGE_TIMEOUT_S, whole download)"
        with outbound.deadline(timeout) as dl:
            try:
                return self._follow(url, dl)
            except HTTPStatusError:
                raise
            except ImageFetchError as exc:  # e.g. the token refresh, cut short by the deadline
                if dl.expired:
                    raise ImageFetchError(late) from exc
                raise
            except requests.RequestException as exc:
                if dl.expired or isinstance(exc, requests.Timeout):
                    raise ImageFetchError(late) from exc
                if isinstance(exc, requests.ConnectionError):
                    raise ImageFetchError(
                        f"cannot reach {shown} to download the image: {type(exc).__name__}"
                    ) from exc
                raise ImageFetchError(f"image download from {shown} failed: {type(exc).__name__}") from exc

    def _follow(self, url: str, dl: outbound.Deadline) -> bytes:
        authenticate, retried = True, False
        for _hop in range(_MAX_REDIRECTS + 1):
            target = check_url(url)
            if not (authenticate and self.auth.may_authenticate(target)):
                authenticate = False  # once a hop leaves the Label Studio origin, no later hop gets the token
            headers = self.auth.headers_for(target) if authenticate else {}
            left = max(0.001, dl.remaining())
            with self.session.get(
                target.url, headers=headers, stream=True, timeout=(left, left), allow_redirects=False
            ) as resp:
                if resp.is_redirect:
                    location = self.session.get_redirect_target(resp)
                    url = requests.compat.urljoin(resp.url, location)
                    try:
                        check_url(url)
                    except BadRequest as exc:  # the image host's answer is at fault, not the task: a 502
                        raise ImageFetchError(
                            f"{target.display} redirected to a refused URL: {exc.message}"
                        ) from None
                    continue
                if resp.status_code == 401 and headers and not retried and self.auth.can_refresh:
                    self.auth.invalidate()
                    retried = True
                    with self.session.get(
                        target.url,
                        headers=self.auth.headers_for(target),
                        stream=True,
                        timeout=(max(0.001, dl.remaining()),) * 2,
                        allow_redirects=False,
                    ) as again:
                        return self._body(again, target, bool(headers), dl)
                return self._body(resp, target, bool(headers), dl)
        raise ImageFetchError(
            f"image download from {check_url(url).display} redirected more than {_MAX_REDIRECTS} times"
        )

    def _body(
        self, resp: requests.Response, target: Target, authenticated: bool, dl: outbound.Deadline
    ) -> bytes:
        limit, shown = self.settings.max_image_bytes, target.display
        if resp.is_redirect:
            raise ImageFetchError(f"image download from {shown} redirected again after a token refresh")
        if resp.status_code >= 400:
            hint = ""
            if resp.status_code in (401, 403) and self.auth.is_ls_origin(target):
                hint = (
                    " (check LABEL_STUDIO_API_KEY)"
                    if authenticated
                    else " (LABEL_STUDIO_API_KEY is not set)"
                    if self.auth.kind == "none"
                    else " (the token is sent only to Label Studio's file paths, never after a redirect from "
                    "another host)"
                )
            raise HTTPStatusError(
                f"image download from {shown} failed: HTTP {resp.status_code}{hint}", resp.status_code
            )
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ImageTooLarge(f"image at {shown} is {int(declared)} bytes, over the limit of {limit} bytes")
        buf = bytearray()
        for chunk in resp.iter_content(_CHUNK):
            buf += chunk
            if len(buf) > limit:
                raise ImageTooLarge(f"image at {shown} exceeds the limit of {limit} bytes")
        if dl.expired:  # the socket was shut at the deadline: what arrived is not the whole image
            raise ImageFetchError(f"image download from {shown} timed out after {dl.seconds:g} s")
        return bytes(buf)

    def _read_file(self, path: str) -> bytes:
        """Read a regular file: opened without following a symbolic link swapped in since the check and without
        blocking (a FIFO placed in the root would hold the thread forever), then checked to be a regular file."""
        name = posixpath.basename(path)
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError as exc:
            raise ImageFetchError(f"local file {name!r} not found under the document root") from exc
        except OSError as exc:
            raise ImageFetchError(f"cannot read local file {name!r}: {exc.strerror}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BadRequest(f"local file {name!r} is not a regular file")
        with os.fdopen(fd, "rb") as fh:
            try:
                data = fh.read(self.settings.max_image_bytes + 1)
            except OSError as exc:
                raise ImageFetchError(f"cannot read local file {name!r}: {exc.strerror}") from exc
        if len(data) > self.settings.max_image_bytes:
            raise ImageTooLarge(f"local image exceeds the limit of {self.settings.max_image_bytes} bytes")
        return data

    def _inline(self, uri: str) -> bytes:
        header, _, payload = uri.partition(",")
        if ";base64" not in header:
            raise BadRequest("data: URIs must be base64-encoded")
        if len(payload) * 3 // 4 > self.settings.max_image_bytes:
            raise ImageTooLarge(f"inline image exceeds the limit of {self.settings.max_image_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise BadRequest("data: URI holds invalid base64") from exc

    def fetch_bytes(self, source: Source, slot_wait_s: float | None = None) -> bytes:
        if source.kind == "inline":
            return self._inline(source.location)
        if source.kind == "file":
            return self._read_file(source.location)
        cached = self.disk.get(source.key)
        if cached is not None:
            return cached
        wait = self.settings.image_timeout_s if slot_wait_s is None else slot_wait_s
        if not self._slots.acquire(timeout=wait):
            raise NotReady(
                f"{self.settings.download_concurrency} image downloads are already running in this process "
                "(DOWNLOAD_CONCURRENCY); try again in a moment"
            )
        try:
            try:
                data = self._download(source.location)
            except HTTPStatusError as exc:
                if source.fallback is None or exc.http_status != 404:
                    raise
                data = self._download(source.fallback)
        finally:
            self._slots.release()
        self.disk.put(source.key, data)
        return data

    def load_source(self, source: Source, slot_wait_s: float | None = None) -> LoadedImage:
        """`slot_wait_s`: how long to wait for a free download slot (None: up to IMAGE_TIMEOUT_S; request
        threads pass a short wait so that busy slots are a quick 503, not a held server thread)."""
        array = decode_image(self.fetch_bytes(source, slot_wait_s), self.settings.max_image_pixels)
        return LoadedImage(key=source.key, array=array)

    def load(self, ref: str, task_id: int | None = None) -> LoadedImage:
        return self.load_source(self.resolve(ref, task_id))


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB, EXIF orientation applied; the pixel limit is checked before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} pixels"
                )
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image has too many pixels to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedImage(
            f"the downloaded data ({len(data)} bytes) is not an image format Pillow can read"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnsupportedImage(f"the image data is truncated or corrupt: {exc}") from exc


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        gray = arr.astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
