"""Reference bank of defect-free images, global retrieval of the most similar references, and
position-constrained patch matching.

Matching (for each query patch, the nearest reference patch among the top-K retrieved references):
- hard window (SemiREST): only reference patches within `radius` grid cells (Chebyshev distance) of the query
  patch's own position are candidates;
- soft positional embedding (ADClick): a 2-D sin-cos embedding scaled by `pos_weight` x (RMS feature norm) is
  appended to every feature, and all patches of the retrieved references are candidates (`radius=None`), so far
  displacements are penalised rather than forbidden. Both accept both knobs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.errors import BankError

logger = logging.getLogger(__name__)


@dataclass
class ReferenceBank:
    """Projected features of reference views. `keys[i]` is the content hash of the source image of view i
    (augmented views share it). `mean`/`components` are the PCA projection applied to raw extractor features
    (None = identity); `desc` are coarse retrieval descriptors. An empty bank has N = 0."""

    features: torch.Tensor  # (N, C, h, w) float16
    desc: torch.Tensor  # (N, D, gh, gw) float32
    keys: list[str]
    source_keys: list[str]  # distinct content hashes of the source images, in insertion order
    mean: torch.Tensor | None = None  # (C_raw,)
    components: torch.Tensor | None = None  # (C_raw, C)
    feat_rms: float = 1.0  # RMS norm of projected features (scale of the positional embedding)
    key: str = ""  # cache key (content of the reference set + configs)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.features.shape[2]), int(self.features.shape[3])

    @property
    def nbytes(self) -> int:
        n = self.features.numel() * self.features.element_size() + self.desc.numel() * 4
        for t in (self.mean, self.components):
            if t is not None:
                n += t.numel() * t.element_size()
        return int(n)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw extractor features (B, C_raw, h, w) -> bank space (B, C, h, w), dtype kept."""
        if self.components is None:
            return feats
        b, c, h, w = feats.shape
        x = feats.permute(0, 2, 3, 1).reshape(-1, c).float() - self.mean
        out = (x @ self.components).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        return out.to(feats.dtype)

    def to_payload(self) -> dict:
        return {"features": self.features, "desc": self.desc, "keys": list(self.keys),
                "source_keys": list(self.source_keys), "mean": self.mean, "components": self.components,
                "feat_rms": float(self.feat_rms), "key": self.key, "meta": dict(self.meta)}

    @classmethod
    def from_payload(cls, p: dict) -> ReferenceBank:
        try:
            return cls(**p)
        except TypeError as exc:
            raise BankError(f"bank payload has unexpected layout: {exc}") from exc


def fit_pca(feats: torch.Tensor, dim: int, max_samples: int = 200_000) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA over patch features (N, C, h, w) -> (mean (C,), components (C, dim)); subsampled, deterministic."""
    c = feats.shape[1]
    x = feats.permute(0, 2, 3, 1).reshape(-1, c)
    if x.shape[0] > max_samples:
        g = torch.Generator().manual_seed(0)
        x = x[torch.randperm(x.shape[0], generator=g)[:max_samples]]
    x = x.float()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(1, x.shape[0] - 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    return mean, vecs[:, -dim:].flip(1).contiguous()


def descriptors(feats: torch.Tensor, cell: int, chunk: int = 16) -> torch.Tensor:
    """Coarse retrieval descriptors: features averaged over cell x cell blocks (float32, computed in chunks)."""
    return torch.cat([F.avg_pool2d(feats[i:i + chunk].float(), cell, stride=cell, ceil_mode=True)
                      for i in range(0, max(1, feats.shape[0]), chunk)])


def retrieve(query_desc: torch.Tensor, bank_desc: torch.Tensor, k: int, keep: float = 0.8,
             skip: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k references most similar to the query: per-cell squared distances, mean of the lowest
    `keep` fraction (robust to a defect in either image), ascending. skip: bool (N,) views never returned."""
    n = bank_desc.shape[0]
    d = (bank_desc - query_desc.unsqueeze(0)).pow(2).sum(1).flatten(1)  # (N, cells)
    m = max(1, round(keep * d.shape[1]))
    score = d.sort(dim=1).values[:, :m].mean(1)
    if skip is not None:
        score = score.masked_fill(skip, float("inf"))
        n = int((~skip).sum())
    return score.topk(min(k, n), largest=False).indices


def sincos_embedding(h: int, w: int, dim: int = 32) -> torch.Tensor:
    """(dim, h, w) 2-D sin-cos position embedding, half the channels for y, half for x; unit RMS per position."""
    q = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float32) / max(1, q)))
    ys = torch.arange(h, dtype=torch.float32)[:, None] * omega[None]  # (h, q)
    xs = torch.arange(w, dtype=torch.float32)[:, None] * omega[None]
    ey = torch.cat([ys.sin(), ys.cos()], 1).T[:, :, None].expand(-1, h, w)
    ex = torch.cat([xs.sin(), xs.cos()], 1).T[:, None, :].expand(-1, h, w)
    return torch.cat([ey, ex], 0) / math.sqrt(2 * q)


def with_position(feats: torch.Tensor, pos_weight: float, feat_rms: float) -> torch.Tensor:
    """Append pos_weight * feat_rms * sincos embedding channels to (B, C, h, w) features."""
    if pos_weight <= 0:
        return feats
    b, _, h, w = feats.shape
    pe = sincos_embedding(h, w).to(feats) * (pos_weight * feat_rms)
    return torch.cat([feats, pe.unsqueeze(0).expand(b, -1, -1, -1)], 1)


