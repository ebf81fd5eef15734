"""The persistent job queue in the ``jobs`` table: submit, claim, heartbeat, finish, cancel, resume, reconcile.

Why state lives in DuckDB and not in a process: the dashboard reruns its
script on every click and may be restarted; the worker may die; the job
process must outlive both. So every fact (state, pid, process group,
heartbeat, progress) is a row, written in one short transaction, and any
process can look at the row and the pid and decide what is true
(``reconcile``). Claiming is a single ``UPDATE ... WHERE state = 'queued'``:
DuckDB lets one process write at a time and MVCC rejects a second claim of
the same row within a process, so a job is claimed exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from ctssl_core.config import ConfigError, to_dict
from ctssl_core.db import StoreBusy, StoreError, StoreMissing, connect
from ctssl_core.jobs import procs
from ctssl_core.jobs.kinds import check_token, get_kind, resource_of, validate_spec
from ctssl_core.jobs.presence import jobs_root
from ctssl_core.paths import store_paths
from ctssl_core.results.runfolder import tail_metrics
from ctssl_core.results.write import ensure_schema_once, merge_pending, utcnow
from ctssl_core.schema import rollback_quietly

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")
RUNNER_MARKER = "ctssl_core.jobs.runner"
JOB_ID_ENV = "CTSSL_JOB_ID"  # set by the runner in its command's environment
PROC_FILE = "proc.json"      # jobs/<id>/proc.json: the runner's pid, start tick and boot id, host
DEFAULT_GRACE_S = 10.0  # SIGTERM -> SIGKILL on cancel: the worker's --grace; recorded per job in proc.json
DEFAULT_HANG_S = 1800.0  # no progress at all from a live command for this long = hung (the worker's --hang)
_clock, _sleep = time.monotonic, time.sleep  # cancel's waiting (tests inject a fake clock)
_INPROC_MARKERS = ("different configuration", "unfinished result", "Conflict on ",
                   "Transaction conflict", "write-write conflict")


class JobStateError(StoreError):
    """An action that does not fit the job's state (cancel a finished job, resume a running one)."""


def absolute_store(store_root: str | Path) -> Path:
    """The store folder as an absolute path, resolved against the caller's working directory.

    Why: the worker and the job runner run with the repository as their working
    directory, while ``ctssl jobs submit`` runs wherever the user is; a relative
    ``--store`` then named two different stores and a job waited forever in one
    while the worker served the other. Resolve once, where the user typed it.
    """
    return Path(store_root).expanduser().resolve()


def job_dir(store_root: str | Path, job_id: str) -> Path:
    return jobs_root(store_root) / check_token("job_id", job_id)


def new_job_id() -> str:
    return f"job-{utcnow().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def _con(store_root: str | Path, read_only: bool = False, timeout_s: float = 30.0) -> Iterator[Any]:
    """``db.connect`` plus a retry for in-process conflicts (a read-only and a read-write
    connection to the same file in one process, e.g. two Streamlit sessions) so the
    page never shows one. Read-write connections make sure the schema exists."""
    import duckdb

    deadline = time.monotonic() + timeout_s
    while True:
        cm = connect(store_paths(store_root).db, read_only=read_only, timeout_s=timeout_s)
        try:
            con = cm.__enter__()
            break
        except duckdb.Error as e:
            if not any(m.lower() in str(e).lower() for m in _INPROC_MARKERS) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    try:
        if not read_only:
            ensure_schema_once(con, store_paths(store_root).db)
        yield con
    finally:
        cm.__exit__(None, None, None)


def _retry_conflicts(fn, timeout_s: float = 30.0):
    """``fn()``, retried while it fails with an in-process conflict (two threads of one process,
    e.g. the worker's reconcile and a page's, writing the same rows); other errors propagate."""
    import duckdb

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except duckdb.Error as e:
            if not any(m.lower() in str(e).lower() for m in _INPROC_MARKERS) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _write(store_root: str | Path, fn, timeout_s: float = 30.0):
    """Run ``fn(con)`` in a read-write connection; retry the whole thing on an in-process conflict.
    ``timeout_s``: how long to wait for the store (StoreBusy after that)."""
    def _once():
        with _con(store_root, timeout_s=timeout_s) as con:
            return fn(con)
    return _retry_conflicts(_once, timeout_s)


