"""Read CT DICOM: a cheap header scan, then pixels to Hounsfield units.

Why two steps: ingest must group, validate and order a whole series before it
decodes anything, and parsing a header twice would halve the ingest rate. So
``scan`` parses the header once and remembers where the native pixel bytes
start; ``read_hu`` then reads them with one ``readinto`` and no second parse.
``scan`` itself reads the file's first 16 KB once and walks the elements in
memory with ``struct`` (pydicom's parse costs more than the pixel read); files
it does not handle (no preamble, compressed, multi-frame, damaged) go through
pydicom (``scan_with_pydicom``), whose result it must equal wherever both apply.
Compressed or unusual pixel data falls back to pydicom's full decoder (pylibjpeg
handles JPEG, JPEG 2000, JPEG-LS and RLE).

Every problem becomes a :class:`DicomIssue` with a short ``reason`` key (the
``ingest_errors.reason`` column) and a sentence that says what to do.
"""

from __future__ import annotations

import errno
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "ct",            # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1": "enhanced_ct",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2": "legacy_ct",    # Legacy Converted Enhanced CT
}
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2": ("<", False),    # implicit VR little endian
    "1.2.840.10008.1.2.1": ("<", True),   # explicit VR little endian
    "1.2.840.10008.1.2.2": (">", True),   # explicit VR big endian (retired, still found)
}
LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR", b"SV", b"UV"}
# every VR of the standard with a 2-byte length in explicit VR (pydicom's ``valuerep.VR`` minus LONG_VRS): VR
# bytes outside LONG_VRS | SHORT_VRS are damage, which pydicom reads by rules of its own (an element that is not
# two capitals is read as implicit VR, swallowing what follows; two unknown capitals fail when converted)
SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH",
             b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
# tags whose presence means the header must come from pydicom: multi-frame, the functional
# group sequences that can carry RescaleSlope/Intercept and PixelSpacing of an enhanced CT,
# and a Modality LUT Sequence (which ``header_from_dataset`` rejects: its values are not slope/intercept HU)
MODALITY_LUT_SEQUENCE = 0x00283000
FULL_PARSE_TAGS = frozenset({0x52009229, 0x52009230, 0x00280008, MODALITY_LUT_SEQUENCE})
DEFLATED = "1.2.840.10008.1.2.1.99"  # deflated explicit VR little endian: native pixels once pydicom inflates it
# OS errors that say nothing about the file itself (full disk, I/O hiccup, a permission fixed later):
# the file is recorded as ``transient`` and retried by the next run, never as a permanent failure
TRANSIENT_ERRNOS = frozenset(getattr(errno, n) for n in (
    "ENOSPC", "EIO", "EACCES", "EPERM", "EROFS", "EDQUOT", "ENOMEM", "EAGAIN", "ESTALE", "ETIMEDOUT", "EBUSY",
    "EMFILE", "ENFILE", "EINTR") if hasattr(errno, n))
IN_PLANE_MIN_COS = 0.8  # an axial image's row direction within ~37 deg of x or y: transposed/flipped to the standard view
HU_MIN, HU_MAX = -1024, 32767
MAX_PIXELS = 4096 * 4096
AXIAL_MIN_COS = 0.8  # |slice normal . z| above this is axial (gantry tilts up to ~37 deg pass)

REASONS = {
    "not_dicom": "Not a DICOM file; if it should be one, re-export it from the PACS. Otherwise ignore this row.",
    "truncated": "The file ends early (interrupted copy?); copy it again from the source.",
    "no_pixels": "The file has no pixel data (a report, SR or presentation state); nothing to ingest.",
    "wrong_modality": "Not a CT image; ctssl only ingests CT. Ignore this row or remove the file.",
    "localizer": "A localiser/scout image (or non-axial reformat), not a slice of an axial series; it is skipped on purpose.",
    "no_decoder": "The pixel data is compressed with a transfer syntax no installed decoder handles; "
                  "`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle` or decompress with `gdcmconv --raw`.",
    "decode_failed": "The compressed pixel data could not be decoded (corrupt stream?); re-export the file.",
    "inconsistent_shape": "This slice's size differs from the rest of its series; it was left out. Check the export.",
    "duplicate_sop": "Another file with the same SOPInstanceUID was already ingested; this copy was skipped.",
    "duplicate_image": "Another file of the series holds the same image at the same position; this copy was skipped.",
    "missing_position": "No ImagePositionPatient (and no InstanceNumber for the series) so the slice order is unknown; re-export with full headers.",
    "bad_header": "A required tag (Rows, Columns, UIDs, bit depth, position/orientation/spacing) is missing or "
                  "malformed; re-export the file.",
    "unsupported_pixels": "Pixel format ctssl does not handle (colour, or more than 16 bits); convert to 16-bit greyscale CT.",
    "series_not_selected": "Another series of the same study was chosen by the selection rule (axial, thinnest, most slices); not an error.",
    "series_exists": "The series is already in the store; to rebuild it, ingest into a new store.",
    "no_rescale": "RescaleSlope or RescaleIntercept is missing (or the slope is 0), so the stored values cannot be "
                  "turned into HU (a guessed value would shift every pixel silently); re-export the series with its rescale tags.",
    "not_hu": "The pixel values do not map to Hounsfield units by slope and intercept (MONOCHROME1, a RescaleType "
              "other than HU, or a Modality LUT Sequence); convert the series to standard CT (MONOCHROME2, slope/intercept to HU).",
    "unsupported_geometry": "The image axes are rotated in-plane by an angle that is not a multiple of 90 degrees; "
                            "ctssl only transposes/flips axial images. Reformat the series to standard axial orientation.",
    "inconsistent_geometry": "The slices of this series differ in PixelSpacing or ImageOrientationPatient, so no one "
                             "geometry fits them; the whole series was left out. Split or re-export the series.",
    "position_conflict": "Two different images of this series lie at the same position; they cannot both be slices "
                         "of one volume, so the series was left out. Remove the wrong files and run ingest again "
                         "(these files are retried).",
    "sop_conflict": "Files with the same SOPInstanceUID hold different content and none can be told apart as the "
                    "damaged one; the series was left out. Remove the wrong copy and run ingest again (these files are retried).",
    "transient": "A temporary error (disk full, I/O error, permission denied) stopped this file; nothing was stored "
                 "for it and the next `ctssl ingest` run retries it. Fix the cause and run ingest again.",
}
# reasons whose files are not marked done: the next run scans and plans them again
RETRY_REASONS = frozenset({"transient", "position_conflict", "sop_conflict"})


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_UIDLIKE = re.compile(r"\d+(?:\.\d+){3,}")
_PATHLIKE = re.compile(r"\S*[/\\]\S*")



