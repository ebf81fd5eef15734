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


# A tiny template: the full "plotly_white" one is deep-copied and validated on every figure (~0.1 s each),
# and Streamlit's own chart theme restyles the figure in the browser anyway.
_TEMPLATE = {"layout": {"colorway": PALETTE, "plot_bgcolor": "white", "paper_bgcolor": "white",
                        "xaxis": {"gridcolor": "#ebf0f8", "zerolinecolor": "#ebf0f8"},
                        "yaxis": {"gridcolor": "#ebf0f8", "zerolinecolor": "#ebf0f8"}}}


def _figure(traces: list[dict], title: str, x: str, y: str, height: int = 420, **layout) -> go.Figure:
    """Build the figure in one go from plain dicts.

    Why: plotly's incremental API (add_trace / update_layout / add_hline)
    validates every path on every call, ~10x slower than one ``go.Figure(dict)``;
    that difference is most of a warm page rerun.
    """
    lay = dict(title=dict(text=title, y=0.98, yanchor="top"), height=height, margin=dict(l=40, r=20, t=90, b=40),
               legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0), template=_TEMPLATE)
    lay["xaxis"] = {"title": {"text": x}, **layout.pop("xaxis", {})}
    lay["yaxis"] = {"title": {"text": y}, **layout.pop("yaxis", {})}
    lay.update(layout)
    return go.Figure(dict(data=traces, layout=lay))


def _hline(y: float) -> dict:
    return dict(type="line", xref="paper", x0=0, x1=1, y0=y, y1=y, line=dict(color=REFERENCE_COLOR, dash="dot"))


def _err(d: pd.DataFrame, value: str = "value") -> dict:
    return dict(type="data", symmetric=False, array=(d.ci_high - d[value]).fillna(0).to_numpy(),
                arrayminus=(d[value] - d.ci_low).fillna(0).to_numpy())


# one colour per known init on every figure and page (a strategy keeps its colour whatever else is shown)
KNOWN_INITS = ["rotation", "flip", "next_slice", "masked_region", "denoise", "positive_control",
               "negative_control", "z_position"]
CONTROL_INITS = ("positive_control", "negative_control")
GAIN_COLOR, LOSS_COLOR, UNCLEAR_COLOR = "#1a9850", "#d73027", "#9e9e9e"


def init_colors(inits) -> dict[str, str]:
    """Stable colour per init (known inits by name, others after them alphabetically); random init is grey."""
    others = sorted(i for i in set(inits) if i != "random" and i not in KNOWN_INITS)
    out = {i: PALETTE[k % len(PALETTE)] for k, i in enumerate(KNOWN_INITS)}
    out.update({i: PALETTE[(len(KNOWN_INITS) + k) % len(PALETTE)] for k, i in enumerate(others)})
    out["random"] = REFERENCE_COLOR
    return {i: out[i] for i in set(inits)}


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def fraction_curves_fig(df: pd.DataFrame, task: str, metric: str, log_x: bool = True,
                        bands: "set[str] | None" = None) -> go.Figure:
    """Metric vs label fraction, one line (one colour) per init; shaded 95% CI bands only for ``bands``.

    Why a choice: six overlapping bands are one grey blob; two (random init and the strategy under
    study) can be read. ``bands=None`` draws every band. Controls are dotted, random init dashed.
    """
    traces = []
    colors = init_colors(df.init)
    for init, g in df.groupby("init", sort=False):
        g = g.sort_values("fraction")
        c = colors[init]
        f = g.fraction.to_numpy()
        if g.ci_low.notna().all() and (bands is None or init in bands):
            traces.append(dict(type="scatter", x=np.r_[f, f[::-1]], y=np.r_[g.ci_high, g.ci_low.to_numpy()[::-1]],
                               mode="lines", fill="toself", fillcolor=_rgba(c, 0.15), line=dict(width=0),
                               hoverinfo="skip", showlegend=False, name=f"{init} CI", legendgroup=init))
        traces.append(dict(type="scatter", x=f, y=g.value.to_numpy(), mode="lines+markers", name=init,
                           legendgroup=init,
                           line=dict(color=c, width=3 if init not in ("random", *CONTROL_INITS) else 2,
                                     dash="dash" if init == "random" else "dot" if init in CONTROL_INITS
                                     else "solid"),
                           customdata=np.c_[g.ci_low, g.ci_high],
                           hovertemplate=f"{init}<br>fraction %{{x}}<br>{metric} %{{y:.3f}}"
                                         "<br>95% CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra></extra>"))
    return _figure(traces, f"{task}: {metric} vs label fraction", "label fraction", metric,
                   xaxis={"type": "log"} if log_x else {})