def _read_df(store_root: str | Path, sql: str, params: list | None = None):
    """Read-only query -> DataFrame; an empty frame if the store has no ``jobs`` table yet."""
    import duckdb
    import pandas as pd

    try:
        with _con(store_root, read_only=True) as con:
            return con.execute(sql, params or []).df()
    except StoreMissing:
        return pd.DataFrame()
    except duckdb.CatalogException:
        return pd.DataFrame()


# --------------------------------------------------------------------------- reading


JOB_COLUMNS = ["job_id", "kind", "spec", "state", "backend", "created_at", "started_at", "ended_at",
               "heartbeat_at", "pid", "pgid", "claimed_by", "progress", "step", "total", "current",
               "log_path", "run_id", "error", "attempts", "cancel_requested"]


def list_jobs(store_root: str | Path, limit: int = 200, states: tuple[str, ...] | None = None,
              live: bool = True):
    """Jobs, newest first, as a DataFrame (``spec``/``current`` parsed to dicts).

    ``live``: running jobs' step/progress/current come from their metrics files (fresher than
    the last heartbeat)."""
    import pandas as pd

    where, params = "", []
    if states:
        where = f"WHERE state IN ({', '.join('?' for _ in states)})"
        params = list(states)
    df = _read_df(store_root, f"SELECT * FROM jobs {where} ORDER BY created_at DESC LIMIT {int(limit)}", params)
    if df.empty:
        return pd.DataFrame(columns=JOB_COLUMNS)
    for col in ("spec", "current"):
        df[col] = df[col].map(lambda s: json.loads(s) if isinstance(s, str) else (s or {}))
    if live:
        for i in df.index[df["state"] == "running"]:
            got = live_progress(store_root, df.at[i, "job_id"], df.at[i, "total"])
            if got:
                for k, v in got.items():
                    df.at[i, k] = v
    return df


def live_progress(store_root: str | Path, job_id: str, total: Any = None) -> dict[str, Any] | None:
    """Step, progress and current metrics of a running job from its files (no DuckDB).

    Why: the freshest progress is the last line of the run's metrics.jsonl, and
    reading it costs no store lock, so the runner can heartbeat rarely and the
    dashboard still moves every refresh.
    """
    import pandas as pd

    rids = job_run_ids(store_root, job_id)
    rec = tail_metrics(store_root, rids[-1]) if rids else None
    if not rec or rec.get("step") is None:
        return None
    step = int(rec["step"])
    out: dict[str, Any] = {"step": step, "run_id": rids[-1],
                           "current": {k: v for k, v in rec.items() if k not in ("step", "epoch")}}
    if total is not None and not pd.isna(total) and total:
        out["progress"] = max(0.0, min(1.0, step / float(total)))
    return out


def get_job(store_root: str | Path, job_id: str, live: bool = True) -> dict[str, Any]:
    check_token("job_id", job_id)
    df = _read_df(store_root, "SELECT * FROM jobs WHERE job_id = ?", [job_id])
    if df.empty:
        raise JobStateError(f"no job {job_id!r} in {store_root}; `ctssl jobs list` shows the jobs")
    row = df.iloc[0].to_dict()
    for col in ("spec", "current"):
        row[col] = json.loads(row[col]) if isinstance(row[col], str) else (row[col] or {})
    for k, v in list(row.items()):
        if v is not None and not isinstance(v, (dict, list, str)):
            try:
                import pandas as pd
                if pd.isna(v):
                    row[k] = None
            except (TypeError, ValueError):
                pass
    if live and row["state"] == "running":
        row.update(live_progress(store_root, job_id, row.get("total")) or {})
    return row


def log_tail(store_root: str | Path, job_id: str, n_lines: int = 40, max_bytes: int = 65536) -> str:
    """Last ``n_lines`` of the job's log ('' before it starts)."""
    path = job_dir(store_root, job_id) / "job.log"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    text = text.replace("\r", "\n")  # tqdm redraws
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-n_lines:])


def job_run_ids(store_root: str | Path, job_id: str) -> list[str]:
    """Run ids the job's command started (written by ``results.runfolder.record_start``), in order."""
    try:
        text = (job_dir(store_root, job_id) / "runs.txt").read_text()
    except OSError:
        return []
    out: list[str] = []
    for rid in text.split():
        if rid not in out:
            out.append(rid)
    return out


# --------------------------------------------------------------------------- submit / claim / update


