"""Synthetic anomalies over defect-free images: the training data of the learned ADClick network.

Each generator draws one local defect of a named kind and returns the new image and its pixel mask:
- contamination: a Perlin-noise shaped region filled with a foreign texture (another image or a texture);
- discoloration: a Perlin region whose colour and brightness change;
- cut: a structural cut, a dark polyline with the surface displaced on either side;
- scratch: a thin bright or dark curve;
- hole: a small dark blob with a shaded rim;
- deformation: a local warp of the surface inside a Perlin region;
- faint: a large low-contrast area (about 5-40 % of the image) whose brightness shifts by 4-16 grey levels,
  unevenly, with soft edges (the residual is weak there);
- crack: a long thin crack (1-3 px wide, 50-350 px long) that shifts the brightness along a smooth random walk.
Sizes of the first six follow small industrial defects (roughly 0.01 % to 3 % of the image). `synthesize`
also places defects at the image border (cut off by it) and draws several separate defects of one kind
(one label, several regions). These last kinds and placements are written independently of the stress
benchmark's generators (model/evaluation/stress.py), so that the benchmark measures generalisation. Images are (H, W, 3) uint8 RGB;
masks (H, W) bool. Everything is driven by the given numpy Generator (reproducible).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

logger = logging.getLogger(__name__)

# defect kind -> words used as its language prompt during training
KIND_WORDS: dict[str, tuple[str, ...]] = {
    "contamination": ("contamination", "foreign material", "stain"),
    "discoloration": ("discoloration", "color change", "stain"),
    "cut": ("cut", "crack", "slit"),
    "scratch": ("scratch", "thin scratch", "scrape"),
    "hole": ("hole", "puncture", "pit"),
    "deformation": ("deformation", "dent", "bulge"),
    "faint": ("stain", "faint discoloration", "uneven area"),
    "crack": ("crack", "thin crack", "hairline crack"),
}
KINDS = tuple(KIND_WORDS)
Textures = Sequence[np.ndarray]


@dataclass
class SynthSample:
    image: np.ndarray  # (H, W, 3) uint8
    masks: list[np.ndarray] = field(default_factory=list)  # one (H, W) bool per defect instance
    kinds: list[str] = field(default_factory=list)  # kind of each instance


def perlin(shape: tuple[int, int], res: int, rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise in about [-1, 1], `res` lattice cells across the larger side."""
    h, w = shape
    gy, gx = max(1, round(res * h / max(h, w))), max(1, round(res * w / max(h, w)))
    angles = rng.uniform(0, 2 * np.pi, (gy + 1, gx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], -1)
    ys, xs = np.linspace(0, gy, h, endpoint=False), np.linspace(0, gx, w, endpoint=False)
    yi, xi = ys.astype(int), xs.astype(int)
    fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]

    def dot(oy: int, ox: int) -> np.ndarray:
        g = grad[yi[:, None] + oy, xi[None, :] + ox]
        return g[..., 0] * (fx - ox) + g[..., 1] * (fy - oy)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(fx), fade(fy)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return (top * (1 - v) + bottom * v) * np.sqrt(2)


