"""Build the ADClick training set: products (defect-free images), their reference banks, synthetic defects,
residuals, and the prompt table; cached to one file so training iterates fast.

Products: MVTec-style folders' train/good + validation/good (never their test images; the tire and the ball
screw pitting data here) and the three CC0 textures bundled in scikit-image (brick, grass, gravel), so the
network does not overfit one product. Every product's images are brought to one (800, 600) grid so batches
stack (turned a quarter when that keeps more of them, scaled to cover it, centre-cropped). Each product's
normals are split: every second train/good image (or half the texture views) builds the reference bank, the others are the
sources of synthetic defects, so a source image is never its own reference (its residual would be zero).
Synthesis runs in worker processes; residuals run in the main process on the engine's device.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from model.engine.residuals import ResidualEngine, load_image
from model.training.samples import Sample, synth_one, to_sample
from model.training.synth import KIND_WORDS

logger = logging.getLogger(__name__)

TEXTURE_SIZE = (800, 600)  # (H, W): same grid as the tire so batches stack


@dataclass
class Product:
    name: str
    object_name: str  # prompt object ("tire", "brick wall", ...)
    bank_images: list[np.ndarray]
    sources: list[np.ndarray]


@dataclass(frozen=True)
class FolderSpec:
    """One MVTec-style product folder of the training set and how many synthetic samples to draw over it."""
    dataset: Path
    object_name: str
    samples: int


def fit_to_grid(image: np.ndarray, size: tuple[int, int] = TEXTURE_SIZE) -> np.ndarray:
    """`image` on the (H, W) training grid: turned a quarter when its orientation differs, scaled to cover
    the grid (aspect kept), centre-cropped. Images already of that size come back unchanged."""
    H, W = size
    if image.shape[:2] == (H, W):
        return image
    if (image.shape[0] >= image.shape[1]) != (H >= W):
        image = np.ascontiguousarray(np.rot90(image))
    h, w = image.shape[:2]
    s = max(H / h, W / w)
    nh, nw = max(H, round(h * s)), max(W, round(w * s))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    y0, x0 = (nh - H) // 2, (nw - W) // 2
    return np.ascontiguousarray(image[y0:y0 + H, x0:x0 + W])


def folder_product(dataset: Path, object_name: str) -> Product:
    from model.training.datasets import list_images

    train = [fit_to_grid(load_image(p)) for p in list_images(dataset / "train" / "good")]
    val = [fit_to_grid(load_image(p)) for p in list_images(dataset / "validation" / "good")]
    if not train:
        raise FileNotFoundError(f"no train/good images under {dataset}")
    return Product(dataset.name, object_name, train[::2], train[1::2] + val)


def texture_views(tex: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`n` (800, 600) views of a square texture: scaled 1.6-2.0x, random crops, flips, brightness jitter."""
    h, w = TEXTURE_SIZE
    out = []
    for _ in range(n):
        s = rng.uniform(1.6, 2.0)
        big = cv2.resize(tex, (int(tex.shape[1] * s), int(tex.shape[0] * s)), interpolation=cv2.INTER_LINEAR)
        y = int(rng.integers(0, big.shape[0] - h + 1))
        x = int(rng.integers(0, big.shape[1] - w + 1))
        view = big[y:y + h, x:x + w]
        if rng.random() < 0.5:
            view = view[:, ::-1]
        out.append(np.clip(view.astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8))
    return out


def texture_products(rng: np.random.Generator, n_views: int = 16) -> list[Product]:
    from skimage import data

    names = {"brick": "brick wall", "grass": "grass", "gravel": "gravel"}
    out = []
    for name, obj in names.items():
        tex = np.repeat(getattr(data, name)()[..., None], 3, axis=2)
        views = texture_views(tex, n_views, rng)
        out.append(Product(name, obj, views[: n_views // 2], views[n_views // 2:]))
    return out


def make_residual_fn(engine: ResidualEngine, bank, exclude: str | None = None):
    """image -> (residual, grid, features) through the engine's public `compute` (matching on its device);
    `exclude`: the content hash of a bank reference left out of the matching (leave-one-out)."""
    def fn(image: np.ndarray):
        st = engine.compute(image, bank, exclude=exclude)
        return st.residual, torch.from_numpy(np.asarray(st.grid_map, np.float32)), st.features
    return fn


_WORKER: dict = {}


def _init_worker(sources: Sequence[np.ndarray], textures: Sequence[np.ndarray], opts: dict | None = None) -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    _WORKER["sources"], _WORKER["textures"], _WORKER["opts"] = sources, textures, opts or {}


def _synth_job(args: tuple[int, int]) -> tuple:
    index, seed = args
    return synth_one(_WORKER["sources"][index], np.random.default_rng(seed), _WORKER["textures"],
                     **_WORKER["opts"])


def product_samples(engine: ResidualEngine, product: Product, n: int, seed: int, device: torch.device,
                    textures: Sequence[np.ndarray], workers: int = 1, opts: dict | None = None) -> list[Sample]:
    """`n` synthetic samples of one product; synthesis in `workers` spawned processes (fork can deadlock
    after torch/OpenCV started their thread pools), residuals here on `device`."""
    bank = engine.build_bank(product.bank_images)
    fn = make_residual_fn(engine, bank)
    rng = np.random.default_rng(seed)
    jobs = [(int(rng.integers(len(product.sources))), int(rng.integers(2**31))) for _ in range(n)]
    out: list[Sample] = []
    pool = None
    if workers > 1:
        pool = mp.get_context("spawn").Pool(workers, _init_worker, (product.sources, list(textures), opts))
    else:
        _init_worker(product.sources, list(textures), opts)
    try:
        results = pool.imap(_synth_job, jobs, chunksize=4) if pool else map(_synth_job, jobs)
        for i, (image, masks, kinds) in enumerate(results):
            sample = to_sample(image, masks, kinds, fn, product.name)
            if sample is not None:
                out.append(sample)
            if (i + 1) % 200 == 0:
                logger.info("%s: %d/%d samples", product.name, i + 1, n)
    finally:
        if pool:
            pool.close()
            pool.join()
        else:
            _WORKER.clear()
    return out


def prompt_table(encoder, objects: Sequence[str]) -> dict[str, torch.Tensor]:
    """kind -> (n_words * n_objects, dim) prompt vectors ("a {word} on a {object}" templates, averaged)."""
    from model.modeling.text import CachedTextEncoder

    enc = encoder if isinstance(encoder, CachedTextEncoder) else CachedTextEncoder(encoder)
    table = {}
    for kind, words in KIND_WORDS.items():
        table[kind] = torch.stack([enc.prompt_vector(w, "", o) for w in words for o in objects])
    return table


def build_training_set(engine: ResidualEngine, folders: Sequence[FolderSpec], n_texture: int,
                       seed: int, device: torch.device, workers: int = 1,
                       opts: dict | None = None) -> list[Sample]:
    """Samples over every folder product (its own count) and `n_texture` over each skimage texture product;
    `opts`: synth_one's keywords (kinds, at_border, multi)."""
    rng = np.random.default_rng(seed)
    from model.training.synth import skimage_textures

    textures = skimage_textures()
    plan = [(folder_product(f.dataset, f.object_name), f.samples) for f in folders if f.samples > 0]
    plan += [(p, n_texture) for p in (texture_products(rng) if n_texture > 0 else [])]
    samples: list[Sample] = []
    for k, (prod, n) in enumerate(plan):
        samples += product_samples(engine, prod, n, seed * 1000 + k, device, textures, workers, opts)
        logger.info("product %s: %d samples (total %d)", prod.name, n, len(samples))
    return samples
