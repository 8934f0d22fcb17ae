"""The served backend as a benchmark predictor: `ServicePredictor` drives the real service over HTTP the way Label
Studio 1.23 does, so `python -m model.bench clicks --predictor adclick-blend+refine,service` measures the service
and the in-process predictor in one run (same images, same click simulator, same metrics).

Each click is one `POST /predict` carrying the task (its image URL) and the context Label Studio's editor sends for
a smart keypoint: every keypoint placed so far on the image (`keypointlabels`, `value.x/y` in percent of the image,
`is_positive` false for a negative click, `original_width/height`), each with the label the annotator selected
before placing it (Label Studio drops the selection after each smart keypoint, so the annotator selects it again;
a keypoint without one is refused by the service). A click on pixel (x, y) is sent at that pixel's centre,
((x + 0.5) / W, (y + 0.5) / H) in percent, where an annotator clicks; the service reads it back as the pixel
(x, y) exactly (backend/ls_format.py: InteractiveRequest.clicks_px). Label Studio does not send the previous mask:
`previous_mask` is ignored and the service rebuilds it from its own click history (model/interactive/clicks.py
ClickHistory). The answer's brush RLE is decoded with label-studio-sdk and returned as the mask, `prob` = the mask
as float, so the simulator's `prob > 0.49` is that mask. Anything but one brush mask of the image's size (an HTTP
error, a malformed body, no region, a wrong size) raises `ServiceError`, never a silent empty mask.

Images are served by `ImageHost` (http.server on 127.0.0.1 in a thread): a test image's own file when it is among
the `files` given (found by the decoded pixels; the service decodes the same bytes the benchmark read), else the
array as a lossless PNG (synthesised stress images).

Where the service comes from (`build_service_predictor`): `--service-url URL` for one already running (`make
serve` on this machine, so it can fetch the images from 127.0.0.1; basic auth as http://user:pass@host:port), else
the real app built in this process as `make serve` builds it (`Settings.from_env` of an environment,
`build_services`, `create_app`) and served by werkzeug on 127.0.0.1:<free port> in a thread, so every request
goes over HTTP. Its environment: ADCLICK_NORMAL_DIR = a folder of links to the benchmark's reference images
(train/good, + validation/good unless --no-validation), ADCLICK_MAX_REFERENCES raised to their number when over
the default 200 (else the service would use a spread subset: another bank), DEVICE = --device, MODEL_DIR = a
temporary folder whose banks/ is the benchmark's bank cache (--cache-dir, or the run's temporary one): the bank
is keyed by the images' content and the engine's configuration, so the service loads the bank the benchmark built
instead of building it again, and the comparison is of the predictions alone. The other settings are the served
defaults (the served predictor: learned ADClick averaged 0.5:0.5 with the click mode, guided refinement and the
click-seeded stage, i.e. `adclick-blend+refine+seeded`). Before the first click the predictor calls /setup (as Label Studio does on connecting)
and waits until /health reports the project's reference bank complete (the service grows a bank from a few
references in the background when it is not cached).
"""
from __future__ import annotations

import atexit
import hashlib
import http.server
import io
import logging
import mimetypes
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from model.errors import ModelError
from model.types import AnomalyResult, Box, Click, ClickResult

logger = logging.getLogger(__name__)

DEFAULT_LABEL = "Defect"  # the label sent when the run has no prompt (--prompt none)
LS_PREDICT_TIMEOUT_S = 100.0  # Label Studio 1.23's ML_TIMEOUT_PREDICT: it gives up on /predict after this


class ServiceError(ModelError):
    """The service answered something other than the one brush mask of the image Label Studio expects."""


