"""ADClick network: residual tokens + clicks + defect-type prompt -> defect probability map.

Split in two so that a click costs only the light part (SAM-style):
- `encode_image(residual, grid, features, image) -> ImageEmbedding` (once per image, cached by the predictor):
  residual tokens (C_r, h, w) and the anomaly grid (1, h, w) embedded by 1x1 convs; the optional image-feature
  branch (C_f, h, w) joins through a zero-initialised 1x1 conv (ControlNet-style: a no-op at init); a small
  conv
  stem over the half-size RGB image gives stride-4 detail features for the head.
- `decode(emb, clicks, prompt) -> logits` (every click): click maps (positive disks, negative disks, previous
  mask; (3, 2h, 2w)) embedded by a strided conv and ADDED to the tokens, together with click-similarity maps:
  the cosine similarity of every token's key vector (the L2-normalised residual, and the L2-normalised image
  features when present) to the keys under the positive clicks (max over clicks) and under the negative
  clicks, so the network sees at once which tokens look like what the annotator pointed at (a prototype cue
  that does not depend on the product); tokens pooled to stride 2*s and run
  through windowed (alternately shifted) transformer blocks, each FiLM-modulated by the prompt vector (the
  prompt scales and shifts every block's input, so it measurably changes the output; the official fusion
  is a no-op); a SegFormer-style all-MLP head fuses the stride-s tokens, the block outputs and the stride-4
  stem features into one logit map at stride 4, bilinearly upsampled to image size by the caller.
Shapes: B batch, d model width, (h, w) residual grid (stride s pixels), (H, W) image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

ARCH = "adclick-v2"


@dataclass(frozen=True)
class AdClickConfig:
    res_channels: int = 64  # C_r of the residual engine
    feat_channels: int = 0  # C_f of the image-feature branch (0 = no branch)
    text_dim: int = 384  # prompt vector size (MiniLM 384, open_clip 512)
    dim: int = 64  # token width at stride s
    block_dim: int = 96  # token width inside the transformer (stride 2s)
    depth: int = 4
    heads: int = 4
    window: int = 8
    mlp_ratio: float = 2.0
    head_dim: int = 48  # SegFormer head width
    stem_channels: int = 16  # stride-4 RGB stem (0 = none)
    use_prompt: bool = True
    use_residual: bool = True  # False = ablation "image features only"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdClickConfig:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ImageEmbedding:
    tokens: torch.Tensor  # (B, d, h, w) click-free token map
    stem: torch.Tensor | None  # (B, stem_channels, H/4, W/4) or None
    keys: tuple[torch.Tensor, ...] = ()  # each (B, C_k, h, w), L2-normalised over C_k (click similarity)

    def detach(self) -> ImageEmbedding:
        return ImageEmbedding(self.tokens.detach(), None if self.stem is None else self.stem.detach(),
                              tuple(k.detach() for k in self.keys))

    @property
    def nbytes(self) -> int:
        parts = [self.tokens, *self.keys] + ([self.stem] if self.stem is not None else [])
        return int(sum(t.numel() * t.element_size() for t in parts))


class WindowBlock(nn.Module):
    """Pre-norm transformer block with attention inside non-overlapping windows (optionally shifted)."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float, shift: bool) -> None:
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, W, C), H, W multiples of window
        b, h, w, c = x.shape
        ws = self.window
        win = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        qkv = self.qkv(win).view(win.shape[0], ws * ws, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (nW, heads, ws*ws, c/heads)
        out = self.proj(out.transpose(1, 2).reshape(-1, ws * ws, c))
        return out.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        _, h, w, _ = x.shape
        ws = self.window
        ph, pw = (-h) % ws, (-w) % ws
        y = F.pad(self.norm1(x), (0, 0, 0, pw, 0, ph))
        if self.shift:
            y = torch.roll(y, (-(ws // 2), -(ws // 2)), dims=(1, 2))
        y = self._attend(y)
        if self.shift:
            y = torch.roll(y, (ws // 2, ws // 2), dims=(1, 2))
        x = x + y[:, :h, :w]
        return x + self.mlp(self.norm2(x))


class AdClickNet(nn.Module):
    def __init__(self, cfg: AdClickConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, bd = cfg.dim, cfg.block_dim
        # learned input scales (set from training statistics, kept in the state_dict)
        self.register_buffer("res_scale", torch.ones(()))
        self.register_buffer("grid_scale", torch.ones(()))
        self.res_embed = nn.Conv2d(cfg.res_channels + 2, d, 1)
        if cfg.feat_channels > 0:
            self.feat_embed = nn.Sequential(nn.Conv2d(cfg.feat_channels, d, 1), nn.GELU())
            self.feat_zero = nn.Conv2d(d, d, 1)
            nn.init.zeros_(self.feat_zero.weight)
            nn.init.zeros_(self.feat_zero.bias)
        self.click_embed = nn.Sequential(
            nn.Conv2d(3, d, 4, stride=2, padding=1), nn.GELU(), nn.Conv2d(d, d, 3, padding=1)
        )
        self.n_keys = 1 + int(cfg.feat_channels > 0)
        self.sim_embed = nn.Sequential(nn.Conv2d(2 * self.n_keys, d, 3, padding=1), nn.GELU(), nn.Conv2d(d, d, 1))
        self.down = nn.Conv2d(d, bd, 2, stride=2)
        self.pos = nn.Conv2d(bd, bd, 3, padding=1, groups=bd)  # conditional positional encoding
        self.blocks = nn.ModuleList(
            WindowBlock(bd, cfg.heads, cfg.window, cfg.mlp_ratio, shift=i % 2 == 1) for i in range(cfg.depth)
        )
        self.film = nn.Linear(cfg.text_dim, 2 * bd * cfg.depth)
        nn.init.normal_(self.film.weight, std=0.02)
        nn.init.zeros_(self.film.bias)
        self.no_prompt = nn.Parameter(torch.zeros(cfg.text_dim))
        if cfg.stem_channels > 0:
            sc = cfg.stem_channels
            self.stem = nn.Sequential(  # half-size image -> stride 4 (strided first: it is the costly layer)
                nn.Conv2d(3, sc, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(sc, sc, 3, padding=1),
            )
        hd = cfg.head_dim
        self.head_tokens = nn.Conv2d(d, hd, 1)
        self.head_blocks = nn.Conv2d(bd * 2, hd, 1)  # middle and last block outputs, concatenated
        self.head_fuse = nn.Sequential(nn.Conv2d(2 * hd, hd, 1), nn.GELU())
        self.head_fine = nn.Sequential(
            nn.Conv2d(hd + max(cfg.stem_channels, 0), hd, 1), nn.GELU(), nn.Conv2d(hd, 1, 1)
        )

    # ---- per image -------------------------------------------------------------------------------------
    def encode_image(
        self,
        residual: torch.Tensor,  # (B, C_r, h, w) signed residual tokens
        grid: torch.Tensor,  # (B, 1, h, w) anomaly grid map
        features: torch.Tensor | None = None,  # (B, C_f, h, w)
        image: torch.Tensor | None = None,  # (B, 3, H/2, W/2) float in [0, 1], the half-size image
    ) -> ImageEmbedding:
        r = residual / self.res_scale
        if not self.cfg.use_residual:
            r = torch.zeros_like(r)
            grid = torch.zeros_like(grid)
        norm = torch.log1p(r.pow(2).mean(1, keepdim=True).sqrt())
        r = torch.sign(r) * torch.log1p(r.abs())  # compress outliers; the engine's scale varies by product
        g = torch.log1p(grid.clamp(min=0) / self.grid_scale)
        tokens = self.res_embed(torch.cat([r, norm, g], 1))
        keys = [F.normalize(r, dim=1)]
        if self.cfg.feat_channels > 0:
            if features is not None:
                tokens = tokens + self.feat_zero(self.feat_embed(features))
                keys.append(F.normalize(features.float(), dim=1))
            else:
                keys.append(torch.zeros_like(keys[0][:, :1]))
        stem = None
        if self.cfg.stem_channels > 0 and image is not None:
            stem = self.stem((image - 0.45) / 0.25)
        return ImageEmbedding(tokens=tokens, stem=stem, keys=tuple(keys))

    @staticmethod
    def click_similarity(keys: tuple[torch.Tensor, ...], clicks: torch.Tensor) -> torch.Tensor:
        """(B, 2 * len(keys), h, w): per key space, the max cosine similarity of each token to the tokens under
        the positive click disks, then under the negative ones (0 where there is no click of that sign)."""
        b, _, h, w = keys[0].shape
        under = F.adaptive_max_pool2d(clicks[:, :2], (h, w)) > 0  # (B, 2, h, w) tokens under a click disk
        out = keys[0].new_zeros(b, 2 * len(keys), h, w)
        for i in range(b):
            for sign in range(2):
                idx = under[i, sign].flatten().nonzero()[:, 0]
                if idx.numel() == 0:
                    continue
                for k, key in enumerate(keys):
                    flat = key[i].flatten(1)  # (C, h*w)
                    sim = flat[:, idx].t() @ flat  # (n, h*w)
                    out[i, 2 * k + sign] = sim.amax(0).view(h, w)
        return out

    # ---- per click -------------------------------------------------------------------------------------
    def decode(
        self,
        emb: ImageEmbedding,
        clicks: torch.Tensor,  # (B, 3, 2h, 2w): positive disks, negative disks, previous mask
        prompt: torch.Tensor | None = None,  # (B, text_dim) or None = no prompt
        out_size: tuple[int, int] | None = None,  # stride-4 map size; default that of the stem
    ) -> torch.Tensor:  # (B, 1, H/4, W/4) logits
        x = emb.tokens + self.click_embed(clicks)
        if emb.keys:
            x = x + self.sim_embed(self.click_similarity(emb.keys, clicks))
        b = x.shape[0]
        if prompt is None or not self.cfg.use_prompt:
            prompt = self.no_prompt.expand(b, -1)
        film = self.film(prompt).view(b, len(self.blocks), 2, -1)
        y = self.down(x)
        y = (y + self.pos(y)).permute(0, 2, 3, 1)  # (B, h/2, w/2, bd)
        outs = []
        for i, blk in enumerate(self.blocks):
            gamma, beta = film[:, i, 0, None, None, :], film[:, i, 1, None, None, :]
            y = blk(y * (1 + gamma) + beta)
            if i in (len(self.blocks) // 2 - 1, len(self.blocks) - 1):
                outs.append(y)
        deep = torch.cat(outs, -1).permute(0, 3, 1, 2)
        deep = F.interpolate(self.head_blocks(deep), size=x.shape[-2:], mode="bilinear", align_corners=False)
        fused = self.head_fuse(torch.cat([self.head_tokens(x), deep], 1))
        default = out_size or (x.shape[-2] * 2, x.shape[-1] * 2)
        size = emb.stem.shape[-2:] if emb.stem is not None else default
        fused = F.interpolate(fused, size=size, mode="bilinear", align_corners=False)
        if emb.stem is not None:
            fused = torch.cat([fused, emb.stem], 1)
        elif self.cfg.stem_channels > 0:
            fused = torch.cat([fused, fused.new_zeros(b, self.cfg.stem_channels, *size)], 1)
        return self.head_fine(fused)

    def forward(self, residual, grid, clicks, prompt=None, features=None, image=None) -> torch.Tensor:
        return self.decode(self.encode_image(residual, grid, features, image), clicks, prompt)