def bars_fig(df: pd.DataFrame, title: str, metric: str, reference: float | None = None) -> go.Figure:
    """One bar per init with 95% CI error bars; random init grey; optional reference line."""
    from ctssl_core.results.read import init_order

    d = df.set_index("init").loc[init_order(df.init)].reset_index()
    colors = init_colors(d.init)
    trace = dict(type="bar", x=d.init.tolist(), y=d.value.to_numpy(), error_y=_err(d),
                 marker=dict(color=[colors[i] for i in d.init]), text=[f"{v:.3f}" for v in d.value],
                 textposition="outside", hovertemplate="%{x}: %{y:.3f}<extra></extra>")
    lo = float(np.nanmin(d.ci_low.fillna(d.value)))
    hi = float(np.nanmax(d.ci_high.fillna(d.value)))
    pad = (hi - lo) * 0.3 + 1e-6
    return _figure([trace], title, "strategy", metric, height=360, yaxis={"range": [lo - pad, hi + pad]},
                   shapes=[_hline(reference)] if reference is not None else [])


def pairwise_fig(df: pd.DataFrame, a: str, b: str, metric: str) -> go.Figure:
    """A − B per label fraction with CI bars and a zero line."""
    trace = dict(type="scatter", x=df.fraction.to_numpy(), y=df["diff"].to_numpy(), mode="markers+lines",
                 error_y=_err(df, "diff"), name=f"{a} − {b}",
                 hovertemplate="fraction %{x}<br>difference %{y:+.3f}<extra></extra>")
    return _figure([trace], f"{a} − {b}: {metric} difference (95% CI)", "label fraction", f"Δ {metric}",
                   height=340, xaxis={"type": "log"}, shapes=[_hline(0.0)])


def forest_fig(df: pd.DataFrame, task: str, metric: str, flagged: "set[str] | tuple" = ()) -> go.Figure:
    """Forest plot: each init's paired difference from random init (``read.forest``), one row per
    (init, label fraction), strategies above the controls, a zero line.

    The bar is the interval the verdict uses (``adj_low``/``adj_high``: Bonferroni-corrected for the
    strategies, plain 95% for controls); the point is green/red only where that interval excludes 0
    (``established``), else an open grey circle. Strategies whose pretext did not beat its trivial
    baseline (``flagged``) carry a ⚠.
    """
    traces = []
    rows = []
    for group, title in (("strategy", "strategies"), ("control", "controls (not strategies)")):
        g = df[df.group == group]
        if g.empty:
            continue
        labels = [f"{i}{' ⚠' if i in flagged else ''} @ {100 * f:g}%" for i, f in zip(g.init, g.fraction)]
        rows += labels
        col = [GAIN_COLOR if e == "gain" else LOSS_COLOR if e == "loss" else UNCLEAR_COLOR for e in g.established]
        sym = ["circle" if e else "circle-open" for e in g.established] if group == "strategy" else \
            ["diamond" if e else "diamond-open" for e in g.established]
        what = ["Bonferroni-adjusted" if c else ("95% (widened for the strategies)" if group == "strategy"
                                                  else "95%") for c in g.corrected]
        traces.append(dict(type="scatter", x=g.value.to_numpy(float), y=labels, mode="markers", name=title,
                           marker=dict(color=col, size=11, symbol=sym, line=dict(width=2, color=col)),
                           error_x=dict(type="data", symmetric=False,
                                        array=(g.adj_high - g.value).astype(float).fillna(0).to_numpy(),
                                        arrayminus=(g.value - g.adj_low).astype(float).fillna(0).to_numpy(),
                                        color=UNCLEAR_COLOR),
                           customdata=np.c_[g.ci_low.astype(float), g.ci_high.astype(float), g.adj_low.astype(float),
                                            g.adj_high.astype(float)],
                           text=[f"{e or 'not established'} · CI {w}" for e, w in zip(g.established, what)],
                           hovertemplate="%{y}<br>Δ %{x:+.3f}<br>95% CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
                                         "<br>used [%{customdata[2]:.3f}, %{customdata[3]:.3f}]<br>%{text}"
                                         "<extra></extra>"))
    zero = dict(type="line", xref="x", yref="paper", x0=0, x1=0, y0=0, y1=1, line=dict(color=REFERENCE_COLOR))
    return _figure(traces, f"{task}: {metric} minus random init (paired)", f"Δ {metric} vs random init", "",
                   height=max(260, 60 + 34 * len(rows)), shapes=[zero],
                   yaxis={"categoryorder": "array", "categoryarray": rows[::-1], "type": "category"})


def run_colors(run_ids) -> dict[str, str]:
    """One colour per run, in the order given (the order of the selection), the same in every panel."""
    return {r: PALETTE[k % len(PALETTE)] for k, r in enumerate(dict.fromkeys(run_ids))}


