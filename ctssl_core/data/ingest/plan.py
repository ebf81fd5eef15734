"""Stage 2, plan (pure, in the main process): headers -> one ordered series per study.

Groups headers by series, resolves copies of one SOPInstanceUID and images at one position
(reading pixels only for files that clash), drops localisers and odd shapes, orders slices along
the slice normal and chooses one series per study. Why its own module: every rule that decides
which files become stored slices, and why the others do not, is here and nowhere else.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from ctssl_core.data.dicom import REASONS, DicomIssue, SliceHeader, in_plane_ok, is_axial, read_hu

Z_TOL_MM = 0.01  # two slices of one series closer than this along the normal are at the same position
GEOMETRY_TOL = 1e-3  # PixelSpacing (mm) and direction cosines that differ less are the same geometry


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
