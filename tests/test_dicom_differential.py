"""Differential test of DICOM reading (issue 13 item 12): ctssl's reading (the byte walker in ``scan``,
its pydicom fallback, ``read_hu``) against pydicom's own (``dcmread``, ``pixel_array``,
``apply_modality_lut``), over every fixture kind, corrupted copies and the CT files bundled with pydicom.

For each file ctssl either rejects it with a recorded reason, or gives the same HU (to float32
rounding) and the same geometry as pydicom. A file pydicom cannot decode is never accepted.
"""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from dicom_fixtures import ct_dataset, phantom, save, write_series
from pydicom.pixels import apply_modality_lut

from ctssl_core.data.dicom import HU_MAX, HU_MIN, REASONS, DicomIssue, read_hu, scan, scan_with_pydicom


def _item(ds, *names):
    """The first item of a nested sequence path, or None."""
    for n in names:
        seq = ds.get(n, None) if ds is not None else None
        ds = seq[0] if seq else None
    return ds


def reference(path) -> dict:
    """HU (F, H, W) float32 and geometry as pydicom reads them; raises whatever pydicom raises."""
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:  # no preamble: pydicom reads it when told to (as ctssl does)
        ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):  # meta without a syntax: the encoding pydicom detected
        implicit, little = ds.original_encoding
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = {(True, True): pydicom.uid.ImplicitVRLittleEndian,
                                          (False, True): pydicom.uid.ExplicitVRLittleEndian,
                                          (False, False): pydicom.uid.ExplicitVRBigEndian}[(implicit, little)]
    arr = np.asarray(ds.pixel_array)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = arr.reshape(frames, int(ds.Rows), int(ds.Columns))
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per = ds.get("PerFrameFunctionalGroupsSequence", None) or [None] * frames
    hu, positions = [], []
    for k in range(frames):
        src = ds
        pvt = _item(per[k], "PixelValueTransformationSequence") or _item(shared, "PixelValueTransformationSequence")
        if pvt is not None and "RescaleSlope" not in ds:
            src = pvt
        f = apply_modality_lut(arr[k], src).astype(np.float64)
        pad = ds.get("PixelPaddingValue", None)
        if pad is not None:
            lim = ds.get("PixelPaddingRangeLimit", pad)
            lo, hi = min(pad, lim), max(pad, lim)
            f[(arr[k] >= lo) & (arr[k] <= hi)] = HU_MIN
        hu.append(np.clip(f, HU_MIN, HU_MAX))
        pp = _item(per[k], "PlanePositionSequence")
        pos = pp.ImagePositionPatient if pp is not None else ds.get("ImagePositionPatient", None)
        positions.append(tuple(float(v) for v in pos) if pos is not None else None)
    iop = ds.get("ImageOrientationPatient", None)
    if iop is None:
        po = _item(shared, "PlaneOrientationSequence") or _item(per[0], "PlaneOrientationSequence")
        iop = po.ImageOrientationPatient if po is not None else None
    sp = ds.get("PixelSpacing", None)
    if sp is None:
        pm = _item(shared, "PixelMeasuresSequence") or _item(per[0], "PixelMeasuresSequence")
        sp = pm.PixelSpacing if pm is not None else None
    return dict(
        hu=np.stack(hu).astype(np.float32),
        orientation=tuple(float(v) for v in iop) if iop is not None else None,
        spacing=tuple(abs(float(v)) for v in sp) if sp is not None else None,
        positions=positions if any(p is not None for p in positions) else None,
    )


def ctssl(path, header=scan) -> dict | str:
    """The same from ctssl, or the reason it rejects the file."""
    try:
        h = header(str(path))
        return dict(hu=read_hu(h), orientation=h.orientation, spacing=h.spacing, positions=h.positions)
    except DicomIssue as e:
        assert e.reason in REASONS and len(e.detail) > 40  # recorded with a sentence that says what to do
        return e.reason


