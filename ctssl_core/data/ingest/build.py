"""Stage 3, build (in a worker, one series each): pixels (one read at the known offset) -> HU ->
in-plane resample (``resample``) -> ``slices/<series>.npy``; LIDC masks too.

Why its own module: this is the work done per series in the worker processes, with its own
failure rules (a transient error holds the whole series back; any other is recorded per file).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctssl_core.data.dicom import (
    HU_MIN,
    DicomIssue,
    SliceHeader,
    canonical_axes,
    canonical_geometry,
    is_transient,
    padding_to_air,
    read_stored,
    scrub,
    to_canonical,
)
from ctssl_core.data.ingest.arrays import _atomic_save
from ctssl_core.data.ingest.plan import SeriesPlan
from ctssl_core.data.ingest.resample import _hu_chunk_torch, box_factors, fit_square, hu_box, square_geometry

SLICE_CHUNK = 32  # slices decoded and resampled at once inside a series (bounds memory)


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
