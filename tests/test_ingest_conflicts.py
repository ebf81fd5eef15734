"""Copies of one SOPInstanceUID with different content (issue 13 item 10): damaged copies never displace
valid ones, no position holds two slices, and a conflict nothing can resolve is recorded and retried."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
from dicom_fixtures import ct_dataset, phantom, save, write_series
from pydicom.uid import generate_uid

from ctssl_core.commands.ingest import list_errors
from ctssl_core.data.ingest import IngestConfig, ingest
from ctssl_core.db import connect
from ctssl_core.paths import store_paths

N = 32


def _folder(root, flipped: bool):
    """Originals in b_orig/, damaged copies (same UIDs) in a_damaged/, which sorts first."""
    vol = phantom(8, N, N, seed=21)
    study, series = generate_uid(), generate_uid()
    orig = write_series(root / "b_orig", vol, study_uid=study, series_uid=series, spacing_z=2.0, z0=0.0)
    dmg = root / "a_damaged"
    dmg.mkdir()
    for k in (0, 1):  # missing RescaleIntercept: +1024 HU if assumed 0
        ds = pydicom.dcmread(orig[k])
        del ds.RescaleIntercept
        ds.save_as(dmg / f"nointercept{k}.dcm", enforce_file_format=True)
    raw = orig[2].read_bytes()
    (dmg / "truncated.dcm").write_bytes(raw[:-200])  # an interrupted copy
    ds = pydicom.dcmread(orig[3])
    del ds.ImagePositionPatient  # header damage: ranks below the intact copy
    ds.save_as(dmg / "nopos.dcm", enforce_file_format=True)
    shutil.copy(orig[4], dmg / "identical.dcm")
    if flipped:  # pixel damage with an intact header: nothing says which copy is right
        ds = pydicom.dcmread(orig[5])
        hu = vol[5].copy()
        hu[3, 3:7] += 300
        bad = ct_dataset(hu, study_uid=study, series_uid=series, sop_uid=str(ds.SOPInstanceUID),
                         position=ds.ImagePositionPatient, instance_number=6, slice_thickness=2.0)
        save(bad, dmg / "flipped.dcm")
    return vol


def _state(store):
    with connect(store_paths(store).db, read_only=True) as con:
        status = dict(con.execute("SELECT status, count(*) FROM ingested_files GROUP BY status").fetchall())
        z = con.execute("SELECT list(z_mm ORDER BY idx) FROM slices").fetchone()[0]
        rel = con.execute("SELECT any_value(array_path) FROM series").fetchone()[0]
    return status, z, (np.load(store / rel) if rel else None)


def test_damaged_copies_never_displace_the_originals(tmp_path):
    vol = _folder(tmp_path / "src", flipped=False)
    s = ingest(tmp_path / "src", tmp_path / "st", IngestConfig(size=N, workers=1), progress=False)
    assert s.series == 1 and s.slices == 8
    assert s.errors_by_reason == {"no_rescale": 2, "truncated": 1, "duplicate_sop": 2}
    status, z, arr = _state(tmp_path / "st")
    np.testing.assert_array_equal(arr, vol)  # every stored slice is the original, none shifted
    assert z == [2.0 * k for k in range(8)]  # one slice per position
    assert status == {"ok": 8, "error": 3, "skipped": 2}
    named = dict(list_errors(tmp_path / "src", tmp_path / "st"))
    assert named["a_damaged/nointercept0.dcm"] == "no_rescale" and named["a_damaged/nopos.dcm"] == "duplicate_sop"
    # of the byte-identical pair either may be the one kept; every other original is stored
    assert len({"a_damaged/identical.dcm", "b_orig/0004.dcm"} & set(named)) == 1
    assert {p for p in named if p.startswith("b_orig/")} <= {"b_orig/0004.dcm"}


def test_copies_that_differ_in_pixels_are_a_conflict_until_resolved(tmp_path):
    vol = _folder(tmp_path / "src", flipped=True)
    store = tmp_path / "st"
    s = ingest(tmp_path / "src", store, IngestConfig(size=N, workers=1), progress=False)
    assert s.series == 0 and s.errors_by_reason == {"no_rescale": 2, "truncated": 1, "sop_conflict": 11}
    status, _, arr = _state(store)
    assert arr is None and status == {"retry": 11, "error": 3}
    named = dict(list_errors(tmp_path / "src", store))
    assert named["a_damaged/flipped.dcm"] == named["b_orig/0005.dcm"] == "sop_conflict"
    (tmp_path / "src" / "a_damaged" / "flipped.dcm").unlink()  # the user removes the damaged copy
    again = ingest(tmp_path / "src", store, IngestConfig(size=N, workers=2), progress=False)
    assert again.files_new == 10 and again.slices == 8 and again.errors_by_reason == {"duplicate_sop": 2}
    status, z, arr = _state(store)
    np.testing.assert_array_equal(arr, vol)
    assert z == [2.0 * k for k in range(8)] and status == {"ok": 8, "error": 3, "skipped": 2}
    assert "sop_conflict" not in dict(list_errors(tmp_path / "src", store)).values()
