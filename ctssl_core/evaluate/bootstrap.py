"""Patient-level bootstrap confidence intervals.

Slices of one patient are correlated, so resampling slices would give CIs far
too narrow. We resample *patients* with replacement and recompute the metric
on every row (slice, exam, nodule) of the drawn patients, keeping a patient
drawn twice twice. 95% percentile intervals; resamples where the metric is
undefined (e.g. no positive patient drawn) are dropped, and the count kept is
reported as ``n_boot``.

Paired differences (pretrained minus random init) use the *same* resampled
patients for both models, which is what makes their CI narrow enough to be
useful: patient difficulty cancels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class CI:
    value: float
    low: float
    high: float
    n_boot: int   # resamples where the statistic was defined

    def as_tuple(self) -> tuple[float, float, float]:
        return self.value, self.low, self.high


class RowIndex:
    """Maps a multiset of drawn patients to the row indices of one table (slices, exams...)."""

    def __init__(self, row_patients: Sequence, patients: np.ndarray):
        rows = np.asarray(row_patients)
        pos = {p: i for i, p in enumerate(patients)}
        try:
            code = np.fromiter((pos[p] for p in rows), dtype=np.int64, count=rows.size)
        except KeyError as e:
            raise ValueError(f"row patient {e.args[0]!r} is not among the bootstrap patients") from None
        self.order = np.argsort(code, kind="stable")              # rows grouped by patient
        self.counts = np.bincount(code, minlength=len(patients))  # (P,)
        self.starts = np.r_[0, np.cumsum(self.counts)[:-1]]

    def rows(self, drawn: np.ndarray) -> np.ndarray:
        """Row indices for drawn patient positions (with repeats)."""
        counts = self.counts[drawn]
        total = int(counts.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        offsets = np.repeat(self.starts[drawn] - np.r_[0, np.cumsum(counts)[:-1]], counts)
        return self.order[np.arange(total) + offsets]


def draw_patients(n_patients: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, P) positions of resampled patients, fixed by seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_patients, size=(n_boot, n_patients))


def percentile_ci(point: float, samples: np.ndarray, alpha: float) -> CI:
    s = np.asarray(samples, dtype=np.float64)
    finite = s[~np.isnan(s)]
    if finite.size == 0:
        return CI(point, float("nan"), float("nan"), 0)
    lo, hi = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return CI(float(point), float(lo), float(hi), int(finite.size))


def bootstrap_stat(
    stat: Callable[[np.ndarray], float],
    n_patients: int,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> CI:
    """CI of ``stat(drawn_patient_positions)``; ``stat(np.arange(P))`` is the point estimate.

    Use :class:`RowIndex` inside ``stat`` to turn drawn patients into rows of
    each table the statistic needs (e.g. slices for slice AUROC and exams for
    exam AUROC from the same draw).
    """
    if n_patients < 1:
        raise ValueError("bootstrap needs at least one patient")
    point = stat(np.arange(n_patients))
    draws = draw_patients(n_patients, n_boot, seed)
    samples = np.array([stat(d) for d in draws], dtype=np.float64)
    return percentile_ci(point, samples, alpha)


def bootstrap_ci(
    metric: Callable[..., float],
    groups: Sequence,
    *arrays: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> CI:
    """95% CI of ``metric(*arrays)`` resampling the patients in ``groups`` (one per row)."""
    groups = np.asarray(groups)
    arrays = tuple(np.asarray(a) for a in arrays)
    for a in arrays:
        if len(a) != len(groups):
            raise ValueError(f"every array needs one row per group entry ({len(groups)}), got {len(a)}")
    patients = np.unique(groups)
    index = RowIndex(groups, patients)
    return bootstrap_stat(lambda d: metric(*(a[index.rows(d)] for a in arrays)),
                          len(patients), n_boot, seed, alpha)


def paired_diff_ci(
    metric: Callable[..., float],
    groups: Sequence,
    arrays_a: Sequence[np.ndarray],
    arrays_b: Sequence[np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> CI:
    """CI of ``metric(*arrays_a) - metric(*arrays_b)`` on the same resampled patients."""
    groups = np.asarray(groups)
    a_ = [np.asarray(a) for a in arrays_a]
    b_ = [np.asarray(b) for b in arrays_b]
    if any(len(x) != len(groups) for x in a_ + b_):
        raise ValueError("paired arrays must all have one row per group entry")
    patients = np.unique(groups)
    index = RowIndex(groups, patients)

    def stat(d):
        r = index.rows(d)
        return metric(*(x[r] for x in a_)) - metric(*(x[r] for x in b_))

    return bootstrap_stat(stat, len(patients), n_boot, seed, alpha)


def bootstrap_multi(
    stat: Callable[[np.ndarray], dict[str, float]],
    n_patients: int,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[dict[str, CI], dict[str, np.ndarray]]:
    """Like :func:`bootstrap_stat` for a statistic returning several metrics at once.

    Also returns the (n_boot,) replicate arrays. Two models scored on the same
    test patients with the same ``seed`` see identical draws, so replicate
    arrays can be subtracted for a paired difference, or fed through
    ``labels_needed`` per draw for its CI, long after the predictions are gone.

    A ``stat`` with a ``batch(counts)`` attribute (counts: (R, P) times each
    patient was drawn) is evaluated for 200 replicates at a time instead of
    one by one; it must agree with ``stat`` on the same draws.
    """
    if n_patients < 1:
        raise ValueError("bootstrap needs at least one patient")
    point = stat(np.arange(n_patients))
    draws = draw_patients(n_patients, n_boot, seed)
    batch = getattr(stat, "batch", None)
    if batch is not None:   # vectorised over replicates: counts (R, P) of each patient per draw
        parts = []
        for lo in range(0, n_boot, 200):
            d = draws[lo:lo + 200]
            counts = np.zeros((len(d), n_patients))
            np.add.at(counts, (np.repeat(np.arange(len(d)), n_patients), d.ravel()), 1.0)
            parts.append(batch(counts))
        samples = {m: np.concatenate([p[m] for p in parts]).astype(np.float64) for m in point}
    else:
        reps = [stat(d) for d in draws]
        samples = {m: np.array([r[m] for r in reps], dtype=np.float64) for m in point}
    cis = {m: percentile_ci(point[m], samples[m], alpha) for m in point}
    return cis, samples


def ci_from_samples(point: float, samples: np.ndarray, alpha: float = 0.05) -> CI:
    """Percentile CI from precomputed replicates (e.g. a paired difference of two models)."""
    return percentile_ci(point, samples, alpha)