def match(query: torch.Tensor, refs: torch.Tensor, radius: int | None, exclude: int = -1,
          tile: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest reference patch for every query patch.

    query (C, h, w), refs (K, C, h, w) float32 on the same device. radius: hard window in grid cells
    (None = anywhere). exclude >= 0 forbids candidates within that Chebyshev distance (self-similarity mode,
    refs = query itself). Returns (dist2 (h, w), index (h, w) into the flattened K*h*w candidates)."""
    if radius is None or radius >= max(query.shape[1:]):
        return _match_global(query, refs, exclude)
    return _match_window(query, refs, int(radius), exclude, tile)


def _match_global(query, refs, exclude):
    c, h, w = query.shape
    q = query.reshape(c, -1).T  # (hw, C)
    q2 = q.pow(2).sum(1, keepdim=True)
    best = torch.full((h * w,), float("inf"), device=query.device)
    idx = torch.zeros(h * w, dtype=torch.long, device=query.device)
    if exclude >= 0:
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        yy, xx = yy.flatten().to(query.device), xx.flatten().to(query.device)
        near = ((yy[:, None] - yy[None]).abs() <= exclude) & ((xx[:, None] - xx[None]).abs() <= exclude)
    for k in range(refs.shape[0]):
        r = refs[k].reshape(c, -1)  # (C, hw)
        d = (q2 + r.pow(2).sum(0, keepdim=True)).addmm_(q, r, alpha=-2.0)
        if exclude >= 0:
            d.masked_fill_(near, float("inf"))
        v, i = d.min(1)
        better = v < best
        best = torch.where(better, v, best)
        idx = torch.where(better, i + k * h * w, idx)
    return best.clamp_min(0).reshape(h, w), idx.reshape(h, w)


def _window_offsets(tile: int, radius: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For a tile of queries and its (tile+2r)^2 candidate region: (dy, dx) offsets (t*t, R*R)."""
    side = tile + 2 * radius
    qy, qx = torch.meshgrid(torch.arange(tile), torch.arange(tile), indexing="ij")
    cy, cx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    dy = cy.flatten()[None] - radius - qy.flatten()[:, None]
    dx = cx.flatten()[None] - radius - qx.flatten()[:, None]
    return dy.to(device), dx.to(device)


def _match_window(query, refs, radius, exclude, tile):
    c, h, w = query.shape
    k = refs.shape[0]
    th, tw = math.ceil(h / tile), math.ceil(w / tile)
    ph, pw = th * tile - h, tw * tile - w
    side = tile + 2 * radius
    t = th * tw
    q = F.pad(query, (0, pw, 0, ph)).permute(1, 2, 0)  # (TH, TW, C)
    q = q.reshape(th, tile, tw, tile, c).permute(0, 2, 1, 3, 4).reshape(t, tile * tile, c)
    valid = F.pad(torch.ones(1, 1, h, w, device=query.device), (radius, radius + pw, radius, radius + ph))
    valid = F.unfold(valid, side, stride=tile).reshape(side * side, -1).T > 0.5  # (T, R*R)
    # channels-last padded references; every tile's candidate region is a strided view, copied once
    r = F.pad(refs, (radius, radius + pw, radius, radius + ph)).permute(0, 2, 3, 1).contiguous()  # (K, H', W', C)
    r2 = r.pow(2).sum(-1)  # (K, H', W')
    sk, sh, sw, sc = r.stride()
    cand = r.as_strided((th, tw, k, side, side, c), (tile * sh, tile * sw, sk, sh, sw, sc))
    cand = cand.reshape(t, k * side * side, c)  # (T, K*R*R, C)
    zk, zh, zw = r2.stride()
    cand2 = r2.as_strided((th, tw, k, side, side), (tile * zh, tile * zw, zk, zh, zw)).reshape(t, 1, -1)
    d = torch.baddbmm(cand2, q, cand.transpose(1, 2), alpha=-2.0)
    d += q.pow(2).sum(2, keepdim=True)  # (T, t*t, K*R*R)
    dy, dx = _window_offsets(tile, radius, query.device)
    bad = (dy.abs() > radius) | (dx.abs() > radius)
    if exclude >= 0:
        bad |= (dy.abs() <= exclude) & (dx.abs() <= exclude)
    d = d.view(-1, tile * tile, k, side * side)
    d.masked_fill_(bad[None, :, None, :], float("inf"))
    d.masked_fill_(~valid[:, None, None, :], float("inf"))
    best, flat = d.view(-1, tile * tile, k * side * side).min(2)  # (T, t*t)
    kk, cell = flat // (side * side), flat % (side * side)
    # candidate cell -> absolute grid position
    ti = torch.arange(th * tw, device=query.device)
    ty, tx = (ti // tw)[:, None] * tile, (ti % tw)[:, None] * tile
    gy = ty + cell // side - radius
    gx = tx + cell % side - radius
    index = kk * h * w + gy.clamp(0, h - 1) * w + gx.clamp(0, w - 1)
    return _untile(best.clamp_min(0), th, tw, tile, h, w), _untile(index, th, tw, tile, h, w)


def _untile(x: torch.Tensor, th: int, tw: int, tile: int, h: int, w: int) -> torch.Tensor:
    """(T, t*t) per-tile values -> (h, w)."""
    x = x.reshape(th, tw, tile, tile).permute(0, 2, 1, 3).reshape(th * tile, tw * tile)
    return x[:h, :w]
