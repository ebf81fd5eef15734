"""Stage 1, scan: the header of every new file (or the reason it has none), read in chunks by the
worker pool; and, for very large folders, the split into batches of whole studies.

Why its own module: it is the only stage that opens every file, and the one whose memory grows
with the folder (a header per file), so batching lives beside it.
"""

from __future__ import annotations

import logging

from ctssl_core.data.dicom import REASONS, DicomIssue, SliceHeader, scan, scrub
from ctssl_core.data.ingest.schedule import _bar, _imap

SCAN_CHUNK = 64


def _scan_chunk(paths: list[str]) -> list[tuple[str, SliceHeader | None, tuple[str, str] | None]]:
    import warnings

    warnings.filterwarnings("ignore", module="pydicom")  # malformed files are recorded as errors, not warned about
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    out = []
    for p in paths:
        try:
            out.append((p, scan(p), None))
        except DicomIssue as e:
            out.append((p, None, (e.reason, e.detail)))
        except Exception as e:  # noqa: BLE001 - a parser crash on garbage must not stop ingest
            out.append((p, None, ("not_dicom", f"unreadable ({type(e).__name__}: {scrub(e)}). {REASONS['not_dicom']}")))
    return out


def _scan_batch(batch: list[str], ex, progress: bool, label: str, known: dict | None = None
                ) -> tuple[list[SliceHeader], list[tuple[str, str, str]]]:
    """Stage 1: headers of ``batch`` (in the pool when there is one), and (path, reason, detail) errors.

    ``known``: path -> (header, error) of files scanned already (``_scan_while``), in batch order.
    """
    known = known or {}
    bar = _bar(progress, len(batch), label)
    bar.update(sum(1 for p in batch if p in known))
    scanned = {p: (h, e) for res in _scan_all([p for p in batch if p not in known], ex, bar) for p, h, e in res}
    headers: list[SliceHeader] = []
    errors: list[tuple[str, str, str]] = []
    for p in batch:
        h, e = known[p] if p in known else scanned[p]
        if h is not None:
            headers.append(h)
        else:
            errors.append((p, e[0], e[1]))
    bar.close()
    return headers, errors


def _scan_while(files: list[str], busy, ex) -> dict[str, tuple]:
    """path -> (header, error) of the files scanned (by the pool) while ``busy()``.

    Why: with several workers ingest waits ~50 ms for the catalog read (DuckDB start-up) before
    it knows which files are new; on a fresh store all are, so that wait scans headers instead.
    Files the catalog then lists as done are dropped: at most one catalog read's worth of work.
    """
    chunks = [files[i:i + SCAN_CHUNK] for i in range(0, len(files), SCAN_CHUNK)]
    return {p: (h, e) for _, res in _imap(_scan_chunk, chunks, ex, until=busy) for p, h, e in res}


def _scan_all(files: list[str], ex, bar) -> list[list]:
    """``_scan_chunk`` results for every SCAN_CHUNK files, in file order.

    Holds every header: for one batch (at most the driver's BATCH_FILES files), as planning needs them all.
    """
    chunks = [files[i:i + SCAN_CHUNK] for i in range(0, len(files), SCAN_CHUNK)]
    out: list[list] = [[] for _ in chunks]
    for i, res in _imap(_scan_chunk, chunks, ex):
        out[i] = res
        bar.update(len(res))
    return out


def _study_batches(todo: list[str], ex, progress: bool, batch_files: int) -> list[list[str]]:
    """Split a very large ingest into batches of whole studies (about ``batch_files`` files each;
    the driver's BATCH_FILES).

    Why: planning needs a header per file in memory (~1.6 KB each; ~3 GB for RSNA-PE's 1.8M
    slices). A first cheap pass keeps only each file's (interned) StudyInstanceUID; every study
    lands whole in one batch, so series selection per study is unchanged. Costs one extra header
    scan per file (~0.3 ms). Unreadable files go in the first batch and are recorded there.
    """
    import sys

    chunks = [todo[i:i + SCAN_CHUNK] for i in range(0, len(todo), SCAN_CHUNK)]
    studies: list[list[str | None]] = [[] for _ in chunks]  # per chunk: each file's study (None: unreadable)
    bar = _bar(progress, len(todo), "group studies")
    for i, res in _imap(_scan_chunk, chunks, ex):  # headers dropped as they arrive (bounded memory)
        studies[i] = [sys.intern(h.study_uid) if h is not None else None for _, h, _ in res]
        bar.update(len(res))
    bar.close()
    by_study: dict[str, list[str]] = {}
    bad: list[str] = []
    for chunk, uids in zip(chunks, studies):  # in file order
        for p, uid in zip(chunk, uids):
            if uid is None:
                bad.append(p)
            else:
                by_study.setdefault(uid, []).append(p)
    batches: list[list[str]] = [bad]
    for files in by_study.values():
        if len(batches[-1]) + len(files) > batch_files and batches[-1]:
            batches.append([])
        batches[-1].extend(files)
    return [b for b in batches if b]
