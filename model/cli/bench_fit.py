"""Learning-curve benchmark of ADClick-Seg: `python -m model.bench fit --dataset DIR [--json FILE]`.

The defective test images are shuffled (seed); the first max(--sizes) form the training pool, labelled
either with their masks or with boxes only (one box per ground-truth mask component); every other test
image (defective and good) is the evaluation set, the same for every run. Each size trains a fresh
ADClick-Seg on the first N pool images (nested subsets), publishes it in a temporary version store, reloads
it as the service would (SegDetector) and is evaluated on the any-defect map. The unsupervised residual map
of the same engine and bank is evaluated on the same images in the same run. The library behind it:
model/evaluation/seg_runs.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.cli.common import add_common_flags, setup_logging
from model.evaluation.runs import parse_overrides
from model.evaluation.seg_runs import as_boxes, evaluate, load_set, run_one
from model.seg.fit import FitConfig

KEYS = ("pixel_ap", "au_pro", "pixel_auroc", "image_auroc", "fit_s")


def _table(result: dict) -> None:
    print(f"{'run':<14}" + "".join(f"{k:>13}" for k in KEYS))
    rows = [("unsupervised", result["unsupervised"])]
    rows += [(f"{kind} {n}", r) for kind in ("masks", "boxes") for n, r in result.get(kind, {}).items()]
    for name, r in rows:
        print(f"{name:<14}" + "".join(f"{r.get(k, float('nan')):>13.4f}" for k in KEYS))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.bench fit", description=__doc__.split("\n\n")[0])
    add_common_flags(p, "window | softpos (matching of the residual engine)")
    p.add_argument("--sizes", default="5,10,20", help="numbers of labelled defective training images")
    p.add_argument("--kinds", default="masks,boxes", help="label kinds to train with")
    p.add_argument("--steps", type=int, default=FitConfig.steps)
    p.add_argument("--fit-opt", action="append", default=[], metavar="KEY=VALUE", help="FitConfig override")
    p.add_argument("--no-features", action="store_true",
                   help="residual tokens only (ablation; default: residuals + the images' feature tokens)")
    p.add_argument("--init", default=None,
                   help="ADClick checkpoint each fit's blocks start from (default: weights/adclick.pt; "
                        "'none' = from scratch)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    fit = dataclasses.replace(FitConfig(), steps=args.steps, **parse_overrides(args.fit_opt))
    loaded = load_set(args)
    n_def = sum(bool(e.masks) for e in loaded.examples)
    if max(sizes) >= n_def:
        raise SystemExit(f"--sizes {args.sizes}: only {n_def} defective images")
    pool, test = loaded.examples[: max(sizes)], loaded.examples[max(sizes):]
    test_unsup = loaded.unsupervised[max(sizes):]
    result: dict[str, Any] = {"unsupervised": evaluate(test_unsup, test)}
    print("unsupervised: " + " ".join(f"{k} {result['unsupervised'][k]:.4f}" for k in KEYS[:-1]), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-fit-versions-") as tmp:
        for kind in args.kinds.split(","):
            result[kind] = {}
            for n in sizes:
                train = pool[:n] if kind == "masks" else [as_boxes(e) for e in pool[:n]]
                result[kind][str(n)] = run_one(train, test, loaded, fit, Path(tmp) / f"{kind}-{n}",
                                               args.init, not args.no_features)
                row = result[kind][str(n)]
                print(f"{kind} {n}: " + " ".join(f"{k} {row[k]:.4f}" for k in KEYS), flush=True)
    result["config"] = {"dataset": str(args.dataset), "sizes": sizes, "n_test": len(test), "seed": args.seed,
                        "fit": fit.to_dict(), "init": args.init or "default", "features": not args.no_features,
                        "threads": torch.get_num_threads(),
                        **loaded.stats}
    _table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return 0

