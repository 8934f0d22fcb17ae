"""ADClick-Seg: block targets, training from masks and boxes, detector, ADClick weight init, publishing."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.modeling.adclick import AdClickConfig, AdClickNet
from model.modeling.adclick_seg import AdClickSeg, SegConfig, SegEnsemble, build_seg
from model.seg.data import (
    ANY,
    IGNORE,
    UNLABELLED,
    BlockRule,
    SegExample,
    block_labels,
    boxes_from_mask,
    build_targets,
)
from model.seg.fit import FitConfig, fit_seg
from model.seg.predict import SegDetector, evaluate, make_checkpoint
from model.seg.train import SegTrainConfig, init_from_adclick, train_version
from model.seg.versions import VersionStore
from tests.seg_synth import C, make_set

torch.set_num_threads(1)  # the CI machine is shared: one thread avoids oversubscription stalls
SMALL = {"dim": 32, "depth": 1, "heads": 2, "window": 8, "stride": 4, "train_stride": 8}
PROMPTS = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)


def _model(prompt_dim: int = 16) -> AdClickSeg:
    torch.manual_seed(0)
    return AdClickSeg(SegConfig(in_channels=C, prompt_dim=prompt_dim, **SMALL))


# ---- targets --------------------------------------------------------------------------------------------
def test_block_labels_fraction_and_ignore_band() -> None:
    mask = np.zeros((16, 24), bool)  # 2 x 3 blocks of 8 px
    mask[0:8, 0:8] = True  # block (0,0) full
    mask[0:2, 8:10] = True  # 4 of 64 px of block (0,1), same component as (0,0): ignore band
    mask[12:14, 20:22] = True  # lone component, 4/64 of block (1,2): kept as its best block
    got = block_labels(mask, (2, 3), BlockRule(pos_fraction=0.25, min_fraction=0.02))
    assert got.tolist() == [[1.0, IGNORE, 0.0], [0.0, 0.0, 1.0]]


def test_targets_for_boxes_verdicts_and_labels() -> None:
    res = torch.zeros(C, 4, 4)
    ex = SegExample(res, (32, 32), boxes=[("dent", (8.0, 8.0, 16.0, 16.0))])
    t = build_targets(ex, ["scratch", "dent"])
    inside = (slice(1, 2), slice(1, 2))
    assert t.target[0][inside].item() == UNLABELLED and t.bags[0][inside].item() == 1
    assert t.target[2][inside].item() == UNLABELLED  # the box's own label map
    assert t.target[1][inside].item() == IGNORE  # another label's map: unknown there
    assert (t.target[0] == 0).sum() == 15  # outside the box: normal
    ok = build_targets(SegExample(res, (32, 32), verdict=False), ["scratch"])
    assert (ok.target == 0).all()
    bad = build_targets(SegExample(res, (32, 32), verdict=True), ["scratch"])
    assert (bad.target[0] == UNLABELLED).all() and (bad.bags[0] == 1).all() and (bad.target[1] == IGNORE).all()
    assert not SegExample(res, (32, 32)).usable


def test_boxes_from_mask_one_per_component() -> None:
    mask = np.zeros((50, 60), bool)
    mask[5:10, 5:15] = True
    mask[30:40, 40:45] = True
    assert sorted(boxes_from_mask(mask, pad=0)) == [(5.0, 5.0, 15.0, 10.0), (40.0, 30.0, 45.0, 40.0)]


# ---- training ---------------------------------------------------------------------------------------------
def _ap(model: AdClickSeg, test: list[SegExample]) -> float:
    return evaluate(model, test, PROMPTS[:2])["pixel_ap"]


def test_training_from_masks_lowers_loss_and_beats_unsupervised() -> None:
    train, test = make_set(0, 10, 4), make_set(1, 8, 4)
    model = _model()
    model.fit_normalisation([e.residual for e in train])
    model.eval()
    before = _ap(model, test)  # untrained = the unsupervised residual-norm ranking
    history = fit_seg(model, train, ["scratch"], PROMPTS[:2], FitConfig(steps=150, steps_per_image=0, crop=16, log_every=25))
    after = _ap(model, test)
    assert history[-1] < 0.85 * history[0]
    assert after > before + 0.3, (before, after)


def test_training_from_boxes_only() -> None:
    train, test = make_set(0, 10, 4), make_set(1, 8, 4)
    boxes = [dataclasses.replace(e, masks={}, boxes=[("scratch", b) for m in e.masks.values()
                                                     for b in boxes_from_mask(m)]) for e in train]
    assert all(e.boxes for e in boxes[:10]) and not any(e.masks for e in boxes)
    model = _model()
    model.fit_normalisation([e.residual for e in train])
    model.eval()
    before = _ap(model, test)
    fit_seg(model, boxes, ["scratch"], PROMPTS[:2], FitConfig(steps=150, steps_per_image=0, crop=16, log_every=25))
    assert _ap(model, test) > before + 0.1


def test_prompt_selects_the_defect_type() -> None:
    labels = ["scratch", "dent"]  # opposite channel signatures
    train = make_set(0, 12, 2, labels=tuple(labels))
    model = _model()
    fit_seg(model, train, labels, PROMPTS, FitConfig(steps=150, steps_per_image=0, crop=16, log_every=50))
    ckpt = make_checkpoint(model, labels, PROMPTS, {ANY: 0.5, "scratch": 0.5, "dent": 0.5}, {})
    det = SegDetector(ckpt, "adclick-seg-v1")
    test = make_set(5, 6, 0, labels=tuple(labels))
    hits = 0
    for ex in test:
        label = next(iter(ex.masks))
        other = "dent" if label == "scratch" else "scratch"
        res = det.detect(ex, labels, image_size=ex.image_size)
        m = ex.masks[label]
        hits += res.masks[label][m].sum() > res.masks[other][m].sum()
    assert hits >= 5


# ---- detector and checkpoints ----------------------------------------------------------------------------
def test_detector_masks_scores_and_unknown_labels() -> None:
    ex = make_set(3, 1, 0)[0]
    model = _model()
    model.fit_normalisation([ex.residual])
    ckpt = make_checkpoint(model, ["scratch"], PROMPTS[:2], {ANY: 0.2, "scratch": 0.2}, {})
    det = SegDetector(ckpt, "adclick-seg-v4")
    res = det.detect(ex, ["scratch", "crack"], image_size=ex.image_size)
    assert res.anomaly_map.shape == ex.image_size and res.anomaly_map.dtype == np.float32
    assert set(res.masks) == {ANY, "scratch"}  # a label the version never saw gets no mask
    assert np.array_equal(res.masks["scratch"], res.masks[ANY])
    assert res.score == pytest.approx(float(res.anomaly_map.max()), abs=0.02)
    with pytest.raises(ValueError):
        SegDetector({**ckpt, "arch": "other"}, "x")


def test_only_learned_labels_name_regions(tmp_path) -> None:
    """Issue 12 item 4: batch masks carried the first label ("Scratch") on defects annotated "Dent". A version
    trained on "dent" masks only must label its regions "dent", also with "scratch" listed first in the config."""
    labels = ["scratch", "dent"]
    examples = make_set(0, 8, 2, labels=("dent",))
    store = VersionStore(tmp_path, keep=1)
    cfg = SegTrainConfig(model=SMALL, fit=FitConfig(steps=40, steps_per_image=0, crop=16, log_every=20),
                         holdout=0.0, init_weights=str(tmp_path / "none"))
    info, figures = train_version(examples, labels, PROMPTS, store, cfg)
    assert figures["learned_labels"] == ["dent"]
    det = SegDetector(store.load()[0], info.name)
    assert det.learned == ["dent"]
    ex = make_set(7, 1, 0, labels=("dent",))[0]
    res = det.detect(ex, labels, image_size=ex.image_size)
    assert "scratch" not in res.masks and res.masks["dent"].any()
    # a checkpoint from before learned_labels was recorded: every label counts as learned
    legacy = {k: v for k, v in store.load()[0].items() if k != "learned_labels"}
    assert SegDetector(legacy, info.name).learned == labels


def test_init_from_adclick_copies_matching_blocks(tmp_path) -> None:
    net = AdClickNet(AdClickConfig(res_channels=8, block_dim=32, heads=2, window=8, depth=2, text_dim=16))
    path = tmp_path / "adclick.pt"
    torch.save({"arch": "adclick-v1", "config": {}, "state_dict": net.state_dict(), "meta": {}}, path)
    seg = _model()
    copied = init_from_adclick(seg, path)
    assert copied == len([k for k in seg.state_dict() if k.startswith(("blocks.0.", "pos."))])
    assert torch.equal(seg.blocks[0].qkv.weight, net.blocks[0].qkv.weight)
    assert torch.equal(seg.pos.weight, net.pos.weight)
    assert init_from_adclick(seg, tmp_path / "missing.pt") == 0
    assert init_from_adclick(seg, "none") == 0
    (tmp_path / "damaged.pt").write_bytes(b"not a checkpoint")  # a damaged file: from scratch, no crash
    assert init_from_adclick(_model(), tmp_path / "damaged.pt") == 0


def test_train_version_publishes_checkpoint_metrics_and_report(tmp_path) -> None:
    examples = make_set(0, 8, 4)
    store = VersionStore(tmp_path, keep=2)
    cfg = SegTrainConfig(model=SMALL, fit=FitConfig(steps=20, steps_per_image=0, crop=16, log_every=10), init_weights=str(tmp_path / "none"))
    seen = []
    info, figures = train_version(examples, ["scratch"], PROMPTS[:2], store, cfg, progress=lambda f, m: seen.append(f))
    assert info.name == "adclick-seg-v1" and (info.path / "report.png").stat().st_size > 1000
    assert figures["n_heldout"] == 3 and figures["evaluated_on"] == "heldout"  # 20% of 8 defective + 4 OK
    assert {"pixel_ap", "au_pro", "pixel_auroc", "image_auroc"} <= set(info.meta["metrics"])
    assert seen == sorted(seen) and seen[-1] >= 0.9
    ckpt, _ = store.load()
    det = SegDetector(ckpt, info.name)
    assert set(det.thresholds) == {ANY, "scratch"}


def test_ensemble_members_train_with_their_own_seeds_and_average(tmp_path) -> None:
    examples = make_set(0, 6, 2)
    store = VersionStore(tmp_path, keep=1)
    fit = FitConfig(steps=10, steps_per_image=0, crop=16, log_every=5)
    cfg = SegTrainConfig(model={**SMALL, "members": 2}, fit=fit, holdout=0.0,
                         init_weights=str(tmp_path / "none"))
    seen = []
    info, figures = train_version(examples, ["scratch"], PROMPTS[:2], store, cfg,
                                  progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and len(seen) >= 4  # progress runs through both members once
    det = SegDetector(store.load()[0], info.name)
    assert isinstance(det.model, SegEnsemble) and len(det.model.members) == 2
    a, b = det.model.members
    assert not torch.equal(a.embed[0].weight, b.embed[0].weight)  # separately initialised and trained
    x = examples[0].residual.float()[None]
    with torch.no_grad():
        mean = (a(x, PROMPTS[:2]) + b(x, PROMPTS[:2])) / 2
        assert torch.allclose(det.model(x, PROMPTS[:2]), mean, atol=1e-6)
    assert figures["metrics"]["pixel_ap"] > 0
    single = build_seg(SegConfig(in_channels=C, prompt_dim=16, **{**SMALL, "members": 1}))
    assert type(single) is AdClickSeg  # one member keeps the plain single-model checkpoint layout


def _with_feature_signature(examples: list[SegExample], seed: int) -> list[SegExample]:
    """The same images plus 4 feature channels; defect blocks (from the masks) look different there. Their
    residuals get nuisance-level noise only, so a defect is told from a nuisance blob by its features."""
    rng = np.random.default_rng(seed)
    out = []
    for ex in examples:
        h, w = ex.residual.shape[-2:]
        feats = rng.normal(0, 1, (4, h, w)).astype(np.float32)
        if ex.masks:
            blocks = F.adaptive_avg_pool2d(torch.from_numpy(ex.union_mask()[None].astype(np.float32)), (h, w))[0]
            feats[:2] += 3.0 * (blocks.numpy() > 0.5)
        out.append(dataclasses.replace(ex, features=torch.from_numpy(feats)))
    return out


def test_feature_tokens_are_a_second_input_that_the_fit_uses() -> None:
    train = _with_feature_signature(make_set(3, 10, 4), 0)
    test = _with_feature_signature(make_set(4, 10, 4), 1)
    fit = FitConfig(steps=150, steps_per_image=0, crop=16, log_every=50)
    with_f = AdClickSeg(SegConfig(in_channels=C, prompt_dim=16, feat_channels=4, **SMALL))
    fit_seg(with_f, train, ["scratch"], PROMPTS[:2], fit)
    without = _model()
    plain = [dataclasses.replace(e, features=None) for e in train]
    fit_seg(without, plain, ["scratch"], PROMPTS[:2], fit)
    ap_with = _ap(with_f, test)
    ap_without = _ap(without, [dataclasses.replace(e, features=None) for e in test])
    assert ap_with > ap_without + 0.1, (ap_with, ap_without)
    with pytest.raises(ValueError, match="4 feature channels"):
        with_f(test[0].residual.float()[None], PROMPTS[:2])


def test_versions_record_whether_they_use_features(tmp_path) -> None:
    examples = _with_feature_signature(make_set(0, 6, 2), 0)
    fit = FitConfig(steps=10, steps_per_image=0, crop=16, log_every=5)
    for use in (True, False):
        store = VersionStore(tmp_path / str(use), keep=1)
        cfg = SegTrainConfig(model={**SMALL, "members": 1}, fit=fit, holdout=0.0, init_weights="none",
                             use_features=use)
        info, _ = train_version(examples, ["scratch"], PROMPTS[:2], store, cfg)
        ckpt = store.load()[0]
        assert ckpt["config"]["feat_channels"] == (4 if use else 0)
        det = SegDetector(ckpt, info.name)  # loads strictly
        assert det.detect(examples[0], image_size=examples[0].image_size).anomaly_map.shape == (192, 256)
        if use:
            with pytest.raises(ValueError, match="feature tokens"):  # a state without features: a clear error
                det.detect(dataclasses.replace(examples[0], features=None), image_size=examples[0].image_size)
        else:  # a residual-only checkpoint has no feature buffers (older versions keep loading strictly)
            assert not any(k.endswith(("feat_mean", "feat_std")) for k in ckpt["state_dict"])


def test_a_training_run_is_repeatable_whatever_the_global_random_state(tmp_path) -> None:
    """The initial weights follow SegTrainConfig.seed (not torch's global state), so the same labels give the
    same version: the learning-curve benchmark can compare two trees figure for figure."""
    examples = make_set(3, 6, 2)
    cfg = SegTrainConfig(model=SMALL, fit=FitConfig(steps=6, steps_per_image=0, crop=16, log_every=3),
                         holdout=0.0, init_weights=str(tmp_path / "none"))
    weights = []
    for run in range(2):
        torch.manual_seed(1000 + run)  # whatever ran before in the process
        store = VersionStore(tmp_path / f"run{run}")
        train_version(examples, ["scratch"], PROMPTS[:2], store, cfg)
        weights.append(store.load()[0]["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
