"""Ingest's SQL: what the catalog already holds, and the short transactions that record finished
series and the files' errors.

Why its own module: it is the one module of the ingest package allowed to run SQL
(``tests/test_import_rules.py``, docs/ARCHITECTURE.md "Which module may run SQL"); the stages
hand it rows and never touch the database themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

from ctssl_core.config import ConfigError
from ctssl_core.data.catalog import insert_columns, insert_rows
from ctssl_core.data.dicom import RETRY_REASONS
from ctssl_core.data.ingest.build import BuiltSeries
from ctssl_core.data.ingest.config import IngestSummary
from ctssl_core.data.ingest.plan import SeriesPlan
from ctssl_core.data.ingest.schedule import _in_thread

SKIPPED_REASONS = frozenset({"series_not_selected", "series_exists", "duplicate_sop", "duplicate_image", "localizer"})


def _now():
    import datetime as dt

    return dt.datetime.now()


def _catalog_state(db) -> tuple[dict[str, tuple[int, float]], set[str], set[str], set[int], set[str], set[str]]:
    """What the store holds already: ingested files (path key -> (size, mtime)), series and study keys,
    the stored in-plane sizes of its series (one, or none for an empty store), its studies' datasets,
    and the path keys of files to retry (not done)."""
    from ctssl_core.db import connect
    from ctssl_core.schema import ensure_schema_current

    with connect(db) as con:
        ensure_schema_current(con)
        # 'retry' files (a transient error, a conflict to resolve) are not done: this run takes them again
        done = {r[0]: (r[1], r[2]) for r in con.execute(
            "SELECT path, size, mtime FROM ingested_files WHERE status IS DISTINCT FROM 'retry'").fetchall()}
        existing_series = {r[0] for r in con.execute("SELECT series_key FROM series").fetchall()}
        existing_studies = {r[0] for r in con.execute("SELECT study_key FROM studies").fetchall()}
        sizes = _sizes(con)
        datasets = {r[0] for r in con.execute("SELECT DISTINCT dataset FROM studies").fetchall() if r[0]}
        retry = {r[0] for r in con.execute("SELECT path FROM ingested_files WHERE status = 'retry'").fetchall()}
    return done, existing_series, existing_studies, sizes, datasets, retry


def _sizes(con) -> set[int]:
    return {int(v) for r in con.execute("SELECT DISTINCT height, width FROM series").fetchall() for v in r}


def store_size(store_root: str | Path) -> int | None:
    """The in-plane slice size of the store at ``store_root``; None when it holds no series yet."""
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    db = store_paths(store_root).db
    if not db.exists():
        return None
    with connect(db, read_only=True) as con:
        have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        sizes = _sizes(con) if "series" in have else set()
    return max(sizes) if sizes else None


def check_store_size(sizes: set[int], size: int, store_root: Path) -> None:
    """Refuse an ingest whose slice size differs from the store's.

    A store has one geometry: every series array is (S, size, size), and training stacks them,
    so a second size would make every later fine-tune fail long after this ingest "succeeded".
    """
    if sizes and sizes != {int(size)}:
        have = "/".join(map(str, sorted(sizes)))
        raise ConfigError(f"the store at {store_root} holds {have}-px slices but this ingest would write {size}-px "
                          f"slices; a store has one slice size. Pass --size {max(sizes)} to add to this store, "
                          f"or --store NEW_FOLDER for a store at {size} px")


def _forget_gone(db, keys: set[str]) -> None:
    """Drop the rows of 'retry' files that are no longer there (the user removed the wrong copy of a
    conflict): their errors no longer describe anything. A 'retry' row of another ingest root dropped
    here only means that root's file is taken as new next time, which it would be anyway."""
    from ctssl_core.db import connect

    if not keys:
        return
    ks = sorted(keys)
    with connect(db) as con:
        con.execute("BEGIN")
        for i in range(0, len(ks), 400):
            part = ks[i:i + 400]
            ph = ", ".join("?" * len(part))
            con.execute(f"DELETE FROM ingest_errors WHERE path IN ({ph})", part)
            con.execute(f"DELETE FROM ingested_files WHERE status = 'retry' AND path IN ({ph})", part)
        con.execute("COMMIT")


