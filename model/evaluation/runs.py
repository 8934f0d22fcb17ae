"""The benchmark's runs, as a library: engine and bank setup, the test-image splits, and one run of each
benchmark over a list of test images (model/cli/bench.py and model/cli/bench_fit.py are the command lines).

`args` is the argparse namespace of the command line (the flags of model/cli/common.py: device, backbone_opt,
residual_opt, seed, cache_dir, ...); KEY=VALUE overrides are parsed by `parse_overrides`.

anomaly (`run_anomaly_once`): unsupervised maps of the residual engine against a bank of the dataset's
defect-free images; pixel AUROC / AP / AU-PRO pool all pixels of the images considered; per defect type = the
images of that type plus the defect-free test images (image AUROC: that type vs good).
clicks (`run_clicks_once`): the standard click simulator (model/evaluation/simulate.py) on every defective test
image; first-click latency = set_image + first predict; next-click = the later predicts.
boxes (`run_boxes_once`): one box around each defect (`gt_box`), no click.
"""
from __future__ import annotations

import ast
import dataclasses
import logging
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from model import metrics
from model.errors import ConfigError
from model.evaluation.report import peak_rss_mb, per_defect, percentile
from model.evaluation.simulate import simulate
from model.training.datasets import GOOD, MvtecDataset, TestItem, load_mask, load_rgb
from model.types import Predictor

logger = logging.getLogger(__name__)


# ---- engine and bank ----------------------------------------------------------------------------------
def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings (the repeatable --*-opt flags) -> {KEY: VALUE}; VALUE a Python literal, else the text."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {pair!r}")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def make_engine(args, match: str, cache_dir: str | None):
    from model.engine.features import BackboneConfig
    from model.engine.residuals import ResidualConfig, ResidualEngine
    backbone = dataclasses.replace(BackboneConfig(), device=args.device, **parse_overrides(args.backbone_opt))
    residual = dataclasses.replace(ResidualConfig(), match=match, **parse_overrides(args.residual_opt))
    return ResidualEngine(backbone, residual, cache_dir)


def select_refs(data: MvtecDataset, refs: str, seed: int) -> list:
    if refs == "all":
        return list(data.normals)
    n = int(refs)
    if n < 0 or n > len(data.normals):
        raise ConfigError(f"--refs {n}: the dataset has {len(data.normals)} defect-free images")
    idx = np.sort(np.random.default_rng(seed).choice(len(data.normals), size=n, replace=False))
    return [data.normals[i] for i in idx]


def build_bank(engine, paths: list) -> tuple[Any, dict]:
    """Bank built (timed), then loaded again from the cache (timed), plus size figures. `bank_built` is False
    when the first call found the bank in an existing cache (then bank_build_s is a load time too)."""
    before = set(engine.cache_dir.iterdir()) if engine.cache_dir and engine.cache_dir.is_dir() else set()
    start = time.perf_counter()
    bank = engine.build_bank(paths)
    build_s = time.perf_counter() - start
    built = not engine.cache_dir or set(engine.cache_dir.iterdir()) != before
    start = time.perf_counter()
    bank = engine.build_bank(paths)
    load_s = time.perf_counter() - start
    stats = {"n_refs": len(paths), "bank_built": built, "bank_build_s": build_s, "bank_load_s": load_s,
             "bank_views": len(bank), "bank_mb": bank.nbytes / 2**20, "rss_after_bank_mb": peak_rss_mb()}
    return bank, stats


def engine_config(engine) -> dict:
    return {"engine": engine.config_hash(), "match": engine.cfg.match,
            "backbone": engine.backbone_cfg.to_dict(), "residual": dataclasses.asdict(engine.cfg)}


# ---- runs ---------------------------------------------------------------------------------------------
def anomaly_summary(rows: list[dict]) -> dict:
    out = metrics.metrics_of([r["pixels"] for r in rows])
    out["image_auroc"] = metrics.image_auroc([r["score"] for r in rows], [r["defect"] != GOOD for r in rows])
    out["ms_per_image"] = float(np.mean([r["ms"] for r in rows]))
    out["n_images"] = len(rows)
    return out


def run_anomaly_once(args, data: MvtecDataset, items: list[TestItem], refs: str, match: str) -> dict:
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench-bank-")
    try:
        engine = make_engine(args, match, cache_dir)
        bank, stats = build_bank(engine, select_refs(data, refs, args.seed))
        engine.compute(load_rgb(data.normals[0]), bank)  # warm-up, not timed
        rows = []
        for item in items:
            image = load_rgb(item.path)
            start = time.perf_counter()
            state = engine.compute(image, bank)
            ms = (time.perf_counter() - start) * 1000.0
            pixels = metrics.ImagePixels.from_map(state.anomaly_map, load_mask(item, image.shape[:2]))
            rows.append({"defect": item.defect, "pixels": pixels, "score": state.score, "ms": ms})
            logger.info("anomaly %d/%d %s: %.0f ms", len(rows), len(items), item.path.name, ms)
        stats["peak_rss_mb"] = peak_rss_mb()
        config = {"refs": refs, "match": match, **engine_config(engine), **stats}
        return {"overall": anomaly_summary(rows),
                "per_defect": per_defect(rows, lambda r: r["defect"], anomaly_summary, include=[GOOD]),
                "config": config}
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)


