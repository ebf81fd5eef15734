"""Bias analysis: KS tests with correction, separability null, subgroup metrics by hand, planted effects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ctssl_core import bias
from ctssl_core.bias import BiasConfig, BiasError


# ------------------------------------------------------------------ corrections and KS


def test_bh_and_holm_match_hand_computation():
    p = np.array([0.01, 0.04, 0.03, 0.20])
    # BH: sorted p * m / rank, then monotone from the top: 0.04, 0.0533, 0.0533, 0.20
    np.testing.assert_allclose(bias.adjust_pvalues(p, "bh"), [0.04, 0.16 / 3, 0.16 / 3, 0.20])
    # Holm: 4*0.01, 3*0.03, max(2*0.04, 0.09), max(1*0.2, 0.09)
    np.testing.assert_allclose(bias.adjust_pvalues(p, "holm"), [0.04, 0.09, 0.09, 0.20])
    with pytest.raises(BiasError, match="bh"):
        bias.adjust_pvalues(p, "bonferonni")


def test_ks_flags_a_shifted_mode_and_not_the_others():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(200, 5))
    sex = np.array(["F", "M"] * 100)
    Z[sex == "M", 2] += 1.0
    df = bias.ks_tests(Z, {"sex": sex})
    assert len(df) == 5
    assert df.loc[df["mode"] == 3, "flagged"].item()
    assert not df.loc[df["mode"] != 3, "flagged"].any()
    assert (df["p_adjusted"] >= df["p_value"]).all()


def test_ks_false_positive_rate_is_alpha_after_correction():
    # 200 repeats of 5 unshifted modes: BH keeps the chance of any flag near alpha
    # (under the global null BH controls the family-wise rate), raw p-values do not.
    rng = np.random.default_rng(1)
    any_flag, any_raw = 0, 0
    for _ in range(200):
        Z = rng.normal(size=(80, 5))
        df = bias.ks_tests(Z, {"g": np.array(["a", "b"] * 40)}, alpha=0.05)
        any_flag += df["flagged"].any()
        any_raw += (df["p_value"] < 0.05).any()
    assert 0.01 <= any_flag / 200 <= 0.10
    assert any_raw / 200 > 0.12   # ~1 - 0.95**5 = 0.23 without correction


def test_ks_covers_each_race_pair_and_skips_tiny_groups():
    rng = np.random.default_rng(2)
    race = np.array(["A"] * 30 + ["B"] * 30 + ["C"] * 30 + ["D"] * 3 + [None] * 5, dtype=object)
    df = bias.ks_tests(rng.normal(size=(98, 2)), {"race": race}, min_group=5)
    assert sorted(set(zip(df.group_a, df.group_b))) == [("A", "B"), ("A", "C"), ("B", "C")]


def test_age_bins_are_quantiles_with_missing_kept():
    age = np.array([20, 30, 40, 50, 60, 70, np.nan, 80, 90])
    b = bias.age_bins(age, 2)
    assert b[6] is None
    assert len(set(b[[0, 1, 2, 3]])) == 1 and b[0] != b[8]


# ------------------------------------------------------------------ separability


def test_separability_detects_clusters_and_not_random_labels():
    rng = np.random.default_rng(3)
    lab = np.array(["x", "y"] * 60)
    X = rng.normal(size=(120, 10))
    X[lab == "y", :3] += 2.0
    r = bias.knn_separability(X, lab, k=5, n_perm=200)
    assert r["value"] > 0.9 and r["p_value"] < 0.01 and r["chance"] == 0.5
    r0 = bias.knn_separability(X, rng.permutation(lab), k=5, n_perm=200)
    assert r0["p_value"] > 0.05 and abs(r0["null_mean"] - 0.5) < 0.05


def test_separability_needs_two_groups():
    with pytest.raises(BiasError, match="two or more groups"):
        bias.knn_separability(np.zeros((5, 2)), np.array(["a"] * 5))


# ------------------------------------------------------------------ subgroup performance


def _scores(seed=4, n=400):
    rng = np.random.default_rng(seed)
    g = rng.choice(["F", "M"], n)
    y = rng.integers(0, 2, n)
    s = rng.random(n) + 0.6 * y + 0.3 * y * (g == "M")
    return s, y, g


def test_subgroup_metrics_match_hand_computation():
    s, y, g = _scores()
    thr = 0.7
    res = bias.subgroup_performance(s, y, g, threshold=thr, n_boot=200)
    for grp in ("F", "M"):
        m = g == grp
        assert res.by_group.loc[grp, "auroc"] == pytest.approx(roc_auc_score(y[m], s[m]))
        tp = np.sum((s[m] >= thr) & (y[m] == 1))
        fp = np.sum((s[m] >= thr) & (y[m] == 0))
        assert res.by_group.loc[grp, "tpr"] == pytest.approx(tp / np.sum(y[m] == 1))
        assert res.by_group.loc[grp, "fpr"] == pytest.approx(fp / np.sum(y[m] == 0))
        assert res.by_group.loc[grp, "n"] == m.sum()
        assert res.by_group.loc[grp, "auroc_lo"] <= res.by_group.loc[grp, "auroc"] <= res.by_group.loc[grp, "auroc_hi"]
    gap = res.gaps.set_index("metric").loc["auroc"]
    assert gap["value"] == pytest.approx(res.by_group.loc["F", "auroc"] - res.by_group.loc["M", "auroc"])
    assert gap["ci_high"] < 0          # the planted M advantage is a real gap
    assert res.overall["auroc"] == pytest.approx(roc_auc_score(y, s))


def test_subgroup_default_threshold_is_one_global_youden_point():
    s, y, g = _scores(seed=5)
    res = bias.subgroup_performance(s, y, g, n_boot=20)
    assert res.threshold == pytest.approx(bias.youden_threshold(y, s))


def test_subgroup_bad_input():
    with pytest.raises(BiasError, match="one entry per row"):
        bias.subgroup_performance(np.zeros(4), np.zeros(3), np.array(["a"] * 4))
    with pytest.raises(BiasError, match="both positive and negative"):
        bias.subgroup_performance(np.zeros(4), np.zeros(4), np.array(["a", "b"] * 2))


def test_resampling_equalises_prevalence_and_age():
    rng = np.random.default_rng(6)
    n = 600
    g = rng.choice(["A", "B"], n)
    age = np.where(g == "A", rng.normal(45, 8, n), rng.normal(65, 8, n))
    y = (rng.random(n) < np.where(g == "A", 0.1, 0.4)).astype(int)
    idx = bias.resample_balanced(y, g, age, n_age_bins=3, seed=0)
    yr, gr = y[idx], g[idx]
    prev = {k: yr[gr == k].mean() for k in ("A", "B")}
    assert abs(prev["A"] - prev["B"]) < 0.02
    # the common prevalence lies between the groups' original ones (cells not shared are dropped)
    assert y[g == "A"].mean() < prev["A"] < y[g == "B"].mean()
    bins = bias.age_bins(age, 3)[idx]
    for b in set(bins):
        assert abs(np.mean(bins[gr == "A"] == b) - np.mean(bins[gr == "B"] == b)) < 0.02
    assert (gr == "A").sum() == (g == "A").sum()


# ------------------------------------------------------------------ planted effects end to end (arrays)


def planted_patients(P=150, S=3, race_effect=1.0, seed=7):
    """Patient embeddings with planted age/sex/race signal and a control attribute without one."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["F", "M"], P)
    race = rng.choice(["A", "B", "C"], P)
    age = rng.uniform(30, 80, P)
    ctrl = rng.choice(["ctl_a", "ctl_b"], P)
    Xp = rng.normal(size=(P, 12))
    Xp[:, 0] += 1.5 * (sex == "M")
    Xp[:, 1] += race_effect * 2.0 * (race == "B")
    Xp[:, 2] -= race_effect * 2.0 * (race == "C")
    Xp[:, 3] += (age - 55) / 10
    E = np.repeat(Xp, S, 0) + 0.3 * rng.normal(size=(P * S, 12))
    keys = pd.DataFrame({"patient_key": np.repeat([f"p{i:03d}" for i in range(P)], S), "sex": np.repeat(sex, S),
                         "race": np.repeat(race, S), "age": np.repeat(age, S), "control_group": np.repeat(ctrl, S)})
    return E.astype(np.float32), keys


