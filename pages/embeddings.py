"""Embeddings & bias: what an encoder's embeddings encode about patients, against random init."""

import streamlit as st

from ctssl_core import charts
from ctssl_core.results import read
from ctssl_core.results.read import hint
from pages.common import benchmark_choice, query, query_many, show_outdated_note, to_url, url_index, url_value

MAX_POINTS = 5000

st.title("Embeddings & bias")
info, emb = query_many((read.store_info,), (read.embeddings,))
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
c1, c2 = st.columns([3, 2])
emb_id = c1.selectbox("Embedding", choices, index=url_index("emb", choices), format_func=lambda e: labels.get(e, e),
                      key="emb_id")
view = query(read.embedding_view, emb_id, MAX_POINTS)
ref_id, methods, attrs = view["ref_id"], view["methods"], view["attributes"]
kinds = dict(zip(attrs.attribute, attrs.kind))
options = attrs.attribute.tolist()
asked = st.query_params.get("color")
color_by = None
if options:
    color_by = c2.selectbox("Colour by", options, index=url_index("color", options), key="emb_color",
                            format_func=lambda a: f"{a} ({kinds.get(a, '?')})",
                            help="Any attribute the store holds for these patients, including extra columns of "
                                 "your demographics CSV: numeric ones on a continuous scale, the rest one colour "
                                 "per value.")
    if asked is not None and asked not in options:
        st.info(f"This embedding's patients have no attribute **{asked}** (the link may be from another store); "
                f"coloured by **{color_by}** instead. Known: {', '.join(options)}.")
    if kinds.get(color_by) == "empty":
        st.info(f"No point of this embedding has a value for **{color_by}**, so every point has one colour. "
                f"Add it with a demographics CSV beside your DICOM folder and {hint('ingest')}.")
elif methods:
    st.info(f"The points of this embedding carry no patient attributes, so every point has one colour. Add them "
            f"with a demographics CSV beside your DICOM folder and {hint('ingest')}.")
for msg in view["missing"]:
    st.warning(msg)
if not methods:
    st.info(f"No projection is stored for this embedding; {hint('embed')} computes PCA and UMAP.")
elif "umap" not in methods:
    st.info(f"UMAP was not computed for this embedding (the profile sets `embed.umap: false`, or `--no-umap` was "
            f"given), so only PCA is shown. {hint('embed')} computes both (UMAP needs the `umap` extra: "
            f"`pip install 'ctssl[umap]'`).")

kind = kinds.get(color_by) if color_by else None
hover = list(dict.fromkeys(h for h in ["row", color_by, "age", "sex", "race"] if h))  # row: type it below
drawn = []  # (source, embedding, method, points, selection event)
for source, eid in [("this encoder", emb_id), ("random init", ref_id)]:
    title = labels.get(eid, eid) if source == "this encoder" else f"random init · {labels.get(eid, eid)}"
    if eid is None:
        st.info(f"No random-init embedding to compare with; {hint('embed_random')} computes one.")
        continue
    cols = st.columns(max(1, len(methods)))
    for col, method in zip(cols, methods):
        pts, total = view[("" if source == "this encoder" else "ref_") + "points"][method], \
            view[("" if source == "this encoder" else "ref_") + "total"][method]
        if pts is None:
            continue
        with col:
            event = st.plotly_chart(charts.scatter_fig(pts, color_by or "", f"{method.upper()}: {title}", hover, kind),
                                    width="stretch", key=f"emb_scatter_{eid}_{method}", on_select="rerun",
                                    selection_mode="points")
            st.caption(f"{len(pts):,} of {total:,} points" + (" (seeded random sample)" if total > len(pts) else ""))
        drawn.append((source, eid, method, pts, event))

# ---- from a point to its slice: a chart selection (click, box or lasso) or the point's row typed in
sources = {"this encoder": emb_id, **({"random init": ref_id} if ref_id else {})}
for source, eid, method, pts, event in drawn:
    sel = ((event or {}).get("selection") or {}).get("points") or []
    pos = charts.selected_positions(pts, color_by or "", kind, sel)
    seen = f"emb_seen_{eid}_{method}"
    if pos and st.session_state.get(seen) != pos:         # a new selection on this chart: show its first point
        st.session_state["emb_point_from"], st.session_state["emb_point"] = source, int(pts.row.iloc[pos[0]])
    st.session_state[seen] = pos
if st.session_state.get("emb_point_from") not in sources:
    st.session_state.pop("emb_point_from", None)

st.subheader("From a point to its slice")
p1, p2, p3 = st.columns([2, 1, 3])
source = p1.radio("Point of", list(sources), horizontal=True, key="emb_point_from")
point_emb = sources[source]
n_rows = int(emb.set_index("emb_id").n.get(point_emb, 0) or 0)
shown = next((d[3] for d in drawn if d[1] == point_emb), None)
first = int(shown.row.iloc[0]) if shown is not None and len(shown) else 0
if n_rows and st.session_state.get("emb_point", 0) > n_rows - 1:      # the previous embedding had more rows
    st.session_state["emb_point"] = first
seed = {} if "emb_point" in st.session_state else {"value": int(url_value("point", range(n_rows), first))}
row = int(p2.number_input("Point (row)", 0, max(n_rows - 1, 0), step=1, key="emb_point", **seed,
                          help="Select a point on a chart, or type the row its hover shows."))
window = p3.radio("Window", list(charts.WINDOWS), horizontal=True, key="emb_window")
to_url(emb=emb_id, color=color_by, point=row)
ps = query(read.point_slice, point_emb, row, missing_ok=True) if n_rows else None
if ps is not None:
    level, width = charts.WINDOWS[window]
    v = ps.view
    rgb = charts.overlay(charts.apply_window(v.hu, level, width), v.mask,
                         border=(255, 200, 0) if v.pe else None)
    where = (f"slice {ps.idx} of {ps.n_slices}" if ps.level == "slice"
             else f"exam point: its middle slice, {ps.idx} of {ps.n_slices}")
    pe_text = {True: "PE present", False: "no PE", None: "PE unknown"}[v.pe]
    i1, i2 = st.columns([2, 3])
    i1.image(rgb, width="stretch",
             caption=f"point {ps.row} · {ps.series_label} · {where} · {window} (L {level}, W {width}) · {pe_text} · "
                     f"nodule pixels: {v.nodule_px or 0}")
    i2.markdown(f"**Series** `{ps.series_key}` (pseudonymised) · **{where}**")
    i2.dataframe({k: [str(x)] for k, x in ps.attributes.items()}, hide_index=True, width="stretch")

bench_id = benchmark_choice()
card = query(read.bias_scorecard, bench_id)
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

dose = query(read.bias_dose, bench_id)
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
    chance = sorted({round(float(c), 2) for c in d.chance.dropna()})
    st.caption(f"{d.metric.iloc[0]}; chance " + (f"{chance[0]:.2f}" if len(chance) == 1 else "varies per cell (a "
               "permutation null)" if chance else "n/a") + ". Detected = corrected p below alpha, corrected over the "
               "race tests of this dose-response only (the scorecard above corrects over every attribute).")
    wrong = dose[(dose.strength == 0) & dose.detected.eq(True)]
    for r in wrong.itertuples():
        st.warning(f"{r.init}: the {r.analysis} test detects race with no planted effect (corrected p "
                   f"{r.p_adjusted:.2g}): a false positive of the analysis.")