def curves_fig(df: pd.DataFrame, x_label: str = "step", log_y: bool = False, smoothing: float = 0.0,
               labels: dict[str, str] | None = None, runs: "list[str] | None" = None) -> go.Figure:
    """Learning curves like W&B/TensorBoard: one panel per metric (its own y axis, named after it),
    one colour per run across panels, x axes linked; WebGL lines.

    With smoothing > 0 the raw (already downsampled) line is drawn faint and the EMA on top, so
    spikes stay visible. ``runs`` fixes the colour order (default: sorted run ids).
    """
    labels = labels or {}
    names = sorted(df.name.unique())
    colors = run_colors(runs if runs is not None else sorted(df.run_id.unique()))
    n = max(1, len(names))
    gap = 0.06 if n > 1 else 0.0
    h = (1 - gap * (n - 1)) / n
    traces, layout = [], {}
    shown = set()
    for k, name in enumerate(names):            # panel k from the top
        ax = "" if k == 0 else str(k + 1)
        top = 1 - k * (h + gap)
        layout[f"yaxis{ax}"] = {"title": {"text": name}, "domain": [max(0.0, top - h), top],
                                **({"type": "log"} if log_y else {}), "anchor": f"x{ax}"}
        layout[f"xaxis{ax}"] = {"anchor": f"y{ax}", **({"matches": "x"} if k else {}),
                                "showticklabels": k == n - 1,
                                "title": {"text": x_label if k == n - 1 else ""}}
        for run, g in df[df.name == name].groupby("run_id", sort=False):
            c = colors.get(run) or PALETTE[len(colors) % len(PALETTE)]
            colors.setdefault(run, c)
            label = labels.get(run, run)
            x, y = g.x.to_numpy(), g.y.to_numpy()
            common = dict(type="scattergl", mode="lines", xaxis=f"x{ax}", yaxis=f"y{ax}", legendgroup=run,
                          name=label, hovertemplate=f"{label}<br>{name} %{{y:.4g}} at %{{x}}<extra></extra>")
            if smoothing > 0:
                traces.append({**common, "y": y, "x": x, "line": dict(color=_rgba(c, 0.25), width=1),
                               "showlegend": False, "hoverinfo": "skip", "name": label + " (raw)"})
                y = smooth_ema(y, smoothing)
            traces.append({**common, "x": x, "y": y, "line": dict(color=c, width=2 if smoothing > 0 else 1.5),
                           "showlegend": run not in shown})
            shown.add(run)
    return _figure(traces, "learning curves", x_label, names[0] if names else "value", height=120 + 260 * n,
                   xaxis=layout.pop("xaxis", {}), yaxis=layout.pop("yaxis", {}), **layout)


CONTINUOUS = {"age"}


def _scatter_kind(points: pd.DataFrame, color_by: str, kind: str | None) -> str:
    """'numeric', 'categorical' or 'none' (one colour): ``kind`` when given (``read.attribute_kind``), else guessed."""
    if color_by not in points.columns or kind == "empty" or points[color_by].isna().all():
        return "none"
    if kind in ("numeric", "categorical"):
        return kind
    numeric = color_by in CONTINUOUS or (pd.api.types.is_float_dtype(points[color_by])
                                         and points[color_by].nunique() > 12)
    return "numeric" if numeric else "categorical"


def scatter_groups(points: pd.DataFrame, color_by: str, kind: str | None = None) -> list[tuple[str, np.ndarray]]:
    """The traces of ``scatter_fig``: [(name, positions of their points in ``points``)], in trace order.

    Why shared: a Plotly selection names a point by (curve_number, point_index) within its trace;
    ``selected_positions`` maps it back through this same partition, so the two cannot disagree.
    """
    k = _scatter_kind(points, color_by, kind)
    everyone = np.arange(len(points))
    if k == "none":
        return [("points", everyone)]
    if k == "numeric":
        return [(color_by, everyone)]
    vals = points[color_by].astype(str).where(points[color_by].notna(), "unknown").to_numpy()
    return [(v, np.flatnonzero(vals == v)) for v in sorted(set(vals))]


def selected_positions(points: pd.DataFrame, color_by: str, kind: str | None, selected: list[dict]) -> list[int]:
    """Positions in ``points`` of the points a Plotly selection event names (``curve_number``, ``point_index``);
    entries that name no point of this figure are ignored."""
    groups = scatter_groups(points, color_by, kind)
    out = []
    for p in selected or []:
        c, i = p.get("curve_number"), p.get("point_index", p.get("point_number"))
        if isinstance(c, int) and isinstance(i, int) and 0 <= c < len(groups) and 0 <= i < len(groups[c][1]):
            out.append(int(groups[c][1][i]))
    return out