def _new_job(store_root: Path, kind: str, params: Mapping[str, Any] | None, resume_run: str | None,
             resumed_from: str | None, note: str | None = None) -> tuple[str, list[Any]]:
    """Validate a spec and build the ``jobs`` row for it: (job_id, values for ``_INSERT``)."""
    spec = validate_spec(kind, params, store_root)
    if resume_run is not None:
        check_token("resume_run", resume_run)
    body = {"params": to_dict(spec), "resource": resource_of(spec), "resume_run": resume_run,
            "resumed_from": resumed_from, "store": str(store_root)}
    if note:
        body["note"] = note
    job_id = new_job_id()
    return job_id, [job_id, kind, json.dumps(body, sort_keys=True), utcnow(), getattr(spec, "steps", None),
                    f"jobs/{job_id}/job.log"]


_INSERT = """INSERT INTO jobs (job_id, kind, spec, state, backend, created_at, progress, total, attempts,
                              cancel_requested, log_path)
             VALUES (?, ?, ?, 'queued', 'local', ?, 0.0, ?, 0, false, ?)"""


def submit(store_root: str | Path, kind: str, params: Mapping[str, Any] | None = None,
           resume_run: str | None = None, resumed_from: str | None = None) -> str:
    """Validate and queue a job; returns its id. Invalid input raises JobSpecError and queues nothing.

    The job records the absolute store it was queued in (``spec['store']``), resolved
    against this process's working directory, the same folder its row is written to."""
    store_root = absolute_store(store_root)
    job_id, row = _new_job(store_root, kind, params, resume_run, resumed_from)
    _write(store_root, lambda con: con.execute(_INSERT, row))
    return job_id


def claim(store_root: str | Path, worker_id: str, resources: tuple[str, ...] = ("cpu", "gpu")) -> dict | None:
    """Atomically move the oldest queued job needing one of ``resources`` to running; None if none."""
    if not resources:
        return None
    res_list = ", ".join(f"'{r}'" for r in resources if r in ("cpu", "gpu"))

    def _claim(con):
        con.execute("BEGIN TRANSACTION")
        try:
            got = con.execute(
                f"""UPDATE jobs SET state = 'running', claimed_by = ?, started_at = ?, heartbeat_at = ?,
                        attempts = coalesce(attempts, 0) + 1
                    WHERE state = 'queued' AND job_id = (
                        SELECT job_id FROM jobs WHERE state = 'queued'
                          AND coalesce(json_extract_string(spec, '$.resource'), 'cpu') IN ({res_list})
                        ORDER BY created_at, job_id LIMIT 1)
                    RETURNING job_id, kind, spec""",
                [worker_id, utcnow(), utcnow()]).fetchall()
            con.execute("COMMIT")
        except BaseException:
            rollback_quietly(con)
            raise
        return got

    got = _write(store_root, _claim)
    if not got:
        return None
    job_id, kind, spec = got[0]
    return {"job_id": job_id, "kind": kind, "spec": json.loads(spec)}


def set_started(store_root: str | Path, job_id: str, pid: int, pgid: int, backend: str = "local",
                grace_s: float = DEFAULT_GRACE_S) -> bool:
    """Record the job's process; returns whether cancel was requested meanwhile.

    Also writes ``jobs/<id>/proc.json`` (pid, start tick, boot id, host, and the
    runner's SIGTERM->SIGKILL grace) so a later reconcile or cancel can tell this
    very process from one that reused its pid, and a waiting cancel never
    SIGKILLs before the runner's own grace is over.
    """
    _record_proc(store_root, job_id, pid, grace_s)
    def _f(con):
        got = con.execute(
            """UPDATE jobs SET pid = ?, pgid = ?, backend = ?, heartbeat_at = ?
               WHERE job_id = ? RETURNING cancel_requested""",
            [pid, pgid, backend, utcnow(), job_id]).fetchall()
        return bool(got and got[0][0])
    return _write(store_root, _f)


