"""Jobs: launch, watch, cancel and resume background jobs (fine-tuning, probes, pretraining, ...).

Training never runs in this process: the form queues a validated job in the
store and makes sure a detached worker runs; the table below polls the store
with ``st.fragment(run_every=...)``. Reruns, refreshes or restarting the
dashboard neither kill nor duplicate a job. Everything here calls
``ctssl_core.jobs`` (the same functions as ``ctssl jobs ...``).
"""

import dataclasses

import streamlit as st

from ctssl_core import jobs
from ctssl_core.db import StoreError
from ctssl_core.results.read import hint as command_hint
from pages.common import current_store

REFRESH_S = 2.0
ACTIVE = ("queued", "running")

st.title("Jobs")
store = current_store()


def _safe(fn, *args, default=None, **kwargs):
    """Call a ctssl_core function; a busy or unreadable store becomes a short note, never a traceback."""
    try:
        return fn(*args, **kwargs)
    except jobs.JobSpecError as e:
        st.error(str(e))
    except StoreError as e:
        st.warning(f"{e}")
    except Exception as e:  # noqa: BLE001 - the page must not show a stack trace
        st.warning(f"The store at {store} could not be read just now ({type(e).__name__}); it retries.")
    return default


# --------------------------------------------------------------------------- launch form
st.subheader("Launch a job")
kinds = jobs.job_kinds()
kind = st.selectbox("Kind", list(kinds), format_func=lambda k: f"{k} — {kinds[k].label}", key="jobs_kind")
spec_cls = kinds[kind].spec
choices = _safe(jobs.field_choices, kind, store, default={}) or {}
with st.form(f"jobs_form_{kind}"):
    params = {}
    cols = st.columns(3)
    for i, f in enumerate(dataclasses.fields(spec_cls)):
        col = cols[i % 3]
        key = f"jobs_f_{kind}_{f.name}"
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        hint = None
        if lo is not None and hi is not None:
            hint = f"greater than {lo}, at most {hi}" if f.metadata.get("min_open") else f"from {lo} to {hi}"
        if f.name in choices:
            opts = list(choices[f.name])
            params[f.name] = col.selectbox(f.name, opts, index=opts.index(f.default) if f.default in opts else 0,
                                           key=key)
        elif f.type in (float, "float"):
            params[f.name] = col.number_input(f.name, value=float(f.default), step=0.01, format="%.4f",
                                              help=hint, key=key)
        elif f.type in (int, "int"):
            params[f.name] = col.number_input(f.name, value=int(f.default), step=1, help=hint, key=key)
        else:
            params[f.name] = col.text_input(f.name, value=str(f.default), key=key)
    start_worker = st.checkbox("Start a worker if none is running", value=True, key=f"jobs_autostart_{kind}")
    submitted = st.form_submit_button("Queue job")
if submitted:
    job_id = _safe(jobs.submit, store, kind, params)
    if job_id:
        st.success(f"Queued **{job_id}**.")
        st.session_state["jobs_selected"] = job_id
        if start_worker:
            _safe(jobs.ensure_worker, store)


# --------------------------------------------------------------------------- live table + details
def _fmt_current(cur) -> str:
    cur = cur or {}
    return "  ".join(f"{k}={v:.4g}" for k, v in cur.items() if isinstance(v, (int, float)) and k != "wall_s")


def _details(job: dict) -> None:
    jid, state = job["job_id"], job["state"]
    prog = float(job["progress"] or 0.0)
    step, total = job.get("step"), job.get("total")
    steps_txt = f" (step {int(step)}/{int(total)})" if step is not None and total else ""
    st.progress(min(max(prog, 0.0), 1.0), text=f"{jid} · {state} · "
                                                f"{100 * prog:.0f}%{steps_txt}")
    params = (job.get("spec") or {}).get("params") or {}
    st.caption(f"{job['kind']} · " + " · ".join(f"{k}={v}" for k, v in params.items())
               + (f" · resumes run {job['spec'].get('resume_run')}" if (job.get("spec") or {}).get("resume_run")
                  else ""))
    if job.get("current"):
        st.caption("Current: " + _fmt_current(job["current"]))
    if job.get("error") and state != "cancelled":
        st.error(f"Failed: {job['error']}")
    b1, b2, b3 = st.columns(3)
    if state in ACTIVE and b1.button("Cancel", key=f"jobs_cancel_{jid}"):
        _safe(jobs.cancel, store, jid)
        st.toast(f"cancel requested for {jid}")
    if state in ("failed", "cancelled") and b2.button("Resume", key=f"jobs_resume_{jid}"):
        new_id = _safe(jobs.resume, store, jid)
        if new_id:
            st.session_state["jobs_selected"] = new_id
            _safe(jobs.ensure_worker, store)
            st.toast(f"queued {new_id}")
    if job.get("run_id") and b3.button("Learning curves", key=f"jobs_curves_{jid}"):
        st.session_state["lc_text"] = job["run_id"]  # the curves page filters to this run and plots it
        st.switch_page("pages/curves.py")
    if state == "succeeded":
        res = _safe(jobs.job_results, store, jid)
        if res is not None and len(res):
            st.markdown("**Results**")
            st.table(res.drop(columns=[c for c in ("ci_low", "ci_high") if res[c].isna().all()]))
        else:
            st.caption("No result rows from this job (see the Overview and Learning curves pages).")
    with st.expander("Log (tail)", expanded=state in ACTIVE or state == "failed"):
        st.code(_safe(jobs.log_tail, store, jid, 30, default="") or "(no output yet)", language=None)


def _worker_status() -> None:
    wcol1, wcol2 = st.columns([4, 1])
    worker_pid = _safe(jobs.worker_running, store)
    wcol1.caption(f"Worker: running (pid {worker_pid})" if worker_pid else
                  f"Worker: not running — it starts when you queue a job, or run {command_hint('worker')} "
                  f"in a terminal.")
    if not worker_pid and wcol2.button("Start worker", key="jobs_start_worker"):
        pid = _safe(jobs.ensure_worker, store)
        st.toast(f"worker started (pid {pid})" if pid else "a worker is already running")


@st.fragment(run_every=REFRESH_S)
def live_jobs() -> None:
    _worker_status()
    _safe(jobs.reconcile, store)  # a job whose process died shows as failed at once
    df = _safe(jobs.list_jobs, store, default=None)
    if df is None:
        return
    if df.empty:
        st.info(f"No jobs yet. Queue one with the form above, or {command_hint('jobs_submit')}.")
        return
    n_active = int(df["state"].isin(ACTIVE).sum())
    st.subheader(f"Jobs ({n_active} active)")
    view = df.assign(
        progress=(df["progress"].fillna(0.0) * 100).round(1),
        current=df["current"].map(_fmt_current),
    )[["job_id", "kind", "state", "progress", "current", "created_at", "ended_at", "run_id"]]
    st.dataframe(view, hide_index=True, width="stretch", height=min(400, 38 + 35 * len(view)),
                 column_config={"progress": st.column_config.ProgressColumn(
                     "progress", min_value=0, max_value=100, format="%.0f%%")})
    ids = df["job_id"].tolist()
    if st.session_state.get("jobs_selected") not in ids:
        st.session_state["jobs_selected"] = ids[0]
    sel = st.selectbox("Job", ids, key="jobs_selected")
    job = _safe(jobs.get_job, store, sel)
    if job:
        _details(job)


live_jobs()