def _fixed_spacing(spacing_raw, notes: list[str]) -> tuple[float, float] | None:
    """Row/column spacing made usable: negative values (seen from some vendors) become absolute,
    zero means unknown. Every fix is noted so the catalog says what was assumed."""
    if spacing_raw is None:
        return None
    spacing = (abs(spacing_raw[0]), abs(spacing_raw[1]))
    if spacing_raw[0] <= 0 or spacing_raw[1] <= 0:
        notes.append(f"PixelSpacing {spacing_raw} not positive: used absolute values")
    if spacing[0] == 0 or spacing[1] == 0:
        return None
    return spacing

def scrub(msg: str, limit: int = 120) -> str:
    """An exception message safe to store: quoted values, UIDs and paths removed (they can identify patients)."""
    msg = _PATHLIKE.sub("<path>", _UIDLIKE.sub("<uid>", _QUOTED.sub("'…'", str(msg))))
    return msg[:limit]


class DicomIssue(Exception):
    """A file that cannot be ingested; ``reason`` is a key of ``REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = (detail + " " if detail else "") + REASONS.get(reason, "")
        super().__init__(f"{reason}: {self.detail}")


def is_transient(e: BaseException) -> bool:
    """An OS error that may go away by itself or once the user fixes the machine (not the file)."""
    return isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS


def os_issue(e: OSError, reason: str, what: str) -> DicomIssue:
    """``reason`` for an OS error while reading a file, or ``transient`` when it says nothing about the file."""
    return DicomIssue("transient" if is_transient(e) else reason, f"{what} ({e.strerror}).")


@dataclass(slots=True)
class SliceHeader:
    """What ingest needs from one file (one or more frames). Identifiers never leave ingest's memory."""

    path: str
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    rows: int
    cols: int
    n_frames: int = 1
    modality: str = ""
    image_type: tuple[str, ...] = ()
    age: float | None = None
    sex: str | None = None
    race: str | None = None
    spacing: tuple[float, float] | None = None       # (row, col) mm, absolute values
    orientation: tuple[float, ...] | None = None     # 6 direction cosines
    positions: list[tuple[float, float, float]] | None = None  # per frame
    instance: int | None = None
    thickness: float | None = None
    slopes: list[float] = field(default_factory=lambda: [1.0])      # per frame (or one for all)
    intercepts: list[float] = field(default_factory=lambda: [0.0])
    manufacturer: str | None = None
    model: str | None = None
    kernel: str | None = None
    gantry_tilt: float | None = None
    transfer_syntax: str = ""
    pixel_offset: int | None = None                  # byte offset of native pixel values
    pixel_dtype: str = "<u2"
    bits_stored: int = 16
    notes: list[str] = field(default_factory=list)
    padding: tuple[int, int] | None = None           # stored values [lo, hi] that are padding (not tissue)

    def normal(self) -> np.ndarray | None:
        if self.orientation is None:
            return None
        a, b = self.orientation[:3], self.orientation[3:]
        n = (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])  # row x col
        norm = math.sqrt(n[0] ** 2 + n[1] ** 2 + n[2] ** 2)
        return np.array(n) / norm if norm > 1e-6 else None


def _num(ds, name, default=None):
    v = ds.get(name, None)
    if v is None or v == "":
        return default
    try:
        x = float(v)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def _present_number(text: str | None, value: float | None, name: str) -> float | None:
    """A number tag read for HU or geometry: None when absent, but a present value that is not a finite
    number is rejected. Why: read as absent, a damaged intercept ('\\x001024.0') became "missing" at
    best, or, with its NUL stripped, +1024 instead of -1024."""
    if text is not None and value is None:
        raise DicomIssue("bad_header", f"{name} is present but is not a number ({scrub(repr(text), 24)}).")
    if text is not None and "\\" in text:     # '-10\\4.0' (a damaged '-1024.0'): no first value is the value
        raise DicomIssue("bad_header", f"{name} holds {text.count(chr(92)) + 1} values, not one number.")
    return value


def _raw_number(r, name: str) -> float | None:
    """``_present_number`` of a raw element (``_Raw``/``_Bytes``)."""
    text = r.text(name)
    return _present_number(text, None if text is None else r.num(name), name)


def _ds_number(ds, name: str) -> float | None:
    """``_present_number`` of a pydicom dataset's tag."""
    return _present_number(_str(ds, name), _num(ds, name), name)


def _frame_count(ds) -> int:
    """NumberOfFrames as pydicom reads it: 1 when absent, empty or 0; else a whole number, or the file is
    rejected (a damaged count read as 1 would take the first frame's bytes as the image, ignoring the rest)."""
    v = ds.get("NumberOfFrames", None)
    if v is None or v == "":
        return 1
    try:
        x = float(str(v).strip())      # an IS may be written '2.0'; pydicom reads it as 2
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or x != int(x) or x < 0:
        raise DicomIssue("bad_header", f"NumberOfFrames is {scrub(repr(str(v)), 24)}, not a count of frames.")
    return max(int(x), 1)              # 0: one frame, as pydicom reads it (with a warning)


def _str(ds, name) -> str | None:
    v = ds.get(name, None)
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _vec(v, n, name: str = "a geometry tag"):
    """``n`` finite numbers, or None when the tag is absent or empty. A tag that is present but does not hold
    ``n`` finite numbers (a damaged header: '1Q0' in an orientation) is rejected rather than taken as absent,
    which would place or orient the slice by assumption: a silent wrong geometry."""
    if v is None:
        return None
    if isinstance(v, (str, bytes)):          # one value, or a raw string pydicom could not split into numbers
        if not v.strip():
            return None
        items = [v]
    else:
        items = list(v) if hasattr(v, "__iter__") else [v]
        if not items:
            return None
    try:
        out = tuple(float(x) for x in items)
    except (TypeError, ValueError):
        out = ()
    if len(out) != n or not all(math.isfinite(x) for x in out):
        raise DicomIssue("bad_header", f"{name} is present but does not hold {n} numbers "
                                       f"({scrub(str(v), 40)!r}); the header is damaged.")
    return out


def parse_age(text: str | None) -> float | None:
    """DICOM AS ('063Y', '018M', '3W', '10D') -> years."""
    if not text:
        return None
    text = str(text).strip().upper()
    units = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        return None


def _first_item(ds, seq_name):
    seq = ds.get(seq_name, None)
    return seq[0] if seq else None


def _pixel_offset(f, syntax: str, expected: int, file_size: int, frames: int = 1) -> tuple[int | None, bool]:
    """Locate native pixel bytes at the stream position pydicom stopped at. Returns (offset, present)."""
    start = f.tell()
    head = f.read(12)
    if len(head) < 8:
        return None, False
    endian, explicit = NATIVE_SYNTAXES.get(syntax, ("<", True))
    group, elem = struct.unpack(endian + "HH", head[:4])
    if (group, elem) != (0x7FE0, 0x0010):
        return None, False
    if syntax not in NATIVE_SYNTAXES:
        return None, True
    if explicit and head[4:6] not in LONG_VRS:
        if b"AA" <= head[4:6] <= b"ZZ":   # a VR, but not one pixel data can have: pydicom cannot decode it
            raise DicomIssue("bad_header", f"PixelData's value representation is {_vr_text(head[4:6])}, "
                                           f"not OB or OW (a damaged file).")
        # not two capitals: the body is implicit VR although the meta says explicit (pydicom reads such
        # files with a warning, as it reads this element): the next 4 bytes are the length
        explicit = False
    if explicit:
        vr = head[4:6]
        if vr in LONG_VRS:
            (length,) = struct.unpack(endian + "I", head[8:12])
            off = start + 12
        else:
            (length,) = struct.unpack(endian + "H", head[6:8])
            off = start + 8
    else:
        (length,) = struct.unpack(endian + "I", head[4:8])
        off = start + 8
    if length == 0xFFFFFFFF:
        return None, True
    _check_pixel_extent(off, length, expected, frames, file_size)
    return off, True


