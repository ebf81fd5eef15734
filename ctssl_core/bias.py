"""Bias analysis of an encoder: does its embedding encode age, sex or race, and does a
downstream model perform differently across groups?

Methods (Gichoya et al. 2022; Glocker et al. 2023; the paper's comparison with
random init as the reference):

* **probes** -- patient-level nested-CV linear probes (``probes.py``) with an
  exact permutation test; the difference to random init with a paired
  bootstrap CI (description, never the detection);
* **KS tests** -- two-sample Kolmogorov-Smirnov tests on the top PCA modes
  between subgroups (sex; each race pair; each pair of age bins; any other
  attribute, numeric ones in quantile bins);
* **separability** -- a k-nearest-neighbour vote predicting the group from the
  embedding, balanced accuracy, against a label-permutation null;
* every test of one encoder is **one family** (``encoder_family``: weighted
  Holm by default), and permutation counts are raised until the corrected
  threshold is reachable (``min_permutations``); experiments/bias_null.py
  measures the family-wise false-positive rate under the null;
* **subgroup performance** of a downstream (PE) model -- AUROC per group,
  TPR/FPR at a threshold chosen on validation scores, gaps between groups with
  bootstrap CIs and exact permutation p-values, Holm-corrected; groups too
  small say 'too few'; optional resampling of the test set to equal
  prevalence and age mix;
* **scorecard** -- on a synthetic cohort, each analysis's verdict against the
  planted truth (``planted_truth``, ``scorecard``).

All tests run on **patient-level** embeddings (slices mean-pooled per patient):
slices of one patient are not independent samples, and slice-level KS tests
would flag everything. Every finding carries a plain-language sentence. A
probe that predicts race shows the information is *present*, not that a
downstream model *uses* it; the sentences say so.

Pure functions take arrays; ``analyse_encoder`` reads embeddings from the store
and writes ``bias_results`` rows (short DuckDB connections).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from ctssl_core.config import ConfigError
from ctssl_core.evaluate.metrics import auroc, auroc_rows
from ctssl_core.probes import (
    ATTRIBUTE_KINDS,
    LOWER_IS_BETTER,
    Estimate,
    ProbeError,
    cluster_boot_index,
    paired_delta,
    pool_by_group,
    probe,
)

CHANCE = {"auroc": 0.5, "macro_auroc": 0.5, "r2": 0.0}
ATTRIBUTES = ("age", "sex", "race", "control_group")


class BiasError(ConfigError):
    """The bias analysis cannot run on the input given; the message says what to do."""


@dataclass
class BiasConfig:
    n_boot: int = 1000
    n_splits: int = 5
    seed: int = 0
    alpha: float = 0.05
    correction: str = "holm"           # over all tests of one encoder: 'holm' (family-wise) | 'bh' (false discovery)
    n_modes: int = 5                   # top PCA modes tested with KS
    n_age_bins: int = 3                # quantile bins of age for KS / separability / resampling
    knn_k: int = 10
    n_perm: int = 1000                 # permutations for the k-NN separability null (raised to min_permutations)
    probe_perm: int = 500              # permutations (nested-CV refits) for the probe p-values (raised likewise)
    sep_dims: int = 50                 # PCA dims for the k-NN separability
    attributes: tuple[str, ...] = ATTRIBUTES
    min_group: int = 5                 # groups with fewer patients are left out of KS/separability
    min_subgroup: int = 10             # subgroup performance: fewer patients in a group -> "too few", no number
    min_events: int = 5                # ... and fewer positives (TPR), negatives (FPR) or either (AUROC) likewise
    threshold: float | None = None     # PE score threshold for TPR/FPR when no validation scores are given
    dose_response: bool = False        # benchmark: also run the race dose-response (dose.py) after the scorecard.
                                       # Off by default: it renders and embeds the analysed patients 3 more times
                                       # (smoke ~8 CPU-s; quick ~220 CPU-s for 6 encoders x 240 patients)

    def __post_init__(self) -> None:
        if self.correction not in ("bh", "holm"):
            raise BiasError(f"bias.correction must be 'bh' or 'holm' (got {self.correction!r})")
        if not 0 < self.alpha < 1:
            raise BiasError(f"bias.alpha must be between 0 and 1 (got {self.alpha})")
        for name, low in (("n_splits", 2), ("n_boot", 1), ("n_modes", 1), ("knn_k", 1), ("n_perm", 0),
                          ("probe_perm", 0), ("n_age_bins", 2), ("sep_dims", 1), ("min_group", 1),
                          ("min_subgroup", 1), ("min_events", 1)):
            if getattr(self, name) < low:
                raise BiasError(f"bias.{name} must be >= {low} (got {getattr(self, name)})")
        if self.threshold is not None and not np.isfinite(self.threshold):
            raise BiasError(f"bias.threshold must be a number or null (got {self.threshold})")


# ---------------------------------------------------------------- helpers


def age_bins(age: np.ndarray, n_bins: int = 3) -> np.ndarray:
    """Quantile bins of age as readable labels ('38–52'); NaN stays None."""
    age = np.asarray(age, dtype=np.float64)
    ok = np.isfinite(age)
    if ok.sum() < n_bins:
        return np.array([None] * len(age), dtype=object)
    edges = np.unique(np.quantile(age[ok], np.linspace(0, 1, n_bins + 1)))
    edges = np.unique(np.round(edges))
    b = np.clip(np.searchsorted(edges, age, side="right") - 1, 0, len(edges) - 2)
    labels = [f"{edges[i]:.0f}–{edges[i + 1]:.0f}" for i in range(len(edges) - 1)]
    out = np.array([labels[i] for i in b], dtype=object)
    out[~ok] = None
    return out


def adjust_pvalues(p: np.ndarray, method: str = "bh", weights: np.ndarray | None = None) -> np.ndarray:
    """Multiple-comparison adjusted p-values: Benjamini-Hochberg ('bh') or Holm ('holm').

    ``weights`` (positive, any scale) make them the weighted versions: weighted
    Holm (Holm 1979) compares ``p_i / w_i`` and multiplies by the weight still
    in play; weighted BH (Genovese, Roeder & Wasserman 2006) runs BH on
    ``p_i / w_i`` with weights of mean 1. Why weights: one encoder's family
    holds one probe and one separability p per attribute but many KS tests per
    attribute; giving each (analysis, attribute) the same share keeps the KS
    tests from swamping the family. Equal weights give the plain methods.
    """
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    if method not in ("bh", "holm"):
        raise BiasError(f"unknown correction {method!r}; use 'bh' or 'holm'")
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != p.shape or not np.all(w > 0):
        raise BiasError(f"weights must be positive, one per p-value; got {w.shape} for {p.shape}")
    w = w / w.sum()
    q = p / w                                        # weighted p; a weight of 1/m gives m * p
    if method == "bh":
        from scipy.stats import false_discovery_control

        return false_discovery_control(np.minimum(q / m, 1.0), method="bh")
    order = np.argsort(q, kind="stable")
    left = np.cumsum(w[order][::-1])[::-1]           # weight still in play at each step
    adj = np.minimum(np.maximum.accumulate(left * q[order]), 1.0)
    out = np.empty(m)
    out[order] = adj
    return out


def min_permutations(n_tests: int, alpha: float, margin: int = 2) -> int:
    """Fewest permutations whose ``margin`` smallest p-values, ``margin / (1 + n)``, survive Holm over ``n_tests``.

    The first Holm step multiplies the smallest p by ``n_tests``. With 50
    permutations and four attributes the smallest corrected p was 4/51 = 0.078:
    separability could never be flagged. ``margin=1`` is the bare minimum
    (``n_tests / (1 + n) < alpha``); there a clear signal passes only if *no*
    permutation reaches it, and a 12-test family at 240 permutations missed a
    planted race effect whose p was 2/241. The default ``margin=2`` lets one
    permutation tie or beat the observed value and still pass.
    """
    if n_tests < 1:
        return 0
    return int(math.floor(margin * n_tests / alpha + 1e-9))


def enough_permutations(asked: int, n_tests: int, alpha: float, name: str,
                        say: Callable[[str], None] | None = None) -> int:
    """``asked``, raised to ``min_permutations`` when it is fewer (said through ``say``)."""
    need = min_permutations(n_tests, alpha)
    if asked >= need:
        return int(asked)
    if say is not None:
        say(f"bias.{name} raised from {asked} to {need}: with fewer, the smallest permutation p-values (1/(1+n), 2/(1+n)) could not "
            f"pass the correction over {n_tests} tests at alpha {alpha}")
    return need


def _labels(v: np.ndarray) -> np.ndarray:
    """Object array of group labels with missing values as None."""
    out = np.array([None if (x is None or (isinstance(x, float) and math.isnan(x)) or x == "") else str(x)
                    for x in np.asarray(v, dtype=object).tolist()], dtype=object)
    return out


def pca_modes(X: np.ndarray, n_modes: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores on the top PCA modes (N, n_modes) and their explained-variance ratios."""
    from sklearn.decomposition import PCA

    k = int(min(n_modes, X.shape[0] - 1, X.shape[1]))
    if k < 1:
        raise BiasError(f"need at least 2 patients for PCA; got {X.shape[0]}")
    pca = PCA(n_components=k, svd_solver="full", random_state=0).fit(X)
    return pca.transform(X), pca.explained_variance_ratio_


