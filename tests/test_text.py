"""Text encoders: MiniLM from the wheel (offline), open_clip text tower (random init), cache, templates."""
from __future__ import annotations

import pytest
import torch

from model.errors import ModelError
from model.modeling.text import CachedTextEncoder, TextConfig, build_text_encoder, prompt_texts


class CountingEncoder:
    name, dim = "counting", 4

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        rows = [[len(t), 1.0, 0.0, t.count("a")] for t in texts]
        return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)


def test_prompt_texts_from_label_text_and_object():
    p = prompt_texts("Oil_Stain", "dark spot near the rim", "tire")
    assert "a oil stain on a tire" in p and p[-1] == "dark spot near the rim"
    assert prompt_texts("", "") == []
    assert prompt_texts("", "only text") == ["only text"]


def test_cache_encodes_each_text_once():
    inner = CountingEncoder()
    enc = CachedTextEncoder(inner)
    a = enc.encode(["x", "yy"])
    b = enc.encode(["yy", "x", "zzz"])
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    assert inner.calls == [["x", "yy"], ["zzz"]]
    v = enc.prompt_vector("scratch", "", "tire")
    assert v.shape == (4,) and abs(float(v.norm()) - 1) < 1e-5
    assert enc.prompt_vector("", "") is None


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ModelError):
        build_text_encoder(TextConfig(kind="bert"))


@pytest.mark.slow
def test_minilm_offline_separates_defect_words():
    enc = CachedTextEncoder(build_text_encoder(TextConfig(kind="minilm")))
    assert enc.dim == 384
    s, s2, h = (enc.prompt_vector(w, "", "tire") for w in ("scratch", "scrape", "hole"))
    assert s.shape == (384,)
    assert float(s @ s2) > float(s @ h)  # related words are closer than unrelated ones


@pytest.mark.slow
def test_open_clip_random_init_encodes():
    enc = build_text_encoder(TextConfig(kind="open_clip", open_clip_model="RN50"))
    out = enc.encode(["a cut on a tire", "a hole"])
    assert out.shape == (2, enc.dim) and torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-4)
    with pytest.raises(ModelError):
        build_text_encoder(TextConfig(kind="open_clip", checkpoint="/nonexistent/file.pt"))