def _assert_same(path, ref: dict, *got: dict) -> None:
    """Both readers' HU and geometry equal pydicom's (no silent difference)."""
    for g in got:
        assert g["hu"].shape == ref["hu"].shape, path
        np.testing.assert_allclose(g["hu"], ref["hu"], rtol=0, atol=1e-3, err_msg=str(path))
        assert g["orientation"] == ref["orientation"] or np.allclose(g["orientation"], ref["orientation"])
        assert g["spacing"] == ref["spacing"], path
        assert g["positions"] == ref["positions"], path


def check(path) -> str:
    """'accepted' (same HU and geometry as pydicom) or the rejection reason; fails on any silent difference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        walker, slow = ctssl(path), ctssl(path, scan_with_pydicom)
        # both accept or both reject (on damaged files the first problem each path meets may differ)
        assert isinstance(walker, str) == isinstance(slow, str), (path, walker if isinstance(walker, str) else slow)
        if isinstance(walker, str):
            return walker
        try:
            ref = reference(path)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{path}: ctssl accepted a file pydicom cannot read ({type(e).__name__}: {e})")
    if ref["spacing"] is not None and 0.0 in ref["spacing"]:
        ref["spacing"] = None      # a zero spacing is read as unknown (noted in the catalog), by design
    _assert_same(path, ref, walker, slow)
    return "accepted"


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """Every fixture kind of the ingest tests (test_dicom's list) plus the HU oddities of item 12."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from test_dicom import _fixture_kinds

    tmp = tmp_path_factory.mktemp("kinds")
    hu = phantom(1, 48, 40, seed=3)[0]  # non-square; big enough for the JPEG 2000 encoder
    out = dict(_fixture_kinds(tmp, hu))
    ds = ct_dataset(hu)
    ds.add_new(0x00280120, "US", 2096)  # PixelPaddingValue
    st = np.frombuffer(ds.PixelData, "<u2").copy().reshape(hu.shape)
    st[:4] = 2096
    ds.PixelData = st.tobytes()
    out["padding"] = save(ds, tmp / "pad.dcm")
    ds = ct_dataset(hu)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp / "deflated.dcm", enforce_file_format=True)
    out["deflated"] = tmp / "deflated.dcm"
    ds = ct_dataset(hu)
    ds.PhotometricInterpretation = "MONOCHROME1"
    out["monochrome1"] = save(ds, tmp / "m1.dcm")
    ds = ct_dataset(hu)
    ds.RescaleType = "US"
    out["rescale_type"] = save(ds, tmp / "rt.dcm")
    ds = ct_dataset(hu)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.add_new(0x00283006, "US", list(range(4096)))
    ds.ModalityLUTSequence = Sequence([lut])
    out["modality_lut"] = save(ds, tmp / "lut.dcm")
    out["rotated"] = save(ct_dataset(hu, orientation=(0, 1, 0, -1, 0, 0)), tmp / "rot.dcm")
    out["no_intercept"] = save(ct_dataset(hu, intercept=None), tmp / "ni.dcm")
    out["slope_half"] = save(ct_dataset(hu - hu % 2, slope=0.5, intercept=-1000.0, signed=True), tmp / "half.dcm")
    return out


def test_every_fixture_kind_reads_like_pydicom_or_is_rejected(kinds):
    outcome = {name: check(path) for name, path in kinds.items()}
    accepted = {n for n, o in outcome.items() if o == "accepted"}
    must_read = {"explicit_le", "implicit_le", "explicit_be", "rle", "jpeg2000", "signed_slope2", "neg_spacing",
                 "tilt", "coronal", "demographics", "multiframe", "big_private", "padding", "deflated", "rotated",
                 "slope_half", "latin1_name", "no_position", "no_preamble"}
    assert must_read <= accepted, must_read - accepted
    assert {n: outcome[n] for n in ("no_rescale", "zero_slope", "no_intercept", "monochrome1", "rescale_type",
                                    "modality_lut")} == {
        "no_rescale": "no_rescale", "zero_slope": "no_rescale", "no_intercept": "no_rescale",
        "monochrome1": "not_hu", "rescale_type": "not_hu", "modality_lut": "not_hu"}