FAST = BiasConfig(n_boot=200, n_perm=100, probe_perm=12, n_modes=3)


def _flags(df, analysis, metric=None):
    d = df[df["analysis"] == analysis]
    if metric:
        d = d[d["metric"] == metric]
    return d.groupby("attribute")["flagged"].any().to_dict()


def test_planted_attributes_detected_control_not_and_race_off_goes_to_chance():
    E, keys = planted_patients()
    ref = (np.random.default_rng(8).normal(size=E.shape).astype(np.float32), keys)
    df = bias.analyse_arrays(E, keys, ref, FAST, emb_id="enc", reference_emb_id="rand")
    probes = _flags(df, "probe")
    assert probes == {"age": True, "sex": True, "race": True, "control_group": False}
    assert _flags(df, "ks")["control_group"] is False or not _flags(df, "ks")["control_group"]
    assert _flags(df, "ks")["sex"] and _flags(df, "ks")["race"] and _flags(df, "ks")["age"]
    race = df[(df.analysis == "probe") & (df.attribute == "race")].iloc[0]
    assert race["delta"] > 0.2 and race["delta_ci_low"] > 0
    assert "present, not that a downstream model uses it" in race["sentence"]
    assert "higher than random init" in race["sentence"]
    # negative control: the race correlate switched off
    E0, keys0 = planted_patients(race_effect=0.0)
    df0 = bias.analyse_arrays(E0, keys0, None, FAST, emb_id="enc0")
    r0 = df0[(df0.analysis == "probe") & (df0.attribute == "race")].iloc[0]
    assert not r0["flagged"] and r0["ci_low"] < 0.5 < r0["ci_high"] + 0.05
    assert "not detectably predictable" in r0["sentence"] and "permutation p" in r0["sentence"]
    assert _flags(df0, "probe")["sex"]