def _check_pixel_extent(off: int, length: int, expected: int, frames: int, file_size: int) -> None:
    """Native PixelData of ``length`` bytes at ``off``: it fits the file and holds Rows x Columns x frames
    (both header paths). Why the upper bound: pydicom reads bytes for a whole extra frame as more frames
    (a Rows, Columns or NumberOfFrames that was damaged), which is no image of this header; less than a
    frame more is padding, ignored by pydicom and by us."""
    if off + min(length, expected) > file_size:
        raise DicomIssue("truncated", f"pixel data needs {expected} bytes but only {file_size - off} remain.")
    if length < expected:
        raise DicomIssue("bad_header", f"PixelData holds {length} bytes but Rows x Columns x frames needs {expected}.")
    if expected and length >= expected + expected // frames:
        raise DicomIssue("bad_header", f"PixelData holds {length} bytes, {length // (expected // frames)} frames of "
                                       f"Rows x Columns, but the header says {frames}: Rows, Columns, BitsAllocated "
                                       f"or NumberOfFrames is damaged.")


def scan(path: str | Path) -> SliceHeader:
    """Parse one file's header (no pixel decode). Raises :class:`DicomIssue`.

    One ``open``: the file's size comes from ``fstat`` and the header bytes from a single
    read of its first ``HEAD_BYTES`` (see ``_walk_elements``). Files the byte walker does
    not handle go to pydicom (``scan_with_pydicom``), which classifies every problem.
    """
    path = str(path)
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise os_issue(e, "not_dicom", "cannot read the file") from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
        except OSError as e:
            raise os_issue(e, "not_dicom", "cannot read the file") from None
        fast = _walk_elements(f, size)
    if fast is not None:
        elements, little, syntax, present, offset = fast
        try:
            return header_fast(_Bytes(elements, little), path, syntax, present, offset, size)
        except _SlowPath:
            pass
    return scan_with_pydicom(path, size)