def blob(size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) bool Perlin-shaped blob inside an elliptic falloff (never empty)."""
    noise = perlin((size, size), int(rng.integers(2, 5)), rng)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1) * 2 - 1
    ax, ay = rng.uniform(0.5, 1.0, 2)
    falloff = 1 - np.sqrt((xx / ax) ** 2 + (yy / ay) ** 2)
    field_ = noise * 0.6 + falloff
    mask = field_ > rng.uniform(0.15, 0.35)
    if not mask.any():
        mask[size // 2, size // 2] = True
    return mask


def _place(mask_small: np.ndarray, shape: tuple[int, int], rng: np.random.Generator,
           where: np.ndarray | None = None) -> np.ndarray:
    """Paste a small mask into an empty (H, W) mask, centred on a random pixel of `where` (or anywhere)."""
    h, w = shape
    s0, s1 = mask_small.shape
    if where is not None and where.any():
        ys, xs = np.nonzero(where)
        i = int(rng.integers(len(ys)))
        y, x = int(ys[i]) - s0 // 2, int(xs[i]) - s1 // 2
    else:
        y, x = int(rng.integers(0, max(h - s0, 1))), int(rng.integers(0, max(w - s1, 1)))
    big = np.zeros((h + 2 * s0, w + 2 * s1), bool)
    big[y + s0:y + 2 * s0, x + s1:x + 2 * s1] = mask_small
    return big[s0:s0 + h, s1:s1 + w]


def foreground(img: np.ndarray) -> np.ndarray:
    """Rough object mask (Otsu on the blurred grey image); all-True when it would be tiny."""
    gray = cv2.GaussianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), (0, 0), 5)
    _, fg = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = fg > 0
    return fg if fg.mean() > 0.05 else np.ones_like(fg)


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    a = mask.astype(np.float32)
    return cv2.GaussianBlur(a, (0, 0), sigma) if sigma > 0 else a


def _blend(img: np.ndarray, other: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = img.astype(np.float32) * (1 - alpha[..., None]) + other.astype(np.float32) * alpha[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def _region_size(shape: tuple[int, int], rng: np.random.Generator) -> int:
    side = min(shape)
    return int(np.clip(side * np.exp(rng.uniform(np.log(0.03), np.log(0.25))), 6, side))


def contamination(img: np.ndarray, rng: np.random.Generator, textures: Textures, where=None) -> tuple:
    region = _place(blob(_region_size(img.shape[:2], rng), rng), img.shape[:2], rng, where)
    src = textures[int(rng.integers(len(textures)))] if textures else img
    th, tw = src.shape[:2]
    scale = max(img.shape[0] / th, img.shape[1] / tw, 1.0)
    if scale > 1.0:
        src = cv2.resize(src, (int(tw * scale) + 1, int(th * scale) + 1))
    y0 = int(rng.integers(0, src.shape[0] - img.shape[0] + 1))
    x0 = int(rng.integers(0, src.shape[1] - img.shape[1] + 1))
    patch = src[y0:y0 + img.shape[0], x0:x0 + img.shape[1]].astype(np.float32)
    patch = patch * rng.uniform(0.5, 1.5, 3) + rng.uniform(-40, 40)
    alpha = _soft(region, 1.0) * rng.uniform(0.6, 1.0)
    return _blend(img, np.clip(patch, 0, 255), alpha), region


def discoloration(img: np.ndarray, rng: np.random.Generator, textures: Textures, where=None) -> tuple:
    region = _place(blob(_region_size(img.shape[:2], rng), rng), img.shape[:2], rng, where)
    gain = rng.uniform(0.3, 0.7) if rng.random() < 0.5 else rng.uniform(1.5, 2.5)
    shifted = img.astype(np.float32) * gain * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 40, 3)
    return _blend(img, np.clip(shifted, 0, 255), _soft(region, 1.5)), region


def _point(shape: tuple[int, int], rng: np.random.Generator, where: np.ndarray | None) -> np.ndarray:
    if where is not None and where.any():
        ys, xs = np.nonzero(where)
        i = int(rng.integers(len(ys)))
        return np.array([float(xs[i]), float(ys[i])])
    return np.array([rng.uniform(0, shape[1]), rng.uniform(0, shape[0])])


def _curve(shape: tuple[int, int], rng: np.random.Generator, length: float, where=None) -> np.ndarray:
    p = _point(shape, rng, where)
    ang = rng.uniform(0, 2 * np.pi)
    pts = [p.copy()]
    n = max(3, int(length / 8))
    for _ in range(n):
        ang += rng.normal(0, 0.25)
        p = p + length / n * np.array([np.cos(ang), np.sin(ang)])
        pts.append(p.copy())
    return np.round(np.array(pts)).astype(np.int32)


def scratch(img: np.ndarray, rng: np.random.Generator, textures: Sequence[np.ndarray], where=None) -> tuple:
    pts = _curve(img.shape[:2], rng, rng.uniform(0.05, 0.3) * min(img.shape[:2]), where)
    width = int(rng.integers(1, 4))
    region = np.zeros(img.shape[:2], np.uint8)
    cv2.polylines(region, [pts], False, 1, width)
    level = rng.uniform(170, 255) if rng.random() < 0.6 else rng.uniform(0, 40)
    other = np.full_like(img, int(level))
    return _blend(img, other, _soft(region > 0, 0.6) * rng.uniform(0.6, 0.95)), region > 0


def cut(img: np.ndarray, rng: np.random.Generator, textures: Sequence[np.ndarray], where=None) -> tuple:
    pts = _curve(img.shape[:2], rng, rng.uniform(0.03, 0.15) * min(img.shape[:2]), where)
    width = int(rng.integers(3, 9))
    region = np.zeros(img.shape[:2], np.uint8)
    cv2.polylines(region, [pts], False, 1, width)
    mask = region > 0
    # displace the surface around the cut, then darken its inside (the opening)
    near = cv2.dilate(region, np.ones((width * 2 + 1, width * 2 + 1), np.uint8)) > 0
    h, w = mask.shape
    shift = rng.uniform(1, 4, 2) * rng.choice([-1, 1], 2)
    m = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
    moved = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    out = _blend(img, moved, _soft(near, 1.0))
    dark = (img.astype(np.float32) * rng.uniform(0.05, 0.35)).astype(np.uint8)
    out = _blend(out, dark, _soft(mask, 0.7))
    return out, mask


def hole(img: np.ndarray, rng: np.random.Generator, textures: Sequence[np.ndarray], where=None) -> tuple:
    h, w = img.shape[:2]
    r = rng.uniform(0.008, 0.04) * min(h, w) + 2
    c = _point((h, w), rng, where)
    center = (int(c[0]), int(c[1]))
    axes = (int(r), int(r * rng.uniform(0.5, 1.0)))
    region = np.zeros((h, w), np.uint8)
    cv2.ellipse(region, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    region = region > 0
    rim = cv2.dilate(region.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    bright = np.clip(img.astype(np.float32) * 1.4 + 20, 0, 255)
    out = _blend(img, bright, _soft(rim & ~region, 1.0) * 0.5)
    dark = np.full_like(img, int(rng.uniform(0, 30)))
    return _blend(out, dark, _soft(region, 0.8)), region


def deformation(img: np.ndarray, rng: np.random.Generator, textures: Textures, where=None) -> tuple:
    h, w = img.shape[:2]
    size = _region_size((h, w), rng)
    region = _place(blob(size, rng), (h, w), rng, where)
    amp = rng.uniform(3, 8)
    weight = np.maximum(_soft(region, max(1.0, size / 12)), region * 0.6)
    dx = perlin((h, w), 6, rng) * amp * weight
    dy = perlin((h, w), 6, rng) * amp * weight
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    warped = cv2.remap(img, gx + dx.astype(np.float32), gy + dy.astype(np.float32), cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REFLECT)
    shade = np.clip(warped.astype(np.float32) * (1 + 0.5 * (dx / amp)[..., None]), 0, 255)
    return _blend(img, shade, weight), region


def faint(img: np.ndarray, rng: np.random.Generator, textures: Textures, where=None) -> tuple:
    h, w = img.shape[:2]
    size = int(min(h, w) * rng.uniform(0.35, 0.95))
    region = _place(blob(size, rng), (h, w), rng, where)
    alpha = _soft(region, rng.uniform(3.0, 12.0))
    mask = alpha >= 0.5
    if not mask.any():
        mask = region
    level = rng.uniform(4.0, 16.0) * (1 if rng.random() < 0.5 else -1)
    uneven = 1.0 + 0.35 * perlin((h, w), int(rng.integers(2, 5)), rng)  # the shift varies across the area
    out = img.astype(np.float32) + (alpha * level * uneven)[..., None]
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out, mask


def _walk(shape: tuple[int, int], rng: np.random.Generator, length: float, where=None) -> np.ndarray:
    """A smooth random walk of `length` px in 2 px steps (its heading drifts slowly): (n, 2) int32 x, y."""
    p = _point(shape, rng, where)
    heading, turn = rng.uniform(0, 2 * np.pi), 0.0
    pts = [p.copy()]
    for _ in range(max(2, int(length / 2))):
        turn = 0.9 * turn + rng.normal(0.0, 0.012)
        heading += turn
        p = p + 2.0 * np.array([np.cos(heading), np.sin(heading)])
        pts.append(p.copy())
    return np.round(np.array(pts)).astype(np.int32)


def crack(img: np.ndarray, rng: np.random.Generator, textures: Textures, where=None) -> tuple:
    h, w = img.shape[:2]
    pts = _walk((h, w), rng, rng.uniform(50, 350), where)
    region = np.zeros((h, w), np.uint8)
    cv2.polylines(region, [pts], False, 1, int(rng.integers(1, 4)))
    mask = region > 0
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    around = float(grey[mask].mean()) if mask.any() else 128.0
    sign = -1.0 if around > 70 and rng.random() < 0.75 else 1.0  # mostly dark cracks, bright on dark ground
    shift = sign * rng.uniform(20.0, 70.0) * rng.uniform(0.75, 1.0, (h, w)).astype(np.float32)
    alpha = _soft(mask, 0.5)
    out = np.clip(np.rint(img.astype(np.float32) + (alpha * shift)[..., None]), 0, 255).astype(np.uint8)
    return out, mask


def border_band(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Pixels along one random side of the image: a defect centred there is cut by the border."""
    h, w = shape
    band = np.zeros((h, w), bool)
    d = max(2, int(0.03 * min(h, w)))
    side = int(rng.integers(4))
    if side == 0:
        band[:d] = True
    elif side == 1:
        band[-d:] = True
    elif side == 2:
        band[:, :d] = True
    else:
        band[:, -d:] = True
    return band


