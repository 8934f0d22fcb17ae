"""ADClick-Seg: a SemiREST-style sliding-window transformer that classifies residual blocks.

Input: tokens `(B, C + F, h, w)`: the signed residual from the residual engine (C channels; each token is one
block of the image), followed, when `feat_channels` F > 0, by the query image's own features (what the block looks
like, not only how it differs from its matched reference), and `(L, P)` defect-type prompt vectors (row 0 = "any
defect", then one row per defect label).
Output: `(B, L, h, w)` block logits, one map per prompt.

Pipeline: per-channel normalisation (statistics kept as buffers) -> token embedding of the residual, its
square, the unsupervised score (the residual norm), and the normalised features and their squares -> depth-wise conv position encoding -> transformer
blocks applied in overlapping windows of `window x window` tokens (stride `stride`), overlaps averaged ->
prompt-conditioned head: FiLM of the token features by each prompt, then a per-prompt dot product with a
projection of that prompt, plus a learned affine of the unsupervised score (so an untrained model ranks
blocks like the unsupervised map and training only has to learn the correction).

A trained version is an ensemble of `members` such models fitted with different seeds (SegEnsemble, mean
logit): a 20-image fit varies by several pixel-AP points from seed to seed and the mean removes most of it.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.modeling.adclick import WindowBlock

logger = logging.getLogger(__name__)

ARCH = "adclick-seg"


@dataclass(frozen=True)
class SegConfig:
    in_channels: int  # C of the residual tokens
    prompt_dim: int = 384  # text-encoder dimension
    dim: int = 96
    depth: int = 2
    heads: int = 4
    window: int = 8  # tokens per window side
    stride: int = 4  # window stride in tokens at inference (overlapping windows, averaged)
    train_stride: int = 8  # window stride while training (non-overlapping: 4x cheaper; crops shift them)
    mlp_ratio: float = 2.0
    in_drop: float = 0.0  # training-time dropout of whole residual channels (regularises few-label fits)
    members: int = 4  # separately trained copies (fit seed + i), logits averaged (SegEnsemble); 1 = one model
    feat_channels: int = 0  # F: query-feature channels after the C residual channels of the input (0 = none)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pad_to_windows(x: torch.Tensor, win: int, stride: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad (B, D, h, w) on the bottom/right so the windows tile it exactly."""
    _, _, h, w = x.shape

    def need(n: int) -> int:
        if n <= win:
            return win - n
        return (-(n - win)) % stride

    ph, pw = need(h), need(w)
    return F.pad(x, (0, pw, 0, ph)), ph, pw