def scan_with_pydicom(path: str, size: int | None = None) -> SliceHeader:
    """``scan`` through pydicom's parser only: the reference the byte walker must agree with,
    and the path for everything it declines (no preamble, compressed, multi-frame, damaged)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if size is None:
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise os_issue(e, "not_dicom", "cannot read the file") from None
    try:
        with open(path, "rb") as f:
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except InvalidDicomError:
                f.seek(0)
                ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
                if "SOPClassUID" not in ds and "Rows" not in ds:
                    raise DicomIssue("not_dicom", "no DICM preamble and no image tags.") from None
            syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "") or _detected_syntax(ds)
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            frames = _frame_count(ds)
            bits = int(ds.get("BitsAllocated", 16) or 16)
            expected = rows * cols * frames * max(bits // 8, 1)
            if syntax == DEFLATED:  # the stream position is inside the deflated data: ask pydicom instead
                f.seek(0)
                offset, present = None, "PixelData" in pydicom.dcmread(f, defer_size=64)
            else:
                offset, present = _pixel_offset(f, syntax, expected, size, frames)
    except DicomIssue:
        raise
    except OSError as e:
        raise os_issue(e, "truncated", "reading the header failed") from None
    except (EOFError, struct.error) as e:
        raise DicomIssue("truncated", f"the header ends early ({scrub(e)}).") from None
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on garbage; all mean "unreadable"
        kind = "truncated" if "end of file" in str(e).lower() or "eof" in str(e).lower() else "not_dicom"
        raise DicomIssue(kind, f"pydicom could not parse it ({type(e).__name__}: {scrub(e)}).") from None
    if present and syntax not in NATIVE_SYNTAXES and not decoder_available(syntax):
        raise DicomIssue("no_decoder", f"transfer syntax {syntax}.")
    _check_vrs(ds)
    try:
        if not _needs_full_parse(ds):
            try:
                return header_fast(_Raw(ds._dict), path, syntax, present, offset, size)
            except _SlowPath:
                pass
        return header_from_dataset(ds, path, syntax, present, offset)
    except (NotImplementedError, TypeError, ValueError, AttributeError, IndexError, KeyError, struct.error,
            OSError) as e:   # the file is closed: an OSError here is pydicom parsing a damaged sequence
        # pydicom converting a damaged tag ("Unknown Value Representation" inside a sequence item, a
        # multi-valued Rows): the file is unreadable as an image, not a crash of the whole ingest
        raise DicomIssue("bad_header", f"pydicom cannot read one of its tags ({type(e).__name__}: "
                                       f"{scrub(e)}).") from None


def _check_vrs(ds) -> None:
    """Reject a file whose tags that ingest reads carry a value representation pydicom does not know.

    Why: ``_Raw`` reads raw bytes without pydicom's per-VR conversion, so a damaged VR ('D\\x10' for
    'DS') would be read as if it were intact, while pydicom itself cannot convert that tag and so cannot
    give the HU of the file; reading what the reference cannot is not ours to do (the file is damaged)."""
    known = _known_vrs()
    d = ds._dict
    for name, tag in T.items():
        vr = getattr(d.get(tag), "VR", None)
        if vr is not None and vr not in known:
            raise DicomIssue("bad_header", f"{name}'s value representation is {_vr_text(vr)}, which no "
                                           f"DICOM reader knows (a damaged file).")
        if vr is not None and name in READ_VRS and vr not in (*READ_VRS[name], "UN"):
            raise DicomIssue("bad_header", f"{name} is written as {_vr_text(vr)}, not {READ_VRS[name][0]}: a form "
                                           f"ctssl does not read (a damaged or unusual file; re-export it).")


def _vr_text(vr: str | bytes) -> str:
    """Two VR characters as printable text (damaged ones escaped), for a rejection message."""
    b = vr.encode("latin-1", "replace") if isinstance(vr, str) else bytes(vr)
    return b[:2].decode("latin-1").encode("unicode_escape").decode("ascii")


_KNOWN_VRS: set[str] = set()


def _known_vrs() -> set[str]:
    if not _KNOWN_VRS:
        from pydicom.valuerep import VR

        _KNOWN_VRS.update(v.value for v in VR)   # includes pydicom's ambiguous ones ('US or SS', 'OB or OW')
    return _KNOWN_VRS


def _detected_syntax(ds) -> str:
    """The native syntax pydicom detected while parsing a file whose meta names none (a raw dataset,
    or damaged meta): the encoding the pixel bytes are in, instead of assuming implicit VR."""
    implicit, little = getattr(ds, "original_encoding", (None, None))
    by_encoding = {(True, True): "1.2.840.10008.1.2", (False, True): "1.2.840.10008.1.2.1",
                   (False, False): "1.2.840.10008.1.2.2"}
    return by_encoding.get((implicit, little), "1.2.840.10008.1.2")


# ---- fast path: decode the ~25 raw elements we need ourselves (pydicom's per-attribute
# conversion costs ~2 ms per file, more than parsing the file). Multi-frame and anything
# unusual goes through ``header_from_dataset``.
T = {
    "SOPClassUID": 0x00080016, "SOPInstanceUID": 0x00080018, "ImageType": 0x00080008, "Modality": 0x00080060,
    "Manufacturer": 0x00080070, "ManufacturerModelName": 0x00081090, "PatientID": 0x00100020,
    "PatientSex": 0x00100040, "PatientAge": 0x00101010, "EthnicGroup": 0x00102160, "SliceThickness": 0x00180050,
    "ConvolutionKernel": 0x00181210, "GantryDetectorTilt": 0x00181120, "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E, "InstanceNumber": 0x00200013, "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037, "SamplesPerPixel": 0x00280002, "NumberOfFrames": 0x00280008,
    "Rows": 0x00280010, "Columns": 0x00280011, "PixelSpacing": 0x00280030, "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101, "PixelRepresentation": 0x00280103, "RescaleIntercept": 0x00281052,
    "RescaleSlope": 0x00281053, "PhotometricInterpretation": 0x00280004, "PixelPaddingValue": 0x00280120,
    "PixelPaddingRangeLimit": 0x00280121, "RescaleType": 0x00281054,
}
# the tags whose values decide HU and geometry, with the VRs ctssl reads them in: the standard's, and the ones
# that give the same value read the same way (IS text for DS, SS for a small US). Written with another VR (a
# damaged VR byte, 'CS' for NumberOfFrames, FD for an intercept) pydicom cannot use them or reads them by other
# rules, so neither reader accepts them
READ_VRS = {
    **dict.fromkeys(("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel"),
                    ("US", "SS")),
    **dict.fromkeys(("RescaleSlope", "RescaleIntercept", "PixelSpacing", "ImagePositionPatient",
                     "ImageOrientationPatient"), ("DS", "IS")),
    "NumberOfFrames": ("IS", "DS"), "PixelPaddingValue": ("US", "SS"), "PixelPaddingRangeLimit": ("US", "SS"),
    "PhotometricInterpretation": ("CS",),
}
_READ_VR_BYTES = {T[n]: {v.encode() for v in (*vrs, "UN")} for n, vrs in READ_VRS.items()}


class _SlowPath(Exception):
    pass


def _needs_full_parse(ds) -> bool:
    d = ds._dict
    return any(t in d for t in FULL_PARSE_TAGS)


WANTED = frozenset(T.values())
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


HEAD_BYTES = 16384  # one read covers the header of nearly every CT file (pixel data starts at ~1-4 KB)


_META = struct.Struct("<HH2sH")                                        # group, element, VR, short length
_EXPLICIT = {"<": struct.Struct("<HH2sH"), ">": struct.Struct(">HH2sH")}
_IMPLICIT = {"<": struct.Struct("<HHI"), ">": struct.Struct(">HHI")}      # group, element, length
_U32 = {"<": struct.Struct("<I"), ">": struct.Struct(">I")}


def _walk_elements(f, size: int):
    """Walk a native-syntax Part-10 file's top-level elements with ``struct`` up to PixelData.

    Why not pydicom here: its parse plus per-element conversion costs more than the whole
    pixel read, and ingest must keep up with a plain ``dcmread`` loop. ``f`` is the open file
    (unbuffered, at offset 0); the first ``HEAD_BYTES`` are read once and walked in memory,
    re-reading only past big private elements. Returns (elements {tag: raw bytes}, little
    endian, syntax, pixel data present, (pixel offset, length)) or None for anything unusual
    (no preamble, compressed/deflated syntax, multi-frame, odd lengths, ends early), which
    then goes through pydicom and gets its proper classification.
    """
    try:
        buf = f.read(min(size, HEAD_BYTES))
        if len(buf) < 144 or buf[128:132] != b"DICM":
            return None
        meta, u32le = _META.unpack_from, _U32["<"].unpack_from
        # file meta: always explicit VR little endian
        pos, syntax = 132, None
        while pos + 8 <= len(buf):
            group, elem, vr, ln = meta(buf, pos)
            if group != 2:
                break
            hdr = 8
            if vr in LONG_VRS:
                (ln,) = u32le(buf, pos + 8)
                hdr = 12
            elif vr not in SHORT_VRS:
                return None   # damaged VR in the meta: pydicom's rule decides what the rest of the file is
            if ln == UNDEFINED:
                return None
            if elem == 0x0010:
                syntax = buf[pos + hdr:pos + hdr + ln].decode("ascii", "replace").strip("\x00 ")
            pos += hdr + ln
        if syntax not in NATIVE_SYNTAXES:
            return None
        endian, explicit = NATIVE_SYNTAXES[syntax]
        head = (_EXPLICIT if explicit else _IMPLICIT)[endian].unpack_from
        u32 = _U32[endian].unpack_from
        long_vrs, short_vrs, wanted, read_vrs = LONG_VRS, SHORT_VRS, WANTED, _READ_VR_BYTES
        base, blen = 0, len(buf)  # buf holds file bytes [base, base + blen)
        elements: dict[int, bytes] = {}
        while True:
            r = pos - base
            if r + 12 > blen:
                if base + blen < size:  # more file to read: re-window at pos
                    f.seek(pos)
                    buf, base = f.read(HEAD_BYTES), pos
                    blen, r = len(buf), 0
                if r + 8 > blen:
                    return None  # ended before PixelData: pydicom decides between no_pixels and truncated
            hdr = 8
            if explicit:
                group, elem, vr, ln = head(buf, r)
                if vr in long_vrs:
                    if r + 12 > blen:
                        return None
                    (ln,) = u32(buf, r + 8)
                    hdr = 12
                elif vr not in short_vrs:
                    return None   # damaged VR: pydicom's own rule says how long the element is (and what follows)
            else:
                group, elem, ln = head(buf, r)
            tag = (group << 16) | elem
            if tag >= 0x7FE00008:
                if tag < 0x7FE00010:
                    return None   # Float or Double Float Pixel Data (or a damaged tag): pydicom decides
                if tag > 0x7FE00010:
                    return elements, endian == "<", syntax, False, None
                if ln == UNDEFINED or (explicit and hdr != 12):
                    return None
                return elements, endian == "<", syntax, True, (pos + hdr, ln)
            if ln == UNDEFINED:
                return None  # undefined-length sequence: let pydicom walk it
            if tag in FULL_PARSE_TAGS:
                return None  # multi-frame / functional groups (rescale, spacing inside): pydicom reads them
            if pos + hdr + ln > size:
                return None  # a length past the end of the file: corrupt; never read (or allocate) it
            if tag in wanted:
                if explicit and tag in read_vrs and vr not in read_vrs[tag]:
                    return None   # written with another VR: pydicom's path rejects it (``_check_vrs``)
                if r + hdr + ln > blen:
                    f.seek(pos)
                    buf, base = f.read(max(hdr + ln, HEAD_BYTES)), pos
                    blen, r = len(buf), 0
                    if hdr + ln > blen:
                        return None
                elements[tag] = buf[r + hdr:r + hdr + ln]
            pos += hdr + ln
            if pos > size:
                return None
    except (OSError, struct.error, UnicodeDecodeError, ValueError, OverflowError):
        return None


class _Raw:
    """Values of raw elements, decoded without pydicom's per-element machinery."""

    def __init__(self, elements):
        self.d = elements

    def el(self, name):
        return self.d.get(T[name])

    def text(self, name) -> str | None:
        e = self.el(name)
        if e is None:
            return None
        v = e.value
        if isinstance(v, (bytes, bytearray)):
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError:
                v = bytes(v).decode("latin-1")
        elif v is None:
            return None
        elif not isinstance(v, str):
            if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
                v = "\\".join(str(x) for x in v)
            else:
                v = str(v)
        v = v.rstrip("\x00 ").lstrip(" ")   # DICOM pads at the end; a leading NUL is damage, kept
        return v or None

    def multi(self, name) -> list[str] | None:
        t = self.text(name)
        return None if t is None else [x.rstrip("\x00 ").lstrip(" ") for x in t.split("\\")]

    def num(self, name) -> float | None:
        t = self.text(name)
        if t is None:
            return None
        try:
            x = float(t.split("\\")[0])
        except ValueError:
            return None
        return x if math.isfinite(x) else None

    def vec(self, name, n):
        m = self.multi(name)
        if m is None:
            return None
        try:
            out = tuple(float(x) for x in m)
        except ValueError:
            raise _SlowPath from None     # damaged: pydicom's reading decides (``_vec`` rejects it)
        if len(out) != n or not all(math.isfinite(x) for x in out):
            raise _SlowPath
        return out

    def us(self, name) -> int | None:
        e = self.el(name)
        if e is None:
            return None
        v = e.value
        if isinstance(v, (bytes, bytearray)):
            if len(v) != 2:
                raise _SlowPath   # a US of 2 values (or damaged): pydicom cannot use it as one number
            return struct.unpack("<H" if e.is_little_endian else ">H", bytes(v[:2]))[0]
        try:
            return int(v)
        except (TypeError, ValueError):
            raise _SlowPath from None


    def us_or_ss(self, name, signed: bool) -> int | None:
        """A US-or-SS element (pixel padding) read as PixelRepresentation says, whatever VR it was written with."""
        v = self.us(name)
        return v - 65536 if signed and v is not None and v > 32767 else v