DAMAGE_SEEDS = range(11, 41)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupted_copies_read_like_pydicom_or_are_rejected(tmp_path, monkeypatch):
    """3,600 damaged copies (truncated, header bytes flipped, tags dropped) of three syntaxes: the byte walker
    and the pydicom path agree on every one, every file ctssl accepts is one pydicom reads, with pydicom's HU
    and geometry, and every other file is rejected with a recorded reason (``check``). Until 2026-12-04 the
    two readers disagreed on 20 of the first 1,200 (a damaged VR byte that pydicom reads by its own rule, a
    PixelRepresentation of 189, a leading NUL in RescaleIntercept read as +1024): measured over 60,000
    damaged copies (seeds 11-510) before this test was made strict, none is left. The UIDs are fixed so
    that each seed damages the same bytes on every run (with random UIDs of varying length every flip
    moved, and the test passed or failed by chance)."""
    import collections

    import dicom_fixtures
    from test_fuzz_ingest import corrupt

    counter = iter(range(10**6))
    monkeypatch.setattr(dicom_fixtures, "generate_uid", lambda: f"1.2.826.0.1.3680043.8.498.{next(counter):012d}")
    outcome: collections.Counter = collections.Counter()
    for seed in DAMAGE_SEEDS:
        rng = np.random.default_rng(seed)
        for syntax in ("explicit_le", "implicit_le", "explicit_be"):
            good = write_series(tmp_path / f"{seed}" / syntax, phantom(3, 24, 24), syntax=syntax)
            for i in range(40):
                p = tmp_path / f"{seed}" / syntax / f"c{i:02d}"
                corrupt(good[i % 3].read_bytes(), p, rng)
                outcome[check(p)] += 1
    assert outcome["accepted"] >= 500 and len(outcome) >= 6, outcome   # both sides of the test were exercised
    assert set(outcome) <= set(REASONS) | {"accepted"}, outcome


def _damaged(tmp_path, edit) -> str:
    """A fixture slice (the production-like writer) with ``edit(bytes) -> bytes`` applied to its bytes."""
    good = write_series(tmp_path / "s", phantom(2, 24, 24, seed=5))[0].read_bytes()
    out = tmp_path / "damaged.dcm"
    out.write_bytes(edit(good))
    return str(out)


def _sub(old: bytes, new: bytes):
    def edit(b: bytes) -> bytes:
        assert b.count(old) == 1, old
        return b.replace(old, new)
    return edit


_TAG = {"RescaleIntercept": b"(\x00R\x10", "PixelRepresentation": b"(\x00\x03\x01", "BitsStored": b"(\x00\x01\x01",
        "SamplesPerPixel": b"(\x00\x02\x00", "BitsAllocated": b"(\x00\x00\x01", "ImageType": b"\x08\x00\x08\x00",
        "Rows": b"(\x00\x10\x00", "ImplementationClassUID": b"\x02\x00\x12\x00"}


