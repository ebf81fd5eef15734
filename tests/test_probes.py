"""Linear probes: recover a planted signal, give chance on noise, group by patient, fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ctssl_core.probes import ProbeError, paired_delta, pool_by_group, probe


def _binary(n=240, d=16, effect=2.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, d))
    X[:, 0] += effect * y
    return X, y, np.arange(n)


def test_binary_probe_recovers_planted_signal_and_matches_sklearn():
    X, y, g = _binary()
    r = probe(X, y, g, "binary", n_boot=300)
    est = r.metrics["auroc"]
    assert est.value > 0.8 and est.ci_low > 0.7 and est.ci_low <= est.value <= est.ci_high
    assert est.value == pytest.approx(roc_auc_score(r.y, r.oof))
    assert r.n_units == 240 and r.n_splits == 5


def test_binary_probe_is_chance_on_noise():
    rng = np.random.default_rng(11)
    X = rng.normal(size=(160, 8))
    y = rng.integers(0, 2, 160)
    r = probe(X, y, np.arange(160), "binary", n_boot=300, n_perm=15)
    est = r.metrics["auroc"]
    assert est.ci_low < 0.5 < est.ci_high
    assert abs(est.value - 0.5) < 0.12
    assert r.p_value > 0.05 and len(r.null) == 15 and abs(r.null.mean() - 0.5) < 0.1


def test_permutation_p_detects_planted_signal():
    X, y, g = _binary(n=120, d=8, effect=1.5, seed=12)
    r = probe(X, y, g, "binary", n_boot=50, n_perm=199)
    assert r.p_value == pytest.approx(1 / 200)          # no permutation reaches the planted signal


def test_multiclass_macro_auroc_planted_and_matches_sklearn():
    rng = np.random.default_rng(2)
    y = rng.choice(["A", "B", "C"], 300)
    X = rng.normal(size=(300, 8))
    X[:, 0] += 2 * (y == "A")
    X[:, 1] += 2 * (y == "B")
    r = probe(X, y, np.arange(300), "multiclass", n_boot=200)
    assert r.classes == ["A", "B", "C"] and r.oof.shape == (300, 3)
    assert r.metrics["macro_auroc"].ci_low > 0.75
    # per-class scores of a least-squares probe are not probabilities: macro AUROC = mean one-vs-rest AUROC
    hand = np.mean([roc_auc_score(r.y == c, r.oof[:, c]) for c in range(3)])
    assert r.metrics["macro_auroc"].value == pytest.approx(hand)


def test_regression_probe_mae_r2():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 8))
    age = 55 + 10 * X[:, 0] + rng.normal(size=200)
    r = probe(X, age, np.arange(200), "regression", n_boot=200)
    assert r.metrics["r2"].ci_low > 0.9
    assert r.metrics["mae"].value == pytest.approx(np.abs(r.oof - r.y).mean())
    assert r.metrics["mae"].value < 2.0
    noise = probe(rng.normal(size=(200, 8)), age, np.arange(200), "regression", n_boot=200).metrics["r2"]
    assert noise.ci_low < 0.0


def test_nested_cv_age_probe_is_about_zero_on_noise_where_a_fixed_penalty_overfits():
    """~190 patients x 128 noise features (the quick profile's size): the penalty chosen inside each
    training fold predicts ~the training mean, R^2 ~ 0. The old fixed ridge (alpha 10) gave -0.5 to -1.1."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    r2s, fixed = [], []
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        X, age = rng.normal(size=(190, 128)), rng.uniform(25, 85, 190)
        r = probe(X, age, np.arange(190), "regression", n_boot=50, seed=seed)
        r2s.append(r.metrics["r2"].value)
        old = cross_val_predict(make_pipeline(StandardScaler(), Ridge(alpha=10.0)), X, age, cv=5)
        fixed.append(1 - np.sum((age - old) ** 2) / np.sum((age - age.mean()) ** 2))
    assert all(-0.1 < v < 0.05 for v in r2s), r2s
    assert max(fixed) < -0.3, fixed          # the failure mode the nested CV removes


def test_permutation_p_is_exact_with_the_plus_one_rule():
    from ctssl_core.probes import permutation_p

    null = np.array([0.4, 0.5, 0.6, 0.7])
    assert permutation_p(0.65, null) == pytest.approx((1 + 1) / 5)
    assert permutation_p(0.9, null) == pytest.approx(1 / 5)                # smallest possible: 1 / (1 + n)
    assert permutation_p(0.5, null) == pytest.approx((1 + 3) / 5)          # ties count as at least as extreme
    assert permutation_p(0.45, null, lower_is_better=True) == pytest.approx(2 / 5)
    assert permutation_p(0.9, np.array([0.4, np.nan])) == pytest.approx(2 / 3)   # an uncomputable null counts against
    assert np.isnan(permutation_p(float("nan"), null)) and np.isnan(permutation_p(0.5, np.array([])))


def test_permutation_null_reruns_the_same_procedure():
    """Permuting with the identity must reproduce the observed statistic: the null and the
    observed value go through one code path (same folds, same per-target penalty search)."""
    from ctssl_core import probes

    rng = np.random.default_rng(13)
    y = rng.choice(["A", "B", "C"], 90)
    X = rng.normal(size=(90, 6))
    X[:, 0] += 1.0 * (y == "A")
    r = probe(X, y, np.arange(90), "multiclass", n_boot=10, n_perm=5)
    T = probes._targets("multiclass", r.y, 3)
    stacked = probes._cv_oof(X, np.concatenate([T, T], 1), r.cluster, r.n_splits, 0, scores=True)
    np.testing.assert_allclose(stacked[:, :3], stacked[:, 3:])
    np.testing.assert_allclose(stacked[:, :3], r.oof)
    assert r.p_value == pytest.approx((1 + np.sum(r.null >= r.metrics["macro_auroc"].value)) / 6)


def test_near_dead_channels_do_not_blow_up_the_age_probe():
    """A random encoder's dead channels (std ~1e-8 with rare wobbles) used to become 100-sigma
    inputs after standardisation: R^2 of -30 and an MAE of decades. They are dropped per fold."""
    from ctssl_core.probes import drop_flat_features

    rng = np.random.default_rng(5)
    n = 200
    X = rng.normal(size=(n, 8))
    age = 55 + 10 * X[:, 0] + rng.normal(size=n)
    dead = np.full((n, 4), 0.3) + 1e-9 * rng.normal(size=(n, 4))
    for j in range(4):                                          # one wobble per channel: the training
        dead[rng.integers(n), j] += 1e-5                        # fold without it has std ~1e-9
    Xd = np.hstack([X, dead])
    r = probe(Xd, age, np.arange(n), "regression", n_boot=100)
    assert r.metrics["r2"].value > 0.9 and r.metrics["mae"].value < 2.0
    keep = drop_flat_features(Xd)
    assert keep[:8].all() and not keep[8:].any()
    assert drop_flat_features(np.zeros((5, 3))).all()             # nothing varies: keep all, don't crash


def test_standardisation_makes_probe_scale_invariant():
    X, y, g = _binary(seed=4)
    Xs = X * np.array([1000.0] + [0.001] * 15)
    a = probe(X, y, g, "binary", n_boot=10).metrics["auroc"].value
    b = probe(Xs, y, g, "binary", n_boot=10).metrics["auroc"].value
    assert a == pytest.approx(b, abs=0.01)


def test_slices_of_one_patient_never_leak_across_folds():
    # every patient has its own random vector and a random label, repeated over 6 slices:
    # a probe that saw a patient's slices in training would "predict" its label.
    rng = np.random.default_rng(5)
    P, S = 60, 6
    pat = rng.normal(size=(P, 40))
    X = np.repeat(pat, S, 0) + 0.01 * rng.normal(size=(P * S, 40))
    y = np.repeat(rng.integers(0, 2, P), S)
    g = np.repeat(np.arange(P), S)
    r = probe(X, y, g, "binary", pool=False, n_boot=300)
    assert r.metrics["auroc"].ci_low < 0.5 < r.metrics["auroc"].ci_high
    pooled = probe(X, y, g, "binary", pool=True, n_boot=50)
    assert pooled.n_units == P and len(pooled.y) == P


def test_paired_delta_signal_vs_noise_and_self():
    X, y, g = _binary(seed=6)
    noise = np.random.default_rng(7).normal(size=X.shape)
    a = probe(X, y, g, "binary", n_boot=200)
    b = probe(noise, y, g, "binary", n_boot=200)
    d = paired_delta(a, b, n_boot=500)["auroc"]
    assert d.value == pytest.approx(a.metrics["auroc"].value - b.metrics["auroc"].value)
    assert d.ci_low > 0.15
    same = paired_delta(a, a, n_boot=200)["auroc"]
    assert same.value == 0 and same.ci_low == 0 and same.ci_high == 0


def test_pool_by_group_means_and_order():
    X = np.array([[1.0, 0], [3, 0], [10, 2], [5, 5]])
    g = np.array(["b", "b", "a", "c"])
    Xg, keys, y = pool_by_group(X, g, np.array([1, 1, 0, 1]))
    assert list(keys) == ["b", "a", "c"]
    np.testing.assert_allclose(Xg, [[2, 0], [10, 2], [5, 5]])
    assert list(y) == [1, 0, 1]


@pytest.mark.parametrize("bad, match", [
    (dict(y=np.zeros(10)), "two classes"),
    (dict(X=np.full((10, 3), np.nan)), "NaN"),
    (dict(groups=np.arange(9)), "probe wants"),
    (dict(kind="ordinal"), "unknown probe kind"),
])
def test_bad_input_gives_clear_error(bad, match):
    rng = np.random.default_rng(8)
    args = dict(X=rng.normal(size=(10, 3)), y=np.array([0, 1] * 5), groups=np.arange(10), kind="binary")
    args.update(bad)
    with pytest.raises(ProbeError, match=match):
        probe(args["X"], args["y"], args["groups"], args["kind"], n_boot=10)


def test_target_varying_within_patient_is_an_error():
    X = np.zeros((4, 2))
    with pytest.raises(ProbeError, match="varies within"):
        probe(X, np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]), "binary")