class _Bytes(_Raw):
    """Values of the byte walker's elements (plain ``bytes``): the same decoding as ``_Raw``
    without its per-call type checks, which cost more than the walk itself."""

    def __init__(self, elements: dict[int, bytes], little: bool):
        self.d = elements
        self.little = little

    def text(self, name) -> str | None:
        v = self.d.get(T[name])
        if v is None:
            return None
        try:
            t = v.decode("utf-8")
        except UnicodeDecodeError:
            t = v.decode("latin-1")
        return t.rstrip("\x00 ").lstrip(" ") or None

    def us(self, name) -> int | None:
        v = self.d.get(T[name])
        if v is None:
            return None
        if len(v) != 2:
            raise _SlowPath   # a US of 2 values (or damaged): pydicom cannot use it as one number
        return struct.unpack_from("<H" if self.little else ">H", v)[0]

    def vec(self, name, n):
        t = self.text(name)
        if t is None:
            return None
        try:
            out = tuple(map(float, t.split("\\")))  # float() ignores the spaces _Raw.vec strips
        except ValueError:
            return _Raw.vec(self, name, n)  # NULs or junk inside: the general rule decides
        if len(out) != n or not all(map(math.isfinite, out)):
            raise _SlowPath                 # damaged: pydicom's reading decides (``_vec`` rejects it)
        return out


def _check_kind(modality: str, sop_class: str, image_type: tuple[str, ...], present: bool) -> None:
    """Is this an axial CT image with pixels? Raises the matching DicomIssue (both header paths)."""
    if modality and modality != "CT":
        raise DicomIssue("wrong_modality", f"Modality is {modality}.")
    if not modality and sop_class and sop_class not in CT_SOP_CLASSES:
        raise DicomIssue("wrong_modality", f"SOP class {sop_class} is not a CT image.")
    if "LOCALIZER" in image_type or "SCOUT" in image_type or "TOPOGRAM" in image_type:
        raise DicomIssue("localizer", f"ImageType is {'/'.join(image_type)}.")
    if not present:
        raise DicomIssue("no_pixels", "there is no PixelData element.")


# no default is safe: they decide how bytes become values, and pydicom refuses to decode without any of them
PIXEL_TAGS = ("SamplesPerPixel", "BitsAllocated", "PixelRepresentation")


def _check_pixel_tags(missing: list[str]) -> None:
    """Refuse pixel data whose layout tags are missing (both header paths): guessing 16-bit unsigned
    reads a signed or 8-bit image as wrong numbers, and pydicom itself refuses to decode it."""
    if missing:
        raise DicomIssue("bad_header", f"{' and '.join(missing)} missing.")


def _check_pixel_format(bits_stored: int | None, bits: int, pr: int | None) -> tuple[int, int]:
    """(BitsStored, PixelRepresentation), checked as pydicom checks them before decoding (both header
    paths): BitsStored required (type 1) and at most BitsAllocated, PixelRepresentation 0 (unsigned) or
    1 (signed). Why: any other value is damage, and reading it anyway (a PixelRepresentation of 189 as
    "signed") gives numbers no reference reader would give; pydicom refuses and so do we."""
    if not bits_stored:
        raise DicomIssue("bad_header", "BitsStored missing: the pixel format is unknown.")
    if bits_stored > bits:
        raise DicomIssue("bad_header", f"BitsStored is {bits_stored}, more than BitsAllocated ({bits}).")
    if pr not in (0, 1):
        raise DicomIssue("bad_header", f"PixelRepresentation is {pr}; it must be 0 (unsigned) or 1 (signed).")
    return bits_stored, pr


def _check_image(rows, cols, sop, series, study, spp: int, bits: int) -> None:
    """Required tags present and a pixel format ingest handles (both header paths)."""
    if not rows or not cols or rows <= 0 or cols <= 0 or not sop or not series or not study:
        raise DicomIssue("bad_header", f"Rows={rows}, Columns={cols}, UIDs present={bool(sop and series and study)}.")
    if rows * cols > MAX_PIXELS:
        raise DicomIssue("unsupported_pixels", f"{rows}x{cols} is larger than any CT slice.")
    if spp != 1 or bits not in (8, 16):
        raise DicomIssue("unsupported_pixels", f"SamplesPerPixel={spp}, BitsAllocated={bits}.")


