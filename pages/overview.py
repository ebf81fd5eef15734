"""Overview: the benchmark at a glance — strategy x task table with CIs, verdicts, dataset and date."""

import streamlit as st

from ctssl_core.results.read import fmt_ci, pivot_headline, verdicts
from pages.common import benchmark_choice, query_many, show_outdated_note

st.title("Which pretraining strategy should I use?")
bench_id = benchmark_choice()
info_store, table, bench, info = query_many(("store_info",), ("headline_table", bench_id), ("benchmarks",),
                                           ("run_overview",))
show_outdated_note(info_store)

if table.empty:
    st.info("No benchmark results in this store yet. Fill it with `ctssl benchmark --profile quick` "
            "(about 10 minutes on a CPU; `--profile smoke` takes one), or fine-tune single runs with "
            "`ctssl finetune`." + (f" {info['n_runs']} runs are recorded so far ({info['running']} running) — "
                                   "see **Learning curves**." if info["n_runs"] else ""))
    st.stop()

if len(bench):
    b = bench[bench.benchmark_id == bench_id].iloc[0]
    when = b.ended_at if b.ended_at is not None and str(b.ended_at) != "NaT" else b.started_at
    st.caption(f"Benchmark **{b.benchmark_id}** · dataset **{b.dataset}** · profile {b.profile} · "
               f"status {b.status} · {str(when)[:16]}")
else:
    st.caption(f"Dataset {', '.join(info['datasets']) or 'unknown'} · {info['n_runs']} runs · "
               f"last finished {str(info['last'])[:16]}")

st.subheader("Verdict per task")
for line in verdicts(table):
    st.markdown("- " + line)

wide, best = pivot_headline(table)


def _highlight(col):
    """Best strategy per column in green; random init (reference row) greyed."""
    return ["background-color: #c8f0d0; font-weight: 600" if idx == best.get(col.name)
            else ("color: #777; font-style: italic" if idx == "random" else "") for idx in col.index]


st.subheader("Strategy × task (value [95% CI])")
st.dataframe(wide.style.apply(_highlight, axis=0), width="stretch")
st.caption("Rows: the initialisation of the downstream model (random init = no pretraining, the reference). "
           "Best per column highlighted. Values at the full label fraction, test split, mean over seeds.")

with st.expander("Best per column"):
    for col, init in best.items():
        row = table[(table.task + " · " + table.metric == col) & (table.init == init)].iloc[0]
        st.markdown(f"- {col}: **{init}** ({fmt_ci(row.value, row.ci_low, row.ci_high)})")