@pytest.mark.parametrize("name, edit, message", [
    # each was accepted by the walker before 2026-12-04 although pydicom cannot give this file's HU
    ("a NUL before the intercept's sign (read as +1024)", _sub(b"DS\x08\x00-1024.0", b"DS\x08\x00\x001024.0"),
     "RescaleIntercept is present but is not a number"),
    ("the intercept's VR damaged ('D\\x10')", _sub(_TAG["RescaleIntercept"] + b"DS", _TAG["RescaleIntercept"] + b"D\x10"),
     "RescaleIntercept's value representation is D\\\\x10"),
    ("the intercept written as LO", _sub(_TAG["RescaleIntercept"] + b"DS", _TAG["RescaleIntercept"] + b"LO"),
     "RescaleIntercept is written as LO, not DS"),
    ("PixelRepresentation 189", _sub(_TAG["PixelRepresentation"] + b"US\x02\x00\x00\x00",
                                     _TAG["PixelRepresentation"] + b"US\x02\x00\xbd\x00"), "PixelRepresentation is 189"),
    ("BitsStored above BitsAllocated", _sub(_TAG["BitsStored"] + b"US\x02\x00\x10\x00",
                                            _TAG["BitsStored"] + b"US\x02\x00\x10\xda"), "BitsStored is 55824"),
    ("BitsAllocated 0 (was read as 16)", _sub(_TAG["BitsAllocated"] + b"US\x02\x00\x10\x00",
                                              _TAG["BitsAllocated"] + b"US\x02\x00\x00\x00"), "BitsAllocated=0"),
    ("SamplesPerPixel missing (tag number damaged)", _sub(_TAG["SamplesPerPixel"], b"(\x00\x02\x80"),
     "SamplesPerPixel missing"),
    ("ImageType's tag turned into NumberOfFrames", _sub(_TAG["ImageType"], b"(\x00\x08\x00"),
     "NumberOfFrames is .* not a count of frames"),
    ("Rows halved: the pixel data holds two frames", _sub(_TAG["Rows"] + b"US\x02\x00\x18\x00",
                                                           _TAG["Rows"] + b"US\x02\x00\x0c\x00"), "2 frames"),
])
def test_damage_the_walker_used_to_read_is_rejected_by_both_readers(tmp_path, name, edit, message):
    """Each damage here made the byte walker (or ``_Raw`` on pydicom's elements) read a number pydicom cannot
    read or reads otherwise: rejected now, the same way on both paths, with the tag named."""
    path = _damaged(tmp_path, edit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DicomIssue, match=message) as fast:
            scan(path)
        with pytest.raises(DicomIssue, match=message) as slow:
            scan_with_pydicom(path)
        with pytest.raises(Exception):   # noqa: B017 - whatever pydicom raises: it cannot give this file's HU
            reference(path)
    assert fast.value.reason == slow.value.reason


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_damaged_vr_in_the_meta_is_read_by_pydicoms_rule(tmp_path):
    """A meta element whose VR bytes are no VR ('\\x9eI'): pydicom reads it as implicit VR, whose 4-byte length
    swallows the whole body, so the file has no pixels; the walker used to skip 2 bytes and read the image."""
    path = _damaged(tmp_path, _sub(_TAG["ImplementationClassUID"] + b"UI", _TAG["ImplementationClassUID"] + b"\x9eI"))
    assert check(path) == "no_pixels"


@pytest.mark.parametrize("tag, value", [("ImageOrientationPatient", "1Q0\\0\\0\\0\\1\\0"),
                                        ("ImageOrientationPatient", "1\\0\\0\\0\\1"),
                                        ("ImagePositionPatient", "-120\\x\\-100"),
                                        ("PixelSpacing", "0.7\\0.7\\0.7")])
