"""Residual engine: reference bank building (cached, incremental, memory-bounded) and per-image residuals.

For a query image: backbone features -> bank projection (PCA) -> global retrieval of the `k_refs` most similar
reference views -> position-constrained nearest-neighbour matching (hard window or soft positional embedding,
see model/engine/references.py) -> residual = matched reference feature - query feature (signed, (C, h, w)).
grid_map = L2 norm of the residual per patch; anomaly_map = grid_map resized to the image (bilinear) and
smoothed with a Gaussian (`smooth_sigma` px); score = maximum of anomaly_map.

Few references: when the bank has fewer than `augment_below` source images, each one is also added as
flipped, shifted and rotated views. No references at all (empty bank): self-similarity fallback, every patch is
matched against the query's own patches outside a small neighbourhood (`self_exclude` cells), which flags what
does not repeat elsewhere in the image. Another documented fallback is a bank built from other unlabelled images
of the project: retrieval + nearest neighbour over several references is robust to a few defects among them.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.checkpoint import atomic_save
from model.engine.features import BackboneConfig, FeatureExtractor, build_extractor
from model.engine.references import ReferenceBank, descriptors, fit_pca, match, retrieve, with_position
from model.errors import BankError, ConfigError, InputError

logger = logging.getLogger(__name__)

ImageLike = np.ndarray | Path | str
BankProgress = Callable[[int, int], None] | None
BANK_FORMAT = 1


@dataclass(frozen=True)
class ResidualConfig:
    k_refs: int = 20  # references retrieved globally per query
    match: str = "window"  # window (hard, SemiREST) | softpos (soft positional embedding, ADClick)
    window_radius: int = 2  # hard window, grid cells (Chebyshev)
    pos_weight: float = 0.15  # softpos: embedding scale relative to the RMS feature norm
    pca_dim: int = 0  # project features to this many dims (0 = keep all)
    max_refs: int = 400  # memory bound: more reference views are thinned by greedy k-center on descriptors
    augment_below: int = 10  # add flipped/shifted/rotated views when fewer source images than this
    retrieval_cell: int = 4  # grid cells per retrieval-descriptor block
    smooth_sigma: float = 2.0  # Gaussian smoothing of the anomaly map, px at image resolution (0 = off)
    self_exclude: int = 2  # empty-bank fallback: neighbourhood excluded from self-matching, grid cells
    calib_n: int = 8  # leave-one-out maps of this many references calibrate the normal score range

    def __post_init__(self):
        if self.match not in ("window", "softpos"):
            raise ConfigError(f"match must be 'window' or 'softpos', got {self.match!r}")
        if self.k_refs < 1 or self.window_radius < 0 or self.max_refs < 1:
            raise ConfigError("k_refs and max_refs must be >= 1, window_radius >= 0")


@dataclass(frozen=True)
class ResidualState:
    """Per-image result; immutable, shared across threads. Implements the ImageState protocol."""

    residual: torch.Tensor  # (C, h, w) float32, matched reference - query
    features: torch.Tensor  # (C, h, w) float32, query features in bank space
    grid_map: np.ndarray  # (h, w) float32, residual L2 norm
    anomaly_map: np.ndarray  # (H, W) float32, image resolution
    score: float  # max of anomaly_map
    image_shape: tuple[int, int]  # (H, W)
    ref_indices: tuple[int, ...] = ()  # bank views retrieved (empty = self-similarity fallback)
    image: np.ndarray | None = field(default=None, repr=False)  # (H, W, 3) uint8, for boundary refinement

    @property
    def nbytes(self) -> int:
        t = (self.residual.numel() + self.features.numel()) * 4
        t += 0 if self.image is None else self.image.nbytes
        return int(t + self.grid_map.nbytes + self.anomaly_map.nbytes)


def load_image(item: ImageLike) -> np.ndarray:
    """RGB uint8 array of an array or an image file. A file that is not a decodable image, or a decompression
    bomb (PIL's pixel limit), raises InputError naming the file by its name only (never its folder)."""
    if isinstance(item, np.ndarray):
        arr = item
    else:
        try:
            with Image.open(item) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            bomb = isinstance(exc, Image.DecompressionBombError)
            reason = "too many pixels" if bomb else "not a readable image"
            raise InputError(f"cannot read image {Path(item).name}: {reason}") from exc
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InputError(f"expected (H, W, 3) uint8 RGB, got {arr.shape} {arr.dtype}")
    return arr


def content_hash(item: ImageLike) -> str:
    h = hashlib.sha1()
    if isinstance(item, np.ndarray):
        h.update(str(item.shape).encode())
        h.update(np.ascontiguousarray(item).tobytes())
    else:
        h.update(Path(item).read_bytes())
    return h.hexdigest()


def augment_views(img: np.ndarray) -> list[np.ndarray]:
    """The image plus flipped, shifted (+-4 % of the size) and rotated (+-4 deg) views, reflect-padded."""
    h, w = img.shape[:2]
    views = [img, img[:, ::-1].copy(), img[::-1].copy()]
    for dx, dy, ang in ((0.04, 0, 0), (-0.04, 0, 0), (0, 0.04, 0), (0, -0.04, 0), (0, 0, 4), (0, 0, -4)):
        m = cv2.getRotationMatrix2D((w / 2, h / 2), ang, 1.0)
        m[0, 2] += dx * w
        m[1, 2] += dy * h
        views.append(cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101))
    return views


