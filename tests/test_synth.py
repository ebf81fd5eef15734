"""The synthetic cohort: DICOM round trip, tags, determinism, planted effects, labels and reads."""

from __future__ import annotations

import csv
import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctssl_core.config import ConfigError, build
from ctssl_core.data.phantom import phantom_volume
from ctssl_core.data.synth import (
    STREAM_RENDER,
    TINY,
    SynthConfig,
    _rng,
    generate_cohort,
    sample_demographics,
    sample_patient,
)
from ctssl_core.data.synth_writers import RSNA_COLUMNS, RSNA_EXAM_COLUMNS

NS = {"l": "http://www.nih.gov"}
SMALL = dataclasses.replace(TINY, n_patients=12, slices_per_exam=10, image_size=48)


def render(cfg: SynthConfig, i: int, demographics=None, masks_out=None, **param_changes):
    p = sample_patient(cfg, i, demographics)
    p = dataclasses.replace(p, **param_changes) if param_changes else p
    return phantom_volume(p, _rng(cfg, i, STREAM_RENDER), masks_out)


def series_files(cohort: Path, patient_id: str) -> list[Path]:
    return sorted((cohort / "dicom" / patient_id).rglob("*.dcm"))


# ------------------------------------------------------------------ DICOM


def test_dicom_round_trips_to_generated_hu(tiny_cohort):
    signed_seen = set()
    for i in range(TINY.n_patients):
        hu, _, _ = render(TINY, i)
        files = series_files(tiny_cohort, f"SYN{i + 1:04d}")
        assert len(files) == TINY.slices_per_exam
        for f in files:
            ds = pydicom.dcmread(f)
            k = int(ds.InstanceNumber) - 1
            back = ds.pixel_array.astype(np.int32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            np.testing.assert_array_equal(back, hu[k])
            signed_seen.add(int(ds.PixelRepresentation))
    assert signed_seen == {0, 1}  # both scanner pixel encodings are exercised


def test_required_tags_and_geometry(tiny_cohort):
    truth = json.loads((tiny_cohort / "truth.json").read_text())
    rec = truth["patients"][0]
    files = series_files(tiny_cohort, rec["patient_id"])
    dss = [pydicom.dcmread(f) for f in files]
    ds = dss[0]
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2" == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    for tag in ("RescaleSlope", "RescaleIntercept", "PixelSpacing", "SliceThickness", "ImagePositionPatient",
                "ImageOrientationPatient", "InstanceNumber", "StudyInstanceUID", "SeriesInstanceUID",
                "PatientName", "PatientID", "PatientBirthDate", "PatientAge", "PatientSex", "EthnicGroup",
                "Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "InstitutionName"):
        assert tag in ds, tag
    assert ds.Modality == "CT" and ds.Rows == ds.Columns == TINY.image_size
    assert ds.PatientID == rec["patient_id"] and str(ds.PatientName) == "SYN^PATIENT0001"
    assert ds.PatientAge == f"{int(rec['age']):03d}Y" and ds.PatientSex == rec["sex"] and ds.EthnicGroup == rec["race"]
    assert ds.StudyInstanceUID == rec["study_uid"] and ds.SeriesInstanceUID == rec["series_uid"]
    age_from_birth = (int(ds.StudyDate[:4]) - int(ds.PatientBirthDate[:4])
                      - ((ds.StudyDate[4:]) < ds.PatientBirthDate[4:]))
    assert age_from_birth == int(rec["age"])
    # slices ordered apex -> base: z falls by the slice spacing, instance numbers rise
    z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
    assert np.allclose(np.diff(z), -rec["params"]["slice_spacing_mm"], atol=1e-3)
    assert [int(d.InstanceNumber) for d in dss] == list(range(1, len(dss) + 1))
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)
    assert float(ds.PixelSpacing[0]) == pytest.approx(rec["params"]["pixel_spacing_mm"], rel=1e-5)


