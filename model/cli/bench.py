"""Benchmark CLI over any MVTec-AD-style folder.

  python -m model.bench anomaly --dataset DIR [--json FILE] [--refs all,1,5,10] [--match window,softpos]
  python -m model.bench clicks  --dataset DIR --predictor residual[,adclick-blend+refine] [--json FILE]
  python -m model.bench clicks  --dataset DIR --predictor adclick-blend+refine,service [--service-url URL]
  python -m model.bench boxes   --dataset DIR --predictor adclick-blend+refine [--split even] [--json FILE]
  python -m model.bench fit ...   (dispatched to model.cli.bench_fit:main)
  python -m model.bench adapt ... (dispatched to model.cli.bench_adapt:main)

anomaly: unsupervised maps of the residual engine against a bank of the dataset's defect-free images;
pixel AUROC / AP / AU-PRO pool all pixels of the images considered; per defect type = the images of that type
plus the defect-free test images (image AUROC: that type vs good). One run per (refs, match) combination; the
first is reported as overall/per_defect, every one under "runs".
clicks: the standard click simulator (model/evaluation/simulate.py) on every defective test image; a GrabCut-from-clicks
baseline runs in the same process. first-click latency = set_image + first predict; next-click = the
later predicts.
The runs themselves are model/evaluation/runs.py; the predictor registry is model/evaluation/predictors.py.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable

import torch

from model.cli.common import add_common_flags, setup_logging
from model.evaluation.predictors import get_builder
from model.evaluation.report import (
    ANOMALY_KEYS,
    BANK_KEYS,
    CLICK_KEYS,
    peak_rss_mb,
    per_defect,
    print_config,
    print_table,
    write_json,
)
from model.evaluation.runs import (
    BOX_KEYS,
    box_summary,
    build_bank,
    click_summary,
    engine_config,
    make_engine,
    run_anomaly_once,
    run_boxes_once,
    run_clicks_once,
    select_refs,
    split_items,
)
from model.training.datasets import TestItem, limit_per_defect, load_mvtec
from model.types import Predictor

logger = logging.getLogger(__name__)


def _show(title: str, result: dict, keys) -> None:
    print_table(title, {"overall": result["overall"], **result["per_defect"]}, keys)


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
        refs = select_refs(data, args.refs.split(",")[0], args.seed)
        bank, stats = build_bank(engine, refs)
        args.ref_paths = refs  # the per-project click calibration (--calibrate) runs on these, as the service does
        results = {}
        for name, builder in builders.items():
            rows = rows_of(builder(engine, bank, args), items)
            results[name] = {"overall": summarize(rows),
                             "per_defect": per_defect(rows, lambda r: r["defect"], summarize)}
            _show(f"{title} {name}", results[name], keys)
        stats["peak_rss_mb"] = peak_rss_mb()
        config = {"dataset": str(args.dataset), "predictors": names, "limit": args.limit, "split": args.split,
                  "refine_opt": args.refine_opt, "refs": args.refs.split(",")[0],
                  "threads": torch.get_num_threads(), **engine_config(engine), **stats}
        print_config(config, BANK_KEYS)
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return names, results, config


def cmd_clicks(args) -> dict:
    names, results, config = _run_predictors(
        args, "clicks", lambda predictor, items: run_clicks_once(predictor, items, args),
        lambda rs: click_summary(rs, args.max_clicks), (*CLICK_KEYS, "f1_last", "f1_last_tol1"))
    config.update(max_clicks=args.max_clicks, prompt=args.prompt, thr=args.thr)
    main = results[names[0]]
    others = {n: r for n, r in results.items() if n not in (names[0], "grabcut")}
    report = {"overall": main["overall"], "per_defect": main["per_defect"], "config": config,
              "baselines": {n: r for n, r in results.items() if n == "grabcut" and n != names[0]}}
    if others:
        report["others"] = others
    return report


def cmd_boxes(args) -> dict:
    """The smart rectangle alone: one box around each defect (every part of its mask), no click; IoU, recall
    and precision of the mask each predictor answers (GrabCut from the same rectangle in the same run)."""
    names, results, config = _run_predictors(
        args, "boxes", lambda predictor, items: run_boxes_once(predictor, items, args.box_pad), box_summary,
        BOX_KEYS)
    config["box_pad"] = args.box_pad
    main = results[names[0]]
    return {"overall": main["overall"], "per_defect": main["per_defect"], "config": config,
            "others": {n: r for n, r in results.items() if n != names[0]}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    anomaly = sub.add_parser("anomaly", help="unsupervised anomaly maps: pixel AUROC/AP, AU-PRO, image AUROC")
    add_common_flags(anomaly, "window | softpos (comma list: one run each)")
    clicks = sub.add_parser("clicks", help="interactive segmentation: NoC@85/90, mIoU@k, AP@5, latency")
    add_common_flags(clicks, "window | softpos (matching of the residual engine)")
    clicks.add_argument("--predictor", default="residual",
                        help="comma list of registered predictors; NAME+refine adds the full-resolution refinement "
                             "of model/interactive/refine.py (guided filter and click disks; --refine-opt to "
                             "change it)")
    clicks.add_argument("--max-clicks", type=int, default=20)
    clicks.add_argument("--split", choices=("all", "even", "odd"), default="all",
                        help="all test images, or the even / odd-indexed half of each defect type")
    clicks.add_argument("--refine-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="model.interactive.refine.RefineConfig override for NAME+refine predictors, "
                             "e.g. radius=8")
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
    clicks.add_argument("--focus-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="model.interactive.focus.FocusConfig override for NAME+focus predictors")
    clicks.add_argument("--calibrate", choices=("on", "off"), default="off",
                        help="per-project click calibration of the blend on the references (as ADCLICK_CALIBRATE)")
    clicks.add_argument("--blend-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="the blend's weight / threshold / use_calibration (adclick-blend predictors)")
    clicks.add_argument("--seeded-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="model.interactive.seeded.SeededConfig override for NAME+seeded predictors")
    clicks.add_argument("--service-url", default=None, metavar="URL",
                        help="the `service` predictor drives this running backend (make serve on this machine; "
                             "http://user:pass@host:port with basic auth) instead of the app started in-process")
    boxes = sub.add_parser("boxes", help="the smart rectangle alone: IoU / recall / precision of one box per defect")
    add_common_flags(boxes, "window | softpos (matching of the residual engine)")
    boxes.add_argument("--predictor", default="residual", help="comma list of registered predictors (as clicks)")
    boxes.add_argument("--split", choices=("all", "even", "odd"), default="all")
    boxes.add_argument("--box-pad", type=float, default=0.1, help="box margin around the mask, share of its size")
    boxes.add_argument("--refine-opt", action="append", default=[], metavar="KEY=VALUE")
    boxes.add_argument("--weights-dir", default=None)
    boxes.add_argument("--no-grabcut", action="store_true", help="skip the GrabCut baseline")
    boxes.add_argument("--grabcut-iters", type=int, default=5)
    sub.add_parser("fit", help="learning-loop benchmark (model.cli.bench_fit)", add_help=False)
    sub.add_parser("adapt", help="per-project adaptation of the interactive network (model.cli.bench_adapt)",
                   add_help=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit":
        fit = importlib.import_module("model.cli.bench_fit")  # only when asked for: it loads ADClick-Seg
        return int(fit.main(argv[1:]) or 0)
    if argv and argv[0] == "adapt":
        return int(importlib.import_module("model.cli.bench_adapt").main(argv[1:]) or 0)
    args = parse_args(argv)
    setup_logging(args.verbose)
    torch.set_num_threads(max(1, min(args.threads, torch.get_num_threads())))
    commands = {"anomaly": cmd_anomaly, "clicks": cmd_clicks, "boxes": cmd_boxes}
    report = commands[args.command](args)
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
