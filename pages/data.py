"""Data: the cohort in the store — counts, demographics, label prevalence, a slice viewer (series by readable
name, jump to slices with findings, preset or custom window), ingest errors."""

import streamlit as st

from ctssl_core import charts
from ctssl_core.results import read
from ctssl_core.results.read import hint
from pages.common import query, query_many, show_outdated_note, to_url, url_index, url_value

st.title("Data")
info, summary, demo, prev, series, errors = query_many(
    (read.store_info,), (read.cohort_summary,), (read.demographics,), (read.label_prevalence,), (read.series_list,),
    (read.ingest_errors,))
show_outdated_note(info)

if summary["patients"] == 0 and summary["slices"] == 0:
    st.info(f"This store has no cohort yet. Generate one with {hint('synth')} and ingest it with {hint('ingest')} "
            f"(the same command ingests your own DICOM folder).")
    st.stop()

cols = st.columns(5)
for c, (label, key) in zip(cols, [("Patients", "patients"), ("Studies", "studies"), ("Series", "series"),
                                  ("Slices", "slices"), ("Ingest errors", "ingest_errors")]):
    c.metric(label, f"{summary[key]:,}")
if summary["datasets"]:
    st.caption("Datasets: " + ", ".join(summary["datasets"]))

st.subheader("Demographics")
attrs = [a for a in ["age", "sex", "race", "site", "control_group"] if a in demo.columns and demo[a].notna().any()]
hcols = st.columns(max(1, len(attrs)))
for c, a in zip(hcols, attrs):
    with c:
        st.plotly_chart(charts.histogram_fig(demo[a], a), width="stretch", key=f"data_hist_{a}")

if len(prev):
    st.subheader("Labels")
    p1, p2 = st.columns([2, 1])
    p1.plotly_chart(charts.prevalence_fig(prev), width="stretch", key="data_prev")
    p2.dataframe(prev, hide_index=True, width="stretch")

st.subheader("Slice viewer")
if series.empty:
    st.info("No series arrays in this store (older store or empty ingest).")
else:
    v1, v2, v3 = st.columns([3, 2, 2])
    keys = series.series_key.tolist()
    names = dict(zip(series.series_key, series.label))
    key = v1.selectbox("Series", keys, index=url_index("series", keys), format_func=lambda k: names.get(k, k),
                       key="data_series", help="Numbered by dataset; PE / nodule = slices with that finding.")
    s = series[series.series_key == key].iloc[0]
    n = int(s.n_slices) if s.n_slices == s.n_slices and s.n_slices else 1
    findings = query(read.finding_slices, key)
    if n > 1 and st.session_state.get("data_idx", 0) > n - 1:   # the previous series was longer
        st.session_state["data_idx"] = n // 2
    if n > 1 and len(findings):
        found = {int(r.idx): ", ".join((["PE"] if r.pe else []) + ([f"nodule ({r.nodule_px} px)"] if r.nodule_px
                                                                     else [])) for r in findings.itertuples()}

        def _jump() -> None:
            pick = st.session_state.get("data_jump")
            if pick is not None:
                st.session_state["data_idx"] = int(pick)

        v1.selectbox("Jump to a slice with a finding", [None, *found], key="data_jump", on_change=_jump,
                     format_func=lambda i: "—" if i is None else f"slice {i}: {found[i]}")
    # a link's slice only seeds a fresh view; afterwards the slider's own state rules (no double source)
    seed = {} if "data_idx" in st.session_state else {"value": int(url_value("slice", range(n), n // 2))}
    idx = v1.slider("Slice", 0, max(n - 1, 0), key="data_idx", **seed) if n > 1 else 0
    to_url(series=key, slice=idx)
    window = v2.radio("Window", [*charts.WINDOWS, "custom"], key="data_window", horizontal=True)
    if window == "custom":
        w1, w2 = v2.columns(2)
        level = int(w1.number_input("Level (HU)", -2000, 4000, 40, step=10, key="data_level"))
        width = int(w2.number_input("Width (HU)", 1, 6000, 400, step=10, key="data_width",
                                    help="Window width in HU; at least 1."))
    else:
        level, width = charts.WINDOWS[window]
    show_mask = v3.checkbox("Nodule mask overlay", True, key="data_mask")
    show_pe = v3.checkbox("Frame PE-positive slices", True, key="data_pe")
    view = query(read.load_slice, key, int(idx), missing_ok=True)
    if view is not None:
        gray = charts.apply_window(view.hu, level, width)
        rgb = charts.overlay(gray, view.mask if show_mask else None,
                             border=(255, 200, 0) if (show_pe and view.pe) else None)
        pe_text = {True: "PE present", False: "no PE", None: "PE unknown"}[view.pe]
        nod_text = "no nodule mask for this series" if view.mask is None else f"nodule pixels: {view.nodule_px or 0}"
        v2.image(rgb, caption=f"{names.get(key, key)} · slice {idx} · {window} (L {level}, W {width}) · {pe_text} · "
                              f"{nod_text}", width="stretch")

st.subheader("Ingest errors")
if errors.empty:
    st.success("No files failed to ingest.")
else:
    st.dataframe(errors, hide_index=True, width="stretch")