def test_determinism_independent_of_workers(tmp_path):
    cfg = dataclasses.replace(TINY, n_patients=3, slices_per_exam=6, image_size=40, seed=7)
    a = generate_cohort(dataclasses.replace(cfg, workers=1), tmp_path / "a", progress=False)
    b = generate_cohort(dataclasses.replace(cfg, workers=2), tmp_path / "b", progress=False)
    assert a.n_slices == b.n_slices == 18
    fa = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    fb = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert fa == fb
    for rel in fa:
        if rel.name in ("manifest.json",):
            continue
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    c = generate_cohort(dataclasses.replace(cfg, seed=8), tmp_path / "c", progress=False)
    assert c.n_slices == 18
    d0 = next((tmp_path / "a" / "dicom").rglob("0003.dcm"))
    d1 = next((tmp_path / "c" / "dicom").rglob("0003.dcm"))
    assert pydicom.dcmread(d0).PixelData != pydicom.dcmread(d1).PixelData  # another seed, another cohort


def test_complete_cohort_is_reused_and_changed_config_regenerates(tmp_path):
    cfg = dataclasses.replace(TINY, n_patients=2, slices_per_exam=5, image_size=32)
    m1 = generate_cohort(cfg, tmp_path, progress=False)
    assert not m1.reused and (tmp_path / "manifest.json").exists()
    f = next((tmp_path / "dicom").rglob("*.dcm"))
    before = f.stat().st_mtime_ns
    m2 = generate_cohort(dataclasses.replace(cfg, workers=2), tmp_path, progress=False)  # workers don't matter
    assert m2.reused and f.stat().st_mtime_ns == before and m2.n_slices == 10
    m3 = generate_cohort(dataclasses.replace(cfg, n_patients=1), tmp_path, progress=False)
    assert not m3.reused and m3.n_patients == 1
    assert len(list((tmp_path / "dicom").iterdir())) == 1  # the old patient's files are gone


