"""DICOM reading: HU round trips across encodings, vendor oddities, and every rejection reason."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_fixtures import ct_dataset, enhanced_ct, phantom, save

from ctssl_core.data.dicom import DicomIssue, is_axial, parse_age, read_hu, scan


@pytest.fixture(scope="module")
def hu():
    return phantom(1, 48, 40, seed=3)[0]  # non-square on purpose


# JPEG-LS / JPEG lossless decoders are installed, but no encoder is, so no fixture can be written here.
@pytest.mark.parametrize("syntax", ["explicit_le", "implicit_le", "explicit_be", "rle", "jpeg2000"])
def test_hu_round_trip_every_encoding(tmp_path, hu, syntax):
    path = save(ct_dataset(hu), tmp_path / "x.dcm", syntax)
    h = scan(path)
    assert (h.rows, h.cols) == hu.shape
    np.testing.assert_array_equal(read_hu(h)[0], hu.astype(np.float32))
    # the fast native path must agree with pydicom's own decoder
    ref = pydicom.dcmread(path).pixel_array.astype(np.float32) - 1024
    np.testing.assert_array_equal(read_hu(h)[0], np.maximum(ref, -1024))
    assert (h.pixel_offset is not None) == (syntax in ("explicit_le", "implicit_le", "explicit_be"))


def test_signed_pixels_and_odd_rescale(tmp_path, hu):
    ds = ct_dataset(hu - (hu % 2), slope=2.0, intercept=-1000.0, signed=True)
    h = scan(save(ds, tmp_path / "s.dcm"))
    np.testing.assert_array_equal(read_hu(h)[0], (hu - (hu % 2)).astype(np.float32))


def test_missing_rescale_tags_default_and_are_noted(tmp_path, hu):
    stored = np.clip(hu + 1024, 0, None)
    ds = ct_dataset(stored.astype(np.int16), slope=None, intercept=None)  # stored values == hu + 1024, no tags
    h = scan(save(ds, tmp_path / "m.dcm"))
    assert h.slopes == [1.0] and h.intercepts == [0.0]
    assert any("RescaleSlope" in n for n in h.notes) and any("RescaleIntercept" in n for n in h.notes)
    np.testing.assert_array_equal(read_hu(h)[0], np.maximum(stored, -1024).astype(np.float32))


def test_zero_slope_treated_as_one(tmp_path, hu):
    ds = ct_dataset(hu)
    ds.RescaleSlope = 0
    h = scan(save(ds, tmp_path / "z.dcm"))
    assert h.slopes == [1.0]
    np.testing.assert_array_equal(read_hu(h)[0], hu.astype(np.float32))


def test_negative_and_non_square_spacing(tmp_path, hu):
    h = scan(save(ct_dataset(hu, pixel_spacing=(-0.7, 0.9)), tmp_path / "n.dcm"))
    assert h.spacing == (0.7, 0.9)
    assert any("not positive" in n for n in h.notes)


def test_gantry_tilt_recorded_and_still_axial(tmp_path, hu):
    t = np.deg2rad(15)
    ds = ct_dataset(hu, gantry_tilt=15.0, orientation=(1, 0, 0, 0, np.cos(t), -np.sin(t)))
    h = scan(save(ds, tmp_path / "t.dcm"))
    assert h.gantry_tilt == 15.0 and is_axial(h)


def test_coronal_is_not_axial(tmp_path, hu):
    h = scan(save(ct_dataset(hu, orientation=(1, 0, 0, 0, 0, -1)), tmp_path / "c.dcm"))
    assert not is_axial(h)


def test_demographic_tags(tmp_path, hu):
    h = scan(save(ct_dataset(hu, age="018M", sex="M", ethnic="GroupB"), tmp_path / "d.dcm"))
    assert h.age == pytest.approx(1.5) and h.sex == "M" and h.race == "GroupB"
    assert parse_age("063Y") == 63 and parse_age("14D") == pytest.approx(14 / 365.25) and parse_age("x") is None


def test_enhanced_multiframe(tmp_path):
    vol = phantom(5, 16, 16, seed=1)
    path = save(enhanced_ct(vol, spacing_z=2.0, z0=10.0), tmp_path / "e.dcm")
    h = scan(path)
    assert h.n_frames == 5
    assert [p[2] for p in h.positions] == [10.0, 12.0, 14.0, 16.0, 18.0]
    assert h.spacing == (0.8, 0.8) and h.orientation == (1, 0, 0, 0, 1, 0)
    np.testing.assert_array_equal(read_hu(h), vol.astype(np.float32))


def _issue(fn) -> DicomIssue:
    with pytest.raises(DicomIssue) as e:
        fn()
    return e.value


def test_rejections_have_reason_and_advice(tmp_path, hu):
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    assert _issue(lambda: scan(txt)).reason == "not_dicom"

    good = save(ct_dataset(hu), tmp_path / "g.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 100])
    assert _issue(lambda: read_hu(scan(cut))).reason == "truncated"

    ds = ct_dataset(hu)
    del ds.PixelData
    assert _issue(lambda: scan(save(ds, tmp_path / "np.dcm"))).reason == "no_pixels"
    assert _issue(lambda: scan(save(ct_dataset(hu, modality="MR"), tmp_path / "mr.dcm"))).reason == "wrong_modality"
    e = _issue(lambda: scan(save(ct_dataset(hu, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), tmp_path / "l.dcm")))
    assert e.reason == "localizer" and "skipped on purpose" in e.detail


def test_compressed_without_decoder_is_reported(tmp_path, hu):
    path = save(ct_dataset(hu), tmp_path / "r.dcm", "rle")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: compressed, no decoder
    ds.save_as(path, enforce_file_format=True)
    e = _issue(lambda: read_hu(scan(path)))
    assert e.reason == "no_decoder" and "pip install" in e.detail
