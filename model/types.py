"""Shared value types. One coordinate convention everywhere: (x, y) in pixels of the original image,
x = column, y = row, origin at the top-left corner."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from model.errors import InputError

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels, x0 <= x1, y0 <= y1


def box_mask(box: Box, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool, True on the box's pixels (edges included, clipped to the image); InputError when the box
    is not (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 <= x1 and y0 <= y1):
        raise InputError(f"box {box} is not (x0, y0, x1, y1) with x0 <= x1, y0 <= y1")
    m = np.zeros(shape, bool)
    m[max(0, int(y0)):max(0, int(np.ceil(y1)) + 1), max(0, int(x0)):max(0, int(np.ceil(x1)) + 1)] = True
    return m


Progress = Callable[[float, str], None]  # a long job reports (fraction done in [0, 1], message)


@dataclass(frozen=True)
class Click:
    x: float
    y: float
    positive: bool = True


@dataclass
class ClickResult:
    prob: np.ndarray  # (H, W) float32 in [0, 1], image resolution
    mask: np.ndarray  # (H, W) bool, image resolution
    score: float  # confidence of the mask in [0, 1]


@dataclass
class AnomalyResult:
    anomaly_map: np.ndarray  # (H, W) float32, higher = more anomalous, image resolution
    score: float  # image anomaly score
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # label -> (H, W) bool; "" = any defect
    label_scores: dict[str, float] = field(default_factory=dict)


class ImageState(Protocol):
    """Everything computed once per image by `set_image`; immutable afterwards, safe to share across threads.
    `image` is the (H, W, 3) RGB image it was computed from (the boundary refinement reads its edges), None
    when the state does not keep it."""

    @property
    def nbytes(self) -> int: ...

    @property
    def image(self) -> np.ndarray | None: ...


class ReferenceSet(Protocol):
    """What the service reads of a reference bank (model.engine.references.ReferenceBank implements it)."""

    @property
    def key(self) -> str: ...  # content key: banks of the same images under the same engine share it

    @property
    def source_keys(self) -> Sequence[str]: ...  # one per source image (augmented views not counted)

    @property
    def nbytes(self) -> int: ...


class EngineConfig(Protocol):
    @property
    def augment_below(self) -> int: ...  # banks of fewer source images add augmented views of them


class Engine(Protocol):
    """The per-image engine the service builds banks with and hands to predictors
    (model.engine.residuals.ResidualEngine implements it)."""

    @property
    def cfg(self) -> EngineConfig: ...

    def config_hash(self) -> str: ...

    def cached_bank(self, images: Iterable[Any]) -> ReferenceSet | None: ...  # from the disk cache, else None

    def build_bank(self, images: Iterable[Any], progress: Any = None, augment: bool | None = None,
                   save: bool = True) -> ReferenceSet: ...

    def extend(self, bank: Any, images: Iterable[Any], progress: Any = None, save: bool = True) -> ReferenceSet:
        ...  # the bank with more source images (only those are read)

    def compute(self, image: np.ndarray, bank: Any) -> Residuals: ...  # one image against a bank


class Residuals(ImageState, Protocol):
    """What the engine computes per image (model.engine.residuals.ResidualState implements it)."""

    @property
    def residual(self) -> Any: ...  # (C, h, w) torch tensor: matched reference - query

    @property
    def features(self) -> Any: ...  # (C, h, w) torch tensor: the query's features in bank space

    @property
    def anomaly_map(self) -> np.ndarray: ...  # (H, W) float32


class Predictor(Protocol):
    """One predictor per loaded model. `set_image` does the expensive work once and returns the state
    (never stored on self); `predict` is cheap and only runs the click-conditioned part."""

    name: str
    version: str

    def set_image(self, image: np.ndarray) -> ImageState:  # image: (H, W, 3) uint8 RGB
        ...

    def predict(
        self,
        state: ImageState,
        clicks: list[Click],
        box: Box | None = None,
        prompt: str = "",
        previous_mask: np.ndarray | None = None,
    ) -> ClickResult: ...

    def detect(self, state: ImageState, labels: list[str] | None = None) -> AnomalyResult: ...