def test_a_damaged_geometry_tag_is_rejected_not_taken_as_absent(tmp_path, tag, value):
    """An orientation, position or spacing that is present but not its count of numbers used to read as absent,
    and the slice was then oriented, placed or scaled by assumption (seen: orientation '1Q0...'). Both readers
    reject it now, naming the tag; an absent tag is still read as absent."""
    good = write_series(tmp_path / "s", phantom(2, 24, 24))
    ds = pydicom.dcmread(good[0])
    ds[tag]._value = value
    bad = tmp_path / "bad.dcm"
    with pydicom.config.disable_value_validation():
        ds.save_as(bad, enforce_file_format=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DicomIssue, match=f"{tag} is present but does not hold") as fast:
            scan(str(bad))
        with pytest.raises(DicomIssue, match=tag) as slow:
            scan_with_pydicom(str(bad))
    assert fast.value.reason == slow.value.reason == "bad_header"
    del ds[tag]
    ds.save_as(tmp_path / "absent.dcm", enforce_file_format=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = scan(str(tmp_path / "absent.dcm"))
    assert getattr(h, {"ImageOrientationPatient": "orientation", "ImagePositionPatient": "positions",
                       "PixelSpacing": "spacing"}[tag]) is None


def _bundled_ct() -> list[str]:
    from pydicom.data import get_testdata_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = get_testdata_files("*")
        out = []
        for f in files:
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - not DICOM (the package ships other test data too)
                continue
            if str(ds.get("Modality", "")) == "CT":
                out.append(f)
    return sorted(out)


def test_ct_files_bundled_with_pydicom_read_like_pydicom_or_are_rejected():
    files = _bundled_ct()
    assert any(f.endswith("CT_small.dcm") for f in files)
    outcome = {f.rsplit("/", 1)[-1]: check(f) for f in files}
    assert outcome["CT_small.dcm"] == "accepted"
    assert sum(o == "accepted" for o in outcome.values()) >= 2, outcome


def _variant(tmp_path, name, change, syntax="explicit_le") -> str:
    """A fixture slice with ``change(dataset)`` applied (the fixture writer, then pydicom's own writer)."""
    ds = ct_dataset(phantom(1, 24, 24, seed=3)[0], sop_uid="1.2.3.4.1", study_uid="1.2.3.5", series_uid="1.2.3.6")
    change(ds)
    return str(save(ds, tmp_path / f"{name}.dcm", syntax))


def _retyped(tag: int, vr: str, value):
    def change(ds):
        del ds[tag]
        ds.add_new(tag, vr, value)
    return change


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name, change", [
    # found by the review of 2026-12-03 (/tmp/review3, F1 and F6): valid forms pydicom reads, once rejected
    ("frames_0", lambda ds: ds.add_new(0x00280008, "IS", "0")),          # pydicom: one frame (with a warning)
    ("frames_1.0", lambda ds: ds.add_new(0x00280008, "IS", "1.0")),
    ("intercept_IS", _retyped(0x00281052, "IS", "-1024")),
    ("rows_SS", _retyped(0x00280010, "SS", 24)),
    ("pixel_representation_SS", _retyped(0x00280103, "SS", 0)),
])
def test_unusual_but_valid_forms_are_read_like_pydicom(tmp_path, name, change):
    assert check(_variant(tmp_path, name, change)) == "accepted"


def _bytes_sub(tmp_path, name, old: bytes, new: bytes, syntax="explicit_le", signed=False) -> str:
    kw = dict(slope=1.0, intercept=0.0, signed=True) if signed else {}
    ds = ct_dataset(phantom(1, 24, 24, seed=3)[0], sop_uid="1.2.3.4.1", study_uid="1.2.3.5", series_uid="1.2.3.6", **kw)
    raw = save(ds, tmp_path / f"{name}_base.dcm", syntax).read_bytes()
    assert raw.count(old) == 1, name
    out = tmp_path / f"{name}.dcm"
    out.write_bytes(raw.replace(old, new))
    return str(out)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name, old, new, syntax, reason", [
    # the review's F4 (a silent +1014 HU: '-1024.0' damaged to '-10\4.0' was read as -10), F5 (an empty
    # PixelRepresentation read as unsigned), F2 (PhotometricInterpretation's VR damaged), F3 (a tag damaged
    # into Float Pixel Data: the walker read on), F7 (a tag damaged into a sequence: a bare OSError escaped)
    ("backslash", b"-1024.0", b"-10\\4.0", "explicit_le", "bad_header"),
    ("empty_pixel_representation", b"(\x00\x03\x01US\x02\x00\x01\x00", b"(\x00\x03\x01US\x00\x00", "explicit_le",
     "bad_header"),
    ("photometric_vr", b"(\x00\x04\x00CS", b"(\x00\x04\x00US", "explicit_le", "bad_header"),
    ("float_pixel_tag", b"\x08\x00\x80\x00LO", b"\xe0\x7f\x08\x00LO", "explicit_le", "no_pixels"),
    ("sequence_tag", b"\x08\x00\x60\x00\x02\x00\x00\x00CT", b"\x00\x52\x29\x92\x02\x00\x00\x00CT", "implicit_le",
     "bad_header"),
])
def test_damage_found_by_the_review_is_rejected_by_both_readers(tmp_path, name, old, new, syntax, reason):
    path = _bytes_sub(tmp_path, name, old, new, syntax, signed=name == "empty_pixel_representation")
    assert check(path) == reason
