"""Per-project adaptation benchmark of the interactive network:
`python -m model.bench adapt --dataset DIR [--labels 0,10,20] [--minutes 8] [--json FILE]`.

The defective test images are ordered by a seeded shuffle, round-robin over defect types; the first
max(--labels) of them form the labelled pool (their masks are the accepted annotations), every other defective
test image is the evaluation set, the same for every run. The bank holds the dataset's defect-free images
(train/good + validation/good), as a project's references. Runs, all in one process with one bank:

- `shipped`: the shipped weights;
- `refs`: after adaptation on the references only (label count 0);
- `labels_N`: after adaptation on the references and the first N pool images;
- `grabcut`: GrabCut from the same clicks.

Each adaptation is model/interactive/adapt.py's `adapt_network`, as the service runs it, with its time budget
(--minutes) and its publication rule: when the adapted network does not validate better, the service keeps the
shipped one, so the run reports the shipped network's figures with "published": false. Evaluation is the click
benchmark's (`python -m model.bench clicks`, served chain --predictor, --max-clicks, always all clicks).
JSON: {"shipped"|"refs"|"labels_N"|"grabcut": {"overall": {miou@1, miou@3, miou@5, noc85, f1@20, adapt_s, ...},
"per_defect": {...}, "adaptation": {...}}, "config": {...}}.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model.cli.common import add_common_flags, setup_logging
from model.evaluation.predictors import get_builder
from model.evaluation.report import per_defect, print_table, write_json
from model.evaluation.runs import click_summary, make_engine, run_clicks_once
from model.training.datasets import TestItem, limit_per_defect, load_mask, load_mvtec, load_rgb

logger = logging.getLogger(__name__)

KEYS = ("miou@1", "miou@3", "miou@5", "noc85", "f1@20", "adapt_s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.bench adapt", description=__doc__.split("\n\n")[0])
    add_common_flags(p, "window | softpos (matching of the residual engine)")
    p.add_argument("--labels", default="0,10,20", help="labelled images per adaptation (0 = references only)")
    p.add_argument("--minutes", type=float, default=8.0, help="time budget of each adaptation (ADCLICK_ADAPT_MINUTES, default 8)")
    p.add_argument("--predictor", default="adclick-blend+refine+seeded", help="the served chain evaluated")
    p.add_argument("--max-clicks", type=int, default=20)
    p.add_argument("--adapt-opt", action="append", default=[], metavar="KEY=VALUE", help="AdaptConfig override")
    p.add_argument("--weights-dir", default=None, help="the shipped weights (default: weights/)")
    p.add_argument("--out", default=None, help="keep the adapted weights folders here")
    p.add_argument("--no-grabcut", action="store_true")
    return p.parse_args(argv)


def labelled_pool(items: Sequence[TestItem], n: int, seed: int) -> tuple[list[TestItem], list[TestItem]]:
    """(pool of `n`, the rest): a seeded shuffle per defect type, then round-robin over the types."""
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[TestItem]] = {}
    for item in items:
        by_type.setdefault(item.defect, []).append(item)
    queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_type.items())]
    order = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order[:n], order[n:]


def _clicks_args(args, weights_dir: str | None) -> argparse.Namespace:
    """What the click benchmark's predictor builders and run read (python -m model.bench clicks's defaults)."""
    return argparse.Namespace(
        dataset=args.dataset, predictor=args.predictor, max_clicks=args.max_clicks, all_clicks=True, thr=0.49,
        prompt="none", weights_dir=weights_dir, refine_opt=[], seeded_opt=[], focus_opt=[], blend_opt=[],
        calibrate="off", grabcut_iters=5, ref_paths=None)


def _evaluate(name: str, builder_name: str, engine, bank, items, args, weights_dir: str | None) -> dict:
    ns = _clicks_args(args, weights_dir)
    rows = run_clicks_once(get_builder(builder_name)(engine, bank, ns), items, ns)

    def summary(rs: list[dict]) -> dict:
        s = click_summary(rs, args.max_clicks)
        s["f1@20"] = s.pop("f1_last")
        s["f1@20_tol1"] = s.pop("f1_last_tol1")
        return s

    out = {"overall": summary(rows), "per_defect": per_defect(rows, lambda r: r["defect"], summary)}
    print_table(f"adapt {name}", {"overall": out["overall"], **out["per_defect"]}, KEYS[:-1])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from model.engine.residuals import content_hash
    from model.evaluation.runs import parse_overrides
    from model.interactive.adapt import AdaptConfig, Labelled, adapt_network, write_weights
    from model.interactive.choose import InteractiveConfig
    from model.interactive.learned import predictor_for, shipped_network

    args = parse_args(argv)
    setup_logging(args.verbose)
    torch.set_num_threads(args.threads)
    counts = [int(v) for v in args.labels.split(",") if v != ""]
    data = load_mvtec(args.dataset, include_validation=not args.no_validation)
    defective = [t for t in data.test if t.is_anomalous]
    pool, rest = labelled_pool(defective, max(counts + [0]), args.seed)
    items = limit_per_defect(rest, args.limit)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench-adapt-bank-")
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-adapt-weights-"))
    cfg = AdaptConfig(minutes=args.minutes, seed=args.seed, **parse_overrides(args.adapt_opt))
    report: dict = {}
    try:
        engine = make_engine(args, args.match, cache_dir)
        refs = list(data.normals)
        bank = engine.build_bank(refs)
        references = [(content_hash(p), p) for p in refs]
        base, entry = shipped_network(engine, Path(args.weights_dir) if args.weights_dir else None)
        config = InteractiveConfig()
        report["shipped"] = _evaluate("shipped", args.predictor, engine, bank, items, args, args.weights_dir)
        report["shipped"]["overall"]["adapt_s"] = 0.0
        for n in counts:
            key = "refs" if n == 0 else f"labels_{n}"
            labelled = []
            for item in pool[:n]:
                image = load_rgb(item.path)
                labelled.append(Labelled(image, load_mask(item, image.shape[:2]), item.defect))
            result = adapt_network(base, engine, bank, references,
                                   lambda net: predictor_for(engine, bank, net, config, chain=True), labelled, cfg)
            adaptation = {"published": result.better, "reason": result.reason, **result.figures}
            if result.better:
                folder = out_dir / key
                write_weights(folder, result.net, entry, f"adclick-bench-{key}", {"bench": key})
                run = _evaluate(key, args.predictor, engine, bank, items, args, str(folder))
            else:  # the service keeps the shipped network: what it serves is what the shipped run measured
                run = {"overall": dict(report["shipped"]["overall"]), "per_defect": report["shipped"]["per_defect"]}
            run["overall"]["adapt_s"] = result.figures.get("seconds", 0.0)
            run["adaptation"] = adaptation
            report[key] = run
            logger.warning("%s: %s", key, result.reason)
        if not args.no_grabcut:
            report["grabcut"] = _evaluate("grabcut", "grabcut", engine, bank, items, args, None)
            report["grabcut"]["overall"]["adapt_s"] = 0.0
        print_table("adapt", {k: v["overall"] for k, v in report.items()}, KEYS)
        report["config"] = {"dataset": str(args.dataset), "labels": counts, "minutes": args.minutes,
                            "predictor": args.predictor, "eval_images": len(items), "pool": [str(p.path) for p in pool],
                            "references": len(refs), "threads": torch.get_num_threads(), "seed": args.seed}
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
        if not args.out:
            shutil.rmtree(out_dir, ignore_errors=True)
    write_json(report, args.json)
    return 0