def kcenter(desc: torch.Tensor, n: int) -> list[int]:
    """Greedy k-center selection of n rows of desc (N, D): a coreset of reference views."""
    x = desc.flatten(1).float()
    chosen = [0]
    dist = (x - x[0]).pow(2).sum(1)
    while len(chosen) < n:
        i = int(dist.argmax())
        chosen.append(i)
        dist = torch.minimum(dist, (x - x[i]).pow(2).sum(1))
    return sorted(chosen)


class ResidualEngine:
    """Thread-safe; the backbone is built lazily, once, on first use."""

    def __init__(self, backbone_cfg: BackboneConfig | None = None, residual_cfg: ResidualConfig | None = None,
                 cache_dir: Path | str | None = None):
        self.backbone_cfg = backbone_cfg or BackboneConfig()
        self.cfg = residual_cfg or ResidualConfig()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._extractor: FeatureExtractor | None = None
        self._lock = threading.Lock()

    @property
    def extractor(self) -> FeatureExtractor:
        with self._lock:
            if self._extractor is None:
                self._extractor = build_extractor(self.backbone_cfg)
            return self._extractor

    def config_hash(self) -> str:
        """8 hex chars identifying backbone + residual config (no network load needed)."""
        tag = f"{sorted(self.backbone_cfg.to_dict().items())}|{sorted(asdict(self.cfg).items())}"
        return hashlib.sha1(tag.encode()).hexdigest()[:8]

    # ---- bank -------------------------------------------------------------------------------------------
    def _bank_key(self, source_keys: Iterable[str]) -> str:
        cfg = {k: v for k, v in asdict(self.cfg).items() if k in ("pca_dim", "max_refs", "augment_below",
                                                                    "retrieval_cell", "calib_n")}
        tag = f"v{BANK_FORMAT}|{self.extractor.cache_key()}|{sorted(cfg.items())}|{sorted(set(source_keys))}"
        return hashlib.sha1(tag.encode()).hexdigest()[:20]

    def _bank_path(self, key: str) -> Path | None:
        return self.cache_dir / f"bank-{key}.pt" if self.cache_dir is not None else None

    def load_cached(self, key: str) -> ReferenceBank | None:
        path = self._bank_path(key)
        if path is None or not path.is_file():
            return None
        try:
            bank = ReferenceBank.from_payload(torch.load(path, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, BankError) as exc:
            logger.warning("ignoring unreadable bank cache %s: %s", path, exc)
            return None
        logger.info("loaded reference bank %s (%d views) from cache", key, len(bank))
        return bank

    def _save(self, bank: ReferenceBank) -> None:
        path = self._bank_path(bank.key)
        if path is not None:
            atomic_save(bank.to_payload(), path)
            logger.info("saved reference bank %s (%d views, %.1f MB)", bank.key, len(bank), bank.nbytes / 2**20)

    def cached_bank(self, images: Iterable[ImageLike]) -> ReferenceBank | None:
        """The bank `build_bank(images)` would return, from the disk cache; None when not cached."""
        return self.load_cached(self._bank_key(dict.fromkeys(content_hash(it) for it in images)))

    def build_bank(self, images: Iterable[ImageLike], progress: BankProgress = None, augment: bool | None = None,
                   save: bool = True) -> ReferenceBank:
        """Bank of the given defect-free images (arrays or paths), loaded from the cache when the same
        content was built before with the same configs. An empty input gives an empty bank (fallback mode).
        An image that cannot be read is skipped with a WARNING (it stays part of the cache key, so the same
        folder gives the same bank). augment: None = the config's rule (fewer than `augment_below` sources);
        False = no augmented views (a quick first bank). save=False: not written to the disk cache
        (intermediate banks of a progressive build)."""
        items = list(images)
        hashes = [content_hash(it) for it in items]
        uniq = list(dict.fromkeys(hashes))
        key = self._bank_key(uniq)
        cached = self.load_cached(key)
        if cached is not None:
            return cached
        first = {h: it for h, it in reversed(list(zip(hashes, items)))}
        if augment is None:
            augment = len(uniq) < self.cfg.augment_below
        feats, keys, shape = self._extract_sources([(h, first[h]) for h in uniq], augment, progress)
        read = set(keys)
        skipped = [h for h in uniq if h not in read]
        uniq = [h for h in uniq if h in read]
        mean = comps = None
        if feats.shape[0] and 0 < self.cfg.pca_dim < feats.shape[1]:
            mean, comps = fit_pca(feats, self.cfg.pca_dim)
        bank = ReferenceBank(torch.empty(0), torch.empty(0), [], uniq, mean, comps, key=key)
        bank = self._finish(bank, feats, keys, uniq, key, shape, skipped)
        if save:
            self._save(bank)
        return bank

    def extend(self, bank: ReferenceBank, images: Iterable[ImageLike], progress: BankProgress = None,
               save: bool = True) -> ReferenceBank:
        """A new bank = `bank` + the images not in it yet (same projection); cached under the new content key
        (unreadable images are skipped, as in build_bank)."""
        new = [(content_hash(it), it) for it in images]
        known = set(bank.source_keys) | set(bank.meta.get("skipped", ()))
        new = list({h: it for h, it in new if h not in known}.items())
        if not new:
            return bank
        uniq = list(bank.source_keys) + list(bank.meta.get("skipped", ())) + [h for h, _ in new]
        key = self._bank_key(uniq)
        cached = self.load_cached(key)
        if cached is not None:
            return cached
        feats, keys, shape = self._extract_sources(new, len(uniq) < self.cfg.augment_below, progress)
        if len(bank) == 0 and feats.shape[0] and bank.components is None and 0 < self.cfg.pca_dim < feats.shape[1]:
            mean, comps = fit_pca(feats, self.cfg.pca_dim)
            bank = replace(bank, mean=mean, components=comps)  # never mutate the caller's bank
        read = set(keys)
        uniq = list(bank.source_keys) + [h for h, _ in new if h in read]
        skipped = list(bank.meta.get("skipped", ())) + [h for h, _ in new if h not in read]
        out = self._finish(bank, feats, keys, uniq, key, shape, skipped)
        if save:
            self._save(out)
        return out

    def _finish(self, base: ReferenceBank, raw: torch.Tensor, keys: list[str], uniq: list[str],
                key: str, shape: list[int], skipped: Iterable[str] = ()) -> ReferenceBank:
        """skipped: content hashes of input images that could not be read (kept in meta so that extending the
        bank computes the same cache key as building it from all inputs at once)."""
        skipped = list(skipped)
        proj = torch.cat([base.project(raw[i:i + 16]) for i in range(0, raw.shape[0], 16)]) if raw.shape[0] else raw
        proj = proj.half()
        if len(base):
            if proj.shape[0] and proj.shape[2:] != base.features.shape[2:]:
                proj = F.interpolate(proj.float(), size=base.grid, mode="bilinear", align_corners=False).half()
            feats = torch.cat([base.features, proj]) if proj.shape[0] else base.features
            keys = list(base.keys) + keys
        else:
            feats = proj
        if feats.shape[0] == 0:
            return ReferenceBank(torch.empty(0, 0, 0, 0, dtype=torch.float16), torch.empty(0, 0, 0, 0), [],
                                 uniq, base.mean, base.components, key=key,
                                 meta={"image_shape": shape, "skipped": skipped})
        desc = descriptors(feats, self.cfg.retrieval_cell)
        if feats.shape[0] > self.cfg.max_refs:
            keep = kcenter(desc, self.cfg.max_refs)
            feats, desc, keys = feats[keep], desc[keep], [keys[i] for i in keep]
        sq = sum(float(feats[i:i + 16].float().pow(2).sum()) for i in range(0, feats.shape[0], 16))
        rms = (sq / (feats.shape[0] * feats.shape[2] * feats.shape[3])) ** 0.5
        shape = base.meta.get("image_shape") or shape
        bank = ReferenceBank(feats, desc, keys, uniq, base.mean, base.components, rms, key,
                             {"n_sources": len(uniq), "n_views": int(feats.shape[0]), "image_shape": shape,
                              "skipped": skipped})
        self._calibrate(bank)
        return bank

    def _calibrate(self, bank: ReferenceBank) -> None:
        """meta["normal_scores"]: image scores of up to `calib_n` references, each against the bank without
        its own views (leave-one-out); the range a defect-free image scores in (used by detect thresholds)."""
        present = list(dict.fromkeys(bank.keys))
        if len(present) < 2 or self.cfg.calib_n <= 0 or not bank.meta.get("image_shape"):
            return
        step = max(1, len(present) // self.cfg.calib_n)
        scores = []
        for src in present[::step][: self.cfg.calib_n]:
            own = torch.tensor([k == src for k in bank.keys])
            q = bank.features[int(own.nonzero()[0])].to(self.extractor.device, torch.float32)
            with torch.inference_mode():
                matched, _ = self._match(q, bank, skip=own)
            amap = self.to_image((matched - q).norm(dim=0).cpu().numpy(), tuple(bank.meta["image_shape"]))
            scores.append(float(amap.max()))
        bank.meta["normal_scores"] = scores

    def _extract_sources(self, sources: list[tuple[str, ImageLike]], augment: bool,
                         progress: BankProgress) -> tuple[torch.Tensor, list[str], list[int]]:
        ext = self.extractor
        feats: list[torch.Tensor] = []
        keys: list[str] = []
        grid = None
        shape: list[int] = []
        for n, (h, item) in enumerate(sources):
            try:
                img = load_image(item)
            except InputError as exc:  # one bad file must not take the whole bank (and every click) down
                logger.warning("reference image skipped: %s", exc)
                if progress is not None:
                    progress(n + 1, len(sources))
                continue
            shape = shape or [int(img.shape[0]), int(img.shape[1])]
            views = augment_views(img) if augment else [img]
            f = ext.extract(views)
            if grid is None:
                grid = f.shape[2:]
            elif f.shape[2:] != grid:
                f = F.interpolate(f, size=tuple(grid), mode="bilinear", align_corners=False)
            feats.append(f.half())  # fp16 from here on: the bank is stored in fp16 anyway
            keys += [h] * len(views)
            if progress is not None:
                progress(n + 1, len(sources))
        if not feats:
            return torch.empty(0, ext.dim, 0, 0, dtype=torch.float16), [], []
        return torch.cat(feats), keys, shape

    # ---- residuals ----------------------------------------------------------------------------------------
    def compute(self, image: np.ndarray, bank: ReferenceBank, exclude: str | None = None) -> ResidualState:
        """Residual state of one RGB uint8 image against the bank (self-similarity when the bank is empty).
        Matching runs on the extractor's device; the state holds CPU tensors. exclude: the content hash of a
        source whose views are not matched (leave-one-out, as the calibrations do)."""
        img = load_image(image)
        q = bank.project(self.extractor.extract([img]))[0]
        if len(bank) and q.shape[1:] != bank.grid:
            q = F.interpolate(q[None], size=bank.grid, mode="bilinear", align_corners=False)[0]
        with torch.inference_mode():
            q = q.to(self.extractor.device)
            skip = torch.tensor([k == exclude for k in bank.keys]) if exclude is not None and len(bank) else None
            matched, idx = self._match(q, bank, skip=skip if skip is not None and bool(skip.any()) else None)
            residual = (matched - q).cpu()
            q = q.cpu()
        grid_map = residual.norm(dim=0).numpy().astype(np.float32)
        amap = self.to_image(grid_map, img.shape[:2])
        return ResidualState(residual, q, grid_map, amap, float(amap.max()), tuple(img.shape[:2]), idx, img)

    def _match(self, q: torch.Tensor, bank: ReferenceBank,
               skip: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
        c, h, w = q.shape
        if len(bank) == 0:
            _, index = match(q, q[None], None, exclude=self.cfg.self_exclude)
            return q.reshape(c, -1)[:, index.flatten()].reshape(c, h, w), ()
        top = retrieve(descriptors(q[None], self.cfg.retrieval_cell)[0].cpu(), bank.desc, self.cfg.k_refs,
                       skip=skip)
        refs = bank.features[top].to(q.device, torch.float32)
        if self.cfg.match == "softpos":
            qs = with_position(q[None], self.cfg.pos_weight, bank.feat_rms)[0]
            rs = with_position(refs, self.cfg.pos_weight, bank.feat_rms)
            _, index = match(qs, rs, None)
        else:
            _, index = match(q, refs, self.cfg.window_radius)
        flat = refs.permute(1, 0, 2, 3).reshape(c, -1)
        return flat[:, index.flatten()].reshape(c, h, w), tuple(int(i) for i in top)

    def to_image(self, grid_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(h, w) grid values -> (H, W) float32: bilinear resize + Gaussian smoothing."""
        H, W = shape
        amap = cv2.resize(grid_map.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
        if self.cfg.smooth_sigma > 0:
            amap = cv2.GaussianBlur(amap, (0, 0), self.cfg.smooth_sigma)
        return amap.astype(np.float32)
