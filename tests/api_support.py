"""Test support for the service tests: a tiny but real engine/predictor pair (colour statistics, no network
weights), synthetic images with a known defect, and a local HTTP server that records what it was sent."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from model.interactive.choose import PredictorChoice
from model.types import AnomalyResult, Click, ClickResult

# ---- images ------------------------------------------------------------------------------------------------


def defect_image(
    h: int = 96,
    w: int = 128,
    center: tuple[int, int] = (80, 40),
    radius: int = 12,
    seed: int = 0,
    color=(200, 40, 40),
) -> tuple[np.ndarray, np.ndarray]:
    """Grey textured background with one coloured disk; returns (image, defect mask). center = (x, y)."""
    rng = np.random.default_rng(seed)
    img = np.clip(128 + rng.normal(0, 6, size=(h, w, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    mask = (xx - center[0]) ** 2 + (yy - center[1]) ** 2 <= radius**2
    img[mask] = color
    return img, mask


def encode(img: np.ndarray, fmt: str = "PNG", exif_orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(img)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(buf, format="JPEG", quality=95, exif=exif)
    else:
        im.save(buf, format=fmt)
    return buf.getvalue()


# ---- a tiny real model -------------------------------------------------------------------------------------


@dataclass
class TinyBank:
    mean: np.ndarray | None  # mean RGB of the references, None = empty bank
    key: str
    n: int
    nbytes: int = 0  # what the references' pixels take (a real bank holds their features)
    images: tuple = ()  # the reference images' paths (extend() builds on them)

    def __len__(self) -> int:
        return self.n

    @property
    def source_keys(self) -> list[str]:
        return [str(p) for p in self.images]


@dataclass(frozen=True)
class TinyEngineConfig:
    augment_below: int = 0  # no augmented views


@dataclass(frozen=True)
class TinyState:
    image: np.ndarray  # (H, W, 3) float32
    distance: np.ndarray  # (H, W) float32, colour distance to the normal colour

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes + self.distance.nbytes)


class TinyEngine:
    """Normal colour = mean colour of the reference images (or the image median without references)."""

    def __init__(self, build_delay_s: float = 0.0, delay_per: int = 0):
        """build_delay_s: seconds each bank build takes (per `delay_per` references when that is > 0)."""
        self.set_image_calls = 0
        self.banks_built = 0
        self.bank_sizes: list[int] = []  # references of each bank built, in order
        self.build_delay_s = build_delay_s
        self.delay_per = delay_per
        self.lock = threading.Lock()
        self.running = 0  # set_image calls in progress now
        self.max_running = 0
        self.cfg = TinyEngineConfig()

    def config_hash(self) -> str:
        return "tiny0001"

    def cached_bank(self, images) -> None:
        return None  # no disk cache

    def extend(self, bank: TinyBank, images, progress=None, save=True) -> TinyBank:
        """The bank with more references; like the real engine's, only the new images are passed in."""
        return self.build_bank(list(bank.images) + list(images), progress)

    def build_bank(self, images, progress=None, augment=None, save=True) -> TinyBank:
        """augment and save are accepted as the real engine's (this engine has neither views nor a disk cache)."""
        images = list(images)
        with self.lock:
            self.banks_built += 1
            self.bank_sizes.append(len(images))
        if self.delay_per:  # per image, telling `progress` after each, as the real engine does
            for i in range(0, len(images), self.delay_per):
                time.sleep(self.build_delay_s)
                if progress is not None:
                    progress(min(i + self.delay_per, len(images)), len(images))
        else:
            time.sleep(self.build_delay_s)
        arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in images]
        if not arrays:
            return TinyBank(None, "empty", 0)
        mean = np.mean([a.reshape(-1, 3).mean(0) for a in arrays], axis=0)
        key = hashlib.sha1(",".join(sorted(map(str, images))).encode()).hexdigest()[:12]
        return TinyBank(mean, key, len(arrays), sum(a.nbytes for a in arrays), tuple(images))


