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
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
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


def _ts(value) -> _dt.datetime | None:
    return _dt.datetime.fromisoformat(value) if isinstance(value, str) and value else None


_ARROW = {"TEXT": "string", "JSON": "string", "DOUBLE": "float64", "INTEGER": "int32", "BIGINT": "int64",
          "BOOLEAN": "bool", "TIMESTAMP": "timestamp[us]"}


def _insert_bulk(con, table: str, rows: list[dict[str, Any]], verb: str = "INSERT") -> None:
    """``rows`` into ``table`` in one statement (an Arrow table typed from the schema): one statement for a
    thousand runs, where a statement per row cost ~10 ms each."""
    import pyarrow as pa

    if not rows:
        return
    types = _column_types(table)
    cols = [c for c, _ in types]
    arrow = pa.table({c: pa.array([r.get(c) for r in rows], type=pa.type_for_alias(_ARROW[t])) for c, t in types})
    view = f"_ctssl_new_{table}"
    con.register(view, arrow)
    try:
        con.execute(f"{verb} INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} FROM {view}")
    finally:
        con.unregister(view)


def _run_rows(con, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``runs`` rows of records. Labels: the record's label change applied to the row's labels
    (``runfolder.compose_labels``): idempotent, so merging a record again changes nothing, and
    ``annotate_run`` adds its change to the record as well as the row. The store's checkpoint and
    unit_hash stay when the record has none, and its created_at stays (a run made before records, resumed)."""
    old = {r[0]: r[1:] for r in con.execute(
        "SELECT run_id, name, tags, notes, checkpoint, unit_hash, created_at FROM runs "
        "WHERE run_id IN (SELECT unnest(?))", [[r["run_id"] for r in recs]]).fetchall()}
    out = []
    for rec in recs:
        o = old.get(rec["run_id"])
        have = {"name": o[0], "tags": json.loads(o[1]) if o[1] else {}, "notes": o[2]} if o else None
        labels = rf.merge_labels(have, rec["labels"]) if "labels" in rec else (have or {})
        row = {c: rec.get(c) for c in rf.RUN_FIELDS}
        row.update(created_at=(o[5] if o and o[5] else None) or _ts(rec.get("created_at")),   # a row's own stays
                   ended_at=_ts(rec.get("ended_at")),
                   checkpoint=rec.get("checkpoint") or (o[3] if o else None),
                   unit_hash=rec.get("unit_hash") or (o[4] if o else None),
                   name=labels.get("name"), notes=labels.get("notes"),
                   tags=json.dumps(labels.get("tags") or {}, sort_keys=True) if labels else None)
        out.append(row)
    return out


def _replace_rows(con, table: str, rows: list[tuple[str, dict[str, Any]]], stale: set) -> None:
    """The store's rows of runs' row files (``runfolder.ROW_FILES``) replaced by the files' (``_apply``
    deletes the runs' results first). An embedding row older than the store's row of the same emb_id (two
    runs made it; a copy of the store replays every folder) is skipped, with that folder's projections of it
    (``stale``: (folder's run id, emb_id)). ``rows``: (the folder's run id, row)."""
    if table == "results":
        _insert_bulk(con, "results", [r for _, r in rows])
        return
    cols = _table_columns(table)
    insert = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    for folder, r in rows:
        if table == "embeddings":     # new vectors: their old projections go too (store_api.replace_embedding)
            have = next(iter(con.execute("SELECT created_at FROM embeddings WHERE emb_id = ?",
                                         [r.get("emb_id")]).fetchall()), None)
            made = _ts(str(r["created_at"])) if r.get("created_at") else None
            if have and isinstance(have[0], _dt.datetime) and made is not None and have[0] > made:
                stale.add((folder, r.get("emb_id")))
                continue              # another run made these vectors later (one emb_id, two runs): keep them
            con.execute("DELETE FROM embeddings WHERE emb_id = ?", [r.get("emb_id")])
            con.execute("DELETE FROM projections WHERE emb_id = ?", [r.get("emb_id")])
        else:
            if (folder, r.get("emb_id")) in stale:
                continue
            con.execute("DELETE FROM projections WHERE emb_id = ? AND method = ?", [r.get("emb_id"), r.get("method")])
        con.execute(insert, [r.get(c) for c in cols])


@dataclass
class _Folder:
    """What one run folder holds that the store does not (read before the store's transaction)."""
    run_id: str
    record: dict[str, Any] | None = None
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    stamps: dict[str, str] = field(default_factory=dict)   # file -> stamp of the version merged now
    reset: bool = False                                    # a new metrics_id: its metrics merged afresh
    metrics: list[tuple] = field(default_factory=list)
    offset: int | None = None                              # the byte offset after these metric lines


def _read_folder(root: Path, run_id: str, merged: Mapping[tuple[str, str], str],
                 offsets: Mapping[str, int]) -> _Folder | None:
    """The new versions of a run folder's record and row files and its new whole metric lines; None when
    the store has all of it. Files only; raises ConfigError naming a file that cannot be merged."""
    run_dir = store_paths(root).run_dir(run_id)
    files = {rf.RUN_FILE: None, **{name: table for table, name in rf.ROW_FILES.items()}}
    f = _Folder(run_id)
    # stamps taken before reading: a file replaced meanwhile has a newer stamp, merged again at a later call
    f.stamps = rf.new_versions(run_dir, files, lambda name: merged.get((run_id, name)))
    emb, proj = rf.ROW_FILES["embeddings"], rf.ROW_FILES["projections"]
    if emb in f.stamps and proj not in f.stamps and (st := rf.stamp(run_dir / proj)) is not None:
        f.stamps[proj] = st                     # replacing an embedding drops its projections: put them back
    for name in list(f.stamps):
        if name == rf.RUN_FILE:
            got = f.record = rf.read_record(root, run_id)
        else:
            got = rf.read_rows(root, run_id, files[name])
            if got is not None:
                try:
                    f.rows[files[name]] = rf.check_rows(files[name], got)
                except ConfigError as e:
                    raise ConfigError(f"{run_dir / name}: {e}") from None
        if got is None:
            del f.stamps[name]                  # half-written or unreadable now: merged at a later call
    mid = (f.record or {}).get("metrics_id")
    if mid and merged.get((run_id, "metrics_id")) != mid:
        f.reset = True                          # a folder made again under its id: its own lines, from the start
        f.stamps["metrics_id"] = mid
    offset = 0 if f.reset else int(offsets.get(run_id, 0))
    path = metrics_path(root, run_id)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    if size != offset:
        chunk = whole_lines_after(path, offset)
        if chunk:
            f.metrics, f.offset = parse_lines(run_id, chunk), offset + len(chunk)
    return f if (f.stamps or f.offset is not None) else None


def _apply(con, folders: list[_Folder]) -> int:
    """Everything ``folders`` hold, in one transaction with the marks of what was merged (rows and marks
    commit together: nothing is merged twice or lost if a process dies). Returns metric rows added."""
    con.execute("BEGIN TRANSACTION")
    try:
        reset = [f.run_id for f in folders if f.reset]
        if reset:
            con.execute("DELETE FROM metrics WHERE run_id IN (SELECT unnest(?))", [reset])
            con.execute("DELETE FROM metric_offsets WHERE run_id IN (SELECT unnest(?))", [reset])
        recs = [f.record for f in folders if f.record is not None]
        if recs:
            rows = _run_rows(con, recs)
            con.execute("DELETE FROM runs WHERE run_id IN (SELECT unnest(?))", [[r["run_id"] for r in rows]])
            _insert_bulk(con, "runs", rows)
        with_results = [f.run_id for f in folders if "results" in f.rows]
        if with_results:
            con.execute("DELETE FROM results WHERE run_id IN (SELECT unnest(?))", [with_results])
        stale: set = set()
        for table in rf.ROW_FILES:              # results, embeddings, then projections
            _replace_rows(con, table, [(f.run_id, r) for f in folders for r in f.rows.get(table, [])], stale)
        metrics = [m for f in folders for m in f.metrics]
        if metrics:
            _insert_metric_rows(con, metrics)
        _insert_bulk(con, "metric_offsets", [{"run_id": f.run_id, "byte_offset": f.offset}
                                             for f in folders if f.offset is not None], "INSERT OR REPLACE")
        _insert_bulk(con, "merged_files", [{"run_id": f.run_id, "file": name, "stamp": st}
                                           for f in folders for name, st in f.stamps.items()], "INSERT OR REPLACE")
        con.execute("COMMIT")
    except BaseException:
        rollback_quietly(con)
        raise
    return len(metrics)


def merge_pending(store_root: str | Path, run_id: str | None = None, timeout_s: float = 30.0) -> int:
    """Merge what the run folders of ``run_id`` (or of every run) hold that the store has not: the whole
    metric lines after the merged offset, and a new version of a run's record or row files.

    Safe to call from any process at any time, as often as you like: the folders are read first, then
    merged in one transaction with the marks of what was merged. Returns metric rows added. A folder that
    cannot be merged (a damaged file) is logged and skipped when merging every run, and raised (ConfigError
    naming the file) when asked for that run. ``timeout_s``: how long to wait for a busy store (then
    ``StoreBusy``)."""
    root = Path(store_root)
    ids = [check_run_id(run_id)] if run_id is not None else rf.folder_run_ids(root)
    if not ids:
        return 0
    skipped: list[str] = []
    with connect(store_paths(root).db, timeout_s=timeout_s) as con:
        ensure_schema_once(con, store_paths(root).db)
        where, params = ("WHERE run_id = ?", [run_id]) if run_id is not None else ("", [])
        merged = {(r, f): st for r, f, st in con.execute(f"SELECT run_id, file, stamp FROM merged_files {where}",
                                                         params).fetchall()}
        offsets = dict(con.execute(f"SELECT run_id, byte_offset FROM metric_offsets {where}", params).fetchall())
        folders = []
        for rid in ids:
            try:
                got = _read_folder(root, rid, merged, offsets)
            except (ConfigError, ValueError, TypeError, KeyError, AttributeError) as e:
                if run_id is not None:
                    raise ConfigError(f"run folder {store_paths(root).run_dir(rid)} cannot be merged: {e}; fix or "
                                      f"remove the file it names") from None
                skipped.append(f"{store_paths(root).run_dir(rid)}: {type(e).__name__}: {str(e)[:300]}")
                continue    # one damaged folder must not keep every other run out of the store
            if got is not None:
                folders.append(got)
        added = _apply(con, folders) if folders else 0
    for what in skipped:
        logging.getLogger(__name__).warning("run folder not merged (fix or remove the file it names): %s", what)
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

    merge_pending(root, run_id)      # its metric lines first
    now = utcnow()
    for attempt in range(20):
        try:
            with connect(store_paths(root).db) as con:
                ensure_schema(con)
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
                                    lambda rec: {**rec, "labels": rf.compose_labels(rec.get("labels"), labels)})
    with connect(sp.db) as con:
        ensure_schema_current(con)
        got = _apply_labels(con, run_id, **labels)
    if got is None and recorded is not None:
        return rf.merge_labels(None, recorded["labels"])   # a run not merged yet: the merge brings them
    if got is None:
        raise ConfigError(f"no run {run_id!r} in {sp.root}; pass the id that "
                          f"pretrain/finetune printed")
    return got


# --------------------------------------------------------------------------- results / summaries


def _column_types(table: str) -> list[tuple[str, str]]:
    from ctssl_core.schema import TABLES, _columns

    return _columns(TABLES[table])


def _table_columns(table: str) -> list[str]:
    return [name for name, _ in _column_types(table)]


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
