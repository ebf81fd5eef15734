"""LIDC-IDRI XML reads -> per-reader nodule masks and consensus masks.

Each ``readingSession`` is one radiologist; each ``unblindedReadNodule/roi`` is one
contour on one slice (``imageSOP_UID``, ``imageZposition``) given as ``edgeMap``
boundary pixels that belong to the nodule (pylidc convention), ``inclusion``
FALSE marking a hole. Contours are filled at DICOM resolution (PIL polygon fill,
boundary included); the consensus keeps pixels marked by at least ``agreement``
of the readers (50% is the usual LIDC target). Standard library XML only.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np


@dataclass
class Roi:
    sop_uid: str
    z: float | None
    inclusion: bool
    points: np.ndarray  # (N, 2) int (x = column, y = row)


Reader = list[Roi]  # one reading session


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(el, name: str) -> str | None:
    for c in el:
        if _local(c.tag) == name:
            return (c.text or "").strip()
    return None


def parse_file(path: str | Path) -> tuple[str | None, list[Reader]]:
    """(SeriesInstanceUid from the header or None, readers) for one LIDC XML file."""
    root = ET.parse(path).getroot()
    series_uid = None
    readers: list[Reader] = []
    for el in root:
        name = _local(el.tag)
        if name == "ResponseHeader":
            series_uid = _child_text(el, "SeriesInstanceUid") or _child_text(el, "SeriesInstanceUID")
        elif name in ("readingSession", "CXRreadingSession"):
            rois: Reader = []
            for nod in el:
                if _local(nod.tag) != "unblindedReadNodule":
                    continue
                for roi in nod:
                    if _local(roi.tag) != "roi":
                        continue
                    sop = _child_text(roi, "imageSOP_UID") or ""
                    z = _child_text(roi, "imageZposition")
                    inc = (_child_text(roi, "inclusion") or "TRUE").upper() != "FALSE"
                    pts = []
                    for em in roi:
                        if _local(em.tag) == "edgeMap":
                            x, y = _child_text(em, "xCoord"), _child_text(em, "yCoord")
                            if x is not None and y is not None:
                                pts.append((int(round(float(x))), int(round(float(y)))))
                    if pts:
                        rois.append(Roi(sop, float(z) if z not in (None, "") else None, inc, np.asarray(pts, np.int64)))
            readers.append(rois)
    return series_uid, readers


def parse_reads(paths: Iterable[str | Path], series_uids: set[str] | None = None) -> dict[str, list[Reader]]:
    """Series UID -> readers, for every parseable XML (header UID, else the file stem)."""
    out: dict[str, list[Reader]] = {}
    for p in paths:
        try:
            uid, readers = parse_file(p)
        except (ET.ParseError, ValueError, OSError):
            continue  # not an LIDC read (other XML in the folder); ingest goes on
        uid = uid or Path(p).stem
        if series_uids is not None and uid not in series_uids:
            continue
        out.setdefault(uid, []).extend(readers)
    return out


def rasterise(points: np.ndarray, rows: int, cols: int, outline: bool = True) -> np.ndarray:
    """Fill a closed contour (N, 2) of (x, y) pixel coordinates -> bool (rows, cols)."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(img)
    pts = [(int(x), int(y)) for x, y in points]
    if len(pts) == 1:
        draw.point(pts, fill=1)
    elif len(pts) == 2:
        draw.line(pts, fill=1)
    else:
        draw.polygon(pts, fill=1, outline=1 if outline else 0)
        if not outline:  # PIL's fill includes the edge; remove it so holes keep the nodule's boundary
            draw.line(pts + [pts[0]], fill=0)
    return np.asarray(img, dtype=bool)


def series_masks(readers: list[Reader], sop_uids: list[str], z: list[float | None], rows: int, cols: int,
                 z_tol: float = 0.51) -> tuple[np.ndarray, np.ndarray]:
    """Per-reader masks on the annotated slices only.

    Returns (slice rows (K,) int, masks (R, K, rows, cols) uint8). A roi is placed by its SOP UID,
    else by the nearest slice within ``z_tol`` mm; unplaceable rois are dropped.
    """
    row_of = {s: i for i, s in enumerate(sop_uids)}
    zs = np.array([np.nan if v is None else v for v in z], np.float64)
    placed: list[list[tuple[int, Roi]]] = []
    for rois in readers:
        lst = []
        for roi in rois:
            k = row_of.get(roi.sop_uid)
            if k is None and roi.z is not None and np.isfinite(zs).any():
                d = np.abs(zs - roi.z)
                j = int(np.nanargmin(d))
                k = j if d[j] <= z_tol else None
            if k is not None:
                lst.append((k, roi))
        placed.append(lst)
    ks = sorted({k for lst in placed for k, _ in lst})
    pos = {k: i for i, k in enumerate(ks)}
    masks = np.zeros((len(readers), len(ks), rows, cols), np.uint8)  # (R, K, H0, W0)
    for r, lst in enumerate(placed):
        holes = []
        for k, roi in lst:
            if roi.inclusion:
                masks[r, pos[k]] |= rasterise(roi.points, rows, cols)
            else:
                holes.append((k, roi))
        for k, roi in holes:
            masks[r, pos[k]] &= ~rasterise(roi.points, rows, cols, outline=False)
    return np.asarray(ks, np.int64), masks


def consensus(masks: np.ndarray, n_readers: int, agreement: float = 0.5) -> np.ndarray:
    """(R, ...) reader masks -> bool consensus: marked by >= agreement * n_readers readers (at least one)."""
    votes = masks.astype(np.int32).sum(axis=0)
    need = max(1, int(np.ceil(agreement * n_readers - 1e-9)))
    return votes >= need
