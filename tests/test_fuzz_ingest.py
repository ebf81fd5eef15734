"""Fuzz: randomly corrupted copies of valid slices never crash ingest, and every file is accounted for."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_fixtures import phantom, write_series

from ctssl_core.data.ingest import headers as headers_mod
from ctssl_core.data.ingest import IngestConfig, find_files, ingest
from ctssl_core.data.pseudonym import Pseudonymiser
from ctssl_core.data.store import SliceStore
from ctssl_core.db import connect
from ctssl_core.paths import store_paths

DROPPABLE = ["PixelData", "Rows", "Columns", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
             "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
             "BitsAllocated", "PixelRepresentation", "Modality", "InstanceNumber", "PatientID"]


def corrupt(src: bytes, path, rng) -> str:
    """Write one corrupted copy of ``src`` at ``path``; returns the kind of damage."""
    kind = ["truncate", "flip", "drop"][int(rng.integers(3))]
    if kind == "truncate":
        path.write_bytes(src[: int(rng.integers(0, len(src)))])
    elif kind == "flip":
        b = bytearray(src)
        # bias flips towards the header, where they hurt parsing most
        for i in rng.integers(0, min(len(b), 1400), int(rng.integers(1, 12))):
            b[i] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(b))
    else:
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(src))
        for name in rng.choice(DROPPABLE, int(rng.integers(1, 4)), replace=False):
            if name in ds:
                delattr(ds, name)
        ds.save_as(path, enforce_file_format=False)
    return kind


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupted_copies_never_crash_and_all_files_accounted(tmp_path, monkeypatch, workers):
    rng = np.random.default_rng(1234)
    src = tmp_path / "src"
    vol = phantom(6, 32, 32)
    good = write_series(src / "good", vol, patient_id="P-FUZZ")
    (src / "bad").mkdir()
    kinds = [corrupt(good[int(rng.integers(len(good)))].read_bytes(), src / "bad" / f"c{i:02d}", rng)
             for i in range(45)]
    assert set(kinds) == {"truncate", "flip", "drop"}
    files = find_files(src)
    monkeypatch.setattr(headers_mod, "SCAN_CHUNK", 8)  # with 2 workers: scan chunks shared by both processes
    summary = ingest(src, tmp_path / "store", IngestConfig(size=32, workers=workers), progress=False)

    with connect(store_paths(tmp_path / "store").db, read_only=True) as con:
        status = dict(con.execute("SELECT path, status FROM ingested_files").fetchall())
        errors = dict(con.execute("SELECT path, reason FROM ingest_errors").fetchall())
        n_slices = con.execute("SELECT count(*) FROM slices").fetchone()[0]
    n_ok = sum(1 for s in status.values() if s == "ok")
    n_err = len(errors)
    assert len(status) == len(files) == n_ok + n_err  # every file: ingested, or recorded with a reason
    assert all(status[p] != "ok" for p in errors)
    assert all(errors[p] for p in errors)
    assert n_err >= 15  # the corruption did bite
    # no damaged copy displaced an original: every stored slice of an original SOP holds its HU
    # (copies whose pixels differ and cannot be told apart put the series in conflict, retried later)
    key = Pseudonymiser.for_store(store_paths(tmp_path / "store").secret)
    sops = [key("sop", str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)) for p in good]
    conflict = any(r == "sop_conflict" for r in errors.values())
    stored = _stored_by_sop(tmp_path / "store")
    if conflict:  # the series with conflicting copies waits for the user (its files are retried)
        assert set(sops).isdisjoint(stored)
        assert {status[p] for p, r in errors.items() if r == "sop_conflict"} == {"retry"}
    for k, (img, n) in stored.items():
        if k in sops:
            assert n == 1
            np.testing.assert_array_equal(img, vol[sops.index(k)])
    # error sentences quote pydicom's messages: identifiers must have been scrubbed from them
    raw_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in good]
    with connect(store_paths(tmp_path / "store").db, read_only=True) as con:
        details = " ".join(r[0] for r in con.execute("SELECT detail FROM ingest_errors").fetchall())
    assert "P-FUZZ" not in details and not any(u in details for u in raw_uids)
    assert summary.errors == n_err and summary.slices == n_slices
    # with the damaged copies removed, a re-run stores every original once, exactly (conflicts were retried)
    import shutil

    shutil.rmtree(src / "bad")
    ingest(src, tmp_path / "store", IngestConfig(size=32, workers=workers), progress=False)
    stored = _stored_by_sop(tmp_path / "store")
    assert set(sops) <= set(stored)
    for i, k in enumerate(sops):
        assert stored[k][1] == 1
        np.testing.assert_array_equal(stored[k][0], vol[i])
    st = SliceStore.open(tmp_path / "store")  # what was stored is readable
    x = st.read(np.arange(st.n_slices))
    assert x.shape == (st.n_slices, 32, 32) and x.dtype == np.int16 and st.n_slices >= 6


def _stored_by_sop(store) -> dict[str, tuple[np.ndarray, int]]:
    """sop key -> (stored HU image, how many slices carry that key)."""
    out: dict[str, tuple[np.ndarray, int]] = {}
    with connect(store_paths(store).db, read_only=True) as con:
        rows = con.execute("SELECT s.sop_key, s.idx, r.array_path FROM slices s JOIN series r USING (series_key)").fetchall()
    for k, idx, rel in rows:
        img = np.load(store / rel)[idx]
        out[k] = (img, out[k][1] + 1 if k in out else 1)
    return out
