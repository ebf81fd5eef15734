"""Linear probes on frozen embeddings: how much age, sex and race a representation carries.

This is THE probe implementation of ctssl. The bias analysis (``bias.py``) and
the downstream ``demographics`` task both call it, so a probe number means the
same thing everywhere. Method after Gichoya et al. 2022 and Glocker et al. 2023:

* scikit-learn ridge probes on frozen embeddings -- regression on the value for
  age (MAE, R²), on the 0/1 indicator for sex (AUROC) and on one indicator per
  class for race (macro one-vs-rest AUROC): a least-squares linear classifier;
* the ridge penalty is chosen by cross-validation *inside* each training fold
  (nested CV, ``RidgeCV``), so a noise embedding gets a penalty strong enough
  to predict the training mean (R² ≈ 0) instead of overfitting (a fixed penalty
  gave R² of -0.5 to -1.1 on pure noise);
* standardisation is fitted inside each training fold (a ``Pipeline``), so the
  held-out fold never leaks into the scaler; features that are flat in the
  training fold are dropped first (``drop_flat_features``: dead channels of a
  random encoder otherwise blow up under standardisation);
* cross-validation groups by patient (``GroupKFold``), so no patient is in
  train and test at once; folds never look at the target, so the permutation
  test reruns exactly the same procedure;
* detection is an exact permutation test (``probe(n_perm=...)``), not the
  bootstrap CI;
* **scoring unit = patient.** Slice embeddings are mean-pooled per patient
  before probing (``pool_by_group``). Why: demographics are patient attributes,
  slices of one patient are strongly correlated, and a patient-level sample
  makes the bootstrap plain (resample patients) and the CI honest. Passing
  slice rows with ``groups`` still works (folds stay patient-grouped) and the
  bootstrap then resamples patients as clusters.
* bootstrap 95% CI over patients of the out-of-fold metric, and the difference
  to a reference encoder (random init) as a *paired* bootstrap: the same
  resampled patients score both encoders, so shared patient difficulty cancels.

Functions take arrays ``(X, y, groups)`` and return plain dataclasses; no I/O.
The bootstrap metrics are vectorised over replicates (ranks via
``scipy.stats.rankdata(axis=1)``), so 1,000 replicates cost milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ctssl_core.config import ConfigError
from ctssl_core.evaluate.metrics import auroc_rows

Kind = Literal["binary", "multiclass", "regression"]

# attribute -> probe kind used by the bias analysis and the demographics task
ATTRIBUTE_KINDS: dict[str, Kind] = {"sex": "binary", "race": "multiclass", "age": "regression"}
# headline metric per kind (first listed is the headline)
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("auroc",),
    "multiclass": ("macro_auroc",),
    "regression": ("mae", "r2"),
}
# metrics where lower is better (a negative delta is an improvement)
LOWER_IS_BETTER = {"mae"}


class ProbeError(ConfigError):
    """A probe cannot be fitted on the data given; the message says what is missing."""


@dataclass
class Estimate:
    value: float
    ci_low: float
    ci_high: float


@dataclass
class ProbeResult:
    """Out-of-fold predictions of one probe and its metrics with bootstrap CIs.

    ``units`` are the scoring units (patients): ``oof`` row i belongs to ``units[i]``.
    ``cluster`` maps each row to its bootstrap cluster (equal to the row when pooled).
    """

    kind: str
    metrics: dict[str, Estimate]
    y: np.ndarray                      # (N,) targets (class codes for classifiers)
    oof: np.ndarray                    # (N,) regression/binary score | (N, K) class probabilities
    units: np.ndarray                  # (N,) unit key of each row
    cluster: np.ndarray                # (N,) int cluster index for the bootstrap
    classes: list = field(default_factory=list)
    n_units: int = 0
    n_splits: int = 0
    boot: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> (n_boot,) replicates
    p_value: float | None = None       # permutation p of the headline metric (n_perm > 0)
    null: np.ndarray | None = None     # (n_perm,) headline metric on permuted targets

    @property
    def headline(self) -> str:
        return KIND_METRICS[self.kind][0]


# ---------------------------------------------------------------- pooling


def pool_by_group(X: np.ndarray, groups: np.ndarray, *ys: np.ndarray) -> tuple:
    """Mean-pool rows of ``X`` per group; take each ``y`` from the group's first row.

    Returns ``(Xg, keys, *yg)`` with groups in first-appearance order. Raises if a
    target varies within a group (a patient with two sexes is a catalog error).
    """
    X = np.asarray(X, dtype=np.float64)
    groups = np.asarray(groups)
    keys, first, inv = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first)                       # first-appearance order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    inv = rank[inv]
    keys, first = keys[order], first[order]
    counts = np.bincount(inv, minlength=len(keys)).astype(np.float64)
    Xg = np.zeros((len(keys), X.shape[1]))
    np.add.at(Xg, inv, X)
    Xg /= counts[:, None]                           # (G, D)
    out = [Xg, keys]
    for y in ys:
        y = np.asarray(y)
        yg = y[first]
        same = (y == yg[inv]) | (_isnan(y) & _isnan(yg[inv]))
        if not np.all(same):
            bad = keys[inv[~same][0]]
            raise ProbeError(f"target varies within group {bad!r}; patient attributes must be constant per patient")
        out.append(yg)
    return tuple(out)


def _isnan(a: np.ndarray) -> np.ndarray:
    return np.isnan(a) if a.dtype.kind == "f" else np.zeros(a.shape, bool)


# ---------------------------------------------------------------- vectorised metrics
# Each takes index matrices (R, N) of rows (one row of indices per replicate) so
# the same code computes the point estimate (R = 1, identity) and the bootstrap.


def metric_rows(kind: str, metric: str, y: np.ndarray, oof: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Metric for each replicate row of ``idx`` (R, N) -> (R,)."""
    return metric_arrays(kind, metric, y[idx], oof[idx])