def heartbeat(store_root: str | Path, job_id: str, step: int | None = None, total: int | None = None,
              current: Mapping[str, Any] | None = None, run_id: str | None = None,
              timeout_s: float = 2.0) -> bool:
    """Runner's periodic update (heartbeat + progress). Returns cancel_requested.

    Waits at most ``timeout_s`` for a busy store (then StoreBusy): the runner's loop,
    which also forwards signals and watches its command, must not stall on it; a
    missed beat is retried later and costs nothing (liveness is the runner's pid)."""
    progress = None
    if step is not None and total:
        progress = max(0.0, min(1.0, float(step) / float(total)))

    def _f(con):
        got = con.execute(
            """UPDATE jobs SET heartbeat_at = ?, step = coalesce(?, step), total = coalesce(?, total),
                   progress = coalesce(?, progress), current = coalesce(?, current), run_id = coalesce(?, run_id)
               WHERE job_id = ? AND state = 'running' RETURNING cancel_requested""",
            [utcnow(), step, total, progress, json.dumps(current) if current is not None else None,
             run_id, job_id]).fetchall()
        return bool(got and got[0][0])
    return _write(store_root, _f, timeout_s=timeout_s)


def finish(store_root: str | Path, job_id: str, state: str, error: str | None = None) -> bool:
    """Set a final state once (only a running job is changed). Returns whether it changed."""
    if state not in FINAL:
        raise ConfigError(f"final job state must be one of {FINAL}, not {state!r}")

    def _f(con):
        got = con.execute(
            """UPDATE jobs SET state = ?, ended_at = ?, error = ?,
                   progress = CASE WHEN ? = 'succeeded' THEN 1.0 ELSE progress END
               WHERE job_id = ? AND state IN ('running', 'queued') RETURNING job_id""",
            [state, utcnow(), error, state, job_id]).fetchall()
        return bool(got)
    return _write(store_root, _f)


def close_runs(store_root: str | Path, job_id: str, status: str, error: str | None = None) -> None:
    """End the job's runs its command could not end (killed, crashed) in their records, then merge their
    folders (record, results, metric lines) into the store: the command itself never writes it.

    Raises ``StoreBusy`` when the store stayed busy for a run's merge (after ending every record), so the
    caller retries (the runner's ``record_end``, the worker's next reconcile) instead of finishing a job
    whose runs the store does not have."""
    from ctssl_core.results import runfolder as rf
    from ctssl_core.results.write import finish_run

    busy: StoreBusy | None = None
    for rid in job_run_ids(store_root, job_id):
        rec = rf.read_record(store_root, rid)
        try:
            if rec is not None:
                if rec.get("status") == "running":
                    rf.record_end(store_root, rid, status, error=error)
                _retry_conflicts(lambda r=rid: merge_pending(store_root, r))   # another thread may merge it too
                continue
            # a run of a store made before run records: ended in its row
            _retry_conflicts(lambda r=rid: merge_pending(store_root, r))
            got = _write(store_root, lambda con, r=rid: con.execute(
                "SELECT status FROM runs WHERE run_id = ?", [r]).fetchall())
            if got and got[0][0] == "running":
                _retry_conflicts(lambda r=rid: finish_run(store_root, r, status, error=error))
        except StoreBusy as e:
            busy = busy or e
        except ConfigError:
            continue          # not a run id, or a run the store never had: nothing to close
    if busy is not None:
        raise busy


# --------------------------------------------------------------------------- whose process is it?


def _record_proc(store_root: str | Path, job_id: str, pid: int | None, grace_s: float = DEFAULT_GRACE_S) -> None:
    if not pid:
        return
    path = job_dir(store_root, job_id) / PROC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": int(pid), "start_ticks": procs.start_ticks(pid),
                               "boot_id": procs.boot_id(), "host": procs.this_host(),
                               "grace_s": float(grace_s)}))
    tmp.replace(path)


def job_grace(store_root: str | Path, job_id: str) -> float:
    """The grace (s) the job's runner gives its command between SIGTERM and SIGKILL, as recorded
    when it started (``DEFAULT_GRACE_S`` if nothing was recorded)."""
    try:
        got = json.loads((job_dir(store_root, job_id) / PROC_FILE).read_text()).get("grace_s")
        return max(0.0, float(got)) if got is not None else DEFAULT_GRACE_S
    except (OSError, ValueError, TypeError, AttributeError):
        return DEFAULT_GRACE_S


def claim_host(claimed_by: Any) -> str | None:
    """Host part of ``claimed_by`` (the worker writes ``host:pid``); None if not in that form."""
    if not isinstance(claimed_by, str) or ":" not in claimed_by:
        return None
    return claimed_by.rsplit(":", 1)[0] or None


def claimed_here(claimed_by: Any) -> bool:
    """False when the job was claimed on another machine: its pids mean nothing here."""
    host = claim_host(claimed_by)
    return host is None or host == procs.this_host()


