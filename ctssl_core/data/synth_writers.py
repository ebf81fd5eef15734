"""Writers for the synthetic cohort in the formats real datasets ship: DICOM CT, RSNA-PE csv, LIDC XML.

pydicom is imported inside the DICOM writer only, so the phantom and the sampler stay
importable on machines without it. Every identifier written here is synthetic.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Sequence
from xml.sax.saxutils import escape

import numpy as np

from .phantom import SITES, PatientParams, slice_z

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
LIDC_NS = "http://www.nih.gov"

# RSNA STR PE train.csv: image-level keys + label, then the exam-level columns repeated per row.
RSNA_EXAM_COLUMNS = (
    "negative_exam_for_pe", "qa_motion", "qa_contrast", "flow_artifact", "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1", "leftsided_pe", "chronic_pe", "true_filling_defect_not_pe", "rightsided_pe",
    "acute_and_chronic_pe", "central_pe", "indeterminate",
)
RSNA_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "pe_present_on_image") + RSNA_EXAM_COLUMNS


def make_uid(seed: int, *parts: Any) -> str:
    """Deterministic DICOM UID under the 2.25 (UUID-derived) root: same seed and parts -> same UID."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:15], "big"))


def _ds(v: float) -> str:
    """DICOM decimal string (at most 16 characters)."""
    s = f"{v:.6g}"
    return s if len(s) <= 16 else f"{v:.4e}"


