"""Label-fraction curves, "labels saved" and learning-speed ratios.

labels saved: the paper's PE result is a curve of metric vs. training-set
size. A reader wants one number: how much labelled data does this init need
to match random init trained on *all* labels? We interpolate the init's
curve linearly in log(fraction) (fractions are spaced geometrically, 1%, 5%,
25%, 100%) and report the crossing fraction ``labels_needed`` and
``labels_saved = 1 - labels_needed``; ``inf`` means "not reached".

learning speed: the paper reports segmentation from pretrained weights
"learned about twice as fast". We measure the step at which validation Dice
first reaches ``frac`` (0.9) of random init's best, interpolating linearly
between evaluation points, and report random-init steps / pretrained steps.
"""

from __future__ import annotations

import math

import numpy as np

NOT_REACHED = math.inf


def fraction_curve(fractions, values) -> tuple[np.ndarray, np.ndarray]:
    """Mean metric per distinct fraction (over seeds), fractions ascending. NaNs are ignored."""
    f = np.asarray(fractions, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    if f.size != v.size:
        raise ValueError("fractions and values differ in length")
    if np.any((f <= 0) | (f > 1)):
        raise ValueError(f"label fractions must lie in (0, 1], got {sorted(set(f.tolist()))}")
    uf = np.unique(f)
    means = np.array([np.nanmean(v[f == x]) if np.any(~np.isnan(v[f == x])) else np.nan for x in uf])
    return uf, means


def labels_needed(fractions, values, target: float, higher_is_better: bool = True) -> float:
    """Smallest fraction at which the (mean) curve reaches ``target``, interpolated in log-fraction.

    Returns the first fraction itself when the curve is already at target
    there (a bound: "at most that"), and ``inf`` when it never gets there.
    """
    f, v = fraction_curve(fractions, values)
    if not np.isfinite(target) or np.all(np.isnan(v)):
        return float("nan")
    sign = 1.0 if higher_is_better else -1.0
    gap = sign * (v - target)                 # >= 0 means reached
    ok = np.flatnonzero(np.nan_to_num(gap, nan=-np.inf) >= 0)
    if ok.size == 0:
        return NOT_REACHED
    k = int(ok[0])
    if k == 0:
        return float(f[0])
    g0, g1 = gap[k - 1], gap[k]
    if np.isnan(g0):
        return float(f[k])
    t = (0.0 - g0) / (g1 - g0)                # in (0, 1]: g0 < 0 <= g1
    lf = math.log(f[k - 1]) + t * (math.log(f[k]) - math.log(f[k - 1]))
    return float(math.exp(lf))


def steps_to_reach(steps, values, threshold: float) -> float:
    """First step at which ``values`` reaches ``threshold`` (linear between points); inf if never."""
    s = np.asarray(steps, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    if s.size != v.size:
        raise ValueError("steps and values differ in length")
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    hit = np.flatnonzero(v >= threshold)
    if hit.size == 0:
        return NOT_REACHED
    k = int(hit[0])
    if k == 0:
        return float(s[0])
    t = (threshold - v[k - 1]) / (v[k] - v[k - 1])
    return float(s[k - 1] + t * (s[k] - s[k - 1]))


def speed_ratio(steps_random, values_random, steps_init, values_init, frac: float = 0.9) -> tuple[float, float, float]:
    """(ratio, steps_random, steps_init) to reach ``frac`` x random init's best validation value.

    ratio > 1 means the init learns faster; 0.0 when the init never reaches
    the threshold (ratio undefined in the "faster" sense, shown as not reached).
    """
    if not 0 < frac <= 1:
        raise ValueError(f"frac must lie in (0, 1], got {frac}")
    best = float(np.nanmax(np.asarray(values_random, dtype=np.float64)))
    thr = frac * best
    t_r = steps_to_reach(steps_random, values_random, thr)
    t_i = steps_to_reach(steps_init, values_init, thr)
    if not np.isfinite(t_i):
        return 0.0, t_r, t_i
    return (t_r / t_i if t_i > 0 else float("inf")), t_r, t_i