def _status(reason: str) -> str:
    """``ingested_files.status`` of a file recorded with ``reason``: skipped and error files are done,
    retry files are taken again by the next run."""
    return "skipped" if reason in SKIPPED_REASONS else "retry" if reason in RETRY_REASONS else "error"


def _record_errors(db, errors: list[tuple[str, str, str]], relp, stat, summary: IngestSummary) -> None:
    """Write error rows and mark the files done (status error/skipped) in one short transaction."""
    from ctssl_core.db import connect

    if not errors:
        return
    now = _now()
    err_rows, file_rows = [], {}
    for p, reason, detail in errors:
        rel = relp(p)
        err_rows.append((rel, reason, detail, now))
        size, mtime = stat.get(p, (0, 0.0))
        status = _status(reason)
        file_rows[rel] = (rel, size, mtime, status)
        summary.errors_by_reason[reason] = summary.errors_by_reason.get(reason, 0) + 1
        summary.errors += 1
    with connect(db) as con:
        con.execute("BEGIN")
        paths_ = [r[0] for r in file_rows.values()]
        for i in range(0, len(paths_), 400):
            part = paths_[i:i + 400]
            con.execute(f"DELETE FROM ingest_errors WHERE path IN ({', '.join('?' * len(part))})", part)
        insert_rows(con, "INSERT INTO ingest_errors VALUES", err_rows)
        f_path, f_size, f_mtime, f_status = zip(*file_rows.values())
        insert_columns(con, "INSERT OR REPLACE INTO ingested_files", [
            ("TEXT", f_path), ("BIGINT", f_size), ("DOUBLE", f_mtime), ("TEXT", f_status)])
        con.execute("COMMIT")


def _commit(db, built: list[BuiltSeries], plans: dict[str, SeriesPlan], key, summary: IngestSummary,
            rsna, relp, stat) -> None:  # rsna: adapters.rsna_pe.RsnaLabels or None
    """Catalog rows for finished series (arrays already renamed into place), one transaction."""
    from ctssl_core.db import connect

    now = _now()
    patients, studies, series, slices, files, errs = {}, {}, [], [], [], []
    pe_of, exam_of = {}, {}
    if rsna is not None:
        pe_of = rsna.pe_of([sop.split("#")[0] for b in built for sop in b.sop_uids])
        exam_of = rsna.exams_of(sorted({plans[b.series_uid].study_uid for b in built}))
    for b in built:
        p = plans[b.series_uid]
        h0 = p.headers[p.files[0]]
        for f, reason, detail in b.errors + p.deferred:
            errs.append((relp(f), reason, detail, now))
            size, mtime = stat.get(f, (0, 0.0))
            files.append((relp(f), size, mtime, _status(reason)))
            summary.errors_by_reason[reason] = summary.errors_by_reason.get(reason, 0) + 1
            summary.errors += 1
        if not b.sop_uids:
            continue
        pk, stk, sk = key("patient", p.patient_id), key("study", p.study_uid), key("series", p.series_uid)
        patients.setdefault(pk, (pk, h0.age, h0.sex, h0.race, json.dumps({})))
        pe_exam, exam = None, None
        if p.study_uid in exam_of:
            exam = exam_of[p.study_uid]
            neg = exam.get("negative_exam_for_pe")
            pe_exam = None if neg is None else (not bool(neg))
        studies.setdefault(stk, (stk, pk, summary.dataset, pe_exam, json.dumps(exam) if exam else None))
        series.append(dict(
            series_key=sk, study_key=stk, patient_key=pk, array_path=b.array_rel, mask_path=b.mask_rel,
            n_slices=len(b.sop_uids), height=b.height, width=b.width, orig_rows=b.orig_rows, orig_cols=b.orig_cols,
            pixel_spacing_mm=b.pixel_spacing, slice_spacing_mm=p.slice_spacing, slice_thickness_mm=p.thickness,
            site=None, manufacturer=h0.manufacturer, model=h0.model, kernel=h0.kernel,
            selection_rule=p.selection_rule, ingested_at=now, notes=_series_notes(p)))
        for i, (sop, z) in enumerate(zip(b.sop_uids, b.z)):
            pe = pe_of.get(sop.split("#")[0])
            slices.append((sk, i, key("sop", sop), z, pe, b.nodule_px[i] if b.nodule_px is not None else None))
        for f in b.files_ok:
            size, mtime = stat.get(f, (0, 0.0))
            files.append((relp(f), size, mtime, "ok"))
    with connect(db) as con:
        con.execute("BEGIN")
        start = con.execute("SELECT coalesce(max(slice_id) + 1, 0) FROM slices").fetchone()[0]
        have_p = _existing(con, "patients", "patient_key", list(patients))
        insert_rows(con, "INSERT INTO patients VALUES", [v for k, v in patients.items() if k not in have_p])
        have_s = _existing(con, "studies", "study_key", list(studies))
        insert_rows(con, "INSERT INTO studies VALUES", [v for k, v in studies.items() if k not in have_s])
        cols = list(series[0]) if series else []
        insert_rows(con, f"INSERT INTO series ({', '.join(cols)}) VALUES", [tuple(r[c] for c in cols) for r in series])
        if slices:
            sk_, idx_, sop_, z_, pe_, nod_ = zip(*slices)
            insert_columns(con, "INSERT INTO slices", [
                ("BIGINT", range(start, start + len(slices))), ("TEXT", sk_), ("INTEGER", idx_), ("TEXT", sop_),
                ("DOUBLE", z_), ("BOOLEAN", pe_), ("INTEGER", nod_)])
        ok_paths = [r[0] for r in files if r[3] == "ok"]
        for i in range(0, len(ok_paths), 400):  # errors of an earlier run (a transient one) no longer hold
            part = ok_paths[i:i + 400]
            con.execute(f"DELETE FROM ingest_errors WHERE path IN ({', '.join('?' * len(part))})", part)
        insert_rows(con, "INSERT INTO ingest_errors VALUES", errs)
        if files:
            f_path, f_size, f_mtime, f_status = zip(*files)
            insert_columns(con, "INSERT OR REPLACE INTO ingested_files", [
                ("TEXT", f_path), ("BIGINT", f_size), ("DOUBLE", f_mtime), ("TEXT", f_status)])
        con.execute("COMMIT")
    summary.series += len(series)
    summary.slices += len(slices)
    summary.files_ok += sum(len(b.files_ok) for b in built)
    summary.labelled_slices += sum(1 for s in slices if s[4] is not None)
    summary.nodule_series += sum(1 for b in built if b.mask_rel and b.sop_uids)