GENERATORS: dict[str, Callable] = {
    "contamination": contamination,
    "discoloration": discoloration,
    "cut": cut,
    "scratch": scratch,
    "hole": hole,
    "deformation": deformation,
    "faint": faint,
    "crack": crack,
}
MULTI_KINDS = ("contamination", "discoloration", "scratch", "hole", "deformation", "crack")


def synthesize(
    image: np.ndarray,
    rng: np.random.Generator,
    textures: Sequence[np.ndarray] = (),
    n_defects: int | None = None,
    kinds: Sequence[str] = KINDS,
    on_object: float = 0.85,
    at_border: float = 0.0,
    multi: float = 0.0,
) -> SynthSample:
    """Draw 1-2 defects (different kinds) onto a copy of `image`; every instance mask has >= 4 pixels.

    With probability `on_object` the defects are centred on the rough object mask (`foreground`); with
    probability `at_border` on a band along one side of the image instead. With probability `multi` (and
    `n_defects` unset) one kind of `MULTI_KINDS` is drawn 2-4 times: several separate defects under one label."""
    multi_kinds = [k for k in kinds if k in MULTI_KINDS]
    if n_defects is None and multi > 0 and multi_kinds and rng.random() < multi:
        kind = multi_kinds[int(rng.integers(len(multi_kinds)))]
        chosen_kinds = [kind] * int(rng.integers(2, 5))
    else:
        n = n_defects if n_defects is not None else (1 if rng.random() < 0.7 else 2)
        chosen_kinds = [kinds[int(i)] for i in rng.choice(len(kinds), size=min(n, len(kinds)), replace=False)]
    out = image.copy()
    sample = SynthSample(image=out)
    if at_border > 0 and rng.random() < at_border:
        where = border_band(image.shape[:2], rng)
    else:
        where = foreground(image) if rng.random() < on_object else None
    for kind in chosen_kinds:
        for _ in range(5):
            new, mask = GENERATORS[kind](out, rng, textures, where)
            if mask.sum() >= 4:
                break
        else:
            continue
        for prev in sample.masks:  # a later defect covers the earlier one where they overlap
            prev &= ~mask
        out = new
        sample.masks.append(mask)
        sample.kinds.append(kind)
    sample.image = out
    keep = [i for i, m in enumerate(sample.masks) if m.sum() >= 4]
    sample.masks = [sample.masks[i] for i in keep]
    sample.kinds = [sample.kinds[i] for i in keep]
    return sample


def skimage_textures() -> list[np.ndarray]:
    """The CC0 textures bundled in scikit-image (brick, grass, gravel) as (H, W, 3) uint8 RGB."""
    from skimage import data

    return [np.repeat(getattr(data, n)()[..., None], 3, axis=2) for n in ("brick", "grass", "gravel")]
