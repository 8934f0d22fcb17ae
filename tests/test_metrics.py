import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from model import metrics


def staircase():
    """3x4 image: region A = 1 px, region B = 3 px (not touching A), 8 normal pixels."""
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 0] = True
    mask[2, 1:4] = True
    scores = np.full((3, 4), 0.1, dtype=np.float32)
    scores[0, 0] = 0.9
    scores[2, 1], scores[2, 2], scores[2, 3] = 0.8, 0.6, 0.2
    scores[0, 2], scores[1, 3] = 0.7, 0.5
    return scores, mask


def test_staircase_pro_curve_points_are_exact():
    scores, mask = staircase()
    fpr, pro = metrics.pro_curve(metrics.curves(metrics.prepare(scores, mask)))
    # two points per defect score (0.9, 0.8, 0.6, 0.2): before and after that score's pixels count
    expected = [(0, 0), (0, 0), (0, 1 / 2), (0, 1 / 2), (0, 2 / 3), (1 / 8, 2 / 3), (1 / 8, 5 / 6),
                (1 / 4, 5 / 6), (1 / 4, 1), (1, 1)]
    np.testing.assert_allclose(np.c_[fpr, pro], np.array(expected, dtype=float))


def test_staircase_au_pro_hand_computed():
    scores, mask = staircase()
    # area up to 0.3: 2/3*1/8 + 5/6*1/8 + 1*(0.3-0.25) = 0.2375 -> / 0.3
    assert metrics.au_pro(scores, mask) == pytest.approx(19 / 24)
    # limit 0.2 falls inside the 5/6 step: 1/12 + 5/6*0.075
    assert metrics.au_pro(scores, mask, fpr_limit=0.2) == pytest.approx((1 / 12 + 0.0625) / 0.2)


def test_au_pro_perfect_and_inverted():
    _, mask = staircase()
    assert metrics.au_pro(mask.astype(np.float32), mask) == pytest.approx(1.0)
    assert metrics.au_pro((~mask).astype(np.float32), mask) == pytest.approx(0.0)


def test_regions_are_eight_connected_and_per_image():
    diag = np.zeros((4, 4), dtype=bool)
    diag[0, 0] = diag[1, 1] = True  # diagonal neighbours: one region of 2 px
    image = metrics.ImagePixels.from_map(np.zeros((4, 4)), diag)
    assert image.n_regions == 1
    assert image.pos_weight.tolist() == [0.5, 0.5] and image.neg_sorted.size == 14
    # the same region at the bottom of image 1 and top of image 2 stays two regions
    a = np.zeros((2, 2), dtype=bool)
    a[1, 0] = True
    b = np.zeros((2, 2), dtype=bool)
    b[0, 0] = True
    assert sum(im.n_regions for im in metrics.prepare([np.zeros((2, 2))] * 2, [a, b])) == 2


def reference_au_pro(scores, masks, limit=0.3):
    """Brute force: loop over thresholds and regions."""
    labelled = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    normal = np.concatenate([s[~m] for s, m in zip(scores, masks)])
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([s.ravel() for s in scores]))[::-1]:
        overlaps = [(s[lab == r] >= t).mean()
                    for s, lab in zip(scores, labelled) for r in range(1, lab.max() + 1)]
        points.append(((normal >= t).mean(), float(np.mean(overlaps))))
    points.append((1.0, 1.0))
    fpr, pro = np.array(points).T
    return metrics.trapezoid_up_to(fpr, pro, limit) / limit


def random_case(seed, n_images=3, shape=(24, 20)):
    rng = np.random.default_rng(seed)
    masks, scores = [], []
    for _ in range(n_images):
        m = np.zeros(shape, dtype=bool)
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
            m[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
        s = np.round(rng.random(shape) + 0.6 * m, 1).astype(np.float32)  # rounding makes ties
        masks.append(m)
        scores.append(s)
    return scores, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_au_pro_matches_brute_force(seed, limit):
    scores, masks = random_case(seed)
    expected = reference_au_pro(scores, masks, limit)
    assert metrics.au_pro(scores, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


def test_subsets_reuse_the_per_image_preparation():
    scores, masks = random_case(3, n_images=4)
    prepared = metrics.prepare(scores, masks)
    assert metrics.metrics_of(prepared[1:3]) == metrics.pixel_metrics(scores[1:3], masks[1:3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_auroc_and_ap_match_sklearn_with_ties(seed):
    scores, masks = random_case(seed)
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([x.ravel() for x in scores])
    out = metrics.pixel_metrics(scores, masks)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert metrics.pixel_auroc(scores, masks) == out["pixel_auroc"]
    assert metrics.pixel_ap(scores, masks) == out["pixel_ap"]


def test_pixel_metrics_reject_single_class_and_size_mismatch():
    with pytest.raises(ValueError):
        metrics.pixel_auroc(np.zeros((3, 3)), np.zeros((3, 3), dtype=bool))
    with pytest.raises(ValueError):
        metrics.pixel_ap([np.zeros((3, 3))], [np.zeros((3, 4), dtype=bool)])


def test_image_auroc():
    assert metrics.image_auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert np.isnan(metrics.image_auroc([0.1, 0.2], [True, True]))


def test_iou():
    a = np.zeros((4, 4), dtype=bool)
    b = np.zeros((4, 4), dtype=bool)
    assert metrics.iou(a, b) == 1.0
    a[0, :2] = True
    b[0, 1:3] = True
    assert metrics.iou(a, b) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        metrics.iou(a, np.zeros((3, 3), dtype=bool))


def test_noc_and_miou():
    runs = [[0.5, 0.86, 0.92], [0.3, 0.4, 0.5, 0.6], [0.95]]
    assert [metrics.noc(r, 0.85) for r in runs] == [2, 20, 1]
    assert [metrics.noc(r, 0.90, max_clicks=3) for r in runs] == [3, 3, 1]
    assert metrics.mean_noc(runs, 0.85) == pytest.approx(23 / 3)
    assert metrics.miou_at_k(runs, 1) == pytest.approx((0.5 + 0.3 + 0.95) / 3)
    # runs that stopped early keep their last IoU
    assert metrics.miou_at_k(runs, 4) == pytest.approx((0.92 + 0.6 + 0.95) / 3)


def test_tolerant_f1_forgives_a_one_pixel_outline_shift_but_not_a_miss():
    """A thin defect (3 px wide) predicted one pixel off: the plain pixel F1 is poor, the tolerant one perfect;
    a prediction elsewhere stays wrong under the tolerance; an exact prediction scores 1 under both."""
    gt = np.zeros((40, 60), bool)
    gt[10:30, 20:23] = True
    shifted = np.roll(gt, 1, axis=1)
    elsewhere = np.roll(gt, 20, axis=1)
    tp = int((shifted & gt).sum())
    plain = 2 * tp / (2 * tp + int((shifted & ~gt).sum()) + int((~shifted & gt).sum()))
    assert plain < 0.7
    assert metrics.pooled_tolerant_f1([metrics.tolerant_counts(shifted, gt, 1)]) == pytest.approx(1.0)
    assert metrics.pooled_tolerant_f1([metrics.tolerant_counts(elsewhere, gt, 1)]) == 0.0
    assert metrics.pooled_tolerant_f1([metrics.tolerant_counts(gt, gt, 1)]) == pytest.approx(1.0)
    # pooled: counts add up over images (one perfect image, one empty prediction)
    both = [metrics.tolerant_counts(gt, gt, 1), metrics.tolerant_counts(np.zeros_like(gt), gt, 1)]
    assert metrics.pooled_tolerant_f1(both) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
