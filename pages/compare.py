"""Compare strategies: label-fraction curves, bars with CIs, segmentation speed, pairwise A vs B."""

import streamlit as st

from ctssl_core import charts
from ctssl_core.results.read import HEADLINE, init_order
from pages.common import benchmark_choice, query, query_many, show_outdated_note

st.title("Compare pretraining strategies")
bench_id = benchmark_choice()
info, tm, table, speed, saved = query_many(("store_info",), ("task_metrics", bench_id), ("headline_table", bench_id),
                                          ("derived", "speed_ratio", bench_id), ("derived", "labels_saved", bench_id))
show_outdated_note(info)

if tm.empty:
    st.info("No label-fraction results yet. Run `ctssl benchmark --profile quick` to fine-tune every "
            "strategy at several label fractions.")
    st.stop()

choices = [f"{t} · {m}" for t, m in zip(tm.task, tm.metric)]
preferred = [f"{t} · {m}" for t, ms in HEADLINE.items() for m in ms]  # pe first: the paper's headline
default = next((choices.index(c) for c in preferred if c in choices), 0)
choice = st.selectbox("Task · metric", choices, index=default, key="cmp_task_metric")
task, metric = choice.split(" · ")

curves = query("fraction_curves", task, metric, bench_id)
st.plotly_chart(charts.fraction_curves_fig(curves, task, metric), width="stretch", key="cmp_curves")
st.caption("Mean over seeds; bands are 95% CIs. Random init (grey, dashed) is the reference.")

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
            st.plotly_chart(charts.bars_fig(g, f"{t}: speed ratio vs random init (×)", "speed ratio", 1.0),
                            width="stretch", key=f"cmp_speed_{t}")
        st.caption(speed.note.dropna().iloc[0] if speed.note.notna().any() else "")
with c2:
    st.subheader("Labels saved")
    if saved.empty:
        st.info("No label-saving estimate recorded yet.")
    else:
        st.dataframe(saved[["task", "init", "value", "ci_low", "ci_high"]].rename(
            columns={"value": "labels saved"}), hide_index=True, width="stretch")

st.subheader("A vs B")
inits = init_order(curves.init)
non_random = [i for i in inits if i != "random"]
ca, cb = st.columns(2)
a = ca.selectbox("A", inits, index=inits.index(non_random[0]) if non_random else 0, key="cmp_a")
b = cb.selectbox("B", inits, index=inits.index("random") if "random" in inits else 0, key="cmp_b")
if a == b:
    st.info("Pick two different strategies.")
else:
    diff = query("pairwise", task, metric, a, b, bench_id)
    if diff.empty:
        st.info(f"{a} and {b} share no label fraction for {task} · {metric}.")
    else:
        st.plotly_chart(charts.pairwise_fig(diff, a, b, metric), width="stretch", key="cmp_pair")
        st.dataframe(diff.rename(columns={"diff": f"{a} − {b}"}), hide_index=True, width="stretch")
        st.caption("95% CI by normal approximation from the per-seed bootstrap CIs (seeds treated as independent).")