def runner_verified(store_root: str | Path, job_id: str, pid: int | None) -> bool:
    """True only if ``pid`` is this job's runner: its command line names the runner module and
    the job id and, when recorded, its start tick and boot match (not a reused pid)."""
    if not pid:
        return False
    try:
        rec = json.loads((job_dir(store_root, job_id) / PROC_FILE).read_text())
    except (OSError, ValueError):
        rec = {}
    started = None
    if isinstance(rec, dict) and rec.get("pid") == int(pid) and rec.get("start_ticks") is not None:
        if rec.get("boot_id") and procs.boot_id() and rec["boot_id"] != procs.boot_id():
            return False  # the machine restarted: every pid from before is someone else's now
        started = int(rec["start_ticks"])
    return procs.is_job_runner(pid, job_id, RUNNER_MARKER, started=started)


def running_here(store_root: str | Path) -> dict[str, str]:
    """Running jobs of this store that hold a slot on this machine: ``{job_id: 'cpu'|'gpu'}``.

    Why: a worker restarted after ``kill -9`` has no handles for the jobs its
    predecessor started, yet those jobs still run; counting only its own
    handles let ``--max-cpu-jobs 1`` run two at once. A job counts when it was
    claimed on this host and its runner is verified alive (pid, command line,
    start tick), or when it is claimed but not started yet (no pid: it may be
    starting now; reconcile fails it if it never starts).
    """
    import pandas as pd

    df = _read_df(store_root, "SELECT job_id, pid, claimed_by, spec FROM jobs WHERE state = 'running'")
    out: dict[str, str] = {}
    for r in df.itertuples(index=False):
        claimed_by = None if pd.isna(r.claimed_by) else r.claimed_by
        if not claimed_here(claimed_by):
            continue  # another machine's slot
        pid = None if pd.isna(r.pid) else int(r.pid)
        if pid is not None and not runner_verified(store_root, r.job_id, pid):
            continue  # dead: reconcile will mark it
        try:
            res = (json.loads(r.spec) if isinstance(r.spec, str) else r.spec or {}).get("resource")
        except (ValueError, AttributeError):
            res = None
        out[r.job_id] = res if res in ("cpu", "gpu") else "cpu"
    return out


def job_members(store_root: str | Path, job_id: str, pid: int | None, pgid: int | None) -> list[int]:
    """Live pids in ``pgid`` that belong to this job: the verified runner, or a process whose
    environment carries this job id (its command, e.g. left behind by a runner killed with -9)."""
    out = []
    for p in procs.group_members(pgid):
        if (p == pid and runner_verified(store_root, job_id, p)) or procs.environ_value(p, JOB_ID_ENV) == job_id:
            out.append(p)
    return out


def kill_job(store_root: str | Path, job_id: str, pid: int | None, pgid: int | None) -> list[int]:
    """SIGKILL the job's processes, and nobody else's. Returns the pids (or the pgid) signalled.

    The whole group is killed only when its leader is verified to be this job's
    runner (the runner leads its group); otherwise only the members that carry
    this job's id are killed one by one, so a program that reused the pid or
    the group id (e.g. a ``setsid`` process) is never touched.
    """
    if pgid and pid == pgid and runner_verified(store_root, job_id, pid):
        return [int(pgid)] if procs.kill_group(pgid) else []
    killed = []
    for p in job_members(store_root, job_id, pid, pgid):
        try:
            os.kill(p, signal.SIGKILL)
            killed.append(p)
        except (ProcessLookupError, PermissionError):
            pass
    return killed


# --------------------------------------------------------------------------- cancel / resume / reconcile


