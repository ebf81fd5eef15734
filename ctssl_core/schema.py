"""The DuckDB schema: catalog (ingest writes), results and jobs. One file, one place.

Contract for every module: table and column names here are shared by the
ingest, training, analysis, job and dashboard code. Add a column at the end of
a table (and bump SCHEMA_VERSION) rather than renaming one. ``ensure_schema`` is
idempotent and also upgrades older stores: missing columns are added, and a table
made before its primary key existed is rebuilt with it (``ON CONFLICT`` upserts
need the key). A store written by a newer ctssl is refused, never downgraded.

No patient identifier is stored anywhere: ``patient_key``/``study_key``/
``series_key``/``sop_key`` are keyed hashes made at ingest (data/pseudonym.py).
"""

from __future__ import annotations

SCHEMA_VERSION = 6   # 3: runs.name, runs.tags, runs.notes; 4: summaries.outcome (the bias scorecard's outcome).
                     # Two branches both stamped 3; 4 makes every store either of them built add the other's column.
                     # 5: runs.unit_hash (a run's unit identity; older pretrainings get theirs from their config)
                     # 6: merged_files (which version of a run folder's run.json/results.json the store has)

TABLES: dict[str, str] = {
    "meta": """
        key TEXT PRIMARY KEY,
        value TEXT
    """,
    # ---------------- catalog (data/ingest/catalog_write.py writes) ----------------
    "patients": """
        patient_key TEXT PRIMARY KEY,   -- keyed hash of PatientID
        age DOUBLE,                     -- years
        sex TEXT,                       -- 'F' | 'M' | NULL
        race TEXT,                      -- label as given (EthnicGroup or demographics CSV)
        attributes JSON                 -- extra attributes, e.g. {"control_group": "A", "site": ...}
    """,
    "studies": """
        study_key TEXT PRIMARY KEY,
        patient_key TEXT,
        dataset TEXT,                   -- 'synthetic' | 'rsna-pe' | 'lidc' | 'generic'
        pe_exam BOOLEAN,                -- exam-level PE; NULL = unknown
        exam_labels JSON                -- RSNA exam-level columns when known
    """,
    "series": """
        series_key TEXT PRIMARY KEY,
        study_key TEXT,
        patient_key TEXT,
        array_path TEXT,                -- relative to store root: int16 HU .npy (S, H, W)
        mask_path TEXT,                 -- relative: uint8 nodule consensus .npy (S, H, W); NULL = none
        n_slices INTEGER,
        height INTEGER,
        width INTEGER,
        orig_rows INTEGER,
        orig_cols INTEGER,
        pixel_spacing_mm DOUBLE,        -- in-plane spacing of the *stored* array
        slice_spacing_mm DOUBLE,
        slice_thickness_mm DOUBLE,
        site TEXT,                      -- acquisition site / scanner group (InstitutionName is never stored)
        manufacturer TEXT,
        model TEXT,
        kernel TEXT,
        selection_rule TEXT,            -- why this series was chosen for its study
        ingested_at TIMESTAMP,
        notes JSON                      -- assumptions made reading its headers (e.g. zero slope taken as 1); NULL = none
    """,
    "slices": """
        slice_id BIGINT PRIMARY KEY,    -- dense global id, 0..N-1
        series_key TEXT,
        idx INTEGER,                    -- row in the series array (sorted by z)
        sop_key TEXT,                   -- keyed hash of SOPInstanceUID
        z_mm DOUBLE,
        pe BOOLEAN,                     -- pe_present_on_image; NULL = unknown
        nodule_px INTEGER               -- nodule pixels on this slice in the stored mask; NULL = unknown
    """,
    "ingest_errors": """
        path TEXT,                      -- keyed hash of the path relative to the ingest root
                                        -- (`ctssl ingest DIR --list-errors` shows real paths locally)
        reason TEXT,                    -- short machine key: not_dicom, truncated, no_pixels, ...
        detail TEXT,                    -- human sentence: what happened and what to do
        logged_at TIMESTAMP
    """,
    "ingested_files": """
        path TEXT PRIMARY KEY,          -- keyed hash of the path relative to the ingest root
        size BIGINT,
        mtime DOUBLE,
        status TEXT                     -- 'ok' | 'error' | 'skipped' | 'retry' (taken again by the next run)
    """,
    "splits": """
        patient_key TEXT,
        seed INTEGER,
        split TEXT,                     -- 'train' | 'val' | 'test'
        PRIMARY KEY (patient_key, seed)
    """,
    # ---------------- results (results/write.py writes) ----------------
    "runs": """
        run_id TEXT PRIMARY KEY,
        kind TEXT,                      -- 'pretrain' | 'finetune' | 'probe' | 'embed' | 'benchmark'
        task TEXT,                      -- registry key: 'rotation', 'pe', 'nodule', ...
        init TEXT,                      -- pretext key of the init, or 'random'
        encoder TEXT,                   -- encoder registry key
        fraction DOUBLE,                -- label fraction for downstream runs
        seed INTEGER,
        profile TEXT,
        benchmark_id TEXT,
        dataset TEXT,
        config JSON,
        code_version TEXT,
        status TEXT,                    -- 'running' | 'succeeded' | 'failed' | 'cancelled'
        created_at TIMESTAMP,
        ended_at TIMESTAMP,
        wall_s DOUBLE,
        run_dir TEXT,                   -- relative to store root
        checkpoint TEXT,                -- relative path of the final checkpoint, if any
        error TEXT,
        name TEXT,                      -- a person's name for the run (`ctssl annotate`), shown beside the id
        tags JSON,                      -- {"key": "value"} labels (`ctssl annotate --tag`), mirrored to trackers
        notes TEXT,                     -- free text about the run (`ctssl annotate --note`); never patient data
        unit_hash TEXT                  -- identity of the unit it computes: hash of its resolved config (plan.py)
    """,
    "metrics": """
        run_id TEXT,
        step BIGINT,
        epoch DOUBLE,
        wall_s DOUBLE,
        name TEXT,                      -- 'train/loss', 'lr', 'val/dice', ...
        value DOUBLE
    """,
    "metric_offsets": """
        run_id TEXT PRIMARY KEY,
        byte_offset BIGINT              -- bytes of runs/<id>/metrics.jsonl already merged
    """,
    "merged_files": """
        run_id TEXT,
        file TEXT,                      -- 'run.json' | 'results.json' of runs/<run_id>/
        stamp TEXT,                     -- inode:mtime_ns:size of the version merged (a new one is merged again)
        PRIMARY KEY (run_id, file)
    """,
    "results": """
        run_id TEXT,
        benchmark_id TEXT,
        task TEXT,
        init TEXT,
        fraction DOUBLE,
        seed INTEGER,
        split TEXT,
        metric TEXT,                    -- 'slice_auroc', 'exam_auroc', 'dice', 'age_mae', ...
        value DOUBLE,
        ci_low DOUBLE,
        ci_high DOUBLE,
        n INTEGER
    """,
    "summaries": """
        benchmark_id TEXT,
        task TEXT,
        init TEXT,
        metric TEXT,                    -- headline metrics, 'labels_saved', 'speed_ratio', ...
        value DOUBLE,
        ci_low DOUBLE,
        ci_high DOUBLE,
        note TEXT,
        outcome TEXT                    -- bias scorecard rows: hit | miss | false positive | correct null | not run
    """,
    "benchmarks": """
        benchmark_id TEXT PRIMARY KEY,
        profile TEXT,
        dataset TEXT,
        config JSON,
        status TEXT,
        started_at TIMESTAMP,
        ended_at TIMESTAMP,
        wall_s DOUBLE
    """,
    "embeddings": """
        emb_id TEXT PRIMARY KEY,
        run_id TEXT,                    -- checkpoint's run, NULL for random init
        init TEXT,
        encoder TEXT,
        split TEXT,
        level TEXT,                     -- 'slice' | 'exam'
        path TEXT,                      -- relative: float32 .npy (N, D)
        keys_path TEXT,                 -- relative: parquet of row keys + demographics
        n INTEGER,
        dim INTEGER,
        created_at TIMESTAMP
    """,
    "projections": """
        emb_id TEXT,
        method TEXT,                    -- 'pca' | 'umap'
        params JSON,
        seconds DOUBLE,
        n_points INTEGER,
        sampled BOOLEAN,
        path TEXT                       -- relative: parquet with row, x, y
    """,
    "bias_results": """
        emb_id TEXT,
        reference_emb_id TEXT,          -- random-init embedding it is compared with
        analysis TEXT,                  -- 'probe' | 'ks' | 'separability' | 'subgroup' | 'subgroup_resampled'
        attribute TEXT,                 -- 'age' | 'sex' | 'race' | 'control_group' | ...
        group_a TEXT,
        group_b TEXT,
        metric TEXT,
        value DOUBLE,
        ci_low DOUBLE,
        ci_high DOUBLE,
        delta DOUBLE,                   -- value - reference value
        delta_ci_low DOUBLE,
        delta_ci_high DOUBLE,
        p_value DOUBLE,
        p_adjusted DOUBLE,
        flagged BOOLEAN,
        sentence TEXT
    """,
    # ---------------- jobs (jobs.py writes) ----------------
    "jobs": """
        job_id TEXT PRIMARY KEY,
        kind TEXT,                      -- 'finetune' | 'probe' | 'pretrain' | 'embed' | 'benchmark'
        spec JSON,
        state TEXT,                     -- 'queued' | 'running' | 'succeeded' | 'failed' | 'cancelled'
        backend TEXT,
        created_at TIMESTAMP,
        started_at TIMESTAMP,
        ended_at TIMESTAMP,
        heartbeat_at TIMESTAMP,
        pid INTEGER,
        pgid INTEGER,
        claimed_by TEXT,
        progress DOUBLE,                -- 0..1
        step BIGINT,
        total BIGINT,
        current JSON,                   -- latest metrics
        log_path TEXT,
        run_id TEXT,
        error TEXT,
        attempts INTEGER,
        cancel_requested BOOLEAN
    """,
}


