"""DICOM reading: HU round trips across encodings, vendor oddities, and every rejection reason."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_fixtures import ct_dataset, enhanced_ct, phantom, save

from ctssl_core.data.dicom import DicomIssue, is_axial, parse_age, read_hu, scan, scan_with_pydicom


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


@pytest.mark.parametrize("missing", [("RescaleSlope", "RescaleIntercept"), ("RescaleIntercept",), ("RescaleSlope",)])
def test_missing_rescale_tags_are_rejected_not_assumed(tmp_path, hu, missing):
    """Assuming intercept 0 would shift a -1024-intercept series by +1024 HU silently (issue 13 item 12)."""
    from ctssl_core.data.dicom import scan_with_pydicom

    ds = ct_dataset(hu)
    for name in missing:
        delattr(ds, name)
    path = save(ds, tmp_path / "m.dcm")
    for fn in (scan, scan_with_pydicom):
        e = _issue(lambda: fn(str(path)))
        assert e.reason == "no_rescale" and all(n in e.detail for n in missing) and "re-export" in e.detail


def test_zero_slope_is_rejected_not_guessed(tmp_path, hu):
    from ctssl_core.data.dicom import scan_with_pydicom

    ds = ct_dataset(hu)
    ds.RescaleSlope = 0
    path = save(ds, tmp_path / "z.dcm")
    for fn in (scan, scan_with_pydicom):
        e = _issue(lambda: fn(str(path)))
        assert e.reason == "no_rescale" and "RescaleSlope is 0" in e.detail


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


# ---- the byte walker (one read of the file's head) against pydicom's parse, on every fixture kind
# (test_dicom_differential.py holds both readers to pydicom's HU and geometry, damaged files included)


def _outcome(fn, path):
    """A SliceHeader, or the DicomIssue reason it raised."""
    try:
        return fn(path)
    except DicomIssue as e:
        return ("issue", e.reason)


def _fixture_kinds(tmp_path, hu) -> dict:
    """One file of every fixture kind the ingest tests use, good and bad."""
    from pydicom.uid import ExplicitVRLittleEndian

    out = {}
    for syntax in ("explicit_le", "implicit_le", "explicit_be", "rle", "jpeg2000"):
        out[syntax] = save(ct_dataset(hu), tmp_path / f"{syntax}.dcm", syntax)
    out["signed_slope2"] = save(ct_dataset(hu - (hu % 2), slope=2.0, intercept=-1000.0, signed=True), tmp_path / "s.dcm")
    out["no_rescale"] = save(ct_dataset(np.clip(hu + 1024, 0, None).astype(np.int16), slope=None, intercept=None),
                             tmp_path / "m.dcm")
    zero = ct_dataset(hu)
    zero.RescaleSlope = 0
    out["zero_slope"] = save(zero, tmp_path / "z.dcm")
    out["neg_spacing"] = save(ct_dataset(hu, pixel_spacing=(-0.7, 0.9)), tmp_path / "n.dcm")
    t = np.deg2rad(15)
    out["tilt"] = save(ct_dataset(hu, gantry_tilt=15.0, orientation=(1, 0, 0, 0, np.cos(t), -np.sin(t))),
                       tmp_path / "t.dcm")
    out["coronal"] = save(ct_dataset(hu, orientation=(1, 0, 0, 0, 0, -1)), tmp_path / "c.dcm")
    out["no_position"] = save(ct_dataset(hu, position=None, instance_number=None), tmp_path / "np_.dcm")
    out["demographics"] = save(ct_dataset(hu, age="018M", sex="M", ethnic="GroupB"), tmp_path / "d.dcm")
    out["latin1_name"] = save(ct_dataset(hu, ethnic="Gr\xfcn"), tmp_path / "l1.dcm")
    out["multiframe"] = save(enhanced_ct(phantom(3, 16, 16, seed=1)), tmp_path / "e.dcm")
    big = ct_dataset(hu)  # a private blob bigger than the first read: the walker must re-read past it
    big.add_new(0x00091010, "OB", b"\x01" * 40_000)
    out["big_private"] = save(big, tmp_path / "big.dcm")
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    out["not_dicom"] = txt
    raw = out["explicit_le"].read_bytes()
    for name, cut in (("cut_pixels", len(raw) - 100), ("cut_header", 400), ("cut_preamble", 100)):
        (tmp_path / name).write_bytes(raw[:cut])
        out[name] = tmp_path / name
    nopix = ct_dataset(hu)
    del nopix.PixelData
    out["no_pixels"] = save(nopix, tmp_path / "nopix.dcm")
    out["mr"] = save(ct_dataset(hu, modality="MR"), tmp_path / "mr.dcm")
    out["localizer"] = save(ct_dataset(hu, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), tmp_path / "loc.dcm")
    mpeg = save(ct_dataset(hu), tmp_path / "mpeg.dcm", "rle")
    ds = pydicom.dcmread(mpeg)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.save_as(mpeg, enforce_file_format=True)
    out["no_decoder"] = mpeg
    no_meta = ct_dataset(hu)
    no_meta.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    no_meta.save_as(tmp_path / "nopreamble.dcm", enforce_file_format=False)
    out["no_preamble"] = tmp_path / "nopreamble.dcm"
    return out


def test_byte_walker_matches_pydicom_on_every_fixture_kind(tmp_path, hu):
    from ctssl_core.data.dicom import scan_with_pydicom

    kinds = _fixture_kinds(tmp_path, hu)
    for name, path in kinds.items():
        new = _outcome(scan, str(path))
        assert new == _outcome(scan_with_pydicom, str(path)), name  # pydicom's parse is the reference
    # the kinds that must take the fast path really do, and the bad ones keep their reasons
    assert scan(kinds["explicit_be"]).pixel_offset is not None and scan(kinds["big_private"]).pixel_offset is not None
    expected = {"not_dicom": "not_dicom", "cut_pixels": "truncated", "no_pixels": "no_pixels", "mr": "wrong_modality",
                "localizer": "localizer", "no_decoder": "no_decoder"}
    for name, reason in expected.items():
        assert _outcome(scan, str(kinds[name])) == ("issue", reason), name


def test_read_stored_reports_a_vanished_file(tmp_path, hu):
    from ctssl_core.data.dicom import read_stored

    path = save(ct_dataset(hu), tmp_path / "x.dcm")
    h = scan(path)
    path.unlink()
    assert _issue(lambda: read_stored(h)).reason == "truncated"


def test_explicit_meta_with_an_implicit_body_is_read(tmp_path):
    """Some exporters declare explicit VR in the meta but write the dataset implicit; pydicom reads it
    (with a warning) and so must the pixel locator (it used to report 'PixelData holds 0 bytes')."""
    import warnings

    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    from ctssl_core.data.dicom import read_hu, scan

    hu = phantom(1, 16, 16)[0]
    ds = ct_dataset(hu)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    meta.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    plain = pydicom.Dataset()
    plain.update(ds)
    write_dataset(body, plain)
    path = tmp_path / "mismatch.dcm"
    path.write_bytes(meta.getvalue() + body.getvalue())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        h = scan(path)
    assert np.array_equal(read_hu(h)[0].astype(np.int32), hu.astype(np.int32))          # (1, H, W): one frame
