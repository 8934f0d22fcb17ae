"""Time to the first mask after connecting (issue 12 req 7): the real service (real engine and predictor, Flask
test client, the task image served over local HTTP) with a cold reference bank of `--refs` images; /setup, then
the same click is sent until it answers 200 (each 503 retried after 0.2 s). Then the bank's growth is followed on
/health with a click every second (what an annotator meets meanwhile), until the whole bank is in.

    python scripts/bench_first_click.py --dataset ../shared/datasets/mvtec3d_tire --refs 200 [--hog 2] [--preload]

--hog N runs N busy-loop processes all along (a busy 2-core machine); --preload loads the model and the backbone
before /setup, as every gunicorn worker does in the background when it boots (backend/gunicorn_conf.py: a backend
started before the user connects); without it the first bank also waits for them; --quality N compares, on N defect images, the click IoU (2
positive + 1 negative click) of the first small bank against the same number of references taken first by name
and against the whole bank. Prints JSON."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# as backend/wsgi.py does when gunicorn loads the app: the heavy imports happen at boot, not in a request
import model.engine.residuals
import model.interactive.clickmode
import model.interactive.learned  # noqa: F401
from backend.bench import CONFIG, _clicks, _decode, _serve


def _hog() -> None:
    while True:
        pass


def _gt(dataset: Path, path: Path) -> np.ndarray:
    gt = np.asarray(Image.open(dataset / "ground_truth" / path.parent.name / f"{path.stem}_mask.png")) > 0
    return gt if gt.ndim == 2 else gt[..., 0]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def quality(service, dataset: Path, normals: list[Path], tests: list[Path], first: int, seed: int) -> dict:
    """Click IoU with a first bank of `first` references spread over the folder, `first` taken by name, all."""
    from backend.banks import spread_order
    from model.interactive.clicks import ClickHistory
    from model.types import Click

    engine, choice = service.model.engine, service.model.choice
    spread = [normals[i] for i in spread_order(len(normals))[:first]]
    banks = {
        f"spread_{first}": engine.build_bank(spread, augment=False, save=False),
        f"by_name_{first}": engine.build_bank(normals[:first], augment=False, save=False),
        f"all_{len(normals)}": engine.build_bank(normals),
    }
    rng = np.random.default_rng(seed)
    out = {}
    cases = []
    for path in tests:
        gt = _gt(dataset, path)
        clicks = [Click(c["value"]["x"] / 100 * gt.shape[1], c["value"]["y"] / 100 * gt.shape[0],
                        c["is_positive"]) for c in _clicks(gt, rng)]
        cases.append((np.asarray(Image.open(path).convert("RGB")), gt, clicks))
    for name, bank in banks.items():
        predictor = choice.build(engine, bank)
        ious = []
        for image, gt, clicks in cases:
            result = ClickHistory().predict(predictor, predictor.set_image(image), clicks, None, "")
            ious.append(_iou(np.asarray(result.mask, bool), gt))
        out[name] = round(float(np.mean(ious)), 3)
    out["images"] = len(cases)
    return out


def run(args: argparse.Namespace) -> dict:
    from backend.app import create_app
    from backend.services import build_services
    from backend.settings import Settings

    dataset = args.dataset
    work = Path(tempfile.mkdtemp(prefix="adclick-first-click-"))
    folder = work / "normals"
    folder.mkdir()
    normals = []
    for p in sorted((dataset / "train" / "good").glob("*.jpg"))[: args.refs]:
        (folder / p.name).symlink_to(p.resolve())
        normals.append(folder / p.name)
    tests = sorted(p for p in (dataset / "test").glob("*/*.jpg") if p.parent.name != "good")
    rng = np.random.default_rng(args.seed)
    tests = [tests[i] for i in rng.choice(len(tests), size=max(1, args.quality), replace=False)]
    httpd, url = _serve(dataset / "test")
    settings = replace(Settings.from_env(), model_dir=work / "models", normal_dir=str(folder),
                       warm_on_setup=True, device="cpu", max_reference_images=args.refs)
    service = build_services(settings)
    client = create_app(settings, service, start_jobs=False).test_client()
    hogs = [multiprocessing.Process(target=_hog, daemon=True) for _ in range(args.hog)]
    for h in hogs:
        h.start()
    out: dict = {"references": args.refs, "hog_processes": args.hog, "first_references": settings.first_references,
                 "load_average_1min_at_start": round(os.getloadavg()[0], 1)}
    try:
        if args.preload:  # what a serving process does in the background after its first request
            t0 = time.perf_counter()
            service.serving._load_quietly()
            out["model_preload_s"] = round(time.perf_counter() - t0, 2)
        path = tests[0]
        gt = _gt(dataset, path)
        body = {"tasks": [{"id": 1, "data": {"image": f"{url}/{path.parent.name}/{path.name}"}}], "project": "1",
                "label_config": CONFIG, "params": {"context": {"result": _clicks(gt, rng)}}}
        t0 = time.perf_counter()
        assert client.post("/setup", json={"project": "1", "schema": CONFIG}).status_code == 200
        first_bank: list[float] = []

        def watch() -> None:  # when the first bank became usable
            while not first_bank and time.perf_counter() - t0 < 600:
                if client.get("/health").get_json()["reference_banks"]["projects"].get("1", {}).get("size"):
                    first_bank.append(round(time.perf_counter() - t0, 2))
                time.sleep(0.05)

        threading.Thread(target=watch, daemon=True).start()
        refused = 0
        while True:
            resp = client.post("/predict", json=body)
            if resp.status_code == 200:
                break
            if resp.status_code != 503:
                raise RuntimeError(resp.get_json())
            refused += 1
            time.sleep(0.2)
        out["first_mask_s"] = round(time.perf_counter() - t0, 2)
        out["model_load_s"] = service.model.load_seconds if not args.preload else 0.0
        out["first_bank_ready_s"] = first_bank[0] if first_bank else None
        out["refused_503"] = refused
        bank = client.get("/health").get_json()["reference_banks"]["projects"]["1"]
        out["first_mask_bank"] = f"{bank['size']}/{bank['target']}"
        out["first_mask_iou"] = round(_iou(_decode(resp.get_json()["results"][0]["result"][0]), gt), 3)
        stages, during = [], []
        while True:
            bank = client.get("/health").get_json()["reference_banks"]["projects"]["1"]
            if not stages or stages[-1][0] != bank["size"]:
                stages.append((bank["size"], round(time.perf_counter() - t0, 1)))
            if not bank["building"]:
                break
            c0 = time.perf_counter()
            resp = client.post("/predict", json=body)
            during.append(time.perf_counter() - c0)
            if resp.status_code != 200:
                raise RuntimeError(resp.get_json())
            time.sleep(1.0)
        out["bank_sizes_at_s"] = stages
        out["full_bank_s"] = stages[-1][1]
        if during:
            out["clicks_while_growing"] = {"n": len(during), "p50_ms": round(1000 * statistics.median(during)),
                                           "max_ms": round(1000 * max(during))}
        c0 = time.perf_counter()
        resp = client.post("/predict", json=body)
        out["click_after_full_bank_ms"] = round(1000 * (time.perf_counter() - c0))
        out["full_bank_iou"] = round(_iou(_decode(resp.get_json()["results"][0]["result"][0]), gt), 3)
    finally:
        for h in hogs:
            h.terminate()
        httpd.shutdown()
    if args.quality:
        out["quality_click_iou"] = quality(service, dataset, normals, tests, settings.first_references, args.seed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, required=True, help="MVTec-style folder (train/good, test, ...)")
    parser.add_argument("--refs", type=int, default=200, help="reference images from train/good")
    parser.add_argument("--hog", type=int, default=0, help="busy-loop processes running all along")
    parser.add_argument("--preload", action="store_true", help="load the model before /setup")
    parser.add_argument("--quality", type=int, default=0, help="defect images for the small-bank quality check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(run(args), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
