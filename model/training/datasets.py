"""Reader for MVTec-AD-style folders.

Layout: train/good/*, optional validation/good/* (both defect-free references), test/<defect>/*
("good" = defect-free test images), ground_truth/<defect>/<stem>_mask.png (non-zero = defect).
Images load as (H, W, 3) uint8 RGB, masks as (H, W) bool.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.errors import ModelError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"


class DatasetError(ModelError):
    """A dataset folder does not have the expected layout."""


@dataclass(frozen=True)
class TestItem:
    path: Path
    defect: str  # "good" for defect-free test images
    mask_path: Path | None  # None for good images

    @property
    def is_anomalous(self) -> bool:
        return self.defect != GOOD


@dataclass(frozen=True)
class MvtecDataset:
    root: Path
    normals: list[Path]  # train/good (+ validation/good)
    test: list[TestItem]

    @property
    def defects(self) -> list[str]:
        """Defect types present in the test split (without "good"), sorted."""
        return sorted({t.defect for t in self.test if t.is_anomalous})


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name; [] when the folder does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _mask_for(root: Path, defect: str, image: Path) -> Path:
    folder = root / "ground_truth" / defect
    for candidate in (folder / f"{image.stem}_mask.png", folder / f"{image.stem}.png"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"no ground-truth mask for {image} (looked for {folder / (image.stem + '_mask.png')})")


def load_mvtec(root: str | Path, include_validation: bool = True) -> MvtecDataset:
    """Index an MVTec-AD-style folder (paths only; nothing is decoded)."""
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DatasetError(f"{root} is not an MVTec-style folder (needs train/ and test/)")
    normals = list_images(root / "train" / GOOD)
    if include_validation:
        normals += list_images(root / "validation" / GOOD)
    test: list[TestItem] = []
    for defect_dir in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image in list_images(defect_dir):
            mask = None if defect == GOOD else _mask_for(root, defect, image)
            test.append(TestItem(image, defect, mask))
    if not normals:
        raise DatasetError(f"{root} has no defect-free images under train/good")
    logger.info("%s: %d normal images, %d test images", root, len(normals), len(test))
    return MvtecDataset(root, normals, test)


def limit_per_defect(items: Sequence[TestItem], n: int | None) -> list[TestItem]:
    """The first `n` items of each defect type (good included), order kept; all when n is None."""
    if n is None:
        return list(items)
    counts: dict[str, int] = {}
    kept = []
    for item in items:
        if counts.get(item.defect, 0) < n:
            counts[item.defect] = counts.get(item.defect, 0) + 1
            kept.append(item)
    return kept


def load_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_mask(item: TestItem, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool ground truth of a test item; all False for good images."""
    if item.mask_path is None:
        return np.zeros(shape, dtype=bool)
    with Image.open(item.mask_path) as im:
        mask = np.asarray(im.convert("L")) > 0
    if mask.shape != tuple(shape):
        raise DatasetError(f"mask {item.mask_path} is {mask.shape}, image is {tuple(shape)}")
    return mask