def cancel(store_root: str | Path, job_id: str, wait: bool = False) -> str:
    """Cancel: a queued job is simply cancelled; a running one gets SIGTERM on its process group.

    The job's runner waits its grace (the worker's ``--grace``, recorded with the
    job: ``job_grace``) for the command to save a checkpoint, then SIGKILLs.
    With ``wait=True`` this call also waits — that same grace plus a margin for
    the runner to finish, never less — then SIGKILLs leftovers itself and returns
    the final state. One setting, so a cancel never cuts a checkpoint short.

    Signals go only to a process verified to be this job's runner on this machine.
    A job claimed on another machine only gets ``cancel_requested`` (its runner
    reads it with its next heartbeat and stops itself).
    """
    check_token("job_id", job_id)

    def _f(con):
        q = con.execute(
            """UPDATE jobs SET state = 'cancelled', ended_at = ?, cancel_requested = true
               WHERE job_id = ? AND state = 'queued' RETURNING job_id""", [utcnow(), job_id]).fetchall()
        if q:
            return "cancelled", None
        got = con.execute(
            """UPDATE jobs SET cancel_requested = true WHERE job_id = ? AND state = 'running'
               RETURNING pid, pgid, claimed_by""", [job_id]).fetchall()
        if got:
            return "running", got[0]
        st = con.execute("SELECT state FROM jobs WHERE job_id = ?", [job_id]).fetchall()
        return (st[0][0] if st else None), None

    state, proc = _write(store_root, _f)
    if state is None:
        raise JobStateError(f"no job {job_id!r}; `ctssl jobs list` shows the jobs")
    if state != "running":
        if state == "cancelled":
            return state
        raise JobStateError(f"job {job_id} already {state}; nothing to cancel")
    pid, pgid, claimed_by = proc
    grace_s = job_grace(store_root, job_id)
    if not claimed_here(claimed_by):
        if wait:  # its runner, on its machine, stops it and writes the final state
            deadline = _clock() + grace_s + 10.0
            while _clock() < deadline and get_job(store_root, job_id)["state"] not in FINAL:
                _sleep(0.2)
            return get_job(store_root, job_id)["state"]
        return "running"
    ours = runner_verified(store_root, job_id, pid)
    if ours and pgid:
        procs.signal_group(pgid, signal.SIGTERM)
    if not wait:
        return "running"
    deadline = _clock() + grace_s + 5.0
    while _clock() < deadline and job_members(store_root, job_id, pid, pgid):
        _sleep(0.1)
    kill_job(store_root, job_id, pid, pgid)
    # the runner normally writes the final state; if it was killed first (or long gone), we do
    deadline = _clock() + (5.0 if ours else 0.0)
    while _clock() < deadline:
        if get_job(store_root, job_id)["state"] in FINAL:
            break
        _sleep(0.1)
    if get_job(store_root, job_id)["state"] not in FINAL:
        close_runs(store_root, job_id, "cancelled", "cancelled by user")
        finish(store_root, job_id, "cancelled", error="cancelled by user")
    return get_job(store_root, job_id)["state"]


def resume(store_root: str | Path, job_id: str) -> str:
    """Queue a new job that continues a failed or cancelled one from its last checkpoint; its id.

    Once per job: marking the old job (``spec.resumed_by``) and inserting the new one
    is one transaction, conditional on the old job being failed/cancelled and not
    resumed yet, so two clicks (or two terminals) create one new attempt, and the
    second gets a message naming it. Kinds whose command cannot resume a run, and
    runs stopped before their first checkpoint (``JobKind.checkpoint``), start the
    same spec afresh; the new job's ``spec.note`` says so.
    """
    store_root = absolute_store(store_root)
    job = get_job(store_root, job_id)
    if job["state"] not in ("failed", "cancelled"):
        raise JobStateError(f"job {job_id} is {job['state']}; only failed or cancelled jobs can be resumed")
    spec = job["spec"] or {}
    if spec.get("resumed_by"):
        raise _already_resumed(job_id, spec["resumed_by"])
    kind = get_kind(job["kind"])
    run_ids = job_run_ids(store_root, job_id)
    run_id = job.get("run_id") or (run_ids[-1] if run_ids else None) or spec.get("resume_run")
    resume_run = run_id if kind.resumable and run_id else None
    note = None
    if resume_run and not (store_paths(store_root).run_dir(resume_run) / kind.checkpoint).is_file():
        note = (f"run {resume_run} stopped before its first checkpoint ({kind.checkpoint}); "
                f"started afresh with the same settings instead of resuming")
        resume_run = None
    new_id, row = _new_job(store_root, job["kind"], spec.get("params") or {}, resume_run, job_id, note)

    def _f(con):
        con.execute("BEGIN TRANSACTION")
        try:
            mine = con.execute(
                """UPDATE jobs SET spec = json_merge_patch(spec, ?)
                   WHERE job_id = ? AND state IN ('failed', 'cancelled')
                     AND json_extract_string(spec, '$.resumed_by') IS NULL RETURNING job_id""",
                [json.dumps({"resumed_by": new_id}), job_id]).fetchall()
            if mine:
                con.execute(_INSERT, row)
            con.execute("COMMIT")
        except BaseException:
            rollback_quietly(con)
            raise
        return bool(mine)

    if not _write(store_root, _f):  # someone else resumed it (or changed its state) meanwhile
        now = get_job(store_root, job_id, live=False)
        if (now["spec"] or {}).get("resumed_by"):
            raise _already_resumed(job_id, now["spec"]["resumed_by"])
        raise JobStateError(f"job {job_id} is {now['state']}; only failed or cancelled jobs can be resumed")
    return new_id


