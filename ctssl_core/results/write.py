"""The write side of the results store: runs, metrics, results, summaries, benchmarks.

Why this shape: DuckDB lets one process write *or* many read, never both
(DESIGN.md §5), and a training process that held the file open would lock the
dashboard out for hours. So the training loop never opens DuckDB: ``RunLogger``
(``results/runfolder.py``) appends one JSON line per ``log(dict)`` call to
``runs/<run_id>/metrics.jsonl``, and the store merges the new whole lines into the
long ``metrics`` table in ONE short transaction that also advances
``metric_offsets.byte_offset``: ``finish_run`` when the run ends, ``merge_pending``
from the job runner's heartbeat and the worker's reconcile. Because the rows and the
offset commit together, every line is merged exactly once, even if a process dies
between two merges. Until a line is merged, ``results/read.py`` shows it from the file.

Every other write (``start_run``, ``finish_run``, ``write_results`` ...) is one
short ``connect()`` + ``ensure_schema`` + statement.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ctssl_core.config import ConfigError
from ctssl_core.db import StoreBusy, connect
from ctssl_core.paths import REPO_ROOT, store_paths
from ctssl_core.results.runfolder import as_number, check_run_id, metrics_path, parse_lines, whole_lines_after
from ctssl_core.schema import TABLES, _columns, ensure_schema, ensure_schema_current, rollback_quietly

RUN_STATUSES = ("running", "succeeded", "failed", "cancelled")
# Env var set by the job runner: start_run appends each run id it starts to
# ``$CTSSL_JOB_DIR/runs.txt`` so a job can find the run(s) its command made
# without every command growing a ``--run-id`` flag.
JOB_DIR_ENV = "CTSSL_JOB_DIR"


_SCHEMA_DONE: set[tuple[str, int]] = set()
_SCHEMA_LOCK = threading.Lock()  # threads of one process share a DuckDB instance: one creates the schema


def ensure_schema_once(con, db_path: str | Path) -> None:
    """``ensure_schema`` once per process per store file: it costs ~30 statements, and a
    20 Hz logger or a 1 s heartbeat must not pay that on every short connection."""
    try:
        key = (str(Path(db_path).resolve()), os.stat(db_path).st_ino)
    except OSError:
        key = None
    if key is not None and key in _SCHEMA_DONE:
        return
    with _SCHEMA_LOCK:
        ensure_schema_current(con)
        if key is not None:
            _SCHEMA_DONE.add(key)


def utcnow() -> _dt.datetime:
    """Naive UTC timestamp (DuckDB TIMESTAMP has no zone; every writer uses UTC)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``git describe --always --dirty`` of the checkout, else the package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from ctssl_core import __version__
    return __version__


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", str(text).lower()).strip("_") or "x"


def new_run_id(kind: str, task: str, init: str) -> str:
    """Readable, sortable, unique: ``finetune-pe-masked_region-20261126-024501-3fa9c2``."""
    stamp = utcnow().strftime("%Y%m%d-%H%M%S")
    return f"{_slug(kind)}-{_slug(task)}-{_slug(init)}-{stamp}-{secrets.token_hex(3)}"


# --------------------------------------------------------------------------- metrics


def _insert_metric_rows(con, rows: list[tuple]) -> None:
    import pyarrow as pa

    cols = list(zip(*rows))
    table = pa.table({
        "run_id": pa.array(cols[0], pa.string()),
        "step": pa.array(cols[1], pa.int64()),
        "epoch": pa.array(cols[2], pa.float64()),
        "wall_s": pa.array(cols[3], pa.float64()),
        "name": pa.array(cols[4], pa.string()),
        "value": pa.array(cols[5], pa.float64()),
    })
    con.register("_ctssl_new_metrics", table)
    try:
        con.execute("INSERT INTO metrics (run_id, step, epoch, wall_s, name, value) "
                    "SELECT run_id, step, epoch, wall_s, name, value FROM _ctssl_new_metrics")
    finally:
        con.unregister("_ctssl_new_metrics")


