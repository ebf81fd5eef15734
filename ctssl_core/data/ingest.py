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

"Workers" are this process plus ``workers - 1`` forked ones, all stages sharing one pool
(``_shared``): the main process would otherwise only wait. DuckDB start-up (~50 ms a
connection) overlaps walking the folder and, for the last commit, the last series' build.

Idempotent and resumable: ``ingested_files`` remembers (path, size, mtime) per file
and is written in the same transaction as the series it belongs to, so an interrupted
run redoes only the unfinished series. Identifiers (PatientID, UIDs) exist only in
this process's memory; the catalog gets keyed pseudonyms (``pseudonym.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from ctssl_core.config import ConfigError
from ctssl_core.data.catalog import insert_columns, insert_rows
from ctssl_core.data.dicom import (
    HU_MAX,
    HU_MIN,
    REASONS,
    RETRY_REASONS,
    DicomIssue,
    SliceHeader,
    canonical_axes,
    canonical_geometry,
    in_plane_ok,
    is_axial,
    is_transient,
    padding_to_air,
    read_hu,
    read_stored,
    scan,
    scrub,
    to_canonical,
)

SIDECAR_SUFFIXES = {".csv", ".xml", ".json", ".md", ".yaml", ".yml", ".npz", ".npy"}
SCAN_CHUNK = 64
BATCH_FILES = 50_000  # larger ingests run in batches of whole studies (bounded memory), see _study_batches
SLICE_CHUNK = 32  # slices decoded and resampled at once inside a series (bounds memory)
COMMIT_SLICES = 4000  # catalog rows are written when this many slices are pending ...
COMMIT_SECONDS = 2.0  # ... or this long after the last commit (short transactions, bounded loss on interrupt)
HANDOFF_SWITCH_S = 0.0005  # GIL switch interval while the main process works beside the pool (see _shared)
Z_TOL_MM = 0.01  # two slices of one series closer than this along the normal are at the same position
GEOMETRY_TOL = 1e-3  # PixelSpacing (mm) and direction cosines that differ less are the same geometry
SKIPPED_REASONS = frozenset({"series_not_selected", "series_exists", "duplicate_sop", "duplicate_image", "localizer"})


@dataclass
class IngestConfig:
    size: int = 256                      # stored in-plane size (H = W)
    workers: int = 2                     # decode processes; 1 = in this process
    format: Literal["auto", "generic", "rsna-pe", "lidc"] = "auto"
    agreement: float = 0.5               # LIDC consensus: fraction of readers that must agree
    demographics: str | None = None      # CSV keyed by PatientID or StudyInstanceUID; None = auto-detect in root

    def __post_init__(self):
        if not 16 <= int(self.size) <= 2048:
            raise ConfigError(f"ingest size={self.size}: choose an in-plane size between 16 and 2048 (default 256)")
        if int(self.workers) < 1:
            raise ConfigError(f"ingest workers={self.workers}: use 1 or more worker processes")
        if not 0.0 < float(self.agreement) <= 1.0:
            raise ConfigError(f"ingest agreement={self.agreement}: use a fraction in (0, 1], e.g. 0.5")
        if self.format not in ("auto", "generic", "rsna-pe", "lidc"):
            raise ConfigError(f"ingest format={self.format!r}: choose auto, generic, rsna-pe or lidc")