def click_summary(rows: list[dict], max_clicks: int) -> dict:
    ious = [r["ious"] for r in rows]
    first = [r["set_image_ms"] + r["predict_ms"][0] for r in rows]
    nxt = [ms for r in rows for ms in r["predict_ms"][1:]]
    return {
        "noc85": metrics.mean_noc(ious, 0.85, max_clicks), "noc90": metrics.mean_noc(ious, 0.90, max_clicks),
        "miou@1": metrics.miou_at_k(ious, 1), "miou@3": metrics.miou_at_k(ious, 3),
        "miou@5": metrics.miou_at_k(ious, 5),
        "ap@5": metrics.ap_from_curves(metrics.curves([r["pixels5"] for r in rows])),
        "first_click_ms_p50": percentile(first, 50), "first_click_ms_p95": percentile(first, 95),
        "next_click_ms_p50": percentile(nxt, 50), "next_click_ms_p95": percentile(nxt, 95),
        "set_image_ms_p50": percentile([r["set_image_ms"] for r in rows], 50), "n_images": len(rows),
        "f1_last": pooled_f1([r["last"] for r in rows]),
        # the same with a one-pixel tolerance along the outline (polygon ground truth is not exact to the pixel)
        "f1_last_tol1": metrics.pooled_tolerant_f1([r["last_tol1"] for r in rows]),
    }


def pooled_f1(counts: list[tuple[int, int, int]]) -> float:
    """Pixel F1 pooled over images from their (tp, fp, fn) counts (as AP pools pixels)."""
    tp, fp, fn = (sum(c[i] for c in counts) for i in range(3))
    return 2.0 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def split_items(items: list[TestItem], split: str) -> list[TestItem]:
    """all, or the even / odd-indexed images of each defect type (in file order): a dev half for design
    choices and a held-out half to check them on."""
    if split == "all":
        return list(items)
    seen: dict[str, int] = {}
    out = []
    for item in items:
        k = seen.get(item.defect, 0)
        seen[item.defect] = k + 1
        if (k % 2 == 0) == (split == "even"):
            out.append(item)
    return out


def run_clicks_once(predictor: Predictor, items: list[TestItem], args) -> list[dict]:
    rows = []
    for item in items:
        image = load_rgb(item.path)
        gt = load_mask(item, image.shape[:2])
        if not gt.any():
            logger.warning("%s has an empty mask; skipped", item.path)
            continue
        start = time.perf_counter()
        state = predictor.set_image(image)
        set_ms = (time.perf_counter() - start) * 1000.0
        prompt = item.defect.replace("_", " ") if getattr(args, "prompt", "none") == "defect" else ""
        sim = simulate(predictor, state, gt, max_clicks=args.max_clicks, thr=args.thr, keep_probs=None,
                       stop_iou=None if args.all_clicks else 0.90, min_clicks=5, prompt=prompt)
        logger.info("clicks %s %s: IoU %s", getattr(predictor, "name", "?"), item.path.name,
                    " ".join(f"{v:.2f}" for v in sim.ious))
        prob5 = sim.probs[min(5, max(sim.probs))]  # after click 5 (or the last one when it stopped earlier)
        last = sim.probs[max(sim.probs)] > args.thr  # the mask after the last click (max_clicks with --all-clicks)
        rows.append({"defect": item.defect, "ious": sim.ious, "predict_ms": sim.predict_ms,
                     "set_image_ms": set_ms, "pixels5": metrics.ImagePixels.from_map(prob5, gt),
                     "last": (int((last & gt).sum()), int((last & ~gt).sum()), int((~last & gt).sum())),
                     "last_tol1": metrics.tolerant_counts(last, gt, 1)})
    return rows


def gt_box(gt: np.ndarray, pad: float) -> tuple[float, float, float, float]:
    """The box an annotator draws around a defect: the mask's bounding box (every part of it, also separate
    ones) grown by `pad` of its size on each side (at least 3 px), clipped to the image; (x0, y0, x1, y1)."""
    ys, xs = np.nonzero(gt)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    py, px = max(3.0, pad * (y1 - y0)), max(3.0, pad * (x1 - x0))
    H, W = gt.shape
    return (max(0.0, x0 - px), max(0.0, y0 - py), min(float(W), x1 + px), min(float(H), y1 + py))


def box_summary(rows: list[dict]) -> dict:
    return {"miou": float(np.mean([r["iou"] for r in rows])),
            "recall": float(np.mean([r["recall"] for r in rows])),
            "precision": float(np.mean([r["precision"] for r in rows])),
            "box_ms_p50": percentile([r["ms"] for r in rows], 50), "n_images": len(rows)}


BOX_KEYS = ("miou", "recall", "precision", "box_ms_p50", "n_images")


def run_boxes_once(predictor: Predictor, items: list[TestItem], pad: float) -> list[dict]:
    rows = []
    for item in items:
        image = load_rgb(item.path)
        gt = load_mask(item, image.shape[:2])
        if not gt.any():
            continue
        state = predictor.set_image(image)
        start = time.perf_counter()
        mask = np.asarray(predictor.predict(state, [], gt_box(gt, pad)).mask, dtype=bool)
        ms = (time.perf_counter() - start) * 1000.0
        inter = float((mask & gt).sum())
        rows.append({"defect": item.defect, "iou": metrics.iou(mask, gt), "recall": inter / gt.sum(),
                     "precision": inter / mask.sum() if mask.any() else 0.0, "ms": ms})
        logger.info("box %s %s: IoU %.3f", getattr(predictor, "name", "?"), item.path.name, rows[-1]["iou"])
    return rows

