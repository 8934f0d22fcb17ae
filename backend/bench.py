"""Service benchmark: the real app (real residual engine, Flask test client, images served over HTTP by a
local server), measuring what an annotator feels.
`python -m backend.bench --dataset ../shared/datasets/mvtec3d_tire`

Reports model load, reference-bank build, first click on an image (download + features + residuals + mask),
further clicks on the same image (cached), batch prediction per task, and the IoU of the click mask against
the ground truth for 2 positive clicks inside the defect + 1 negative outside."""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Defect"/></BrushLabels>
<KeyPointLabels name="click" toName="image" smart="true"><Label value="Defect"/></KeyPointLabels>
<Choices name="verdict" toName="image"><Choice value="OK"/><Choice value="Anomalous"/></Choices></View>"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def _clicks(mask: np.ndarray, rng: np.random.Generator) -> list[dict]:
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    pick = rng.choice(len(xs), size=2, replace=False)
    outside = np.argwhere(~mask)
    neg = outside[rng.integers(len(outside))]
    pts = [(xs[i], ys[i], True) for i in pick] + [(neg[1], neg[0], False)]
    return [
        {
            "type": "keypointlabels",
            "is_positive": pos,
            "original_width": w,
            "original_height": h,
            "value": {"x": (x + 0.5) / w * 100, "y": (y + 0.5) / h * 100, "keypointlabels": ["Defect"]},
        }
        for x, y, pos in pts
    ]


def _decode(region: dict) -> np.ndarray:
    from label_studio_sdk.converter.brush import decode_rle

    h, w = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def _ms(values: list[float]) -> dict:
    return {
        "median_ms": round(1000 * statistics.median(values), 1),
        "max_ms": round(1000 * max(values), 1),
        "n": len(values),
    }


def _concurrent(app, service, bodies: list[dict], masks: list[np.ndarray]) -> dict:
    """All images clicked at once from one thread each, with an empty cache: latency, wall time, and how
    close every mask is to the one computed alone (IoU)."""
    from concurrent.futures import ThreadPoolExecutor

    service.serving.cache.clear()

    def one(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        resp = app.test_client().post("/predict", json=bodies[i])
        elapsed = time.perf_counter() - t0
        if resp.status_code != 200:
            return elapsed, 0.0
        mask = _decode(resp.get_json()["results"][0]["result"][0])
        return elapsed, float((mask & masks[i]).sum() / max((mask | masks[i]).sum(), 1))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(one, range(len(bodies))))
    return {
        "threads": len(bodies),
        "wall_s": round(time.perf_counter() - t0, 2),
        "latency": _ms([r[0] for r in results]),
        "mask_iou_vs_alone_min": round(min(r[1] for r in results), 4),  # 1.0 = same masks as computed alone
        "cache_bytes": service.serving.cache.bytes_used,
        "cache_budget": service.serving.cache.budget,
    }


def _health_under_load(client, service, dataset: Path, image_path: Path, seconds: float = 6.0) -> dict:
    """/health latency while other threads keep the CPU busy with backbone passes (as training does)."""
    image = np.asarray(Image.open(image_path).convert("RGB"))
    bank = service.serving.model_for("1").bank
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            service.model.engine.compute(image, bank)

    workers = [threading.Thread(target=burn, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        client.get("/health")
        times.append(time.perf_counter() - t0)
        time.sleep(0.1)
    stop.set()
    for w in workers:
        w.join()
    return _ms(times)


def run(dataset: Path, n_refs: int, n_images: int, seed: int) -> dict:
    from backend.app import create_app
    from backend.services import build_services
    from backend.settings import Settings

    rng = np.random.default_rng(seed)
    tests = sorted(p for p in (dataset / "test").glob("*/*.jpg") if p.parent.name != "good")
    tests = [tests[i] for i in rng.choice(len(tests), size=min(n_images, len(tests)), replace=False)]
    work = Path(tempfile.mkdtemp(prefix="adclick-bench-"))
    normals = work / "normals"
    normals.mkdir()
    for p in sorted((dataset / "train" / "good").glob("*.jpg"))[:n_refs]:
        (normals / p.name).symlink_to(p.resolve())
    httpd, url = _serve(dataset / "test")
    settings = replace(
        Settings(), model_dir=work / "models", normal_dir=str(normals), warm_on_setup=False, bank_wait_s=3600
    )
    service = build_services(settings)
    client = create_app(settings, service, start_jobs=False).test_client()
    out: dict = {"dataset": str(dataset), "references": n_refs, "images": len(tests)}
    t0 = time.perf_counter()
    client.get("/versions")
    out["model_load_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    service.serving.model_for("1")
    out["bank_build_s"] = round(time.perf_counter() - t0, 2)
    first: list[float] = []
    again: list[float] = []
    batch: list[float] = []
    ious: list[float] = []
    bodies: list[dict] = []
    masks: list[np.ndarray] = []
    for path in tests:
        gt = np.asarray(Image.open(dataset / "ground_truth" / path.parent.name / f"{path.stem}_mask.png")) > 0
        gt = gt if gt.ndim == 2 else gt[..., 0]
        task = {"id": 1, "data": {"image": f"{url}/{path.parent.name}/{path.name}"}}
        body = {
            "tasks": [task],
            "project": "1.1",
            "label_config": CONFIG,
            "params": {"context": {"result": _clicks(gt, rng)}},
        }
        for bucket in (first, again, again):
            t0 = time.perf_counter()
            resp = client.post("/predict", json=body)
            bucket.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                raise RuntimeError(f"{path}: {resp.get_json()}")
        mask = _decode(resp.get_json()["results"][0]["result"][0])
        bodies.append(body)
        masks.append(mask)
        ious.append(float((mask & gt).sum() / max((mask | gt).sum(), 1)))
        t0 = time.perf_counter()
        client.post("/predict", json={**body, "params": {"context": None}})
        batch.append(time.perf_counter() - t0)
    out["concurrent"] = _concurrent(create_app(settings, service, start_jobs=False), service, bodies, masks)
    out["health_under_load"] = _health_under_load(client, service, dataset, tests[0])
    httpd.shutdown()
    out.update(
        first_click=_ms(first),
        cached_click=_ms(again),
        batch_per_task=_ms(batch),
        click_iou_mean=round(float(np.mean(ious)), 3),
        state_cache=service.serving.cache.snapshot(),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", type=Path, required=True, help="MVTec-style folder (train/good, test, ground_truth)"
    )
    parser.add_argument("--refs", type=int, default=20, help="reference images from train/good")
    parser.add_argument("--images", type=int, default=8, help="defective test images to click on")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    figures = run(args.dataset, args.refs, args.images, args.seed)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
