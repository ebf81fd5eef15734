"""Downstream metrics as small pure NumPy functions.

Why not call scikit-learn directly: the bootstrap recomputes each metric
hundreds of times per run, and a rank-based AUROC in NumPy is ~20x faster
than ``sklearn.metrics.roc_auc_score``'s input validation. Each function here
is tested against scikit-learn on known inputs (tests/test_metrics.py), so the
numbers are the ones a reviewer would get with scikit-learn.

Undefined cases (one class only, empty input) return ``nan`` rather than
raising: a bootstrap resample with no positive patient is a normal event and
is dropped by the CI code with ``nanpercentile``.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

# RSNA STR PE competition weights (Kaggle 2020 evaluation page).
RSNA_IMAGE_WEIGHT = 0.07361963
RSNA_EXAM_WEIGHTS: dict[str, float] = {
    "negative_exam_for_pe": 0.0736196319,
    "indeterminate": 0.09202453988,
    "chronic_pe": 0.1042944785,
    "acute_and_chronic_pe": 0.1042944785,
    "central_pe": 0.1877300613,
    "leftsided_pe": 0.06257668712,
    "rightsided_pe": 0.06257668712,
    "rv_lv_ratio_gte_1": 0.2346625767,
    "rv_lv_ratio_lt_1": 0.0782208589,
}


def _binary(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    return y, s


def auroc(y_true, y_score) -> float:
    """Area under the ROC curve via the Mann-Whitney rank sum (ties count 1/2, like sklearn)."""
    y, s = _binary(y_true, y_score)
    if y.size == 0:
        return float("nan")
    return float(auroc_rows(y[None], s[None])[0])


def auroc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC per row of (R, N) binary labels ``y`` (positive: > 0.5, as ``auroc``; bool, 0/1 or -1/1) and
    scores ``s`` -> (R,): the one AUROC of ctssl, for a point estimate (R = 1), bootstrap replicates and
    permutations alike. Mann-Whitney rank sum with average ranks for ties; NaN for a row with one class."""
    r = rankdata(s, axis=1)                         # (R, N) average ranks for ties
    pos = np.asarray(y, dtype=np.float64) > 0.5
    n1 = pos.sum(1).astype(np.float64)              # (R,)
    n0 = y.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((r * pos).sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    auc[(n1 == 0) | (n0 == 0)] = np.nan
    return auc


def _curve_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (TP, FP) counts at each distinct threshold, highest score first."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    tp = np.cumsum(y_sorted)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return tp, fp


def auprc(y_true, y_score) -> float:
    """Average precision, the step-wise area sklearn's ``average_precision_score`` reports."""
    y, s = _binary(y_true, y_score)
    y = (y > 0.5).astype(np.float64)
    if y.sum() == 0:
        return float("nan")
    tp, fp = _curve_points(y, s)
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def sensitivity_at_specificity(y_true, y_score, specificity: float = 0.9) -> float:
    """Highest TPR on the ROC curve whose specificity is >= ``specificity``.

    This is the operating point a screening reader would pick: at most 10% of
    negatives flagged (for 0.9), as many positives caught as possible.
    """
    y, s = _binary(y_true, y_score)
    y = (y > 0.5).astype(np.float64)
    n1, n0 = y.sum(), y.size - y.sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    tp, fp = _curve_points(y, s)
    tpr = np.r_[0.0, tp / n1]
    fpr = np.r_[0.0, fp / n0]
    ok = fpr <= (1.0 - specificity) + 1e-12
    return float(tpr[ok].max())


def macro_ovr_auroc(y_true, proba, classes=None) -> float:
    """Macro one-vs-rest AUROC over the classes present in ``y_true`` (sklearn ``multi_class='ovr'``).

    ``proba`` is (N, K); column k scores class ``classes[k]`` (default 0..K-1).
    Classes absent from ``y_true`` are skipped, because their AUROC is undefined.
    """
    y = np.asarray(y_true).ravel()
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.size:
        raise ValueError(f"proba must be (N, K) with N={y.size}, got {p.shape}")
    classes = np.arange(p.shape[1]) if classes is None else np.asarray(classes)
    present = [k for k, c in enumerate(classes) if np.any(y == c)]
    if len(present) < 2:
        return float("nan")
    return float(np.mean([auroc(y == classes[k], p[:, k]) for k in present]))


def mae(y_true, y_pred) -> float:
    y, p = _binary(y_true, y_pred)
    return float(np.mean(np.abs(y - p))) if y.size else float("nan")


def r2(y_true, y_pred) -> float:
    """Coefficient of determination (sklearn ``r2_score``); nan when the truth is constant."""
    y, p = _binary(y_true, y_pred)
    ss_tot = np.sum((y - y.mean()) ** 2) if y.size else 0.0
    if ss_tot == 0:
        return float("nan")
    return float(1.0 - np.sum((y - p) ** 2) / ss_tot)


def dice(pred, target, eps: float = 0.0) -> float:
    """Dice of two binary masks (any shape). Both empty -> 1.0 (nothing to find, nothing found)."""
    a = np.asarray(pred).astype(bool)
    b = np.asarray(target).astype(bool)
    denom = a.sum() + b.sum()
    if denom == 0:
        return 1.0
    return float((2.0 * np.logical_and(a, b).sum() + eps) / (denom + eps))


def iou(pred, target) -> float:
    a = np.asarray(pred).astype(bool)
    b = np.asarray(target).astype(bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def dice_iou_per_slice(pred, target) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice Dice and IoU for (N, H, W) binary masks; slices empty in both score 1."""
    a = np.asarray(pred).astype(bool).reshape(len(pred), -1)    # (N, H*W)
    b = np.asarray(target).astype(bool).reshape(len(target), -1)
    inter = np.logical_and(a, b).sum(1).astype(np.float64)
    sa, sb = a.sum(1), b.sum(1)
    union = sa + sb - inter
    d = np.where(sa + sb > 0, 2 * inter / np.maximum(sa + sb, 1), 1.0)
    j = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return d, j


def per_nodule_dice(pred_volume, target_volume) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU for each true nodule: 3D connected components of the target (S, H, W).

    Each nodule is scored against the predicted voxels inside its dilated
    bounding region (the predicted components that touch it), so a large
    false positive elsewhere does not dilute a well-found nodule; false
    positives are what the per-slice Dice penalises.
    """
    from scipy import ndimage

    t = np.asarray(target_volume).astype(bool)
    p = np.asarray(pred_volume).astype(bool)
    if t.shape != p.shape or t.ndim != 3:
        raise ValueError(f"need two (S, H, W) volumes of one shape, got {t.shape} and {p.shape}")
    t_lab, n_t = ndimage.label(t)
    p_lab, _ = ndimage.label(p)
    dices, ious = [], []
    for k in range(1, n_t + 1):
        nod = t_lab == k
        touching = np.unique(p_lab[nod & p])
        touching = touching[touching > 0]
        pred_k = np.isin(p_lab, touching) if touching.size else np.zeros_like(p)
        dices.append(dice(pred_k, nod))
        ious.append(iou(pred_k, nod))
    return np.asarray(dices), np.asarray(ious)


def _bce(y: np.ndarray, p: np.ndarray, eps: float = 1e-15) -> np.ndarray:
    p = np.clip(p, eps, 1 - eps)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def rsna_weighted_log_loss(
    exam_of_image,
    image_labels,
    image_probs,
    exam_labels: dict[str, np.ndarray] | None = None,
    exam_probs: dict[str, np.ndarray] | None = None,
) -> float:
    """The RSNA STR PE competition metric, restricted to the labels given.

    Image level: every image k of exam i has weight ``0.07361963 * q_i``, q_i
    = the fraction of positive images in exam i (so negative exams carry no
    image-level weight). Exam level: each exam label j has weight w_j
    (``RSNA_EXAM_WEIGHTS``). The loss is the weighted sum of binary log losses
    over all of them divided by the sum of the weights.

    ``exam_labels`` / ``exam_probs`` map label name -> (E,) arrays ordered as
    ``np.unique(exam_of_image)``. Only labels present in both are scored: our
    models predict PE per slice, so the benchmark passes
    ``negative_exam_for_pe`` (1 - exam score) and the image labels.
    """
    exam = np.asarray(exam_of_image).ravel()
    y, p = _binary(image_labels, image_probs)
    if exam.size != y.size:
        raise ValueError("exam_of_image must have one entry per image")
    exams, inv = np.unique(exam, return_inverse=True)
    n_img = np.bincount(inv).astype(np.float64)
    n_pos = np.bincount(inv, weights=(y > 0.5).astype(np.float64))
    q = n_pos / n_img                                    # (E,) fraction positive
    w_img = RSNA_IMAGE_WEIGHT * q[inv]                   # (N,)
    num = float(np.sum(w_img * _bce(y, p)))
    den = float(np.sum(w_img))
    exam_labels, exam_probs = exam_labels or {}, exam_probs or {}
    for name in sorted(set(exam_labels) & set(exam_probs)):
        if name not in RSNA_EXAM_WEIGHTS:
            raise ValueError(f"unknown RSNA exam label {name!r}; known: {sorted(RSNA_EXAM_WEIGHTS)}")
        ye = np.asarray(exam_labels[name], dtype=np.float64)
        pe = np.asarray(exam_probs[name], dtype=np.float64)
        if ye.size != exams.size or pe.size != exams.size:
            raise ValueError(f"{name}: need one value per exam ({exams.size})")
        num += RSNA_EXAM_WEIGHTS[name] * float(np.sum(_bce(ye, pe)))
        den += RSNA_EXAM_WEIGHTS[name] * exams.size
    return num / den if den > 0 else float("nan")


def aggregate_exam(exam_of_slice, slice_probs, how: str = "topk", k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Exam score from slice probabilities: returns (exam ids sorted, scores).

    ``topk`` (default) = mean of the k highest slice probabilities. Why: PE is
    focal (a few slices of a long exam), so the mean drowns it; the max is
    the single noisiest slice; the top-k mean keeps the focal signal and
    averages away one spurious slice.
    """
    exam = np.asarray(exam_of_slice).ravel()
    p = np.asarray(slice_probs, dtype=np.float64).ravel()
    exams, inv = np.unique(exam, return_inverse=True)
    if how == "mean":
        return exams, np.bincount(inv, weights=p) / np.bincount(inv)
    if how not in ("max", "topk"):
        raise ValueError(f"unknown exam aggregation {how!r}: use max, mean or topk")
    kk = 1 if how == "max" else k
    order = np.lexsort((-p, inv))                     # by exam, then probability descending
    inv_s, p_s = inv[order], p[order]
    starts = np.r_[0, np.flatnonzero(np.diff(inv_s)) + 1]
    rank = np.arange(p_s.size) - np.repeat(starts, np.diff(np.r_[starts, p_s.size]))
    keep = rank < kk
    return exams, np.bincount(inv_s[keep], weights=p_s[keep]) / np.bincount(inv_s[keep])


def weighted_ranking_metrics(y_true, y_score, weights, specificity: float = 0.9) -> dict[str, np.ndarray]:
    """AUROC, average precision and sensitivity at ``specificity`` for many weightings at once.

    ``weights`` (R, N) holds, per bootstrap replicate, how often each row was
    drawn (0, 1, 2 ...). Sorting the scores once and taking weighted cumulative
    sums gives every replicate's ROC/PR curve in one vectorised pass: a
    patient bootstrap of 1,000 replicates costs one matrix cumsum instead of
    1,000 sorts. With all weights 1 the values equal :func:`auroc`,
    :func:`auprc` and :func:`sensitivity_at_specificity` (and scikit-learn):
    the trapezoid over tied-score steps is the Mann-Whitney 1/2 tie rule.
    Returns arrays of shape (R,); ``nan`` where a replicate lacks a class.
    """
    y, s = _binary(y_true, y_score)
    y = (y > 0.5).astype(np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if w.shape[1] != y.size:
        raise ValueError(f"weights must be (R, {y.size}), got {w.shape}")
    order = np.argsort(-s, kind="mergesort")
    last_of_tie = np.r_[np.flatnonzero(np.diff(s[order])), y.size - 1]
    ws = w[:, order]                                            # (R, N) in descending-score order
    tp = np.cumsum(ws * y[order], axis=1)[:, last_of_tie]       # (R, T) weighted true positives
    fp = np.cumsum(ws * (1 - y[order]), axis=1)[:, last_of_tie]
    P, N = tp[:, -1:], fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.concatenate([np.zeros_like(P), tp / P], 1)     # (R, T + 1)
        fpr = np.concatenate([np.zeros_like(N), fp / N], 1)
        auc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
        prec = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1), 0.0)
        ap = np.sum(np.diff(tpr, axis=1) * prec, axis=1)
        sens = np.max(np.where(fpr <= (1.0 - specificity) + 1e-12, tpr, -np.inf), axis=1)
    bad = (P[:, 0] <= 0) | (N[:, 0] <= 0)
    auc[bad] = np.nan
    sens[bad] = np.nan
    ap[P[:, 0] <= 0] = np.nan
    return {"auroc": auc, "auprc": ap, "sens_at_spec": sens}


def position_strata(exam, order, n_bins: int = 10) -> np.ndarray:
    """Decile (for ``n_bins=10``) of each slice's relative z-position within its exam: (N,) ints.

    Relative position = index / (last index of the exam), 0 = first slice, 1 =
    last, from the store's slice order (``idx_in_series``); the bins are those
    of ``finetune.position_scores``, so the position baseline is constant
    within a stratum.
    """
    e = np.asarray(exam).ravel()
    o = np.asarray(order, dtype=np.float64).ravel()
    if e.size != o.size:
        raise ValueError(f"exam ({e.size}) and order ({o.size}) need one entry per slice")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    _, inv = np.unique(e, return_inverse=True)
    last = np.zeros(inv.max() + 1 if inv.size else 0)
    np.maximum.at(last, inv, o)
    rel = o / np.maximum(last[inv], 1.0)
    return np.minimum((rel * n_bins).astype(np.int64), n_bins - 1)


def stratified_auroc(y_true, y_score, strata, weights=None):
    """AUROC over positive-negative pairs *within* one stratum only (e.g. slice-position decile).

    The standard stratified (a.k.a. within-stratum) concordance, as in the
    stratified C-index: equal to the per-stratum AUROCs averaged with weights
    n_pos * n_neg, so every within-stratum pair counts once and a stratum with
    one positive does not weigh as much as one with fifty (a plain mean of
    per-stratum AUROCs would). Any score that depends on the stratum alone
    (e.g. slice level, for PE) ties every pair it is allowed to compare and
    gets exactly 0.5; strata with a single class contribute no pair.

    ``weights`` (R, N): per-replicate row weights, as in
    :func:`weighted_ranking_metrics` (which computes each stratum's AUROC);
    then an (R,) array is returned, else a float. ``nan`` without a pair.
    """
    y, s = _binary(y_true, y_score)
    g = np.asarray(strata).ravel()
    if g.size != y.size:
        raise ValueError(f"strata ({g.size}) need one entry per row ({y.size})")
    single = weights is None
    w = np.ones((1, y.size)) if single else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if w.shape[1] != y.size:
        raise ValueError(f"weights must be (R, {y.size}), got {w.shape}")
    pos = (y > 0.5).astype(np.float64)
    num = np.zeros(w.shape[0])
    den = np.zeros(w.shape[0])
    for k in np.unique(g):
        m = g == k
        if pos[m].min() == pos[m].max():
            continue                                          # one class: no pair in this stratum
        pairs = (w[:, m] @ pos[m]) * (w[:, m] @ (1 - pos[m]))  # (R,) weighted pos x neg
        auc = weighted_ranking_metrics(y[m], s[m], w[:, m])["auroc"]
        num += np.where(pairs > 0, np.nan_to_num(auc) * pairs, 0.0)
        den += pairs
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    return float(out[0]) if single else out
