"""The write side of the results store: runs, metrics, results, summaries, benchmarks.

Why this shape: DuckDB lets one process write *or* many read, never both (DESIGN.md §5), and a
training process that held the file open would lock the dashboard out for hours; on a cluster many
nodes would write one file. So a unit's process never opens DuckDB: it writes its run folder
(``results/runfolder.py``: its record ``run.json``, ``metrics.jsonl``, ``results.json``), and the
store merges the folder here, in ``merge_pending``: whole metric lines into the long ``metrics``
table in ONE short transaction that also advances ``metric_offsets.byte_offset`` (every line merged
exactly once, even if a process dies between two merges), and a new version of the record or the
results (``merged_files`` holds the version merged) as an upsert of the ``runs`` row and a
replacement of the run's ``results`` rows. Whoever drives units merges: the benchmark after each
unit, the job runner at each heartbeat and at the end, the worker's reconcile, a CLI command once
training returns. Until then ``results/read.py`` shows what the folders hold.

``start_run``/``finish_run`` here are for a driver recording a run of its own (the benchmark's row,
a job's runs after their process died): the record, then its merge. Other writes (results and
summaries of an analysis, benchmarks, labels) are one short ``connect()`` + statement.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ctssl_core.config import ConfigError
from ctssl_core.db import StoreBusy, connect
from ctssl_core.paths import store_paths
from ctssl_core.results import runfolder as rf
from ctssl_core.results.runfolder import (  # noqa: F401 - re-exported: the names drivers know them by
    JOB_DIR_ENV, RUN_STATUSES, check_run_id, code_version, metrics_path, new_run_id, parse_lines, utcnow,
    whole_lines_after)
from ctssl_core.schema import ensure_schema, ensure_schema_current, rollback_quietly


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


def _ts(value) -> _dt.datetime | None:
    return _dt.datetime.fromisoformat(value) if isinstance(value, str) and value else None


def _upsert_run(con, rec: Mapping[str, Any]) -> None:
    """The ``runs`` row of a run's record. Labels: the record's name/notes when set, its tags over the row's
    (``annotate_run`` changes both, so a removal reaches both; a run the store knew before it had a record
    keeps its older labels beside those of its resume)."""
    labels = rec.get("labels") or {}
    tags = labels.get("tags") or {}
    if "labels" in rec:
        old = con.execute("SELECT tags FROM runs WHERE run_id = ?", [rec.get("run_id")]).fetchone()
        tags = {**(json.loads(old[0]) if old and old[0] else {}), **tags}
    con.execute(
        """INSERT INTO runs (run_id, kind, task, init, encoder, fraction, seed, profile, benchmark_id, dataset,
                             config, code_version, status, created_at, ended_at, wall_s, run_dir, checkpoint,
                             error, unit_hash, name, tags, notes)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, ended_at = excluded.ended_at,
               wall_s = excluded.wall_s, error = excluded.error, config = excluded.config,
               code_version = excluded.code_version, checkpoint = coalesce(excluded.checkpoint, runs.checkpoint),
               unit_hash = coalesce(excluded.unit_hash, runs.unit_hash),
               name = CASE WHEN ? THEN excluded.name ELSE runs.name END,
               tags = CASE WHEN ? THEN excluded.tags ELSE runs.tags END,
               notes = CASE WHEN ? THEN excluded.notes ELSE runs.notes END""",
        [rec.get("run_id"), rec.get("kind"), rec.get("task"), rec.get("init"), rec.get("encoder"),
         rec.get("fraction"), rec.get("seed"), rec.get("profile"), rec.get("benchmark_id"), rec.get("dataset"),
         rec.get("config"), rec.get("code_version"), rec.get("status"), _ts(rec.get("created_at")),
         _ts(rec.get("ended_at")), rec.get("wall_s"), rec.get("run_dir"), rec.get("checkpoint"), rec.get("error"),
         rec.get("unit_hash"), labels.get("name"), json.dumps(tags, sort_keys=True),
         labels.get("notes"), "labels" in rec, "labels" in rec, "labels" in rec])


def _replace_rows(con, table: str, run_id: str, rows: list[dict[str, Any]]) -> None:
    """The store's rows of a run's row file (``runfolder.ROW_FILES``) replaced by the file's."""
    cols = _table_columns(table)
    insert = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    if table == "results":
        con.execute("DELETE FROM results WHERE run_id = ?", [run_id])
    for r in rows:
        if table == "embeddings":     # new vectors: their old projections go too (store_api.replace_embedding)
            con.execute("DELETE FROM embeddings WHERE emb_id = ?", [r.get("emb_id")])
            con.execute("DELETE FROM projections WHERE emb_id = ?", [r.get("emb_id")])
        elif table == "projections":
            con.execute("DELETE FROM projections WHERE emb_id = ? AND method = ?", [r.get("emb_id"), r.get("method")])
        con.execute(insert, [r.get(c) for c in cols])


