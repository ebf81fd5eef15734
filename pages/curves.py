"""Learning curves: pick runs from a filterable table; one panel per metric, one colour per run (as in
W&B/TensorBoard), the selected runs' settings side by side; long runs downsampled on the server, running
ones refreshed live."""

import streamlit as st

from ctssl_core import charts
from ctssl_core.results import read
from ctssl_core.results.read import X_AXES, hint
from pages.common import query, query_many, show_outdated_note, to_url, url_index, url_values

MAX_POINTS = 4000  # per series, after min/max (M4) downsampling in DuckDB
REFRESH_S = 5      # live refresh of the plot while a selected run is still running

st.title("Learning curves")
info, runs = query_many((read.store_info,), (read.run_table,))
show_outdated_note(info)

if runs.empty:
    st.info(f"No runs yet. Start one with {hint('pretrain')} or {hint('benchmark_smoke')}.")
    st.stop()

f1, f2, f3, f4, f5, f6 = st.columns(6)
kinds = f1.multiselect("Kind", sorted(runs.kind.dropna().unique()), key="lc_kind")
tasks = f2.multiselect("Task", sorted(runs.task.dropna().unique()), key="lc_task")
inits = f3.multiselect("Init", sorted(runs.init.dropna().unique()), key="lc_init")
fractions = f4.multiselect("Label fraction", sorted(runs.fraction.dropna().unique()), key="lc_fraction")
seeds = f5.multiselect("Seed", sorted(runs.seed.dropna().unique()), key="lc_seed")
text = f6.text_input("Run id, name or tag contains", key="lc_text")
shown = runs
for col, vals in [("kind", kinds), ("task", tasks), ("init", inits), ("fraction", fractions), ("seed", seeds)]:
    if vals:
        shown = shown[shown[col].isin(vals)]
if text:
    words = shown.run_id + " " + shown.name.fillna("") + " " + shown.tags.fillna("")
    shown = shown[words.str.contains(text, case=False, regex=False)]

st.dataframe(shown[["run_id", "name", "kind", "task", "init", "fraction", "seed", "status", "created_at", "wall_s",
                    "checkpoint_ok", "tags", "notes"]], hide_index=True, width="stretch", height=240)
st.caption(f"{len(shown):,} of {len(runs):,} runs. Click a column header to sort.")

options = shown.run_id.tolist()
selected = st.multiselect("Runs to plot", options, default=url_values("run", options, options[:3])[:50],
                          key="lc_runs", max_selections=50)
to_url(run=selected)
if not selected:
    st.info("Select one or more runs above.")
    st.stop()

names = query(read.metric_names, tuple(selected), live=tuple(selected))
if not names:
    st.info("These runs have logged no metrics yet; a running run's appear with its first logged step.")
    st.stop()
default_metrics = [n for n in names if "loss" in n][:2] or names[:1]
metrics = st.multiselect("Metrics", names, default=url_values("metric", names, default_metrics), key="lc_metrics")
c1, c2, c3 = st.columns([2, 2, 1])
x_label = c1.radio("x axis", list(X_AXES), index=url_index("x", list(X_AXES)), horizontal=True, key="lc_x")
to_url(metric=metrics, x=x_label)
smoothing = c2.slider("Smoothing", 0.0, 0.99, 0.0, 0.01, key="lc_smooth")
log_y = c3.checkbox("log y", key="lc_log")

sel = runs[runs.run_id.isin(selected)]
running = sel[sel.status == "running"].run_id.tolist()


@st.fragment(run_every=REFRESH_S if running else None)
def _plot() -> None:
    """The plot alone reruns every few seconds while a run is live (cached reads refresh when the store changes)."""
    data = query(read.curves, tuple(selected), tuple(metrics), X_AXES[x_label], MAX_POINTS, missing_ok=True,
                 live=tuple(running))
    if data is None or data.empty:
        st.info("Nothing to draw for this choice.")
        return
    fig = charts.curves_fig(data, x_label, log_y, smoothing, runs=list(selected))
    st.plotly_chart(fig, width="stretch", key="lc_fig")
    st.caption(f"{len(data):,} points drawn, at most {charts.max_points_per_trace(fig):,} per series "
               f"(min/max per bucket keeps spikes). One panel per metric, one colour per run."
               + (f" Refreshing every {REFRESH_S} s while a run is live." if running else ""))


_plot()

configs = query(read.run_configs, tuple(selected))
if len(configs) and len(selected) > 1:
    st.subheader("Settings of the selected runs")
    only_diff = st.toggle("Only settings that differ", True, key="lc_cfg_diff")
    shown_cfg = configs[configs.differs] if only_diff else configs
    if only_diff and shown_cfg.empty:
        st.info("The selected runs share every setting.")
    else:
        st.dataframe(shown_cfg.set_index("setting"), width="stretch", key="lc_configs")
    st.caption(f"{int(configs.differs.sum())} of {len(configs)} settings differ between the selected runs.")
elif len(configs):
    with st.expander("Settings of this run"):
        st.dataframe(configs.drop(columns="differs").set_index("setting"), width="stretch", key="lc_configs")

if running:
    st.info(f"Still running: {', '.join(running)} — its curves grow as its metrics are merged.")
lost = sel[sel.checkpoint_ok == False].run_id.tolist()  # noqa: E712
if lost:
    st.warning(f"Checkpoint file missing for {', '.join(lost)}: curves and results are kept, but the weights "
               f"are gone; re-run the run ({hint('finetune')} / {hint('pretrain')}, with its settings) to "
               f"recreate them.")
failed = sel[sel.status == "failed"]
for r in failed.itertuples():
    st.error(f"{r.run_id} failed: {r.error or 'no error recorded'}")