def _encode(ds) -> bytes:
    """Explicit VR little endian bytes of a (sub)dataset."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _el(tag: int, vr: bytes, value: bytes, pad: bytes = b" ") -> bytes:
    """One explicit-VR little-endian element with a short (2-byte) length field."""
    if len(value) % 2:
        value += pad
    return (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little") + vr + len(value).to_bytes(2, "little") + value


def _file_meta_bytes(sop: str) -> bytes:
    """Preamble, 'DICM' and the group-2 file meta information for one CT slice."""
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    body = (
        b"\x02\x00\x01\x00OB\x00\x00" + (2).to_bytes(4, "little") + b"\x00\x01"
        + _el(0x00020002, b"UI", CT_IMAGE_STORAGE.encode(), b"\x00")
        + _el(0x00020003, b"UI", sop.encode(), b"\x00")
        + _el(0x00020010, b"UI", str(ExplicitVRLittleEndian).encode(), b"\x00")
        + _el(0x00020012, b"UI", str(PYDICOM_IMPLEMENTATION_UID).encode(), b"\x00")
        + _el(0x00020013, b"SH", b"CTSSL_SYNTH")
    )
    return b"\x00" * 128 + b"DICM" + _el(0x00020000, b"UL", len(body).to_bytes(4, "little")) + body


def write_series_dicom(
    p: PatientParams,
    hu: np.ndarray,
    series_dir: Path,
    uids: dict[str, Any],
    study_date: str,
    birth_date: str,
) -> list[Path]:
    """Write one CT series, one file per slice (CT Image Storage, explicit VR little endian, Part 10).

    Sites differ in pixel encoding as scanners do: unsigned with intercept -1024, or signed
    with intercept 0; both round-trip exactly to ``hu`` via pixel_array * slope + intercept.
    Why the byte templates: building and writing a pydicom Dataset per slice costs ~15 ms,
    which alone would blow the two-minute budget of the default cohort; the static elements
    are encoded once per series and only the per-slice elements are encoded per file.
    """
    from pydicom.dataset import Dataset

    site = SITES[p.site]
    series_dir.mkdir(parents=True, exist_ok=True)
    n = p.image_size
    ps = p.pixel_spacing_mm
    origin = -(n - 1) / 2.0 * ps
    zs = slice_z(p)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = "101500"
    ds.AccessionNumber = f"SYNACC{p.index + 1:05d}"
    ds.Modality = "CT"
    ds.Manufacturer = site.manufacturer
    ds.InstitutionName = site.institution
    ds.StudyDescription = "CT PULMONARY ANGIOGRAM (SYNTHETIC)"
    ds.SeriesDescription = f"CTPA {site.kernel} {p.slice_thickness_mm:g}mm"
    ds.ManufacturerModelName = site.model
    ds.PatientName = f"SYN^PATIENT{p.index + 1:04d}"
    ds.PatientID = p.patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = p.sex
    ds.PatientAge = f"{int(p.age):03d}Y"
    ds.EthnicGroup = p.race
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(p.slice_thickness_mm)
    ds.KVP = "120"
    ds.ConvolutionKernel = site.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = n
    ds.Columns = n
    ds.PixelSpacing = [_ds(ps), _ds(ps)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if site.signed_pixels else 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "0" if site.signed_pixels else "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    # per-slice elements, in tag order: SOPInstanceUID (0008,0018) | InstanceNumber (0020,0013),
    # ImagePositionPatient (0020,0032) | SliceLocation (0020,1041) | PixelData (7FE0,0010)
    cuts = [0x00080018, 0x00200013, 0x00201041, 0x7FE00010]
    tags = sorted(ds.keys())
    chunks = []
    lo = 0
    for cut in cuts + [0xFFFFFFFF]:
        part = Dataset()
        for tag in tags:
            if lo <= tag < cut:
                part.add(ds[tag])
        chunks.append(_encode(part))
        lo = cut
    pix_head = b"\xe0\x7f\x10\x00OW\x00\x00" + int(n * n * 2).to_bytes(4, "little")
    paths = []
    for k in range(p.n_slices):
        sop = uids["sops"][k]
        z = _ds(float(zs[k])).encode()
        a = _el(0x00080018, b"UI", sop.encode(), b"\x00")
        b = _el(0x00200013, b"IS", str(k + 1).encode()) + _el(0x00200032, b"DS", b"\\".join([_ds(origin).encode()] * 2 + [z]))
        c = _el(0x00201041, b"DS", z)
        if site.signed_pixels:
            pix = np.ascontiguousarray(hu[k], dtype="<i2").tobytes()
        else:
            pix = (hu[k].astype(np.int32) + 1024).astype("<u2").tobytes()
        data = b"".join([
            _file_meta_bytes(sop), chunks[0], a, chunks[1], b, chunks[2], c,
            chunks[3], pix_head, pix, chunks[4],
        ])
        path = series_dir / f"{k + 1:04d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _ordered_boundary(m: np.ndarray) -> list[tuple[int, int]]:
    """Boundary pixels (x=col, y=row) of a 2D mask ordered by angle around its centroid, closed.

    The edge pixels belong to the nodule (the pylidc convention): filling the polygon through
    them, boundary included, gives the mask back for the convex shapes we draw.
    """
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return []
    pad = np.pad(m, 1)
    interior = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:] & m
    by, bx = np.nonzero(m & ~interior)
    cy, cx = ys.mean(), xs.mean()
    order = np.argsort(np.arctan2(by - cy, bx - cx), kind="stable")
    pts = [(int(bx[i]), int(by[i])) for i in order]
    return pts + [pts[0]]


def lidc_xml(
    series_uid: str,
    study_uid: str,
    sops: Sequence[str],
    zs: np.ndarray,
    reads: list[dict[str, Any]],
) -> str:
    """One LIDC-IDRI style XML document (namespace http://www.nih.gov).

    ``reads``: one dict per reader ``{"reader": id, "nodules": [{"id", "texture", "slices": {k: bool (H, W)}}]}``.
    """
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<LidcReadMessage uid="{escape(series_uid)}.xml" xmlns="{LIDC_NS}">',
        "  <ResponseHeader>",
        "    <Version>1.8.1</Version>",
        "    <TaskDescription>Second unblinded read (synthetic)</TaskDescription>",
        f"    <SeriesInstanceUid>{escape(series_uid)}</SeriesInstanceUid>",
        f"    <StudyInstanceUID>{escape(study_uid)}</StudyInstanceUID>",
        "  </ResponseHeader>",
    ]
    for read in reads:
        out.append("  <readingSession>")
        out.append("    <annotationVersion>3.12</annotationVersion>")
        out.append(f"    <servicingRadiologistID>{escape(read['reader'])}</servicingRadiologistID>")
        for nod in read["nodules"]:
            out.append("    <unblindedReadNodule>")
            out.append(f"      <noduleID>{escape(nod['id'])}</noduleID>")
            out.append("      <characteristics>")
            out.append("        <subtlety>4</subtlety><internalStructure>1</internalStructure><calcification>6</calcification>")
            out.append(f"        <sphericity>4</sphericity><margin>4</margin><lobulation>2</lobulation><spiculation>1</spiculation>"
                       f"<texture>{nod['texture']}</texture><malignancy>3</malignancy>")
            out.append("      </characteristics>")
            for k in sorted(nod["slices"]):
                pts = _ordered_boundary(nod["slices"][k])
                if not pts:
                    continue
                out.append("      <roi>")
                out.append(f"        <imageZposition>{float(zs[k]):.6f}</imageZposition>")
                out.append(f"        <imageSOP_UID>{escape(sops[k])}</imageSOP_UID>")
                out.append("        <inclusion>TRUE</inclusion>")
                for x, y in pts:
                    out.append(f"        <edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>")
                out.append("      </roi>")
            out.append("    </unblindedReadNodule>")
        out.append("  </readingSession>")
    out.append("</LidcReadMessage>")
    return "\n".join(out) + "\n"


def exam_labels(p: PatientParams, pe_slices: np.ndarray) -> dict[str, int]:
    """RSNA exam-level labels consistent with the painted defects and with each other.

    negative_exam_for_pe = 1 iff no slice shows a defect; exactly one rv/lv column is set on a
    positive exam (none on a negative one); chronic_pe and acute_and_chronic_pe are exclusive.
    QA/artifact/indeterminate columns are always 0 (the phantom has no such artifacts).
    """
    pos = bool(pe_slices.any())
    lab = dict.fromkeys(RSNA_EXAM_COLUMNS, 0)
    if not pos:
        lab["negative_exam_for_pe"] = 1
        return lab
    shown = [d for d in p.pe_defects if d.get("visible", True)]
    sides = {d["side"] for d in shown}
    lab["central_pe"] = int(any(d["vessel"] in ("trunk", "rpa", "lpa") for d in shown))
    lab["rightsided_pe"] = int("right" in sides)
    lab["leftsided_pe"] = int("left" in sides)
    chronic = [d["chronic"] for d in shown]
    if chronic and all(chronic):
        lab["chronic_pe"] = 1
    elif any(chronic):
        lab["acute_and_chronic_pe"] = 1
    gte = p.rv_scale >= 1.0
    lab["rv_lv_ratio_gte_1"] = int(gte)
    lab["rv_lv_ratio_lt_1"] = int(not gte)
    return lab


def birth_and_study_dates(seed: int, index: int, age: float) -> tuple[str, str]:
    """Deterministic, plausible (synthetic) study and birth dates consistent with the age."""
    import datetime as dt

    h = int(hashlib.sha256(f"{seed}/{index}/dates".encode()).hexdigest()[:8], 16)
    study = dt.date(2020, 1, 1) + dt.timedelta(days=h % 1400)
    birth = study - dt.timedelta(days=int(math.floor(int(age) * 365.25)) + (h >> 12) % 360)
    return study.strftime("%Y%m%d"), birth.strftime("%Y%m%d")