class AdClickSeg(nn.Module):
    def __init__(self, cfg: SegConfig):
        super().__init__()
        self.cfg = cfg
        c, d = cfg.in_channels, cfg.dim
        self.register_buffer("res_mean", torch.zeros(c))
        self.register_buffer("res_std", torch.ones(c))
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))
        f = cfg.feat_channels
        if f > 0:  # registered only when used: checkpoints of residual-only models keep loading strictly
            self.register_buffer("feat_mean", torch.zeros(f))
            self.register_buffer("feat_std", torch.ones(f))
        self.in_drop = nn.Dropout1d(cfg.in_drop)
        self.embed = nn.Sequential(nn.Linear(2 * (c + f) + 1, d), nn.GELU(), nn.Linear(d, d))
        self.pos = nn.Conv2d(d, d, 3, padding=1, groups=d)
        # the interactive ADClick's window block (same names and shapes: its weights initialise these)
        self.blocks = nn.ModuleList(
            WindowBlock(d, cfg.heads, cfg.window, cfg.mlp_ratio, shift=False) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.prompt_film = nn.Linear(cfg.prompt_dim, 2 * d)
        self.prompt_query = nn.Sequential(nn.Linear(cfg.prompt_dim, d), nn.GELU(), nn.Linear(d, d))
        self.score_gain = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.tensor(-2.0))
        nn.init.zeros_(self.prompt_film.weight)
        nn.init.zeros_(self.prompt_film.bias)

    # ---- statistics -----------------------------------------------------------------------------
    @torch.no_grad()
    def fit_normalisation(self, tokens: list[torch.Tensor]) -> None:
        """Set the per-channel residual (and feature) statistics and the score statistics from (C + F, h, w)
        token tensors."""
        c = self.cfg.in_channels
        flat = torch.cat([t.flatten(1) for t in tokens], dim=1).float()  # (C + F, N)
        self.res_mean.copy_(flat[:c].mean(1))
        self.res_std.copy_(flat[:c].std(1).clamp_min(1e-6))
        if self.cfg.feat_channels > 0:
            self.feat_mean.copy_(flat[c:].mean(1))
            self.feat_std.copy_(flat[c:].std(1).clamp_min(1e-6))
        score = torch.cat([self._raw_score(t[None, :c]).flatten() for t in tokens])
        self.score_mean.copy_(score.mean())
        self.score_std.copy_(score.std().clamp_min(1e-6))

    @staticmethod
    def _raw_score(residual: torch.Tensor) -> torch.Tensor:
        """Unsupervised block score: log of the residual norm, (B, h, w)."""
        return torch.log1p(residual.float().pow(2).sum(1).sqrt())

    def unsupervised_score(self, tokens: torch.Tensor) -> torch.Tensor:
        return (self._raw_score(tokens[:, : self.cfg.in_channels]) - self.score_mean) / self.score_std

    # ---- forward --------------------------------------------------------------------------------
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, C + F, h, w) tokens -> (B, D, h, w) contextual token features."""
        c, f = self.cfg.in_channels, self.cfg.feat_channels
        if tokens.shape[1] != c + f:
            raise ValueError(f"ADClick-Seg expects {c} residual + {f} feature channels, got {tokens.shape[1]}")
        b, _, h, w = tokens.shape
        r = (tokens[:, :c].float() - self.res_mean.view(1, c, 1, 1)) / self.res_std.view(1, c, 1, 1)
        r = self.in_drop(r.flatten(2)).view(b, c, h, w)
        s = self.unsupervised_score(tokens)[:, None]
        parts = [r, r.pow(2) - 1.0, s]
        if f > 0:  # normalised features and their squares, like the residual
            g = (tokens[:, c:].float() - self.feat_mean.view(1, f, 1, 1)) / self.feat_std.view(1, f, 1, 1)
            parts += [g, g.pow(2) - 1.0]
        x = torch.cat(parts, dim=1).permute(0, 2, 3, 1)  # (B, h, w, 2 (C + F) + 1)
        x = self.embed(x).permute(0, 3, 1, 2)  # (B, D, h, w)
        x = x + self.pos(x)
        return self._windows(x)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w = x.shape
        win = self.cfg.window
        stride = self.cfg.train_stride if self.training else self.cfg.stride
        xp, _, _ = _pad_to_windows(x, win, stride)
        hp, wp = xp.shape[-2:]
        cols = F.unfold(xp, win, stride=stride)  # (B, D*win*win, nW)
        nw = cols.shape[-1]
        tokens = cols.view(b, d, win, win, nw).permute(0, 4, 2, 3, 1).reshape(b * nw, win, win, d)
        for blk in self.blocks:
            tokens = blk(tokens)  # attention inside each (win x win) window
        cols = tokens.view(b, nw, win, win, d).permute(0, 4, 2, 3, 1).reshape(b, d * win * win, nw)
        ones = torch.ones(1, 1, hp, wp, device=x.device, dtype=x.dtype)
        count = F.fold(F.unfold(ones, win, stride=stride), (hp, wp), win, stride=stride)
        out = F.fold(cols, (hp, wp), win, stride=stride) / count
        return self.norm(out[:, :, :h, :w].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def head(self, feats: torch.Tensor, prompts: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """feats (B, D, h, w), prompts (L, P), score (B, h, w) -> logits (B, L, h, w)."""
        gamma, beta = self.prompt_film(prompts).chunk(2, dim=-1)  # (L, D) each
        q = self.prompt_query(prompts)  # (L, D)
        f = feats[:, None] * (1 + gamma[None, :, :, None, None]) + beta[None, :, :, None, None]  # (B,L,D,h,w)
        logits = (f * q[None, :, :, None, None]).sum(2) / math.sqrt(self.cfg.dim)
        return logits + self.score_gain * score[:, None] + self.bias

    def forward(self, tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(tokens), prompts, self.unsupervised_score(tokens))


class SegEnsemble(nn.Module):
    """`cfg.members` AdClickSeg models trained separately (different seeds); forward = their mean logit.
    Few-label fits vary a lot from seed to seed; averaging a few short fits removes most of that variance."""

    def __init__(self, cfg: SegConfig):
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(AdClickSeg(cfg) for _ in range(max(1, cfg.members)))

    def forward(self, residual: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(residual, prompts) for m in self.members]).mean(0)


def build_seg(cfg: SegConfig) -> AdClickSeg | SegEnsemble:
    """One AdClickSeg (members == 1: the checkpoint layout of a single model) or a SegEnsemble."""
    return AdClickSeg(cfg) if cfg.members <= 1 else SegEnsemble(cfg)


def load_matching(model: nn.Module, state: Mapping[str, torch.Tensor], prefixes: Mapping[str, str]) -> int:
    """Copy tensors of `state` into `model` where the name (after mapping `prefixes` source -> target)
    and the shape match. Returns how many tensors were copied; the rest keep their initialisation."""
    own = model.state_dict()
    copied = 0
    with torch.no_grad():
        for key, value in state.items():
            for src, dst in prefixes.items():
                if key.startswith(src):
                    target = dst + key[len(src):]
                    if target in own and own[target].shape == value.shape:
                        own[target].copy_(value)
                        copied += 1
                    break
    logger.info("initialised %d tensors of %s from a pretrained state", copied, type(model).__name__)
    return copied