def test_foreign_folder_is_never_overwritten(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not written by `ctssl synth`"):
        generate_cohort(dataclasses.replace(TINY, n_patients=1), tmp_path, progress=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="is a file"):
        generate_cohort(dataclasses.replace(TINY, n_patients=1), tmp_path / "precious.txt", progress=False)


# ------------------------------------------------------------------ anatomy


def test_left_right_up_down_and_neighbouring_slices():
    cfg = dataclasses.replace(TINY, image_size=96, slices_per_exam=24)
    hu, _, _ = render(cfg, 0)
    mid = hu[14].astype(np.float32)  # heart level
    noise = np.abs(np.diff(hu[14, :10, :10].astype(np.float32), axis=1)).mean()  # air: noise only
    lr = np.abs(mid - mid[:, ::-1]).mean()
    ud = np.abs(mid - mid[::-1, :]).mean()
    assert lr > 4 * noise and ud > 4 * noise
    # the heart (contrast-filled ventricles) sits on the patient's left = image right
    half = mid.shape[1] // 2
    bright = (mid > 150) & (mid < 400)
    assert bright[:, half:].sum() > 1.3 * bright[:, :half].sum()
    # neighbours are similar but not identical; far slices differ more
    d1 = np.abs(hu[10].astype(np.float32) - hu[11]).mean()
    d8 = np.abs(hu[10].astype(np.float32) - hu[18]).mean()
    assert 0 < d1 < d8


# ------------------------------------------------------------------ planted effects


def _lung_mean(cfg, i, demographics=None):
    masks = {}
    hu, _, _ = render(cfg, i, demographics, masks)
    lungs = masks["lungs"]
    lungs[:, :2] = lungs[:, -2:] = False
    return float(hu[lungs].mean())


def test_lung_attenuation_falls_with_age_and_only_with_age_effect():
    ages = np.linspace(25, 85, SMALL.n_patients)

    def slope(cfg):
        vals = []
        for i, age in enumerate(ages):
            demo = {**sample_demographics(cfg, i), "age": float(age)}
            vals.append(_lung_mean(cfg, i, demo))
        return np.polyfit(ages, vals, 1)[0]

    s1 = slope(SMALL)
    s0 = slope(dataclasses.replace(SMALL, age_effect=0.0))
    assert -2.3 < s1 < -0.8  # planted: -1.5 HU per year
    assert abs(s0) < 0.5


def test_bone_density_falls_with_age():
    young = sample_patient(SMALL, 0, {**sample_demographics(SMALL, 0), "age": 30.0})
    old = sample_patient(SMALL, 0, {**sample_demographics(SMALL, 0), "age": 80.0})
    assert old.bone_cancellous_hu - young.bone_cancellous_hu == pytest.approx(-100.0)
    assert old.lung_hu - young.lung_hu == pytest.approx(-75.0)


def test_control_group_has_no_imaging_correlate():
    for i in range(3):
        demo = sample_demographics(SMALL, i)
        other = [c for c in SMALL.control_labels if c != demo["control_group"]][0]
        a = render(SMALL, i, demo)[0]
        b = render(SMALL, i, {**demo, "control_group": other})[0]
        assert np.array_equal(a, b)
    # the label is not among the rendering inputs at all: parameters equal apart from the label itself
    demo = sample_demographics(SMALL, 0)
    flipped = {**demo, "control_group": [c for c in SMALL.control_labels if c != demo["control_group"]][0]}
    pa = dataclasses.asdict(sample_patient(SMALL, 0, demo))
    pb = dataclasses.asdict(sample_patient(SMALL, 0, flipped))
    assert {k for k in pa if pa[k] != pb[k]} == {"control_group"}


def test_race_effect_zero_means_no_race_correlate():
    cfg0 = dataclasses.replace(SMALL, race_effect=0.0)
    cfg1 = dataclasses.replace(SMALL, race_effect=1.0)
    demo = sample_demographics(cfg0, 1)
    a, b = ({**demo, "race": r} for r in ("RaceA", "RaceB"))
    assert np.array_equal(render(cfg0, 1, a)[0], render(cfg0, 1, b)[0])
    pa, pb = sample_patient(cfg1, 1, a), sample_patient(cfg1, 1, b)
    assert pb.fat_hu - pa.fat_hu == pytest.approx(12.0)  # planted: +12 HU per race code
    assert pb.body_ap_mm > pa.body_ap_mm
    diff = render(cfg1, 1, b)[0].astype(np.int32) - render(cfg1, 1, a)[0]
    assert np.abs(diff).max() > 0 and diff.mean() > 0


def test_sex_changes_habitus():
    f = sample_patient(SMALL, 2, {**sample_demographics(SMALL, 2), "sex": "F"})
    m = sample_patient(SMALL, 2, {**sample_demographics(SMALL, 2), "sex": "M"})
    assert m.body_w_mm > f.body_w_mm and f.fat_mm > m.fat_mm and f.breast_mm > 0 == m.breast_mm
    s0 = dataclasses.replace(SMALL, sex_effect=0.0)
    demo = sample_demographics(s0, 2)
    assert np.array_equal(render(s0, 2, {**demo, "sex": "F"})[0], render(s0, 2, {**demo, "sex": "M"})[0])


# ------------------------------------------------------------------ labels


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_csv_matches_truth_and_is_consistent(tiny_cohort):
    rows = _read_csv(tiny_cohort / "train.csv")
    with open(tiny_cohort / "train.csv") as fh:
        assert tuple(fh.readline().strip().split(",")) == RSNA_COLUMNS
    truth = json.loads((tiny_cohort / "truth.json").read_text())
    assert len(rows) == TINY.n_patients * TINY.slices_per_exam
    n_pos = 0
    for rec in truth["patients"]:
        mine = [r for r in rows if r["StudyInstanceUID"] == rec["study_uid"]]
        assert {r["SeriesInstanceUID"] for r in mine} == {rec["series_uid"]}
        sops = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                for f in series_files(tiny_cohort, rec["patient_id"])]
        assert [r["SOPInstanceUID"] for r in mine] == sops
        pe = [int(r["pe_present_on_image"]) for r in mine]
        assert [k for k, v in enumerate(pe) if v] == rec["pe_slices"]
        for col in RSNA_EXAM_COLUMNS:
            assert len({r[col] for r in mine}) == 1, col  # exam-level columns repeated per row
        ex = {c: int(mine[0][c]) for c in RSNA_EXAM_COLUMNS}
        assert ex == rec["exam_labels"]
        if any(pe):
            n_pos += 1
            assert ex["negative_exam_for_pe"] == 0
            assert ex["rv_lv_ratio_gte_1"] + ex["rv_lv_ratio_lt_1"] == 1
            assert ex["leftsided_pe"] + ex["rightsided_pe"] + ex["central_pe"] >= 1
            assert ex["chronic_pe"] + ex["acute_and_chronic_pe"] <= 1
        else:
            assert ex["negative_exam_for_pe"] == 1
            assert sum(v for c, v in ex.items() if c != "negative_exam_for_pe") == 0
    assert 0 < n_pos < TINY.n_patients


