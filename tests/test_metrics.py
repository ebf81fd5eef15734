"""Metrics vs scikit-learn, bootstrap coverage, RSNA log loss by hand, curve summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from ctssl_core import evaluate as ev


def _problem(seed, n=300, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(int)
    s = rng.normal(size=n) + 1.2 * y
    if ties:
        s = np.round(s, 1)  # many tied scores
    return y, s


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_binary_metrics_match_sklearn(seed, ties):
    y, s = _problem(seed, ties=ties)
    assert ev.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert ev.auprc(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    assert ev.sensitivity_at_specificity(y, s, 0.9) == pytest.approx(tpr[fpr <= 0.1].max())


def test_binary_metrics_undefined_for_one_class():
    assert math.isnan(ev.auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(ev.auprc([0, 0], [0.1, 0.2]))
    assert math.isnan(ev.sensitivity_at_specificity([0, 0], [0.1, 0.2]))
    with pytest.raises(ValueError, match="differ in length"):
        ev.auroc([0, 1], [0.1])


def test_regression_and_multiclass_match_sklearn():
    rng = np.random.default_rng(3)
    y = rng.normal(50, 10, 200)
    p = y + rng.normal(0, 5, 200)
    assert ev.mae(y, p) == pytest.approx(skm.mean_absolute_error(y, p))
    assert ev.r2(y, p) == pytest.approx(skm.r2_score(y, p))
    assert math.isnan(ev.r2([3, 3, 3], [1, 2, 3]))
    yc = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + np.eye(3)[yc]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert ev.macro_ovr_auroc(yc, proba) == pytest.approx(
        skm.roc_auc_score(yc, proba, multi_class="ovr", average="macro"))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        ev.macro_ovr_auroc(yc, proba[:10])


def test_dice_iou_per_slice_and_per_nodule():
    a = np.zeros((3, 8, 8), bool)
    b = np.zeros((3, 8, 8), bool)
    a[0, :4, :4] = True          # 16 px
    b[0, :4, :2] = True          # 8 px, all inside a
    # slice 1: empty in both -> 1.0; slice 2: false positive only -> 0
    a[2, 0, 0] = True
    d, j = ev.dice_iou_per_slice(a, b)
    np.testing.assert_allclose(d, [2 * 8 / 24, 1.0, 0.0])
    np.testing.assert_allclose(j, [8 / 16, 1.0, 0.0])
    assert ev.dice(a[0], b[0]) == pytest.approx(skm.f1_score(b[0].ravel(), a[0].ravel()))
    assert ev.iou(a[0], b[0]) == pytest.approx(skm.jaccard_score(b[0].ravel(), a[0].ravel()))
    # two 3D nodules: one found exactly, one missed; a far false positive does not dilute nodule 1
    t = np.zeros((4, 10, 10), bool)
    t[0:2, 1:3, 1:3] = True
    t[2:4, 7:9, 7:9] = True
    p = np.zeros_like(t)
    p[0:2, 1:3, 1:3] = True
    p[3, 5, 0] = True
    dn, jn = ev.per_nodule_dice(p, t)
    np.testing.assert_allclose(dn, [1.0, 0.0])
    np.testing.assert_allclose(jn, [1.0, 0.0])
    with pytest.raises(ValueError, match="volumes"):
        ev.per_nodule_dice(p[0], t[0])


def test_rsna_weighted_log_loss_hand_computed():
    # exam A: 4 images, 2 positive (q = 0.5); exam B: 2 negative images (q = 0: no image weight)
    exam = np.array(["A"] * 4 + ["B"] * 2)
    y = np.array([1, 1, 0, 0, 0, 0])
    p = np.array([0.8, 0.6, 0.3, 0.1, 0.5, 0.5])
    w, we = 0.07361963, 0.0736196319
    image_part = 0.5 * w * (-math.log(0.8) - math.log(0.6) - math.log(0.7) - math.log(0.9))
    exam_part = we * (-math.log(0.8) - math.log(0.7))    # labels [0, 1], probs [0.2, 0.7]
    expected = (image_part + exam_part) / (4 * 0.5 * w + 2 * we)
    got = ev.rsna_weighted_log_loss(exam, y, p, {"negative_exam_for_pe": np.array([0, 1])},
                                    {"negative_exam_for_pe": np.array([0.2, 0.7])})
    assert got == pytest.approx(expected, rel=1e-9)
    # image-level only: the plain weighted BCE of exam A's images
    assert ev.rsna_weighted_log_loss(exam, y, p) == pytest.approx(image_part / (2 * w))
    with pytest.raises(ValueError, match="unknown RSNA exam label"):
        ev.rsna_weighted_log_loss(exam, y, p, {"foo": np.array([0, 1])}, {"foo": np.array([0.1, 0.2])})


def test_exam_aggregation():
    exam = np.array([2, 2, 2, 2, 1, 1])
    p = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.4])
    ids, top = ev.aggregate_exam(exam, p, "topk", k=3)
    np.testing.assert_array_equal(ids, [1, 2])
    np.testing.assert_allclose(top, [0.3, (0.9 + 0.7 + 0.5) / 3])
    np.testing.assert_allclose(ev.aggregate_exam(exam, p, "max")[1], [0.4, 0.9])
    np.testing.assert_allclose(ev.aggregate_exam(exam, p, "mean")[1], [0.3, 0.55])
    with pytest.raises(ValueError, match="max, mean or topk"):
        ev.aggregate_exam(exam, p, "median")


def test_row_index_keeps_repeated_patients():
    groups = np.array(["b", "a", "b", "c"])
    idx = ev.RowIndex(groups, np.array(["a", "b", "c"]))
    rows = idx.rows(np.array([1, 1, 0]))  # b twice, a once
    assert sorted(rows.tolist()) == [0, 0, 1, 2, 2]


def test_bootstrap_ci_covers_truth_on_clustered_problem():
    """Patient-clustered data with a known mean: the 95% CI should cover it ~95% of the time."""
    true_mean, hits, reps = 1.0, 0, 150
    for r in range(reps):
        rng = np.random.default_rng(1000 + r)
        n_pat = 40
        pat_effect = rng.normal(0, 1.0, n_pat)
        groups = np.repeat(np.arange(n_pat), 5)
        x = true_mean + pat_effect[groups] + rng.normal(0, 0.5, groups.size)
        ci = ev.bootstrap_ci(np.mean, groups, x, n_boot=200, seed=r)
        hits += ci.low <= true_mean <= ci.high
        assert ci.low <= ci.value <= ci.high
    assert 0.86 <= hits / reps <= 0.99


def test_bootstrap_auroc_coverage_and_paired_difference():
    # binormal model with unit variances: AUROC = Phi(d / sqrt(2))
    from scipy.stats import norm

    d = 1.0
    truth = norm.cdf(d / math.sqrt(2))
    hits = 0
    reps = 100
    for r in range(reps):
        rng = np.random.default_rng(r)
        y = (rng.random(150) < 0.3).astype(int)
        s = rng.normal(size=150) + d * y
        ci = ev.bootstrap_ci(ev.auroc, np.arange(150), y, s, n_boot=200, seed=r)
        hits += ci.low <= truth <= ci.high
    assert 0.86 <= hits / reps <= 1.0
    # paired: a better scorer minus a worse one has a positive CI; identical scorers give exactly 0
    rng = np.random.default_rng(7)
    groups = np.repeat(np.arange(60), 4)
    y = (rng.random(240) < 0.3).astype(int)
    good = rng.normal(size=240) + 2.0 * y
    bad = rng.normal(size=240) + 0.3 * y
    diff = ev.paired_diff_ci(ev.auroc, groups, (y, good), (y, bad), n_boot=300)
    assert diff.low > 0 and diff.value == pytest.approx(ev.auroc(y, good) - ev.auroc(y, bad))
    same = ev.paired_diff_ci(ev.auroc, groups, (y, good), (y, good), n_boot=100)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="one row per group"):
        ev.bootstrap_ci(ev.auroc, groups[:10], y, good)


def test_labels_needed_interpolates_in_log_fraction():
    f = [0.01, 0.05, 0.25, 1.0]
    v = [0.60, 0.70, 0.80, 0.90]
    # target 0.75 lies halfway between 0.05 and 0.25 -> geometric mean of the two
    assert ev.labels_needed(f, v, 0.75) == pytest.approx(math.sqrt(0.05 * 0.25))
    assert ev.labels_needed(f, v, 0.55) == pytest.approx(0.01)          # already there at 1%
    assert ev.labels_needed(f, v, 0.95) == ev.NOT_REACHED                # not reached
    # lower-is-better (log loss): target 0.35 between 0.4 @ 5% and 0.3 @ 25%
    assert ev.labels_needed(f, [0.5, 0.4, 0.3, 0.2], 0.35, higher_is_better=False) == pytest.approx(
        math.sqrt(0.05 * 0.25))
    # several seeds per fraction are averaged first
    assert ev.labels_needed([0.05, 0.05, 0.25], [0.6, 0.8, 0.9], 0.8) == pytest.approx(
        math.exp(math.log(0.05) + 0.5 * (math.log(0.25) - math.log(0.05))))
    # undefined metric (e.g. AUROC on a one-class test set) -> nan, not "not reached"
    assert math.isnan(ev.labels_needed(f, v, float("nan")))
    assert math.isnan(ev.labels_needed(f, [float("nan")] * 4, 0.5))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ev.labels_needed([0.0, 1.0], [0.5, 0.6], 0.55)


def test_speed_ratio_on_synthetic_curves():
    steps = np.arange(0, 2001, 10)
    random_curve = 0.8 * (1 - np.exp(-steps / 400.0))
    fast_curve = 0.8 * (1 - np.exp(-steps / 200.0))
    ratio, t_r, t_i = ev.speed_ratio(steps, random_curve, steps, fast_curve, frac=0.9)
    thr = 0.9 * random_curve.max()
    assert t_r == pytest.approx(-400 * math.log(1 - thr / 0.8), rel=2e-3)
    assert ratio == pytest.approx(2.0, rel=5e-3)
    never = np.full_like(steps, 0.1, dtype=float)
    assert ev.speed_ratio(steps, random_curve, steps, never)[0] == 0.0
    assert ev.steps_to_reach([0, 10, 20], [0.0, 0.5, 1.0], 0.75) == pytest.approx(15.0)


def test_weighted_ranking_metrics_equal_metrics_on_duplicated_rows():
    y, s = _problem(5, n=120, ties=True)
    rng = np.random.default_rng(1)
    w = rng.integers(0, 3, size=(4, y.size)).astype(float)
    got = ev.weighted_ranking_metrics(y, s, np.vstack([np.ones(y.size), w]))
    assert got["auroc"][0] == pytest.approx(skm.roc_auc_score(y, s))
    assert got["auprc"][0] == pytest.approx(skm.average_precision_score(y, s))
    for r in range(4):
        rows = np.repeat(np.arange(y.size), w[r].astype(int))       # the resample, written out
        assert got["auroc"][r + 1] == pytest.approx(ev.auroc(y[rows], s[rows]))
        assert got["auprc"][r + 1] == pytest.approx(ev.auprc(y[rows], s[rows]))
        assert got["sens_at_spec"][r + 1] == pytest.approx(ev.sensitivity_at_specificity(y[rows], s[rows]))
    one_class = ev.weighted_ranking_metrics(y, s, (y == 0)[None].astype(float))
    assert np.isnan(one_class["auroc"][0]) and np.isnan(one_class["auprc"][0])


def test_bootstrap_multi_batch_path_matches_per_draw_path():
    from ctssl_core.downstream import make_downstream

    rng = np.random.default_rng(2)
    patient = np.repeat(np.arange(20), 5)
    y = ((patient % 3 == 0) & (rng.random(100) < 0.6)).astype(float)
    out = {"prob": np.clip(0.4 * y + 0.6 * rng.random(100), 0, 1), "target": y, "exam": patient * 7,
           "patient": patient, "order": np.tile(np.arange(5), 20)}
    stat = make_downstream("pe").stat_fn(out)
    fast, fs = ev.bootstrap_multi(stat, 20, n_boot=60, seed=3)
    plain = lambda d: stat(d)                                       # noqa: E731 - hides .batch
    slow, ss = ev.bootstrap_multi(plain, 20, n_boot=60, seed=3)
    for m in fast:
        np.testing.assert_allclose(fs[m], ss[m], equal_nan=True)
        assert fast[m].value == pytest.approx(slow[m].value)


def test_stratified_auroc_counts_only_within_stratum_pairs():
    # stratum 0: 1 pos, 2 neg, pos ranked above one neg -> 1 of 2 pairs; stratum 1: 2 pos, 1 neg, both above
    y = np.array([1, 0, 0, 1, 1, 0, 1])
    s = np.array([0.5, 0.9, 0.1, 0.3, 0.35, 0.2, 0.99])
    g = np.array([0, 0, 0, 1, 1, 1, 2])                          # stratum 2: one class only, no pair
    assert ev.stratified_auroc(y, s, g) == pytest.approx((1 + 2) / (2 + 2))
    per = [ev.auroc(y[g == k], s[g == k]) for k in (0, 1)]        # = pair-weighted mean of per-stratum AUROCs
    assert ev.stratified_auroc(y, s, g) == pytest.approx((2 * per[0] + 2 * per[1]) / 4)
    assert ev.stratified_auroc(y, s, np.zeros(7)) == pytest.approx(ev.auroc(y, s))   # one stratum = plain
    assert np.isnan(ev.stratified_auroc(y, s, np.arange(7)))    # every row alone: no pair at all
    # weighted rows = the resample written out
    w = np.array([[1, 1, 1, 1, 1, 1, 1], [2, 0, 1, 1, 3, 1, 0], [0, 1, 1, 1, 1, 1, 1]], float)
    got = ev.stratified_auroc(y, s, g, w)
    for r in range(3):
        rows = np.repeat(np.arange(7), w[r].astype(int))
        want = ev.stratified_auroc(y[rows], s[rows], g[rows])
        assert (np.isnan(want) and np.isnan(got[r])) or got[r] == pytest.approx(want)
    with pytest.raises(ValueError, match="strata"):
        ev.stratified_auroc(y, s, g[:3])


def test_a_position_shortcut_scores_half_stratified_but_high_plain():
    rng = np.random.default_rng(4)
    n_exam, n_sl = 60, 40
    order = np.tile(np.arange(n_sl), n_exam)
    exam = np.repeat(np.arange(n_exam), n_sl)
    z = ev.position_strata(exam, order)
    assert np.array_equal(np.bincount(z), np.full(10, n_exam * n_sl // 10))
    # PE only at the "artery level" (deciles 4-5), at random within it: the level predicts, nothing else does
    y = ((z >= 4) & (z <= 5) & (rng.random(order.size) < 0.4)).astype(float)
    rel = order / (n_sl - 1.0)
    position = -np.abs(rel - 0.5)                                # score = closeness to the artery level
    assert ev.auroc(y, position) > 0.8
    assert ev.stratified_auroc(y, position, z) == pytest.approx(0.5, abs=0.05)
    # a score that sees the finding keeps its AUROC within strata
    seeing = y + 0.5 * rng.random(y.size)
    assert ev.stratified_auroc(y, seeing, z) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one entry per slice"):
        ev.position_strata(exam, order[:5])


def test_one_auroc_one_rule_for_the_positive_class():
    """``auroc`` and ``auroc_rows`` (the one implementation) count a label > 0.5 as positive, as sklearn does for
    0/1, bool and -1/1 labels; bias refuses other codes rather than recasting them."""
    from sklearn.metrics import roc_auc_score

    from ctssl_core.bias import BiasError, subgroup_performance
    from ctssl_core.evaluate.metrics import auroc, auroc_rows

    s = np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.2])
    for y in (np.array([0, 0, 1, 1, 0, 1]), np.array([-1, -1, 1, 1, -1, 1]),
              np.array([False, False, True, True, False, True])):
        ref = roc_auc_score(y, s)
        assert auroc(y, s) == pytest.approx(ref) and auroc_rows(y[None], s[None])[0] == pytest.approx(ref)
    with pytest.raises(BiasError, match="0/1 labels"):
        subgroup_performance(s, np.array([1, 1, 2, 2, 1, 2]), np.array(list("aabbab")))