def _merge_files(con, root: Path, run_id: str, merged: Mapping[tuple[str, str], str]) -> int:
    """Merge a new version of the run's record and of its row files (one transaction); 1 if anything was."""
    run_dir = store_paths(root).run_dir(run_id)
    files = {rf.RUN_FILE: None, **{name: table for table, name in rf.ROW_FILES.items()}}
    todo = {}
    for name in files:
        stamp = rf.stamp(run_dir / name)        # taken before reading: a newer file is merged again later
        if stamp is not None and merged.get((run_id, name)) != stamp:
            todo[name] = stamp
    if not todo:
        return 0
    emb, proj = rf.ROW_FILES["embeddings"], rf.ROW_FILES["projections"]
    if emb in todo and proj not in todo and (st := rf.stamp(run_dir / proj)) is not None:
        todo[proj] = st                         # replacing an embedding drops its projections: put them back
    got: dict[str, Any] = {}
    for name in todo:
        got[name] = rf.read_record(root, run_id) if name == rf.RUN_FILE else rf.read_rows(root, run_id, files[name])
    con.execute("BEGIN TRANSACTION")
    try:
        if got.get(rf.RUN_FILE) is not None:
            _upsert_run(con, got[rf.RUN_FILE])
        for table, name in rf.ROW_FILES.items():   # results, embeddings, then projections
            if got.get(name) is not None:
                _replace_rows(con, table, run_id, rf.check_rows(table, got[name]))
        for name, stamp in todo.items():
            if got[name] is not None:           # half-written or unreadable now: merged at a later call
                con.execute("INSERT OR REPLACE INTO merged_files VALUES (?, ?, ?)", [run_id, name, stamp])
        con.execute("COMMIT")
    except BaseException:
        rollback_quietly(con)
        raise
    return 1


def merge_pending(store_root: str | Path, run_id: str | None = None, timeout_s: float = 30.0) -> int:
    """Merge what the run folders of ``run_id`` (or of every run) hold that the store has not: the whole
    metric lines after the merged offset, and a new version of a run's record or results.

    Safe to call from any process at any time, as often as you like: each part is merged in one
    transaction with the mark of what was merged. Returns metric rows added. ``timeout_s``: how long to
    wait for a busy store (then ``StoreBusy``)."""
    root = Path(store_root)
    ids = [check_run_id(run_id)] if run_id is not None else rf.folder_run_ids(root)
    if not ids:
        return 0
    added = 0
    with connect(store_paths(root).db, timeout_s=timeout_s) as con:
        ensure_schema_once(con, store_paths(root).db)
        if run_id is not None:
            got = con.execute("SELECT run_id, file, stamp FROM merged_files WHERE run_id = ?", [run_id]).fetchall()
        else:
            got = con.execute("SELECT run_id, file, stamp FROM merged_files").fetchall()
        merged = {(r, f): st for r, f, st in got}
        for rid in ids:
            _merge_files(con, root, rid, merged)
            added += _merge_one(con, root, rid)
    return added


# --------------------------------------------------------------------------- runs


def start_run(store_root: str | Path, run_id: str, kind: str, task: str, init: str, encoder: str,
              config: Mapping[str, Any] | Any, **fields) -> Path:
    """A driver's own run (the benchmark's row): its record (``runfolder.record_start``, same arguments),
    merged at once. A unit's process calls ``record_start`` and leaves the merge to its driver."""
    run_dir = rf.record_start(store_root, run_id, kind, task, init, encoder, config, **fields)
    merge_pending(store_root, run_id)
    return run_dir


def finish_run(store_root: str | Path, run_id: str, status: str, checkpoint: str | Path | None = None,
               error: str | None = None) -> None:
    """End a run for its driver: the record's end (``runfolder.record_end``), then its merge with its
    pending metrics. A run the store knew before runs had records (none in its folder) is ended in its row."""
    if status not in RUN_STATUSES:
        raise ConfigError(f"run status {status!r} is not one of {list(RUN_STATUSES)}")
    root = Path(store_root)
    check_run_id(run_id)
    if rf.read_record(root, run_id) is not None:
        rf.record_end(root, run_id, status, checkpoint=checkpoint, error=error)
        merge_pending(root, run_id)
        return
    ckpt = rf.in_store_path(root, checkpoint)
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
    new = rf.merge_labels({"name": row[0], "tags": json.loads(row[1]) if row[1] else {}, "notes": row[2]},
                          {"name": name, "tags": tags, "notes": notes})
    con.execute("UPDATE runs SET name = ?, tags = ?, notes = ? WHERE run_id = ?",
                [new["name"], json.dumps(new["tags"], sort_keys=True), new["notes"], run_id])
    return new


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
    recorded = None
    if rf.read_record(store_root, run_id) is not None:   # the record first: a later merge must not undo it
        recorded = rf.update_record(store_root, run_id,
                                    lambda rec: {**rec, "labels": rf.merge_labels(rec.get("labels"), labels)})
    with connect(sp.db) as con:
        ensure_schema_current(con)
        got = _apply_labels(con, run_id, **labels)
    if got is None and recorded is not None:
        return recorded["labels"]           # a run its driver has not merged yet: the merge brings them
    if got is None:
        raise ConfigError(f"no run {run_id!r} in {sp.root}; pass the id that "
                          f"pretrain/finetune printed")
    return got


# --------------------------------------------------------------------------- results / summaries


def _table_columns(table: str) -> list[str]:
    from ctssl_core.schema import TABLES, _columns

    return [name for name, _ in _columns(TABLES[table])]


def _insert_rows(store_root: str | Path, table: str, rows: Iterable[Mapping[str, Any]],
                 key: tuple[str, ...]) -> int:
    """Insert dict rows; a row replaces an earlier one with the same ``key`` (re-running is idempotent)."""
    rows = rf.check_rows(table, list(rows))
    if not rows:
        return 0
    cols = _table_columns(table)
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
