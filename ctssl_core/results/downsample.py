"""Downsampling of long metric curves that keeps spikes visible, plus display smoothing.

Why: a browser chart with a million points per line is slow, and naive
every-k-th sampling hides exactly the loss spikes a researcher is looking for.
We cut the x range into equal-width buckets and keep, per bucket, the first,
last, minimum and maximum point (the "M4" aggregation of Jugel et al., VLDB
2014). The drawn line then touches every extreme the full line touches, with
at most ``4 * n_buckets`` points per series.

``minmax_downsample`` is the NumPy reference; ``m4_sql`` builds the same
aggregation for DuckDB so that long runs are reduced inside the database and
only the kept points travel to Python (``results/read.py`` uses it).
"""

from __future__ import annotations

import numpy as np

DEFAULT_MAX_POINTS = 4000  # per series; the dashboard ships at most this many


def buckets_for(max_points: int) -> int:
    """Number of buckets so that M4 keeps at most ``max_points`` points."""
    return max(1, int(max_points) // 4)


def minmax_downsample(x: np.ndarray, y: np.ndarray, max_points: int = DEFAULT_MAX_POINTS
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Keep first/last/min/max per equal-width x bucket; returns (x, y) sorted by x.

    Non-finite ``y`` values are dropped (they cannot be drawn). Series that are
    already short enough are returned unchanged (sorted).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D and the same length, got {x.shape} and {y.shape}")
    ok = np.isfinite(y) & np.isfinite(x)
    x, y = x[ok], y[ok]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    n = len(x)
    if n <= max_points:
        return x, y
    nb = buckets_for(max_points)
    span = x[-1] - x[0]
    if span <= 0:
        b = np.zeros(n, dtype=np.int64)
    else:
        b = np.minimum(np.floor((x - x[0]) / span * nb), nb - 1).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    lasts = np.r_[starts[1:] - 1, n - 1]
    by_y = np.lexsort((y, b))  # within each bucket, ascending y; bucket groups keep their positions
    keep = np.unique(np.concatenate([starts, lasts, by_y[starts], by_y[lasts]]))
    return x[keep], y[keep]


def m4_sql(source: str, group_cols: list[str], max_points: int = DEFAULT_MAX_POINTS) -> str:
    """SQL that applies the M4 reduction to ``source`` (columns: group_cols..., x, y).

    Same result as :func:`minmax_downsample` per group: groups with at most
    ``max_points`` rows pass through whole. Returns rows (group_cols..., x, y)
    ordered by group and x. ``source`` is a subquery; it must already exclude
    non-finite values.
    """
    g = ", ".join(group_cols)
    nb = buckets_for(max_points)
    mp = int(max_points)
    return f"""
    WITH src AS ({source}),
    rng AS (SELECT {g}, min(x) AS x0, max(x) AS x1, count(*) AS n FROM src GROUP BY {g}),
    b AS (
        SELECT src.*, rng.n, CASE WHEN rng.x1 > rng.x0
               THEN least(floor((src.x - rng.x0) / (rng.x1 - rng.x0) * {nb}), {nb - 1})
               ELSE 0 END AS bucket
        FROM src JOIN rng USING ({g})
    ),
    small AS (SELECT {g}, x, y FROM b WHERE n <= {mp}),
    agg AS (
        SELECT {g}, bucket,
               min(x) AS x_first, arg_min(y, x) AS y_first,
               max(x) AS x_last, arg_max(y, x) AS y_last,
               arg_min(x, y) AS x_min, min(y) AS y_min,
               arg_max(x, y) AS x_max, max(y) AS y_max
        FROM b WHERE n > {mp} GROUP BY {g}, bucket
    )
    SELECT * FROM small
    UNION ALL
    SELECT DISTINCT * FROM (
        SELECT {g}, x_first AS x, y_first AS y FROM agg
        UNION ALL SELECT {g}, x_last, y_last FROM agg
        UNION ALL SELECT {g}, x_min, y_min FROM agg
        UNION ALL SELECT {g}, x_max, y_max FROM agg
    )
    ORDER BY {g}, x
    """


def smooth_ema(y: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style debiased exponential moving average of the displayed points.

    ``weight`` in [0, 1): 0 returns ``y`` unchanged. Debiasing keeps the start of
    the curve from being pulled towards zero.
    """
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    y = np.asarray(y, dtype=np.float64)
    if weight == 0 or len(y) == 0:
        return y.copy()
    out = np.empty_like(y)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(y):  # sequential by nature; runs on <= max_points values
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm
    return out
