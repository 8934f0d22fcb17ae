"""Training loop of ADClick-Seg over labelled residual tokens (masks, boxes, verdicts).

Crops of `crop x crop` tokens are sampled (most of them centred on labelled defects or boxes), augmented
(flips, SemiREST channel "shake": per-channel gains exp(N(0, s)) clipped to [0.8, 1.25]) and classified
block-wise. Labelled blocks use a class-balanced BCE; blocks inside boxes get MixMatch-style guessed labels
(mean prediction over K augmented views, sharpened) and every box must hold at least one defect block
(its highest logit is pushed up); on some steps crops are mixed (MixUp) with their targets.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from model.modeling.adclick_seg import AdClickSeg
from model.seg.data import IGNORE, UNLABELLED, BlockRule, SegExample, Targets, build_targets
from model.types import Progress

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class FitConfig:
    steps: int = 60  # at most; few-label fits overfit quickly: 60 steps were best at 20 tire images
    steps_per_image: int = 3  # steps = min(steps, max(20, this x labelled defect images)); 0 = always `steps`
    batch: int = 8
    crop: int = 24  # tokens per crop side
    lr: float = 2e-3
    weight_decay: float = 1e-4
    focus: float = 0.6  # fraction of crops centred on a defect or box block
    guess_views: int = 2
    sharpen_t: float = 0.5
    unlabelled_weight: float = 0.5
    bag_weight: float = 0.3
    mixup_alpha: float = 0.75
    mixup_prob: float = 0.6
    shake: float = 0.25
    pos_share: float = 0.25  # share of the labelled loss given to defect blocks (the rest: normal blocks);
    # 0.5 over-rewards recall: blocks next to a defect rank high and cost pixel AP (0.25: +2 points mean)
    soft_band: bool = False  # BlockRule.soft_band: partially covered blocks trained on their fraction
    seed: int = 0
    log_every: int = 25

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Prepared:
    residual: torch.Tensor  # (C, h', w') padded to at least one crop
    target: torch.Tensor  # (L, h', w')
    bags: torch.Tensor  # (L, h', w')
    focus: np.ndarray  # (K, 2) token positions worth centring a crop on


def _prepare(ex: SegExample, t: Targets, crop: int) -> _Prepared:
    _, h, w = ex.residual.shape
    ph, pw = max(0, crop - h), max(0, crop - w)
    res = F.pad(ex.tokens, (0, pw, 0, ph))
    tgt = F.pad(t.target, (0, pw, 0, ph), value=IGNORE)
    bags = F.pad(t.bags, (0, pw, 0, ph))
    any_map = t.target[0]
    pts = torch.nonzero((any_map == 1.0) | ((any_map == UNLABELLED) & (t.bags[0] > 0)))
    if len(pts) > 2000 or (len(pts) and (any_map == UNLABELLED).all()):  # whole-image bag: best blocks
        score = ex.residual.float().pow(2).sum(0)
        top = torch.topk(score.flatten(), k=min(8, score.numel())).indices
        pts = torch.stack([top // w, top % w], 1)
    return _Prepared(res, tgt, bags, pts.numpy())


def _crop(p: _Prepared, crop: int, rng: np.random.Generator, focus: bool):
    _, h, w = p.residual.shape
    if focus and len(p.focus):
        r, c = p.focus[rng.integers(len(p.focus))]
        r0 = int(np.clip(r - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, h - crop))
        c0 = int(np.clip(c - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, w - crop))
    else:
        r0, c0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    sl = (slice(None), slice(r0, r0 + crop), slice(c0, c0 + crop))
    bags = p.bags[sl]
    complete = bags.clone()
    for m in range(bags.shape[0]):  # a bag is only a constraint when the crop holds all of it
        for bag_id in torch.unique(bags[m]).tolist():
            if bag_id and int((bags[m] == bag_id).sum()) != int((p.bags[m] == bag_id).sum()):
                complete[m][bags[m] == bag_id] = 0
    return p.residual[sl], p.target[sl], bags, complete


def _flip(x: torch.Tensor, code: int) -> torch.Tensor:
    dims = [d for d, bit in ((-1, 1), (-2, 2)) if code & bit]
    return torch.flip(x, dims) if dims else x


def _shake(x: torch.Tensor, s: float, gen: torch.Generator) -> torch.Tensor:
    gain = torch.exp(torch.randn(x.shape[0], x.shape[1], 1, 1, generator=gen) * s).clamp(0.8, 1.25)
    return x * gain


@torch.no_grad()
def _guess(model: AdClickSeg, x: torch.Tensor, prompts: torch.Tensor, cfg: FitConfig, gen) -> torch.Tensor:
    was_training = model.training
    model.eval()
    acc = torch.zeros(x.shape[0], prompts.shape[0], *x.shape[-2:])
    for k in range(cfg.guess_views):
        code = k % 4
        acc += _flip(torch.sigmoid(model(_flip(_shake(x, cfg.shake, gen), code), prompts)), code)
    model.train(was_training)
    return acc / cfg.guess_views


def _relative_to_bags(p: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """Divide guesses inside each box by the box's highest guess: a box holds a defect, so its most
    defect-like block is one and the others are judged relative to it."""
    p = p.clone()
    for b, m in torch.nonzero(bags.flatten(2).amax(-1) > 0).tolist():
        for bag_id in torch.unique(bags[b, m]).tolist():
            if bag_id:
                sel = bags[b, m] == bag_id
                p[b, m][sel] = p[b, m][sel] / p[b, m][sel].max().clamp_min(1e-6)
    return p


def _sharpen(p: torch.Tensor, t: float) -> torch.Tensor:
    p = p.clamp(1e-4, 1 - 1e-4)
    pt, qt = p ** (1 / t), (1 - p) ** (1 / t)
    return pt / (pt + qt)


def _weights(y: torch.Tensor, kind: torch.Tensor, cfg: FitConfig, ramp: float) -> torch.Tensor:
    """Per-token loss weights: labelled defect and normal blocks balanced per map, guessed blocks ramped."""
    w = torch.zeros_like(y)
    for m in range(y.shape[1]):
        lab = kind[:, m] == 1
        pos = lab & (y[:, m] >= 0.5)
        neg = lab & (y[:, m] < 0.5)
        unl = kind[:, m] == 2
        w[:, m][pos] = cfg.pos_share / max(int(pos.sum()), 1)
        w[:, m][neg] = (1 - cfg.pos_share) / max(int(neg.sum()), 1)
        w[:, m][unl] = cfg.unlabelled_weight * ramp / max(int(unl.sum()), 1)
    return w / y.shape[1]


def _bag_loss(logits: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    terms = []
    for b, m in torch.nonzero(bags.flatten(2).amax(-1) > 0).tolist():
        for bag_id in torch.unique(bags[b, m]).tolist():
            if bag_id:
                top = logits[b, m][bags[b, m] == bag_id].max()
                terms.append(F.softplus(-top))
    return torch.stack(terms).mean() if terms else logits.sum() * 0.0


def _step_loss(model, prompts, x, tgt, bags, complete, cfg: FitConfig, step: int, rng, gen) -> torch.Tensor:
    unl = tgt == UNLABELLED
    y = tgt.clone()
    if unl.any():
        guess = _relative_to_bags(_guess(model, x, prompts, cfg, gen), bags)
        y[unl] = _sharpen(guess, cfg.sharpen_t)[unl]
    kind = torch.where(tgt == IGNORE, 0, torch.where(unl, 2, 1))
    y = y.clamp(0, 1)
    mixed = cfg.mixup_alpha > 0 and rng.random() < cfg.mixup_prob
    if mixed:
        lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
        lam = max(lam, 1 - lam)
        perm = torch.from_numpy(rng.permutation(x.shape[0]))
        x = lam * x + (1 - lam) * x[perm]
        y = lam * y + (1 - lam) * y[perm]
        kind = torch.where((kind == 0) | (kind[perm] == 0), 0, torch.maximum(kind, kind[perm]))
    logits = model(x, prompts)
    ramp = min(1.0, step / max(1.0, 0.3 * cfg.steps))
    w = _weights(y, kind, cfg, ramp)
    loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum()
    if not mixed and complete.any():
        loss = loss + cfg.bag_weight * _bag_loss(logits, complete)
    return loss


def fit_seg(
    model: AdClickSeg,
    examples: list[SegExample],
    labels: list[str],
    prompts: torch.Tensor,
    cfg: FitConfig = FitConfig(),
    progress: Progress | None = None,
) -> list[float]:
    """Train `model` in place on `examples` for maps [ANY, *labels] (`prompts` (1+len(labels), P)).
    Returns the loss per logged interval (mean over `cfg.log_every` steps)."""
    examples = [e for e in examples if e.usable]
    if not examples:
        raise ValueError("no usable labelled example (masks, boxes or a verdict are needed)")
    n_defect = sum(bool(e.masks or e.boxes or e.verdict) for e in examples)
    if cfg.steps_per_image > 0:
        cfg = replace(cfg, steps=min(cfg.steps, max(20, cfg.steps_per_image * n_defect)))
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model.fit_normalisation([e.tokens for e in examples])
    rule = BlockRule(soft_band=cfg.soft_band)
    prepared = [_prepare(e, build_targets(e, labels, rule), cfg.crop) for e in examples]
    focusable = [i for i, p in enumerate(prepared) if len(p.focus)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    model.train()
    history, window, t0 = [], [], time.monotonic()
    for step in range(cfg.steps):
        crops = []
        for _ in range(cfg.batch):
            focus = bool(focusable) and rng.random() < cfg.focus
            idx = focusable[rng.integers(len(focusable))] if focus else int(rng.integers(len(prepared)))
            crops.append(_crop(prepared[idx], cfg.crop, rng, focus))
        code = int(rng.integers(4))
        x, tgt, bags, complete = (_flip(torch.stack(parts), code) for parts in zip(*crops))
        x = _shake(x, cfg.shake, gen)
        loss = _step_loss(model, prompts, x, tgt, bags, complete, cfg, step, rng, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            history.append(float(np.mean(window)))
            window = []
            msg = f"step {step + 1}/{cfg.steps} loss {history[-1]:.4f} ({time.monotonic() - t0:.0f}s)"
            logger.info("adclick-seg %s", msg)
            if progress is not None:
                progress((step + 1) / cfg.steps, msg)
    model.eval()
    return history
