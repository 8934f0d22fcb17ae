"""Retrieval, PCA, positional embedding and position-constrained matching against brute force."""
from __future__ import annotations

import pytest
import torch

from model.engine.references import (
    ReferenceBank,
    descriptors,
    fit_pca,
    match,
    retrieve,
    sincos_embedding,
    with_position,
)


def brute_force(q, refs, radius, exclude=-1):
    c, h, w = q.shape
    cand = refs.permute(0, 2, 3, 1).reshape(-1, c)
    d = ((q.permute(1, 2, 0).reshape(-1, 1, c) - cand[None]) ** 2).sum(-1)  # (hw, K*hw)
    ky = torch.arange(cand.shape[0]) // w % h
    kx = torch.arange(cand.shape[0]) % w
    qy, qx = torch.arange(h * w) // w, torch.arange(h * w) % w
    dy, dx = (qy[:, None] - ky[None]).abs(), (qx[:, None] - kx[None]).abs()
    if radius is not None:
        d[(dy > radius) | (dx > radius)] = float("inf")
    if exclude >= 0:
        d[(dy <= exclude) & (dx <= exclude)] = float("inf")
    v, i = d.min(1)
    return v.reshape(h, w), i.reshape(h, w)


@pytest.mark.parametrize("radius", [0, 1, 3, 6, None])
@pytest.mark.parametrize("shape", [(13, 11), (8, 8), (5, 17)])
def test_match_equals_brute_force(radius, shape):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(12, *shape, generator=g)
    refs = torch.randn(3, 12, *shape, generator=g)
    d, i = match(q, refs, radius)
    d_ref, i_ref = brute_force(q, refs, radius)
    assert torch.allclose(d, d_ref, atol=1e-3)
    assert torch.equal(i, i_ref)


@pytest.mark.parametrize("radius", [3, None])
def test_self_matching_excludes_own_neighbourhood(radius):
    q = torch.randn(8, 10, 9, generator=torch.Generator().manual_seed(2))
    d, i = match(q, q[None], radius, exclude=1)
    d_ref, i_ref = brute_force(q, q[None], radius, exclude=1)
    assert torch.allclose(d, d_ref, atol=1e-3) and torch.equal(i, i_ref)
    assert (d > 0).all()


def test_window_finds_shifted_reference_exactly():
    q = torch.randn(6, 12, 12, generator=torch.Generator().manual_seed(3))
    ref = torch.roll(q, shifts=(2, -1), dims=(1, 2))
    d, _ = match(q, ref[None], radius=2)
    assert d[2:-2, 2:-2].max() < 1e-4  # every interior patch has its exact copy within the window
    d_small, _ = match(q, ref[None], radius=1)
    assert d_small[2:-2, 2:-2].min() > 1e-2  # ... but not within a radius-1 window


def test_retrieve_is_robust_to_a_local_outlier():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1, 8, 16, 16, generator=g)
    near = base + 0.05 * torch.randn(1, 8, 16, 16, generator=g)
    far = base + 0.5 * torch.randn(1, 8, 16, 16, generator=g)
    query = base.clone()
    query[..., :4, :4] += 20.0  # a big "defect" in one descriptor cell
    bank = descriptors(torch.cat([far, near, far * 2]), cell=4)
    top = retrieve(descriptors(query, 4)[0], bank, k=2)
    assert top.tolist()[0] == 1


def test_pca_orthonormal_and_captures_main_axes():
    g = torch.Generator().manual_seed(5)
    lat = torch.randn(4, 3, 20, 20, generator=g) * torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    mix = torch.linalg.qr(torch.randn(10, 10, generator=g))[0][:, :3]  # 3 orthonormal axes in 10-d
    feats = torch.einsum("nchw,dc->ndhw", lat, mix) + 0.01 * torch.randn(4, 10, 20, 20, generator=g)
    _, comps = fit_pca(feats, 3)
    assert comps.shape == (10, 3)
    assert torch.allclose(comps.T @ comps, torch.eye(3), atol=1e-4)
    assert torch.allclose((comps.T @ mix).abs().sum(0), torch.ones(3), atol=0.05)


def test_sincos_unit_norm_and_position_channels():
    e = sincos_embedding(6, 9)
    assert e.shape == (32, 6, 9)
    assert torch.allclose(e.pow(2).sum(0), torch.ones(6, 9), atol=1e-5)
    f = torch.zeros(2, 4, 6, 9)
    out = with_position(f, 0.5, feat_rms=2.0)
    assert out.shape == (2, 36, 6, 9)
    assert torch.allclose(out[:, 4:].pow(2).sum(1), torch.ones(2, 6, 9))  # (0.5 * 2)^2
    assert with_position(f, 0.0, 2.0) is f


def test_bank_payload_round_trip_and_projection():
    feats = torch.randn(2, 6, 4, 5).half()
    bank = ReferenceBank(feats, descriptors(feats.float(), 2), ["a", "a"], ["a"], torch.zeros(6),
                         torch.eye(6)[:, :3], 1.5, "k", {"n": 1})
    again = ReferenceBank.from_payload(bank.to_payload())
    assert torch.equal(again.features, feats) and again.key == "k" and len(again) == 2
    raw = torch.randn(1, 6, 4, 5)
    assert torch.allclose(again.project(raw), raw[:, :3])
    assert bank.nbytes > feats.numel() * 2


def test_retrieve_never_returns_skipped_views():
    g = torch.Generator().manual_seed(6)
    bank = torch.randn(6, 4, 3, 3, generator=g)
    skip = torch.tensor([True, False, True, False, False, False])
    top = retrieve(bank[0], bank, k=10, skip=skip)  # view 0 (the query itself) would rank first
    assert sorted(top.tolist()) == [1, 3, 4, 5]
