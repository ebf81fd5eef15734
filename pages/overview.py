"""Overview: could the study find a gain, and did any strategy give one — in one screen.

Sensitivity (positive control vs random init) first, then the corrected verdict per strategy, the
endpoints shortcuts cannot explain (PE twin score, nodule FROC/CPM) with the controls listed apart,
and each strategy's pretext competence. The query layer (``results/read.py``) computes; this page shows.
"""

import pandas as pd
import streamlit as st

from ctssl_core.results import read
from ctssl_core.results.read import (confirmed_best, fmt_ci, hint, key_endpoints, pivot_headline, split_controls,
                                     verdicts)
from pages.common import benchmark_choice, query_many, show_outdated_note

st.title("Which pretraining strategy should I use?")
bench_id = benchmark_choice()
info_store, table, bench, info, sens, verd, comp, deltas = query_many(
    (read.store_info,), (read.headline_table, bench_id), (read.benchmarks,), (read.run_overview,),
    (read.sensitivity, bench_id), (read.strategy_verdicts, bench_id), (read.competence, bench_id),
    (read.deltas, bench_id))
show_outdated_note(info_store)

if table.empty:
    st.info(f"No benchmark results in this store yet. Fill it with {hint('benchmark_quick')} "
            f"(about 10 minutes on a CPU; {hint('benchmark_smoke')} takes one), or fine-tune single runs with "
            f"{hint('finetune')}." + (f" {info['n_runs']} runs are recorded so far ({info['running']} running) — "
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

st.subheader("Could this study have found a gain?")
if sens.empty:
    st.info("This benchmark ran no controls: a null result cannot be told from an insensitive benchmark.")
for r in sens.itertuples():
    show = st.success if r.sensitive is True else st.warning if r.sensitive is False else st.info
    show(r.sentence)

strategies, controls = split_controls(table)
st.subheader("Verdict per strategy")
if len(verd):
    cells = verd.assign(text=[f"{v}: {fmt_ci(d, lo, hi)}" for v, d, lo, hi in
                              zip(verd.verdict, verd.delta, verd.ci_low, verd.ci_high)],
                        column=verd.task + " · " + verd.metric + " vs " + verd.reference)
    st.dataframe(cells.pivot(index="init", columns="column", values="text").rename_axis("strategy")
                 [list(dict.fromkeys(cells.column))], width="stretch", key="ov_verdicts")
    st.caption(f"The benchmark's verdict: difference from random init at the smallest label fraction "
               f"({verd.note.iloc[0].split(',', 1)[-1].strip()}). 'insensitive' means the positive control "
               f"could not be told from random init either, so no conclusion about the strategy is possible."
               + (" 'vs negative control': the difference from the positive control's weights shuffled within "
                  "each layer (same weight statistics, no learned features) — a gain there is a gain from "
                  "features, not from the weights' scale." if (verd.reference == "negative control").any() else ""))
else:
    for line in verdicts(strategies):
        st.markdown("- " + line)

key = key_endpoints(strategies)
shown = key if len(key) else strategies
wide, best = pivot_headline(shown)
sure = confirmed_best(best, deltas)


def _highlight(col):
    """Best strategy per column in green only where its gain over random init is established;
    random init (reference row) greyed."""
    return ["background-color: #c8f0d0; font-weight: 600" if idx == sure.get(col.name)
            else ("color: #777; font-style: italic" if idx == "random" else "") for idx in col.index]


st.subheader("Strategies × endpoints (value [95% CI])")
st.dataframe(wide.style.apply(_highlight, axis=0), width="stretch", key="ov_table")
st.caption("Rows: the initialisation of the downstream model (random init = no pretraining, the reference). "
           + ("Endpoints shortcuts cannot explain: PE twin score (same exam with and without its emboli), slice "
              "AUROC stratified by slice position (z_position = position alone), nodule FROC CPM and lesion "
              "sensitivity at 1 FP/scan. " if len(key) else "")
           + "A cell is highlighted only where its gain over random init is established (paired CI excludes 0 "
             "after Bonferroni correction over the strategies). Full label fraction, test split, mean over seeds.")

if len(controls):
    st.subheader("Controls (not strategies)")
    ref = shown[shown.init == "random"]
    ckey = key_endpoints(controls)
    cwide, _ = pivot_headline(pd.concat([ref, ckey if len(ckey) else controls]))
    st.dataframe(cwide, width="stretch", key="ov_controls")
    st.caption("positive_control: supervised pretraining on a disjoint labelled pool (must beat random init for "
               "the benchmark to be sensitive). negative_control: its weights shuffled within each layer (must "
               "not 'gain').")

if len(comp):
    st.subheader("Did each pretext task learn anything?")
    ctab = comp.assign(**{"gain [95% CI]": [fmt_ci(g, lo, hi, 4) for g, lo, hi in
                                            zip(comp.gain, comp.ci_low, comp.ci_high)],
                          "status": ["⚠️ does not clearly beat its baseline" if f else "beats its baseline"
                                     for f in comp.flag]})
    st.dataframe(ctab[["init", "pretext_error", "baseline", "baseline_error", "gain [95% CI]", "status"]]
                 .rename(columns={"init": "strategy"}), hide_index=True, width="stretch", key="ov_competence")
    flagged = comp[comp.flag].init.tolist()
    if flagged:
        st.warning(f"{', '.join(flagged)}: the pretext error does not clearly beat the trivial baseline on held-out "
                   f"slices; the downstream numbers of these strategies test an encoder that learned little.")

with st.expander("All metrics"):
    full, fbest = pivot_headline(table)
    st.dataframe(full, width="stretch", key="ov_all")
    for col, init in confirmed_best(fbest, deltas).items():
        row = table[(table.task + " · " + table.metric == col) & (table.init == init)].iloc[0]
        st.markdown(f"- {col}: **{init}** ({fmt_ci(row.value, row.ci_low, row.ci_high)}), gain established")
