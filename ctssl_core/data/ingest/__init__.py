"""Ingest a folder of CT DICOM into the slice store (int16 HU arrays) and the DuckDB catalog.

Three stages, so that every core stays busy and every file's header is parsed once:

1. scan   (workers, file chunks): header of every new file, or a recorded error. One read of
          the file's first 16 KB, walked in memory (``dicom.scan``).
2. plan   (main process, pure): group by series, drop localisers/duplicates/odd shapes,
          order by position along the slice normal, choose one series per study.
3. build  (workers, one series each): pixels (one read at the known offset) -> HU -> in-plane
          resample to ``size`` -> ``slices/<series>.npy`` (tmp name, then rename); LIDC masks
          too. Power-of-two ratios (512 -> 256) are exact integer block means in numpy,
          slice by slice; anything else goes through torch. The main process then writes
          the series' catalog rows in one short transaction.

"Workers" are ``workers`` forked processes, one standard pool that every stage maps over in
item order (``schedule._imap``); ``workers=1`` does everything in this process. DuckDB start-up
(~50 ms a connection) overlaps walking the folder and, for the last commit, the last series' builds.

Idempotent and resumable: ``ingested_files`` remembers (path, size, mtime) per file
and is written in the same transaction as the series it belongs to, so an interrupted
run redoes only the unfinished series. Identifiers (PatientID, UIDs) exist only in
this process's memory; the catalog gets keyed pseudonyms (``pseudonym.py``).

The package, by stage (each module says why it exists): ``config`` (IngestConfig, IngestSummary),
``discover`` (files, sidecars, what is new), ``headers`` (stage 1), ``plan`` (stage 2), ``build``
(stage 3, per series) with ``resample`` (pixels -> HU at the stored size) and ``arrays`` (safe
writes), ``schedule`` (the pool and the shared map), ``catalog_write`` (all of ingest's SQL).
This module is the driver, ``ingest()``, and the public names.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from ctssl_core.config import ConfigError
from ctssl_core.data.dicom import REASONS, scrub
from ctssl_core.data.ingest.arrays import stale_temp_files
from ctssl_core.data.ingest.build import BuiltSeries, TransientBuildError, _build_job, build_series
from ctssl_core.data.ingest.catalog_write import (
    _catalog_state,
    _commit,
    _forget_gone,
    _record_errors,
    _WarmCatalog,
    check_store_size,
    store_size,
)
from ctssl_core.data.ingest.config import IngestConfig, IngestSummary
from ctssl_core.data.ingest.discover import (
    _new_files,
    _stat_files,
    check_key_fits_data,
    detect_sidecars,
    find_files,
    is_synthetic_cohort,
    path_key,
)
from ctssl_core.data.ingest.headers import _scan_batch, _scan_while, _study_batches
from ctssl_core.data.ingest.plan import SeriesPlan, hold_back_beside_transient, plan_series
from ctssl_core.data.ingest.resample import (
    box_factors,
    box_sum,
    fit_square,
    hu_box,
    pad_square,
    resize_square_pixels,
    square_geometry,
)
from ctssl_core.data.ingest.schedule import _bar, _executor, _imap, _in_thread

# Tuning constants live in the module that reads them, and are not re-exported here: patching
# ``ctssl_core.data.ingest.SCAN_CHUNK`` would silently change nothing, so it fails instead
# (AttributeError). The three below are read by this module.
BATCH_FILES = 50_000  # larger ingests run in batches of whole studies (bounded memory), see _study_batches
COMMIT_SLICES = 4000  # catalog rows are written when this many slices are pending ...
COMMIT_SECONDS = 2.0  # ... or this long after the last commit (short transactions, bounded loss on interrupt)

__all__ = [
    "REASONS", "BuiltSeries", "IngestConfig", "IngestSummary", "SeriesPlan", "TransientBuildError",
    "box_factors", "box_sum", "build_series", "check_key_fits_data", "check_store_size", "detect_sidecars",
    "find_files", "fit_square", "hold_back_beside_transient", "hu_box", "ingest", "is_synthetic_cohort",
    "pad_square", "path_key", "plan_series", "resize_square_pixels", "square_geometry", "stale_temp_files",
    "store_size",
]


def ingest(root: str | Path, store_root: str | Path, cfg: IngestConfig | None = None,
           progress: bool = True) -> IngestSummary:
    """Ingest every DICOM file under ``root`` into the store at ``store_root``. See module docstring."""
    cfg = cfg or IngestConfig()
    root = Path(root).resolve()
    if not root.is_dir():
        raise ConfigError(f"ingest: {root} is not a folder; pass the folder that holds your DICOM files")
    check_key_fits_data(root, store_root)
    t0 = time.perf_counter()
    with _executor(cfg.workers) as ex:
        if ex is not None:
            # Fork now: no thread is running yet, and every page this process writes later while the
            # worker lives costs a copy-on-write fault; pages allocated after the fork cost none.
            ex.submit(int)
        try:
            summary = _ingest(root, store_root, cfg, progress, ex, t0)
        except Exception as e:
            from ctssl_core.db import StoreError, StoreFull, is_disk_full

            if isinstance(e, StoreError) or not is_disk_full(e):
                raise
            raise StoreFull(
                f"the disk holding the store {Path(store_root).resolve()} is full ({scrub(e, 160)}). Nothing "
                f"stored before is lost, and the files this run could not store are not marked done. Free space "
                f"on that disk (or ingest into a store on a larger one), then run the same `ctssl ingest` again: "
                f"files already in the store are skipped, the rest are retried.") from e
    summary.seconds = time.perf_counter() - t0  # the workers' exit included
    summary.slices_per_s = summary.slices / summary.seconds if summary.seconds > 0 else 0.0
    return summary


def _ingest(root: Path, store_root, cfg: IngestConfig, progress: bool, ex, t0: float) -> IngestSummary:
    """``ingest`` with the worker pool (or None) already running."""
    from ctssl_core.data.pseudonym import Pseudonymiser
    from ctssl_core.paths import store_paths

    paths = store_paths(store_root)
    summary = IngestSummary()
    # Reading the catalog costs ~50 ms of DuckDB start-up (GIL released); with several workers it
    # overlaps walking the folder. A new store is only created below, once the arguments are checked.
    catalog = _in_thread(_catalog_state, paths.db) if cfg.workers > 1 and paths.db.exists() else None
    try:
        xmls: list[str] = []
        files = find_files(root, xmls)
        side = detect_sidecars(root, cfg, xmls)
        stat, odd = _stat_files(files)
        readable = [f for f in stat if f not in odd]
        known = _scan_while(readable, catalog.running, ex) if catalog and len(stat) <= BATCH_FILES else {}
    except BaseException:
        if catalog is not None:
            with contextlib.suppress(Exception):
                catalog()  # joined before the error propagates: no DuckDB work left running behind it
        raise
    done, existing_series, existing_studies, sizes, datasets, retry = (catalog() if catalog is not None
                                                                       else _catalog_state(paths.db))
    check_store_size(sizes, cfg.size, paths.root)  # before the first write to slices/ or the catalog
    key = Pseudonymiser.for_store(paths.secret)
    paths.slices.mkdir(parents=True, exist_ok=True)
    for stale in stale_temp_files([paths.slices, paths.masks]):
        stale.unlink(missing_ok=True)  # left by an interrupted run; its series is rebuilt below
    summary.sidecars = [k for k in side]
    summary.dataset = ("synthetic" if is_synthetic_cohort(root) else "rsna-pe" if "rsna_csv" in side
                       else "lidc" if "lidc_xml" in side else "generic")
    if cfg.format not in ("auto",):
        summary.dataset = cfg.format

    summary.files_found = len(files)
    prefix = len(str(root)) + 1
    todo = _new_files(stat, done, lambda f: path_key(key, f[prefix:]))
    summary.files_already_done = len(stat) - len(todo)
    summary.files_new = len(todo)

    def relp(p: str) -> str:  # what the catalog stores for a file: a keyed hash of its relative path
        return path_key(key, p[prefix:])

    if retry:
        _forget_gone(paths.db, retry - {relp(f) for f in stat})

    if odd:  # broken links, pipes, devices: recorded once, never opened (a pipe would block the scan)
        new = set(todo)
        _record_errors(paths.db, [e for f, e in odd.items() if f in new], relp, stat, summary)
        todo = [f for f in todo if f not in odd]

    rsna = None
    if "rsna_csv" in side and todo:
        from ctssl_core.data.adapters.rsna_pe import load_labels

        rsna = load_labels(side["rsna_csv"])  # validates the header now; loads the table on first lookup
    batches = _study_batches(todo, ex, progress, BATCH_FILES) if len(todo) > BATCH_FILES else [todo]
    for n_batch, batch in enumerate(batches):
        t_batch = time.perf_counter()
        # ---- stage 1
        label = "scan headers" + (f" ({n_batch + 1}/{len(batches)})" if len(batches) > 1 else "")
        headers, errors = _scan_batch(batch, ex, progress, label, known)
        t2 = time.perf_counter()
        _add_stage(summary, "scan", (t2 - t0 if n_batch == 0 else t2 - t_batch))  # first batch: store setup too

        # ---- stage 2
        plans, plan_errors = plan_series(headers, existing_series, existing_studies, key)
        del headers
        errors += plan_errors
        plans, held = hold_back_beside_transient(plans, errors)
        errors += held
        _record_errors(paths.db, errors, relp, stat, summary)
        lidc = None
        if "lidc_xml" in side and plans:
            from ctssl_core.data.adapters.lidc import parse_reads

            lidc = parse_reads(side["lidc_xml"], {p.series_uid for p in plans})
        t3 = time.perf_counter()
        _add_stage(summary, "plan", t3 - t2)

        # ---- stage 3
        _build_and_commit(plans, lidc, rsna, paths, cfg, key, summary, relp, stat, progress, ex)
        existing_series |= {key("series", p.series_uid) for p in plans}
        existing_studies |= {key("study", p.study_uid) for p in plans}
        _add_stage(summary, "build", time.perf_counter() - t3)
    if rsna is not None:
        rsna.close()

    mixed = datasets | ({summary.dataset} if summary.series else set())
    if "synthetic" in mixed and len(mixed) > 1:
        summary.mixed_datasets = sorted(mixed)

    if "demographics" in side:
        from ctssl_core.data.adapters.demographics import apply_demographics

        apply_demographics(paths.db, side["demographics"], key, summary)

    return summary


def _add_stage(summary: IngestSummary, name: str, seconds: float) -> None:
    summary.stage_seconds[name] = summary.stage_seconds.get(name, 0.0) + seconds


def _build_and_commit(plans, lidc, rsna, paths, cfg, key, summary, relp, stat, progress, ex) -> None:
    """Stage 3: build each planned series in the workers; commit finished series in short transactions."""
    jobs = [(p, str(paths.root), key("series", p.series_uid), cfg.size,
             (lidc.get(p.series_uid) if lidc is not None else None), cfg.agreement) for p in plans]
    plan_by_uid = {p.series_uid: p for p in plans}
    bar = _bar(progress, sum(len(p.units) for p in plans), "decode series")
    pending: list[BuiltSeries] = []
    last_commit = time.perf_counter()
    warm = _WarmCatalog(paths.db)
    try:
        # once the last series is handed out (``drained``), DuckDB starts up in a thread while it builds
        for _, built in _imap(_build_job, jobs, ex, drained=warm.start if ex is not None else None):
            if isinstance(built, tuple):
                uid, msg, transient = built
                p = plan_by_uid[uid]
                if transient:  # the skipped copies too: the file they deferred to was not stored
                    rows = [(f, "transient", f"series build failed ({msg[:160]}). " + REASONS["transient"])
                            for f in p.files + [d[0] for d in p.deferred]]
                else:
                    rows = [(f, "decode_failed", f"series build failed ({msg[:160]}); re-export the series.")
                            for f in p.files] + p.deferred
                _record_errors(paths.db, rows, relp, stat, summary)
                bar.update(len(p.units))
                continue
            pending.append(built)
            bar.update(len(plan_by_uid[built.series_uid].units))
            if (sum(len(b.sop_uids) for b in pending) >= COMMIT_SLICES
                    or time.perf_counter() - last_commit > COMMIT_SECONDS):
                _commit(paths.db, pending, plan_by_uid, key, summary, rsna, relp, stat)
                pending, last_commit = [], time.perf_counter()
        if pending:
            _commit(paths.db, pending, plan_by_uid, key, summary, rsna, relp, stat)
    finally:
        warm.close()
    bar.close()