def scatter_fig(points: pd.DataFrame, color_by: str, title: str, hover: list[str] | None = None,
                kind: str | None = None) -> go.Figure:
    """2-D embedding scatter coloured by a patient attribute: ``kind`` 'numeric' = one trace on a
    continuous scale, 'categorical' = one trace per value, 'empty'/absent column = one colour."""
    hover = [h for h in (hover or ["slice_id", "age", "sex", "race", "site"]) if h in points.columns]
    # one pre-joined hover string per point: plotly deep-copies object arrays element by element,
    # so one string column is ~5x cheaper than a 5-column customdata
    text = None
    if hover:
        joined = f"{hover[0]}: " + points[hover[0]].astype(str)
        for h in hover[1:]:
            joined = joined + f"<br>{h}: " + points[h].astype(str)
        text = joined.to_numpy(dtype=object)
    tmpl = "%{customdata}<extra></extra>"
    x, y = points.x.to_numpy(), points.y.to_numpy()
    k = _scatter_kind(points, color_by, kind)
    traces = []
    for n, (name, pos) in enumerate(scatter_groups(points, color_by, kind)):
        t = dict(type="scattergl", x=x[pos], y=y[pos], mode="markers", name=name,
                 customdata=text[pos] if text is not None else None, hovertemplate=tmpl)
        if k == "none":
            t["marker"] = dict(size=4)
        elif k == "numeric":
            t["marker"] = dict(size=4, color=pd.to_numeric(points[color_by], errors="coerce").to_numpy(),
                               colorscale="Viridis", colorbar=dict(title=dict(text=color_by)), opacity=0.8)
        else:
            t["marker"] = dict(size=4, color=PALETTE[n % len(PALETTE)], opacity=0.75)
        traces.append(t)
    return _figure(traces, title, "dim 1", "dim 2", height=440)


def probe_fig(probes: pd.DataFrame) -> go.Figure:
    """Probe score per attribute: this encoder vs random init (value − delta), with CIs."""
    d = probes.sort_values("attribute")
    labels = (d.attribute + " (" + d.metric + ")").tolist()
    traces = [dict(type="bar", name="random init", x=labels, y=(d.value - d.delta).to_numpy(),
                   marker=dict(color=REFERENCE_COLOR)),
              dict(type="bar", name="this encoder", x=labels, y=d.value.to_numpy(), marker=dict(color=PALETTE[0]),
                   error_y=_err(d))]
    return _figure(traces, "linear probes on frozen embeddings", "attribute (metric)", "probe score", height=360,
                   barmode="group")


def ks_fig(ks: pd.DataFrame) -> go.Figure:
    """KS statistic per PCA mode and group pair; flagged (adjusted p < 0.05) pairs outlined in red."""
    d = ks.assign(pair=ks.attribute + ": " + ks.group_a.astype(str) + " vs " + ks.group_b.astype(str))
    traces = [dict(type="bar", x=g.metric.tolist(), y=g.value.to_numpy(), name=pair,
                   marker=dict(line=dict(width=[2 if f else 0 for f in g.flagged.fillna(False)], color="red")),
                   hovertemplate="%{x}: KS %{y:.3f}<extra>" + pair + "</extra>")
              for pair, g in d.groupby("pair", sort=True)]
    return _figure(traces, "Kolmogorov–Smirnov statistic per PCA mode", "PCA mode", "KS statistic", height=340,
                   barmode="group")


def subgroup_fig(sub: pd.DataFrame, metric: str) -> go.Figure:
    d = sub[sub.metric == metric]
    groups = (d.attribute + "=" + d.group_a.astype(str)).tolist()
    trace = dict(type="bar", x=groups, y=d.value.to_numpy(), marker=dict(color=PALETTE[2]), error_y=_err(d))
    return _figure([trace], f"PE model {metric.upper()} per subgroup", "subgroup", metric, height=320)


def histogram_fig(values: pd.Series, title: str, nbins: int | None = None) -> go.Figure:
    v = values.dropna()
    if pd.api.types.is_numeric_dtype(v):
        trace = dict(type="histogram", x=v.to_numpy(), nbinsx=nbins or 20, marker=dict(color=PALETTE[0]))
    else:
        counts = v.astype(str).value_counts().sort_index()
        trace = dict(type="bar", x=counts.index.tolist(), y=counts.to_numpy(), marker=dict(color=PALETTE[0]))
    return _figure([trace], title, values.name or "", "patients", height=260)


def prevalence_fig(prev: pd.DataFrame) -> go.Figure:
    trace = dict(type="bar", x=prev.label.tolist(), y=prev.prevalence.to_numpy(), marker=dict(color=PALETTE[1]),
                 text=[f"{p:.1%}" if np.isfinite(p) else "–" for p in prev.prevalence], textposition="outside",
                 customdata=np.c_[prev.positive, prev.known],
                 hovertemplate="%{x}: %{customdata[0]} of %{customdata[1]}<extra></extra>")
    return _figure([trace], "label prevalence", "label", "positive fraction", height=300,
                   yaxis={"tickformat": ".0%"})


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
