"""DICOM -> HU and geometry: the silent wrong numbers of issue 13 item 12 become right values or recorded rejections.

Each test writes its files with the pydicom fixture writers and checks the values stored (or the
reason recorded) through both header paths (the byte walker in ``scan`` and ``scan_with_pydicom``)
and through a real ingest.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_fixtures import ct_dataset, enhanced_ct, phantom, save, write_series
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from ctssl_core.data.dicom import DicomIssue, read_hu, scan, scan_with_pydicom
from ctssl_core.data.ingest import IngestConfig, ingest
from ctssl_core.db import connect
from ctssl_core.paths import store_paths

N = 32


def _issue(fn, path) -> DicomIssue:
    with pytest.raises(DicomIssue) as e:
        fn(str(path))
    return e.value


def _both_reject(path, reason: str) -> DicomIssue:
    """Both header paths reject ``path`` with ``reason``; returns the byte walker's issue."""
    assert _issue(scan_with_pydicom, path).reason == reason
    e = _issue(scan, path)
    assert e.reason == reason
    return e


def _ingest(src, store, size=N, workers=1):
    return ingest(src, store, IngestConfig(size=size, workers=workers), progress=False)


def _stored(store) -> list[np.ndarray]:
    with connect(store_paths(store).db, read_only=True) as con:
        rows = con.execute("SELECT array_path FROM series ORDER BY array_path").fetchall()
    return [np.load(store / r[0]) for r in rows]


def _errors(store) -> dict[str, int]:
    with connect(store_paths(store).db, read_only=True) as con:
        return dict(con.execute("SELECT reason, count(*) FROM ingest_errors GROUP BY reason").fetchall())


def _statuses(store) -> dict[str, int]:
    with connect(store_paths(store).db, read_only=True) as con:
        return dict(con.execute("SELECT status, count(*) FROM ingested_files GROUP BY status").fetchall())


# ---------------------------------------------------------------- a. missing rescale

def test_series_without_rescale_is_rejected_not_shifted(tmp_path):
    vol = phantom(3, N, N, seed=1)
    write_series(tmp_path / "src" / "s", vol, slope=None, intercept=None)  # stored = HU + 1024, no tags
    s = _ingest(tmp_path / "src", tmp_path / "st")
    assert s.series == 0 and s.errors_by_reason == {"no_rescale": 3}
    assert _errors(tmp_path / "st") == {"no_rescale": 3}


def test_header_assumptions_are_stored_in_the_catalog(tmp_path):
    vol = phantom(2, N, N, seed=1)
    write_series(tmp_path / "src" / "s", vol, pixel_spacing=(-0.7, -0.7))  # a vendor's negative spacing
    write_series(tmp_path / "src" / "t", vol, patient_id="P2")
    assert _ingest(tmp_path / "src", tmp_path / "st").series == 2
    with connect(store_paths(tmp_path / "st").db, read_only=True) as con:
        notes = sorted(r[0] or "" for r in con.execute("SELECT notes FROM series").fetchall())
    assert notes == ["", '["PixelSpacing (-0.7, -0.7) not positive: used absolute values"]']
    np.testing.assert_array_equal(_stored(tmp_path / "st")[0], vol)


# ---------------------------------------------------------------- b. pixel padding

def _padded(signed: bool, value: int, limit: int | None, syntax: str, path):
    """A slice whose outside-the-circle pixels hold padding values (stored units) around a body of ``vol``."""
    hu = phantom(1, N, N, seed=2)[0]
    yy, xx = np.mgrid[0:N, 0:N]
    outside = (yy - N / 2) ** 2 + (xx - N / 2) ** 2 > (0.45 * N) ** 2
    ds = ct_dataset(hu, signed=signed)
    dt = "<i2" if signed else "<u2"
    stored = np.frombuffer(ds.PixelData, dt).reshape(N, N).copy()
    hi = value if limit is None else limit
    pad_vals = np.linspace(min(value, hi), max(value, hi), outside.sum()).round().astype(dt)
    stored[outside] = pad_vals
    ds.PixelData = stored.tobytes()
    vr = "SS" if signed else "US"  # written with its resolved VR, as scanners do
    ds.add_new(0x00280120, vr, value)  # PixelPaddingValue
    if limit is not None:
        ds.add_new(0x00280121, vr, limit)  # PixelPaddingRangeLimit
    return save(ds, path, syntax), hu, outside


@pytest.mark.parametrize("syntax", ["explicit_le", "implicit_le", "explicit_be"])
@pytest.mark.parametrize("signed,value,limit", [(False, 2096, None), (True, 3000, 3100), (True, -2000, None)])
def test_pixel_padding_becomes_air_on_every_header_path(tmp_path, syntax, signed, value, limit):
    path, hu, outside = _padded(signed, value, limit, syntax, tmp_path / "p.dcm")
    expect = np.where(outside, -1024, np.maximum(hu, -1024)).astype(np.float32)
    for fn in (scan, scan_with_pydicom):
        h = fn(str(path))
        assert h.padding == ((value, value) if limit is None else (min(value, limit), max(value, limit)))
        np.testing.assert_array_equal(read_hu(h)[0], expect)