def _merge_one(con, store_root: Path, run_id: str) -> int:
    """Merge the unmerged whole lines of one run's folder inside the caller's open connection."""
    path = metrics_path(store_root, run_id)
    if not path.exists():
        return 0
    con.execute("BEGIN TRANSACTION")
    try:
        got = con.execute("SELECT byte_offset FROM metric_offsets WHERE run_id = ?", [run_id]).fetchall()
        offset = int(got[0][0]) if got else 0
        chunk = whole_lines_after(path, offset)
        if not chunk:  # nothing new, or only a half-written last line
            con.execute("ROLLBACK")
            return 0
        rows = parse_lines(run_id, chunk)
        if rows:
            _insert_metric_rows(con, rows)
        con.execute("INSERT OR REPLACE INTO metric_offsets VALUES (?, ?)", [run_id, offset + len(chunk)])
        con.execute("COMMIT")
        return len(rows)
    except BaseException:
        rollback_quietly(con)
        raise


def merge_pending(store_root: str | Path, run_id: str | None = None, timeout_s: float = 30.0) -> int:
    """Merge every not-yet-merged whole line of ``run_id`` (or of every run) into ``metrics``.

    Safe to call from any process at any time, as often as you like: the
    offset advances in the same transaction as the rows. Returns rows added.
    ``timeout_s``: how long to wait for a busy store (then ``StoreBusy``).
    """
    root = Path(store_root)
    runs_dir = store_paths(root).runs
    if run_id is not None:
        ids = [check_run_id(run_id)]
    else:
        ids = sorted(p.parent.name for p in runs_dir.glob("*/metrics.jsonl")) if runs_dir.exists() else []
    if not ids:
        return 0
    added = 0
    with connect(store_paths(root).db, timeout_s=timeout_s) as con:
        ensure_schema_once(con, store_paths(root).db)
        for rid in ids:
            added += _merge_one(con, root, rid)
    return added


# --------------------------------------------------------------------------- runs


def start_run(store_root: str | Path, run_id: str, kind: str, task: str, init: str, encoder: str,
              config: Mapping[str, Any] | Any, fraction: float | None = None, seed: int | None = None,
              profile: str | None = None, benchmark_id: str | None = None,
              dataset: str | None = None, labels: Mapping[str, Any] | None = None,
              unit_hash: str | None = None) -> Path:
    """Create ``runs/<run_id>/`` (config.json) and the ``runs`` row (status running). Returns the run dir.

    ``unit_hash``: the identity of the unit the run computes (``plan.py``; a pretraining's is
    ``pretrain.pretrain_hash``), by which a benchmark finds it again.

    Starting an existing run id again (resume) sets it back to running and keeps
    its created_at, metrics and offset. ``labels`` ({name, tags, notes}, as ``check_labels``
    returns them; ``--name/--tag/--note`` of pretrain, finetune and benchmark) are written in the
    same transaction as the row, so the dashboard shows them while the run trains; on a resume
    they change the run's labels as ``annotate_run`` would.
    """
    import dataclasses

    root = Path(store_root)
    check_run_id(run_id)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    cfg_json = json.dumps(config, default=str, sort_keys=True)
    run_dir = store_paths(root).run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg_json)
    rel = run_dir.relative_to(root).as_posix()
    with connect(store_paths(root).db) as con:
        ensure_schema(con)
        con.execute(
            """INSERT INTO runs (run_id, kind, task, init, encoder, fraction, seed, profile, benchmark_id,
                                 dataset, config, code_version, status, created_at, run_dir, unit_hash)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)
               ON CONFLICT (run_id) DO UPDATE SET status = 'running', ended_at = NULL, error = NULL,
                   config = excluded.config, code_version = excluded.code_version,
                   unit_hash = coalesce(excluded.unit_hash, runs.unit_hash)""",
            [run_id, kind, task, init, encoder, fraction, seed, profile, benchmark_id, dataset,
             cfg_json, code_version(), utcnow(), rel, unit_hash])
        if labels:
            _apply_labels(con, run_id, **labels)
    job_dir = os.environ.get(JOB_DIR_ENV)
    if job_dir:
        try:
            with open(Path(job_dir) / "runs.txt", "a", encoding="utf-8") as f:
                f.write(run_id + "\n")
        except OSError:
            pass  # progress display only; the run itself is recorded above
    return run_dir