# ---- images served to the service -----------------------------------------------------------------------------
class ImageHost:
    """http.server on 127.0.0.1:<free port> in a daemon thread; `add_file` / `add_bytes` give a URL per image."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[Path | bytes, str]] = {}  # URL path -> (file or bytes, content type)
        self._lock = threading.Lock()
        self.requests = 0
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # no line per request on stderr
                pass

            def do_GET(self) -> None:
                with host._lock:
                    item = host._items.get(self.path)
                    host.requests += 1
                if item is None:
                    self.send_error(404)
                    return
                source, ctype = item
                body = source.read_bytes() if isinstance(source, Path) else source
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, name="bench-images", daemon=True).start()

    def add_file(self, key: str, path: Path) -> str:
        suffix = path.suffix.lower()
        with self._lock:
            self._items[f"/{key}{suffix}"] = (path, _content_type(suffix))
        return f"{self.url}/{key}{suffix}"

    def add_bytes(self, key: str, data: bytes, suffix: str = ".png") -> str:
        with self._lock:
            self._items[f"/{key}{suffix}"] = (data, _content_type(suffix))
        return f"{self.url}/{key}{suffix}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _content_type(suffix: str) -> str:
    return mimetypes.guess_type(f"image{suffix}")[0] or "application/octet-stream"


def _pixels_key(image: np.ndarray) -> str:
    h = hashlib.sha1(f"{image.shape}|{image.dtype}".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()[:20]


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---- the predictor ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServiceState:
    """One image as the service knows it: its URL (the task's data.image); the pixels are kept for their size."""

    url: str
    image: np.ndarray  # (H, W, 3) uint8, what the benchmark decoded
    source: str  # "file" (the test image's own file) or "png" (the array, losslessly)

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes)


def label_config(labels: Iterable[str]) -> str:
    """The label config of the benchmark's project (docs CONTRACT.md's tags): brush, smart keypoints and a smart
    rectangle with the same labels."""
    tags = "".join(f"<Label value={quoteattr(lbl)}/>" for lbl in labels)
    return ("<View>\n  <Image name=\"image\" value=\"$image\" zoom=\"true\"/>\n"
            f"  <BrushLabels name=\"mask\" toName=\"image\">{tags}</BrushLabels>\n"
            f"  <KeyPointLabels name=\"click\" toName=\"image\" smart=\"true\" smartOnly=\"true\">{tags}"
            "</KeyPointLabels>\n"
            f"  <RectangleLabels name=\"box\" toName=\"image\" smart=\"true\" smartOnly=\"true\">{tags}"
            "</RectangleLabels>\n</View>")


def keypoint_region(click: Click, width: int, height: int, label: str, k: int) -> dict:
    """The keypoint Label Studio 1.23.2's editor puts in a smart request's context for a click at the centre of
    pixel (click.x, click.y)."""
    return {
        "id": f"bench-kp{k}",
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "is_positive": bool(click.positive),
        "value": {"x": (float(click.x) + 0.5) / width * 100.0, "y": (float(click.y) + 0.5) / height * 100.0,
                  "width": 0.5, "keypointlabels": [label]},
    }


def rectangle_region(box: Box, width: int, height: int, label: str) -> dict:
    x0, y0, x1, y1 = (float(v) for v in box)
    return {
        "id": "bench-box", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
        "original_width": int(width), "original_height": int(height), "image_rotation": 0,
        "value": {"x": x0 / width * 100.0, "y": y0 / height * 100.0, "width": (x1 - x0) / width * 100.0,
                  "height": (y1 - y0) / height * 100.0, "rotation": 0, "rectanglelabels": [label]},
    }