def _fixed_rescale(slopes: list, intercepts: list, notes: list[str]) -> tuple[list[float], list[float]]:
    """Slope and intercept per frame. Both are required (type 1) for CT: a missing one is rejected
    (``no_rescale``), since assuming intercept 0 shifts a -1024-intercept series by +1024 HU silently.
    A zero slope is invalid (it maps every pixel to the intercept); taking it as 1 would be a guess,
    so it is rejected too."""
    if any(s is None for s in slopes) or any(i is None for i in intercepts):
        missing = [n for n, v in (("RescaleSlope", slopes), ("RescaleIntercept", intercepts)) if any(x is None for x in v)]
        raise DicomIssue("no_rescale", f"{' and '.join(missing)} missing.")
    if any(s == 0 for s in slopes):
        raise DicomIssue("no_rescale", "RescaleSlope is 0.")
    return list(slopes), list(intercepts)


def _check_hu(photometric: str | None, rescale_types: list[str | None]) -> None:
    """Refuse pixel values that slope and intercept do not turn into HU (both header paths)."""
    kind = (photometric or "").strip().upper()
    if kind == "MONOCHROME1":
        raise DicomIssue("not_hu", "PhotometricInterpretation is MONOCHROME1 (inverted grey scale).")
    if not kind:
        raise DicomIssue("bad_header", "PhotometricInterpretation missing.")
    if kind != "MONOCHROME2":  # colour, or a damaged value: nothing says how its bytes are laid out
        raise DicomIssue("unsupported_pixels", f"PhotometricInterpretation is {scrub(kind, 20)}.")
    odd = sorted({t.strip().upper() for t in rescale_types if t and t.strip().upper() != "HU"})
    if odd:
        raise DicomIssue("not_hu", f"RescaleType is {'/'.join(odd)}, not HU.")


def _padding(value: int | None, limit: int | None) -> tuple[int, int] | None:
    """PixelPaddingValue (and PixelPaddingRangeLimit) as an inclusive stored-value range, or None.

    Padding marks pixels outside the scanned field (often a value that rescales to ~+1000 HU or
    to -2000); without this they would be stored as bone-like rings. They become air instead."""
    if value is None:
        return None
    if limit is None:
        return (value, value)
    return (min(value, limit), max(value, limit))