def test_subgroup_rows_flag_planted_gap_and_resampled_variant():
    s, y, g = _scores(seed=9, n=600)
    pk = np.array([f"p{i}" for i in range(600)])
    scores = pd.DataFrame({"patient_key": pk, "score": s, "label": y})
    attrs = pd.DataFrame({"patient_key": pk, "sex": g, "age": np.random.default_rng(9).uniform(30, 80, 600)})
    df = bias.subgroup_rows(scores, attrs, BiasConfig(n_boot=200, attributes=("sex",)), emb_id="e")
    gap = df[(df.metric == "auroc_gap")].iloc[0]
    assert gap["flagged"] and gap["group_a"] == "F" and gap["value"] < 0
    assert "larger than sampling variation" in gap["sentence"]
    dr = bias.subgroup_rows(scores, attrs, BiasConfig(n_boot=50, attributes=("sex",)), emb_id="e", resample=True)
    assert set(dr["analysis"]) == {"subgroup_resampled"}
    with pytest.raises(BiasError, match="patient_key"):
        bias.subgroup_rows(scores.drop(columns=["label"]), attrs)
    with pytest.raises(BiasError, match="both positive and negative"):
        bias.subgroup_rows(scores.assign(label=0), attrs)
    # a group without positives cannot have a TPR or AUROC: NaN with a sentence, not a crash
    one_sided = scores.assign(label=np.where(g == "F", 0, scores["label"]))
    d1 = bias.subgroup_rows(one_sided, attrs, BiasConfig(n_boot=20, attributes=("sex",)))
    f_auc = d1[(d1.metric == "auroc") & (d1.group_a == "F")].iloc[0]
    assert np.isnan(f_auc["value"]) and d1[(d1.metric == "auroc") & (d1.group_a == "M")]["value"].notna().all()


# ------------------------------------------------------------------ the synthetic cohort's planted ground truth


def _synthetic_features(race_effect: float, n: int = 90):
    """Raw-HU tissue features (embed.hu_features) of phantom exams rendered without DICOM."""
    from ctssl_core.data.phantom import phantom_volume
    from ctssl_core.data.synth import STREAM_RENDER, SynthConfig, _rng, sample_patient
    from ctssl_core.embed import hu_features

    # race knob doubled from its default 0.5 so that 90 tiny exams suffice (the script
    # experiments/bias_validation.py runs the default knob on a larger cohort)
    cfg = SynthConfig(n_patients=n, slices_per_exam=4, image_size=64, race_effect=race_effect, workers=1)
    feats, rows = [], []
    for i in range(n):
        p = sample_patient(cfg, i)
        hu = phantom_volume(p, _rng(cfg, i, STREAM_RENDER))[0]            # (S, H, W) int16
        feats.append(hu_features(hu))
        rows += [dict(patient_key=f"syn{i}", age=p.age, sex=p.sex, race=p.race, control_group=p.control_group)] * len(hu)
    return np.concatenate(feats), pd.DataFrame(rows)


def test_synthetic_cohort_planted_effects_detected_control_not_and_race_off_is_chance():
    cfg = BiasConfig(n_boot=200, n_perm=100, probe_perm=8, n_modes=4)
    E, keys = _synthetic_features(race_effect=1.0)
    df = bias.analyse_arrays(E, keys, None, cfg)
    assert _flags(df, "probe") == {"age": True, "sex": True, "race": True, "control_group": False}
    assert not _flags(df, "ks")["control_group"] and not _flags(df, "separability")["control_group"]
    E0, keys0 = _synthetic_features(race_effect=0.0)
    df0 = bias.analyse_arrays(E0, keys0, None, BiasConfig(n_boot=200, n_perm=100, probe_perm=8, attributes=("race",)))
    r0 = df0[(df0.analysis == "probe") & (df0.attribute == "race")].iloc[0]
    assert not r0["flagged"] and r0["ci_low"] < 0.5 < r0["ci_high"]
    assert not _flags(df0, "ks")["race"]


@pytest.mark.parametrize("bad", [dict(correction="bonferroni"), dict(alpha=1.5), dict(n_splits=1), dict(n_age_bins=1)])
def test_bias_config_rejects_bad_values(bad):
    from ctssl_core.config import ConfigError, build

    with pytest.raises(ConfigError, match="bias\\."):
        build(BiasConfig, bad)
    with pytest.raises(BiasError):
        BiasConfig(**bad)