def _columns(body: str) -> list[tuple[str, str]]:
    cols = []
    for line in body.strip().splitlines():
        line = line.split("--", 1)[0].strip().rstrip(",")
        if not line or line.upper().startswith("PRIMARY KEY"):
            continue
        name, rest = line.split(None, 1)
        cols.append((name, rest.replace("PRIMARY KEY", "").strip()))
    return cols


def _primary_key(body: str) -> list[str]:
    """The primary key columns a table body declares (inline or as a PRIMARY KEY (...) line)."""
    inline = []
    for line in body.strip().splitlines():
        line = line.split("--", 1)[0].strip().rstrip(",")
        if line.upper().startswith("PRIMARY KEY"):
            return [c.strip() for c in line[line.index("(") + 1:line.rindex(")")].split(",")]
        if "PRIMARY KEY" in line.upper():
            inline.append(line.split(None, 1)[0])
    return inline


def stored_version(con) -> str | None:
    """The store's schema_version marker, or None when it has none (a new or very old store)."""
    import duckdb

    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except duckdb.CatalogException:
        return None
    return row[0] if row else None


def check_not_newer(version: str | None) -> None:
    """Refuse a store written by a newer ctssl: upgrading this one would downgrade its marker and
    write rows without the columns and keys the newer code relies on."""
    from ctssl_core.db import StoreError

    if version is None:
        return
    try:
        v = int(version)
    except ValueError:
        raise StoreError(f"the store's schema version {version!r} is not one ctssl knows; it was not written by "
                         f"ctssl (or is damaged). Use another --store.") from None
    if v > SCHEMA_VERSION:
        raise StoreError(f"this store was written by a newer ctssl (schema {v}; this ctssl knows up to "
                         f"{SCHEMA_VERSION}). Upgrade ctssl (pip install -U ctssl) to use it; it was left unchanged.")


