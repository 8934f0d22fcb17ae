"""ADClick-Seg training pipeline: labelled examples -> a new published version.

`train_version(examples, labels, prompts, store, cfg)` splits off a held-out part of the labels, trains
(model/seg/fit.py), chooses per-label thresholds on the training labels, evaluates on the held-out part,
and publishes checkpoint + metrics + PNG report atomically as `adclick-seg-v<N>` (model/seg/versions.py).
Both the service's fit (backend/training.py) and the command line `python -m model.train seg`
(model/cli/train_seg.py) use it.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.modeling.adclick_seg import AdClickSeg, SegConfig, SegEnsemble, build_seg, load_matching
from model.seg.data import ANY, SegExample
from model.seg.fit import FitConfig, fit_seg
from model.seg.predict import choose_thresholds, evaluate_maps, make_checkpoint, predict_grid, to_image
from model.seg.report import Overlay, write_report
from model.seg.versions import VersionInfo, VersionStore
from model.types import Progress

logger = logging.getLogger(__name__)

ANY_PROMPT = "defect"  # the text behind the any-defect map
ADCLICK_WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "adclick.pt"


@dataclass(frozen=True)
class SegTrainConfig:
    model: dict[str, Any] = field(default_factory=dict)  # SegConfig overrides (dim, depth, window, ...)
    fit: FitConfig = field(default_factory=FitConfig)
    holdout: float = 0.2  # fraction of the evaluable labelled images kept out of training
    min_for_holdout: int = 4  # fewer evaluable images than this: no held-out part (train on all)
    init_weights: str | None = None  # ADClick checkpoint, or "none"; None = weights/adclick.pt when present
    use_features: bool = True  # feed the images' feature tokens too, when every example carries them
    seed: int = 0


def prompt_matrix(encoder: Any, labels: Sequence[str], object_name: str = "") -> torch.Tensor:
    """(1 + len(labels), P) prompt vectors [any defect, *labels] from a CachedTextEncoder-like encoder."""
    rows = [encoder.prompt_vector(ANY_PROMPT, "", object_name)]
    rows += [encoder.prompt_vector(label, "", object_name) for label in labels]
    if any(r is None for r in rows):
        raise ValueError("empty defect label: every label needs a prompt")
    return torch.stack(rows).float()


def init_from_adclick(model: AdClickSeg, path: str | Path | None) -> int:
    """Copy the interactive ADClick's transformer blocks and position encoding where shapes match; returns how
    many tensors were copied (0: from scratch). path None: weights/adclick.pt; "none": from scratch."""
    if str(path).lower() == "none":
        return 0
    path = Path(path) if path else ADCLICK_WEIGHTS
    if not path.is_file():
        logger.info("no ADClick weights at %s: ADClick-Seg starts from scratch", path)
        return 0
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file must not stop the fit: train from scratch and say why
        logger.warning("cannot read %s (%s): ADClick-Seg starts from scratch", path, exc)
        return 0
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    return load_matching(model, state, {"blocks.": "blocks.", "pos.": "pos."})


def split_holdout(examples: list[SegExample], frac: float, minimum: int, seed: int):
    """(train, held_out): held-out images are drawn among those with masks or an OK verdict."""
    evaluable = [i for i, e in enumerate(examples) if e.masks or e.verdict is False]
    if len(evaluable) < minimum or frac <= 0:
        return examples, []
    rng = np.random.default_rng(seed)
    defective = [i for i in evaluable if examples[i].masks]
    normal = [i for i in evaluable if not examples[i].masks]
    held = set()
    for group in (defective, normal):  # stratified: defective and OK images in proportion
        k = round(frac * len(group))
        held.update(rng.permutation(group)[:k].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    if not any(e.masks or e.boxes or e.verdict for e in train):
        return examples, []
    return train, [examples[i] for i in sorted(held)]


def _eval_part(model, examples, prompts, thresholds):
    maps, masks, overlays = [], [], []
    for ex in examples:
        if not ex.masks and ex.verdict is not False:
            continue
        prob = to_image(predict_grid(model, ex.tokens, prompts[:1])[0], ex.image_size)
        maps.append(prob)
        masks.append(ex.union_mask())
        if ex.masks and len(overlays) < 4:
            overlays.append(Overlay(ex.image, prob, masks[-1], prob >= thresholds[ANY], ex.key))
    return maps, masks, overlays


def learned_labels(examples: list[SegExample], labels: list[str]) -> list[str]:
    """The labels (in `labels` order) that at least one training example locates with a mask or a box: only
    those have a map that learned anything, so only those may name a detected region."""
    seen = {lab for e in examples for lab in e.masks} | {lab for e in examples for lab, _ in e.boxes}
    return [lab for lab in labels if lab in seen]


def train_version(examples: list[SegExample], labels: list[str], prompts: torch.Tensor, store: VersionStore,
                  cfg: SegTrainConfig = SegTrainConfig(), progress: Progress | None = None,
                  meta: dict[str, Any] | None = None) -> tuple[VersionInfo, dict[str, Any]]:
    """Train, evaluate and publish one version; returns (its VersionInfo, its figures)."""
    t0 = time.monotonic()
    usable = [e for e in examples if e.usable]
    c = int(usable[0].residual.shape[0]) if usable else 0
    with_feats = bool(usable) and all(e.features is not None for e in usable) and cfg.use_features
    n_feat = int(usable[0].features.shape[0]) if with_feats else 0
    if not with_feats:
        usable = [dataclasses.replace(e, features=None) for e in usable]
    train, held = split_holdout(usable, cfg.holdout, cfg.min_for_holdout, cfg.seed)
    with torch.random.fork_rng(devices=[]):  # the initial weights follow cfg.seed: a run is repeatable
        torch.manual_seed(cfg.seed)
        model = build_seg(SegConfig(in_channels=c, prompt_dim=int(prompts.shape[1]), feat_channels=n_feat,
                                    **cfg.model))
    members = list(model.members) if isinstance(model, SegEnsemble) else [model]
    n_init, history = 0, []
    for i, member in enumerate(members):  # each member: the same data, its own seed
        n_init = init_from_adclick(member, cfg.init_weights)
        report = None
        if progress:
            def report(f: float, m: str, i: int = i) -> None:
                progress(0.05 + 0.8 * (i + f) / len(members), f"member {i + 1}/{len(members)}: {m}")
        fit = dataclasses.replace(cfg.fit, seed=cfg.fit.seed + i)
        hist = fit_seg(member, train, labels, prompts, fit, report)
        history = hist if not history else [a + b for a, b in zip(history, hist)]
    history = [h / len(members) for h in history]
    model.eval()
    thresholds = choose_thresholds(model, train, labels, prompts)
    maps, masks, overlays = _eval_part(model, held or train, prompts, thresholds)
    metrics = {k: float(v) for k, v in evaluate_maps(maps, masks).items()}
    figures = {
        "n_train": len(train), "n_heldout": len(held), "evaluated_on": "heldout" if held else "train",
        "n_masks": sum(bool(e.masks) for e in train), "n_boxes": sum(len(e.boxes) for e in train),
        "n_ok": sum(e.verdict is False and not e.masks and not e.boxes for e in train),
        "labels": list(labels), "learned_labels": learned_labels(train, labels),
        "thresholds": thresholds, "metrics": metrics,
        "loss_first": history[0], "loss_last": history[-1], "init_tensors": n_init,
        "fit_seconds": round(time.monotonic() - t0, 2), "config": {
            "model": model.cfg.to_dict(), "fit": cfg.fit.to_dict(), "holdout": cfg.holdout},
    }
    if progress:
        progress(0.9, "publishing the new version")

    def extra(folder: Path, name: str) -> None:
        write_report(folder / "report.png", f"{name}: evaluated on {figures['evaluated_on']} "
                     f"({len(maps)} images)", maps, masks, overlays,
                     figures={k: v for k, v in metrics.items() if k != "n_images"})

    ckpt = make_checkpoint(model, labels, prompts, thresholds, {"labels": list(labels)}, figures["learned_labels"])
    info = store.commit(ckpt, {**(meta or {}), **figures}, write_extra=extra)
    logger.info("%s: %d train / %d held-out images, metrics %s, %.0f s", info.name, len(train), len(held),
                {k: round(v, 4) for k, v in metrics.items()}, figures["fit_seconds"])
    return info, figures
