"""Learning-curve benchmark of ADClick-Seg: `python -m model.bench fit --dataset DIR [--json FILE]`.

The defective test images are shuffled (seed); the first max(--sizes) form the training pool, labelled
either with their masks or with boxes only (one box per ground-truth mask component); every other test
image (defective and good) is the evaluation set, the same for every run. Each size trains a fresh
ADClick-Seg on the first N pool images (nested subsets), publishes it in a temporary version store, reloads
it as the service would (SegDetector) and is evaluated on the any-defect map. The unsupervised residual map
of the same engine and bank is evaluated on the same images in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import metrics
from model.training.datasets import limit_per_defect, load_mask, load_mvtec, load_rgb
from model.seg.data import SegExample, boxes_from_mask
from model.seg.fit import FitConfig
from model.seg.predict import SegDetector
from model.seg.versions import VersionStore

logger = logging.getLogger(__name__)

KEYS = ("pixel_ap", "au_pro", "pixel_auroc", "image_auroc", "fit_s")


@dataclass
class LoadedSet:
    examples: list[SegExample]  # defective (shuffled, with masks) first, then good (verdict OK)
    unsupervised: list[np.ndarray]  # the engine's (H, W) anomaly map of each example
    labels: list[str]
    encoder: Any
    stats: dict[str, Any]


def as_boxes(ex: SegExample) -> SegExample:
    """The same image labelled with boxes only: one box per connected component of each mask."""
    boxes = [(label, b) for label, m in ex.masks.items() for b in boxes_from_mask(m)]
    return dataclasses.replace(ex, masks={}, boxes=boxes)


def _residual_cache(args, engine, bank) -> Path | None:
    if not args.cache_dir:
        return None
    tag = hashlib.sha1(f"{engine.config_hash()}|{bank.key}".encode()).hexdigest()[:12]
    path = Path(args.cache_dir) / "seg-residuals" / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state(engine, bank, image: np.ndarray, cache: Path | None, stem: str):
    """(residual, features, anomaly map) of one image, from the cache folder when it holds them."""
    file = cache / f"{stem}.pt" if cache else None
    if file is not None and file.is_file():
        saved = torch.load(file, map_location="cpu", weights_only=True)
        if "features" in saved:  # caches written before features were kept are recomputed
            return saved["residual"], saved["features"], saved["amap"].numpy()
    state = engine.compute(image, bank)
    out = state.residual.half(), state.features.half(), state.anomaly_map
    if file is not None:
        torch.save({"residual": out[0], "features": out[1], "amap": torch.from_numpy(out[2])}, file)
    return out


def load_examples(args) -> tuple[list[SegExample], list[str], Any]:
    loaded = load_set(args)
    return loaded.examples, loaded.labels, loaded.encoder


def load_set(args) -> LoadedSet:
    """Residual examples of every test image of the dataset (bank from its defect-free images)."""
    from model.cli.bench import build_bank, make_engine, select_refs
    from model.modeling.text import CachedTextEncoder, TextConfig, build_text_encoder

    data = load_mvtec(args.dataset, include_validation=not args.no_validation)
    tmp = None if args.cache_dir else tempfile.mkdtemp(prefix="bench-fit-")
    engine = make_engine(args, args.match, args.cache_dir or tmp)
    bank, stats = build_bank(engine, select_refs(data, args.refs, args.seed))
    cache = _residual_cache(args, engine, bank)
    test_items = limit_per_defect(data.test, args.limit)
    defective = [t for t in test_items if t.is_anomalous]
    order = np.random.default_rng(args.seed).permutation(len(defective))
    items = [defective[i] for i in order] + [t for t in test_items if not t.is_anomalous]
    examples, unsup, t0 = [], [], time.perf_counter()
    for n, item in enumerate(items):
        image = load_rgb(item.path)
        residual, features, amap = _state(engine, bank, image, cache, f"{item.defect}-{item.path.stem}")
        mask = load_mask(item, image.shape[:2])
        examples.append(SegExample(residual=residual, features=features, image_size=image.shape[:2],
                                   masks={item.defect: mask} if item.is_anomalous else {},
                                   verdict=None if item.is_anomalous else False,
                                   key=f"{item.defect}/{item.path.name}", image=image[::4, ::4].copy()))
        unsup.append(amap)
        if (n + 1) % 20 == 0:
            logger.info("residuals %d/%d", n + 1, len(items))
    stats["residual_s_per_image"] = (time.perf_counter() - t0) / max(len(items), 1)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    encoder = CachedTextEncoder(build_text_encoder(TextConfig()))
    return LoadedSet(examples, unsup, data.defects, encoder, stats)


def evaluate(maps: Sequence[np.ndarray], examples: Sequence[SegExample]) -> dict[str, float]:
    pixels = [metrics.ImagePixels.from_map(m, e.union_mask()) for m, e in zip(maps, examples)]
    out = metrics.metrics_of(pixels)
    out["image_auroc"] = metrics.image_auroc([float(m.max()) for m in maps], [bool(e.masks) for e in examples])
    out["n_images"] = len(maps)
    return out


def run_one(train: list[SegExample], test: list[SegExample], loaded: LoadedSet, fit: FitConfig,
            store_dir: Path, init: str | None = None, use_features: bool = True) -> dict[str, float]:
    from model.seg.train import SegTrainConfig, prompt_matrix, train_version

    prompts = prompt_matrix(loaded.encoder, loaded.labels)
    cfg = SegTrainConfig(fit=fit, holdout=0.0, init_weights=init, use_features=use_features)
    t0 = time.perf_counter()
    info, figures = train_version(train, loaded.labels, prompts, VersionStore(store_dir, keep=1), cfg)
    fit_s = time.perf_counter() - t0
    ckpt, _ = VersionStore(store_dir).load(info.name)
    detector = SegDetector(ckpt, info.name)
    t0 = time.perf_counter()
    maps = [detector.detect(_Residual(e.residual, e.features), image_size=e.image_size).anomaly_map for e in test]
    out = evaluate(maps, test)
    out.update(fit_s=fit_s, detect_ms_per_image=1000 * (time.perf_counter() - t0) / len(test),
               n_train=len(train), train_loss_first=figures["loss_first"], train_loss_last=figures["loss_last"])
    return out


@dataclass
class _Residual:
    residual: torch.Tensor
    features: torch.Tensor | None = None


def _table(result: dict) -> None:
    print(f"{'run':<14}" + "".join(f"{k:>13}" for k in KEYS))
    rows = [("unsupervised", result["unsupervised"])]
    rows += [(f"{kind} {n}", r) for kind in ("masks", "boxes") for n, r in result.get(kind, {}).items()]
    for name, r in rows:
        print(f"{name:<14}" + "".join(f"{r.get(k, float('nan')):>13.4f}" for k in KEYS))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from model.cli.bench import _common

    p = argparse.ArgumentParser(prog="python -m model.bench fit", description=__doc__.split("\n\n")[0])
    _common(p, "window | softpos (matching of the residual engine)")
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
    from model.cli.bench import _overrides

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    fit = dataclasses.replace(FitConfig(), steps=args.steps, **_overrides(args.fit_opt))
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