def _rebuild_with_key(con, table: str, body: str, key: list[str]) -> None:
    """Copy ``table`` into a new table with its primary key, in one transaction (DuckDB cannot add a
    primary key to an existing table). Duplicate or empty keys make that impossible: refused, unchanged."""
    import duckdb

    from ctssl_core.db import StoreError

    k = ", ".join(key)
    dup = con.execute(f"SELECT count(*) FROM (SELECT {k} FROM {table} GROUP BY ALL HAVING count(*) > 1)").fetchone()[0]
    empty = con.execute(f"SELECT count(*) FROM {table} WHERE {' OR '.join(f'{c} IS NULL' for c in key)}").fetchone()[0]
    if dup or empty:
        raise StoreError(f"the store's {table} table was made before its primary key ({k}) and holds {dup} duplicate "
                         f"and {empty} empty keys, so it cannot be upgraded in place; it was left unchanged. "
                         f"Ingest into a new --store, or remove the duplicate {table} rows.")
    cols = ", ".join(name for name, _ in _columns(body))
    try:
        con.execute("BEGIN")
        own = True
    except duckdb.TransactionException:  # the caller's transaction covers it
        own = False
    try:
        con.execute(f"DROP TABLE IF EXISTS {table}__upgrade")
        con.execute(f"CREATE TABLE {table}__upgrade ({body})")
        con.execute(f"INSERT INTO {table}__upgrade ({cols}) SELECT {cols} FROM {table}")
        con.execute(f"DROP TABLE {table}")
        con.execute(f"ALTER TABLE {table}__upgrade RENAME TO {table}")
        if own:
            con.execute("COMMIT")
    except BaseException:
        if own:
            rollback_quietly(con)
        raise


