"""Compare strategies: how much better than random init, and is it real? Forest plot of paired
differences (controls apart), label-fraction curves, bars with CIs, segmentation speed, A vs B."""

import streamlit as st

from ctssl_core import charts
from ctssl_core.results import read
from ctssl_core.results.read import HEADLINE, hint, init_order
from pages.common import benchmark_choice, query, query_many, show_outdated_note, to_url, url_index

st.title("Compare pretraining strategies")
bench_id = benchmark_choice()
info, tm, table, speed, saved, sens, comp = query_many(
    (read.store_info,), (read.task_metrics, bench_id), (read.headline_table, bench_id),
    (read.derived, "speed_ratio", bench_id), (read.derived, "labels_saved", bench_id), (read.sensitivity, bench_id),
    (read.competence, bench_id))
show_outdated_note(info)

if tm.empty:
    st.info(f"No label-fraction results yet. Run {hint('benchmark_quick')} to fine-tune every "
            "strategy at several label fractions.")
    st.stop()

choices = [f"{t} · {m}" for t, m in zip(tm.task, tm.metric)]
preferred = [f"{t} · {m}" for t, ms in HEADLINE.items() for m in ms]  # pe first: the paper's headline
default = next((choices.index(c) for c in preferred if c in choices), 0)
choice = st.selectbox("Task · metric", choices, index=url_index("metric", choices, default), key="cmp_task_metric")
to_url(metric=choice)
task, metric = choice.split(" · ")

for r in sens[sens.task == task].itertuples():
    (st.success if r.sensitive is True else st.warning if r.sensitive is False else st.info)(r.sentence)

st.subheader("How much better than random init, and is it real?")
flagged = set(comp[comp.flag].init) if len(comp) else set()
fdf = query(read.forest, task, metric, bench_id)
if fdf.empty:
    st.info(f"The benchmark wrote no paired differences for {task} · {metric}; re-run {hint('benchmark_quick')} "
            "with this version to get them.")
else:
    st.plotly_chart(charts.forest_fig(fdf, task, metric, flagged), width="stretch", key="cmp_forest")
    st.caption("Each row: the init's mean minus random init's, paired over the same test patients and seeds. Bars: "
               "the interval the verdict uses — at the smallest fraction the benchmark's Bonferroni-adjusted CI, at "
               "full labels the 95% CI widened for the number of strategies; controls (◇) keep their 95% CI. Filled "
               "green/red only where that interval excludes 0; open grey = not established."
               + (f" ⚠ = pretext did not clearly beat its trivial baseline ({', '.join(sorted(flagged))})."
                  if flagged else ""))

curves = query(read.fraction_curves, task, metric, bench_id)
inits = init_order(curves.init)
strategies = [i for i in inits if i not in charts.CONTROL_INITS and i != "random"]
bands = st.multiselect("CI bands for", inits, default=[i for i in ["random", *strategies[:1]] if i in inits],
                       key="cmp_bands", help="Every init keeps its line and colour; bands only where chosen.")
st.plotly_chart(charts.fraction_curves_fig(curves, task, metric, bands=set(bands)), width="stretch", key="cmp_curves")
st.caption("Mean over seeds; bands are 95% CIs. Random init (grey, dashed) is the reference; controls are dotted.")

st.subheader("At full labels")
cols = st.columns(max(1, min(3, table.task.nunique())))
for k, (t, g) in enumerate(table.groupby("task")):
    m = next((x for x in HEADLINE.get(t, []) if x in set(g.metric)), sorted(g.metric)[0])
    g = g[g.metric == m]
    ref = g[g.init == "random"].value
    with cols[k % len(cols)]:
        st.plotly_chart(charts.bars_fig(g, f"{t}: {m}", m, float(ref.iloc[0]) if len(ref) else None),
                        width="stretch", key=f"cmp_bar_{t}")

c1, c2 = st.columns(2)
with c1:
    st.subheader("Segmentation learning speed")
    if speed.empty:
        st.info("No speed ratio recorded yet (the benchmark writes it after the nodule runs).")
    else:
        for t, g in speed.groupby("task"):
            if g.value.notna().any():
                st.plotly_chart(charts.bars_fig(g.dropna(subset=["value"]), f"{t}: speed ratio vs random init (×)",
                                                "speed ratio", 1.0), width="stretch", key=f"cmp_speed_{t}")
        st.caption(speed.note.dropna().iloc[0] if speed.note.notna().any() else "")
with c2:
    st.subheader("Labels saved")
    if saved.empty:
        st.info("No label-saving estimate recorded yet.")
    else:
        st.dataframe(saved[["task", "init", "value", "ci_low", "ci_high", "note"]].rename(
            columns={"value": "labels saved"}), hide_index=True, width="stretch")

st.subheader("A vs B")
non_random = [i for i in inits if i != "random"]
ca, cb = st.columns(2)
a = ca.selectbox("A", inits, index=inits.index(non_random[0]) if non_random else 0, key="cmp_a")
b = cb.selectbox("B", inits, index=inits.index("random") if "random" in inits else 0, key="cmp_b")
if a == b:
    st.info("Pick two different strategies.")
else:
    diff = query(read.pairwise, task, metric, a, b, bench_id)
    if diff.empty:
        st.info(f"{a} and {b} share no label fraction for {task} · {metric}.")
    else:
        st.plotly_chart(charts.pairwise_fig(diff, a, b, metric), width="stretch", key="cmp_pair")
        st.dataframe(diff.rename(columns={"diff": f"{a} − {b}"}), hide_index=True, width="stretch")
        st.caption("95% CI by normal approximation from the per-seed bootstrap CIs (seeds treated as independent).")
