"""Residual engine on tiny synthetic textures: the map peaks on a painted defect, position-constrained
matching beats unconstrained matching on a displaced copy, the bank cache is reused and extended."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from model.engine.features import BackboneConfig
from model.engine.residuals import ResidualConfig, ResidualEngine, augment_views, kcenter
from model.errors import ConfigError
from tests.conftest import structured, texture

BB = BackboneConfig(input_size=128, device="cpu")


@pytest.fixture(scope="module")
def engine():
    return ResidualEngine(BB, ResidualConfig())


@pytest.fixture(scope="module")
def bank(engine, normal_textures):
    return engine.build_bank(normal_textures)


def peak(amap):
    return np.unravel_index(int(np.argmax(amap)), amap.shape)


def test_map_peaks_on_defect(engine, bank, defect_texture):
    img, mask = defect_texture
    st = engine.compute(img, bank)
    assert st.anomaly_map.shape == img.shape[:2] and st.anomaly_map.dtype == np.float32
    assert mask[peak(st.anomaly_map)]
    assert st.anomaly_map[mask].mean() > np.percentile(st.anomaly_map[~mask], 99)
    assert st.residual.shape == st.features.shape == (bank.features.shape[1], 12, 16)
    assert np.allclose(st.grid_map, st.residual.norm(dim=0).numpy(), atol=1e-5)
    assert st.score == pytest.approx(float(st.anomaly_map.max()))
    assert len(st.ref_indices) == min(ResidualConfig().k_refs, len(bank)) and st.nbytes > 0


def test_defective_image_scores_above_normal(engine, bank, defect_texture):
    normal = texture(shift=(2, 2), seed=123)
    assert engine.compute(defect_texture[0], bank).score > 1.5 * engine.compute(normal, bank).score


def test_few_references_are_augmented(engine, normal_textures, defect_texture):
    one = engine.build_bank(normal_textures[:1])
    assert len(one) == len(augment_views(normal_textures[0])) == 9
    img, mask = defect_texture
    assert mask[peak(engine.compute(img, one).anomaly_map)]


def test_empty_bank_falls_back_to_self_similarity(engine, defect_texture):
    empty = engine.build_bank([])
    assert len(empty) == 0
    img, mask = defect_texture
    st = engine.compute(img, empty)
    assert st.ref_indices == ()
    assert mask[peak(st.anomaly_map)]


def _displaced_copy():
    q = structured(seed=50)
    out = q.copy()
    out[38:58, 54:74] = q[6:26, 6:26]  # the mark at (16, 16) copied to the empty place (48, 64)
    m = np.zeros(q.shape[:2], bool)
    m[40:56, 56:72] = True
    return out, m


@pytest.mark.parametrize("soft", [False, True])
def test_position_constraint_beats_unconstrained_on_displaced_copy(soft):
    refs = [structured(seed=i, jitter=j) for i, j in enumerate([(0, 0), (1, 1), (-1, 0), (0, -1), (1, -1)])]
    img, m = _displaced_copy()
    bb = BackboneConfig(input_size=256, device="cpu")
    free = ResidualEngine(bb, ResidualConfig(window_radius=1000))
    bank = free.build_bank(refs)
    cfg = ResidualConfig(match="softpos", pos_weight=2.0) if soft else ResidualConfig(window_radius=1)
    constrained = ResidualEngine(bb, cfg)
    constrained._extractor = free.extractor
    a_free = free.compute(img, bank).anomaly_map
    a_pos = constrained.compute(img, bank).anomaly_map
    # normalise by each map's own background so the comparison is about contrast, not scale
    c_free = a_free[m].mean() / np.median(a_free[~m])
    c_pos = a_pos[m].mean() / np.median(a_pos[~m])
    assert c_pos > 1.3 * c_free


def test_bank_cache_is_reused(tmp_path, normal_textures, monkeypatch):
    first = ResidualEngine(BB, ResidualConfig(), cache_dir=tmp_path)
    bank = first.build_bank(normal_textures)
    assert len(list(tmp_path.glob("bank-*.pt"))) == 1
    second = ResidualEngine(BB, ResidualConfig(), cache_dir=tmp_path)
    calls = []
    monkeypatch.setattr(type(second.extractor), "extract", lambda self, ims: calls.append(len(ims)))
    again = second.build_bank(list(reversed(normal_textures)))  # same content, other order: same key
    assert calls == [] and again.key == bank.key
    assert torch.equal(again.features, bank.features)


def test_bank_key_tracks_content_and_config(tmp_path, normal_textures):
    eng = ResidualEngine(BB, ResidualConfig(), cache_dir=tmp_path)
    a = eng.build_bank(normal_textures[:3])
    b = eng.build_bank(normal_textures[1:4])
    c = ResidualEngine(BB, ResidualConfig(pca_dim=16), cache_dir=tmp_path).build_bank(normal_textures[:3])
    assert len({a.key, b.key, c.key}) == 3
    assert c.features.shape[1] == 16


def test_extend_adds_only_new_images(tmp_path, normal_textures, defect_texture):
    cfg = ResidualConfig(augment_below=0, pca_dim=32)
    eng = ResidualEngine(BB, cfg, cache_dir=tmp_path)
    base = eng.build_bank(normal_textures[:4])
    seen = []
    real = type(eng.extractor).extract
    eng.extractor.extract = lambda ims: seen.append(len(ims)) or real(eng.extractor, ims)
    grown = eng.extend(base, normal_textures[2:])  # two known, two new
    assert seen == [1, 1] and len(grown) == 6 and len(grown.source_keys) == 6
    assert grown.key != base.key and torch.equal(grown.components, base.components)
    assert torch.equal(grown.features[:4], base.features)
    assert eng.extend(grown, normal_textures) is grown
    img, mask = defect_texture
    assert mask[peak(eng.compute(img, grown).anomaly_map)]


def test_memory_bound_thins_views(normal_textures):
    eng = ResidualEngine(BB, ResidualConfig(max_refs=4, augment_below=0))
    bank = eng.build_bank(normal_textures)
    assert len(bank) == 4 and len(bank.source_keys) == 6


def test_kcenter_picks_spread_points():
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1], [5.0]])
    assert kcenter(x, 3) == [0, 2, 4] or kcenter(x, 3) == [0, 3, 4]


def test_compute_is_thread_safe(engine, bank, defect_texture):
    img = defect_texture[0]
    ref = engine.compute(img, bank).anomaly_map
    out = {}

    def run(i):
        out[i] = engine.compute(img, bank).anomaly_map

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(np.allclose(out[i], ref, atol=1e-4) for i in range(3))


def test_config_validation_and_version_hash():
    with pytest.raises(ConfigError):
        ResidualConfig(match="nearest")
    a = ResidualEngine(BB, ResidualConfig()).config_hash()
    assert a == ResidualEngine(BB, ResidualConfig()).config_hash() and len(a) == 8
    assert a != ResidualEngine(BB, ResidualConfig(k_refs=3)).config_hash()


def test_extend_from_empty_bank_fits_projection_without_mutating_it(normal_textures):
    eng = ResidualEngine(BB, ResidualConfig(pca_dim=16, augment_below=0))
    empty = eng.build_bank([])
    grown = eng.extend(empty, normal_textures[:3])
    assert len(empty) == 0 and empty.components is None
    assert len(grown) == 3 and grown.features.shape[1] == 16 and grown.components.shape[1] == 16


def test_an_unreadable_reference_is_skipped_and_extend_keeps_the_build_key(tmp_path, normal_textures, caplog):
    """A file that passes a header check but does not decode is skipped with a WARNING naming the file only;
    a bank grown by extend() has the key (and cache file) of the bank built from all inputs at once."""
    import logging

    from PIL import Image

    folder = tmp_path / "private" / "refs"
    folder.mkdir(parents=True)
    paths = []
    for i, img in enumerate(normal_textures[:4]):
        Image.fromarray(img).save(folder / f"r{i}.png")
        paths.append(folder / f"r{i}.png")
    whole = (folder / "r0.png").read_bytes()
    (folder / "broken.png").write_bytes(whole[: len(whole) // 3])  # header fine, data cut
    paths.insert(2, folder / "broken.png")
    cfg = ResidualConfig(augment_below=0)
    eng = ResidualEngine(BB, cfg, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        full = eng.build_bank(paths, save=False)
    assert len(full.source_keys) == 4 and len(full.meta["skipped"]) == 1
    assert "broken.png" in caplog.text and "private" not in caplog.text
    assert eng.cached_bank(paths) is None  # save=False: nothing written
    grown = eng.extend(eng.build_bank(paths[:2], augment=False, save=False), paths[2:])
    assert grown.key == full.key and len(grown.source_keys) == 4
    assert eng.cached_bank(paths).key == full.key  # the grown bank is the cache entry of the whole set