def _series_notes(p: SeriesPlan) -> str | None:
    """The assumptions made reading this series' headers (JSON list of distinct sentences), or None.

    Why stored: a value ingest had to assume (a zero RescaleSlope taken as 1, absolute PixelSpacing)
    must stay visible beside the data it shaped, not only in a log nobody kept."""
    notes = sorted({n for h in p.headers.values() for n in h.notes})
    return json.dumps(notes) if notes else None


def _existing(con, table: str, col: str, keys: list[str]) -> set[str]:
    if not keys:
        return set()
    q = f"SELECT {col} FROM {table} WHERE {col} IN ({', '.join('?' * len(keys))})"
    return {r[0] for r in con.execute(q, keys).fetchall()}


class _WarmCatalog:
    """Start DuckDB on the catalog in a thread ahead of the last commit, and keep it open until then.

    Why: opening the catalog costs ~30-50 ms of DuckDB start-up, and the last commit can only
    begin when the last series is built, so that start-up was pure waiting at the end of every
    ingest. While this connection is open, ``connect`` in this process reuses the running
    database (~0.4 ms); closing it afterwards writes the checkpoint as closing the commit's own
    connection would have. The store's lock is held from when the last series is handed out
    (the pool's last few series builds before the commit) instead of from the commit's start.
    """

    def __init__(self, db):
        self.db = db
        self._opened = None

    def start(self) -> None:
        from ctssl_core.db import connect

        def open_():
            cm = connect(self.db)
            cm.__enter__()
            return cm

        self._opened = _in_thread(open_)

    def close(self) -> None:
        if self._opened is None:
            return
        try:
            cm = self._opened()
        except Exception:  # noqa: BLE001 - the commit opens its own connection (and reports its errors)
            return
        finally:
            self._opened = None
        cm.__exit__(None, None, None)
