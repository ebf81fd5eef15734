"""Plotly figure builders for the dashboard (no Streamlit here), plus CT windowing for the viewer.

Why separate: figures are plain functions of DataFrames from
``results/read.py``, so tests and the benchmark can build and inspect them
(trace data, point counts) without a browser. Long curves arrive already
downsampled; :func:`max_points_per_trace` lets callers check the promise of
at most ~5,000 points per series.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ctssl_core.results.downsample import smooth_ema

PALETTE = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880", "#ff97ff",
           "#fecb52"]
REFERENCE_COLOR = "#7f7f7f"  # random init is always grey: the reference
# CT window presets: (level, width) in HU
WINDOWS = {"mediastinum": (40, 400), "lung": (-600, 1500), "bone": (400, 1800), "soft tissue (paper)": (50, 350)}


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 420) -> go.Figure:
    fig.update_layout(title=dict(text=title, y=0.98, yanchor="top"), xaxis_title=x, yaxis_title=y, height=height,
                      margin=dict(l=40, r=20, t=90, b=40),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0), template="plotly_white")
    return fig


def init_colors(inits) -> dict[str, str]:
    """Stable colour per init; random init is grey."""
    others = sorted(i for i in set(inits) if i != "random")
    out = {i: PALETTE[k % len(PALETTE)] for k, i in enumerate(others)}
    out["random"] = REFERENCE_COLOR
    return out


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def fraction_curves_fig(df: pd.DataFrame, task: str, metric: str, log_x: bool = True) -> go.Figure:
    """Metric vs label fraction, one line per init with a shaded 95% CI band."""
    fig = go.Figure()
    colors = init_colors(df.init)
    for init, g in df.groupby("init", sort=False):
        g = g.sort_values("fraction")
        c = colors[init]
        if g.ci_low.notna().all():
            fig.add_trace(go.Scatter(x=np.r_[g.fraction, g.fraction[::-1]], y=np.r_[g.ci_high, g.ci_low[::-1]],
                                     mode="lines", fill="toself", fillcolor=_rgba(c, 0.15), line=dict(width=0),
                                     hoverinfo="skip", showlegend=False, name=f"{init} CI", legendgroup=init))
        fig.add_trace(go.Scatter(x=g.fraction, y=g.value, mode="lines+markers", name=init, legendgroup=init,
                                 line=dict(color=c, width=3 if init != "random" else 2,
                                           dash="dash" if init == "random" else "solid"),
                                 customdata=np.c_[g.ci_low, g.ci_high],
                                 hovertemplate=f"{init}<br>fraction %{{x}}<br>{metric} %{{y:.3f}}"
                                               "<br>95% CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra></extra>"))
    fig = _layout(fig, f"{task}: {metric} vs label fraction", "label fraction", metric)
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def bars_fig(df: pd.DataFrame, title: str, metric: str, reference: float | None = None) -> go.Figure:
    """One bar per init with 95% CI error bars; random init grey; optional reference line."""
    from ctssl_core.results.read import init_order

    order = init_order(df.init)
    d = df.set_index("init").loc[order].reset_index()
    colors = init_colors(d.init)
    err = dict(type="data", symmetric=False, array=(d.ci_high - d.value).fillna(0),
               arrayminus=(d.value - d.ci_low).fillna(0))
    fig = go.Figure(go.Bar(x=d.init, y=d.value, error_y=err, marker_color=[colors[i] for i in d.init],
                           text=[f"{v:.3f}" for v in d.value], textposition="outside",
                           hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    if reference is not None:
        fig.add_hline(y=reference, line_dash="dot", line_color=REFERENCE_COLOR)
    lo = np.nanmin(d.ci_low.fillna(d.value))
    hi = np.nanmax(d.ci_high.fillna(d.value))
    pad = (hi - lo) * 0.3 + 1e-6
    fig.update_yaxes(range=[lo - pad, hi + pad])
    return _layout(fig, title, "strategy", metric, height=360)


def pairwise_fig(df: pd.DataFrame, a: str, b: str, metric: str) -> go.Figure:
    """A − B per label fraction with CI bars and a zero line."""
    fig = go.Figure(go.Scatter(
        x=df.fraction, y=df["diff"], mode="markers+lines",
        error_y=dict(type="data", symmetric=False, array=df.ci_high - df["diff"], arrayminus=df["diff"] - df.ci_low),
        hovertemplate="fraction %{x}<br>difference %{y:+.3f}<extra></extra>", name=f"{a} − {b}"))
    fig.add_hline(y=0, line_color=REFERENCE_COLOR, line_dash="dot")
    fig.update_xaxes(type="log")
    return _layout(fig, f"{a} − {b}: {metric} difference (95% CI)", "label fraction", f"Δ {metric}", height=340)


def curves_fig(df: pd.DataFrame, x_label: str = "step", log_y: bool = False, smoothing: float = 0.0,
               labels: dict[str, str] | None = None) -> go.Figure:
    """Overlaid metric curves, one WebGL line per (run, metric).

    With smoothing > 0 the raw (already downsampled) line is drawn faint and
    the EMA on top, so spikes stay visible.
    """
    fig = go.Figure()
    labels = labels or {}
    groups = list(df.groupby(["run_id", "name"], sort=True))
    for k, ((run, name), g) in enumerate(groups):
        c = PALETTE[k % len(PALETTE)]
        label = f"{labels.get(run, run)} · {name}"
        if smoothing > 0:
            fig.add_trace(go.Scattergl(x=g.x, y=g.y, mode="lines", line=dict(color=_rgba(c, 0.25), width=1),
                                       showlegend=False, hoverinfo="skip", name=label + " (raw)"))
            fig.add_trace(go.Scattergl(x=g.x, y=smooth_ema(g.y.to_numpy(), smoothing), mode="lines",
                                       line=dict(color=c, width=2), name=label))
        else:
            fig.add_trace(go.Scattergl(x=g.x, y=g.y, mode="lines", line=dict(color=c, width=1.5), name=label))
    fig = _layout(fig, "learning curves", x_label, "value", height=480)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


CONTINUOUS = {"age"}


def scatter_fig(points: pd.DataFrame, color_by: str, title: str, hover: list[str] | None = None) -> go.Figure:
    """2-D embedding scatter coloured by a patient attribute (categorical: one trace per group)."""
    hover = [h for h in (hover or ["slice_id", "age", "sex", "race", "site"]) if h in points.columns]
    custom = points[hover].astype(str).to_numpy() if hover else None
    tmpl = "<br>".join(f"{h}: %{{customdata[{i}]}}" for i, h in enumerate(hover)) + "<extra></extra>"
    fig = go.Figure()
    if color_by not in points.columns:
        fig.add_trace(go.Scattergl(x=points.x, y=points.y, mode="markers", marker=dict(size=4), name="points"))
    elif color_by in CONTINUOUS or (pd.api.types.is_float_dtype(points[color_by]) and points[color_by].nunique() > 12):
        fig.add_trace(go.Scattergl(x=points.x, y=points.y, mode="markers", name=color_by, customdata=custom,
                                   hovertemplate=tmpl,
                                   marker=dict(size=4, color=points[color_by], colorscale="Viridis",
                                               colorbar=dict(title=color_by), opacity=0.8)))
    else:
        vals = points[color_by].astype(str).where(points[color_by].notna(), "unknown")
        for k, v in enumerate(sorted(vals.unique())):
            m = (vals == v).to_numpy()
            fig.add_trace(go.Scattergl(x=points.x[m], y=points.y[m], mode="markers", name=v,
                                       customdata=custom[m] if custom is not None else None, hovertemplate=tmpl,
                                       marker=dict(size=4, color=PALETTE[k % len(PALETTE)], opacity=0.75)))
    fig = _layout(fig, title, "dim 1", "dim 2", height=440)
    return fig


def probe_fig(probes: pd.DataFrame) -> go.Figure:
    """Probe score per attribute: this encoder vs random init (value − delta), with CIs."""
    d = probes.sort_values("attribute")
    ref = d.value - d.delta
    fig = go.Figure([
        go.Bar(name="random init", x=d.attribute + " (" + d.metric + ")", y=ref, marker_color=REFERENCE_COLOR),
        go.Bar(name="this encoder", x=d.attribute + " (" + d.metric + ")", y=d.value, marker_color=PALETTE[0],
               error_y=dict(type="data", symmetric=False, array=(d.ci_high - d.value).fillna(0),
                            arrayminus=(d.value - d.ci_low).fillna(0))),
    ])
    fig.update_layout(barmode="group")
    return _layout(fig, "linear probes on frozen embeddings", "attribute (metric)", "probe score", height=360)


def ks_fig(ks: pd.DataFrame) -> go.Figure:
    """KS statistic per PCA mode and group pair; flagged (adjusted p < 0.05) pairs in red."""
    d = ks.assign(pair=ks.attribute + ": " + ks.group_a.astype(str) + " vs " + ks.group_b.astype(str))
    fig = go.Figure()
    for pair, g in d.groupby("pair", sort=True):
        fig.add_trace(go.Bar(x=g.metric, y=g.value, name=pair,
                             marker_line=dict(width=[2 if f else 0 for f in g.flagged.fillna(False)], color="red"),
                             hovertemplate="%{x}: KS %{y:.3f}<extra>" + pair + "</extra>"))
    fig.update_layout(barmode="group")
    return _layout(fig, "Kolmogorov–Smirnov statistic per PCA mode", "PCA mode", "KS statistic", height=340)


def subgroup_fig(sub: pd.DataFrame, metric: str) -> go.Figure:
    d = sub[sub.metric == metric].assign(group=lambda t: t.attribute + "=" + t.group_a.astype(str))
    fig = go.Figure(go.Bar(x=d.group, y=d.value, marker_color=PALETTE[2],
                           error_y=dict(type="data", symmetric=False, array=(d.ci_high - d.value).fillna(0),
                                        arrayminus=(d.value - d.ci_low).fillna(0))))
    return _layout(fig, f"PE model {metric.upper()} per subgroup", "subgroup", metric, height=320)


def histogram_fig(values: pd.Series, title: str, nbins: int | None = None) -> go.Figure:
    v = values.dropna()
    if pd.api.types.is_numeric_dtype(v):
        fig = go.Figure(go.Histogram(x=v, nbinsx=nbins or 20, marker_color=PALETTE[0]))
    else:
        counts = v.astype(str).value_counts().sort_index()
        fig = go.Figure(go.Bar(x=counts.index, y=counts.values, marker_color=PALETTE[0]))
    return _layout(fig, title, values.name or "", "patients", height=260)


def prevalence_fig(prev: pd.DataFrame) -> go.Figure:
    fig = go.Figure(go.Bar(x=prev.label, y=prev.prevalence, marker_color=PALETTE[1],
                           text=[f"{p:.1%}" if np.isfinite(p) else "–" for p in prev.prevalence],
                           textposition="outside",
                           customdata=np.c_[prev.positive, prev.known],
                           hovertemplate="%{x}: %{customdata[0]} of %{customdata[1]}<extra></extra>"))
    fig.update_yaxes(tickformat=".0%")
    return _layout(fig, "label prevalence", "label", "positive fraction", height=300)


def apply_window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU (H, W) -> uint8 (H, W) for a display window; below → black, above → white."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    lo = level - width / 2
    x = (np.asarray(hu, dtype=np.float32) - lo) / width
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def overlay(gray: np.ndarray, mask: np.ndarray | None = None, color=(255, 40, 40), alpha: float = 0.45,
            border: tuple[int, int, int] | None = None) -> np.ndarray:
    """uint8 (H, W) -> RGB (H, W, 3) with ``mask`` pixels tinted; optional coloured frame (e.g. PE slice)."""
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)  # (H, W, 3)
    if mask is not None and mask.any():
        m = mask.astype(bool)
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(color, np.float32)
    out = rgb.round().astype(np.uint8)
    if border is not None:
        w = max(1, min(out.shape[:2]) // 64)
        out[:w], out[-w:], out[:, :w], out[:, -w:] = border, border, border, border
    return out


def max_points_per_trace(fig: go.Figure) -> int:
    """Largest number of x values in any trace: the figure's promise to the browser."""
    n = 0
    for t in fig.data:
        x = getattr(t, "x", None)
        if x is not None:
            n = max(n, len(x))
    return n
