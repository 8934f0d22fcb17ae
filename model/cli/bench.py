"""Benchmark CLI over any MVTec-AD-style folder.

  python -m model.bench anomaly --dataset DIR [--json FILE] [--refs all,1,5,10] [--match window,softpos]
  python -m model.bench clicks  --dataset DIR --predictor residual[,adclick-blend+refine] [--json FILE]
  python -m model.bench boxes   --dataset DIR --predictor adclick-blend+refine [--split even] [--json FILE]
  python -m model.bench fit ...   (dispatched to model.cli.bench_fit:main)

anomaly: unsupervised maps of the residual engine against a bank of the dataset's defect-free images;
pixel AUROC / AP / AU-PRO pool all pixels of the images considered; per defect type = the images of that type
plus the defect-free test images (image AUROC: that type vs good). One run per (refs, match) combination; the
first is reported as overall/per_defect, every one under "runs".
clicks: the standard click simulator (model/interactive/clicks.py) on every defective test image; a GrabCut-from-clicks
baseline runs in the same process. first-click latency = set_image + first predict; next-click = the
later predicts.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import logging
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from model import metrics
from model.evaluation.baselines import GrabCutConfig, GrabCutPredictor
from model.evaluation.report import (ANOMALY_KEYS, BANK_KEYS, CLICK_KEYS, peak_rss_mb, per_defect, percentile,
                                print_config, print_table, write_json)
from model.interactive.clicks import simulate
from model.training.datasets import GOOD, MvtecDataset, TestItem, limit_per_defect, load_mask, load_mvtec, load_rgb
from model.errors import ConfigError
from model.types import Predictor

logger = logging.getLogger(__name__)

PredictorBuilder = Callable[[Any, Any, argparse.Namespace], Predictor]
PREDICTORS: dict[str, PredictorBuilder] = {}  # name -> builder(engine, bank, args)
PLUGIN_MODULES = ("model.interactive.learned",)  # imported on demand; each offers bench_builders() -> {name: builder}


def register_predictor(name: str) -> Callable[[PredictorBuilder], PredictorBuilder]:
    def deco(builder: PredictorBuilder) -> PredictorBuilder:
        PREDICTORS[name] = builder
        return builder
    return deco


@register_predictor("residual")
def _build_residual(engine, bank, args) -> Predictor:
    from model.interactive.clickmode import ResidualClickPredictor
    return ResidualClickPredictor(engine, bank)


@register_predictor("grabcut")
def _build_grabcut(engine, bank, args) -> Predictor:
    return GrabCutPredictor(GrabCutConfig(iterations=args.grabcut_iters))


def get_builder(name: str) -> PredictorBuilder:
    """The builder of a registered predictor; NAME+refine wraps NAME in model.interactive.refine.RefinedPredictor (the
    full-resolution refinement of every click's map, as the service serves by default); NAME+seeded wraps NAME in
    model.interactive.seeded.SeededPredictor (clicks seed a geodesic segmentation; --seeded-opt to change it)."""
    base, plus, suffix = name.rpartition("+")
    if plus:
        if suffix not in ("refine", "seeded"):
            raise ConfigError(f"unknown predictor suffix +{suffix} in {name!r}; known: +refine, +seeded")
        inner = get_builder(base)
        if suffix == "seeded":
            def seeded(engine, bank, args) -> Predictor:
                from model.interactive.seeded import SeededConfig, SeededPredictor
                cfg = dataclasses.replace(SeededConfig(), **_overrides(getattr(args, "seeded_opt", [])))
                return SeededPredictor(inner(engine, bank, args), cfg)
            return seeded

        def refined(engine, bank, args) -> Predictor:
            from model.interactive.refine import RefineConfig, RefinedPredictor
            cfg = dataclasses.replace(RefineConfig(), **_overrides(getattr(args, "refine_opt", [])))
            return RefinedPredictor(inner(engine, bank, args), cfg)
        return refined
    for module in PLUGIN_MODULES:
        if name in PREDICTORS:
            break
        try:
            plugin = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        for key, builder in plugin.bench_builders().items():
            PREDICTORS.setdefault(key, builder)
    if name not in PREDICTORS:
        raise ConfigError(f"unknown predictor {name!r}; known: {sorted(PREDICTORS)}")
    return PREDICTORS[name]


# ---- engine and bank ----------------------------------------------------------------------------------
def _overrides(pairs: list[str]) -> dict[str, Any]:
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


def make_engine(args, match: str, cache_dir: str):
    from model.engine.features import BackboneConfig
    from model.engine.residuals import ResidualConfig, ResidualEngine
    backbone = dataclasses.replace(BackboneConfig(), device=args.device, **_overrides(args.backbone_opt))
    residual = dataclasses.replace(ResidualConfig(), match=match, **_overrides(args.residual_opt))
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


def _engine_config(engine) -> dict:
    return {"engine": engine.config_hash(), "match": engine.cfg.match,
            "backbone": engine.backbone_cfg.to_dict(), "residual": dataclasses.asdict(engine.cfg)}


def _show(title: str, result: dict, keys) -> None:
    print_table(title, {"overall": result["overall"], **result["per_defect"]}, keys)


# ---- anomaly -------------------------------------------------------------------------------------------
def _anomaly_summary(rows: list[dict]) -> dict:
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
        config = {"refs": refs, "match": match, **_engine_config(engine), **stats}
        return {"overall": _anomaly_summary(rows),
                "per_defect": per_defect(rows, lambda r: r["defect"], _anomaly_summary, include=[GOOD]),
                "config": config}
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)


def cmd_anomaly(args) -> dict:
    data = load_mvtec(args.dataset, include_validation=not args.no_validation)
    items = limit_per_defect(data.test, args.limit)
    runs = []
    for refs in args.refs.split(","):
        for match in args.match.split(","):
            run = run_anomaly_once(args, data, items, refs, match)
            _show(f"anomaly refs={refs} match={match}", run, ANOMALY_KEYS)
            print_config(run["config"], BANK_KEYS)
            runs.append(run)
    main = runs[0]
    return {"overall": main["overall"], "per_defect": main["per_defect"],
            "config": {**main["config"], "dataset": str(args.dataset), "limit": args.limit,
                       "threads": torch.get_num_threads()},
            "runs": [{"refs": r["config"]["refs"], "match": r["config"]["match"], **r} for r in runs]}


# ---- clicks --------------------------------------------------------------------------------------------
def _click_summary(rows: list[dict], max_clicks: int) -> dict:
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
        "f1_last": metrics_f1([r["last"] for r in rows]),
    }


def metrics_f1(counts: list[tuple[int, int, int]]) -> float:
    """Pixel F1 pooled over images from (tp, fp, fn) counts."""
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
                     "last": (int((last & gt).sum()), int((last & ~gt).sum()), int((~last & gt).sum()))})
    return rows


def _run_predictors(args, title: str, rows_of: Callable[[Predictor, list[TestItem]], list[dict]],
                    summarize: Callable[[list[dict]], dict], keys) -> tuple[list[str], dict, dict]:
    """Every predictor of --predictor (and GrabCut unless --no-grabcut) on the defective test images of
    --split, one bank for all: (names, {name: {"overall", "per_defect"}}, config)."""
    data = load_mvtec(args.dataset, include_validation=not args.no_validation)
    items = split_items([t for t in limit_per_defect(data.test, args.limit) if t.is_anomalous], args.split)
    if getattr(args, "stress", None):  # synthesised defects on test/good instead (model/evaluation/stress.py)
        from model.evaluation.stress import stress_items
        items = stress_items(data, args.stress, args.stress_n, args.seed, args.split)
    names = [n for n in args.predictor.split(",") if n]
    if not args.no_grabcut and "grabcut" not in names:
        names.append("grabcut")
    builders = {n: get_builder(n) for n in names}  # an unknown name fails before the bank is built
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench-bank-")
    try:
        engine = make_engine(args, args.match.split(",")[0], cache_dir)
        bank, stats = build_bank(engine, select_refs(data, args.refs.split(",")[0], args.seed))
        results = {}
        for name, builder in builders.items():
            rows = rows_of(builder(engine, bank, args), items)
            results[name] = {"overall": summarize(rows),
                             "per_defect": per_defect(rows, lambda r: r["defect"], summarize)}
            _show(f"{title} {name}", results[name], keys)
        stats["peak_rss_mb"] = peak_rss_mb()
        config = {"dataset": str(args.dataset), "predictors": names, "limit": args.limit, "split": args.split,
                  "refine_opt": args.refine_opt, "refs": args.refs.split(",")[0],
                  "threads": torch.get_num_threads(), **_engine_config(engine), **stats}
        print_config(config, BANK_KEYS)
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return names, results, config


def cmd_clicks(args) -> dict:
    names, results, config = _run_predictors(
        args, "clicks", lambda predictor, items: run_clicks_once(predictor, items, args),
        lambda rs: _click_summary(rs, args.max_clicks), CLICK_KEYS + ("f1_last",))
    config.update(max_clicks=args.max_clicks, prompt=args.prompt, thr=args.thr)
    main = results[names[0]]
    others = {n: r for n, r in results.items() if n not in (names[0], "grabcut")}
    report = {"overall": main["overall"], "per_defect": main["per_defect"], "config": config,
              "baselines": {n: r for n, r in results.items() if n == "grabcut" and n != names[0]}}
    if others:
        report["others"] = others
    return report


# ---- boxes ---------------------------------------------------------------------------------------------
def gt_box(gt: np.ndarray, pad: float) -> tuple[float, float, float, float]:
    """The box an annotator draws around a defect: the mask's bounding box (every part of it, also separate
    ones) grown by `pad` of its size on each side (at least 3 px), clipped to the image; (x0, y0, x1, y1)."""
    ys, xs = np.nonzero(gt)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    py, px = max(3.0, pad * (y1 - y0)), max(3.0, pad * (x1 - x0))
    H, W = gt.shape
    return (max(0.0, x0 - px), max(0.0, y0 - py), min(float(W), x1 + px), min(float(H), y1 + py))


def _box_summary(rows: list[dict]) -> dict:
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


def cmd_boxes(args) -> dict:
    """The smart rectangle alone: one box around each defect (every part of its mask), no click; IoU, recall
    and precision of the mask each predictor answers (GrabCut from the same rectangle in the same run)."""
    names, results, config = _run_predictors(
        args, "boxes", lambda predictor, items: run_boxes_once(predictor, items, args.box_pad), _box_summary,
        BOX_KEYS)
    config["box_pad"] = args.box_pad
    main = results[names[0]]
    return {"overall": main["overall"], "per_defect": main["per_defect"], "config": config,
            "others": {n: r for n, r in results.items() if n != names[0]}}


# ---- CLI -----------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, match_help: str) -> None:
    p.add_argument("--dataset", required=True, help="MVTec-AD-style folder")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--refs", default="all",
                   help="defect-free references: N or 'all' (anomaly: a comma list, one run each)")
    p.add_argument("--match", default="window", help=match_help)
    p.add_argument("--limit", type=int, default=None, help="at most N test images per defect type")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference subset")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--cache-dir",
                   help="bank cache (default: a fresh temporary folder, so the build time is real)")
    p.add_argument("--no-validation", action="store_true", help="do not use validation/good as references")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (one line per image)")
    p.add_argument("--backbone-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="BackboneConfig override, e.g. input_size=448 (repeatable)")
    p.add_argument("--residual-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="ResidualConfig override, e.g. k_refs=5 (repeatable)")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    anomaly = sub.add_parser("anomaly", help="unsupervised anomaly maps: pixel AUROC/AP, AU-PRO, image AUROC")
    _common(anomaly, "window | softpos (comma list: one run each)")
    clicks = sub.add_parser("clicks", help="interactive segmentation: NoC@85/90, mIoU@k, AP@5, latency")
    _common(clicks, "window | softpos (matching of the residual engine)")
    clicks.add_argument("--predictor", default="residual", help="comma list of registered predictors; NAME+refine adds the full-resolution refinement of model/interactive/refine.py (guided filter and click disks; --refine-opt to change it)")
    clicks.add_argument("--max-clicks", type=int, default=20)
    clicks.add_argument("--split", choices=("all", "even", "odd"), default="all",
                        help="all test images, or the even / odd-indexed half of each defect type")
    clicks.add_argument("--refine-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="model.interactive.refine.RefineConfig override for NAME+refine predictors, e.g. radius=8")
    clicks.add_argument("--weights-dir", default=None,
                        help="folder with manifest.json + learned ADClick weights (default: the shipped weights/)")
    clicks.add_argument("--prompt", choices=("none", "defect"), default="none",
                        help="text sent with every click: none, or the defect type (the test folder's name, as an "
                             "annotator's label would give it); predictors without prompts ignore it")
    clicks.add_argument("--thr", type=float, default=0.49, help="prob threshold of the simulated mask")
    clicks.add_argument("--all-clicks", action="store_true",
                        help="always make max-clicks (default: stop at IoU 0.9 after 5 clicks)")
    clicks.add_argument("--no-grabcut", action="store_true", help="skip the GrabCut baseline")
    clicks.add_argument("--grabcut-iters", type=int, default=5)
    clicks.add_argument("--stress", default=None, metavar="KIND[,KIND]",
                        help="instead of the test set, defects synthesised on test/good and skimage textures: "
                             "lowcontrast, crack, border, multi, texture or all (model/evaluation/stress.py; "
                             "--split picks even/odd test/good images, --seed the draws)")
    clicks.add_argument("--stress-n", type=int, default=10, help="synthesised images per stress kind")
    clicks.add_argument("--seeded-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="model.interactive.seeded.SeededConfig override for NAME+seeded predictors")
    boxes = sub.add_parser("boxes", help="the smart rectangle alone: IoU / recall / precision of one box per defect")
    _common(boxes, "window | softpos (matching of the residual engine)")
    boxes.add_argument("--predictor", default="residual", help="comma list of registered predictors (as clicks)")
    boxes.add_argument("--split", choices=("all", "even", "odd"), default="all")
    boxes.add_argument("--box-pad", type=float, default=0.1, help="box margin around the mask, share of its size")
    boxes.add_argument("--refine-opt", action="append", default=[], metavar="KEY=VALUE")
    boxes.add_argument("--weights-dir", default=None)
    boxes.add_argument("--no-grabcut", action="store_true", help="skip the GrabCut baseline")
    boxes.add_argument("--grabcut-iters", type=int, default=5)
    sub.add_parser("fit", help="learning-loop benchmark (model.cli.bench_fit)", add_help=False)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit":
        fit = importlib.import_module("model.cli.bench_fit")  # lazily: model.cli.bench_fit imports this module
        return int(fit.main(argv[1:]) or 0)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, min(args.threads, torch.get_num_threads())))
    commands = {"anomaly": cmd_anomaly, "clicks": cmd_clicks, "boxes": cmd_boxes}
    report = commands[args.command](args)
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