def header_fast(r: _Raw, path: str, syntax: str, present: bool, offset, size: int) -> SliceHeader:
    """Single-frame header from raw elements; same checks and result as ``header_from_dataset``.

    ``r`` reads the elements (``_Raw`` over pydicom's, ``_Bytes`` over the byte walker's);
    ``offset`` is the pixel byte offset, or (offset, length) from the byte walker (checked here
    against the file ``size``).
    """
    if not present and isinstance(r, _Bytes):
        raise _SlowPath   # no PixelData seen by the walker (a damaged tag?): pydicom's reading decides
    modality = (r.text("Modality") or "").upper()
    image_type = tuple(x.upper() for x in (r.multi("ImageType") or ()))
    _check_kind(modality, r.text("SOPClassUID") or "", image_type, present)
    rows, cols = r.us("Rows"), r.us("Columns")
    sop, series, study = r.text("SOPInstanceUID"), r.text("SeriesInstanceUID"), r.text("StudyInstanceUID")
    _check_pixel_tags([n for n in PIXEL_TAGS if r.el(n) is None])
    bits = r.us("BitsAllocated")
    _check_image(rows, cols, sop, series, study, r.us("SamplesPerPixel"), bits)
    notes: list[str] = []
    _check_hu(r.text("PhotometricInterpretation"), [r.text("RescaleType")])
    (slope,), (icpt,) = _fixed_rescale([_raw_number(r, "RescaleSlope")], [_raw_number(r, "RescaleIntercept")], notes)
    spacing_raw = r.vec("PixelSpacing", 2)
    spacing = _fixed_spacing(spacing_raw, notes)
    pos = r.vec("ImagePositionPatient", 3)
    bits_stored, pr = _check_pixel_format(r.us("BitsStored"), bits, r.us("PixelRepresentation"))
    padding = _padding(r.us_or_ss("PixelPaddingValue", pr == 1), r.us_or_ss("PixelPaddingRangeLimit", pr == 1))
    endian = NATIVE_SYNTAXES.get(syntax, ("<", True))[0]
    if isinstance(offset, tuple):
        off, length = offset
        _check_pixel_extent(off, length, rows * cols * (bits // 8), 1, size)
        offset = off
    if bits_stored < bits and pr == 1:
        offset = None
    inst = r.num("InstanceNumber")
    return SliceHeader(
        path=path, sop_uid=sop, series_uid=series, study_uid=study, patient_id=r.text("PatientID") or "",
        rows=rows, cols=cols, n_frames=1, modality=modality or "CT", image_type=image_type,
        age=parse_age(r.text("PatientAge")), sex=_norm_sex(r.text("PatientSex")), race=r.text("EthnicGroup"),
        spacing=spacing, orientation=r.vec("ImageOrientationPatient", 6), positions=[pos] if pos else None,
        instance=int(inst) if inst is not None else None, thickness=r.num("SliceThickness"),
        slopes=[slope], intercepts=[icpt], manufacturer=r.text("Manufacturer"),
        model=r.text("ManufacturerModelName"), kernel=r.text("ConvolutionKernel"),
        gantry_tilt=r.num("GantryDetectorTilt"), transfer_syntax=syntax, pixel_offset=offset,
        pixel_dtype=f"{endian}{'i' if pr else 'u'}{bits // 8}", bits_stored=bits_stored, notes=notes,
        padding=padding,
    )


_DECODERS: dict[str, bool] = {}


def decoder_available(syntax: str) -> bool:
    """Whether an installed pydicom pixel decoder handles ``syntax`` (cached per process)."""
    if syntax not in _DECODERS:
        try:
            from pydicom.pixels import get_decoder

            _DECODERS[syntax] = bool(get_decoder(syntax).is_available)
        except Exception:  # noqa: BLE001 - unknown or uncompressed-but-odd syntax: nothing decodes it
            _DECODERS[syntax] = False
    return _DECODERS[syntax]


def header_from_dataset(ds, path: str, syntax: str, present: bool = True, offset: int | None = None) -> SliceHeader:
    """Extract and validate the fields ingest needs from a parsed dataset."""
    modality = (_str(ds, "Modality") or "").upper()
    image_type = tuple(str(x).upper() for x in (ds.get("ImageType", None) or ()))
    _check_kind(modality, str(ds.get("SOPClassUID", "") or ""), image_type, present)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        sop, series, study = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)
    except (AttributeError, TypeError, ValueError) as e:
        raise DicomIssue("bad_header", f"{scrub(e)}.") from None
    _check_pixel_tags([n for n in PIXEL_TAGS if ds.get(n, None) in (None, "", b"")])   # empty is missing too
    bits = int(ds.BitsAllocated)
    _check_image(rows, cols, sop, series, study, int(ds.SamplesPerPixel), bits)
    frames = _frame_count(ds)
    notes: list[str] = []
    if "ModalityLUTSequence" in ds:
        raise DicomIssue("not_hu", "the file has a Modality LUT Sequence.")
    rescale_types = [_str(ds, "RescaleType")]

    orientation = _vec(ds.get("ImageOrientationPatient", None), 6, "ImageOrientationPatient")
    spacing_raw = _vec(ds.get("PixelSpacing", None), 2, "PixelSpacing")
    thickness = _num(ds, "SliceThickness")
    positions = None
    slopes, intercepts = [_ds_number(ds, "RescaleSlope")], [_ds_number(ds, "RescaleIntercept")]
    if frames > 1 or "SharedFunctionalGroupsSequence" in ds:
        shared = _first_item(ds, "SharedFunctionalGroupsSequence")
        per_frame = ds.get("PerFrameFunctionalGroupsSequence", None) or []

        def grp(item, seq, name, n=None):
            inner = _first_item(item, seq) if item is not None else None
            if inner is None:
                return None
            v = inner.get(name, None)
            return _vec(v, n, name) if n else _ds_number(inner, name)

        for item in [shared, *per_frame]:
            inner = _first_item(item, "PixelValueTransformationSequence") if item is not None else None
            if inner is not None:
                rescale_types.append(_str(inner, "RescaleType"))

        orientation = orientation or grp(shared, "PlaneOrientationSequence", "ImageOrientationPatient", 6)
        spacing_raw = spacing_raw or grp(shared, "PixelMeasuresSequence", "PixelSpacing", 2)
        thickness = thickness or grp(shared, "PixelMeasuresSequence", "SliceThickness")
        s_slope = grp(shared, "PixelValueTransformationSequence", "RescaleSlope")
        s_icpt = grp(shared, "PixelValueTransformationSequence", "RescaleIntercept")
        positions, slopes, intercepts = [], [], []
        for k in range(frames):
            item = per_frame[k] if k < len(per_frame) else None
            pos = grp(item, "PlanePositionSequence", "ImagePositionPatient", 3)
            if pos is None and frames == 1:  # a single-frame image with functional groups: the top-level tag
                pos = _vec(ds.get("ImagePositionPatient", None), 3, "ImagePositionPatient")
            positions.append(pos)
            orientation = orientation or grp(item, "PlaneOrientationSequence", "ImageOrientationPatient", 6)
            sl = grp(item, "PixelValueTransformationSequence", "RescaleSlope")
            ic = grp(item, "PixelValueTransformationSequence", "RescaleIntercept")
            slopes.append(sl if sl is not None else (s_slope if s_slope is not None else
                                                     _ds_number(ds, "RescaleSlope")))
            intercepts.append(ic if ic is not None else (s_icpt if s_icpt is not None else
                                                         _ds_number(ds, "RescaleIntercept")))
        lacking = sum(p is None for p in positions)
        if frames == 1 and lacking:
            positions = None  # one image without a position: planned like any single-frame file
        elif lacking:
            # a frame without a position cannot be placed (and frame order is not z order): the file is
            # rejected rather than ingested with frames silently dropped
            raise DicomIssue("missing_position", f"{lacking} of {frames} frames have no ImagePositionPatient.")
    else:
        pos = _vec(ds.get("ImagePositionPatient", None), 3, "ImagePositionPatient")
        positions = [pos] if pos is not None else None

    _check_hu(_str(ds, "PhotometricInterpretation"), rescale_types)
    fixed_s, fixed_i = _fixed_rescale(slopes, intercepts, notes)
    spacing = _fixed_spacing(spacing_raw, notes)
    tilt = _num(ds, "GantryDetectorTilt")
    bits_stored, pr = _check_pixel_format(int(ds.get("BitsStored", 0) or 0), bits,
                                          int(ds.get("PixelRepresentation", 0) or 0))
    padding = _padding(_int16(ds, "PixelPaddingValue", pr == 1), _int16(ds, "PixelPaddingRangeLimit", pr == 1))
    endian = NATIVE_SYNTAXES.get(syntax, ("<", True))[0]
    dtype = f"{endian}{'i' if pr else 'u'}{bits // 8}"
    if bits_stored < bits and pr == 1:
        offset = None  # sign extension of <16-bit signed data: leave it to pydicom
    return SliceHeader(
        path=path, sop_uid=sop, series_uid=series, study_uid=study,
        patient_id=str(ds.get("PatientID", "") or ""), rows=rows, cols=cols, n_frames=frames,
        modality=modality or "CT", image_type=image_type,
        age=parse_age(_str(ds, "PatientAge")), sex=_norm_sex(_str(ds, "PatientSex")), race=_str(ds, "EthnicGroup"),
        spacing=spacing, orientation=orientation, positions=positions,
        instance=int(_num(ds, "InstanceNumber")) if _num(ds, "InstanceNumber") is not None else None,
        thickness=thickness, slopes=fixed_s, intercepts=fixed_i,
        manufacturer=_str(ds, "Manufacturer"), model=_str(ds, "ManufacturerModelName"),
        kernel=_str(ds, "ConvolutionKernel"), gantry_tilt=tilt, transfer_syntax=syntax,
        pixel_offset=offset, pixel_dtype=dtype, bits_stored=bits_stored, notes=notes, padding=padding,
    )


def _int16(ds, name: str, signed: bool) -> int | None:
    """A US-or-SS element of a parsed dataset as PixelRepresentation says (as ``_Raw.us_or_ss``)."""
    el = ds.get(name, None)
    if el is None:
        return None
    v = el.value if hasattr(el, "value") else el
    if isinstance(v, (bytes, bytearray)):
        if len(v) != 2:
            raise DicomIssue("bad_header", f"{name} holds {len(v)} bytes, not one 16-bit value.")
        v = struct.unpack("<H" if getattr(el, "is_little_endian", True) else ">H", bytes(v))[0]
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        raise DicomIssue("bad_header", f"{name} holds {len(v)} values, not one.")   # as the fast path rejects
    try:
        v = int(v)
    except (TypeError, ValueError):
        raise DicomIssue("bad_header", f"{name} is not a 16-bit value.") from None
    if signed and v > 32767:
        v -= 65536
    elif not signed and v < 0:
        v += 65536
    return v


def _norm_sex(s: str | None) -> str | None:
    if not s:
        return None
    s = s.strip().upper()[:1]
    return s if s in ("F", "M") else None


def read_stored(h: SliceHeader) -> np.ndarray:
    """Stored pixel values (F, rows, cols) without rescale. Fast path: one read at the known offset, no re-parse."""
    n = h.rows * h.cols * h.n_frames
    if h.pixel_offset is not None:
        dt = np.dtype(h.pixel_dtype)
        arr = _read_at(h.path, h.pixel_offset, n, dt)
        if h.bits_stored < dt.itemsize * 8 and dt.kind == "u":
            arr = arr & np.array((1 << h.bits_stored) - 1, dtype=dt)
        return arr.reshape(h.n_frames, h.rows, h.cols)
    return _decode_with_pydicom(h)


def _read_at(path: str, offset: int, n: int, dt: np.dtype) -> np.ndarray:
    """``n`` values of ``dt`` at byte ``offset``, read straight into a new array.

    Why not ``np.fromfile``: with an offset it costs ~0.5 ms more per 512x512 slice than
    the read itself (it goes through a buffered C stream); ``readinto`` is one syscall.
    """
    arr = np.empty(n, dt)
    view = memoryview(arr.view(np.uint8))
    got = 0
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            while got < view.nbytes:
                k = f.readinto(view[got:])
                if not k:
                    break
                got += k
    except OSError as e:
        raise os_issue(e, "truncated", "re-reading failed") from None
    if got != view.nbytes:
        raise DicomIssue("truncated", f"expected {n} pixels, found {got // dt.itemsize}.")
    return arr


def _decode_with_pydicom(h: SliceHeader) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(h.path, force=True)  # as ``scan`` read it (a file without preamble too)
    except OSError as e:
        raise os_issue(e, "truncated", "re-reading failed") from None
    except Exception as e:  # noqa: BLE001
        raise DicomIssue("truncated", f"re-reading failed ({type(e).__name__}).") from None
    if not getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None):
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = h.transfer_syntax  # what scan detected (``_detected_syntax``)
    if h.transfer_syntax not in NATIVE_SYNTAXES:
        try:
            from pydicom.pixels import get_decoder

            available = get_decoder(h.transfer_syntax).is_available
        except Exception:  # noqa: BLE001 - unknown syntax: no decoder
            available = False
        if not available:
            raise DicomIssue("no_decoder", f"transfer syntax {h.transfer_syntax}.")
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001
        reason = "decode_failed" if h.transfer_syntax not in NATIVE_SYNTAXES else "truncated"
        msg = scrub(e)
        if "no" in msg.lower() and ("plugin" in msg.lower() or "decoder" in msg.lower() or "handler" in msg.lower()):
            reason = "no_decoder"
        raise DicomIssue(reason, f"pixel decode failed ({type(e).__name__}: {msg}).") from None
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape != (h.n_frames, h.rows, h.cols):
        raise DicomIssue("inconsistent_shape", f"decoded shape {arr.shape} != header {(h.n_frames, h.rows, h.cols)}.")
    return arr