@dataclass
class IngestSummary:
    files_found: int = 0
    files_new: int = 0
    files_already_done: int = 0
    files_ok: int = 0
    series: int = 0
    slices: int = 0
    errors: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    slices_per_s: float = 0.0
    dataset: str = "generic"
    sidecars: list[str] = field(default_factory=list)
    labelled_slices: int = 0              # slices that got a pe label from train.csv
    nodule_series: int = 0                # series that got LIDC masks
    demographics_rows: int = 0
    demographics_unmatched_lines: list[int] = field(default_factory=list)  # CSV line numbers, never keys
    patients_without_demographics: int = 0
    demographics_dropped_columns: list[str] = field(default_factory=list)  # identifier-like, not stored
    mixed_datasets: list[str] = field(default_factory=list)  # set when the store now holds synthetic and real studies
    stage_seconds: dict[str, float] = field(default_factory=dict)  # scan / plan / build (incl. catalog)

    def table(self) -> str:
        lines = [
            f"files: {self.files_found} found, {self.files_new} new, {self.files_already_done} already ingested",
            f"ingested: {self.series} series, {self.slices} slices in {self.seconds:.1f} s "
            f"({self.slices_per_s:.0f} slices/s); dataset={self.dataset}",
        ]
        if self.stage_seconds:
            lines.append("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items()))
        if self.sidecars:
            lines.append(f"sidecars: {', '.join(self.sidecars)}")
        if self.labelled_slices:
            lines.append(f"pe labels on {self.labelled_slices} slices")
        if self.nodule_series:
            lines.append(f"nodule masks for {self.nodule_series} series")
        if self.demographics_rows:
            lines.append(f"demographics: {self.demographics_rows} rows; "
                         f"{len(self.demographics_unmatched_lines)} matched no ingested patient"
                         + (f" (CSV lines {', '.join(map(str, self.demographics_unmatched_lines[:10]))}"
                            f"{' ...' if len(self.demographics_unmatched_lines) > 10 else ''})"
                            if self.demographics_unmatched_lines else "")
                         + f"; {self.patients_without_demographics} patients had no row")
        if self.demographics_dropped_columns:
            lines.append("demographics: identifier-like columns not stored: "
                         + ", ".join(self.demographics_dropped_columns)
                         + " (rename a column that really is an attribute)")
        if self.mixed_datasets:
            lines.append(f"NOTE: this store mixes synthetic and real studies ({', '.join(self.mixed_datasets)}); "
                         f"results from it do not describe real patients alone. Keep real data in its own store.")
        if self.errors_by_reason:
            lines.append(f"{'reason':<22} {'files':>7}  what to do")
            for reason, n in sorted(self.errors_by_reason.items(), key=lambda kv: -kv[1]):
                lines.append(f"{reason:<22} {n:>7}  {REASONS.get(reason, '')}")
        return "\n".join(lines)


# ---------------------------------------------------------------- stage 1: scan

def find_files(root: Path, xml_out: list | None = None) -> list[Path]:
    """Every candidate file under ``root`` (any name, with or without .dcm), sidecars and hidden files excluded.

    XML files met on the way (LIDC reads may sit beside each case's DICOM) are appended to
    ``xml_out`` so the tree is walked once.
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if xml_out is not None and os.path.basename(dirpath) == "lidc_xml":
            xml_out.extend(os.path.join(dirpath, n) for n in sorted(filenames) if n.lower().endswith(".xml"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            ext = os.path.splitext(name)[1].lower()
            if name.startswith(".") or ext in SIDECAR_SUFFIXES:
                if ext == ".xml" and xml_out is not None and os.path.basename(dirpath) != "lidc_xml":
                    xml_out.append(os.path.join(dirpath, name))
                continue
            if "lidc_xml" in os.path.relpath(dirpath, root).split(os.sep):
                continue
            out.append(os.path.join(dirpath, name))
    return [Path(p) for p in out] if len(out) < 10_000 else out  # strings for big trees (pathlib is slow)


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


# ---------------------------------------------------------------- stage 2: plan

@dataclass
class SeriesPlan:
    series_uid: str
    study_uid: str
    patient_id: str
    units: list[tuple[str, int]]          # (path, frame) in slice order (z ascending)
    z: list[float | None]
    headers: dict[str, SliceHeader]       # path -> header
    slice_spacing: float | None
    thickness: float | None
    selection_rule: str = ""
    files: list[str] = field(default_factory=list)
    # skipped copies of this series' files (duplicate_sop / duplicate_image): recorded with the series'
    # outcome, so that a copy is never marked done while the file it deferred to was not stored
    deferred: list[tuple[str, str, str]] = field(default_factory=list)


def plan_series(headers: list[SliceHeader], existing_series: set[str] = frozenset(),
                existing_studies: set[str] = frozenset(), key=lambda kind, v: v, read=read_hu,
                ) -> tuple[list[SeriesPlan], list[tuple[str, str, str]]]:
    """Group, validate and order. Returns (plans, errors as (path, reason, detail)).

    ``existing_*`` are pseudonymised keys already in the store; ``key`` maps (kind, uid) to them.
    ``read(header)`` gives a file's HU (F, H, W): pixels are read here only for files that clash
    (copies of one SOPInstanceUID, two images at one position), to tell true copies from conflicts.
    """
    errors: list[tuple[str, str, str]] = []

    def err(path, reason, detail=""):
        errors.append((path, reason, (detail + " " if detail else "") + REASONS[reason]))

    contents = _Contents(read)
    headers, dup_errors, dups_of, conflicted = _dedupe_sops(headers, contents)
    errors.extend(dup_errors)

    def follow(paths, reason=None, detail=""):
        """The skipped copies of ``paths`` share their fate: ``reason`` when given, else their own row."""
        out = [d for f in paths for d in dups_of.pop(f, [])]
        if reason is None:
            return out
        for d in out:
            err(d[0], reason, detail)
        return []

    by_series: dict[str, list[SliceHeader]] = defaultdict(list)
    for h in headers:
        by_series[h.series_uid].append(h)
    for uid, (detail, copies) in conflicted.items():
        by_series.setdefault(uid, [])
    plans: list[SeriesPlan] = []
    in_conflict: set[str] = set()
    for series_uid, hs in by_series.items():
        hs.sort(key=lambda h: h.path)
        if key("series", series_uid) in existing_series:
            for h in hs:
                err(h.path, "series_exists")
            continue
        if series_uid in conflicted:
            detail, copies = conflicted[series_uid]
            paths = {h.path for h in hs}
            for f in sorted((paths | copies | {d[0] for d in follow(paths)}) - in_conflict):  # a copy may touch two series
                err(f, "sop_conflict", detail)
                in_conflict.add(f)
            continue
        plan, serr, rejected = _plan_one(series_uid, hs, contents)
        if rejected is not None:
            reason, detail, files = rejected
            for f in files:
                err(f, reason, detail)
            follow(files, reason, detail)
        if plan is not None:
            plan.deferred = [e for e in serr if e[1] == "duplicate_image"] + follow(plan.files)
            serr = [e for e in serr if e[1] != "duplicate_image"]
            plans.append(plan)
        errors.extend(serr)  # details already carry their advice

    # one series per study: axial (already), thinnest, then most slices
    by_study: dict[str, list[SeriesPlan]] = defaultdict(list)
    for p in plans:
        by_study[p.study_uid].append(p)
    chosen = []
    for study_uid, ps in by_study.items():
        if key("study", study_uid) in existing_studies:
            for p in ps:
                for f in p.files + [d[0] for d in p.deferred]:
                    err(f, "series_not_selected", "its study already has a series in the store.")
            continue
        ps.sort(key=lambda p: (p.thickness if p.thickness else 1e9, -len(p.units), p.series_uid))
        best = ps[0]
        if len(ps) == 1:
            best.selection_rule = "only series of its study"
        else:
            best.selection_rule = (f"chosen from {len(ps)} axial series: thinnest "
                                   f"({best.thickness or float('nan'):.2f} mm), then most slices ({len(best.units)})")
            for p in ps[1:]:
                for f in p.files + [d[0] for d in p.deferred]:
                    err(f, "series_not_selected",
                        f"series with {len(p.units)} slices of {p.thickness or float('nan'):.2f} mm lost to one with "
                        f"{len(best.units)} of {best.thickness or float('nan'):.2f} mm.")
        tilts = [h.gantry_tilt for h in best.headers.values() if h.gantry_tilt]
        if tilts:
            best.selection_rule += f"; gantry tilt {np.median(tilts):.1f} deg (slices kept as acquired, not de-skewed)"
        chosen.append(best)
    errors.extend(d for ds in dups_of.values() for d in ds)  # copies of files rejected on their own
    return chosen, errors


class _Contents:
    """What a file's image holds, to tell an identical copy from a conflicting one (read once per file)."""

    def __init__(self, read):
        self.read = read
        self.cache: dict[str, tuple | DicomIssue] = {}

    def of(self, h: SliceHeader, frame: int | None = None):
        """(geometry, HU digest) of the file (or of one frame); raises DicomIssue when it cannot be read."""
        import hashlib

        if h.path not in self.cache:
            try:
                self.cache[h.path] = self.read(h)
            except DicomIssue as e:
                self.cache[h.path] = e
        got = self.cache[h.path]
        if isinstance(got, DicomIssue):
            raise got
        hu = got if frame is None else got[frame]
        geom = (h.rows, h.cols, h.spacing, h.orientation,
                tuple(h.positions) if frame is None and h.positions else
                (h.positions[frame] if h.positions else None))
        return geom, hashlib.sha1(np.ascontiguousarray(hu).tobytes()).hexdigest()


def _dedupe_sops(headers: list[SliceHeader], contents: _Contents):
    """One header per SOPInstanceUID -> (headers, errors, skipped copies by kept path, conflicted series).

    Across the whole batch, not per series: a SOPInstanceUID is unique, so a copy whose series or
    study UID differs is a damaged copy too (it would otherwise form a one-slice series of its own).
    ``conflicted`` maps each series touched by a conflict to (detail, paths of its conflicting copies).
    """
    shapes: dict[str, Counter] = defaultdict(Counter)
    by_sop: dict[str, list[SliceHeader]] = defaultdict(list)
    for h in headers:
        shapes[h.series_uid][(h.rows, h.cols)] += 1
        by_sop[h.sop_uid].append(h)
    out, errs = [], []
    dups_of: dict[str, list[tuple[str, str, str]]] = {}
    conflicted: dict[str, tuple[str, set[str]]] = {}
    for copies in by_sop.values():
        if len(copies) == 1:
            out.append(copies[0])
            continue
        keep, cerr, conflict = _resolve_copies(copies, shapes, contents)
        errs += [e for e in cerr if e[1] != "duplicate_sop"]
        if keep is not None:
            out.append(keep)
            dups_of[keep.path] = [e for e in cerr if e[1] == "duplicate_sop"]
        if conflict:
            detail = ("copies of one SOPInstanceUID hold different content (pixels, position or UIDs) and none "
                      "is recognisably the damaged one.")
            paths = {h.path for h in copies} - {e[0] for e in cerr}
            for uid in {h.series_uid for h in copies}:
                conflicted[uid] = (detail, conflicted.get(uid, ("", set()))[1] | paths)
    return out, errs, dups_of, conflicted


def _resolve_copies(copies: list[SliceHeader], shapes: dict[str, Counter], contents: _Contents
                    ) -> tuple[SliceHeader | None, list[tuple[str, str, str]], bool]:
    """Files sharing one SOPInstanceUID -> (the copy to keep, errors for the others, conflict?).

    A copy that cannot be read is recorded with its own reason; one without a position or of
    the series' minority shape ranks below the rest. Among the best-ranked readable copies, equal
    content (geometry and HU) is a plain duplicate; different content is a conflict (nothing kept),
    because nothing says which copy is the damaged one.
    """
    def rank(h):
        return h.positions is None, (h.rows, h.cols) != shapes[h.series_uid].most_common(1)[0][0]

    errs: list[tuple[str, str, str]] = []
    readable: list[tuple[SliceHeader, tuple]] = []
    for h in sorted(copies, key=lambda h: (rank(h), h.path)):
        try:
            readable.append((h, (h.series_uid, h.study_uid, h.patient_id, contents.of(h))))
        except DicomIssue as e:
            errs.append((h.path, e.reason, e.detail + " (another copy with the same SOPInstanceUID was considered)"))
    if not readable:
        return None, errs, False
    best = rank(readable[0][0])
    top = [(h, c) for h, c in readable if rank(h) == best]
    if len({c for _, c in top}) > 1:
        return None, errs, True
    keep = top[0][0]
    for h, c in readable[1:]:
        why = ("an identical copy" if c == top[0][1] else
               "a copy without ImagePositionPatient or of another size than the series, whose intact copy was kept")
        errs.append((h.path, "duplicate_sop", f"same SOPInstanceUID as another file in this folder; {why}. "
                     + REASONS["duplicate_sop"]))
    return keep, errs, False


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return all(abs(x - y) <= GEOMETRY_TOL for x, y in zip(a, b))


def _geometry_outliers(hs: list[SliceHeader]) -> list[SliceHeader]:
    """Slices whose PixelSpacing or orientation differs (beyond float noise) from the series' most common one.

    Plain tuples, no numpy: this runs once per slice in the planning stage of every ingest."""
    counts = Counter((h.spacing, h.orientation) for h in hs)
    if len(counts) == 1:
        return []
    spacing, orientation = counts.most_common(1)[0][0]
    return [h for h in hs if not (_close(h.spacing, spacing) and _close(h.orientation, orientation))]


def _plan_one(series_uid: str, hs: list[SliceHeader], contents: _Contents):
    """One series: (plan or None, per-file errors (path, reason, detail with advice), rejection or None).

    A rejection (reason, detail, files) leaves the whole series out: a conflict or mixed geometry
    that no choice of slices resolves safely."""
    errs: list[tuple[str, str, str]] = []

    def reject(files, reason, detail):
        return None, errs, (reason, detail, sorted(files))

    keep: list[SliceHeader] = []
    for h in hs:  # one per SOPInstanceUID already (``_dedupe_sops``)
        if not is_axial(h):
            errs.append((h.path, "localizer", "orientation is not axial (reformat or scout)." + " " + REASONS["localizer"]))
            continue
        if not in_plane_ok(h.orientation):
            errs.append((h.path, "unsupported_geometry", f"ImageOrientationPatient {h.orientation}. "
                         + REASONS["unsupported_geometry"]))
            continue
        keep.append(h)
    if not keep:
        return None, errs, None
    shape = Counter((h.rows, h.cols) for h in keep).most_common(1)[0][0]
    good = []
    for h in keep:
        if (h.rows, h.cols) != shape:
            errs.append((h.path, "inconsistent_shape", f"{h.rows}x{h.cols} in a {shape[0]}x{shape[1]} series. "
                         + REASONS["inconsistent_shape"]))
        else:
            good.append(h)
    odd = _geometry_outliers(good)
    if odd:
        return reject([h.path for h in good], "inconsistent_geometry",
                      f"{len(odd)} of {len(good)} slices differ from the rest in PixelSpacing or orientation.")
    normals = [n for n in map(SliceHeader.normal, good) if n is not None]
    normal = np.mean(normals, axis=0) if normals else np.array([0.0, 0.0, 1.0])
    if normal[2] < 0:  # mirrored row/column directions flip the normal; keep slices in ascending patient z
        normal = -normal
    units: list[tuple[float | None, float, str, int]] = []  # (z, instance tiebreak, path, frame)
    have_pos = any(h.positions is not None for h in good)
    for h in good:
        if h.positions is None:
            if have_pos:
                errs.append((h.path, "missing_position", "ImagePositionPatient missing while the rest of the series "
                             "has it. " + REASONS["missing_position"]))
                continue
            if h.instance is None:
                errs.append((h.path, "missing_position", REASONS["missing_position"]))
                continue
            for f in range(h.n_frames):
                units.append((None, h.instance + f / max(h.n_frames, 1), h.path, f))
        else:
            for f, pos in enumerate(h.positions):
                units.append((float(np.dot(pos, normal)), float(h.instance or 0), h.path, f))
    if not units:
        return None, errs, None
    hmap = {h.path: h for h in good}
    if have_pos:
        units.sort(key=lambda u: (u[0], u[1], u[2], u[3]))
        units, dup_files, conflict = _same_position(units, hmap, contents)
        if conflict:
            return reject([h.path for h in good], "position_conflict", conflict)
        for f in dup_files:
            errs.append((f, "duplicate_image", "the same image at the same position as another file of the series "
                         "(a second encoding or export); one copy was kept. " + REASONS["duplicate_image"]))
        d = np.diff(np.array([u[0] for u in units]))
        spacing = float(np.median(d)) if d.size else None
    else:
        units.sort(key=lambda u: u[1])
        spacing = None
    used = {u[2] for u in units}
    hmap = {p: h for p, h in hmap.items() if p in used}
    thick = [h.thickness for h in hmap.values() if h.thickness]
    return SeriesPlan(
        series_uid=series_uid, study_uid=good[0].study_uid, patient_id=good[0].patient_id,
        units=[(u[2], u[3]) for u in units], z=[u[0] for u in units], headers=hmap,
        slice_spacing=spacing, thickness=float(np.median(thick)) if thick else spacing, files=sorted(used)), errs, None


def _same_position(units: list, hmap: dict[str, SliceHeader], contents: _Contents
                   ) -> tuple[list, list[str], str | None]:
    """Units sorted by z -> (units with one image per position, files left with no unit, conflict or None).

    Two images at one position are never both kept (they would be interleaved as a slice
    spacing of 0). Identical images (two encodings of one image under different SOP UIDs) keep
    one; different images mean the series mixes two volumes: a conflict, and no plan.
    """
    out, dropped = [], []
    i = 0
    while i < len(units):
        j = i + 1
        while j < len(units) and units[j][0] - units[i][0] < Z_TOL_MM:
            j += 1
        group = units[i:j]
        if len(group) > 1:
            try:
                sigs = {contents.of(hmap[u[2]], u[3] if hmap[u[2]].n_frames > 1 else None)[1] for u in group}
            except DicomIssue as e:
                return units, [], f"{len(group)} images at z={group[0][0]:.2f} mm and one cannot be read ({e.reason})."
            if len(sigs) > 1:
                return units, [], (f"{len(group)} different images at z={group[0][0]:.2f} mm "
                                   f"(two volumes share this SeriesInstanceUID?).")
            dropped += [u for u in group[1:]]
        out.append(group[0])
        i = j
    kept_files = {u[2] for u in out}
    lost = sorted({u[2] for u in dropped} - kept_files)
    return out, lost, None


# ---------------------------------------------------------------- stage 3: build

def square_geometry(h: int, w: int, spacing: tuple[float, float] | None, size: int
                    ) -> tuple[int, int, float | None]:
    """(nh, nw, stored spacing mm or None): the in-plane size an (h, w) image with ``spacing``
    gets so that its longer physical side spans ``size`` pixels with square pixels."""
    sy, sx = spacing if spacing else (1.0, 1.0)
    ph, pw = h * sy, w * sx
    scale = size / max(ph, pw)
    nh, nw = max(1, min(size, round(ph * scale))), max(1, min(size, round(pw * scale)))
    return nh, nw, ((max(ph, pw) / size) if spacing else None)


def box_factors(h: int, w: int, spacing: tuple[float, float] | None, size: int) -> tuple[int, int] | None:
    """(fy, fx) when ``resize_square_pixels`` reduces to exact fy x fx box averages, else None.

    That is the case when its 2x halving steps alone reach the target size (512 -> 256 and
    other power-of-two ratios, or no resize at all). Then ``build_series`` sums blocks of the
    stored integers exactly in numpy instead (same values, a fraction of the cost). Capped at
    64 pixels per block so every block sum stays exact in float32.
    """
    nh, nw, _ = square_geometry(h, w, spacing, size)
    hh, ww = h, w
    while True:  # the same halving rule as resize_square_pixels
        half_h, half_w = hh >= 2 * nh and hh % 2 == 0, ww >= 2 * nw and ww % 2 == 0
        if not (half_h or half_w):
            break
        hh, ww = (hh // 2 if half_h else hh), (ww // 2 if half_w else ww)
    if (hh, ww) != (nh, nw) or (h // hh) * (w // ww) > 64:
        return None
    return h // hh, w // ww


def box_sum(a: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Exact int32 sums over fy x fx blocks of a 2-D integer image (fy, fx powers of two, fy*fx <= 64).

    Pairs of rows first: in a C-contiguous image rows 2i and 2i+1 are the two contiguous
    halves of one row of the (H/2, 2W) view, so that add streams memory; columns after, on
    half the data. ~3x cheaper than torch's float bilinear halving, and exact.
    """
    s = np.ascontiguousarray(a)
    while fy > 1:
        hh, w = s.shape[0] // 2, s.shape[1]
        r = s.reshape(hh, 2 * w)
        s = np.add(r[:, :w], r[:, w:], dtype=np.int32)
        fy //= 2
    while fx > 1:
        r = s.reshape(s.shape[0], s.shape[1] // 2, 2)
        s = np.add(r[..., 0], r[..., 1], dtype=np.int32)
        fx //= 2
    return s


def hu_box(a: np.ndarray, slope: float, intercept: float, fy: int, fx: int) -> np.ndarray | None:
    """One slice's stored integers (H, W) -> float32 HU (H/fy, W/fx), rounded and clipped; None
    where only the float path (``_hu_chunk_torch``) reproduces the result exactly.

    Same arithmetic as the torch path, bit for bit: clamp padding below air in stored units,
    block mean (an exact integer sum times 1/(fy*fx), a power of two), then slope and intercept
    in float32. The clamp is done on the integers, so it must be at an integer value.
    """
    if a.dtype.kind not in "iu":
        return None
    s32, i32 = np.float32(slope), np.float32(intercept)
    if not s32 > 0:
        return None
    lo = (np.float32(HU_MIN) - i32) / s32  # air in stored units (float32, as the torch path computes it)
    bits = 8 * a.dtype.itemsize  # the dtype's range (np.iinfo costs ~15 us a call)
    lowest, highest = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if a.dtype.kind == "i" else (0, (1 << bits) - 1)
    if lo > lowest:
        if not (float(lo).is_integer() and lo <= highest):
            return None
        a = np.maximum(a, a.dtype.type(int(lo)))
    f = box_sum(a, fy, fx).astype(np.float32)  # exact: |sum| < 2^24
    scale = np.float32(float(s32) / (fy * fx))
    if scale != 1:
        f *= scale
    f += i32
    np.rint(f, out=f)
    return np.clip(f, HU_MIN, HU_MAX, out=f)


def resize_square_pixels(t, spacing: tuple[float, float] | None, size: int):
    """Resize (C, H, W) float tensor so the longer physical side spans ``size`` pixels with square pixels.

    Shrinking uses box averaging ("area": anti-aliased, ~5x cheaper than bilinear+antialias);
    enlarging uses bilinear. Returns (tensor (C, nh, nw), stored spacing in mm or None).
    """
    import torch.nn.functional as F

    _, h, w = t.shape
    nh, nw, out_spacing = square_geometry(h, w, spacing, size)
    x = t[:, None]  # (C, 1, H, W)
    # exact 2x2 box averages while at least 2x too big: bilinear at exactly half size samples the
    # centre of each 2x2 block, which is their mean, and runs ~3x faster than "area" or antialias.
    while True:
        hh, ww = x.shape[2], x.shape[3]
        half_h, half_w = hh >= 2 * nh and hh % 2 == 0, ww >= 2 * nw and ww % 2 == 0
        if not (half_h or half_w):
            break
        x = F.interpolate(x, size=(hh // 2 if half_h else hh, ww // 2 if half_w else ww), mode="bilinear",
                          align_corners=False)
    if tuple(x.shape[2:]) != (nh, nw):
        down = nh < x.shape[2] or nw < x.shape[3]
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=down)
    return x[:, 0], out_spacing


def pad_square(t, size: int, fill: float):
    """Centre (C, nh, nw) in (C, size, size), filling with ``fill``."""
    import torch.nn.functional as F

    _, nh, nw = t.shape
    if (nh, nw) == (size, size):
        return t
    top, left = (size - nh) // 2, (size - nw) // 2
    return F.pad(t, (left, size - nw - left, top, size - nh - top), value=fill)


def fit_square(x: np.ndarray, spacing: tuple[float, float] | None, size: int, fill: float) -> tuple[np.ndarray, float | None]:
    """Resample (S, H, W) to (S, size, size) keeping the physical aspect ratio (pad with ``fill``)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t, out_spacing = resize_square_pixels(t, spacing, size)
    return pad_square(t, size, fill).numpy(), out_spacing


_BUFFERS: dict[tuple[int, ...], np.ndarray] = {}


def _buffer(shape: tuple[int, int, int]) -> np.ndarray:
    """A reused float32 chunk buffer (fresh 32 MB allocations page-fault on every chunk).

    Not zero-filled (that cost ~0.2 ms a slice): callers overwrite every row they use, and
    zero the rows of slices that failed.
    """
    buf = _BUFFERS.get(shape)
    if buf is None:
        _BUFFERS.clear()
        buf = _BUFFERS[shape] = np.empty(shape, np.float32)
    return buf


@dataclass(frozen=True)
class _Geometry:
    """A series' image in the standard axial view (``dicom.canonical_axes``): every build path reads
    stored pixels through ``view`` (transpose/flips) and sizes its output from rows/cols/spacing."""

    rows: int
    cols: int
    spacing: tuple[float, float] | None
    axes: tuple[bool, bool, bool]

    @classmethod
    def of(cls, h: SliceHeader) -> "_Geometry":
        rows, cols, spacing = canonical_geometry(h)
        return cls(rows, cols, spacing, canonical_axes(h.orientation))

    def view(self, x: np.ndarray) -> np.ndarray:
        return to_canonical(x, self.axes)


@dataclass
class BuiltSeries:
    series_uid: str
    array_rel: str
    mask_rel: str | None
    sop_uids: list[str]       # per stored row (frame suffix for multi-frame)
    z: list[float | None]
    nodule_px: list[int] | None
    files_ok: list[str]
    errors: list[tuple[str, str, str]]
    height: int
    width: int
    orig_rows: int
    orig_cols: int
    pixel_spacing: float | None
    seconds: float = 0.0


def _build_box(stored, n: int, factors: tuple[int, int], first: _Geometry, size: int, out: np.ndarray) -> list[int]:
    """Fill ``out`` slice by slice with ``hu_box`` (exact block means); returns the units it
    could not do exactly (odd rescale values), for ``_build_torch``.

    Slice by slice, straight from the read to the stored int16 row: no chunk buffer to fill
    and no float copy of the full-resolution slice.
    """
    fy, fx = factors
    nh, nw = first.rows // fy, first.cols // fx
    top, left = (size - nh) // 2, (size - nw) // 2
    if (nh, nw) != (size, size):
        out.fill(HU_MIN)  # padding is air
    slow: list[int] = []
    for i in range(n):
        got = stored(i)
        if got is None:
            continue
        hu = hu_box(got[0], got[1], got[2], fy, fx)
        if hu is None:
            slow.append(i)
            continue
        out[i, top:top + nh, left:left + nw] = hu
    return slow


@contextlib.contextmanager
def _one_torch_thread():
    """torch on one thread inside (one core per worker); the caller's setting is restored after,
    since the caller may be the main process acting as a worker."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _build_torch(stored, units: list[int], first: _Geometry, size: int, out: np.ndarray) -> None:
    """Fill ``out[units]`` through torch (any resize ratio, any rescale), SLICE_CHUNK slices at a time."""
    if not units:
        return
    with _one_torch_thread():
        _fill_torch(stored, units, first, size, out)


def _fill_torch(stored, units: list[int], first: _Geometry, size: int, out: np.ndarray) -> None:
    for c0 in range(0, len(units), SLICE_CHUNK):
        chunk = units[c0:c0 + SLICE_CHUNK]
        raw = _buffer((SLICE_CHUNK, first.rows, first.cols))[:len(chunk)]  # (C, H, W) stored values
        slope = np.ones(len(chunk), np.float32)
        icpt = np.zeros(len(chunk), np.float32)
        for j, i in enumerate(chunk):
            got = stored(i)
            if got is None:
                raw[j] = 0.0  # a failed slice's row is dropped later; keep it finite meanwhile
                continue
            raw[j] = got[0]  # converts to float32 while copying
            slope[j], icpt[j] = got[1], got[2]
        out[chunk] = _hu_chunk_torch(raw, slope, icpt, first.spacing, size)


def _hu_chunk_torch(raw: np.ndarray, slope: np.ndarray, icpt: np.ndarray, spacing, size: int) -> np.ndarray:
    """Stored values (C, H, W) float32 -> int16 HU (C, size, size): the general resample path.

    ``raw`` may be modified (it is the reused chunk buffer).
    """
    import torch

    # HU = slope * stored + intercept is affine, so it commutes with resampling: clamp padding below air
    # in stored units first, resample the stored values, then rescale the (4x smaller) result.
    t = torch.from_numpy(raw)
    s_t, i_t = torch.from_numpy(slope)[:, None, None], torch.from_numpy(icpt)[:, None, None]
    lo = (HU_MIN - icpt) / slope  # (C,) air in stored units
    if (slope > 0).all() and np.all(lo == lo[0]):
        t.clamp_min_(float(lo[0]))
    else:
        for j in range(len(slope)):
            t[j] = t[j].clamp_min(float(lo[j])) if slope[j] > 0 else t[j].clamp_max(float(lo[j]))
    t, _ = resize_square_pixels(t, spacing, size)
    if t.data_ptr() == raw.ctypes.data:
        t = t.clone()  # no resize happened: don't rescale the reused buffer in place
    if np.all(slope == slope[0]) and np.all(icpt == icpt[0]):  # usual case: scalar in-place ops
        if slope[0] != 1.0:
            t.mul_(float(slope[0]))
        t.add_(float(icpt[0]))
    else:
        t.mul_(s_t).add_(i_t)
    t = t.round_().clamp_(HU_MIN, HU_MAX)
    return pad_square(t, size, float(HU_MIN)).to(torch.int16).numpy()


def build_series(plan: SeriesPlan, store_root: str, series_key: str, size: int,
                 reads: list | None = None, agreement: float = 0.5) -> BuiltSeries:
    """Decode one planned series and write its arrays. Runs in a worker process."""
    import warnings

    warnings.filterwarnings("ignore", module="pydicom")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    root = Path(store_root)
    (root / "slices").mkdir(parents=True, exist_ok=True)
    first = plan.headers[plan.units[0][0]]
    geom = _Geometry.of(first)  # one geometry for the series: plan_series rejects mixed spacing/orientation
    n = len(plan.units)
    rel = f"slices/{series_key}.npy"
    out = np.empty((n, size, size), np.int16)  # (S, size, size); small enough to hold, saved once
    ok = np.ones(n, bool)
    errors: list[tuple[str, str, str]] = []
    failed_files: set[str] = set()
    cache: dict[str, np.ndarray] = {}
    _, _, out_spacing = square_geometry(geom.rows, geom.cols, geom.spacing, size)

    def stored(i: int) -> tuple[np.ndarray, float, float] | None:
        """Unit i's stored values (rows, cols) with its slope and intercept; None (recorded) if it fails."""
        path, frame = plan.units[i]
        h = plan.headers[path]
        if path in failed_files:
            ok[i] = False
            return None
        try:
            if h.n_frames > 1:
                if path not in cache:
                    cache.clear()
                    cache[path] = read_stored(h)
                a = cache[path][frame]
            else:
                a = read_stored(h)[0]
        except DicomIssue as e:
            if e.reason == "transient":  # the whole series waits for the next run: never stored with a gap
                raise TransientBuildError(e.detail) from None
            errors.append((path, e.reason, e.detail))
            failed_files.add(path)
            ok[i] = False
            return None
        slope = h.slopes[frame] if len(h.slopes) > frame else h.slopes[0]
        icpt = h.intercepts[frame] if len(h.intercepts) > frame else h.intercepts[0]
        return geom.view(padding_to_air(a, h.padding, slope, icpt)), slope, icpt

    factors = box_factors(geom.rows, geom.cols, geom.spacing, size)
    slow = list(range(n)) if factors is None else _build_box(stored, n, factors, geom, size, out)
    _build_torch(stored, slow, geom, size, out)
    if not ok.any():  # every file failed: nothing to store, only the errors to record
        return BuiltSeries(plan.series_uid, "", None, [], [], None, [], errors, size, size,
                           first.rows, first.cols, out_spacing, time.perf_counter() - t0)
    _atomic_save(root / rel, out if ok.all() else out[ok])
    keep = [u for u, k in zip(plan.units, ok) if k]
    sop_uids = [plan.headers[p].sop_uid + (f"#{f}" if plan.headers[p].n_frames > 1 else "") for p, f in keep]
    z = [zz for zz, k in zip(plan.z, ok) if k]

    mask_rel, nodule_px = None, None
    if reads is not None and keep:
        from ctssl_core.data.adapters.lidc import consensus, series_masks

        ks, readers = series_masks(reads, [plan.headers[p].sop_uid for p, _ in keep], z,
                                   first.rows, first.cols)  # (K,), (R, K, H0, W0) at DICOM resolution
        n_keep = len(keep)
        cons = np.zeros((n_keep, size, size), np.uint8)   # (S, size, size)
        bits = np.zeros((n_keep, size, size), np.uint8)   # bit k set where reader k marked

        def stored_geom(m: np.ndarray) -> np.ndarray:
            m = geom.view(m.astype(np.float32))
            r, _ = fit_square(m, geom.spacing, size, fill=0.0)
            return (r >= 0.5).astype(np.uint8)  # (K, size, size)

        if len(ks):
            with _one_torch_thread():  # fit_square resamples through torch
                cons[ks] = stored_geom(consensus(readers, len(reads), agreement))
                for k in range(min(readers.shape[0], 8)):
                    bits[ks] |= stored_geom(readers[k]) << k
        (root / "masks").mkdir(parents=True, exist_ok=True)
        mask_rel = f"masks/{series_key}.npy"
        _atomic_save(root / mask_rel, cons)
        _atomic_save(root / f"masks/{series_key}_readers.npy", bits)
        nodule_px = cons.reshape(n_keep, -1).sum(axis=1).astype(int).tolist()

    files_ok = sorted({p for p, _ in keep})
    return BuiltSeries(plan.series_uid, rel, mask_rel, sop_uids, z, nodule_px, files_ok, errors,
                       size, size, first.rows, first.cols, out_spacing, time.perf_counter() - t0)


def _host_tag() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _tmp_name(stem: str, pid: int | None = None, host: str | None = None) -> str:
    """Temp name of an array being written: tagged with the writer's pid and host, so that another
    ingest into the same store can tell its files (still being written) from stale ones."""
    return f".{stem}.{pid if pid is not None else os.getpid()}@{host or _host_tag()}.tmp.npy"


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    """Write under a temp name, then rename: readers never see a half-written array. A failed write
    (disk full) removes its temp file, so the failure leaves nothing behind.

    numpy reports a full disk as a short write, ``OSError("16384 requested and 10176 written")``
    with no errno, which ``is_transient`` cannot tell from a bad file: the series was recorded
    ``decode_failed`` for good ("re-export the series"). A short write is never the DICOM's fault,
    so it is raised again as ENOSPC when the disk has less room than the array, else EIO: both
    transient, so the next run retries the files."""
    tmp = path.with_name(_tmp_name(path.stem))
    try:
        np.save(tmp, np.ascontiguousarray(arr))
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno is None:
            raise _short_write_error(e, path, arr.nbytes) from e
        raise


def _short_write_error(e: OSError, path: Path, nbytes: int) -> OSError:
    """An errno-less short write as the OSError it stands for (see ``_atomic_save``)."""
    import errno

    try:
        st = os.statvfs(path.parent)
        full = st.f_bavail * st.f_frsize < nbytes + (1 << 16)  # the header and the filesystem's own blocks
    except OSError:
        full = False
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, f"{os.strerror(code)} (writing {path.name}: {e})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists (another user's process)
        return True
    return True


def stale_temp_files(folders, host: str | None = None, alive=None) -> list[Path]:
    """Temp arrays left by interrupted ingests: written on this host by a process that is gone.

    Why not every ``.*.tmp.npy``: a second ingest into the same store would delete the files the
    first is writing (its rename then fails). Files of another host, or of a live process, stay.
    Names without a host (older ctssl) count as this host's.
    """
    import re

    host = host or _host_tag()
    alive = alive or _pid_alive
    pat = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9-]+))?\.tmp\.npy$")
    out = []
    for folder in folders:
        for f in sorted(Path(folder).glob(".*.tmp.npy")):
            m = pat.match(f.name)
            if m is None or (m["host"] or host) != host:
                continue
            if not alive(int(m["pid"])):
                out.append(f)
    return out


class TransientBuildError(Exception):
    """A series build stopped by an error of the machine, not of the data (see ``dicom.is_transient``)."""


def _build_job(args) -> BuiltSeries | tuple[str, str, bool]:
    """``build_series``, or (series uid, message, transient?) when it failed: a transient failure
    (disk full, I/O error, permission) is retried by the next run, any other is recorded for good."""
    plan = args[0]
    try:
        return build_series(*args)
    except TransientBuildError as e:
        return (plan.series_uid, scrub(e, 160), True)
    except Exception as e:  # noqa: BLE001 - report per series; the rest goes on
        return (plan.series_uid, f"{type(e).__name__}: {scrub(e)}", is_transient(e))


# ---------------------------------------------------------------- driver

def _pool(workers: int):
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """``workers - 1`` forked processes for every stage of an ingest, or None (all in this process).

    This process is the remaining worker (see ``_shared``): it would otherwise only wait, and
    each fork of it (it holds numpy and duckdb) costs ~15 ms plus as much again at exit. One
    pool for all stages, so that cost is paid once and even small folders scan in parallel.
    torch is not imported for the workers (~1.7 s): the usual 512 -> 256 build is numpy only,
    and a worker that needs the torch path imports it once itself.
    """
    if workers <= 1:
        yield None
        return
    with _pool(workers - 1) as ex:
        yield ex


def _shared(fn, items: list, ex: ProcessPoolExecutor | None, drained=None, ahead: int = 1, until=None
            ) -> Iterator[tuple[int, Any]]:
    """(index, fn(item)) for every item, as they finish, computed by the pool and this process together.

    The pool's workers take items from the front: the next one is submitted the moment one
    finishes (from the pool's result thread), ``ahead`` per worker while many are left and one
    each near the end, so few items wait in a queue where this process could not take them
    back. This process takes items from the back and hands over the pool's results between its
    own. So the stage ends about one item apart on each side. ``ahead=2`` suits small items
    (header chunks), whose hand-over latency would otherwise idle a worker between them.
    ``drained()``, if given, is called once every item has been handed out. With ``until``, items
    are only handed out while ``until()`` is true: the rest are left out (not yielded).
    """
    n = len(items)
    if ex is None or n <= 1:
        for i, it in enumerate(items):
            if until is not None and not until():
                return
            yield i, fn(it)
        return
    lock = threading.Lock()
    span = [0, n]  # items [span[0], span[1]) are not taken yet
    done: queue.SimpleQueue = queue.SimpleQueue()  # (index, future or the exception that stopped a submit)

    def take_back() -> int | None:
        with lock:
            if span[0] >= span[1]:
                return None
            span[1] -= 1
            return span[1]

    workers, inflight = ex._max_workers, [0]

    def top_up() -> None:
        while True:
            with lock:
                left = span[1] - span[0]
                want = ahead * workers if left > ahead * workers else workers
                if left <= 0 or inflight[0] >= want:
                    return
                i = span[0]
                span[0] += 1
                inflight[0] += 1
            try:
                ex.submit(fn, items[i]).add_done_callback(lambda fut, i=i: finished(i, fut))
            except Exception as e:  # noqa: BLE001 - pool broken or shut down: the consumer re-raises it
                done.put((i, e))
                return

    def finished(i: int, fut) -> None:
        done.put((i, fut))
        with lock:
            inflight[0] -= 1
        top_up()

    def result(got):
        if isinstance(got, BaseException):
            raise got
        return got.result()

    top_up()
    handed = 0
    switch = sys.getswitchinterval()
    # The pool's result thread hands a worker its next item; while this thread runs Python (header
    # parsing) it would wait up to the 5 ms GIL switch interval for that, and the worker idles meanwhile.
    sys.setswitchinterval(HANDOFF_SWITCH_S)
    try:
        while (until is None or until()) and (i := take_back()) is not None:
            yield i, fn(items[i])
            handed += 1
            while not done.empty():
                j, got = done.get()
                yield j, result(got)
                handed += 1
        with lock:
            taken = span[0] + n - span[1]  # stop handing out (``until`` may have ended it early)
            span[0] = span[1]
        if drained is not None:
            drained()
        while handed < taken:
            j, got = done.get()
            yield j, result(got)
            handed += 1
    finally:
        sys.setswitchinterval(switch)
        with lock:
            span[0] = span[1]  # stopped early (an error, ^C): submit nothing more


def _now():
    import datetime as dt

    return dt.datetime.now()


def detect_sidecars(root: Path, cfg: IngestConfig, xmls: list | None = None) -> dict[str, Any]:
    """Label files in ``root``: train.csv (RSNA-PE), XML reads (LIDC; found by ``find_files``), demographics.csv."""
    found: dict[str, Any] = {}
    csv = root / "train.csv"
    if cfg.format == "rsna-pe" and not csv.exists():
        raise ConfigError(f"--format rsna-pe needs {csv} (the competition's train.csv); put it beside the train/ folder")
    if csv.exists() and cfg.format in ("auto", "rsna-pe"):
        found["rsna_csv"] = csv
    if xmls is None:
        xmls = []
        find_files(root, xmls)
    if cfg.format == "lidc" and not xmls:
        raise ConfigError(f"--format lidc found no XML reads under {root} (expected lidc_xml/*.xml or *.xml)")
    if xmls and cfg.format in ("auto", "lidc"):
        found["lidc_xml"] = sorted(xmls)
    demo = Path(cfg.demographics) if cfg.demographics else root / "demographics.csv"
    if cfg.demographics and not demo.exists():
        raise ConfigError(f"--demographics {demo}: file not found")
    if demo.exists():
        found["demographics"] = demo
    return found


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
    batches = _study_batches(todo, ex, progress) if len(todo) > BATCH_FILES else [todo]
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


def is_synthetic_cohort(root: Path) -> bool:
    """True for a folder written by ``ctssl synth`` (its marker, truth and completion manifest)."""
    from ctssl_core.data.synth import MARKER

    return all((Path(root) / n).is_file() for n in (MARKER, "truth.json", "manifest.json"))


def check_key_fits_data(root: Path, store_root) -> None:
    """Refuse data that is not a synthetic cohort into a store whose pseudonym key is the synthetic one.

    That key is derived from a public cohort config (``pseudonym.create_secret``, written by
    ``ctssl benchmark``): real PatientIDs hashed with it could be recovered by anyone.
    """
    from ctssl_core.data.pseudonym import is_synthetic_key
    from ctssl_core.paths import store_paths

    paths = store_paths(store_root)
    if is_synthetic_key(paths.secret) and not is_synthetic_cohort(root):
        raise ConfigError(f"the store at {paths.root} uses the synthetic cohort's pseudonym key (derived from its "
                          f"public config, so anyone could recompute it), and {root} is not a `ctssl synth` cohort; "
                          f"ingest real data into a fresh store (--store NEW_FOLDER), which gets a random key")


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


def _stat_files(files) -> tuple[dict[str, tuple[int, float]], dict[str, tuple[str, str, str]]]:
    """(path -> (size, mtime), path -> error row) for every candidate file.

    A broken symlink or a file that vanished cannot be stat'ed, and a named pipe or device is
    not a file at all (opening a pipe blocks forever): both become ``not_dicom`` rows instead
    of stopping the ingest.
    """
    import stat as stat_mod

    stat: dict[str, tuple[int, float]] = {}
    odd: dict[str, tuple[str, str, str]] = {}
    for f in map(str, files):
        try:
            st = os.stat(f)
        except OSError as e:
            stat[f] = (0, 0.0)
            reason = "transient" if is_transient(e) else "not_dicom"  # a permission fixed later: retried
            odd[f] = (f, reason, f"cannot read the file ({e.strerror}). " + REASONS[reason])
            continue
        stat[f] = (st.st_size, st.st_mtime)
        if not stat_mod.S_ISREG(st.st_mode):
            odd[f] = (f, "not_dicom", "not a regular file (a pipe, socket or device). " + REASONS["not_dicom"])
    return stat, odd


def _new_files(stat: dict[str, tuple[int, float]], done: dict[str, tuple[int, float]], keyed) -> list[str]:
    """Files (in ``stat``'s order) not ingested before with the same size and mtime.

    ``keyed(path)`` is the file's catalog key; it is an HMAC, so it is only computed when
    the store has ingested files at all.
    """
    if not done:
        return list(stat)
    todo = []
    for f, (size, mtime) in stat.items():
        prev = done.get(keyed(f))
        if prev is None or prev[0] != size or abs(prev[1] - mtime) >= 1e-3:
            todo.append(f)
    return todo


def _in_thread(fn, *args):
    """Start ``fn(*args)`` in a thread; returns a function that joins it and returns (or raises) its
    result, with ``.running()`` to ask whether it is still at work."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name="ctssl-ingest-catalog", daemon=True)
    t.start()

    def result():
        t.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    result.running = t.is_alive  # type: ignore[attr-defined]
    return result


def path_key(key, rel: str) -> str:
    """Catalog key of a file: keyed hash of its path relative to the ingest root.

    Why not the path itself: exports name folders and files after patients and UIDs
    (RSNA: train/<StudyUID>/<SeriesUID>/<SOPUID>.dcm), and nothing identifying may be stored.
    ``ctssl ingest DIR --list-errors`` maps the keys back to paths on the user's own terminal.
    """
    return key("path", rel.replace(os.sep, "/"))


def _add_stage(summary: IngestSummary, name: str, seconds: float) -> None:
    summary.stage_seconds[name] = summary.stage_seconds.get(name, 0.0) + seconds


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
    """path -> (header, error) of the files scanned (by this process and the pool) while ``busy()``.

    Why: with several workers ingest waits ~50 ms for the catalog read (DuckDB start-up) before
    it knows which files are new; on a fresh store all are, so that wait scans headers instead.
    Files the catalog then lists as done are dropped: at most one catalog read's worth of work.
    """
    chunks = [files[i:i + SCAN_CHUNK] for i in range(0, len(files), SCAN_CHUNK)]
    return {p: (h, e) for _, res in _shared(_scan_chunk, chunks, ex, ahead=2, until=busy) for p, h, e in res}


def _scan_all(files: list[str], ex, bar) -> list[list]:
    """``_scan_chunk`` results for every SCAN_CHUNK files, in file order (whoever scanned them).

    Holds every header: for one batch (at most BATCH_FILES files), as planning needs them all.
    """
    chunks = [files[i:i + SCAN_CHUNK] for i in range(0, len(files), SCAN_CHUNK)]
    out: list[list] = [[] for _ in chunks]
    for i, res in _shared(_scan_chunk, chunks, ex, ahead=2):
        out[i] = res
        bar.update(len(res))
    return out


def _study_batches(todo: list[str], ex, progress: bool) -> list[list[str]]:
    """Split a very large ingest into batches of whole studies (about BATCH_FILES files each).

    Why: planning needs a header per file in memory (~1.6 KB each; ~3 GB for RSNA-PE's 1.8M
    slices). A first cheap pass keeps only each file's (interned) StudyInstanceUID; every study
    lands whole in one batch, so series selection per study is unchanged. Costs one extra header
    scan per file (~0.3 ms). Unreadable files go in the first batch and are recorded there.
    """
    import sys

    chunks = [todo[i:i + SCAN_CHUNK] for i in range(0, len(todo), SCAN_CHUNK)]
    studies: list[list[str | None]] = [[] for _ in chunks]  # per chunk: each file's study (None: unreadable)
    bar = _bar(progress, len(todo), "group studies")
    for i, res in _shared(_scan_chunk, chunks, ex, ahead=2):  # headers dropped as they arrive (bounded memory)
        studies[i] = [sys.intern(h.study_uid) if h is not None else None for _, h, _ in res]
        bar.update(len(res))
    bar.close()
    by_study: dict[str, list[str]] = {}
    bad: list[str] = []
    for chunk, uids in zip(chunks, studies):  # in file order, whoever scanned them
        for p, uid in zip(chunk, uids):
            if uid is None:
                bad.append(p)
            else:
                by_study.setdefault(uid, []).append(p)
    batches: list[list[str]] = [bad]
    for files in by_study.values():
        if len(batches[-1]) + len(files) > BATCH_FILES and batches[-1]:
            batches.append([])
        batches[-1].extend(files)
    return [b for b in batches if b]


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
        for _, built in _shared(_build_job, jobs, ex, drained=warm.start if ex is not None else None):
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


class _WarmCatalog:
    """Start DuckDB on the catalog in a thread ahead of the last commit, and keep it open until then.

    Why: opening the catalog costs ~30-50 ms of DuckDB start-up, and the last commit can only
    begin when the last series is built, so that start-up was pure waiting at the end of every
    ingest. While this connection is open, ``connect`` in this process reuses the running
    database (~0.4 ms); closing it afterwards writes the checkpoint as closing the commit's own
    connection would have. The store's lock is held from when the last series is handed out
    (at most one series build before the commit) instead of from the commit's start.
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


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file" if "scan" in desc else "slice", dynamic_ncols=True)


def hold_back_beside_transient(plans: list[SeriesPlan], errors: list[tuple[str, str, str]]
                               ) -> tuple[list[SeriesPlan], list[tuple[str, str, str]]]:
    """Plans to build now, and 'transient' rows for the series held back for the next run.

    A file that could not be read for a temporary reason (EACCES, EIO) has no known series; if its
    series were stored without it, the next run could only report it as ``series_exists``: lost for
    good. So a series with a file in the same folder as such a file waits whole (folders hold series
    in every export layout ctssl reads; at worst a series waits one run longer than it had to).
    """
    dirs = {os.path.dirname(p) for p, reason, _ in errors if reason == "transient"}
    if not dirs:
        return plans, []
    keep, held = [], []
    for p in plans:
        if any(os.path.dirname(f) in dirs for f in p.files):
            held += [(f, "transient", "another file in its folder could not be read for a temporary reason, so "
                      "the series waits for it. " + REASONS["transient"]) for f in p.files + [d[0] for d in p.deferred]]
        else:
            keep.append(p)
    return keep, held


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