def test_missing_targets_are_dropped_not_fatal():
    X, y, g = _binary(n=120, seed=9)
    yo = y.astype(object)
    yo[:10] = None
    r = probe(X, yo, g, "binary", n_boot=50)
    assert r.n_units == 110


def test_binary_oof_the_online_probes_scores_find_a_planted_signal_and_not_noise():
    """``probes.binary_oof`` (pretraining's online probe): out-of-fold scores of the study's ridge probe, folded
    by patient; row by row when there are too few patients for grouped folds with an inner search."""
    from ctssl_core.evaluate.metrics import auroc
    from ctssl_core.probes import binary_oof

    rng = np.random.default_rng(0)
    n, pats = 240, 40
    groups = np.repeat(np.arange(pats), n // pats)
    y = (rng.random(pats) < 0.5)[groups].astype(float)           # a patient's slices share its label
    noise = rng.normal(size=(n, 16))
    signal = noise.copy()
    signal[:, 0] += 1.5 * y
    assert auroc(y, binary_oof(signal, y, groups)) > 0.8
    assert 0.3 < auroc(y, binary_oof(noise, y, groups)) < 0.7
    few = np.repeat(np.arange(3), n // 3)                        # 3 patients: row-by-row folds
    assert binary_oof(signal, y, few).shape == (n,) and np.isfinite(binary_oof(signal, y, few)).all()
