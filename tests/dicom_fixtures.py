"""Small pydicom writers for CT fixtures, including the oddities real scanners produce.

Used by the ingest/dicom/fuzz tests and by ``experiments/bench_ingest.py``; no
dependency on ``data/synth.py`` so the ingest tests stand on their own.
Every identifier written here is fake; tests search the store for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def phantom(s: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic HU volume (S, H, W) int16 whose slices all differ (so order is checkable)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.where(((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 < 1, 40, -1000)
    vol = np.empty((s, h, w), np.int16)
    for k in range(s):
        blob = ((yy - h * (0.3 + 0.4 * k / max(s, 1))) ** 2 + (xx - w / 3) ** 2) < (h / 8) ** 2
        vol[k] = base + 300 * blob + rng.integers(-20, 20, (h, w)) + k
    return vol


def ct_dataset(
    hu: np.ndarray,
    *,
    patient_id: str = "PID-SECRET-0001",
    patient_name: str = "Doe^Secretname",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    position: Sequence[float] | None = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | None = AXIAL,
    pixel_spacing: Sequence[float] | None = (0.7, 0.7),
    slice_thickness: float | None = 1.0,
    instance_number: int | None = 1,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    age: str | None = "063Y",
    sex: str | None = "F",
    ethnic: str | None = "GroupA",
    gantry_tilt: float | None = None,
    signed: bool = False,
) -> Dataset:
    """A CT Image Storage dataset whose stored values map to ``hu`` via slope/intercept."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop_uid = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19600101"
    ds.InstitutionName = "Secret General Hospital"
    ds.AccessionNumber = "ACC-SECRET-77"
    if age is not None:
        ds.PatientAge = age
    if sex is not None:
        ds.PatientSex = sex
    if ethnic is not None:
        ds.EthnicGroup = ethnic
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.Manufacturer = "FixtureCorp"
    ds.ManufacturerModelName = "Fix-64"
    ds.ConvolutionKernel = "B30f"
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if slice_thickness is not None:
        ds.SliceThickness = slice_thickness
    if gantry_tilt is not None:
        ds.GantryDetectorTilt = gantry_tilt
    s, i = (slope or 1.0), (intercept or 0.0)
    stored = np.round((hu.astype(np.float64) - i) / s)
    if signed:
        stored = stored.astype(np.int16)
    else:
        stored = np.clip(stored, 0, 65535).astype(np.uint16)
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = stored.tobytes()
    return ds


def save(ds: Dataset, path: str | Path, syntax: str = "explicit_le") -> Path:
    """Write with one of: explicit_le, implicit_le, explicit_be, rle, jpeg2000, jpegls, jpeg_lossless."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if syntax in ("rle", "jpeg2000", "jpegls", "jpeg_lossless"):
        from pydicom import uid

        ts = {"rle": uid.RLELossless, "jpeg2000": uid.JPEG2000Lossless, "jpegls": uid.JPEGLSLossless,
              "jpeg_lossless": uid.JPEGLosslessSV1}[syntax]
        ds.compress(ts)
        ds.save_as(path, enforce_file_format=True)
        return path
    if syntax == "explicit_be":
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        arr = np.frombuffer(ds.PixelData, dtype="<i2" if ds.PixelRepresentation else "<u2")
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
        ds.save_as(path, enforce_file_format=True, little_endian=False, implicit_vr=False)
        return path
    if syntax == "implicit_le":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True, implicit_vr=True, little_endian=True)
        return path
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    out_dir: str | Path,
    vol_hu: np.ndarray,
    *,
    spacing_z: float = 1.5,
    z0: float = -100.0,
    names: Sequence[str] | None = None,
    syntax: str = "explicit_le",
    **kw,
) -> list[Path]:
    """Write a volume (S, H, W) as one file per slice; returns paths in z order (slice 0 = lowest z)."""
    out_dir = Path(out_dir)
    kw.setdefault("study_uid", generate_uid())
    kw.setdefault("series_uid", generate_uid())
    paths = []
    for k in range(vol_hu.shape[0]):
        ds = ct_dataset(vol_hu[k], position=(-120.0, -120.0, z0 + k * spacing_z), instance_number=k + 1,
                        slice_thickness=spacing_z, **kw)
        name = names[k] if names is not None else f"{k:04d}.dcm"
        paths.append(save(ds, out_dir / name, syntax))
    return paths


def enhanced_ct(vol_hu: np.ndarray, *, spacing_z: float = 2.0, z0: float = 0.0, **kw) -> Dataset:
    """An Enhanced CT (multi-frame) dataset: per-frame positions in functional groups."""
    ds = ct_dataset(vol_hu[0], **{**kw, "position": None, "orientation": None, "pixel_spacing": None,
                                  "slope": None, "intercept": None, "instance_number": 1})
    ds.SOPClassUID = ENHANCED_CT
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.NumberOfFrames = vol_hu.shape[0]
    shared = Dataset()
    po = Dataset()
    po.ImageOrientationPatient = list(AXIAL)
    pm = Dataset()
    pm.PixelSpacing = [0.8, 0.8]
    pm.SliceThickness = spacing_z
    pvt = Dataset()
    pvt.RescaleSlope = 1.0
    pvt.RescaleIntercept = -1024.0
    shared.PlaneOrientationSequence = [po]
    shared.PixelMeasuresSequence = [pm]
    shared.PixelValueTransformationSequence = [pvt]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in range(vol_hu.shape[0]):
        fg = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [-100.0, -100.0, z0 + k * spacing_z]
        fg.PlanePositionSequence = [pp]
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.clip(vol_hu.astype(np.int32) + 1024, 0, 65535).astype(np.uint16).tobytes()
    return ds