def test_pe_defects_darken_the_contrast_column_on_labelled_slices():
    cfg = dataclasses.replace(TINY, image_size=96, slices_per_exam=24, pe_fraction=1.0)
    p = sample_patient(cfg, 0)
    assert p.pe_defects
    hu, _, pe = phantom_volume(p, _rng(cfg, 0, STREAM_RENDER))
    clean, _, pe0 = phantom_volume(dataclasses.replace(p, pe_defects=[]), _rng(cfg, 0, STREAM_RENDER))
    assert pe.any() and not pe0.any()
    diff = hu.astype(np.int32) - clean  # identical noise: only the defects differ
    per_slice = diff.reshape(len(pe), -1).min(1)
    assert (per_slice[pe] < -100).all()  # filling defect: contrast (~320 HU) replaced by clot (~55 HU)
    near = np.convolve(pe.astype(int), [1, 1, 1], mode="same") > 0  # thick-slice averaging reaches +-1 slice
    assert (diff.reshape(len(pe), -1)[~near] == 0).all()
    assert (diff <= 0).all()


def test_demographics_csv(tiny_cohort):
    rows = _read_csv(tiny_cohort / "demographics.csv")
    assert list(rows[0]) == ["PatientID", "age", "sex", "race", "control_group", "site"]
    assert [r["PatientID"] for r in rows] == [f"SYN{i + 1:04d}" for i in range(TINY.n_patients)]
    assert {r["sex"] for r in rows} <= {"F", "M"} and {r["race"] for r in rows} <= set(TINY.race_labels)
    truth = json.loads((tiny_cohort / "truth.json").read_text())
    assert "not claims about real people" in truth["notice"]
    assert truth["planted_effects"]["control_group"]["effect"] == "none"
    assert truth["effect_sizes"]["race_effect"] == TINY.race_effect


# ------------------------------------------------------------------ LIDC reads


def _parse_reads(xml_path: Path):
    root = ET.parse(xml_path).getroot()
    assert root.tag == "{http://www.nih.gov}LidcReadMessage"
    out = []
    for session in root.findall("l:readingSession", NS):
        for nod in session.findall("l:unblindedReadNodule", NS):
            for roi in nod.findall("l:roi", NS):
                pts = [(int(e.find("l:xCoord", NS).text), int(e.find("l:yCoord", NS).text))
                       for e in roi.findall("l:edgeMap", NS)]
                out.append((session.find("l:servicingRadiologistID", NS).text, nod.find("l:noduleID", NS).text,
                            roi.find("l:imageSOP_UID", NS).text, float(roi.find("l:imageZposition", NS).text),
                            roi.find("l:inclusion", NS).text, pts))
    return root, out


@pytest.mark.parametrize("jitter", [0.0, 0.08])
def test_lidc_contours_lie_on_the_nodule_mask(tmp_path, jitter):
    cfg = dataclasses.replace(TINY, n_patients=3, slices_per_exam=12, image_size=96, nodule_fraction=1.0,
                              pe_fraction=0.0, reader_jitter=jitter, reader_miss_prob=0.0)
    generate_cohort(cfg, tmp_path, progress=False)
    truth = json.loads((tmp_path / "truth.json").read_text())
    n_rois = 0
    for rec in truth["patients"]:
        mask = np.load(tmp_path / "nodule_masks" / f"{rec['series_uid']}.npz")["mask"]
        assert sorted(set(np.nonzero(mask)[0].tolist())) == rec["nodule_slices"]
        dss = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: pydicom.dcmread(f, stop_before_pixels=True)
               for f in series_files(tmp_path, rec["patient_id"])}
        root, rois = _parse_reads(tmp_path / "lidc_xml" / f"{rec['series_uid']}.xml")
        readers = {r[0] for r in rois}
        assert 1 <= rec["n_readers"] <= 4 and readers <= {f"reader_{j + 1}" for j in range(rec["n_readers"])}
        assert len(root.findall("l:readingSession", NS)) == rec["n_readers"]
        grown = mask.astype(bool).copy()
        grown[:, 1:] |= grown[:, :-1].copy(); grown[:, :-1] |= grown[:, 1:].copy()  # noqa: E702
        grown[:, :, 1:] |= grown[:, :, :-1].copy(); grown[:, :, :-1] |= grown[:, :, 1:].copy()  # noqa: E702
        for _, _, sop, z, incl, pts in rois:
            ds = dss[sop]
            k = int(ds.InstanceNumber) - 1
            assert z == pytest.approx(float(ds.ImagePositionPatient[2]), abs=1e-3) and incl == "TRUE"
            assert pts[0] == pts[-1]  # closed contour
            xs, ys = np.array(pts).T
            assert xs.max() < cfg.image_size and ys.max() < cfg.image_size
            target = mask[k].astype(bool) if jitter == 0 else grown[k]
            hit = target[ys, xs].mean()
            assert hit == 1.0 if jitter == 0 else hit >= 0.8
            n_rois += 1
    assert n_rois > 0


