"""Image loading: reference resolution, Label Studio auth (legacy token, PAT -> JWT, refresh on 401), the
token never leaving the LABEL_STUDIO_URL host, limits, EXIF rotation, the disk cache. Two local HTTP
servers."""

import json
import time
from dataclasses import replace
from pathlib import Path

import jwt
import numpy as np
import pytest

from backend.errors import BadRequest, ImageFetchError, ImageTooLarge, UnsupportedImage
from backend.images import ImageLoader, decode_image
from backend.settings import Settings
from tests.api_support import RecordingServer, Route, defect_image, encode


@pytest.fixture()
def ls():
    with RecordingServer() as server:
        yield server


@pytest.fixture()
def other():
    with RecordingServer() as server:
        yield server


def make_settings(tmp_path: Path, url: str = "", key: str = "", **kw) -> Settings:
    return replace(
        Settings(),
        label_studio_url=url,
        label_studio_api_key=key,
        model_dir=tmp_path / "models",
        image_timeout_s=kw.pop("image_timeout_s", 2.0),
        **kw,
    )


def png(seed=0):
    return encode(defect_image(seed=seed)[0])


def test_legacy_token_goes_only_to_the_label_studio_host(tmp_path, ls, other):
    ls.routes["/data/upload/1/a.png"] = Route(png())
    other.routes["/b.png"] = Route(png(1))
    loader = ImageLoader(make_settings(tmp_path, ls.url, "legacy123"))
    assert loader.load("/data/upload/1/a.png").array.shape == (96, 128, 3)
    assert loader.load(f"{other.url}/b.png").array.shape == (96, 128, 3)
    assert ls.auth_headers("/data/upload") == ["Token legacy123"]
    assert other.auth_headers("/b.png") == [None]


def test_redirect_to_another_host_drops_the_token(tmp_path, ls, other):
    other.routes["/bucket/img.png"] = Route(png())
    ls.routes["/tasks/7/presign/"] = Route(status=303, headers={"Location": f"{other.url}/bucket/img.png"})
    loader = ImageLoader(make_settings(tmp_path, ls.url, "legacy123"))
    img = loader.load("s3://bucket/img.png", task_id=7)
    assert img.array.shape == (96, 128, 3)
    presign = [p for m, p, h, _ in ls.requests if p.startswith("/tasks/7/presign/")]
    assert presign and "fileuri=" in presign[0]
    assert ls.auth_headers("/tasks/7/presign") == ["Token legacy123"]
    assert other.auth_headers("/bucket") == [None]


def _jwt(kind: str, ttl: float) -> str:
    claims = {"token_type": kind, "exp": int(time.time() + ttl), "jti": str(time.time_ns())}
    return jwt.encode(claims, "test-secret-key-of-thirty-two-bytes!", algorithm="HS256")


def test_personal_access_token_is_refreshed_to_a_bearer_jwt_and_again_after_401(tmp_path, ls):
    refresh = _jwt("refresh", 3600)
    issued: list[str] = []

    def refresh_handler(handler, body):
        assert json.loads(body) == {"refresh": refresh}
        issued.append(_jwt("access", 300))
        return 200, {"Content-Type": "application/json"}, json.dumps({"access": issued[-1]}).encode()

    def image_handler(handler, body):
        if handler.headers.get("Authorization") != f"Bearer {issued[-1]}":
            return 401, {}, b"{}"
        return 200, {}, png()

    ls.routes["/api/token/refresh/"] = Route(handler=refresh_handler)
    ls.routes["/data/upload/1/a.png"] = Route(handler=image_handler)
    loader = ImageLoader(make_settings(tmp_path, ls.url, refresh, download_cache_bytes=0))
    loader.load("/data/upload/1/a.png")
    loader.load("/data/upload/1/a.png")
    assert len(issued) == 1  # the access token is reused while valid
    issued.append(_jwt("access", 300))  # the server rotates: our cached access token now gets 401
    loader.load("/data/upload/1/a.png")
    assert len(issued) == 3 and loader.auth.refresh_count == 2
    assert all(h.startswith("Bearer ") for h in ls.auth_headers("/data/upload"))
    assert refresh not in " ".join(ls.auth_headers("/data/upload"))  # the raw PAT is never sent as Bearer


def test_refused_refresh_is_a_502_naming_the_key(tmp_path, ls):
    ls.routes["/api/token/refresh/"] = Route(b"{}", status=401)
    ls.routes["/data/upload/1/a.png"] = Route(png())
    loader = ImageLoader(make_settings(tmp_path, ls.url, _jwt("refresh", 3600)))
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_API_KEY"):
        loader.load("/data/upload/1/a.png")