# ---------------------------------------------------------------- KS tests


def ks_tests(Z: np.ndarray, attrs: dict[str, np.ndarray], alpha: float = 0.05, correction: str = "bh",
             min_group: int = 5) -> pd.DataFrame:
    """Two-sample KS test on each PCA mode (column of ``Z``) for each pair of groups of each attribute.

    ``attrs`` maps attribute -> per-row group labels (None = unknown, skipped).
    The correction runs over all tests in the call (one encoder = one family).
    """
    from scipy.stats import ks_2samp

    rows = []
    for attr, lab in attrs.items():
        lab = _labels(lab)
        groups = sorted({g for g in lab.tolist() if g is not None})
        groups = [g for g in groups if (lab == g).sum() >= min_group]
        for ga, gb in itertools.combinations(groups, 2):
            a, b = Z[lab == ga], Z[lab == gb]
            for m in range(Z.shape[1]):
                res = ks_2samp(a[:, m], b[:, m])
                rows.append(dict(attribute=attr, group_a=ga, group_b=gb, mode=m + 1, statistic=float(res.statistic),
                                 p_value=float(res.pvalue), n_a=len(a), n_b=len(b)))
    df = pd.DataFrame(rows, columns=["attribute", "group_a", "group_b", "mode", "statistic", "p_value", "n_a", "n_b"])
    df["p_adjusted"] = adjust_pvalues(df["p_value"].to_numpy(), correction) if len(df) else []
    df["flagged"] = df["p_adjusted"] < alpha
    return df


# ---------------------------------------------------------------- separability


def knn_separability(X: np.ndarray, labels: np.ndarray, k: int = 10, n_perm: int = 500, seed: int = 0) -> dict[str, float]:
    """Balanced accuracy of a leave-one-out k-NN vote for the group, vs a permutation null.

    The neighbour graph is computed once; each permutation only re-labels it,
    so 500 permutations cost about as much as one k-NN query. Returns value,
    chance (1/groups), null mean and 95th percentile, and the permutation p.
    """
    from sklearn.neighbors import NearestNeighbors

    lab = _labels(labels)
    ok = np.array([g is not None for g in lab])
    X, lab = X[ok], lab[ok]
    classes = sorted(set(lab.tolist()))
    if len(classes) < 2:
        raise BiasError(f"separability needs two or more groups; found {classes}")
    y = np.array([classes.index(g) for g in lab])
    k = int(min(k, len(y) - 1))
    nn = NearestNeighbors(n_neighbors=k + 1).fit(X)
    nbr = nn.kneighbors(X, return_distance=False)[:, 1:]          # (N, k) excluding self
    rng = np.random.default_rng(seed)
    perms = np.stack([y] + [rng.permutation(y) for _ in range(n_perm)])  # (P+1, N)
    C = len(classes)
    votes = np.zeros((perms.shape[0], len(y), C))
    lab_nbr = perms[:, nbr]                                        # (P+1, N, k)
    for c in range(C):
        votes[:, :, c] = (lab_nbr == c).sum(-1)
    pred = votes.argmax(-1)                                        # (P+1, N)
    recall = np.stack([((pred == c) & (perms == c)).sum(1) / np.maximum((perms == c).sum(1), 1) for c in range(C)], 1)
    bacc = recall.mean(1)                                          # (P+1,)
    obs, null = bacc[0], bacc[1:]
    return dict(value=float(obs), chance=1.0 / C, null_mean=float(null.mean()),
                null_q95=float(np.quantile(null, 0.95)), p_value=float((1 + (null >= obs).sum()) / (1 + n_perm)),
                n=len(y), k=k)


# ---------------------------------------------------------------- subgroup performance