def rollback_quietly(con) -> None:
    """ROLLBACK after an error inside a transaction, never raising itself.

    Why: a COMMIT that failed (disk full) has already ended the transaction, and DuckDB then
    refuses the ROLLBACK ("no transaction is active"); raised from an ``except`` block, that
    error replaced the real one in every message ("could not record the end (cannot rollback)")."""
    try:
        con.execute("ROLLBACK")
    except Exception:  # noqa: BLE001 - the transaction is gone either way; the caller raises the real error
        pass


def ensure_schema(con) -> None:
    """Create missing tables, add missing columns and missing primary keys (upgrading an older store);
    refuse a store from a newer ctssl. Stamps SCHEMA_VERSION only once everything is in place."""
    check_not_newer(stored_version(con))
    pks = {t: list(c) for t, c in con.execute(  # one query for every table's key
        "SELECT table_name, constraint_column_names FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY' "
        "AND schema_name = current_schema()").fetchall()}
    existing = {r[0] for r in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()").fetchall()}
    for table, body in TABLES.items():
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({body})")
        have = {r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]).fetchall()}
        for name, typ in _columns(body):
            if name not in have:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {typ}")
        key = _primary_key(body)
        if key and table in existing and pks.get(table, []) != key:  # made before its key existed
            _rebuild_with_key(con, table, body, key)
        if table == "runs" and "unit_hash" not in have and "runs" in existing:
            _backfill_pretrain_hashes(con)
    con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])


def _backfill_pretrain_hashes(con) -> None:
    """Give the pretrainings of a store made before ``runs.unit_hash`` their identity, computed from the
    resolved config each stored (``pretrain`` in its config JSON) exactly as ``pretrain.pretrain_hash`` does,
    so a benchmark keeps reusing them. Fine-tunes keep none: a benchmark finds those by run id."""
    import json

    from ctssl_core.config import config_hash

    rows = con.execute("SELECT run_id, config FROM runs WHERE kind = 'pretrain' AND unit_hash IS NULL").fetchall()
    for run_id, cfg in rows:
        try:
            section = json.loads(cfg or "{}").get("pretrain")
        except (ValueError, AttributeError):
            continue          # an unreadable config: the run is simply not reused
        if isinstance(section, dict):
            con.execute("UPDATE runs SET unit_hash = ? WHERE run_id = ?", [config_hash(section, 16), run_id])


def ensure_schema_current(con) -> None:
    """``ensure_schema`` only when needed: a store already at SCHEMA_VERSION costs one query
    instead of ~40 catalog statements (ingest batches, 20 Hz metric merges, 1 s heartbeats)."""
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except Exception:  # noqa: BLE001 - no meta table yet: a new store
        row = None
    if row is None or row[0] != str(SCHEMA_VERSION):
        ensure_schema(con)