def decode_brush(region: Any, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool of a `brushlabels` result item (format rle), checked against the image's size."""
    from label_studio_sdk.converter.brush import decode_rle

    if not isinstance(region, dict) or region.get("type") != "brushlabels":
        raise ServiceError(f"expected a brushlabels result item, got {str(region)[:200]}")
    value = region.get("value")
    if not isinstance(value, dict) or value.get("format") != "rle" or not isinstance(value.get("rle"), list):
        raise ServiceError(f"brushlabels item without an RLE value: {str(value)[:200]}")
    if (region.get("original_height"), region.get("original_width")) != tuple(shape):
        raise ServiceError(f"brush mask of {region.get('original_width')}x{region.get('original_height')} for an "
                           f"image of {shape[1]}x{shape[0]}")
    h, w = int(shape[0]), int(shape[1])
    try:
        flat = np.asarray(decode_rle(value["rle"]))
    except Exception as exc:  # the SDK's decoder raises assorted errors on a corrupt stream
        raise ServiceError(f"the brush RLE does not decode ({type(exc).__name__}: {exc})") from exc
    if flat.size != h * w * 4:
        raise ServiceError(f"the brush RLE decodes to {flat.size} values, not {h}x{w}x4")
    return flat.reshape(h, w, 4)[:, :, 3] > 0


class ServicePredictor:
    """The Predictor protocol (model/types.py) over a running service's HTTP API, as Label Studio calls it."""

    def __init__(self, url: str, images: ImageHost | None = None, project: str = "1",
                 files: Sequence[str | Path] = (),
                 timeout_s: float = LS_PREDICT_TIMEOUT_S, session: Any = None):
        import requests

        self.url = url.rstrip("/")
        self.images = images or ImageHost()
        self._own_images = images is None
        self.project = str(project)
        self.name = "service"
        self.timeout_s = float(timeout_s)
        self.session = session or requests.Session()
        self.session.trust_env = False  # no proxy from the environment for a service on this machine
        self._pending = [Path(f) for f in files]  # candidate files not decoded yet
        self._files: dict[str, Path] = {}  # pixels key -> file
        self._labels = [DEFAULT_LABEL]
        self.version = "service"  # the served version once `connect` has run
        self.requests = 0
        self._on_close: list[Any] = []  # what close() stops besides the image server (a local service)

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def _call(self, method: str, route: str, body: dict | None = None, timeout_s: float | None = None) -> Any:
        import requests

        self.requests += 1
        try:
            resp = self.session.request(method, f"{self.url}{route}", json=body,
                                        timeout=timeout_s or self.timeout_s)
        except requests.RequestException as exc:
            raise ServiceError(f"{method} {route}: no answer from the service ({type(exc).__name__}: {exc})") from exc
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code != 200:
            reason = data.get("error") if isinstance(data, dict) else resp.text[:300]
            raise ServiceError(f"{method} {route} -> HTTP {resp.status_code}: {reason}")
        if not isinstance(data, dict):
            raise ServiceError(f"{method} {route}: the answer is not a JSON object: {resp.text[:300]!r}")
        return data

    def connect(self, expected_references: int | None = None, wait_s: float = 3600.0) -> None:
        """/setup as Label Studio sends it on connecting the model, then wait until /health reports the project's
        reference bank complete; warn when it holds another number of references than the benchmark's bank."""
        health = self._call("GET", "/health")
        setup = self._call("POST", "/setup", {"project": f"{self.project}.{int(time.time())}",
                                              "schema": self._config(), "hostname": "", "access_token": "",
                                              "extra_params": ""})
        self.version = str(setup.get("model_version") or self.version)
        deadline, start, listed = time.monotonic() + wait_s, time.monotonic(), False
        while True:
            health = self._call("GET", "/health")
            info = (health.get("reference_banks") or {}).get("projects", {}).get(self.project)
            listed = listed or info is not None
            if info and info.get("loaded") and not info.get("building") and info.get("size") == info.get("target"):
                break
            if not listed and time.monotonic() - start > 30:  # WARM_ON_SETUP=0: the first click builds it
                logger.warning("service: no bank of project %s after /setup (WARM_ON_SETUP off?); the first click "
                               "waits for it (BANK_WAIT_S)", self.project)
                break
            if time.monotonic() > deadline:
                raise ServiceError(f"the service's reference bank of project {self.project} is not complete after "
                                   f"{wait_s:.0f} s: {info}")
            time.sleep(0.5)
        size = info.get("size") if info else None
        model = health.get("model") or {}
        logger.info("service %s: %s (%s), bank of %s references ready after %.1f s", self.url, model.get("kind"),
                    self.version, size, time.monotonic() - start)
        if expected_references is not None and size is not None and size != expected_references:
            logger.warning("service: its bank holds %s references, the benchmark's %d: the predictions may differ "
                           "for that reason alone", size, expected_references)

    def _config(self) -> str:
        return label_config(self._labels)

    def _task(self, state: ServiceState) -> dict:
        return {"id": 1, "data": {"image": state.url}}

    # -- the Predictor protocol ---------------------------------------------------------------------------------
    def set_image(self, image: np.ndarray) -> ServiceState:
        """Only publishes the image: the service downloads it and does the per-image work on the first click."""
        image = np.asarray(image)
        key = _pixels_key(image)
        path = self._find_file(key)
        if path is not None:
            return ServiceState(self.images.add_file(key, path), image, "file")
        return ServiceState(self.images.add_bytes(key, _png(image)), image, "png")

    def _find_file(self, key: str) -> Path | None:
        """The candidate file whose decoded pixels are `key` (decoded in order, as the benchmark reads them)."""
        from model.training.datasets import load_rgb

        while key not in self._files and self._pending:
            path = self._pending.pop(0)
            try:
                self._files.setdefault(_pixels_key(load_rgb(path)), path)
            except OSError as exc:
                logger.warning("service: %s unreadable (%s); not served as a file", path, exc)
        return self._files.get(key)

    def predict(self, state: ServiceState, clicks: list[Click], box: Box | None = None, prompt: str = "",
                previous_mask: np.ndarray | None = None) -> ClickResult:
        """One smart request with every click so far (and the box as a smart rectangle: Label Studio sends the two
        as separate requests, a benchmark box comes without clicks). `previous_mask` is not sent: Label Studio
        has none to send."""
        h, w = state.image.shape[:2]
        label = prompt.strip() or DEFAULT_LABEL
        if label not in self._labels:
            self._labels.append(label)
        regions = [keypoint_region(c, w, h, label, k) for k, c in enumerate(clicks)]
        if box is not None:
            regions.append(rectangle_region(box, w, h, label))
        body = {"tasks": [self._task(state)], "model_version": self.version, "project": f"{self.project}.1",
                "label_config": self._config(),
                "params": {"login": None, "password": None, "context": {"result": regions}}}
        data = self._call("POST", "/predict", body)
        prediction = _single_prediction(data)
        result = prediction.get("result")
        brushes = [r for r in result if isinstance(r, dict) and r.get("type") == "brushlabels"] \
            if isinstance(result, list) else []
        if len(brushes) != 1:
            raise ServiceError(f"POST /predict: expected one brushlabels item for the click, got "
                               f"{len(brushes)} in {str(result)[:300]}")
        if brushes[0].get("value", {}).get("brushlabels") != [label]:
            raise ServiceError(f"POST /predict: the mask carries the label {brushes[0]['value'].get('brushlabels')},"
                               f" not {[label]}")
        mask = decode_brush(brushes[0], (h, w))
        score = brushes[0].get("score", prediction.get("score", 0.0))
        return ClickResult(prob=mask.astype(np.float32), mask=mask, score=float(score or 0.0))

    def detect(self, state: ServiceState, labels: list[str] | None = None) -> AnomalyResult:
        """The batch prediction (context null, as "Retrieve predictions"): the union of its brush regions; the
        service sends no anomaly map, so the map is that union."""
        h, w = state.image.shape[:2]
        body = {"tasks": [self._task(state)], "project": f"{self.project}.1", "label_config": self._config(),
                "params": {"context": None}}
        prediction = _single_prediction(self._call("POST", "/predict", body))
        result = prediction.get("result")
        if not isinstance(result, list):
            raise ServiceError(f"POST /predict: the prediction's result is not a list: {str(result)[:300]}")
        masks: dict[str, np.ndarray] = {"": np.zeros((h, w), bool)}
        for region in result:
            if isinstance(region, dict) and region.get("type") == "brushlabels":
                mask = decode_brush(region, (h, w))
                masks[""] |= mask
                for lbl in region["value"].get("brushlabels") or []:
                    masks[lbl] = masks.get(lbl, np.zeros((h, w), bool)) | mask
        score = float(prediction.get("score") or 0.0)
        return AnomalyResult(anomaly_map=masks[""].astype(np.float32), score=score, masks=masks)

    def close(self) -> None:
        """Stop what this predictor started (its image server, a local service): once; also at exit."""
        steps, self._on_close = self._on_close, []
        if self._own_images:
            steps.insert(0, self.images.close)
            self._own_images = False
        for step in steps:
            try:
                step()
            except Exception:  # best effort: the benchmark's figures are written already
                logger.debug("service clean-up step failed", exc_info=True)


def _single_prediction(data: dict) -> dict:
    results = data.get("results")
    if not isinstance(results, list) or len(results) != 1 or not isinstance(results[0], dict):
        raise ServiceError(f"POST /predict: expected results with one prediction, got {str(data)[:300]}")
    return results[0]


# ---- the real app in this process -----------------------------------------------------------------------------
class LocalService:
    """A WSGI app served by werkzeug on 127.0.0.1:<free port> in a daemon thread (requests really go over HTTP)."""

    def __init__(self, app: Any):
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        self.server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="bench-service", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def served_environment(references: Sequence[str | Path], work: Path, device: str = "cpu",
                       bank_cache: str | Path | None = None) -> dict[str, str]:
    """The environment of a `make serve` whose ADCLICK_NORMAL_DIR holds exactly `references` (links in
    work/references, numbered: train/good and validation/good share file names) and whose MODEL_DIR is
    work/models; its banks/ is `bank_cache` when given (a link), so a bank built there is loaded, not rebuilt."""
    refs_dir = work / "references"
    refs_dir.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(references):
        path = Path(path).resolve()
        (refs_dir / f"{i:05d}_{path.name}").symlink_to(path)
    model_dir = work / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    if bank_cache is not None:
        Path(bank_cache).mkdir(parents=True, exist_ok=True)
        (model_dir / "banks").symlink_to(Path(bank_cache).resolve(), target_is_directory=True)
    # ADCLICK_ADAPT off: the benchmark measures the shipped network (`python -m model.bench adapt` measures the
    # per-project adaptation), and no adaptation job may change it in the middle of a run
    env = {"MODEL_DIR": str(model_dir), "ADCLICK_NORMAL_DIR": str(refs_dir), "DEVICE": device,
           "BANK_WAIT_S": "3600", "LOG_LEVEL": "WARNING", "ADCLICK_ADAPT": "off"}
    from backend.settings import Settings

    if len(references) > Settings().max_reference_images:  # else the service would use a spread subset
        env["ADCLICK_MAX_REFERENCES"] = str(len(references))
    return env


def start_local_service(env: dict[str, str], services: Any = None) -> tuple[LocalService, Any]:
    """The real app as `make serve` builds it from `env` (or from the given `services`), behind a LocalService;
    returns (server, services)."""
    from backend.app import create_app
    from backend.services import build_services
    from backend.settings import Settings

    settings = services.settings if services is not None else Settings.from_env(env)
    services = services or build_services(settings)
    return LocalService(create_app(settings, services, start_jobs=True)), services


def build_service_predictor(engine: Any, args: Any) -> ServicePredictor:
    """The `service` predictor of `python -m model.bench`: over --service-url, else over the real app started in
    this process with the benchmark's references and bank cache (module docstring)."""
    from model.evaluation.runs import select_refs, split_items
    from model.training.datasets import limit_per_defect, load_mvtec

    data = load_mvtec(args.dataset, include_validation=not getattr(args, "no_validation", False))
    refs = select_refs(data, str(getattr(args, "refs", "all")).split(",")[0], getattr(args, "seed", 0))
    files: list[Path] = []
    if not getattr(args, "stress", None):  # the test images the run will click on, in its order
        items = [t for t in limit_per_defect(data.test, getattr(args, "limit", None)) if t.is_anomalous]
        files = [t.path for t in split_items(items, getattr(args, "split", "all"))]
    url = getattr(args, "service_url", None)
    on_close: list[Any] = []
    if url:
        logger.warning("service at %s: its reference images must be the benchmark's %d (ADCLICK_NORMAL_DIR, "
                       "ADCLICK_MAX_REFERENCES) and it must reach 127.0.0.1 for the images", _redact(url), len(refs))
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-service-"))
        local, services = start_local_service(
            served_environment(refs, work, getattr(args, "device", "cpu"), getattr(engine, "cache_dir", None)))
        on_close += [services.serving.stop_builds, local.close, lambda: shutil.rmtree(work, ignore_errors=True)]
        url = local.url
        served = services.model.engine.config_hash()
        if hasattr(engine, "config_hash") and served != engine.config_hash():
            logger.warning("the served engine (%s) is configured unlike the benchmark's (%s: --match, --backbone-opt, "
                           "--residual-opt?): it builds its own bank", served, engine.config_hash())
    predictor = ServicePredictor(url, files=files)
    predictor._on_close += on_close
    atexit.register(predictor.close)
    try:
        predictor.connect(expected_references=len(refs))
    except BaseException:
        predictor.close()
        raise
    return predictor


def _redact(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username or parts.password:
        return urlunsplit(parts._replace(netloc=f"***@{parts.hostname}:{parts.port}" if parts.port
                                         else f"***@{parts.hostname}"))
    return url
