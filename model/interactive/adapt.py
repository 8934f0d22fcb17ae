"""Per-project adaptation of the interactive network: fine-tune the shipped ADClick network on one project's
own references (synthetic defects, no labels) and, when there are some, its accepted annotations (masks, with
the clicks simulated on them as the benchmark does), then keep the result only when it clicks better there.

`adapt_network(base, engine, bank, references, make_predictor, labelled=(), cfg=AdaptConfig())`:

1. **Validation set first.** `cfg.val_references` references spread over the bank are held back; each gets
   synthetic defects of the calibration kinds (model/interactive/calibration.py) and is matched against the
   bank without its own views (leave-one-out). With labels, a share of the labelled images (`val_label_share`,
   at least one) is held out too. The score of a network is the mean IoU over clicks 1..`val_clicks` of the
   standard simulated annotator (model/evaluation/simulate.py) on these items, through `make_predictor(net)`
   (the chain the service serves: blend, boundary refinement, click-seeded stage; `predictor_for(...,
   chain=True)`). The shipped network is scored first (and `incumbent`, a version already published for the
   project, when given).
2. **Training samples** until `data_share` of the budget is spent (at most `train_samples`): synthetic defects of
   the training kinds (model/training/synth.py, 15 % cut by the border, 15 % several) over the other references,
   matched leave-one-out, and with labels (`paste_share` of them) the labelled defects pasted at their place onto
   those references; every labelled image that is not held out, with its mask as the target.
3. **Fine-tuning** from the shipped weights (input scales kept) with the training loop's own step
   (model/training/train_adclick.py: error-driven click rounds, focal + Dice loss), batches mixing labelled and
   synthetic samples (`label_share`) so that the network does not forget, until the time budget is spent
   (`minutes`, the time the final validation needs kept back).
4. **Decision.** The adapted network is kept only when its score beats the shipped one's (and the incumbent's)
   by `min_gain`; otherwise `AdaptResult.net` is None and `reason` says why.

Every image is brought to the most common reference size (`fit_to_grid`) so that batches stack. Prompts are
not trained here (the served blend sends none): every sample's prompt is dropped. Deterministic for a seed up to
the time budget (how many steps fit).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.engine.residuals import load_image
from model.evaluation.simulate import simulate
from model.interactive.calibration import CALIBRATION_KINDS, held_back, synthetic_defect

logger = logging.getLogger(__name__)

LABELLED_KIND = "labelled"
STOPPED = "stopped before the end"  # AdaptResult.reason when `stop()` said so


@dataclass(frozen=True)
class AdaptConfig:
    minutes: float = 8.0  # the whole job's budget: data, fine-tuning and validation (ADCLICK_ADAPT_MINUTES)
    data_share: float = 0.3  # at most this share of the budget builds training samples
    train_samples: int = 240  # synthetic training samples at most
    val_references: int = 12  # references held back for validation
    val_per_reference: int = 3  # synthetic defects on each
    val_label_share: float = 0.3  # labelled images held out for validation (at least one when there are two)
    val_clicks: int = 5
    batch: int = 8
    lr: float = 1.5e-4
    weight_decay: float = 0.01
    warmup: int = 10
    max_rounds: int = 3
    label_share: float = 0.25  # share of each batch drawn from the labelled images (when there are any)
    paste_share: float = 0.5  # with labels: share of the synthetic samples that are labelled defects pasted
    # at their place onto other references (real defect kinds on many backgrounds)
    at_border: float = 0.15
    multi: float = 0.15
    min_gain: float = 0.005  # mean validation IoU the adapted network must add to be kept
    max_steps: int = 0  # 0: as many as the budget allows
    seed: int = 0


@dataclass
class Labelled:
    """An accepted annotation: the image and the union of its defect masks (full size), or a box only (then the
    target is the shipped network's answer to that box, inside it)."""

    image: np.ndarray
    mask: np.ndarray | None
    name: str = ""
    box: tuple[float, float, float, float] | None = None


@dataclass
class AdaptResult:
    net: Any | None  # the adapted AdClickNet when it validated better, else None
    base_score: float
    score: float | None  # the adapted network's validation score (None when it was never trained)
    incumbent_score: float | None
    reason: str
    figures: dict = field(default_factory=dict)

    @property
    def better(self) -> bool:
        return self.net is not None


@dataclass
class _ValItem:
    image: np.ndarray
    gt: np.ndarray
    residual: Any  # the engine's ResidualState (shared by every network scored)
    source: str  # "references" | "labels"


def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from model.training.prepare import fit_to_grid

    return fit_to_grid(image, size)


def _fit_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return _fit(mask.astype(np.uint8) * 255, size) > 127


def common_size(images: Sequence[np.ndarray]) -> tuple[int, int]:
    """The most common (H, W) of `images` (ties: the first seen)."""
    return Counter((int(im.shape[0]), int(im.shape[1])) for im in images).most_common(1)[0][0]


def _box_targets(labelled: Sequence[Labelled], predictor, engine, bank) -> list[Labelled]:
    """Every labelled image with a mask target: box-only annotations get `predictor`'s mask for their box,
    clipped to it (dropped when empty)."""
    from model.interactive.learned import unwrap
    from model.types import box_mask

    out = []
    learned = unwrap(predictor)
    for lab in labelled:
        if lab.mask is not None and lab.mask.any():
            out.append(lab)
        elif lab.box is not None:
            state = learned.state_of(lab.image, engine.compute(lab.image, bank))
            mask = predictor.predict(state, [], box=lab.box).mask & box_mask(lab.box, lab.image.shape[:2])
            if mask.any():
                out.append(Labelled(lab.image, mask, lab.name))
    return out


def _split_labelled(labelled: Sequence[Labelled], share: float, rng: np.random.Generator
                    ) -> tuple[list[Labelled], list[Labelled]]:
    """(train, held out): at least one held out when there are two or more."""
    items = list(labelled)
    if len(items) < 2:
        return items, []
    order = rng.permutation(len(items))
    n_val = min(len(items) - 1, max(1, round(share * len(items))))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def score(predictor, items: Sequence[_ValItem], clicks: int) -> float:
    """Mean IoU over clicks 1..`clicks` of the simulated annotator on `items` (the mean of the synthetic items'
    and the labelled items' means when there are both), through `predictor` (the served chain, a blend or an
    AdClickPredictor: its per-image state is made from each item's residual state)."""
    from model.interactive.learned import unwrap

    learned = unwrap(predictor)
    values: dict[str, list[float]] = {}
    for item in items:
        state = learned.state_of(item.image, item.residual)
        sim = simulate(predictor, state, item.gt, max_clicks=clicks, thr=0.49)
        ious = sim.ious + [sim.ious[-1] if sim.ious else 1.0] * (clicks - len(sim.ious))
        values.setdefault(item.source, []).append(float(np.mean(ious)))
    # the held-out annotations (real defects) count as much as all the synthetic ones together
    return float(np.mean([np.mean(v) for v in values.values()])) if values else float("nan")


def _validation(engine, bank, references: Sequence[tuple[str, Any]], val_idx: Sequence[int],
                val_labels: Sequence[Labelled], size: tuple[int, int], cfg: AdaptConfig) -> list[_ValItem]:
    items = []
    for j, i in enumerate(val_idx):
        key, ref = references[i]
        image = _fit(load_image(ref), size)
        for r in range(cfg.val_per_reference):
            n = j * cfg.val_per_reference + r
            made = synthetic_defect(image, CALIBRATION_KINDS[n % len(CALIBRATION_KINDS)],
                                    np.random.default_rng(cfg.seed * 7919 + 101 * n + 17))
            if made is None:
                continue
            defect, gt = made
            items.append(_ValItem(defect, gt, engine.compute(defect, bank, exclude=key), "references"))
    for lab in val_labels:
        assert lab.mask is not None  # box-only annotations got their targets (_box_targets)
        image, gt = _fit(lab.image, size), _fit_mask(lab.mask, size)
        if gt.any():
            items.append(_ValItem(image, gt, engine.compute(image, bank), "labels"))
    return items


def paste(reference: np.ndarray, lab_image: np.ndarray, lab_mask: np.ndarray, sigma: float = 1.5
          ) -> np.ndarray:
    """The labelled defect (its pixels under a softened mask) pasted at its place onto a defect-free reference of
    the same size: a real defect kind over another reference's surroundings."""
    import cv2

    alpha = cv2.GaussianBlur(lab_mask.astype(np.float32), (0, 0), sigma)
    alpha = np.maximum(alpha, lab_mask.astype(np.float32))[..., None]
    return np.clip(np.rint(reference * (1 - alpha) + lab_image * alpha), 0, 255).astype(np.uint8)


def _synthetic_samples(engine, bank, references: Sequence[tuple[str, Any]], train_idx: Sequence[int],
                       size: tuple[int, int], cfg: AdaptConfig, deadline: float,
                       progress: Callable[[float, str], None], labelled: Sequence[Labelled] = (),
                       stop: Callable[[], bool] = lambda: False) -> list:
    """Synthetic defects over the training references; with labels, `paste_share` of them are the labelled
    defects pasted onto other references (`paste`)."""
    from model.training.prepare import make_residual_fn
    from model.training.samples import half_mask, synth_one, to_sample
    from model.training.synth import skimage_textures

    fitted = [(_fit(lab.image, size), _fit_mask(lab.mask, size)) for lab in labelled if lab.mask is not None]
    fitted = [(im, m) for im, m in fitted if m.any()]

    rng = np.random.default_rng(cfg.seed + 1)
    textures = skimage_textures()
    images: dict[int, np.ndarray] = {}
    out: list = []
    for n in range(cfg.train_samples):
        if stop():
            break
        if time.monotonic() > deadline and len(out) >= cfg.batch:
            logger.info("adaptation: %d synthetic samples when the data budget ran out", len(out))
            break
        i = int(train_idx[int(rng.integers(len(train_idx)))])
        key, ref = references[i]
        if i not in images:
            images[i] = _fit(load_image(ref), size)
        if fitted and rng.random() < cfg.paste_share:
            lab_image, lab_mask = fitted[int(rng.integers(len(fitted)))]
            image, masks, kinds = paste(images[i], lab_image, lab_mask), [half_mask(lab_mask)], [LABELLED_KIND]
        else:
            image, masks, kinds = synth_one(images[i], rng, textures, at_border=cfg.at_border, multi=cfg.multi)
        sample = to_sample(image, masks, kinds, make_residual_fn(engine, bank, key), "references")
        if sample is not None:
            out.append(sample)
        if (n + 1) % 20 == 0:
            progress(0.1 + 0.2 * (n + 1) / cfg.train_samples, f"synthetic samples {n + 1}/{cfg.train_samples}")
    return out


def _labelled_samples(engine, bank, labelled: Sequence[Labelled], size: tuple[int, int]) -> list:
    from model.training.prepare import make_residual_fn
    from model.training.samples import half_mask, to_sample

    out = []
    for lab in labelled:
        assert lab.mask is not None  # box-only annotations got their targets (_box_targets)
        image, mask = _fit(lab.image, size), _fit_mask(lab.mask, size)
        sample = to_sample(image, [half_mask(mask)], [LABELLED_KIND], make_residual_fn(engine, bank), "labels")
        if sample is not None:
            out.append(sample)
    return out


def _fine_tune(base, synthetic: list, labelled: list, cfg: AdaptConfig, deadline: float,
               progress: Callable[[float, str], None], stop: Callable[[], bool]) -> tuple[Any, dict]:
    from model.training.train_adclick import LoopConfig, make_batch, train_step

    net = copy.deepcopy(base).float()
    device = torch.device("cpu")
    loop = LoopConfig(batch=cfg.batch, lr=cfg.lr, weight_decay=cfg.weight_decay, max_rounds=cfg.max_rounds,
                      prompt_dropout=1.0, no_click_frac=0.0)
    kinds = {k for s in synthetic + labelled for k in s.kinds}
    prompts = {k: torch.zeros(1, net.cfg.text_dim) for k in kinds}  # never fed: every prompt is dropped
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed + 2)
    torch.manual_seed(cfg.seed)
    n_lab = min(cfg.batch - 1, round(cfg.batch * cfg.label_share)) if labelled else 0
    if not synthetic:
        n_lab = cfg.batch
    start, losses, step = time.monotonic(), [], 0
    span = max(1.0, deadline - start)
    while True:
        elapsed = time.monotonic() - start
        if step >= cfg.max_steps > 0 or (elapsed > span and step > 0) or stop():
            break
        t = min(1.0, max(elapsed / span, step / cfg.max_steps if cfg.max_steps else 0.0))
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * t))
        for g in opt.param_groups:
            g["lr"] = lr
        chosen = [labelled[int(i)] for i in rng.integers(len(labelled), size=n_lab)] if n_lab else []
        if cfg.batch - n_lab > 0:
            chosen += [synthetic[int(i)] for i in rng.choice(len(synthetic), size=min(cfg.batch - n_lab,
                                                                                        len(synthetic)),
                                                           replace=False)]
        batch = make_batch(chosen, prompts, rng, loop, device)
        rounds = int(rng.integers(0, cfg.max_rounds + 1))
        losses.append(train_step(net, opt, batch, rounds, loop, device))
        step += 1
        if step % 20 == 0:
            logger.info("adaptation step %d: loss %.4f (mean of the last 20), lr %.2e, %.0f s", step,
                        float(np.mean(losses[-20:])), lr, time.monotonic() - start)
            progress(0.3 + 0.6 * min(1.0, (time.monotonic() - start) / span), f"fine-tuning: step {step}")
    net.eval()
    return net, {"steps": step, "train_seconds": round(time.monotonic() - start, 1),
                 "loss_first": round(float(np.mean(losses[:20])), 4) if losses else None,
                 "loss_last": round(float(np.mean(losses[-20:])), 4) if losses else None}