@pytest.mark.parametrize("size", [N, N // 2, 20])  # no resize, exact box means, the torch path
def test_ingest_stores_padding_as_air(tmp_path, size):
    vol = phantom(3, N, N, seed=5)
    paths = write_series(tmp_path / "src" / "s", vol)
    yy, xx = np.mgrid[0:N, 0:N]
    ring = (yy < 8) | (yy >= N - 8)  # whole 2x2 blocks: the box path's means there are padding only
    for p in paths:
        ds = pydicom.dcmread(p)
        st = ds.pixel_array.copy()
        st[ring] = 2096  # +1072 HU if read as tissue
        ds.PixelData = st.tobytes()
        ds.add_new(0x00280120, "US", 2096)  # PixelPaddingValue: +1072 HU if read as tissue
        ds.save_as(p, enforce_file_format=True)
    assert _ingest(tmp_path / "src", tmp_path / "st", size=size).series == 1
    arr = _stored(tmp_path / "st")[0]
    assert arr.max() < 1000  # no bone-like ring anywhere
    if size == N:
        np.testing.assert_array_equal(arr, np.where(ring, -1024, vol))
    elif size == N // 2:
        assert (arr[:, :4] == -1024).all() and (arr[:, -4:] == -1024).all()


# ---------------------------------------------------------------- c. values that are not plain HU

def test_monochrome1_rescale_type_and_modality_lut_are_rejected(tmp_path):
    hu = phantom(1, N, N)[0]
    ds = ct_dataset(hu)
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert "MONOCHROME1" in _both_reject(save(ds, tmp_path / "m1.dcm"), "not_hu").detail
    ds = ct_dataset(hu)
    ds.RescaleType = "US"
    assert "RescaleType is US" in _both_reject(save(ds, tmp_path / "rt.dcm"), "not_hu").detail
    ds = ct_dataset(hu)
    ds.RescaleType = "HU"  # the explicit HU is fine
    np.testing.assert_array_equal(read_hu(scan(save(ds, tmp_path / "hu.dcm")))[0], hu.astype(np.float32))
    ds = ct_dataset(hu)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.ModalityLUTType = "HU"
    lut.add_new(0x00283006, "US", list(range(4096)))  # LUTData
    ds.ModalityLUTSequence = Sequence([lut])
    assert "Modality LUT" in _both_reject(save(ds, tmp_path / "lut.dcm"), "not_hu").detail
    ds = ct_dataset(hu)  # the same rule inside an enhanced CT's functional groups
    tr = Dataset()
    tr.RescaleSlope, tr.RescaleIntercept, tr.RescaleType = 1, -1024, "US"
    fg = Dataset()
    fg.PixelValueTransformationSequence = Sequence([tr])
    ds.SharedFunctionalGroupsSequence = Sequence([fg])
    _both_reject(save(ds, tmp_path / "fg.dcm"), "not_hu")
    # and ingest records them rather than storing shifted values
    s = _ingest(tmp_path, tmp_path / "st")
    assert s.errors_by_reason == {"not_hu": 4} and s.series == 1 and s.slices == 1


# ---------------------------------------------------------------- d. deflated

def test_deflated_transfer_syntax_is_read(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    vol = phantom(3, N, N, seed=7)
    paths = write_series(tmp_path / "src" / "s", vol)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(p, enforce_file_format=True)
    h = scan(paths[0])
    assert h.transfer_syntax == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(read_hu(h)[0], vol[0].astype(np.float32))
    s = _ingest(tmp_path / "src", tmp_path / "st")
    assert s.errors_by_reason == {} and s.slices == 3
    np.testing.assert_array_equal(_stored(tmp_path / "st")[0], vol)


# ---------------------------------------------------------------- e. two images at one z

def _same_z_folder(root, second_differs: bool):
    vol = phantom(4, N, N, seed=8)
    study, series = generate_uid(), generate_uid()
    write_series(root / "s", vol, study_uid=study, series_uid=series, spacing_z=2.0, z0=0.0)
    other = vol[2] + (50 if second_differs else 0)  # same position as slice 2, another SOP UID
    save(ct_dataset(other, study_uid=study, series_uid=series, position=(-120.0, -120.0, 4.0), instance_number=9),
         root / "s" / "again.dcm", "implicit_le")  # another encoding of the same image
    return vol


def test_identical_image_at_one_position_is_kept_once(tmp_path):
    vol = _same_z_folder(tmp_path / "src", second_differs=False)
    s = _ingest(tmp_path / "src", tmp_path / "st")
    assert s.slices == 4 and s.errors_by_reason == {"duplicate_image": 1}
    np.testing.assert_array_equal(_stored(tmp_path / "st")[0], vol)
    with connect(store_paths(tmp_path / "st").db, read_only=True) as con:
        assert con.execute("SELECT slice_spacing_mm FROM series").fetchone()[0] == 2.0
        assert con.execute("SELECT list(z_mm ORDER BY idx) FROM slices").fetchone()[0] == [0.0, 2.0, 4.0, 6.0]


def test_different_images_at_one_position_are_a_conflict_and_retried(tmp_path):
    vol = _same_z_folder(tmp_path / "src", second_differs=True)
    store = tmp_path / "st"
    s = _ingest(store.parent / "src", store)
    assert s.series == 0 and s.errors_by_reason == {"position_conflict": 5}
    assert _statuses(store) == {"retry": 5}
    (tmp_path / "src" / "s" / "again.dcm").unlink()  # the user removes the wrong file and runs again
    again = _ingest(tmp_path / "src", store)
    assert again.files_new == 4 and again.slices == 4 and again.errors == 0
    np.testing.assert_array_equal(_stored(store)[0], vol)
    assert _errors(store) == {} and _statuses(store) == {"ok": 4}


# ---------------------------------------------------------------- f. in-plane rotation

@pytest.mark.parametrize("syntax", ["explicit_le", "implicit_le"])
def test_in_plane_rotated_axial_is_stored_in_the_standard_view(tmp_path, syntax):
    """IOP (0,1,0,-1,0,0): the column index runs along +y and the row index along -x; the standard
    view V is then the stored image transposed and flipped, X = V[:, ::-1].T (non-square on purpose)."""
    vol = phantom(3, N, N // 2, seed=9)  # standard view: N rows (y) x N/2 columns (x)
    rotated = np.ascontiguousarray(np.swapaxes(vol[:, :, ::-1], 1, 2))  # (3, N/2, N)
    write_series(tmp_path / "a" / "std", vol, patient_id="P1", syntax=syntax)
    write_series(tmp_path / "b" / "rot", rotated, orientation=(0, 1, 0, -1, 0, 0), patient_id="P2",
                 pixel_spacing=(0.7, 0.7), syntax=syntax)
    assert _ingest(tmp_path / "a", tmp_path / "sa").slices == 3
    assert _ingest(tmp_path / "b", tmp_path / "sb").slices == 3
    std, rot = _stored(tmp_path / "sa")[0], _stored(tmp_path / "sb")[0]
    np.testing.assert_array_equal(rot, std)
    assert (std[:, :, :N // 4] == -1024).all()  # the narrow image sits centred, padded with air


def test_obliquely_rotated_axial_is_rejected(tmp_path):
    c, s_ = np.cos(np.deg2rad(45)), np.sin(np.deg2rad(45))
    write_series(tmp_path / "src" / "s", phantom(2, N, N), orientation=(c, s_, 0, -s_, c, 0))
    s = _ingest(tmp_path / "src", tmp_path / "st")
    assert s.series == 0 and s.errors_by_reason == {"unsupported_geometry": 2}


# ---------------------------------------------------------------- g. geometry changing within a series

@pytest.mark.parametrize("change", ["spacing", "orientation"])
def test_per_slice_geometry_change_rejects_the_series(tmp_path, change):
    vol = phantom(4, N, N, seed=10)
    paths = write_series(tmp_path / "src" / "s", vol)
    ds = pydicom.dcmread(paths[3])
    if change == "spacing":
        ds.PixelSpacing = [0.9, 0.9]
    else:
        t = np.deg2rad(10)
        ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(t)), float(-np.sin(t))]
    ds.save_as(paths[3], enforce_file_format=True)
    s = _ingest(tmp_path / "src", tmp_path / "st")
    assert s.series == 0 and s.errors_by_reason == {"inconsistent_geometry": 4}
    with connect(store_paths(tmp_path / "st").db, read_only=True) as con:
        assert "1 of 4 slices differ" in con.execute("SELECT any_value(detail) FROM ingest_errors").fetchone()[0]


# ---------------------------------------------------------------- h. multi-frame frames without a position

def test_multiframe_frame_without_position_is_a_recorded_rejection(tmp_path):
    vol = phantom(4, N, N, seed=11)
    ds = enhanced_ct(vol)
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    path = save(ds, tmp_path / "src" / "e.dcm")
    e = _both_reject(path, "missing_position")
    assert "1 of 4 frames" in e.detail
    s = _ingest(tmp_path / "src", tmp_path / "st")
    assert s.series == 0 and s.errors_by_reason == {"missing_position": 1}