class TinyPredictor:
    """Positive clicks pick the colour to segment; pixels closer to it than to the negative clicks' colours
    (and to the normal colour), connected to a positive click, form the mask."""

    name = "tiny"

    def __init__(self, engine: TinyEngine, bank: TinyBank, delay_s: float = 0.0):
        self.engine, self.bank, self.delay_s = engine, bank, delay_s
        self.version = f"tiny-{engine.config_hash()}"

    def set_image(self, image: np.ndarray) -> TinyState:
        with self.engine.lock:
            self.engine.set_image_calls += 1
            self.engine.running += 1
            self.engine.max_running = max(self.engine.max_running, self.engine.running)
        if self.delay_s:
            time.sleep(self.delay_s)
        with self.engine.lock:
            self.engine.running -= 1
        img = image.astype(np.float32)
        normal = self.bank.mean if self.bank.mean is not None else np.median(img.reshape(-1, 3), axis=0)
        return TinyState(img, np.linalg.norm(img - normal, axis=2).astype(np.float32))

    def predict(self, state, clicks, box=None, prompt="", previous_mask=None) -> ClickResult:
        img = state.image
        h, w = img.shape[:2]
        pos = [c for c in clicks if c.positive]
        neg = [c for c in clicks if not c.positive]
        if not pos and box is not None:
            pos = [Click((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)]
        if not pos:
            return ClickResult(np.zeros((h, w), np.float32), np.zeros((h, w), bool), 0.0)
        target = np.mean([img[int(c.y), int(c.x)] for c in pos], axis=0)
        d_pos = np.linalg.norm(img - target, axis=2)
        rivals = [np.linalg.norm(img - img[int(c.y), int(c.x)], axis=2) for c in neg]
        normal = np.median(img.reshape(-1, 3), axis=0) if self.bank.mean is None else self.bank.mean
        rivals.append(np.linalg.norm(img - normal, axis=2))
        closer = d_pos < np.min(rivals, axis=0)
        if box is not None:
            box_mask = np.zeros_like(closer)
            box_mask[int(box[1]) : int(box[3]) + 1, int(box[0]) : int(box[2]) + 1] = True
            closer &= box_mask
        labels, _ = ndimage.label(closer)
        keep = {labels[int(c.y), int(c.x)] for c in pos} - {0}
        mask = np.isin(labels, list(keep))
        prob = np.clip(1.0 - d_pos / 255.0, 0, 1).astype(np.float32)
        return ClickResult(prob, mask, float(prob[mask].mean()) if mask.any() else 0.0)

    def detect(self, state, labels=None) -> AnomalyResult:
        amap = state.distance / 255.0
        mask = ndimage.binary_opening(state.distance > 60, iterations=1)
        masks = {"": mask}
        for label in labels or []:
            masks[label] = mask.copy()
        return AnomalyResult(anomaly_map=amap, score=float(amap.max()), masks=masks)


def tiny_chooser(delay_s: float = 0.0) -> Callable:
    def choose(settings, engine) -> PredictorChoice:
        return PredictorChoice(
            "tiny", f"tiny-{engine.config_hash()}", lambda eng, bank: TinyPredictor(eng, bank, delay_s),
            "tiny test predictor",
        )

    return choose


# ---- a local HTTP server -----------------------------------------------------------------------------------


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0
    handler: Callable | None = None  # handler(request_handler) -> (status, headers, body)
    trickle: tuple[int, float] | None = None  # (n bytes, every s seconds): the body sent that slowly


class RecordingServer:
    """http.server on <host>:<free port> (127.0.0.1 unless told; any 127.x.y.z works on Linux) in a thread;
    `routes[path]` answers GET/POST, `requests` records (method, path, headers, body)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, dict, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append((self.command, self.path, dict(self.headers), body))
                route = outer.routes.get(self.path) or outer.routes.get(self.path.split("?")[0])
                if route is None:
                    status, headers, payload = 404, {}, b"not found"
                elif route.handler is not None:
                    status, headers, payload = route.handler(self, body)
                else:
                    status, headers, payload = route.status, dict(route.headers), route.body
                if route is not None and route.delay_s:
                    time.sleep(route.delay_s)
                try:
                    self.send_response(status)
                    headers.setdefault("Content-Length", str(len(payload)))
                    for k, v in headers.items():
                        if v is not None:  # None: leave the header out (e.g. no Content-Length)
                            self.send_header(k, v)
                    self.end_headers()
                    if route is not None and route.trickle:
                        step, every = route.trickle
                        for start in range(0, len(payload), step):
                            self.wfile.write(payload[start : start + step])
                            self.wfile.flush()
                            time.sleep(every)
                    else:
                        self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = _serve
            do_POST = _serve
            do_PATCH = _serve

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RecordingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def seen(self) -> str:
        """Everything this server was sent (request lines, headers, bodies) as one string, for leak checks."""
        return "\n".join(f"{m} {p} {h!r} {b!r}" for m, p, h, b in self.requests)

    def auth_headers(self, path_prefix: str) -> list[str | None]:
        return [h.get("Authorization") for m, p, h, _ in self.requests if p.startswith(path_prefix)]


# ---- the app under test ------------------------------------------------------------------------------------

CONTRACT_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true" zoomControl="true"/>
  <BrushLabels name="mask" toName="image"><Label value="Scratch"/><Label value="Dent"/></BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true" smartOnly="true">
    <Label value="Scratch"/><Label value="Dent"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true" smartOnly="true">
    <Label value="Scratch"/><Label value="Dent"/></RectangleLabels>
  <TextArea name="prompt" toName="image" editable="true" maxSubmissions="1"/>
  <Choices name="verdict" toName="image" choice="single">
    <Choice value="OK"/><Choice value="Anomalous"/></Choices>
</View>"""


def make_app(settings, delay_s: float = 0.0, start_jobs: bool = False, build_delay_s: float = 0.0,
             delay_per: int = 0, loader=None, chooser=None):
    """(app, services, engine) with the tiny engine/predictor (or `chooser`'s); no network weights."""
    from backend.app import create_app
    from backend.services import build_services

    engine = TinyEngine(build_delay_s, delay_per)
    services = build_services(settings, loader=loader, engine_factory=lambda s: engine,
                              predictor_chooser=chooser or tiny_chooser(delay_s))
    return create_app(settings, services, start_jobs=start_jobs), services, engine


def keypoint(
    x_pct: float, y_pct: float, label: str = "Scratch", positive: bool = True, w: int = 128, h: int = 96
) -> dict:
    return {
        "id": f"k{x_pct}-{y_pct}",
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "is_positive": positive,
        "value": {"x": x_pct, "y": y_pct, "width": 0.6, "keypointlabels": [label]},
    }


def interactive_body(
    url: str,
    clicks: list[dict],
    project: str = "1.1700000000",
    task_id: int = 1,
    config: str = CONTRACT_CONFIG,
) -> dict:
    return {
        "tasks": [{"id": task_id, "data": {"image": url}}],
        "project": project,
        "label_config": config,
        "params": {"context": {"result": clicks}},
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def decode_mask(region: dict) -> np.ndarray:
    from label_studio_sdk.converter.brush import decode_rle

    h, w = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