def end_run_after(original: BaseException, store_root: str | Path, run_id: str, status: str,
                  checkpoint: str | Path | None = None, error: str | None = None, close=None) -> None:
    """Record the end of a run that ``original`` stopped (close its logger, then ``finish_run``) without
    letting a second failure replace ``original``.

    Why: a full disk that stops a checkpoint also stops the store's write of the run's end; raised from
    the except block, that second error (a DuckDB traceback) hid the first (the disk is full, free space
    and resume), and the CLI exited 1 instead of 2 with what to do. The second failure becomes a note on
    ``original``, which the caller re-raises."""
    for what, step in (("close its log", close),
                       ("record its end", lambda: finish_run(store_root, run_id, status, checkpoint=checkpoint,
                                                             error=error))):
        if step is None:
            continue
        try:
            step()
        except Exception as e2:  # noqa: BLE001 - reported on the original error, never raised over it
            note = (f"ctssl could not {what} in the store ({type(e2).__name__}: {str(e2)[:300]}); "
                    f"the run may show as running until it is resumed or the job is reconciled")
            try:
                original.__notes__ = [*getattr(original, "__notes__", ()), note]   # add_note is Python >= 3.11
            except Exception:  # noqa: BLE001 - an exception type that takes no attributes keeps its own message
                pass


def finish_run(store_root: str | Path, run_id: str, status: str, checkpoint: str | Path | None = None,
               error: str | None = None) -> None:
    """Merge the run's pending metrics, then set its final status, end time, wall time, checkpoint."""
    if status not in RUN_STATUSES:
        raise ConfigError(f"run status {status!r} is not one of {list(RUN_STATUSES)}")
    root = Path(store_root)
    check_run_id(run_id)
    ckpt = None
    if checkpoint is not None:
        p = Path(checkpoint)
        try:
            ckpt = p.resolve().relative_to(root.resolve()).as_posix() if p.is_absolute() else p.as_posix()
        except ValueError:
            ckpt = p.as_posix()
    import duckdb

    now = utcnow()
    for attempt in range(20):
        try:
            with connect(store_paths(root).db) as con:
                ensure_schema(con)
                _merge_one(con, root, run_id)
                got = con.execute(
                    """UPDATE runs SET status = ?, ended_at = ?, checkpoint = coalesce(?, checkpoint), error = ?,
                           wall_s = epoch(CAST(? AS TIMESTAMP)) - epoch(created_at)
                       WHERE run_id = ? RETURNING run_id""",
                    [status, now, ckpt, error, now, run_id]).fetchall()
            break
        except duckdb.TransactionException as e:
            # Two threads of one process (a worker's reconcile and a caller's) finishing the same run
            # share one DuckDB instance and conflict on the row; the update is idempotent, so retry.
            if "Conflict" not in str(e) or attempt == 19:
                raise
            time.sleep(0.05 * (attempt + 1))
    if not got:
        raise ConfigError(f"finish_run: no run {run_id!r} in {root}; call start_run first")


# the run columns a tracker mirror carries as tags (trackers.read_run), and the prefixes of ctssl's and
# MLflow's own tags (ctssl.run_id, ctssl.mirror; mlflow.runName, mlflow.note.content...)
TAG_COLUMNS = ("kind", "task", "init", "encoder", "fraction", "seed", "profile", "benchmark_id", "dataset",
               "status", "code_version")
RESERVED_TAG_PREFIXES = ("ctssl.", "mlflow.")


