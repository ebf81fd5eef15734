"""The catalog's SQL that code outside ingest needs, in one place (tables ``patients``, ``studies``,
``series``, ``slices``, ``splits``, ``ingest_errors``).

Why a module of its own: the rule in docs/ARCHITECTURE.md is that only the store modules run SQL,
and the catalog's store modules are this one, ``data/ingest/catalog_write.py`` (ingest's own writes),
``data/store.py`` (the training read side) and ``data/splits.py``. Training, embedding, bias and command code call the
named functions here instead of opening DuckDB. Every function opens one short connection.
The bulk-insert helpers live here too, so the demographics adapter and the split writer need not
import ``ingest`` (which imports them: that was an import cycle).
"""

from __future__ import annotations

import json
from pathlib import Path

from ctssl_core.db import connect
from ctssl_core.paths import store_paths


def insert_rows(con, sql: str, rows: list[tuple], batch: int = 400) -> None:
    """``sql`` like "INSERT INTO t VALUES"; rows go in multi-row VALUES statements.

    DuckDB's ``executemany`` runs one statement per row (~25 ms each with a primary key),
    which would make the catalog the ingest bottleneck.
    """
    if not rows:
        return
    n = len(rows[0])
    ph = "(" + ", ".join("?" * n) + ")"
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        con.execute(f"{sql} {', '.join([ph] * len(part))}", [v for r in part for v in r])


def insert_columns(con, sql: str, columns: list[tuple[str, list]]) -> None:
    """``sql`` like "INSERT INTO t"; one LIST parameter per column, unnested server-side.

    For per-slice rows this is ~8x cheaper than multi-row VALUES, whose SQL text (thousands of
    placeholders) DuckDB must parse on every call.
    """
    if not columns or not columns[0][1]:
        return
    sel = ", ".join(f"unnest(${i + 1}::{typ}[])" for i, (typ, _) in enumerate(columns))
    con.execute(f"{sql} SELECT {sel}", [list(vals) for _, vals in columns])


def _tables(con) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}


def has_slices(store_root: str | Path) -> bool:
    """Whether the store exists and its catalog holds at least one slice."""
    sp = store_paths(store_root)
    if not sp.db.exists():
        return False
    with connect(sp.db, read_only=True) as con:
        return "slices" in _tables(con) and con.execute("SELECT count(*) FROM slices").fetchone()[0] > 0


def series_heights(store_root: str | Path) -> set[int]:
    """The stored in-plane heights of the store's series (square after ingest, so the sizes)."""
    with connect(store_paths(store_root).db, read_only=True) as con:
        return {int(r[0]) for r in con.execute("SELECT DISTINCT height FROM series").fetchall()}


def store_dataset(store_root: str | Path) -> str | None:
    """The datasets of the store's studies ('synthetic', 'rsna-pe', 'lidc', 'generic'), comma-joined in
    order, or None for an empty store: the label a run or benchmark records of what it was trained on."""
    with connect(store_paths(store_root).db, read_only=True) as con:
        if "studies" not in _tables(con):
            return None
        found = [r[0] for r in con.execute("SELECT DISTINCT dataset FROM studies WHERE dataset IS NOT NULL "
                                           "ORDER BY dataset").fetchall()]
    return ",".join(found) or None


def patients_table(store_root: str | Path):
    """DataFrame: patient_key, age, sex, race, attributes (JSON text), ordered by patient_key."""
    with connect(store_paths(store_root).db, read_only=True) as con:
        return con.execute("SELECT patient_key, age, sex, race, CAST(attributes AS VARCHAR) AS attributes "
                           "FROM patients ORDER BY patient_key").df()


def split_size(store_root: str | Path, scheme: int) -> int:
    """How many patients the split scheme ``scheme`` (``splits.split_scheme``) assigns."""
    with connect(store_paths(store_root).db, read_only=True) as con:
        return con.execute("SELECT count(*) FROM splits WHERE seed = ?", [scheme]).fetchone()[0]


def slice_rows(store_root: str | Path, scheme: int):
    """Every slice with its series, patient demographics, labels and split under ``scheme``, by slice_id.

    Columns: slice_id, series_key, patient_key, idx, age, sex, race, attributes (JSON text),
    series_site, pe, pe_exam, split.
    """
    with connect(store_paths(store_root).db, read_only=True) as con:
        return con.execute(
            """
            SELECT s.slice_id, s.series_key, se.patient_key, s.idx, p.age, p.sex, p.race,
                   CAST(p.attributes AS VARCHAR) AS attributes, se.site AS series_site,
                   CAST(s.pe AS DOUBLE) AS pe, CAST(st.pe_exam AS DOUBLE) AS pe_exam, sp.split
            FROM slices s
            JOIN series se USING (series_key)
            LEFT JOIN patients p ON p.patient_key = se.patient_key
            LEFT JOIN studies st ON st.study_key = se.study_key
            LEFT JOIN (SELECT patient_key, split FROM splits WHERE seed = ?) sp ON sp.patient_key = se.patient_key
            ORDER BY s.slice_id
            """, [scheme]).df()


def ingest_error_reasons(store_root: str | Path) -> dict[str, tuple[str, str]]:
    """path key -> (reason, detail) of every file recorded in ``ingest_errors``."""
    with connect(store_paths(store_root).db, read_only=True) as con:
        return {r[0]: (r[1], r[2] or "") for r in con.execute("SELECT path, reason, detail FROM ingest_errors").fetchall()}


def demographic_state(db: str | Path) -> tuple[dict[str, tuple], dict[str, str]]:
    """(patient_key -> (age, sex, race, attributes), study_key -> patient_key) of the catalog at ``db``."""
    with connect(db) as con:
        patients = {r[0]: (r[1], r[2], r[3], r[4]) for r in
                    con.execute("SELECT patient_key, age, sex, race, attributes FROM patients").fetchall()}
        study_patient = dict(con.execute("SELECT study_key, patient_key FROM studies").fetchall())
    return patients, study_patient


def update_demographics(db: str | Path, updates: dict[str, list], site_rows: list[tuple]) -> None:
    """Set age/sex/race/attributes of each patient in ``updates`` and ``series.site`` from ``site_rows``
    ((study_key or None, patient_key, site)), in one transaction."""
    with connect(db) as con:
        con.execute("BEGIN")
        if updates:
            con.execute("CREATE TEMP TABLE _demo (patient_key TEXT, age DOUBLE, sex TEXT, race TEXT, attributes JSON)")
            insert_rows(con, "INSERT INTO _demo VALUES",
                        [(pk, a, s, r, json.dumps(at)) for pk, (a, s, r, at) in updates.items()])
            con.execute("UPDATE patients SET age = d.age, sex = d.sex, race = d.race, attributes = d.attributes "
                        "FROM _demo d WHERE patients.patient_key = d.patient_key")
            con.execute("DROP TABLE _demo")
        for sk, pk, site in site_rows:
            if sk is not None:
                con.execute("UPDATE series SET site = ? WHERE study_key = ?", [site, sk])
            else:
                con.execute("UPDATE series SET site = ? WHERE patient_key = ?", [site, pk])
        con.execute("COMMIT")