def test_upload_path_falls_back_to_the_storage_proxy(tmp_path, ls):
    ls.routes["/storage-data/uploaded/"] = Route(png())
    loader = ImageLoader(make_settings(tmp_path, ls.url, "tok123"))
    assert loader.load("upload/3/x.png").height == 96
    paths = [p for _, p, _, _ in ls.requests]
    assert paths == ["/data/upload/3/x.png", "/storage-data/uploaded/?filepath=upload/3/x.png"]


def test_local_files_from_the_document_root_or_from_label_studio(tmp_path, ls):
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a.png").write_bytes(png())
    loader = ImageLoader(make_settings(tmp_path, ls.url, "t", local_files_root=str(root)))
    assert loader.load("/data/local-files/?d=imgs/a.png").width == 128
    assert ls.requests == []
    with pytest.raises(BadRequest, match="escapes"):
        loader.load("/data/local-files/?d=../../etc/passwd")
    ls.routes["/data/local-files/"] = Route(png())
    remote = ImageLoader(make_settings(tmp_path / "2", ls.url, "t"))
    assert remote.load("/data/local-files/?d=imgs/a.png").width == 128
    assert ls.auth_headers("/data/local-files") == ["Token t"]


def test_label_studio_paths_need_label_studio_url(tmp_path):
    loader = ImageLoader(make_settings(tmp_path))
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL"):
        loader.load("/data/upload/1/a.png")
    with pytest.raises(BadRequest, match="unsupported image reference"):
        loader.load("ftp://x/y.png")
    with pytest.raises(BadRequest, match="task id"):
        loader.load("gs://b/a.png")


@pytest.mark.parametrize(
    "route, settings_kw, error, match",
    [
        (Route(png(), delay_s=1.5), {"image_timeout_s": 0.5}, ImageFetchError, "timed out"),
        (Route(png()), {"max_image_bytes": 1000}, ImageTooLarge, "over the limit of 1000 bytes"),
        (
            Route(png(), headers={"Content-Length": None, "Connection": "close"}),
            {"max_image_bytes": 1000},
            ImageTooLarge,
            "exceeds the limit",
        ),
        (Route(png()), {"max_image_pixels": 5000}, ImageTooLarge, "pixels"),
        (Route(b"<html>not an image</html>"), {}, UnsupportedImage, "not an image"),
        (Route(png()[:200]), {}, UnsupportedImage, "truncated or corrupt"),
        (Route(b"gone", status=404), {}, ImageFetchError, "HTTP 404"),
    ],
)
def test_limits_and_failures_name_the_problem(tmp_path, other, route, settings_kw, error, match):
    other.routes["/img"] = route
    loader = ImageLoader(make_settings(tmp_path, **settings_kw))
    with pytest.raises(error, match=match):
        loader.load(f"{other.url}/img")


def test_unreachable_host_is_a_502(tmp_path):
    loader = ImageLoader(make_settings(tmp_path))
    with pytest.raises(ImageFetchError, match="cannot reach 127.0.0.1:9"):
        loader.load("http://127.0.0.1:9/x.png")


def test_exif_orientation_is_applied():
    img, _ = defect_image(h=40, w=60)
    arr = decode_image(encode(img, exif_orientation=6), 10**8)  # 6 = rotate 90 degrees clockwise to display
    assert arr.shape == (60, 40, 3)
    assert np.abs(arr.astype(int) - np.rot90(img, k=-1).astype(int)).mean() < 6


def test_sixteen_bit_and_grey_images_become_rgb():
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray((np.arange(64 * 32).reshape(32, 64) * 30).astype(np.uint16)).save(buf, format="PNG")
    arr = decode_image(buf.getvalue(), 10**8)
    assert arr.shape == (32, 64, 3) and arr.dtype == np.uint8 and arr.max() == 255


def test_download_cache_is_used_and_bounded(tmp_path, other):
    for i in range(4):
        other.routes[f"/{i}.png"] = Route(png(i))
    size = len(png(0))
    loader = ImageLoader(make_settings(tmp_path, download_cache_bytes=int(size * 2.5)))
    for i in range(4):
        loader.load(f"{other.url}/{i}.png")
    usage = loader.disk.usage()
    assert usage["files"] == 2 and usage["bytes"] <= usage["budget_bytes"]
    before = len(other.requests)
    loader.load(f"{other.url}/3.png")  # the most recent one is still cached
    assert len(other.requests) == before
    loader.load(f"{other.url}/0.png")  # evicted: downloaded again
    assert len(other.requests) == before + 1