def metric_arrays(kind: str, metric: str, Y: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Metric per row of (R, N) targets ``Y`` and (R, N) scores ``S`` ((R, N, K) for macro AUROC) -> (R,).

    Rows are bootstrap replicates or permutations; one code path scores both.
    """
    if metric == "auroc":
        return auroc_rows(Y, S)
    if metric == "macro_auroc":
        k = S.shape[2]
        per = np.stack([auroc_rows(Y == c, S[..., c]) for c in range(k)], 1)  # (R, K)
        present = [c for c in range(k) if np.any(Y == c)]
        with np.errstate(invalid="ignore"):
            return np.nanmean(per[:, present], 1) if present else np.full(len(Y), np.nan)
    if metric == "mae":
        return np.abs(Y - S).mean(1)
    if metric == "r2":
        ss_res = ((Y - S) ** 2).sum(1)
        ss_tot = ((Y - Y.mean(1, keepdims=True)) ** 2).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(ss_tot > 0, 1 - ss_res / ss_tot, np.nan)
    raise ProbeError(f"unknown probe metric {metric!r}; choose one of auroc, macro_auroc, mae, r2")


def cluster_boot_index(cluster: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, N') row indices: resample clusters with replacement, keep all rows of each.

    With one row per cluster (the pooled case) N' = N. With several rows per
    cluster the rows are expanded to a fixed width by resampling within the
    drawn clusters' rows proportionally -- we take the simple exact route of
    concatenating rows and trimming/padding to N by cycling, which keeps the
    cluster structure and fixed-shape arrays.
    """
    rng = np.random.default_rng(seed)
    cluster = np.asarray(cluster)
    n = len(cluster)
    uniq, inv = np.unique(cluster, return_inverse=True)
    if len(uniq) == n:                               # one row per cluster
        return rng.integers(0, n, size=(n_boot, n))
    rows_of = np.split(np.argsort(inv, kind="stable"), np.cumsum(np.bincount(inv))[:-1])
    out = np.empty((n_boot, n), dtype=np.int64)
    for b in range(n_boot):
        pick = rng.integers(0, len(uniq), size=len(uniq))
        rows = np.concatenate([rows_of[c] for c in pick])
        out[b] = np.resize(rows, n)
    return out


def _estimate(point: float, reps: np.ndarray) -> Estimate:
    reps = reps[np.isfinite(reps)]
    if len(reps) == 0:
        return Estimate(float(point), float("nan"), float("nan"))
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return Estimate(float(point), float(lo), float(hi))


# ---------------------------------------------------------------- fitting


def _encode_classes(y: np.ndarray) -> tuple[np.ndarray, list]:
    classes = sorted({v for v in y.tolist()}, key=str)
    code = {c: i for i, c in enumerate(classes)}
    return np.array([code[v] for v in y.tolist()], dtype=np.int64), classes


def _folds(groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped folds that never look at the target.

    Why target-blind: the permutation test refits the probe on permuted targets
    and must run exactly the same procedure as on the real ones. Folds
    stratified on the real labels would be a different procedure for every
    permutation (and could not be shared across them). With one row per patient
    (pooled) grouping is implicit and a shuffled ``KFold`` is used; otherwise
    ``GroupKFold``.
    """
    from sklearn.model_selection import GroupKFold, KFold

    z = np.zeros(len(groups))
    if len(np.unique(groups)) == len(groups):
        return list(KFold(n_splits=n_splits, shuffle=True, random_state=seed).split(z))
    return list(GroupKFold(n_splits=n_splits).split(z, z, groups))


# a feature whose training-fold std is below this fraction of the median feature std is dropped
FLAT_REL_STD = 1e-3
# ridge penalties searched inside each training fold (on standardised features): from almost none to so
# strong that the probe predicts the training mean, which is what a noise embedding deserves
PENALTIES: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 6, 9))
# permutations refitted together (as extra target columns of one ridge fit); bounds memory
PERM_CHUNK = 1024


def drop_flat_features(X_train: np.ndarray, rel: float = FLAT_REL_STD) -> np.ndarray:
    """Column mask of features that vary in the training fold (std > rel x the median std).

    Why: a randomly initialised encoder has near-dead channels (std ~1e-7). Standardising
    divides by that std, so a test-fold wobble of 1e-5 becomes a 100-sigma input and the
    probe's predictions explode (R^2 of -30 and an age MAE of 37 years were seen). Dropping
    them changes nothing for a healthy embedding and makes the probe measure what is there.
    """
    sd = np.asarray(X_train, dtype=np.float64).std(axis=0)
    ref = np.median(sd[sd > 0]) if (sd > 0).any() else 0.0
    keep = sd > rel * ref
    return keep if keep.any() else np.ones_like(keep)


def _targets(kind: str, y: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, K) regression targets of the probe: the value, the 0/1 label, or one column per class."""
    if kind == "multiclass":
        return (y[:, None] == np.arange(n_classes)[None]).astype(np.float64)
    return np.asarray(y, dtype=np.float64)[:, None]


def _ridge_fit_predict(X_tr: np.ndarray, T_tr: np.ndarray, X_te: np.ndarray, groups_tr: np.ndarray) -> np.ndarray:
    """Predictions (n_te, T) of a standardised ridge per target column, each with its own penalty.

    The penalty is chosen inside the training fold (nested CV): by sklearn's
    efficient leave-one-out (``RidgeCV(alpha_per_target=True)``) when each row
    is its own patient, by a patient-grouped inner ``GroupKFold`` otherwise
    (leave-one-row-out would leak a patient's other slices). A fixed penalty
    overfit ~128 features on ~190 patients: R^2 of -0.5 to -1.1 on pure noise.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_groups = len(np.unique(groups_tr))
    if n_groups == len(groups_tr):
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=PENALTIES, alpha_per_target=True))
        return model.fit(X_tr, T_tr).predict(X_te).reshape(len(X_te), -1)
    cv = list(GroupKFold(n_splits=min(3, n_groups)).split(X_tr, groups=groups_tr))
    out = np.empty((len(X_te), T_tr.shape[1]))
    for j in range(T_tr.shape[1]):
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=PENALTIES, cv=cv))
        out[:, j] = model.fit(X_tr, T_tr[:, j]).predict(X_te)
    return out


def _cv_oof(X: np.ndarray, T: np.ndarray, cluster: np.ndarray, n_splits: int, seed: int,
            scores: bool = False) -> np.ndarray:
    """Out-of-fold predictions (N, T) of every target column of ``T`` (N, T).

    ``scores=True`` (class probes) drops each fold's intercept (the training
    mean of the indicator). Why: AUROC pools scores across folds, and a fold
    whose training part has fewer positives has more in its test part, so the
    intercept is anti-correlated with the held-out labels: on noise, where the
    chosen penalty leaves little but the intercept, the pooled AUROC fell to
    0.35. Without it the scores of a noise embedding are ~0 and the AUROC ~0.5.

    BLAS is held to one thread: patient-level probe problems are small, and on
    a shared 2-core machine threaded BLAS made each fit ~5x slower (0.18 s vs
    0.04 s for 240 x 16 under load).
    """
    from threadpoolctl import threadpool_limits

    oof = np.zeros(T.shape)
    with threadpool_limits(limits=1):
        for tr, te in _folds(cluster, n_splits, seed):
            cols = drop_flat_features(X[tr])                 # fitted on the training fold only
            oof[te] = _ridge_fit_predict(X[tr][:, cols], T[tr], X[te][:, cols], cluster[tr])
            if scores:
                oof[te] -= T[tr].mean(0)
    return oof


def binary_oof(X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_splits: int = 2, seed: int = 0) -> np.ndarray:
    """Out-of-fold scores (N,) of the binary linear probe: the same nested-CV ridge as ``probe``, without its
    pooling, bootstrap or permutations, for a cheap monitor (pretraining's online probe, every few steps).

    Rows are folded by ``groups`` (patients) when each training fold keeps at least two of them for the inner
    penalty search; with fewer patients (a tiny store) row by row, which lets one patient's slices sit on both
    sides: acceptable for a learning-curve monitor, never for a reported result (``probe``)."""
    X = np.asarray(X, dtype=np.float64)
    y01 = (np.asarray(y, dtype=np.float64) > 0.5).astype(np.float64)
    cluster = np.unique(np.asarray(groups), return_inverse=True)[1]
    if len(np.unique(cluster)) < 2 * n_splits:
        cluster = np.arange(len(y01))
    return _cv_oof(X, y01[:, None], cluster, n_splits, seed, scores=True)[:, 0]


def _scores(kind: str, oof: np.ndarray) -> np.ndarray:
    """(N,) score for regression/binary, (N, K) per-class scores for multiclass."""
    return oof if kind == "multiclass" else oof[:, 0]


def probe(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    kind: Kind,
    *,
    pool: bool = True,
    n_splits: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    n_perm: int = 0,
) -> ProbeResult:
    """Cross-validated linear probe of ``y`` from ``X`` (rows grouped by patient ``groups``).

    ``pool=True`` (default) mean-pools rows per patient first (see module doc).
    Rows with a missing target (NaN / None / '') are dropped.

    The probe is a standardised ridge regression whose penalty is chosen by
    cross-validation inside each training fold (``_ridge_fit_predict``); for
    classes it regresses the 0/1 class indicators (a least-squares linear
    classifier; scores are ranked for AUROC, they are not probabilities).
    Why ridge for classes too: all permutations of the test below are extra
    target columns of the same fit, so 300+ exact permutations cost about as
    much as one logistic fit with tuned C per permutation would cost ten.

    ``n_perm > 0`` adds an exact permutation test of the headline metric: the
    whole nested cross-validation is rerun on targets permuted between
    patients, and ``p = (1 + #{null at least as good}) / (1 + n_perm)``
    (``permutation_p``). Use it to decide whether an attribute is *detected*:
    the bootstrap CI is conditional on the fitted probes and misses the
    variability of fitting them; on pure noise (240 patients, 16 dims) its
    lower bound exceeded 0.5 in 6 of 60 runs, where the permutation test holds
    its level. The smallest possible p is ``1 / (1 + n_perm)``: choose
    ``n_perm`` so that it survives the multiplicity correction.
    """
    X = np.asarray(X)
    y = np.asarray(y, dtype=object if kind != "regression" else np.float64)
    groups = np.asarray(groups)
    if X.ndim != 2 or len(X) != len(y) or len(y) != len(groups):
        raise ProbeError(f"probe wants X (N, D), y (N,), groups (N,); got {X.shape}, {y.shape}, {groups.shape}")
    if kind not in KIND_METRICS:
        raise ProbeError(f"unknown probe kind {kind!r}; choose one of {list(KIND_METRICS)}")
    if not np.all(np.isfinite(X)):
        raise ProbeError("embeddings contain NaN or inf; re-run `ctssl embed` (the encoder may have diverged)")
    keep = np.array([v is not None and v == v and v != "" for v in y.tolist()])
    X, y, groups = X[keep], y[keep], groups[keep]
    if pool:
        X, units, y = pool_by_group(X, groups, y)
        cluster = np.arange(len(units))
    else:
        units = groups
        cluster = np.unique(groups, return_inverse=True)[1]
    n_units = len(np.unique(units))
    classes: list = []
    if kind != "regression":
        y, classes = _encode_classes(y)
        if len(classes) < 2:
            raise ProbeError(f"the {kind} probe needs at least two classes; found {classes}")
        min_count = np.bincount(np.unique(np.stack([cluster, y], 1), axis=0)[:, 1], minlength=len(classes)).min()
        if min_count < 2:
            raise ProbeError(
                f"a class has fewer than 2 patients ({dict(zip(classes, np.bincount(y, minlength=len(classes))))}); "
                f"merge rare labels or use more patients")
    else:
        y = y.astype(np.float64)
        if n_units < 3:
            raise ProbeError("the age probe needs at least 3 patients with a known value")
    n_splits_eff = int(min(n_splits, n_units // 2 if kind == "regression" else min_count))
    n_splits_eff = max(n_splits_eff, 2)
    T = _targets(kind, y, len(classes))
    oof = _scores(kind, _cv_oof(X, T, cluster, n_splits_eff, seed, scores=kind != "regression"))
    res = ProbeResult(kind=kind, metrics={}, y=y, oof=oof, units=units, cluster=cluster,
                      classes=classes, n_units=n_units, n_splits=n_splits_eff)
    ident = np.arange(len(y))[None]
    bidx = cluster_boot_index(cluster, n_boot, seed)
    for m in KIND_METRICS[kind]:
        point = metric_rows(kind, m, y, oof, ident)[0]
        reps = metric_rows(kind, m, y, oof, bidx)
        res.boot[m] = reps
        res.metrics[m] = _estimate(point, reps)
    if n_perm > 0:
        head = KIND_METRICS[kind][0]
        res.null = _permutation_null(X, y, T, cluster, kind, head, n_perm, n_splits_eff, seed)
        res.p_value = permutation_p(res.metrics[head].value, res.null, lower_is_better=head in LOWER_IS_BETTER)
    return res


def _permutation_null(X, y, T, cluster, kind, metric, n_perm, n_splits, seed) -> np.ndarray:
    """(n_perm,) headline metric of the nested-CV probe refitted on targets permuted between patients.

    Permutations are stacked as target columns (``PERM_CHUNK`` at a time): each
    column gets its own inner penalty search, so every permutation runs exactly
    the procedure the real targets ran.
    """
    rng = np.random.default_rng(seed + 1)
    _, first, inv = np.unique(cluster, return_index=True, return_inverse=True)
    idx = np.stack([_cluster_permutation(first, inv, rng) for _ in range(n_perm)])     # (P, N)
    K = T.shape[1]
    null = np.empty(n_perm)
    for s in range(0, n_perm, PERM_CHUNK):
        chunk = idx[s:s + PERM_CHUNK]                                                   # (B, N)
        Tp = T[chunk].transpose(1, 0, 2).reshape(len(y), -1)                            # (N, B*K)
        oof = _cv_oof(X, Tp, cluster, n_splits, seed, scores=kind != "regression").reshape(len(y), len(chunk), K).transpose(1, 0, 2)
        S = oof if kind == "multiclass" else oof[..., 0]
        null[s:s + len(chunk)] = metric_arrays(kind, metric, y[chunk], S)
    return null


def permutation_p(obs: float, null: np.ndarray, lower_is_better: bool = False) -> float:
    """Exact one-sided permutation p: ``(1 + #{null at least as extreme}) / (1 + len(null))``.

    The +1 counts the observed statistic as one of the permutations, which makes
    the test valid (never below its level) for any number of random
    permutations. A null value that could not be computed (NaN) counts as at
    least as extreme: conservative, never anti-conservative. An earlier version
    fitted a Gaussian to 10 permutations; under the null its false-positive rate
    was 3.1% at a nominal 1.25%.
    """
    null = np.asarray(null, dtype=np.float64)
    if not np.isfinite(obs) or len(null) == 0:
        return float("nan")
    with np.errstate(invalid="ignore"):
        worse = (null <= obs) if lower_is_better else (null >= obs)
    worse |= ~np.isfinite(null)
    return float((1 + worse.sum()) / (1 + len(null)))


def _cluster_permutation(first: np.ndarray, inv: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row index that permutes targets between clusters (patients): ``y[idx]`` keeps each patient's rows on one
    target. ``first``/``inv``: ``np.unique(cluster, return_index=True, return_inverse=True)``, computed once."""
    return first[rng.permutation(len(first))][inv]


def paired_delta(result: ProbeResult, reference: ProbeResult, n_boot: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """``result - reference`` per metric with a paired bootstrap CI over the shared units.

    Both probes must be pooled per patient; units present in only one are dropped
    (they are usually identical: the same split embedded by two encoders).
    """
    if result.kind != reference.kind:
        raise ProbeError(f"cannot compare a {result.kind} probe with a {reference.kind} probe")
    if len(np.unique(result.cluster)) != len(result.cluster) or len(np.unique(reference.cluster)) != len(reference.cluster):
        raise ProbeError("paired_delta needs patient-pooled probes (probe(..., pool=True))")
    shared, ia, ib = np.intersect1d(result.units, reference.units, return_indices=True)
    if len(shared) < 2:
        raise ProbeError("the two embeddings share fewer than 2 patients; embed the same split with both encoders")
    if result.classes != reference.classes:
        raise ProbeError(f"class sets differ: {result.classes} vs {reference.classes}")
    ya, yb = result.y[ia], reference.y[ib]
    oa, ob = result.oof[ia], reference.oof[ib]
    ident = np.arange(len(shared))[None]
    bidx = np.random.default_rng(seed).integers(0, len(shared), size=(n_boot, len(shared)))
    out = {}
    for m in KIND_METRICS[result.kind]:
        point = metric_rows(result.kind, m, ya, oa, ident)[0] - metric_rows(result.kind, m, yb, ob, ident)[0]
        reps = metric_rows(result.kind, m, ya, oa, bidx) - metric_rows(result.kind, m, yb, ob, bidx)
        out[m] = _estimate(point, reps)
    return out


def probe_attributes(
    X: np.ndarray, table, patient_col: str = "patient_key", attributes: tuple[str, ...] = ("age", "sex", "race"),
    **kw,
) -> dict[str, ProbeResult]:
    """Probe each demographic column of ``table`` (a DataFrame aligned with ``X``); skip absent columns."""
    groups = table[patient_col].to_numpy()
    out = {}
    for attr in attributes:
        if attr not in table.columns or table[attr].isna().all():
            continue
        kind = ATTRIBUTE_KINDS.get(attr, "multiclass")
        vals = table[attr].to_numpy()
        if kind == "binary":
            vals = _binary_codes(attr, vals)
        out[attr] = probe(X, vals, groups, kind, **kw)
    return out


def _binary_codes(attr: str, vals: np.ndarray) -> np.ndarray:
    """Map a two-label column to {0, 1} (sex: F=0, M=1; otherwise sorted order) keeping missing as None."""
    labels = sorted({v for v in vals.tolist() if v is not None and v == v and v != ""}, key=str)
    if attr == "sex" and set(labels) <= {"F", "M"}:
        labels = ["F", "M"]
    if len(labels) != 2:
        raise ProbeError(f"{attr} should have exactly two labels for a binary probe; found {labels}")
    return np.array([labels.index(v) if v in labels else None for v in vals.tolist()], dtype=object)