def youden_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """Score threshold maximising TPR - FPR over the rows given: the one global operating point.

    Give it *validation* scores: a threshold chosen on the test rows fits their
    noise, and TPR/FPR measured at it on the same rows are optimistic.
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, s)
    i = int(np.argmax(tpr - fpr))
    return float(min(thr[i], np.max(s)))


def _rates_rows(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TPR and FPR per replicate row of (R, N) labels / predictions."""
    pos = y.astype(bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = (pred & pos).sum(1) / pos.sum(1)
        fpr = (pred & ~pos).sum(1) / (~pos).sum(1)
    return tpr, fpr


@dataclass
class SubgroupResult:
    threshold: float | None
    by_group: pd.DataFrame      # index group; columns auroc, tpr, fpr, n, n_pos, n_neg, prevalence (+ _lo/_hi, _note)
    gaps: pd.DataFrame          # group_a, group_b, metric, value, ci_low, ci_high, p_value
    overall: dict[str, float] = field(default_factory=dict)


SUBGROUP_METRICS = ("auroc", "tpr", "fpr")


def too_few(metric: str, n: int, n_pos: int, n_neg: int, min_subgroup: int, min_events: int) -> str:
    """Why a group is too small for ``metric`` ('' when it is not).

    Why a rule: a TPR from 3 positives moves by a third with one exam; a number
    printed beside the others reads as a finding. 'too few' says what is missing.
    """
    if n < min_subgroup:
        return f"too few: {n} patients (fewer than {min_subgroup})"
    need = {"auroc": [("positives", n_pos), ("negatives", n_neg)], "tpr": [("positives", n_pos)],
            "fpr": [("negatives", n_neg)]}[metric]
    short = [f"{k} {v}" for k, v in need if v < min_events]
    return f"too few: {', '.join(short)} (fewer than {min_events})" if short else ""


def gap_permutation_p(y: np.ndarray, s: np.ndarray, in_a: np.ndarray, metric: str, threshold: float | None,
                      observed: float, n_perm: int, seed: int = 0) -> float:
    """Exact two-sided permutation p of a gap ``metric(a) - metric(b)`` between two groups' rows.

    Group labels are permuted *within* positives and within negatives, so each
    group keeps its counts of each class and the null is exactly "the score
    given the label does not depend on the group". p = (1 + #{|null gap| >=
    |observed|}) / (1 + n_perm). Why not a bootstrap-SE z test: with 50-200
    replicates the SE is itself noisy, and after Holm over ~24 gaps (z ~ 3.2)
    that noise inflated the null false-positive rate well above alpha. Rows
    are exams; with several exams per patient they are treated as independent.
    """
    if not np.isfinite(observed) or n_perm < 1:
        return float("nan")
    rng = np.random.default_rng(seed)
    n = len(y)
    masks = np.empty((n_perm, n), dtype=bool)
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        masks[:, idx] = rng.permuted(np.tile(in_a[idx], (n_perm, 1)), axis=1)
    n_a = int(in_a.sum())
    order = np.argsort(~masks, axis=1, kind="stable")                               # group a's rows first
    ia, ib = order[:, :n_a], order[:, n_a:]

    def value(idx):
        yi, si = y[idx], s[idx]
        if metric == "auroc":
            return auroc_rows(yi, si)
        tpr, fpr = _rates_rows(yi, si >= threshold)
        return tpr if metric == "tpr" else fpr

    null = value(ia) - value(ib)
    worse = ~np.isfinite(null) | (np.abs(null) >= abs(observed) - 1e-12)
    return float((1 + worse.sum()) / (1 + n_perm))


def subgroup_performance(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, clusters: np.ndarray | None = None,
                         threshold: float | None = None, n_boot: int = 1000, seed: int = 0, min_subgroup: int = 1,
                         min_events: int = 1, n_perm: int = 1000) -> SubgroupResult:
    """AUROC per group and TPR/FPR at one given threshold, with gaps, bootstrap CIs and gap p-values.

    Point estimates come from fairlearn's ``MetricFrame``. Its bootstrap is not
    used: one MetricFrame costs ~0.15 s here, so 1,000 replicates would take
    minutes on two cores. Replicates are vectorised instead (same definitions;
    the test checks the point estimates agree). The bootstrap is stratified by
    group and clustered by ``clusters`` (patients), so group sizes stay fixed
    and slices of one patient move together.

    ``threshold``: chosen beforehand (on validation scores, ``youden_threshold``);
    None leaves TPR and FPR out. A metric of a group below ``min_subgroup``
    patients or ``min_events`` positives/negatives is NaN with its ``<metric>_note``
    saying 'too few', and its gaps are not tested. Gap p-values come from
    ``n_perm`` label-stratified permutations (``gap_permutation_p``) and are
    raw: the caller corrects them over its family (``subgroup_rows``).
    """
    from fairlearn.metrics import MetricFrame, count, false_positive_rate, true_positive_rate

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(np.float64)
    g = _labels(groups)
    if not (len(s) == len(y) == len(g)):
        raise BiasError(f"scores, labels and groups must have one entry per row; got {len(s)}, {len(y)}, {len(g)}")
    ok = np.isfinite(s) & np.isfinite(y) & np.array([v is not None for v in g])
    clusters = np.arange(len(s)) if clusters is None else np.asarray(clusters)
    if not np.isin(y[ok], (0.0, 1.0)).all():   # a silent recast of other codes would be a wrong AUROC
        raise BiasError(f"subgroup performance needs 0/1 labels; got values {sorted(set(y[ok].tolist()))[:6]}: "
                        f"map the positive class to 1 and the negative to 0")
    s, y, g, clusters = s[ok], y[ok].astype(int), g[ok], clusters[ok]
    if len(np.unique(y)) < 2:
        raise BiasError("subgroup performance needs both positive and negative labels")
    thr = None if threshold is None else float(threshold)

    metrics = {"auroc": auroc, "prevalence": lambda a, b: float(np.mean(a)), "n_rows": count}
    if thr is not None:
        metrics["tpr"] = lambda a, b: true_positive_rate(a, (b >= thr).astype(int), pos_label=1)
        metrics["fpr"] = lambda a, b: false_positive_rate(a, (b >= thr).astype(int), pos_label=1)
    mf = MetricFrame(metrics=metrics, y_true=y, y_pred=s, sensitive_features=pd.Series(g, name="group"))
    point = mf.by_group
    reps: dict[str, dict[str, np.ndarray]] = {}
    extra: dict[str, dict[str, Any]] = {}
    for i, grp in enumerate(point.index):
        rows = np.flatnonzero(g == grp)
        e = extra[grp] = dict(n=len(np.unique(clusters[rows])), n_pos=int(y[rows].sum()), n_neg=int((1 - y[rows]).sum()))
        bidx = rows[cluster_boot_index(clusters[rows], n_boot, seed + i)]          # (R, n_g)
        yi, si = y[bidx], s[bidx]
        reps[grp] = {"auroc": auroc_rows(yi, si)}
        if thr is not None:
            reps[grp]["tpr"], reps[grp]["fpr"] = _rates_rows(yi, si >= thr)
        for m in SUBGROUP_METRICS:
            note = (too_few(m, e["n"], e["n_pos"], e["n_neg"], min_subgroup, min_events) if m in reps[grp]
                    else "no threshold: TPR/FPR need one chosen on validation scores")
            r = reps[grp][m][np.isfinite(reps[grp][m])] if not note else np.array([])
            lo, hi = np.percentile(r, [2.5, 97.5]) if len(r) else (np.nan, np.nan)
            e.update({m: np.nan if note else float(point.loc[grp, m]), f"{m}_lo": lo, f"{m}_hi": hi, f"{m}_note": note})
    by = pd.DataFrame.from_dict(extra, orient="index").join(point[["prevalence", "n_rows"]])
    by.index.name = point.index.name
    gap_rows = []
    for ga, gb in itertools.combinations(by.index, 2):
        for m in SUBGROUP_METRICS:
            if not (np.isfinite(by.loc[ga, m]) and np.isfinite(by.loc[gb, m])):
                continue
            d = reps[ga][m] - reps[gb][m]
            d = d[np.isfinite(d)]
            value = float(by.loc[ga, m] - by.loc[gb, m])
            lo, hi = np.percentile(d, [2.5, 97.5]) if len(d) else (np.nan, np.nan)
            pair = (g == ga) | (g == gb)
            p = gap_permutation_p(y[pair], s[pair], g[pair] == ga, m, thr, value, n_perm, seed)
            gap_rows.append(dict(group_a=ga, group_b=gb, metric=m, value=value, ci_low=float(lo), ci_high=float(hi),
                                 p_value=p))
    overall = {k: float(v) for k, v in mf.overall.items()}
    gaps = pd.DataFrame(gap_rows, columns=["group_a", "group_b", "metric", "value", "ci_low", "ci_high", "p_value"])
    return SubgroupResult(threshold=thr, by_group=by, gaps=gaps, overall=overall)


def resample_balanced(labels: np.ndarray, groups: np.ndarray, age: np.ndarray | None = None, n_age_bins: int = 3,
                      seed: int = 0) -> np.ndarray:
    """Row indices of a resampled test set where every group has the pooled prevalence and age mix.

    Each group keeps its size; within it, rows are drawn with replacement from
    each (label, age bin) cell in the pooled proportions. A cell that a group
    lacks is left out for every group (and the proportions renormalised), so a
    remaining gap cannot come from prevalence or age. Use exam-level rows.
    """
    y = np.asarray(labels)
    g = _labels(groups)
    cell = y.astype(str)
    if age is not None:
        cell = np.char.add(np.char.add(cell, "|"), age_bins(age, n_age_bins).astype(str))
    present = [grp for grp in sorted(set(g.tolist()) - {None})]
    cells = sorted(set(cell.tolist()))
    cells = [c for c in cells if all(np.any((g == grp) & (cell == c)) for grp in present)]
    if not cells:
        raise BiasError("no (label, age bin) cell is shared by every group; resampling to equal prevalence is impossible")
    pooled = np.array([np.sum(cell == c) for c in cells], dtype=np.float64)
    pooled /= pooled.sum()
    rng = np.random.default_rng(seed)
    out = []
    for grp in present:
        n_g = int(np.sum(g == grp))
        counts = np.floor(pooled * n_g).astype(int)
        counts[np.argsort(-(pooled * n_g - counts))[: n_g - counts.sum()]] += 1   # largest remainders
        for c, n_c in zip(cells, counts):
            rows = np.flatnonzero((g == grp) & (cell == c))
            out.append(rng.choice(rows, size=n_c, replace=True))
    return np.concatenate(out)


# ---------------------------------------------------------------- sentences

_NAMES = {"age": "Age", "sex": "Sex", "race": "Race", "control_group": "The control attribute"}
_PRESENT = "That shows the information is present, not that a downstream model uses it."


def _attr_name(attr: str) -> str:
    return _NAMES.get(attr, attr.replace("_", " ").capitalize())


def probe_sentence(attr: str, metric: str, est: Estimate, delta: Estimate | None, extra: str = "",
                   present: bool | None = None, p_adj: float | None = None, test: str = "") -> str:
    """One plain-language sentence pair for a probe result.

    ``present``: whether the corrected permutation test detected the attribute;
    None = no test was run, and then the sentence says so instead of reading
    detection off the bootstrap CI (which gave 6 false positives in 60 noise
    runs: it is conditional on the fitted probes). ``test`` names the test and
    its correction.
    """
    name = _attr_name(attr)
    if p_adj is not None and np.isfinite(p_adj):
        ptxt = f"; permutation p {p_adj:.2g} after correction" + (f" ({test})" if test else "")
    else:
        ptxt = "; no permutation test was run, so no detection is claimed"
    if metric in ("auroc", "macro_auroc"):
        label = "AUROC" if metric == "auroc" else "macro AUROC"
        head = (f"{name} is predictable from this encoder's embeddings" if present
                else f"{name} is not detectably predictable from this encoder's embeddings")
        s = f"{head} ({label} {est.value:.2f}, CI {est.ci_low:.2f}–{est.ci_high:.2f}{ptxt})"
        if delta is not None:
            word = "higher" if delta.value >= 0 else "lower"
            s += f", {abs(delta.value):.2f} {word} than random init (CI {delta.ci_low:+.2f} to {delta.ci_high:+.2f})"
        return s + "." + (f" {_PRESENT}" if present else "")
    if metric == "mae":
        unit = " years" if attr == "age" else ""
        s = f"{name} can be estimated from this encoder's embeddings with a mean absolute error of {est.value:.1f}{unit} (CI {est.ci_low:.1f}–{est.ci_high:.1f}{extra})"
        if delta is not None:
            word = "better" if delta.value <= 0 else "worse"
            s += f", {abs(delta.value):.1f}{unit} {word} than random init (CI {delta.ci_low:+.1f} to {delta.ci_high:+.1f})"
        return s + "."
    if metric == "r2":
        s = (f"A linear probe on this encoder's embeddings explains {'part' if present else 'no reliable part'} of the "
             f"variance of {name.lower()} (R² {est.value:.2f}, CI {est.ci_low:.2f} to {est.ci_high:.2f}{ptxt})")
        if delta is not None:
            s += f", {delta.value:+.2f} vs random init (CI {delta.ci_low:+.2f} to {delta.ci_high:+.2f})"
        return s + "." + (f" {_PRESENT}" if present else "")
    return f"{name}: {metric} {est.value:.3g}."


def ks_sentence(attr: str, ga: str, gb: str, mode: int, stat: float, p_adj: float, flagged: bool) -> str:
    if flagged:
        return (f"Along PCA mode {mode}, the embeddings of {attr} groups {ga} and {gb} differ in distribution "
                f"(KS D = {stat:.2f}, adjusted p = {p_adj:.3g}).")
    return (f"Along PCA mode {mode}, no distribution difference between {attr} groups {ga} and {gb} survives "
            f"correction (KS D = {stat:.2f}, adjusted p = {p_adj:.2g}).")


def separability_sentence(attr: str, r: dict[str, float], flagged: bool, p_adj: float | None = None,
                          test: str = "") -> str:
    verb = "cluster" if flagged else "do not cluster detectably"
    adj = f", {p_adj:.2g} after correction" if p_adj is not None else ""
    return (f"Patients' {attr} groups {verb} in this embedding: a {r['k']}-nearest-neighbour vote recovers {attr} with "
            f"balanced accuracy {r['value']:.2f} against {r['chance']:.2f} expected by chance "
            f"(permutation p = {r['p_value']:.3g}{adj}" + (f"; {test}" if test else "") + ").")


_METRIC_LABEL = {"auroc": "AUROC", "tpr": "true-positive rate", "fpr": "false-positive rate"}


def group_sentence(attr: str, grp: str, metric: str, r: pd.Series, thr_txt: str) -> str:
    """The PE model's metric in one group, or why there is no number ('too few', no threshold)."""
    label = _METRIC_LABEL[metric]
    counts = f"n = {int(r['n'])} patients, {int(r['n_pos'])} positive"
    if not np.isfinite(r[metric]):
        why = r.get(f"{metric}_note") or "not computable (a class is missing)"
        return f"PE model {label} for {attr} {grp}: no number, {why} ({counts})."
    tail = f"; {thr_txt}" if metric != "auroc" else ""
    return (f"PE model {label} for {attr} {grp}: {r[metric]:.2f} (CI {r[f'{metric}_lo']:.2f}–{r[f'{metric}_hi']:.2f}, "
            f"{counts}{tail}).")


def subgroup_sentence(attr: str, metric: str, ga: str, gb: str, va: float, vb: float, gap: float, lo: float, hi: float,
                      p_adj: float | None = None, n_tests: int = 1, alpha: float = 0.05) -> str:
    label = _METRIC_LABEL[metric]
    if p_adj is None:
        verdict = "could not be tested"
    elif p_adj < alpha:
        verdict = f"larger than sampling variation explains (permutation p {p_adj:.2g} after Holm over {n_tests} gaps)"
    else:
        verdict = f"within sampling variation (permutation p {p_adj:.2g} after Holm over {n_tests} gaps)"
    return (f"The PE model's {label} is {va:.2f} for {attr} {ga} and {vb:.2f} for {gb}; the gap of {gap:+.2f} "
            f"(CI {lo:+.2f} to {hi:+.2f}) is {verdict}.")


# ---------------------------------------------------------------- the analysis of one encoder


def _patient_table(E: np.ndarray, keys: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Mean-pool rows to patients; keep the patient attribute columns (first row per patient)."""
    if "patient_key" not in keys.columns:
        raise BiasError("embedding keys lack a patient_key column; re-run `ctssl embed`")
    Xp, pk = pool_by_group(E, keys["patient_key"].to_numpy())[:2]
    first = keys.drop_duplicates("patient_key").set_index("patient_key").loc[pk].reset_index()
    return Xp, first


def attribute_kind(attr: str, col: pd.Series) -> str:
    """Probe kind of an attribute: the fixed kind of age/sex/race, else from the values.

    Any column a user brings is analysed by what it holds: numbers with more
    than two distinct values are a regression target (BMI, a score), two
    distinct values a binary one, other labels a multiclass one.
    """
    if attr in ATTRIBUTE_KINDS:
        return ATTRIBUTE_KINDS[attr]
    vals = col.dropna()
    vals = vals[vals.astype(str) != ""]
    num = pd.to_numeric(vals, errors="coerce")
    if len(vals) and num.notna().all() and num.nunique() > 2:
        return "regression"
    return "binary" if vals.astype(str).nunique() == 2 else "multiclass"


def _probe_target(kind: str, attr: str, col: pd.Series) -> np.ndarray:
    if kind == "regression":
        return pd.to_numeric(col, errors="coerce").astype("float64").to_numpy()
    if kind == "binary":
        from ctssl_core.probes import _binary_codes

        return _binary_codes(attr, _labels(col.to_numpy(dtype=object)))
    return _labels(col.to_numpy(dtype=object))


def _group_labels(attr: str, col: pd.Series, n_age_bins: int) -> np.ndarray:
    """Group labels for KS / separability / subgroups: quantile bins for numeric attributes (age, BMI, ...)."""
    if attribute_kind(attr, col) == "regression":
        return age_bins(pd.to_numeric(col, errors="coerce").astype("float64").to_numpy(), n_age_bins)
    return _labels(col.to_numpy(dtype=object))


# ---------------------------------------------------------------- which attributes a store can analyse

KEY_COLUMNS = ("patient_key",)


def patient_attributes(store_root: str | Path) -> pd.DataFrame:
    """One row per patient: patient_key, age, sex, race and every key of the ``attributes`` JSON as a column.

    The pseudonymous key stays (to join with embedding rows); no identifier is
    stored in the catalog in the first place (the demographics adapter drops
    identifier-like columns), and ``analysable_attributes`` never offers one.
    """
    from ctssl_core.data.catalog import patients_table
    from ctssl_core.data.store import _expand_attributes

    return _expand_attributes(patients_table(store_root)).drop(columns=["attributes"])


def _looks_like_identifier(name: str) -> bool:
    import re

    from ctssl_core.data.adapters.demographics import IDENTIFIER_WORDS

    flat = re.sub(r"[^a-z0-9]", "", name.lower())
    return any(w in flat for w in IDENTIFIER_WORDS)


def analysable_attributes(table: pd.DataFrame | str | Path) -> dict[str, str]:
    """{attribute: probe kind} for every column that can be analysed, in table order.

    ``table``: a per-patient table (``patient_attributes``) or a store folder.
    Every column but the key counts, when it has at least two distinct known
    values; a column whose name looks like an identifier (name, birth date,
    MRN, ...) never does. Kinds follow ``attribute_kind``.
    """
    if not isinstance(table, pd.DataFrame):
        table = patient_attributes(table)
    out = {}
    for c in table.columns:
        if c in KEY_COLUMNS or _looks_like_identifier(c):
            continue
        vals = table[c].dropna()
        vals = vals[vals.astype(str) != ""]
        if vals.astype(str).nunique() >= 2:
            out[c] = attribute_kind(c, table[c])
    return out


def check_attributes(requested: tuple[str, ...] | list[str], known: dict[str, str]) -> None:
    """Raise ``BiasError`` naming the known attributes when ``requested`` holds one the store lacks.

    Why an error: a misspelt attribute used to be skipped silently, and the
    analysis then looked complete.
    """
    unknown = [a for a in requested if a not in known]
    if unknown:
        listing = ", ".join(f"{a} ({k})" for a, k in known.items()) or "none"
        raise BiasError(f"unknown attribute(s) {unknown}: this store can analyse {listing}. "
                        f"Use --set attributes=[...] with names from that list.")


def analyse_arrays(E: np.ndarray, keys: pd.DataFrame, ref: tuple[np.ndarray, pd.DataFrame] | None = None,
                   cfg: BiasConfig | None = None, emb_id: str = "", reference_emb_id: str | None = None,
                   progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Probes, KS tests and separability of one embedding (vs ``ref``) -> ``bias_results`` rows.

    Every test of the encoder is one family (``encoder_family``): a flag means
    the whole analysis holds its family-wise error rate (``cfg.correction``
    'holm') or false-discovery rate ('bh') at ``cfg.alpha``, whatever the
    number of attributes.
    """
    cfg = cfg or BiasConfig()
    say = progress or (lambda m: None)
    Xp, pt = _patient_table(E, keys)
    ref_p = _patient_table(*ref) if ref is not None else None
    rows: list[dict[str, Any]] = []
    base = dict(emb_id=emb_id, reference_emb_id=reference_emb_id)
    attrs = [a for a in cfg.attributes if a in pt.columns and pt[a].notna().sum() >= 2]
    n_slots = len(ANALYSES) * len(attrs)               # the family's (analysis, attribute) slots, at most
    probe_perm = enough_permutations(cfg.probe_perm, n_slots, cfg.alpha, "probe_perm", say)
    sep_perm = enough_permutations(cfg.n_perm, n_slots, cfg.alpha, "n_perm", say)

    # --- probes: detection by exact permutation test, CIs and deltas by bootstrap (description only)
    probes_out: dict[str, tuple[Any, dict]] = {}
    for attr in attrs:
        kind = attribute_kind(attr, pt[attr])
        say(f"probe {attr} ({kind})")
        kw = dict(n_splits=cfg.n_splits, n_boot=cfg.n_boot, seed=cfg.seed)
        try:
            res = probe(Xp, _probe_target(kind, attr, pt[attr]), pt["patient_key"].to_numpy(), kind,
                        n_perm=probe_perm, **kw)
            deltas = {}
            if ref_p is not None and attr in ref_p[1].columns:
                rres = probe(ref_p[0], _probe_target(kind, attr, ref_p[1][attr]), ref_p[1]["patient_key"].to_numpy(), kind, **kw)
                deltas = paired_delta(res, rres, n_boot=cfg.n_boot, seed=cfg.seed)
        except ProbeError as e:
            rows.append(dict(base, analysis="probe", attribute=attr, metric="error", sentence=f"{_attr_name(attr)} probe skipped: {e}"))
            continue
        probes_out[attr] = (res, deltas)

    # --- KS tests on top PCA modes (patient level)
    say("KS tests")
    Z, evr = pca_modes(Xp, cfg.n_modes)
    groups = {a: _group_labels(a, pt[a], cfg.n_age_bins) for a in attrs}
    ks = ks_tests(Z, groups, alpha=cfg.alpha, correction=cfg.correction, min_group=cfg.min_group)

    # --- separability (k-NN on top PCA dims)
    say("separability")
    Zs = pca_modes(Xp, cfg.sep_dims)[0]
    Zr = pca_modes(ref_p[0], cfg.sep_dims)[0] if ref_p is not None else None
    sep, ref_sep = {}, {}
    for a in attrs:
        lab = groups[a]
        keep = _big_groups(lab, cfg.min_group)
        if len(set(lab[keep].tolist())) < 2:
            continue
        sep[a] = knn_separability(Zs[keep], lab[keep], k=cfg.knn_k, n_perm=sep_perm, seed=cfg.seed)
        if ref_p is not None and a in ref_p[1].columns:
            rl = _group_labels(a, ref_p[1][a], cfg.n_age_bins)
            rk = _big_groups(rl, cfg.min_group)
            if len(set(rl[rk].tolist())) >= 2:
                ref_sep[a] = knn_separability(Zr[rk], rl[rk], k=cfg.knn_k, n_perm=1, seed=cfg.seed)

    # --- one family for the encoder
    probe_p = {a: r.p_value for a, (r, _) in probes_out.items() if r.p_value is not None and np.isfinite(r.p_value)}
    fam = encoder_family(probe_p, {a: r["p_value"] for a, r in sep.items()}, ks, cfg)
    ftxt = fam.describe(cfg)
    for attr, (res, deltas) in probes_out.items():
        p, pa = probe_p.get(attr), fam.adjusted.get(("probe", attr))
        detected = None if pa is None else bool(pa < cfg.alpha)
        for metric, est in res.metrics.items():
            d = deltas.get(metric)
            extra = f"; R² {res.metrics['r2'].value:.2f}" if metric == "mae" else ""
            rows.append(dict(base, analysis="probe", attribute=attr, metric=metric, value=est.value, ci_low=est.ci_low,
                             ci_high=est.ci_high, delta=d.value if d else None, delta_ci_low=d.ci_low if d else None,
                             delta_ci_high=d.ci_high if d else None, p_value=p, p_adjusted=pa, flagged=detected,
                             n=res.n_units,
                             sentence=probe_sentence(attr, metric, est, d, extra, detected, pa,
                                                     test=f"{probe_perm} permutations; {ftxt}")))
    for i, r in enumerate(ks.itertuples()):
        pa = float(fam.ks_adjusted[i])
        flagged = bool(pa < cfg.alpha)
        rows.append(dict(base, analysis="ks", attribute=r.attribute, group_a=r.group_a, group_b=r.group_b,
                         metric=f"ks_mode{r.mode}", value=r.statistic, p_value=r.p_value, p_adjusted=pa,
                         flagged=flagged, n=r.n_a + r.n_b,
                         sentence=ks_sentence(r.attribute, r.group_a, r.group_b, r.mode, r.statistic, pa, flagged)
                         + f" ({ftxt}.)"))
    for a, r in sep.items():
        pa = fam.adjusted[("separability", a)]
        flagged = bool(pa < cfg.alpha)
        rows.append(dict(base, analysis="separability", attribute=a, metric="knn_balanced_accuracy", value=r["value"],
                         ci_low=r["null_mean"], ci_high=r["null_q95"],
                         delta=(r["value"] - ref_sep[a]["value"]) if a in ref_sep else None,
                         p_value=r["p_value"], p_adjusted=float(pa), flagged=flagged, n=r["n"],
                         sentence=separability_sentence(a, r, flagged, pa, f"{sep_perm} permutations; {ftxt}")))
    return _finish(pd.DataFrame(rows))


ANALYSES = ("probe", "ks", "separability")


def _big_groups(lab: np.ndarray, min_group: int) -> np.ndarray:
    """Rows whose group is known and has at least ``min_group`` patients."""
    return np.array([x is not None and (lab == x).sum() >= min_group for x in lab], dtype=bool)


@dataclass
class Family:
    """Adjusted p-values of all tests of one encoder. ``adjusted`` maps ('probe'|'separability', attribute)
    to its adjusted p; ``ks_adjusted`` is aligned with the KS table's rows; ``n_slots`` counts the
    (analysis, attribute) pairs that share the family."""

    adjusted: dict[tuple[str, str], float]
    ks_adjusted: np.ndarray
    n_slots: int

    def describe(self, cfg: BiasConfig) -> str:
        how = "Holm" if cfg.correction == "holm" else "Benjamini-Hochberg"
        return f"{how} over the encoder's {self.n_slots} (analysis, attribute) tests"


def encoder_family(probe_p: dict[str, float], sep_p: dict[str, float], ks: pd.DataFrame, cfg: BiasConfig) -> Family:
    """Correct every test of one encoder together: probe and separability p per attribute, and the KS tests.

    Each (analysis, attribute) slot gets an equal share of alpha; the KS tests
    of one attribute split their slot's share (weighted Holm/BH,
    ``adjust_pvalues``). Why one family: correcting each analysis on its own
    lets the chance of *some* false flag grow with every analysis and
    attribute added; the null simulation (experiments/bias_null.py) measures
    the resulting family-wise rate.
    """
    keys = [("probe", a) for a in probe_p] + [("separability", a) for a in sep_p]
    ks_attr = ks["attribute"].tolist() if len(ks) else []
    ks_slots = sorted(set(ks_attr))
    n_slots = len(keys) + len(ks_slots)
    if n_slots == 0:
        return Family({}, np.array([]), 0)
    per_ks = {a: ks_attr.count(a) for a in ks_slots}
    p = np.array([probe_p[a] for a in probe_p] + [sep_p[a] for a in sep_p] + ks["p_value"].tolist(), dtype=np.float64)
    w = np.array([1.0] * len(keys) + [1.0 / per_ks[a] for a in ks_attr])
    adj = adjust_pvalues(p, cfg.correction, weights=w)
    return Family({k: float(v) for k, v in zip(keys, adj[: len(keys)])}, adj[len(keys):], n_slots)


def subgroup_threshold(val_scores: pd.DataFrame | None, cfg: BiasConfig) -> tuple[float | None, str]:
    """The TPR/FPR threshold and where it came from: Youden's J on validation scores, else ``cfg.threshold``.

    Never the test scores: a threshold fitted to the rows it is then measured
    on flatters TPR - FPR. Neither available -> None (TPR/FPR are left out).
    """
    if val_scores is not None:
        need = {"score", "label"}
        if not need <= set(val_scores.columns):
            raise BiasError(f"validation scores need columns {sorted(need)}; got {list(val_scores.columns)}")
        v = val_scores[np.isfinite(pd.to_numeric(val_scores["score"], errors="coerce"))
                       & np.isfinite(pd.to_numeric(val_scores["label"], errors="coerce"))]
        if v["label"].nunique() < 2:
            raise BiasError("validation scores need both positive and negative labels to choose a threshold; "
                            "give a larger validation split or set bias.threshold")
        return youden_threshold(v["label"].to_numpy().astype(int), v["score"].to_numpy()), "chosen on validation scores"
    if cfg.threshold is not None:
        return float(cfg.threshold), "set in the bias config"
    return None, "none: no validation scores and no bias.threshold"


def subgroup_rows(scores: pd.DataFrame, attrs: pd.DataFrame, cfg: BiasConfig | None = None, emb_id: str = "",
                  reference_emb_id: str | None = None, resample: bool = False,
                  val_scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """``bias_results`` rows of subgroup performance for a table of model scores.

    ``scores``: columns patient_key, score, label (one row per exam or slice) of
    the *test* split. ``attrs``: per-patient attributes (patient_key +
    age/sex/race/...). ``val_scores`` (score, label of the validation split)
    set the TPR/FPR threshold (``subgroup_threshold``). With ``resample`` the
    test set is first resampled to equal prevalence and age mix (analysis
    'subgroup_resampled'). Every gap of the call is one family, corrected with
    Holm; groups below ``cfg.min_subgroup`` patients / ``cfg.min_events``
    events say 'too few' instead of a number.
    """
    cfg = cfg or BiasConfig()
    need = {"patient_key", "score", "label"}
    if not need <= set(scores.columns):
        raise BiasError(f"scores table needs columns {sorted(need)}; got {list(scores.columns)}")
    scores = scores[np.isfinite(pd.to_numeric(scores["score"], errors="coerce"))
                    & np.isfinite(pd.to_numeric(scores["label"], errors="coerce"))]
    df = scores.merge(attrs.drop_duplicates("patient_key"), on="patient_key", how="left", suffixes=("", "_attr"))
    rows = []
    analysis = "subgroup_resampled" if resample else "subgroup"
    if df["label"].nunique() < 2:
        raise BiasError("subgroup performance needs both positive and negative labels among the scored exams")
    thr, thr_src = subgroup_threshold(val_scores, cfg)
    thr_txt = f"threshold {thr:.3g}, {thr_src}" if thr is not None else f"threshold {thr_src}"
    attrs_here = [a for a in cfg.attributes if a in df.columns]
    n_groups = [len({x for x in _group_labels(a, df[a], cfg.n_age_bins).tolist() if x is not None}) for a in attrs_here]
    n_perm = enough_permutations(cfg.n_perm, sum(len(SUBGROUP_METRICS) * k * (k - 1) // 2 for k in n_groups),
                                 cfg.alpha, "n_perm")
    gaps = []
    for attr in attrs_here:
        lab = _group_labels(attr, df[attr], cfg.n_age_bins)
        d = df
        try:
            if resample:
                ok = np.array([x is not None for x in lab])
                idx = resample_balanced(df["label"].to_numpy()[ok], lab[ok],
                                        df["age"].to_numpy()[ok] if "age" in df and attr != "age" else None,
                                        cfg.n_age_bins, cfg.seed)
                d, lab = df[ok].iloc[idx].reset_index(drop=True), lab[ok][idx]
            res = subgroup_performance(d["score"].to_numpy(), d["label"].to_numpy(), lab, d["patient_key"].to_numpy(),
                                       threshold=thr, n_boot=cfg.n_boot, seed=cfg.seed, min_subgroup=cfg.min_subgroup,
                                       min_events=cfg.min_events, n_perm=n_perm)
        except BiasError as e:
            rows.append(dict(analysis=analysis, attribute=attr, metric="error", sentence=f"{attr}: {e}"))
            continue
        for grp, r in res.by_group.iterrows():
            for m in SUBGROUP_METRICS:
                rows.append(dict(analysis=analysis, attribute=attr, group_a=grp, metric=m, value=r[m], ci_low=r[f"{m}_lo"],
                                 ci_high=r[f"{m}_hi"], n=int(r["n"]),
                                 sentence=group_sentence(attr, grp, m, r, thr_txt)))
        for g in res.gaps.itertuples():
            gaps.append((attr, g, res.by_group.loc[g.group_a, g.metric], res.by_group.loc[g.group_b, g.metric]))
    p = np.array([g.p_value for _, g, _, _ in gaps], dtype=np.float64)
    p_adj = adjust_pvalues(np.nan_to_num(p, nan=1.0), "holm") if len(p) else p
    for (attr, g, va, vb), pr, pa in zip(gaps, p, p_adj):
        tested = bool(np.isfinite(pr))
        rows.append(dict(analysis=analysis, attribute=attr, group_a=g.group_a, group_b=g.group_b, metric=f"{g.metric}_gap",
                         value=g.value, ci_low=g.ci_low, ci_high=g.ci_high, p_value=pr if tested else None,
                         p_adjusted=float(pa) if tested else None, flagged=bool(pa < cfg.alpha) if tested else None,
                         sentence=subgroup_sentence(attr, g.metric, g.group_a, g.group_b, va, vb, g.value, g.ci_low,
                                                    g.ci_high, float(pa) if tested else None, len(p), cfg.alpha)))
    out = pd.DataFrame(rows)
    out["emb_id"], out["reference_emb_id"] = emb_id, reference_emb_id
    return _finish(out)


BIAS_COLUMNS = ["emb_id", "reference_emb_id", "analysis", "attribute", "group_a", "group_b", "metric", "value", "ci_low",
                "ci_high", "delta", "delta_ci_low", "delta_ci_high", "p_value", "p_adjusted", "flagged", "sentence"]


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    for c in BIAS_COLUMNS + ["n"]:
        if c not in df.columns:
            df[c] = None
    return df[BIAS_COLUMNS + ["n"]]


def write_bias_results(store_root: str | Path, df: pd.DataFrame) -> int:
    """Replace the rows of each (emb_id, reference_emb_id, analysis) in ``df`` with ``df``'s rows."""
    from ctssl_core.results.store_api import replace_bias_results

    out = df[BIAS_COLUMNS].copy()
    for c in ("value", "ci_low", "ci_high", "delta", "delta_ci_low", "delta_ci_high", "p_value", "p_adjusted"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype("float64")
    out["flagged"] = out["flagged"].astype("boolean")
    replace_bias_results(store_root, out, BIAS_COLUMNS)
    return len(out)


def find_reference(store_root: str | Path, emb_id: str) -> str | None:
    """The random-init embedding of the same split, level and encoder as ``emb_id`` (newest), if any."""
    from ctssl_core.results.store_api import random_reference

    return random_reference(store_root, emb_id)


def with_attributes(keys: pd.DataFrame, table: pd.DataFrame, attributes: tuple[str, ...]) -> pd.DataFrame:
    """``keys`` plus each of ``attributes`` it lacks, from the per-patient ``table`` (joined on patient_key).

    Why: embedding keys carry the core demographics only; an attribute the user
    brought in the demographics CSV lives in ``patients.attributes``.
    """
    add = [a for a in attributes if a not in keys.columns and a in table.columns]
    if not add or "patient_key" not in keys.columns:
        return keys
    return keys.merge(table[["patient_key"] + add], on="patient_key", how="left")


def analyse_encoder(store_root: str | Path, emb_id: str, reference_emb_id: str | None = None,
                    cfg: BiasConfig | None = None, pe_scores: pd.DataFrame | None = None,
                    progress: Callable[[str], None] | None = None,
                    pe_val_scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """Full bias analysis of embedding ``emb_id`` against ``reference_emb_id`` (random init).

    ``reference_emb_id=None`` looks up the newest random-init embedding of the
    same split/level/encoder; none found -> no deltas. ``pe_scores`` (columns
    patient_key or series_key, score, label; one row per exam or slice, test split) adds subgroup-performance
    rows, raw and resampled; ``pe_val_scores`` (score, label of the same model on the validation split) choose
    the TPR/FPR threshold (``subgroup_threshold``). Writes the rows to ``bias_results`` and returns them.
    """
    from ctssl_core.embed import load_embeddings

    cfg = cfg or BiasConfig()
    E, keys, _ = load_embeddings(store_root, emb_id)
    attrs_table = patient_attributes(store_root)
    keys = with_attributes(keys, attrs_table, cfg.attributes)
    if reference_emb_id is None:
        reference_emb_id = find_reference(store_root, emb_id)
    ref = None
    if reference_emb_id is not None:
        Er, kr, _ = load_embeddings(store_root, reference_emb_id)
        ref = (Er, with_attributes(kr, attrs_table, cfg.attributes))
    df = analyse_arrays(E, keys, ref, cfg, emb_id=emb_id, reference_emb_id=reference_emb_id, progress=progress)
    if pe_scores is not None:
        attrs = keys.drop_duplicates("patient_key")[["patient_key"] + [a for a in cfg.attributes if a in keys.columns]]
        if "patient_key" not in pe_scores.columns and "series_key" in pe_scores.columns and "series_key" in keys.columns:
            series_patient = keys.drop_duplicates("series_key").set_index("series_key")["patient_key"]
            pe_scores = pe_scores.assign(patient_key=pe_scores["series_key"].map(series_patient))
        pe_attrs = pe_scores.drop(columns=[c for c in pe_scores.columns if c in attrs.columns and c != "patient_key"])
        df = pd.concat([df, subgroup_rows(pe_attrs, attrs, cfg, emb_id, reference_emb_id, val_scores=pe_val_scores),
                        subgroup_rows(pe_attrs, attrs, cfg, emb_id, reference_emb_id, resample=True,
                                      val_scores=pe_val_scores)], ignore_index=True)
    write_bias_results(store_root, df)
    return df


# ---------------------------------------------------------------- the planted-truth scorecard

SCORED_ANALYSES = ("probe", "ks", "separability")


def planted_truth(truth: dict[str, Any] | str | Path) -> dict[str, bool]:
    """{attribute: has a planted imaging correlate} from a synthetic cohort's ``truth.json``.

    ``ctssl synth`` writes ``planted_effects`` (attribute -> {"knob": name of
    its SynthConfig strength, or None for control_group, "effect": "none"}) and
    ``effect_sizes`` (knob -> strength). An attribute is planted when its knob
    is above 0; one without a knob is planted unless its effect is "none"
    (``site``: scanner noise and blur, independent of demographics).
    """
    import json

    if not isinstance(truth, dict):
        path = Path(truth)
        if path.is_dir():
            path = path / "truth.json"
        if not path.is_file():
            raise BiasError(f"no truth.json at {path}: the scorecard needs a cohort made by `ctssl synth`")
        truth = json.loads(path.read_text())
    effects, sizes = truth.get("planted_effects"), truth.get("effect_sizes") or {}
    if not isinstance(effects, dict):
        raise BiasError("truth.json has no planted_effects; regenerate the cohort with `ctssl synth`")
    out = {}
    for attr, eff in effects.items():
        if "knob" in eff:
            out[attr] = eff["knob"] is not None and float(sizes.get(eff["knob"], 0.0)) > 0
        else:
            out[attr] = str(eff.get("effect", "none")).lower() != "none"
    return out


def scorecard(results: pd.DataFrame, truth: dict[str, bool] | dict[str, Any] | str | Path,
              labels: dict[str, str] | None = None) -> pd.DataFrame:
    """Whether each analysis detects each attribute in each encoder, and whether that is right.

    Inputs:
      * ``results`` -- ``bias_results`` rows of one or more encoders, as
        ``analyse_arrays`` / ``analyse_encoder`` return them or
        ``results.read.bias_results`` reads them: columns emb_id, analysis,
        attribute, flagged, p_adjusted. Only the probe, KS and separability
        rows are scored (subgroup rows are about a PE model, not the embedding).
      * ``truth`` -- ``planted_truth``'s {attribute: planted} or what it reads
        (a truth.json path, its folder, or its parsed dict).
      * ``labels`` -- optional {emb_id: encoder name} (e.g. the init) for the table.

    Returns one row per (encoder, attribute, analysis) for the attributes the
    truth knows: planted, detected (any row of that analysis and attribute
    flagged; None when the analysis did not run), outcome ('hit', 'miss',
    'false positive', 'correct null', 'not run'), correct (detected ==
    planted; None when not run), the smallest corrected p and a sentence. A
    false positive is always an error of the analysis; a miss may be the
    encoder's (it does not carry the attribute: random init, or a window that
    clips the age correlate), which the sentence says.
    """
    need = {"emb_id", "analysis", "attribute", "flagged", "p_adjusted"}
    if not need <= set(results.columns):
        raise BiasError(f"scorecard needs bias_results columns {sorted(need)}; got {list(results.columns)}")
    is_map = isinstance(truth, dict) and bool(truth) and all(isinstance(v, bool) for v in truth.values())
    planted = truth if is_map else planted_truth(truth)
    labels = labels or {}
    rows = []
    scored = results[results["analysis"].isin(SCORED_ANALYSES)]
    for emb in pd.unique(results["emb_id"]):
        mine = scored[scored["emb_id"] == emb]
        name = labels.get(emb, emb)
        for attr, is_planted in planted.items():
            for analysis in SCORED_ANALYSES:
                d = mine[(mine["analysis"] == analysis) & (mine["attribute"] == attr)]
                d = d[d["flagged"].notna()]
                if d.empty:
                    detected, p = None, None
                else:
                    detected = bool(d["flagged"].astype(bool).any())
                    p = float(pd.to_numeric(d["p_adjusted"], errors="coerce").min())
                outcome, correct = _outcome(is_planted, detected)
                rows.append(dict(encoder=name, emb_id=emb, attribute=attr, analysis=analysis, planted=is_planted,
                                 detected=detected, outcome=outcome, correct=correct, p_adjusted=p,
                                 sentence=_scorecard_sentence(name, attr, analysis, is_planted, outcome, p)))
    return pd.DataFrame(rows, columns=["encoder", "emb_id", "attribute", "analysis", "planted", "detected", "outcome",
                                       "correct", "p_adjusted", "sentence"])


def _outcome(planted: bool, detected: bool | None) -> tuple[str, bool | None]:
    if detected is None:
        return "not run", None
    if planted:
        return ("hit", True) if detected else ("miss", False)
    return ("false positive", False) if detected else ("correct null", True)


def _scorecard_sentence(name: str, attr: str, analysis: str, planted: bool, outcome: str, p: float | None) -> str:
    what = {"probe": "the linear probe", "ks": "the KS tests", "separability": "the k-NN separability test"}[analysis]
    truth = "has a planted imaging correlate" if planted else "has no imaging correlate"
    ptxt = f" (smallest corrected p {p:.2g})" if p is not None and np.isfinite(p) else ""
    verdict = {
        "hit": f"{what} detects it{ptxt}: right.",
        "miss": f"{what} does not detect it{ptxt}: a miss. Either the encoder does not carry it or the test lacks "
                f"power at this size; random init and soft-tissue windows (which clip the lung-HU age effect) often do.",
        "false positive": f"{what} flags it{ptxt}: WRONG, a false positive of the analysis.",
        "correct null": f"{what} does not flag it{ptxt}: right.",
        "not run": f"{what} did not run on it (too few patients per group, or the attribute is missing).",
    }[outcome]
    return f"{name}: {attr} {truth}; {verdict}"