# ------------------------------------------------------------------ config


def test_bad_config_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="n_patients"):
        build(SynthConfig, {"n_patient": 3})
    with pytest.raises(ConfigError, match=">= 1"):
        build(SynthConfig, {"n_patients": -1})
    with pytest.raises(ConfigError, match="between 0 and 1"):
        SynthConfig(pe_fraction=1.5)
    with pytest.raises(ConfigError, match="n_sites"):
        SynthConfig(n_sites=99)
    with pytest.raises(ConfigError, match="race_weights"):
        SynthConfig(race_labels=("X", "Y"), race_weights=(1.0,))
    with pytest.raises(ConfigError, match="image_size"):
        build(SynthConfig, {}, ["image_size=8"])
    cfg = build(SynthConfig, {"n_patients": 5}, ["race_effect=0", "layout=rsna-pe"])
    assert cfg.n_patients == 5 and cfg.race_effect == 0.0 and cfg.layout == "rsna-pe"


def test_rsna_layout_names_files_by_sop(tmp_path):
    cfg = dataclasses.replace(TINY, n_patients=1, slices_per_exam=4, image_size=32, layout="rsna-pe")
    generate_cohort(cfg, tmp_path, progress=False)
    rows = _read_csv(tmp_path / "train.csv")
    for r in rows:
        f = tmp_path / "train" / r["StudyInstanceUID"] / r["SeriesInstanceUID"] / f"{r['SOPInstanceUID']}.dcm"
        assert pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == r["SOPInstanceUID"]


def test_cli_synth(tmp_path, capsys):
    from ctssl_core.cli import main

    out = tmp_path / "c"
    assert main(["synth", "--preset", "tiny", "--out", str(out), "--set", "n_patients=1",
                 "--set", "slices_per_exam=4", "--no-progress"]) == 0
    assert "patients 1, slices 4" in capsys.readouterr().out
    assert main(["synth", "--preset", "tiny", "--out", str(out), "--set", "n_patients=1",
                 "--set", "slices_per_exam=4", "--no-progress"]) == 0
    assert "reused" in capsys.readouterr().out
    assert main(["synth", "--out", str(out), "--set", "n_patients=0"]) == 2
    assert ">= 1" in capsys.readouterr().err


def test_noise_is_spatially_correlated_with_the_site_level():
    cfg = dataclasses.replace(TINY, image_size=96, slices_per_exam=6)
    p = sample_patient(cfg, 0)
    clean, _, _ = phantom_volume(dataclasses.replace(p, noise_hu=0.0), _rng(cfg, 0, STREAM_RENDER))
    noisy, _, _ = phantom_volume(dataclasses.replace(p, noise_hu=40.0), _rng(cfg, 0, STREAM_RENDER))
    noise = noisy.astype(np.float32) - clean  # same random stream: the difference is the noise alone
    ok = (clean > -900) & (clean < 2000)  # away from the -1024 clip
    both = ok[:, :, 1:] & ok[:, :, :-1]
    a, b = noise[:, :, 1:][both], noise[:, :, :-1][both]
    assert 34 < noise[ok].std() < 46
    assert np.corrcoef(a, b)[0, 1] > 0.2  # CT-like texture, not i.i.d. pixel noise


def test_phantom_imports_and_renders_without_pydicom():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pydicom'] = None\n"
        "from ctssl_core.data.synth import TINY, sample_patient, _rng, STREAM_RENDER\n"
        "from ctssl_core.data.phantom import phantom_volume\n"
        "hu, m, pe = phantom_volume(sample_patient(TINY, 0), _rng(TINY, 0, STREAM_RENDER))\n"
        "print(hu.dtype, hu.shape, m.dtype, pe.dtype)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["int16", "(16,", "64,", "64)", "uint8", "bool"]
