"""Task image reference -> (H, W, 3) uint8 RGB array.

References: absolute http(s) URLs, data: URIs, Label Studio paths (/data/upload/..., /data/local-files/?d=...,
/storage-data/...) and cloud URIs (s3://, gs://, azure-blob://) that Label Studio presigns
(/tasks/<id>/presign/?fileuri=<base64>, as the SDK's get_local_path does). The Label Studio token goes only to
the LABEL_STUDIO_URL host (scheme, host and port must match); requests drops it on redirects to other hosts.
Limits (timeout, bytes, pixels) raise typed errors that name the problem. Downloads are cached on disk."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import parse_qs, urlparse

import numpy as np
import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import (
    concat_urls,
    encode_presign_fileuri,
    is_cloud_storage_uri,
    safe_build_path,
)
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.disk_cache import DiskCache
from backend.errors import BadRequest, ImageFetchError, ImageTooLarge, UnsupportedImage
from backend.ls_auth import TokenProvider
from backend.settings import Settings

logger = logging.getLogger(__name__)

_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Source:
    kind: str  # "url" (download), "file" (read from disk), "inline" (data: URI)
    location: str  # URL, file path, or the data URI
    fallback: Optional[str] = None  # a second URL to try on 404 (legacy /data/upload path)

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
    def __init__(self, settings: Settings, session: Optional[requests.Session] = None):
        self.settings = settings
        self.session = session or requests.Session()
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
                f"LABEL_STUDIO_URL is not set, so the Label Studio path {ref!r} cannot be downloaded"
            )
        return concat_urls(self.settings.label_studio_url, path)

    def resolve(self, ref: str, task_id: Optional[int] = None) -> Source:
        if not isinstance(ref, str) or not ref.strip():
            raise BadRequest("task has no image reference (empty data value)")
        ref = ref.strip()
        if ref.startswith("data:"):
            return Source("inline", ref)
        if ref.startswith(("http://", "https://")):
            return Source("url", ref)
        if is_cloud_storage_uri(ref):
            if task_id is None:
                raise BadRequest(
                    f"cloud storage URI {ref!r} needs the task id to be presigned by Label Studio"
                )
            return Source(
                "url", self._ls(f"/tasks/{int(task_id)}/presign/?fileuri={encode_presign_fileuri(ref)}", ref)
            )
        if ref.startswith(("upload/", "/upload/")):
            ref = "/data/" + ref.lstrip("/")
        if ref.startswith("/data/local-files") and "d=" in ref:
            if self.settings.local_files_root:
                rel = (parse_qs(urlparse(ref).query).get("d") or [""])[-1]
                try:
                    path = safe_build_path(
                        self.settings.local_files_root, posixpath.normpath(rel).lstrip("/")
                    )
                except ValueError as exc:
                    raise BadRequest(f"local file path {rel!r} escapes LOCAL_FILES_DOCUMENT_ROOT") from exc
                return Source("file", path)
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
            f"unsupported image reference {ref[:200]!r}: expected an http(s) URL, a Label Studio "
            "path or a cloud storage URI"
        )

    # -- bytes -----------------------------------------------------------------------------------------------
    def _download(self, url: str, retry_auth: bool = True) -> bytes:
        limit, timeout = self.settings.max_image_bytes, self.settings.image_timeout_s
        headers = self.auth.headers_for(url)
        host = urlparse(url).netloc
        deadline = time.monotonic() + timeout
        try:
            with self.session.get(url, headers=headers, stream=True, timeout=(timeout, timeout)) as resp:
                if resp.status_code == 401 and headers and retry_auth and self.auth.can_refresh:
                    self.auth.invalidate()
                    return self._download(url, retry_auth=False)
                if resp.status_code >= 400:
                    hint = ""
                    if resp.status_code in (401, 403) and self.auth.is_ls_host(url):
                        hint = (
                            " (check LABEL_STUDIO_API_KEY)"
                            if headers
                            else " (LABEL_STUDIO_API_KEY is not set)"
                        )
                    raise ImageFetchError(f"image download from {host} failed: HTTP {resp.status_code}{hint}")
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise ImageTooLarge(
                        f"image at {host} is {int(declared)} bytes, over the limit of {limit} bytes"
                    )
                buf = bytearray()
                for chunk in resp.iter_content(_CHUNK):
                    buf += chunk
                    if len(buf) > limit:
                        raise ImageTooLarge(f"image at {host} exceeds the limit of {limit} bytes")
                    if time.monotonic() > deadline:
                        raise ImageFetchError(f"image download from {host} took longer than {timeout:g} s")
                return bytes(buf)
        except requests.Timeout as exc:
            raise ImageFetchError(f"image download from {host} timed out after {timeout:g} s") from exc
        except requests.ConnectionError as exc:
            raise ImageFetchError(f"cannot reach {host} to download the image: {type(exc).__name__}") from exc
        except requests.RequestException as exc:
            raise ImageFetchError(f"image download from {host} failed: {type(exc).__name__}") from exc

    def _read_file(self, path: str) -> bytes:
        try:
            with open(path, "rb") as fh:
                data = fh.read(self.settings.max_image_bytes + 1)
        except FileNotFoundError as exc:
            raise ImageFetchError(
                f"local file {posixpath.basename(path)!r} not found under the document root"
            ) from exc
        except OSError as exc:
            raise ImageFetchError(
                f"cannot read local file {posixpath.basename(path)!r}: {exc.strerror}"
            ) from exc
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

    def fetch_bytes(self, source: Source) -> bytes:
        if source.kind == "inline":
            return self._inline(source.location)
        if source.kind == "file":
            return self._read_file(source.location)
        cached = self.disk.get(source.key)
        if cached is not None:
            return cached
        try:
            data = self._download(source.location)
        except ImageFetchError as exc:
            if source.fallback is None or "HTTP 404" not in exc.message:
                raise
            data = self._download(source.fallback)
        self.disk.put(source.key, data)
        return data

    def load_source(self, source: Source) -> LoadedImage:
        array = decode_image(self.fetch_bytes(source), self.settings.max_image_pixels)
        return LoadedImage(key=source.key, array=array)

    def load(self, ref: str, task_id: Optional[int] = None) -> LoadedImage:
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