def adapt_network(base, engine, bank, references: Sequence[tuple[str, Any]],
                  make_predictor: Callable[[Any], Any], labelled: Sequence[Labelled] = (),
                  cfg: AdaptConfig | None = None, incumbent=None,
                  progress: Callable[[float, str], None] | None = None,
                  stop: Callable[[], bool] | None = None) -> AdaptResult:
    """Fine-tune `base` (an AdClickNet, left unchanged) for one project; see the module docstring.
    `references`: (content hash, image or path) of the bank's sources; `make_predictor(net)` the predictor the
    service would build with that network over `bank`; `incumbent`: the network the project is served now
    when it is not the shipped one (the result must beat it too)."""
    cfg = cfg or AdaptConfig()
    progress = progress or (lambda f, m: None)
    stop = stop or (lambda: False)
    t0 = time.monotonic()
    budget = cfg.minutes * 60.0
    present = set(bank.source_keys)
    references = [(k, r) for k, r in references if k in present]
    figures: dict[str, Any] = {"references": len(references), "labelled": len(labelled),
                               "config": asdict(cfg)}
    if len(references) < 3 and not labelled:
        return AdaptResult(None, float("nan"), None, None,
                           f"{len(references)} reference images in the bank: at least 3 are needed to adapt "
                           "without labels", figures)
    with torch.inference_mode():
        size = common_size([load_image(r) for _, r in references[:8]] or [lab.image for lab in labelled])
    figures["size"] = list(size)
    n_val = min(cfg.val_references, max(1, len(references) // 3)) if len(references) >= 3 else 0
    val_idx = held_back([k for k, _ in references], n_val) if n_val else []
    train_idx = [i for i in range(len(references)) if i not in set(val_idx)]
    rng = np.random.default_rng(cfg.seed + 3)
    with torch.inference_mode():
        labelled = _box_targets(labelled, make_predictor(base), engine, bank)
    train_labels, val_labels = _split_labelled(labelled, cfg.val_label_share, rng)
    progress(0.02, "validation set: synthetic defects on held-back references")
    with torch.inference_mode():
        val = _validation(engine, bank, references, val_idx, val_labels, size, cfg)
    if not val:
        return AdaptResult(None, float("nan"), None, None, "no validation item could be made", figures)
    figures.update(val_items=len(val), val_from_labels=sum(v.source == "labels" for v in val),
                   train_labelled=len(train_labels))
    tv = time.monotonic()
    with torch.inference_mode():
        base_score = score(make_predictor(base), val, cfg.val_clicks)
        inc_score = score(make_predictor(incumbent), val, cfg.val_clicks) if incumbent is not None else None
    val_s = time.monotonic() - tv
    figures.update(validation_seconds=round(val_s, 1))
    logger.info("adaptation: shipped network scores %.4f on %d validation items%s (%.1f s)", base_score, len(val),
                "" if inc_score is None else f", the served version {inc_score:.4f}", val_s)
    train_end = t0 + budget - 1.2 * val_s / (2 if incumbent is not None else 1)
    data_end = min(train_end, t0 + cfg.data_share * budget)
    with torch.inference_mode():
        synthetic = (_synthetic_samples(engine, bank, references, train_idx, size, cfg, data_end, progress,
                                        train_labels, stop) if train_idx else [])
        lab_samples = _labelled_samples(engine, bank, train_labels, size)
    figures.update(synthetic_samples=len(synthetic), labelled_samples=len(lab_samples),
                   data_seconds=round(time.monotonic() - t0, 1))
    if stop():
        return AdaptResult(None, base_score, None, inc_score, STOPPED, figures)
    if not synthetic and not lab_samples:
        return AdaptResult(None, base_score, None, inc_score, "no training sample could be made", figures)
    net, fit = _fine_tune(base, synthetic, lab_samples, cfg, train_end, progress, stop)
    figures.update(fit)
    if stop():
        return AdaptResult(None, base_score, None, inc_score, STOPPED, figures)
    progress(0.92, "validating the adapted network")
    with torch.inference_mode():
        adapted = score(make_predictor(net), val, cfg.val_clicks)
    figures.update(seconds=round(time.monotonic() - t0, 1), base_score=round(base_score, 4),
                   score=round(adapted, 4), incumbent_score=None if inc_score is None else round(inc_score, 4))
    bar = max(base_score, inc_score if inc_score is not None else -1.0) + cfg.min_gain
    if adapted < bar:
        against = "the shipped network" if inc_score is None or base_score >= inc_score else "the served version"
        reason = (f"the adapted network scored {adapted:.3f} on {len(val)} validation items, not {cfg.min_gain:g} "
                  f"better than {against} ({max(base_score, inc_score or -1.0):.3f}); kept what is served")
        logger.info("adaptation not kept: %s", reason)
        return AdaptResult(None, base_score, adapted, inc_score, reason, figures)
    reason = (f"the adapted network scored {adapted:.3f} against {base_score:.3f} for the shipped one on "
              f"{len(val)} validation items ({figures['steps']} steps, {figures['seconds']:.0f} s)")
    logger.info("adaptation kept: %s", reason)
    return AdaptResult(net, base_score, adapted, inc_score, reason, figures)


def manifest_entry(base_entry: dict, file: str, version: str, meta: dict | None = None) -> dict:
    """The manifest entry of adapted weights saved as `file`: the shipped entry's engine and text settings,
    the version name (what the service calls its predictions) and what it was adapted from and how."""
    entry = {k: v for k, v in base_entry.items() if k not in ("sha256", "metrics", "training", "version")}
    entry.update(file=file, version=version, adapted_from=base_entry.get("sha256"), adaptation=dict(meta or {}))
    return entry


def write_weights(folder: Path, net, base_entry: dict, version: str, meta: dict | None = None,
                  name: str = "adclick", file: str = "adclick.pt") -> Path:
    """`net` saved as a weights folder the service loads like the shipped one (`file` + manifest.json)."""
    from model.checkpoint import atomic_save
    from weights import write_entry

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save(checkpoint_of(net, meta), folder / file)
    write_entry(folder, name, manifest_entry(base_entry, file, version, meta))
    return folder / file


def checkpoint_of(net, meta: dict | None = None) -> dict:
    from model.checkpoint import make_checkpoint
    from model.modeling.adclick import ARCH

    return make_checkpoint(ARCH, net.cfg.to_dict(), net.state_dict(), dict(meta or {}))
