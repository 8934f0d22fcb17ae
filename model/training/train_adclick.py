"""Training loop of the learned ADClick network over cached synthetic samples (see model/training/samples.py).

Each step: a batch of samples, one target defect kind per sample (its instances = the target, other defects =
background), a prompt vector for that kind (dropped with `prompt_dropout`), RITM-style initial clicks, then
0..max_rounds error-driven click rounds through the current network (no gradient) feeding the previous mask,
and one gradient step on focal + soft-Dice loss at stride 4. `no_click_frac` of the samples get no clicks and
a prompt (batch pre-annotation: `detect`). Everything is seeded; checkpoints are atomic and resumable.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import atomic_save, make_checkpoint
from model.interactive.clicks import click_maps, next_click
from model.modeling.adclick import ARCH, AdClickConfig, AdClickNet
from model.training import distributed
from model.training.samples import Sample, initial_clicks
from model.types import Click

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 2000
    batch: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: int = 100
    max_rounds: int = 3
    prompt_dropout: float = 0.3
    no_click_frac: float = 0.15
    max_minutes: float = 0.0  # 0 = no time limit
    log_every: int = 50
    ckpt_every: int = 500
    focal_gamma: float = 2.0
    dice_weight: float = 0.5


@dataclass
class Batch:
    residual: torch.Tensor
    grid: torch.Tensor
    features: torch.Tensor | None
    image: torch.Tensor
    target: torch.Tensor  # (B, 1, H/4, W/4) soft
    gt: list[np.ndarray] = field(default_factory=list)  # (H/4, W/4) bool
    clicks: list[list[Click]] = field(default_factory=list)
    prompt: torch.Tensor | None = None  # (B, D)
    has_prompt: torch.Tensor | None = None  # (B,) bool


def _flip(t: torch.Tensor, h: bool, v: bool) -> torch.Tensor:
    dims = [d for d, on in ((-1, h), (-2, v)) if on]
    return t.flip(dims) if dims else t


def make_batch(samples: Sequence[Sample], prompts: dict[str, torch.Tensor], rng: np.random.Generator,
               cfg: LoopConfig, device: torch.device) -> Batch:
    res, grid, feats, imgs, targets, gts, clicks, pvec, has = [], [], [], [], [], [], [], [], []
    for s in samples:
        hflip, vflip = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        kind = s.kinds[int(rng.integers(len(s.kinds)))]
        sel = torch.tensor([k == kind for k in s.kinds])
        target = _flip(s.masks[sel].any(0).float(), hflip, vflip)
        others = (_flip(s.masks[~sel].any(0), hflip, vflip) if (~sel).any()
                  else torch.zeros_like(target, dtype=torch.bool))
        t4 = F.avg_pool2d(target[None, None], 2, ceil_mode=True)[0, 0]
        gt4 = (t4 >= 0.5).numpy() if (t4 >= 0.5).any() else (t4 > 0).numpy()
        o4 = (F.avg_pool2d(others[None, None].float(), 2, ceil_mode=True)[0, 0] >= 0.5).numpy()
        no_click = rng.random() < cfg.no_click_frac
        clicks.append([] if no_click else initial_clicks(gt4, o4, rng))
        table = prompts[kind]
        pvec.append(table[int(rng.integers(len(table)))])
        has.append(no_click or rng.random() >= cfg.prompt_dropout)
        res.append(_flip(s.residual, hflip, vflip))
        grid.append(_flip(s.grid, hflip, vflip)[None])
        if s.features is not None:
            feats.append(_flip(s.features, hflip, vflip))
        imgs.append(_flip(s.image, hflip, vflip))
        targets.append(t4[None])
        gts.append(gt4)
    to: dict[str, Any] = {"device": device, "dtype": torch.float32}
    return Batch(
        residual=torch.stack(res).to(**to), grid=torch.stack(grid).to(**to),
        features=torch.stack(feats).to(**to) if len(feats) == len(samples) else None,
        image=torch.stack(imgs).to(**to) / 255.0, target=torch.stack(targets).to(**to),
        gt=gts, clicks=clicks, prompt=torch.stack(pvec).to(**to), has_prompt=torch.tensor(has, device=device),
    )


def batch_click_maps(batch: Batch, prev: list[np.ndarray] | None, grid_hw: tuple[int, int],
                     device: torch.device) -> torch.Tensor:
    shape = (2 * grid_hw[0], 2 * grid_hw[1])
    maps = [click_maps(c, None if prev is None else prev[i], shape, batch.gt[i].shape)
            for i, c in enumerate(batch.clicks)]
    return torch.from_numpy(np.stack(maps)).to(device)


def prompt_tensor(net: AdClickNet, batch: Batch) -> torch.Tensor:
    none = net.no_prompt.expand_as(batch.prompt)
    return torch.where(batch.has_prompt[:, None], batch.prompt, none)


def run_rounds(net: AdClickNet, batch: Batch, emb, prompt: torch.Tensor, rounds: int,
               device: torch.device) -> list[np.ndarray] | None:
    """Error-driven click rounds without gradient; returns the previous masks (None when no round ran)."""
    prev = None
    grid_hw = tuple(batch.residual.shape[-2:])
    for _ in range(rounds):
        with torch.no_grad():
            logits = net.decode(emb, batch_click_maps(batch, prev, grid_hw, device), prompt)
        pred = (logits[:, 0] > 0).cpu().numpy()
        for i, gt in enumerate(batch.gt):
            if not batch.clicks[i]:  # a no-click (detect) sample stays click-free
                continue
            c = next_click(gt, pred[i], batch.clicks[i])
            if c is not None:
                batch.clicks[i].append(c)
        prev = list(pred)
    return prev


def seg_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, dice_weight: float) -> torch.Tensor:
    """Normalised focal loss (per image) + soft Dice; logits/target (B, 1, h, w), target soft in [0, 1]."""
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = p * target + (1 - p) * (1 - target)
    w = (1 - pt).pow(gamma)
    w = w / (w.sum(dim=(1, 2, 3), keepdim=True) + 1e-6)  # NFL: weights normalised per image
    focal = (w.detach() * bce).sum(dim=(1, 2, 3))
    inter = (p * target).sum(dim=(1, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return (focal + dice_weight * dice).mean()


def train_step(net: AdClickNet, opt, batch: Batch, rounds: int, cfg: LoopConfig, device,
               sync: Callable[[], None] | None = None) -> float:
    """One optimiser step; `sync` runs between backward and the step (torchrun: average the gradients)."""
    net.train()
    prompt = prompt_tensor(net, batch)
    emb = net.encode_image(batch.residual, batch.grid, batch.features, batch.image)
    # the click rounds reuse the embedding without gradient (the encoder runs once per step)
    prev = run_rounds(net, batch, emb.detach(), prompt.detach(), rounds, device) if rounds else None
    maps = batch_click_maps(batch, prev, tuple(batch.residual.shape[-2:]), device)
    logits = net.decode(emb, maps, prompt)
    loss = seg_loss(logits, batch.target, cfg.focal_gamma, cfg.dice_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if sync is not None:
        sync()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def lr_at(step: int, cfg: LoopConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up, then cosine decay over the run's progress: the larger of the step fraction and, with a
    time budget, the elapsed fraction of `max_minutes` (so a time-capped run still anneals)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.max_minutes > 0:
        t = max(t, elapsed_s / (cfg.max_minutes * 60))
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def input_scales(samples: Sequence[Sample]) -> tuple[float, float]:
    """RMS of residual values and median grid value over the samples (the network's input scales)."""
    res = torch.cat([s.residual.float().flatten()[::7] for s in samples])
    grid = torch.cat([s.grid.float().flatten() for s in samples])
    return max(float(res.pow(2).mean().sqrt()), 1e-6), max(float(grid.median()), float(grid.mean()), 1e-6)


def train(net: AdClickNet, samples: Sequence[Sample], prompts: dict[str, torch.Tensor], cfg: LoopConfig,
          seed: int, device: torch.device, ckpt_path: Path | None = None, resume: bool = False,
          meta: dict | None = None,
          dist: distributed.DistContext | None = None, init_scales: bool = True) -> list[float]:
    """Train `net` in place; returns the per-step losses. Resumes from `ckpt_path` when asked and present.
    Under torchrun (`dist` from model/distributed.init, or joined here when `dist` is None): each rank
    samples batches from its own shard, gradients are averaged every step, rank 0 alone saves checkpoints.
    `init_scales=False` keeps the net's input scales (fine-tuning from trained weights)."""
    owns_group = dist is None and distributed.launched_by_torchrun()  # then leave the group again at the end
    ctx = dist or (distributed.init(device) if owns_group else distributed.DistContext(device=device))
    device = ctx.device
    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if resume and ckpt_path is not None and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["meta"]["optimizer"])
        start = int(state["meta"]["step"])
        logger.info("resumed from %s at step %d", ckpt_path, start)
    elif not resume and init_scales:
        rs, gs = input_scales(samples)
        net.res_scale.fill_(rs)
        net.grid_scale.fill_(gs)
    # --- torchrun (model/training/distributed.py): same start weights everywhere, per-rank data, averaged grads ---
    distributed.broadcast_module(net, ctx)
    pool = np.asarray(distributed.shard(range(len(samples)), ctx)) if ctx.distributed else len(samples)
    sync = (lambda: distributed.average_gradients(net, ctx)) if ctx.distributed else None
    rng = np.random.default_rng(seed + start + 1_000_003 * ctx.rank)
    torch.manual_seed(seed + start)
    losses: list[float] = []
    t0 = time.time()
    for step in range(start, cfg.steps):
        # the time-aware lr must read one clock on every rank (else the ranks' weights drift apart)
        elapsed = distributed.all_reduce_max(time.time() - t0, ctx) if cfg.max_minutes > 0 else 0.0
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, elapsed)
        idx = rng.choice(pool, size=min(cfg.batch, len(samples) // ctx.world_size), replace=False)
        batch = make_batch([samples[i] for i in idx], prompts, rng, cfg, device)
        rounds = int(rng.integers(0, cfg.max_rounds + 1))
        losses.append(train_step(net, opt, batch, rounds, cfg, device, sync))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            logger.info("step %d/%d loss %.4f (mean of last %d) lr %.2e %.1fs", done, cfg.steps,
                        float(np.mean(losses[-cfg.log_every:])), min(len(losses), cfg.log_every),
                        lr_at(step, cfg, elapsed), time.time() - t0)
        over_budget = cfg.max_minutes > 0 and time.time() - t0 > cfg.max_minutes * 60
        timed_out = distributed.any_rank(over_budget, ctx)  # all ranks stop at the same step
        save_now = done % cfg.ckpt_every == 0 or done == cfg.steps or timed_out
        if ctx.is_main and ckpt_path is not None and save_now:
            m = dict(meta or {}, step=done, optimizer=opt.state_dict(), loop=asdict(cfg))
            atomic_save(make_checkpoint(ARCH, net.cfg.to_dict(), net.state_dict(), m), ckpt_path)
        if timed_out:
            logger.info("time budget of %.1f min reached at step %d", cfg.max_minutes, done)
            break
    if owns_group:
        distributed.cleanup(ctx)
    return losses


def build_net(model_cfg: dict, samples: Sequence[Sample], text_dim: int) -> AdClickNet:
    s = samples[0]
    cfg = AdClickConfig.from_dict(dict(model_cfg, res_channels=int(s.residual.shape[0]), text_dim=text_dim,
                                       feat_channels=0 if s.features is None or not model_cfg.get(
                                           "use_features", True) else int(s.features.shape[0])))
    return AdClickNet(cfg)
