"""Embeddings & bias: what an encoder's embeddings encode about patients, against random init."""

import streamlit as st

from ctssl_core import charts
from ctssl_core.results.read import hint
from pages.common import benchmark_choice, query, query_many, show_outdated_note, to_url, url_index

COLOR_BY = ["race", "sex", "age", "site", "control_group", "pe"]
MAX_POINTS = 5000

st.title("Embeddings & bias")
info, emb = query_many(("store_info",), ("embeddings",))
show_outdated_note(info)

if emb.empty:
    st.info(f"No embeddings yet. Compute them with {hint('embed')} (PCA + UMAP of slice embeddings of a "
            f"pretraining run; {hint('embed_random')} for the random-init reference) and the bias analysis with "
            f"{hint('bias')}.")
    st.stop()

st.info("A probe that predicts race (or sex, age) well shows the information is **present** in the "
        "embedding — not that a downstream model **uses** it. Read high probe scores as a reason to check "
        "subgroup performance, not as proof of biased decisions.")

candidates = emb[emb.init != "random"]
choices = (candidates if len(candidates) else emb).emb_id.tolist()
labels = {r.emb_id: f"{r.init} · {r.encoder} · {r.split} ({r.n:,} {r.level}s)" for r in emb.itertuples()}
c1, c2, c3 = st.columns([3, 1, 2])
emb_id = c1.selectbox("Embedding", choices, index=url_index("emb", choices), format_func=lambda e: labels.get(e, e),
                      key="emb_id")
row = emb[emb.emb_id == emb_id].iloc[0]
methods = sorted(row.methods or ["umap", "pca"], key=lambda m: m != "umap")  # UMAP first, as in the paper
method = c2.radio("Projection", methods, index=url_index("proj", methods), horizontal=True, key="emb_method")
color_by = c3.selectbox("Colour by", COLOR_BY, index=url_index("color", COLOR_BY), key="emb_color")
to_url(emb=emb_id, proj=method, color=color_by)

view = query("embedding_view", emb_id, method, MAX_POINTS)
ref_id = view["ref_id"]
for msg in view["missing"]:
    st.warning(msg)
left, right = st.columns(2)
for col, eid, title, pts, total in [
        (left, emb_id, labels.get(emb_id, emb_id), view["points"], view["total"]),
        (right, ref_id, f"random init · {labels.get(ref_id, ref_id)}" if ref_id else None, view["ref_points"],
         view["ref_total"])]:
    with col:
        if eid is None:
            st.info(f"No random-init embedding to compare with; {hint('embed_random')} computes one.")
            continue
        if pts is None:
            continue
        st.plotly_chart(charts.scatter_fig(pts, color_by, f"{method.upper()}: {title}"), width="stretch",
                        key=f"emb_scatter_{eid}")
        st.caption(f"{len(pts):,} of {total:,} points" + (" (seeded random sample)" if total > len(pts) else ""))

card = query("bias_scorecard", benchmark_choice())
if not card.empty:
    st.subheader("Does the analysis find what was planted? (scorecard against the synthetic cohort's truth)")
    wrong = card[card.right.eq(False)]
    fp = wrong[wrong.outcome == "false positive"]
    st.markdown(f"**{int(card.right.eq(True).sum())} of {int(card.right.notna().sum())}** (encoder, attribute, "
                f"test) right. False positives (errors of the analysis): **{len(fp)}**; misses (the encoder does "
                f"not carry the attribute, or the test lacks power at this size): **{len(wrong) - len(fp)}**.")
    grid = card.assign(cell=card.outcome.where(card.right.notna(), "not run"),
                       column=card.attribute + " · " + card.analysis).pivot(index="init", columns="column",
                                                                            values="cell")
    st.dataframe(grid, width="stretch")
    with st.expander("Why each cell says what it says"):
        for s in card.sentence:
            st.markdown("- " + s)

bias = view["bias"]
if bias.empty:
    st.info(f"No bias analysis for this embedding yet: run {hint('bias', EMB_ID=emb_id)}.")
    st.stop()

st.subheader("What a linear probe can read from the embedding")
probes = bias[bias.analysis == "probe"]
if len(probes):
    for s in probes.sentence.dropna():
        st.markdown("- " + s)
    st.plotly_chart(charts.probe_fig(probes), width="stretch", key="emb_probe")
    st.dataframe(probes[["attribute", "metric", "value", "ci_low", "ci_high", "delta", "delta_ci_low",
                         "delta_ci_high", "p_adjusted", "flagged"]], hide_index=True, width="stretch")

ks = bias[bias.analysis == "ks"]
if len(ks):
    st.subheader("Do subgroups sit in different places? (KS test per PCA mode)")
    st.plotly_chart(charts.ks_fig(ks), width="stretch", key="emb_ks")
    flagged = ks[ks.flagged == True]  # noqa: E712
    for s in (flagged if len(flagged) else ks).sentence.dropna().head(6):
        st.markdown("- " + s)
    st.dataframe(ks[["attribute", "group_a", "group_b", "metric", "value", "p_value", "p_adjusted", "flagged"]],
                 hide_index=True, width="stretch")

sub = bias[bias.analysis == "subgroup"]
if len(sub):
    st.subheader("PE model performance per subgroup")
    metric = st.radio("Metric", sorted(sub.metric.unique()), horizontal=True, key="emb_sub_metric")
    st.plotly_chart(charts.subgroup_fig(sub, metric), width="stretch", key="emb_sub")
    st.dataframe(sub[sub.metric == metric][["attribute", "group_a", "value", "ci_low", "ci_high"]]
                 .rename(columns={"group_a": "group"}), hide_index=True, width="stretch")

dose = query("bias_dose", st.session_state.get("ctssl_benchmark"))   # the benchmark chosen above (benchmark_choice)
if not dose.empty:
    st.subheader("Does detection follow the planted race effect? (dose-response)")
    st.caption("The same patients rendered again with the synthetic race effect at 0, half and full strength (same "
               "anatomy and noise; only the knob changes) and embedded by each encoder. At 0 race has no imaging "
               "correlate, so a detection there is a false positive of the analysis.")
    tests = [a for a in ("probe", "separability", "ks") if a in set(dose.analysis)]
    test = st.radio("Test", tests, horizontal=True, key="emb_dose_test")
    d = dose[dose.analysis == test]
    cells = d.assign(cell=["n/r" if v != v else f"{v:.2f}" + (" · detected" if x is True else "")
                           for v, x in zip(d.statistic, d.detected)])
    grid = cells.pivot(index="init", columns="strength", values="cell")
    st.dataframe(grid.rename(columns=lambda s: f"race_effect {s:g}"), width="stretch", key="emb_dose")
    st.caption(f"{d.metric.iloc[0]}; chance {d.chance.dropna().iloc[0]:.2f}. Detected = corrected p below alpha "
               f"(Holm over the race tests)." if d.chance.notna().any() else f"{d.metric.iloc[0]}.")
    wrong = dose[(dose.strength == 0) & dose.detected.eq(True)]
    for r in wrong.itertuples():
        st.warning(f"{r.init}: the {r.analysis} test detects race with no planted effect (corrected p "
                   f"{r.p_adjusted:.2g}): a false positive of the analysis.")
