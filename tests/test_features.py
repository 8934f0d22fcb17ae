"""Feature extractors: shapes, levels, cache keys, lazy open_clip, errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from model.engine.features import BackboneConfig, build_extractor, input_hw
from model.errors import ConfigError, InputError
from tests.conftest import texture

CFG = BackboneConfig(input_size=128, device="cpu")


@pytest.fixture(scope="module")
def lite0():
    return build_extractor(CFG)


def test_input_size_keeps_aspect_and_stride_multiple():
    assert input_hw(600, 800, 512, 32) == (384, 512)
    assert input_hw(800, 600, 512, 32) == (512, 384)
    h, w = input_hw(97, 301, 256, 32)
    assert w == 256 and h % 32 == 0 and h == 96


def test_lite0_three_levels_stride8_grid(lite0):
    imgs = [texture(seed=0), texture(seed=1)]  # 96 x 128 -> network input 96 x 128
    f = lite0.extract(imgs)
    assert f.shape == (2, 24 + 40 + 112, 96 // 8, 128 // 8)
    assert lite0.dim == 176 and lite0.stride == 8
    assert f.dtype == torch.float32 and torch.isfinite(f).all()
    assert not torch.allclose(f[0], f[1])  # different noise -> different features


def test_lite0_resizes_to_long_side(lite0):
    f = lite0.extract([texture(h=300, w=400)])
    assert f.shape[2:] == (96 // 8, 128 // 8)


def test_level_norm_balances_levels():
    ext = build_extractor(BackboneConfig(input_size=128, device="cpu", levels=(4, 10), level_norm=True))
    f = ext.extract([texture()])[0]
    rms_a = f[:40].pow(2).mean().sqrt()
    rms_b = f[40:].pow(2).mean().sqrt()
    assert 0.9 < float(rms_a / rms_b) < 1.1


def test_imagenet_weights_are_loaded(lite0):
    rand = build_extractor(BackboneConfig(input_size=128, device="cpu", pretrained=False))
    a, b = lite0.extract([texture()]), rand.extract([texture()])
    assert a.shape == b.shape and not torch.allclose(a, b)
    assert rand.cache_key() != lite0.cache_key()


def test_cache_key_tracks_config_not_device(lite0):
    again = build_extractor(CFG)
    assert again.cache_key() == lite0.cache_key()
    bigger = build_extractor(BackboneConfig(input_size=160, device="cpu"))
    assert bigger.cache_key() != lite0.cache_key()
    auto = build_extractor(BackboneConfig(input_size=128, device="auto"))
    assert auto.cache_key() == lite0.cache_key()


def test_mixed_sizes_and_bad_images_are_rejected(lite0):
    with pytest.raises(InputError):
        lite0.extract([texture(h=96), texture(h=64)])
    with pytest.raises(InputError):
        lite0.extract([np.zeros((32, 32), np.uint8)])
    with pytest.raises(InputError):
        lite0.extract([])


def test_unknown_backbone_and_bad_levels():
    with pytest.raises(ConfigError):
        build_extractor(BackboneConfig(name="resnet9000"))
    with pytest.raises(ConfigError):
        build_extractor(BackboneConfig(levels=(4, 99), device="cpu"))


def test_open_clip_is_imported_lazily():
    code = ("import sys, model.engine.features as f, model.engine.residuals, model.interactive.clickmode; "
            "f.build_extractor(f.BackboneConfig(input_size=64, device='cpu')); "
            "print('open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


@pytest.mark.slow
def test_open_clip_random_init_patch_tokens():
    cfg = BackboneConfig(name="open_clip", clip_model="ViT-B-32", clip_layer=3, input_size=96, device="cpu")
    ext = build_extractor(cfg)
    f = ext.extract([texture(h=72, w=96), texture(h=72, w=96, seed=3)])
    # 96 px long side, patch 32: 3 x 2 token grid; the position embedding (7 x 7 at 224 px) is interpolated
    assert ext.stride == 32 and f.shape == (2, 768, 2, 3)
    assert torch.isfinite(f).all() and not torch.allclose(f[0], f[1])