def reserved_tag(key: str) -> bool:
    """Whether a user tag key would stand in for one of ctssl's own (a run column such as ``kind`` or
    ``benchmark_id``, which also picks the MLflow experiment; ``name``; ``ctssl.*``; ``mlflow.*``).
    Why: a mirror's tags are how people filter runs, so a user tag must never masquerade as one."""
    k = str(key).lower()
    return k in TAG_COLUMNS or k == "name" or k.startswith(RESERVED_TAG_PREFIXES)


def reserved_tag_message(key: str) -> str:
    return (f"tag key {key!r} is reserved for ctssl's own tags ({', '.join(TAG_COLUMNS)}, name, "
            f"{', '.join(p + '*' for p in RESERVED_TAG_PREFIXES)}), which ctssl sets from the run itself; "
            f"choose another key (e.g. --tag my_{str(key).replace('.', '_')}=...)")


TAG_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,63}$")


def check_labels(name: str | None = None, tags: Mapping[str, str] | Iterable[str] | None = None,
                 notes: str | None = None) -> dict[str, Any]:
    """A run's labels checked before anything is written: ``{"name", "tags", "notes"}``.

    Why one function: ``ctssl annotate`` and the ``--name/--tag/--note`` of pretrain, finetune and
    benchmark must accept and refuse the same input, and a bad tag must stop a command before its
    run row exists. ``tags`` is a mapping or the ``KEY=VALUE`` strings of ``--tag`` (``KEY=``
    removes a tag; a key of ctssl's own tags, ``reserved_tag``, is refused
    unless it is being removed). Raises ConfigError saying what to type instead."""
    if tags is not None and not isinstance(tags, Mapping):
        parsed: dict[str, str] = {}
        for item in tags:
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--tag {item!r} must look like KEY=VALUE (e.g. --tag owner=ana; KEY= removes it)")
            parsed[key.strip()] = value
        tags = parsed
    for k in (tags or {}):
        if not TAG_KEY.match(str(k)):
            raise ConfigError(f"tag key {k!r}: use up to 64 letters, digits and _ . - / (e.g. --tag owner=ana)")
        if reserved_tag(k) and str(tags[k]) != "":
            raise ConfigError(reserved_tag_message(k))
    return {"name": name, "tags": {str(k): str(v) for k, v in (tags or {}).items()}, "notes": notes}


def _apply_labels(con, run_id: str, name: str | None = None, tags: Mapping[str, str] | None = None,
                  notes: str | None = None) -> dict[str, Any] | None:
    """Merge checked labels into the run's row on an open connection (None: no such run).
    A tag set to '' is removed; name/notes None keep the old value, '' clears it."""
    row = con.execute("SELECT name, tags, notes FROM runs WHERE run_id = ?", [run_id]).fetchone()
    if row is None:
        return None
    merged = {**(json.loads(row[1]) if row[1] else {}), **(tags or {})}
    merged = {k: v for k, v in merged.items() if v != ""}
    new = (row[0] if name is None else (name or None), merged, row[2] if notes is None else (notes or None))
    con.execute("UPDATE runs SET name = ?, tags = ?, notes = ? WHERE run_id = ?",
                [new[0], json.dumps(new[1], sort_keys=True), new[2], run_id])
    return {"name": new[0], "tags": new[1], "notes": new[2]}


def annotate_run(store_root: str | Path, run_id: str, name: str | None = None,
                 tags: Mapping[str, str] | None = None, notes: str | None = None) -> dict[str, Any]:
    """Set a run's name and notes and merge ``tags`` into its tags (a tag set to '' is removed).

    Why: a run id says what ran, not why; people find runs by their own words, and trackers
    (``trackers.py``) carry them along. Returns the run's name, tags and notes after the change.
    A key of ctssl's own tags (``reserved_tag``: kind, task, benchmark_id..., ctssl.*, mlflow.*)
    is refused, so a user tag can never pose as one in a tracker; setting one to '' (removing it) is
    allowed, to clean a store written before the rule."""
    check_run_id(run_id)
    labels = check_labels(name, tags, notes)
    sp = store_paths(store_root)
    if not sp.db.exists():
        raise ConfigError(f"no store at {sp.root}; pass --store (or set CTSSL_STORE)")
    with connect(sp.db) as con:
        ensure_schema_current(con)
        got = _apply_labels(con, run_id, **labels)
    if got is None:
        raise ConfigError(f"no run {run_id!r} in {sp.root}; pass the id that "
                          f"pretrain/finetune printed")
    return got


