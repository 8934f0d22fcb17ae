"""The learning-curve benchmark of ADClick-Seg as a library (model/cli/bench_fit.py is its command line; the
seg training command, model/cli/train_seg.py, loads its examples with `load_examples`).

`load_set(args)`: residual examples of every test image of an MVTec-style folder (bank from its defect-free
images; defective images shuffled with the seed, first), with the unsupervised map of each. `run_one` trains a
fresh ADClick-Seg on some of them, publishes it in a version store, reloads it as the service would
(SegDetector) and evaluates its any-defect map; `evaluate` gives pixel AP / AU-PRO / AUROC and image AUROC.
"""
from __future__ import annotations

import dataclasses
import hashlib
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
from model.evaluation.runs import build_bank, make_engine, select_refs
from model.seg.data import SegExample, boxes_from_mask
from model.seg.fit import FitConfig
from model.seg.predict import SegDetector
from model.seg.train import SegTrainConfig, prompt_matrix, train_version
from model.seg.versions import VersionStore
from model.training.datasets import limit_per_defect, load_mask, load_mvtec, load_rgb

logger = logging.getLogger(__name__)


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
    image_shape: tuple[int, int] | None = None

