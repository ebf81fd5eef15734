"""The named queries that training, benchmark, embedding, bias, export and tracker code runs on the
results tables (``runs``, ``results``, ``embeddings``, ``projections``, ``bias_results``).

Why: docs/ARCHITECTURE.md says training never opens DuckDB and only the store modules run SQL.
Those modules are ``db.py``/``schema.py`` (connection, DDL), ``results/read.py`` (the dashboard's
queries), ``results/write.py`` (a run's lifecycle: runs, metrics, results, summaries),
``results/seed.py`` (synthetic results), this module (everything else callers outside the store
need from the results tables), ``jobs/queue.py`` (the ``jobs`` table) and the catalog's
``data/catalog.py``, ``data/ingest/catalog_write.py``, ``data/store.py``, ``data/splits.py``.
Each function opens one short connection and returns plain Python values or a DataFrame; none
keeps state between calls. A missing store reads as "nothing there" where the caller treated it so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ctssl_core.db import connect
from ctssl_core.paths import store_paths


def _tables(con) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}


def _columns(con, table: str) -> set[str]:
    return {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                                      [table]).fetchall()}


# ------------------------------------------------------------------ runs


def run_task(store_root: str | Path, run_id: str) -> str | None:
    """The ``task`` of run ``run_id`` (None when the store or the run is missing)."""
    p = store_paths(store_root).db
    if not p.exists():
        return None
    with connect(p, read_only=True) as con:
        got = con.execute("SELECT task FROM runs WHERE run_id = ?", [run_id]).fetchall()
    return got[0][0] if got else None


def run_origin(store_root: str | Path, run_id: str) -> tuple[str, str | None, str | None] | None:
    """(run_id, task, init) of run ``run_id``; None when the store or the run is missing."""
    p = store_paths(store_root).db
    if not p.exists():
        return None
    with connect(p, read_only=True) as con:
        r = con.execute("SELECT run_id, task, init FROM runs WHERE run_id = ?", [str(run_id)]).fetchone()
    return tuple(r) if r is not None else None


def succeeded_units(store_root: str | Path) -> dict[str, tuple[str | None, str | None]]:
    """run_id -> (checkpoint (store-relative), unit_hash) of every succeeded run; {} without a store or
    ``runs``. A run made before ``runs.unit_hash`` existed has None there."""
    sp = store_paths(store_root)
    if not sp.db.exists():
        return {}
    with connect(sp.db, read_only=True) as con:
        if "runs" not in _tables(con):
            return {}
        hashed = "unit_hash" in _columns(con, "runs")
        return {r[0]: (r[1], r[2]) for r in con.execute(
            f"SELECT run_id, checkpoint, {'unit_hash' if hashed else 'NULL'} FROM runs "
            f"WHERE status = 'succeeded'").fetchall()}


def runs_with_hash(store_root: str | Path, kind: str, unit_hash: str) -> list[tuple[str, str | None]]:
    """(run_id, checkpoint) of the succeeded runs of ``kind`` that computed the unit ``unit_hash``, newest
    first: how a benchmark finds a pretraining it can reuse, whoever ran it."""
    sp = store_paths(store_root)
    if not sp.db.exists():
        return []
    with connect(sp.db, read_only=True) as con:
        if "runs" not in _tables(con) or "unit_hash" not in _columns(con, "runs"):
            return []                 # an older store: upgraded (and its pretrainings hashed) on its next write
        return [tuple(r) for r in con.execute(
            "SELECT run_id, checkpoint FROM runs WHERE kind = ? AND unit_hash = ? AND status = 'succeeded' "
            "ORDER BY ended_at DESC, run_id", [kind, unit_hash]).fetchall()]


def pretrain_checkpoints(store_root: str | Path, task: str) -> list[str]:
    """Checkpoint paths (as stored) of the succeeded pretrainings of ``task`` that have one, newest first."""
    sp = store_paths(store_root)
    if not sp.db.exists():
        return []
    with connect(sp.db, read_only=True) as con:
        return [r[0] for r in con.execute(
            "SELECT checkpoint FROM runs WHERE kind = 'pretrain' AND task = ? AND status = 'succeeded' "
            "AND checkpoint IS NOT NULL ORDER BY ended_at DESC", [task]).fetchall()]


def checkpoints(store_root: str | Path):
    """Succeeded pretraining runs whose checkpoint file exists: run_id, task, encoder, checkpoint, ended_at
    (DataFrame, newest first; empty with those columns when the store or its ``runs`` table is missing)."""
    import duckdb
    import pandas as pd

    from ctssl_core.db import StoreMissing

    try:
        with connect(store_paths(store_root).db, read_only=True) as con:
            df = con.execute("""
                SELECT run_id, task, encoder, checkpoint, ended_at FROM runs
                WHERE kind = 'pretrain' AND status = 'succeeded' AND checkpoint IS NOT NULL
                ORDER BY ended_at DESC""").df()
    except (StoreMissing, duckdb.CatalogException):
        df = pd.DataFrame()
    if df.empty:
        return pd.DataFrame(columns=["run_id", "task", "encoder", "checkpoint", "ended_at"])
    root = Path(store_root)
    keep = df["checkpoint"].map(lambda p: (root / p).exists() if not Path(p).is_absolute() else Path(p).exists())
    return df[keep].reset_index(drop=True)


def run_card(store_root: str | Path, run_id: str) -> tuple[tuple | None, list[tuple]]:
    """((status, code_version, wall_s, created_at) or None, [(task, split, metric, value)...]) of a run."""
    with connect(store_paths(store_root).db, read_only=True) as con:
        row = con.execute("SELECT status, code_version, wall_s, created_at FROM runs WHERE run_id = ?",
                          [run_id]).fetchone()
        res = con.execute("SELECT task, split, metric, value FROM results WHERE run_id = ?", [run_id]).fetchall()
    return row, res


def run_record(store_root: str | Path, run_id: str) -> tuple[dict[str, Any] | None, list[tuple]]:
    """(every column of the run's row as a dict, or None; [(split, metric, value)...] sorted)."""
    with connect(store_paths(store_root).db, read_only=True) as con:
        cols = [r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'runs'"
                                          ).fetchall()]
        row = con.execute(f"SELECT {', '.join(cols)} FROM runs WHERE run_id = ?", [run_id]).fetchone()
        results = con.execute("SELECT split, metric, value FROM results WHERE run_id = ? ORDER BY split, metric",
                              [run_id]).fetchall()
    return (dict(zip(cols, row)) if row is not None else None), results