# --------------------------------------------------------------------------- results / summaries


def _table_columns(table: str) -> list[str]:
    return [name for name, _ in _columns(TABLES[table])]


def _insert_rows(store_root: str | Path, table: str, rows: Iterable[Mapping[str, Any]],
                 key: tuple[str, ...]) -> int:
    """Insert dict rows; a row replaces an earlier one with the same ``key`` (re-running is idempotent)."""
    rows = [dict(r) for r in rows]
    if not rows:
        return 0
    cols = _table_columns(table)
    for i, r in enumerate(rows):
        unknown = sorted(set(r) - set(cols))
        if unknown:
            raise ConfigError(f"{table} row {i} has unknown columns {unknown}; valid: {cols}")
        if "value" in r and as_number(r["value"]) is None and r["value"] is not None:
            raise ConfigError(f"{table} row {i}: value {r['value']!r} is not a number")
    values = [[r.get(c) for c in cols] for r in rows]
    where = " AND ".join(f"{k} IS NOT DISTINCT FROM ?" for k in key)
    placeholders = ", ".join("?" for _ in cols)
    with connect(store_paths(store_root).db) as con:
        ensure_schema(con)
        con.execute("BEGIN TRANSACTION")
        try:
            for r, v in zip(rows, values):
                con.execute(f"DELETE FROM {table} WHERE {where}", [r.get(k) for k in key])
                con.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({placeholders})", v)
            con.execute("COMMIT")
        except BaseException:
            rollback_quietly(con)
            raise
    return len(rows)


def write_results(store_root: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Rows of the ``results`` table (one per metric); same run/split/metric replaces the old row."""
    return _insert_rows(store_root, "results", rows,
                        ("run_id", "benchmark_id", "task", "init", "fraction", "seed", "split", "metric"))


def write_summaries(store_root: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Rows of the ``summaries`` table; same benchmark/task/init/metric replaces the old row."""
    return _insert_rows(store_root, "summaries", rows, ("benchmark_id", "task", "init", "metric"))


# --------------------------------------------------------------------------- benchmarks


def start_benchmark(store_root: str | Path, benchmark_id: str, profile: str | None = None,
                    dataset: str | None = None, config: Mapping[str, Any] | None = None) -> None:
    check_run_id(benchmark_id)
    with connect(store_paths(store_root).db) as con:
        ensure_schema(con)
        con.execute(
            """INSERT INTO benchmarks (benchmark_id, profile, dataset, config, status, started_at)
               VALUES (?, ?, ?, ?, 'running', ?)
               ON CONFLICT (benchmark_id) DO UPDATE SET status = 'running', ended_at = NULL""",
            [benchmark_id, profile, dataset, json.dumps(config or {}, default=str, sort_keys=True), utcnow()])


def finish_benchmark(store_root: str | Path, benchmark_id: str, status: str = "succeeded") -> None:
    if status not in RUN_STATUSES:
        raise ConfigError(f"benchmark status {status!r} is not one of {list(RUN_STATUSES)}")
    now = utcnow()
    with connect(store_paths(store_root).db) as con:
        ensure_schema(con)
        got = con.execute(
            """UPDATE benchmarks SET status = ?, ended_at = ?,
                   wall_s = epoch(CAST(? AS TIMESTAMP)) - epoch(started_at)
               WHERE benchmark_id = ? RETURNING benchmark_id""", [status, now, now, benchmark_id]).fetchall()
    if not got:
        raise ConfigError(f"finish_benchmark: no benchmark {benchmark_id!r}; call start_benchmark first")
