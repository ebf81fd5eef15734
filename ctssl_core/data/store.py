"""Read side of the slice store: memory-mapped int16 HU arrays addressed by global slice id.

Training never decodes DICOM: ``read(ids)`` groups the ids by series and fancy-
indexes each series' memory map once, so a batch costs one gather per series.
``SliceStore.open`` reads the catalog once (duckdb imported lazily) and closes
the connection; ``SliceStore.from_arrays`` builds the same object from arrays in
memory, for GPU benchmarks on machines without duckdb or pydicom.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


class SliceStore:
    """Slices of all series, concatenated in catalog order: global id = offset[series] + idx."""

    def __init__(self, arrays: list[np.ndarray], pe: np.ndarray | None = None, nodule_px: np.ndarray | None = None,
                 masks: list[np.ndarray | None] | None = None, series_patient: np.ndarray | None = None,
                 slice_ids: np.ndarray | None = None, patients=None, slices=None, root: Path | None = None):
        if not arrays:
            from ctssl_core.db import StoreMissing

            raise StoreMissing("the store holds no series; run `ctssl ingest DIR` first")
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) != 1 or any(a.ndim != 3 for a in arrays):
            from ctssl_core.db import StoreError

            raise StoreError(f"series arrays must all be (S, H, W) with one H, W; got {sorted(shapes)}. "
                             f"Re-ingest with one --size.")
        self.root = root
        self.arrays = arrays
        self.height, self.width = next(iter(shapes))
        lengths = np.array([a.shape[0] for a in arrays], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])  # (n_series + 1,)
        self.n_slices = int(self.offsets[-1])
        self.series_of = np.repeat(np.arange(len(arrays), dtype=np.int32), lengths)  # (N,)
        self.idx_in_series = (np.arange(self.n_slices, dtype=np.int64) - self.offsets[self.series_of]).astype(np.int32)
        # slice_ids are dense 0..N-1 in catalog order; kept as an array so callers can map them to catalog rows
        self.slice_ids = np.arange(self.n_slices, dtype=np.int64) if slice_ids is None else np.asarray(slice_ids, np.int64)
        sp = np.arange(len(arrays)) if series_patient is None else np.asarray(series_patient)
        self.series_patient = sp.astype(np.int64)
        self.patient_idx = self.series_patient[self.series_of]  # (N,)
        self._pe = pe
        self._nodule_px = nodule_px
        self.masks = masks if masks is not None else [None] * len(arrays)
        self.patients = patients
        self.slices = slices
        self._pos = None if slice_ids is None else _positions(self.slice_ids)
        self.unreadable: list[str] = []  # series left out by ``open`` (damaged or missing arrays), with why

    # ------------------------------------------------------------ construction
    @classmethod
    def open(cls, store_root: str | Path) -> "SliceStore":
        """Open an ingested store. Raises StoreMissing (with the command to run) when there is none."""
        from ctssl_core.db import StoreError, StoreMissing, connect
        from ctssl_core.paths import store_paths

        paths = store_paths(store_root)
        if not paths.db.exists():
            raise StoreMissing(f"no ctssl store at {paths.root}; run `ctssl ingest DIR --store {paths.root}` first")
        with connect(paths.db, read_only=True) as con:
            tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            if "series" not in tables:
                raise StoreMissing(f"the store at {paths.root} has no catalog; run `ctssl ingest DIR --store {paths.root}`")
            series = con.execute(
                "SELECT s.*, p.rowid_p FROM series s "
                "JOIN (SELECT patient_key, row_number() OVER (ORDER BY patient_key) - 1 AS rowid_p FROM patients) p "
                "USING (patient_key) "
                "JOIN (SELECT series_key, min(slice_id) AS first_id FROM slices GROUP BY series_key) f "
                "USING (series_key) ORDER BY f.first_id").df().drop(columns=["first_id"], errors="ignore")
            slices = con.execute("SELECT * FROM slices ORDER BY slice_id").df()
            patients = _expand_attributes(con.execute("SELECT * FROM patients ORDER BY patient_key").df())
        if series.empty or slices.empty:
            raise StoreMissing(f"the store at {paths.root} holds no slices; run `ctssl ingest DIR --store {paths.root}`")
        arrays, masks, readable, unreadable = [], [], [], []
        for i, (sk, rel, mrel, n) in enumerate(zip(series["series_key"], series["array_path"], series["mask_path"],
                                                   series["n_slices"])):
            try:
                a, m = _open_series(paths.root, rel, mrel, int(n))
            except StoreError as e:  # one damaged series is reported and left out; the rest stays usable
                unreadable.append(f"series {sk}: {e}")
                continue
            arrays.append(a)
            masks.append(m)
            readable.append(i)
        if unreadable:
            import logging

            logging.getLogger(__name__).warning("%d series of %s left out: %s", len(unreadable), paths.root,
                                                "; ".join(unreadable))
            if not arrays:
                raise StoreError(f"no series of the store at {paths.root} can be read ({'; '.join(unreadable[:3])}); "
                                 f"re-ingest into a new store")
            series = series.iloc[readable].reset_index(drop=True)
            slices = slices[slices["series_key"].isin(set(series["series_key"]))].reset_index(drop=True)
        # catalog order: series by first slice_id, slices by (series, idx) == slice_id order
        pe = slices["pe"].astype("float64").to_numpy(na_value=np.nan)
        nod = slices["nodule_px"].astype("float64").to_numpy(na_value=np.nan)
        store = cls(arrays, pe=pe, nodule_px=nod, masks=masks, series_patient=series["rowid_p"].to_numpy(),
                    slice_ids=slices["slice_id"].to_numpy(), patients=patients, slices=slices, root=paths.root)
        expect = np.concatenate([np.arange(n) for n in series["n_slices"]])
        if len(slices) != store.n_slices or not np.array_equal(slices["idx"].to_numpy(), expect):
            raise StoreError(f"catalog slices of {paths.root} do not match its arrays; re-ingest into a new store")
        store.series = series
        store.unreadable = unreadable
        return store

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], pe=None, masks=None, patient_idx=None) -> "SliceStore":
        """Same object from in-memory or ``np.load(mmap_mode='r')`` arrays; no DuckDB needed.

        ``pe``: per-slice (N,) array, or a list of per-series arrays. ``masks``: list of per-series
        uint8 (S, H, W) arrays or None. ``patient_idx``: one int per series (default: series i = patient i).
        """
        arrays = [np.asarray(a) if not isinstance(a, np.memmap) else a for a in arrays]
        if pe is not None and not isinstance(pe, np.ndarray):
            pe = np.concatenate([np.asarray(p, np.float64) for p in pe])
        n = sum(a.shape[0] for a in arrays)
        if pe is not None and len(pe) != n:
            from ctssl_core.config import ConfigError

            raise ConfigError(f"from_arrays: pe has {len(pe)} values for {n} slices")
        if patient_idx is not None and len(patient_idx) != len(arrays):
            from ctssl_core.config import ConfigError

            raise ConfigError(f"from_arrays: patient_idx needs one entry per series ({len(arrays)}), got {len(patient_idx)}")
        nod = None
        if masks is not None:
            nod = np.concatenate([m.reshape(m.shape[0], -1).sum(1).astype(np.float64) if m is not None
                                  else np.full(a.shape[0], np.nan) for a, m in zip(arrays, masks)])
        return cls(list(arrays), pe=None if pe is None else np.asarray(pe, np.float64), nodule_px=nod,
                   masks=list(masks) if masks is not None else None, series_patient=patient_idx)

    # ------------------------------------------------------------ reads
    def _locate(self, slice_ids) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(slice_ids, np.int64).reshape(-1)
        pos = ids if self._pos is None else self._pos(ids)
        if ids.size and (pos.min() < 0 or pos.max() >= self.n_slices):
            raise IndexError(f"slice ids out of range 0..{self.n_slices - 1}")
        return self.series_of[pos], self.idx_in_series[pos]

    def _gather(self, arrays, series, idx, dtype, fill=0) -> np.ndarray:
        out = np.empty((series.size, self.height, self.width), dtype)  # (B, H, W)
        order = np.argsort(series, kind="stable")
        s_sorted = series[order]
        bounds = np.flatnonzero(np.diff(s_sorted)) + 1
        for grp in np.split(order, bounds):
            if grp.size == 0:
                continue
            s = int(series[grp[0]])
            arr = arrays[s]
            if arr is None:
                out[grp] = fill
                continue
            rows = idx[grp]
            o = np.argsort(rows, kind="stable")  # sorted reads are sequential on disk
            out[grp[o]] = arr[rows[o]]
        return out

    def read(self, slice_ids) -> np.ndarray:
        """int16 HU (B, H, W) for the given global slice ids (any order, repeats allowed)."""
        series, idx = self._locate(slice_ids)
        return self._gather(self.arrays, series, idx, np.int16)

    def valid_for_gap(self, gap: int) -> np.ndarray:
        """bool (N,): slice n has a partner n+gap in the same series (gap may be negative)."""
        lengths = np.diff(self.offsets)[self.series_of]
        j = self.idx_in_series.astype(np.int64) + gap
        return (j >= 0) & (j < lengths)

    def read_context(self, slice_ids, gap: int) -> np.ndarray:
        """int16 (B, 2, H, W): slice n and slice n+gap of the same series. Ids must be valid_for_gap."""
        ids = np.asarray(slice_ids, np.int64).reshape(-1)
        series, idx = self._locate(ids)
        j = idx.astype(np.int64) + gap
        lengths = np.diff(self.offsets)[series]
        if np.any((j < 0) | (j >= lengths)):
            from ctssl_core.config import ConfigError

            raise ConfigError(f"read_context: some slices have no partner at gap {gap}; filter with valid_for_gap({gap})")
        a = self._gather(self.arrays, series, idx, np.int16)
        b = self._gather(self.arrays, series, j, np.int16)
        return np.stack([a, b], axis=1)  # (B, 2, H, W)

    def read_mask(self, slice_ids) -> np.ndarray:
        """uint8 (B, H, W) nodule consensus masks; zeros for series without masks."""
        series, idx = self._locate(slice_ids)
        return self._gather(self.masks, series, idx, np.uint8, fill=0)

    def labels(self, name: str) -> np.ndarray:
        """Per-slice labels: 'pe' (float, NaN unknown) or 'nodule_px' (float, NaN unknown)."""
        table = {"pe": self._pe, "nodule_px": self._nodule_px}
        if name not in table:
            from ctssl_core.config import ConfigError

            raise ConfigError(f"unknown label {name!r}; choose one of {sorted(table)}")
        v = table[name]
        return np.full(self.n_slices, np.nan) if v is None else np.asarray(v, np.float64)

    def __len__(self) -> int:
        return self.n_slices

    def __repr__(self) -> str:
        return f"SliceStore({len(self.arrays)} series, {self.n_slices} slices, {self.height}x{self.width})"


def _open_series(root: Path, rel: str, mrel, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Memory-map one series' array (and mask); StoreError saying what is wrong with it.

    Why per series: a truncated ``.npy`` (disk full, an interrupted copy) makes ``np.load`` raise
    ValueError; that must cost the store one series, not all of them.
    """
    from ctssl_core.db import StoreError

    f = root / rel
    if not f.exists():
        raise StoreError(f"{f} is listed in the catalog but missing; restore it or re-ingest into a new store")
    try:
        a = np.load(f, mmap_mode="r")
        m = np.load(root / mrel, mmap_mode="r") if isinstance(mrel, str) and mrel else None
    except (ValueError, OSError, EOFError) as e:
        raise StoreError(f"{f.name} (or its mask) cannot be read ({type(e).__name__}: {str(e)[:80]}); "
                         f"it is damaged or truncated: re-ingest its source into a new store") from None
    if a.ndim != 3 or a.shape[0] != n:
        raise StoreError(f"{f} has {a.shape[0] if a.ndim else 0} slices but the catalog says {n}; "
                         f"re-ingest into a new store")
    return a, m


def _expand_attributes(patients):
    """Add each key of the ``attributes`` JSON (control_group, site, ...) as its own column."""
    import json

    parsed = [json.loads(a) if isinstance(a, str) and a else {} for a in patients.get("attributes", [])]
    for k in sorted({k for d in parsed for k in d}):
        if k not in patients.columns:
            patients[k] = [d.get(k) for d in parsed]
    return patients


def _positions(slice_ids: np.ndarray):
    """Map global slice id -> row position; identity fast path when ids are 0..N-1."""
    if np.array_equal(slice_ids, np.arange(slice_ids.size)):
        return None
    order = np.argsort(slice_ids)
    sorted_ids = slice_ids[order]

    def pos(ids: np.ndarray) -> np.ndarray:
        k = np.searchsorted(sorted_ids, ids)
        k = np.clip(k, 0, sorted_ids.size - 1)
        if np.any(sorted_ids[k] != ids):
            raise IndexError("unknown slice ids requested from the store")
        return order[k]

    return pos
