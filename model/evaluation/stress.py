"""Stress set for the click benchmark: defect kinds the real datasets lack, synthesised with exact masks.

  python -m model.bench clicks --dataset DIR --stress lowcontrast,crack[,...|all] [--stress-n N] [--split even]

Each kind is drawn on the dataset's defect-free *test* images (test/good; never on the references, train/good,
which stay the bank as usual) or, for `texture`, on scikit-image's bundled textures:

- lowcontrast: one large region of 10-40 % of the image, shifted by 5-15 grey levels (the shift varies a little
  across the region: uneven brightness) with soft edges (a Gaussian ramp of sigma 4-12 px); the mask is where
  the ramp is at least half way (alpha >= 0.5), so pixels just outside it change by less than half the shift.
- crack: one long thin curvy crack, 1-3 px wide, a centre line of 50-300 px, 35-70 grey levels darker on
  bright ground or brighter on dark ground, away from the image border.
- border: one frayed area (ragged outline, shifted and grainy) cut by the image border (1-6 % of the image).
- multi: 2-5 separate blobs (0.2-1.5 % of the image each, at least 8 px apart) under one label.
- texture: a patch (1-8 %) on brick, grass or gravel (skimage.data, tiled to the dataset's image size): shifted,
  worn smooth, or replaced by another texture.

Masks are exact: every pixel of a mask is changed, and outside the mask only lowcontrast's soft ramp changes
pixels (by less than half its shift). Everything is deterministic for (seed, split, kind, index). The benchmark
writes the items as PNG (lossless) into a temporary folder removed at exit; the defect type of an item is its
kind, so the report's per-defect rows are per kind. `--split even/odd` draws on the even / odd-indexed test/good
images (and other random draws), so design choices can use one half and be checked on the other.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from model.errors import ConfigError
from model.training.datasets import GOOD, DatasetError, MvtecDataset, TestItem, load_rgb

KINDS = ("lowcontrast", "crack", "border", "multi", "texture")
TEXTURES = ("brick", "grass", "gravel")
SPLITS = {"all": 0, "even": 1, "odd": 2}


@dataclass(frozen=True)
class StressSample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) bool, exact
    kind: str
    base: str  # the image or texture it was drawn on
    info: dict = field(default_factory=dict)  # what was drawn (share, shift, width, length, n, ...)


def parse_kinds(spec: str) -> list[str]:
    """'all' or a comma list of KINDS, in the given order, without repeats."""
    names = list(KINDS) if spec.strip() == "all" else [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in names if k not in KINDS]
    if unknown or not names:
        raise ConfigError(f"unknown stress kind(s) {unknown or spec!r}; known: {', '.join(KINDS)} or all")
    return list(dict.fromkeys(names))


# ---- shapes --------------------------------------------------------------------------------------------
def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)


def _smooth_field(shape: tuple[int, int], rng: np.random.Generator, scale: float) -> np.ndarray:
    """Smooth random field in [0, 1] varying over about `scale` px."""
    H, W = shape
    h, w = max(2, int(np.ceil(H / scale)) + 1), max(2, int(np.ceil(W / scale)) + 1)
    coarse = rng.random((h, w)).astype(np.float32)
    f = cv2.resize(coarse, (W, H), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(f.min()), float(f.max())
    return (f - lo) / (hi - lo) if hi > lo else np.zeros(shape, np.float32)


class _Blob:
    """A star-shaped blob r <= R (1 + sum_k a_k cos(k theta + phi_k)) around a centre (may lie off the image)."""

    def __init__(self, rng: np.random.Generator, harmonics: int, rough: float) -> None:
        k = np.arange(1, harmonics + 1)
        self.k = k
        amp = rng.uniform(0.0, 1.0, harmonics) / k
        self.amp = rough * amp / max(amp.sum(), 1e-6)  # sum of amplitudes = rough < 1: radius stays positive
        self.phase = rng.uniform(0, 2 * np.pi, harmonics)

    def ratio(self, shape: tuple[int, int], cy: float, cx: float) -> np.ndarray:
        """Each pixel's distance to the centre over the blob's unit radius in its direction: mask = ratio <= R."""
        H, W = shape
        dy = np.arange(H, dtype=np.float32)[:, None] - np.float32(cy)
        dx = np.arange(W, dtype=np.float32)[None, :] - np.float32(cx)
        theta = np.arctan2(dy, dx)
        rr = np.ones_like(theta)
        for k, a, p in zip(self.k, self.amp, self.phase):
            rr += np.float32(a) * np.cos(np.float32(k) * theta + np.float32(p))
        return np.sqrt(dy * dy + dx * dx) / rr

    def fit(self, shape: tuple[int, int], cy: float, cx: float, share: float) -> np.ndarray:
        """The blob around (cy, cx) whose part inside the image covers `share` of it."""
        q = self.ratio(shape, cy, cx)
        k = int(np.clip(round(share * q.size), 1, q.size)) - 1
        return q <= np.partition(q.ravel(), k)[k]


def _sign_for(grey: np.ndarray, mask: np.ndarray) -> float:
    """+1 (brighter) on dark ground, -1 (darker) on bright ground: a change that can be seen."""
    return 1.0 if float(grey[mask].mean()) < 110 else -1.0


def _apply(image: np.ndarray, delta: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image.astype(np.float32) + delta[..., None]), 0, 255).astype(np.uint8)


def _force_change(out: np.ndarray, base: np.ndarray, mask: np.ndarray, sign: float) -> np.ndarray:
    """Every mask pixel differs from the base (a pixel saturated by the change moves the other way by 1)."""
    same = mask & np.all(out == base, axis=-1)
    if same.any():
        b = base[same].astype(np.int16)
        step = np.where(b < 255, 1, -1) if sign > 0 else np.where(b > 0, -1, 1)
        out[same] = (b + step).astype(np.uint8)
    return out


# ---- kinds ---------------------------------------------------------------------------------------------
def lowcontrast(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    H, W = image.shape[:2]
    share = rng.uniform(0.12, 0.36)
    sigma = rng.uniform(4.0, 12.0)
    cy, cx = rng.uniform(0.3, 0.7) * H, rng.uniform(0.3, 0.7) * W
    hard = _Blob(rng, 5, rng.uniform(0.15, 0.35)).fit((H, W), cy, cx, share)
    alpha = cv2.GaussianBlur(hard.astype(np.float32), (0, 0), sigma)
    mask = alpha >= 0.5
    level = rng.uniform(7.0, 13.0)  # the shift: level +- 2 across the region (uneven), always within 5..15
    sign = _sign_for(_grey(image), mask) * (1 if rng.random() < 0.5 else -1)
    shift = sign * (level + 2.0 * (2.0 * _smooth_field((H, W), rng, max(H, W) / 3) - 1.0))
    out = _force_change(_apply(image, alpha * shift), image, mask, sign)
    return out, mask, {"share": float(mask.mean()), "shift": float(level), "sign": sign, "sigma": float(sigma)}


def _crack_path(shape: tuple[int, int], length: int, rng: np.random.Generator, margin: int) -> np.ndarray:
    H, W = shape
    y, x = rng.uniform(margin + 0.2 * (H - 2 * margin), H - margin - 0.2 * (H - 2 * margin)), \
        rng.uniform(margin + 0.2 * (W - 2 * margin), W - margin - 0.2 * (W - 2 * margin))
    heading, turn = rng.uniform(0, 2 * np.pi), 0.0
    pts = [(x, y)]
    for _ in range(length):
        turn = 0.92 * turn + rng.normal(0.0, 0.025)
        heading += turn
        nx, ny = x + np.cos(heading), y + np.sin(heading)
        if not (margin <= nx <= W - 1 - margin):
            heading = np.pi - heading
        if not (margin <= ny <= H - 1 - margin):
            heading = -heading
        x, y = float(np.clip(x + np.cos(heading), margin, W - 1 - margin)), \
            float(np.clip(y + np.sin(heading), margin, H - 1 - margin))
        pts.append((x, y))
    return np.asarray(pts)


def crack(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    H, W = image.shape[:2]
    length = int(rng.integers(50, 301))
    width = int(rng.integers(1, 4))
    pts = _crack_path((H, W), length, rng, margin=6)
    line = np.zeros((H, W), np.uint8)
    cv2.polylines(line, [np.rint(pts).astype(np.int32).reshape(-1, 1, 2)], False, 1, thickness=1,
                  lineType=cv2.LINE_8)
    if width == 2:
        line = cv2.dilate(line, np.ones((2, 2), np.uint8))
    elif width == 3:
        line = cv2.dilate(line, cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)))
    mask = line > 0
    grey = _grey(image)
    sign = _sign_for(cv2.blur(grey, (15, 15)), mask)
    contrast = rng.uniform(35.0, 70.0)
    delta = np.where(mask, sign * contrast * rng.uniform(0.8, 1.0, (H, W)), 0.0).astype(np.float32)
    out = _force_change(_apply(image, delta), image, mask, sign)
    return out, mask, {"length": length, "width": width, "contrast": float(contrast), "sign": sign}


def border(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    H, W = image.shape[:2]
    side = int(rng.integers(0, 4))  # top, bottom, left, right
    share = rng.uniform(0.01, 0.06)
    along = rng.uniform(0.15, 0.85)
    blob = _Blob(rng, 9, rng.uniform(0.25, 0.45))
    r0 = np.sqrt(share * H * W / np.pi)  # offset of the centre across the edge: a fraction of the radius
    off = rng.uniform(-0.3, 0.3) * r0
    cy, cx = {0: (off, along * W), 1: (H - 1 - off, along * W), 2: (along * H, off),
              3: (along * H, W - 1 - off)}[side]
    mask = blob.fit((H, W), cy, cx, share)
    grey = _grey(image)
    sign = _sign_for(grey, mask)
    level = rng.uniform(20.0, 45.0)
    grain = cv2.GaussianBlur(rng.normal(0.0, rng.uniform(6.0, 14.0), (H, W)).astype(np.float32), (0, 0), 1.0)
    delta = np.where(mask, sign * level + grain, 0.0).astype(np.float32)
    out = _force_change(_apply(image, delta), image, mask, sign)
    return out, mask, {"share": float(mask.mean()), "side": side, "shift": float(level), "sign": sign}


def multi(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    H, W = image.shape[:2]
    n = int(rng.integers(2, 6))
    grey = _grey(image)
    mask = np.zeros((H, W), bool)
    keep_out = np.zeros((H, W), np.uint8)  # existing blobs grown by the gap: a new one must not touch it
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (17, 17))
    out, placed, tries = image.copy(), 0, 0
    while placed < n and tries < 200:
        tries += 1
        share = rng.uniform(0.002, 0.015)
        r0 = np.sqrt(share * H * W / np.pi)
        cy, cx = rng.uniform(1.6 * r0 + 4, H - 1.6 * r0 - 4), rng.uniform(1.6 * r0 + 4, W - 1.6 * r0 - 4)
        blob = _Blob(rng, 5, rng.uniform(0.1, 0.35)).fit((H, W), cy, cx, share)
        if (keep_out[blob] > 0).any() or blob[0].any() or blob[-1].any() or blob[:, 0].any() or blob[:, -1].any():
            continue
        sign = _sign_for(grey, blob)
        level = rng.uniform(20.0, 45.0)
        out = _force_change(_apply(out, np.where(blob, sign * level, 0.0).astype(np.float32)), image, blob, sign)
        mask |= blob
        keep_out = cv2.dilate(mask.astype(np.uint8), kernel)
        placed += 1
    if placed < 2:
        raise DatasetError(f"could not place two separate blobs on a {W}x{H} image")
    return out, mask, {"n": placed, "share": float(mask.mean())}


def texture_image(name: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """skimage.data texture `name` mirrored-tiled to (H, W) at a random offset, as RGB uint8."""
    import skimage.data

    tex: np.ndarray = np.asarray(getattr(skimage.data, name)(), np.uint8)
    if tex.ndim == 3:
        tex = np.asarray(cv2.cvtColor(tex[..., :3], cv2.COLOR_RGB2GRAY), np.uint8)
    H, W = shape
    th, tw = tex.shape
    reps = (int(np.ceil(H / th)) + 1, int(np.ceil(W / tw)) + 1)
    rows = [np.concatenate([tex if (i + j) % 2 == 0 else tex[:, ::-1] for j in range(reps[1])], 1)
            for i in range(reps[0])]
    tiled = np.concatenate([r if i % 2 == 0 else r[::-1] for i, r in enumerate(rows)], 0)
    y0, x0 = int(rng.integers(0, tiled.shape[0] - H + 1)), int(rng.integers(0, tiled.shape[1] - W + 1))
    return np.repeat(tiled[y0:y0 + H, x0:x0 + W, None], 3, axis=2).copy()


def texture(image: np.ndarray, rng: np.random.Generator, name: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """`image` is the texture background (texture_image); a patch of it is altered."""
    H, W = image.shape[:2]
    share = rng.uniform(0.01, 0.08)
    r0 = np.sqrt(share * H * W / np.pi)
    cy, cx = rng.uniform(r0, H - r0), rng.uniform(r0, W - r0)
    mask = _Blob(rng, 6, rng.uniform(0.15, 0.4)).fit((H, W), cy, cx, share)
    grey = _grey(image)
    how = ("shift", "smooth", "foreign")[int(rng.integers(0, 3))]
    sign = _sign_for(grey, mask)
    if how == "shift":
        level = rng.uniform(25.0, 45.0)
        new = _apply(image, np.full((H, W), sign * level, np.float32))
    elif how == "smooth":  # worn: the texture's detail gone, a little brighter or darker
        level = rng.uniform(10.0, 20.0)
        new = _apply(cv2.GaussianBlur(image, (0, 0), 4.0), np.full((H, W), sign * level, np.float32))
    else:
        level = 0.0
        other = [t for t in TEXTURES if t != name][int(rng.integers(0, len(TEXTURES) - 1))]
        new = texture_image(other, (H, W), rng)
    out = image.copy()
    out[mask] = new[mask]
    out = _force_change(out, image, mask, sign)
    return out, mask, {"share": float(mask.mean()), "how": how, "shift": float(level), "texture": name}


# ---- items ---------------------------------------------------------------------------------------------
def _bases(data: MvtecDataset, split: str) -> list[Path]:
    goods = [t.path for t in data.test if t.defect == GOOD]
    if split != "all":
        goods = [p for i, p in enumerate(goods) if (i % 2 == 0) == (split == "even")]
    if not goods:
        raise DatasetError(f"{data.root} has no defect-free test images (test/{GOOD}) for the stress set")
    return goods


def generate(data: MvtecDataset, kinds: Sequence[str], n: int, seed: int = 0,
             split: str = "all") -> Iterator[StressSample]:
    """n samples of each kind, on the dataset's test/good images of `split` (cycled) or on textures of their
    size. Deterministic for (seed, split, kind, index)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if n < 1:
        raise ConfigError(f"--stress-n must be at least 1, got {n}")
    bases = _bases(data, split)
    shape: tuple[int, int] | None = None
    for kind in kinds:
        for i in range(n):
            rng = np.random.default_rng([seed, SPLITS[split], KINDS.index(kind), i])
            if kind == "texture":
                if shape is None:
                    shape = load_rgb(bases[0]).shape[:2]
                name = TEXTURES[int(rng.integers(0, len(TEXTURES)))]
                base_img = texture_image(name, shape, rng)
                image, mask, info = texture(base_img, rng, name)
                base = f"skimage:{name}"
            else:
                path = bases[(i + int(rng.integers(0, len(bases)))) % len(bases)]
                base_img = load_rgb(path)
                image, mask, info = {"lowcontrast": lowcontrast, "crack": crack, "border": border,
                                     "multi": multi}[kind](base_img, rng)
                base = path.name
            yield StressSample(image, mask, kind, base, info)


def write_items(samples: Sequence[StressSample] | Iterator[StressSample], folder: Path) -> list[TestItem]:
    """PNG image + mask of each sample in an MVTec-like layout under `folder`; the TestItems pointing at them."""
    items: list[TestItem] = []
    counts: dict[str, int] = {}
    for s in samples:
        k = counts.get(s.kind, 0)
        counts[s.kind] = k + 1
        img = folder / "test" / s.kind / f"{k:03d}.png"
        msk = folder / "ground_truth" / s.kind / f"{k:03d}_mask.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        msk.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(s.image).save(img)
        Image.fromarray(s.mask.astype(np.uint8) * 255).save(msk)
        items.append(TestItem(img, s.kind, msk))
    return items


def stress_items(data: MvtecDataset, spec: str, n: int, seed: int = 0, split: str = "all",
                 folder: Path | None = None) -> list[TestItem]:
    """The benchmark's test items for `--stress spec`: written to `folder` (default: a temporary folder removed
    when the process exits)."""
    kinds = parse_kinds(spec)
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="bench-stress-"))
        atexit.register(shutil.rmtree, folder, True)
    return write_items(generate(data, kinds, n, seed, split), Path(folder))