def benchmark_run_configs(store_root: str | Path, benchmark_id: str) -> list[tuple[str, Any]]:
    """(run_id, config) of the benchmark's runs that are not running, oldest first."""
    with connect(store_paths(store_root).db, read_only=True) as con:
        return [tuple(r) for r in con.execute(
            "SELECT run_id, config FROM runs WHERE benchmark_id = ? AND status != 'running' "
            "ORDER BY created_at, run_id", [benchmark_id]).fetchall()]


def finished_of(store_root: str | Path, run_ids: Sequence[str]) -> list[str]:
    """Those of ``run_ids`` that exist and are not running, oldest first."""
    if not run_ids:
        return []
    with connect(store_paths(store_root).db, read_only=True) as con:
        return [r[0] for r in con.execute(
            f"SELECT run_id FROM runs WHERE run_id IN ({', '.join('?' * len(run_ids))}) AND status != 'running' "
            f"ORDER BY created_at, run_id", list(run_ids)).fetchall()]


# ------------------------------------------------------------------ embeddings and projections


def replace_embedding(store_root: str | Path, row: dict[str, Any]) -> None:
    """(Re)place the ``embeddings`` row ``row`` and drop the projections of its old vectors."""
    from ctssl_core.schema import ensure_schema

    with connect(store_paths(store_root).db) as con:
        ensure_schema(con)
        con.execute("DELETE FROM embeddings WHERE emb_id = ?", [row["emb_id"]])
        con.execute("DELETE FROM projections WHERE emb_id = ?", [row["emb_id"]])
        con.execute(f"INSERT INTO embeddings ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


def embedding_row(store_root: str | Path, emb_id: str) -> tuple[dict[str, Any] | None, list[str]]:
    """(the ``embeddings`` row of ``emb_id`` or None, the 10 newest emb_ids when it is missing)."""
    with connect(store_paths(store_root).db, read_only=True) as con:
        cur = con.execute("SELECT * FROM embeddings WHERE emb_id = ?", [emb_id])
        r = cur.fetchone()
        cols = [d[0] for d in cur.description]
        if r is None:
            return None, [x[0] for x in con.execute(
                "SELECT emb_id FROM embeddings ORDER BY created_at DESC LIMIT 10").fetchall()]
    return dict(zip(cols, r)), []


def replace_projection(store_root: str | Path, row: dict[str, Any]) -> None:
    """(Re)place the ``projections`` row of (row's emb_id, method)."""
    from ctssl_core.schema import ensure_schema

    with connect(store_paths(store_root).db) as con:
        ensure_schema(con)
        con.execute("DELETE FROM projections WHERE emb_id = ? AND method = ?", [row["emb_id"], row["method"]])
        con.execute(f"INSERT INTO projections ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


def projection_path(store_root: str | Path, emb_id: str, method: str) -> str | None:
    """Store-relative path of the stored ``method`` projection of ``emb_id``, if any."""
    with connect(store_paths(store_root).db, read_only=True) as con:
        r = con.execute("SELECT path FROM projections WHERE emb_id = ? AND method = ?", [emb_id, method]).fetchone()
    return r[0] if r is not None else None


def random_reference(store_root: str | Path, emb_id: str) -> str | None:
    """The newest random-init embedding of the same split, level and encoder as ``emb_id``, if any."""
    with connect(store_paths(store_root).db, read_only=True) as con:
        row = con.execute("SELECT split, level, encoder FROM embeddings WHERE emb_id = ?", [emb_id]).fetchone()
        if row is None:
            return None
        ref = con.execute("SELECT emb_id FROM embeddings WHERE init = 'random' AND split = ? AND level = ? AND encoder = ? "
                          "AND emb_id <> ? ORDER BY created_at DESC LIMIT 1", [row[0], row[1], row[2], emb_id]).fetchone()
    return ref[0] if ref else None


# ------------------------------------------------------------------ bias results


def replace_bias_results(store_root: str | Path, df, columns: Sequence[str]) -> None:
    """Replace the ``bias_results`` rows of each (emb_id, reference_emb_id, analysis) in ``df`` with ``df``'s
    rows (``df`` holds exactly ``columns``, typed for the table)."""
    import math

    from ctssl_core.schema import ensure_schema

    with connect(store_paths(store_root).db) as con:
        ensure_schema(con)
        for (e, r, a) in df[["emb_id", "reference_emb_id", "analysis"]].drop_duplicates().itertuples(index=False):
            con.execute("DELETE FROM bias_results WHERE emb_id = ? AND reference_emb_id IS NOT DISTINCT FROM ? AND analysis = ?",
                        [e, None if r is None or (isinstance(r, float) and math.isnan(r)) else r, a])
        con.register("bias_df", df)
        con.execute(f"INSERT INTO bias_results ({', '.join(columns)}) SELECT {', '.join(columns)} FROM bias_df")
        con.unregister("bias_df")