def _already_resumed(job_id: str, by: str) -> JobStateError:
    return JobStateError(f"job {job_id} was already resumed as {by}; follow that job "
                         f"(resume {by} if it failed too)")


def reconcile(store_root: str | Path, start_grace_s: float = 60.0) -> list[tuple[str, str]]:
    """Mark running jobs whose runner is gone as failed (or cancelled), keeping their metrics.

    The rule, in two parts, each judged where its clock is trustworthy:

    - **Liveness** (here): a running job is alive exactly while its runner process
      is, verified by pid, command line (runner module + job id) and recorded start
      tick and boot (so a zombie or a reused pid is not taken for it). No
      heartbeat age is compared: the heartbeat is written by another process
      against the wall clock, so a clock step or a store held busy for a minute
      made healthy jobs look dead. A job claimed but not started (no pid) fails
      after ``start_grace_s``.
    - **Hang** (in the runner, ``runner.Supervisor``): a job is hung only if its
      training process is alive AND has made no progress (no new line in its
      runs' ``metrics.jsonl``, no new output in ``job.log``, no new run) for the
      worker's ``--hang`` seconds, measured on the runner's own monotonic clock.
      The runner then stops it (SIGTERM, SIGKILL after the grace) and records it
      failed with the reason.

    Jobs claimed on another machine are left alone (their pids mean nothing
    here); only processes verified to be the job's are killed (``kill_job``).
    A job cancelled whose process died is marked cancelled instead. Returns
    ``[(job_id, reason)]`` for the jobs it changed. Read-only when nothing changed.
    """
    import pandas as pd

    df = _read_df(store_root, "SELECT job_id, pid, pgid, heartbeat_at, started_at, cancel_requested, "
                              "claimed_by FROM jobs WHERE state = 'running'")
    if df.empty:
        return []
    now = utcnow()
    changed = []
    for r in df.itertuples(index=False):
        if not claimed_here(None if pd.isna(r.claimed_by) else r.claimed_by):
            continue  # another machine's job: its worker reconciles it
        pid = None if pd.isna(r.pid) else int(r.pid)
        pgid = None if pd.isna(r.pgid) else int(r.pgid)
        hb = r.heartbeat_at if not pd.isna(r.heartbeat_at) else r.started_at
        age = (now - pd.Timestamp(hb).to_pydatetime()).total_seconds() if not pd.isna(hb) else 1e9
        reason = None
        if pid is None:
            if age > start_grace_s:
                reason = f"the worker never started it (no process after {age:.0f}s; the worker died?)"
        elif not runner_verified(store_root, r.job_id, pid):
            reason = (f"its process {pid} is gone (killed, out of memory or machine restart); "
                      f"last heartbeat {age:.0f}s ago")
        if reason is None:
            continue
        kill_job(store_root, r.job_id, pid, pgid)
        state = "cancelled" if (not pd.isna(r.cancel_requested) and bool(r.cancel_requested)) else "failed"
        close_runs(store_root, r.job_id, state, reason)  # metrics first: a 'failed' row means all merged
        if finish(store_root, r.job_id, state, error=reason if state == "failed" else "cancelled by user"):
            changed.append((r.job_id, reason))
    return changed


def job_results(store_root: str | Path, job_id: str):
    """``results`` rows written by the job's runs (what a finished job produced)."""
    import pandas as pd

    rids = job_run_ids(store_root, job_id)
    if not rids:
        return pd.DataFrame(columns=["run_id", "task", "init", "fraction", "split", "metric", "value",
                                     "ci_low", "ci_high", "n"])
    marks = ", ".join("?" for _ in rids)
    return _read_df(store_root, f"""SELECT run_id, task, init, fraction, split, metric, value, ci_low, ci_high, n
                                    FROM results WHERE run_id IN ({marks}) ORDER BY run_id, split, metric""", rids)