def to_hu(stored: np.ndarray, slopes: list[float], intercepts: list[float]) -> np.ndarray:
    """Stored values (F, H, W) -> float32 HU, clipped to [-1024, 32767] (padding below air becomes air)."""
    f = stored.shape[0]
    hu = stored.astype(np.float32)  # (F, H, W)
    if len(set(slopes)) == 1 and len(set(intercepts)) == 1:
        if slopes[0] != 1.0:
            hu *= np.float32(slopes[0])
        hu += np.float32(intercepts[0])
    else:
        hu *= np.asarray(slopes if len(slopes) == f else slopes[:1] * f, np.float32)[:, None, None]
        hu += np.asarray(intercepts if len(intercepts) == f else intercepts[:1] * f, np.float32)[:, None, None]
    np.maximum(hu, HU_MIN, out=hu)
    return np.minimum(hu, HU_MAX, out=hu)


def padding_mask(stored: np.ndarray, padding: tuple[int, int] | None) -> np.ndarray | None:
    """bool mask of padding pixels (stored values inside the padding range), or None when there are none."""
    if padding is None:
        return None
    m = (stored >= padding[0]) & (stored <= padding[1])
    return m if m.any() else None


def padding_to_air(stored: np.ndarray, padding: tuple[int, int] | None, slope: float, intercept: float) -> np.ndarray:
    """Stored values with padding pixels replaced by the stored value of air (HU_MIN, or below: clipped there).

    Done on the stored integers so that every build path (exact box means, torch resampling)
    sees air where the scanner marked padding; the dtype widens to int32 when air lies outside it.
    """
    m = padding_mask(stored, padding)
    if m is None:
        return stored
    air = (HU_MIN - intercept) / slope
    v = math.floor(air) if slope > 0 else math.ceil(air)
    out = stored.copy()
    if stored.dtype.kind in "iu" and not (np.iinfo(stored.dtype).min <= v <= np.iinfo(stored.dtype).max):
        out = stored.astype(np.int32)
    out[m] = v
    return out


def read_hu(h: SliceHeader) -> np.ndarray:
    """Float32 HU (F, rows, cols) for one file, padding pixels as air."""
    stored = read_stored(h)
    hu = to_hu(stored, h.slopes, h.intercepts)
    m = padding_mask(stored, h.padding)
    if m is not None:
        hu[m] = HU_MIN
    return hu


def is_axial(h: SliceHeader) -> bool:
    n = h.normal()
    return n is None or abs(n[2]) >= AXIAL_MIN_COS


def canonical_axes(orientation) -> tuple[bool, bool, bool]:
    """(transpose, flip rows, flip columns) that bring an axial image to the standard view:
    columns run along +x (patient left) and rows along +y (posterior).

    The row direction cosine (first triplet) is where the column index grows. When it points
    mostly along y (an in-plane rotation by 90 degrees, e.g. IOP 0,1,0,-1,0,0), the image is
    transposed first; after that its column direction is the old column cosine and vice versa.
    """
    if orientation is None:
        return False, False, False
    a, b = orientation[:3], orientation[3:]
    if abs(a[0]) >= abs(a[1]):
        return False, b[1] < 0, a[0] < 0
    return True, a[1] < 0, b[0] < 0


def in_plane_ok(orientation) -> bool:
    """Whether the row direction lies close to x or y (so a transpose/flip reaches the standard view)."""
    if orientation is None:
        return True
    a = orientation[:3]
    return max(abs(a[0]), abs(a[1])) >= IN_PLANE_MIN_COS * math.sqrt(a[0] ** 2 + a[1] ** 2 + a[2] ** 2)


def to_canonical(x: np.ndarray, axes: tuple[bool, bool, bool]) -> np.ndarray:
    """``x`` (..., H, W) transposed/flipped by ``canonical_axes`` (a view; no copy)."""
    transpose, flip_h, flip_w = axes
    if transpose:
        x = np.swapaxes(x, -1, -2)
    if flip_h:
        x = x[..., ::-1, :]
    if flip_w:
        x = x[..., ::-1]
    return x


def canonical_geometry(h: SliceHeader) -> tuple[int, int, tuple[float, float] | None]:
    """(rows, cols, (row spacing, col spacing)) of ``h``'s image in the standard view."""
    if canonical_axes(h.orientation)[0]:
        return h.cols, h.rows, (h.spacing[1], h.spacing[0]) if h.spacing else None
    return h.rows, h.cols, h.spacing
