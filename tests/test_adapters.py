"""Real-data adapters on format-faithful synthetic files: RSNA-PE csv, LIDC XML reads, demographics CSV."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from ctssl_core.config import ConfigError
from ctssl_core.data.adapters import lidc
from ctssl_core.data.adapters.demographics import IdentifierColumnsDropped, read_csv
from ctssl_core.data.adapters.rsna_pe import EXAM_COLUMNS, weighted_log_loss
from ctssl_core.data.ingest import IngestConfig, ingest
from ctssl_core.data.pseudonym import Pseudonymiser
from ctssl_core.data.store import SliceStore
from ctssl_core.data.synth import TINY, generate_cohort
from ctssl_core.data.synth_writers import lidc_xml
from ctssl_core.db import connect
from ctssl_core.paths import store_paths


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """TINY synthetic cohort in the RSNA layout (train/<study>/<series>/<sop>.dcm) + LIDC XML + demographics."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = dataclasses.replace(TINY, layout="rsna-pe", workers=1)
    generate_cohort(cfg, root / "cohort", progress=False)
    summary = ingest(root / "cohort", root / "store", IngestConfig(size=64, workers=1), progress=False)
    return root / "cohort", root / "store", summary


def _key(store):
    return Pseudonymiser.for_store(store_paths(store).secret)


def test_rsna_csv_round_trips_to_same_labels(cohort):
    src, store, summary = cohort
    key = _key(store)
    with connect(store_paths(store).db, read_only=True) as con:
        pe = dict(con.execute("SELECT sop_key, pe FROM slices").fetchall())
        exams = {k: (v, json.loads(j)) for k, v, j in
                 con.execute("SELECT study_key, pe_exam, exam_labels FROM studies").fetchall()}
    n = 0
    with open(src / "train.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            assert pe[key("sop", row["SOPInstanceUID"])] == (row["pe_present_on_image"] == "1")
            pe_exam, labels = exams[key("study", row["StudyInstanceUID"])]
            assert labels == {c: int(row[c]) for c in EXAM_COLUMNS}
            assert pe_exam == (row["negative_exam_for_pe"] == "0")
            n += 1
    assert n == len(pe) == summary.slices == summary.labelled_slices == 8 * 16


def test_weighted_log_loss_properties():
    y = np.array([1, 0, 0, 1, 1, 0])
    ex = np.array([0, 0, 0, 1, 1, 1])
    exam_true = {"negative_exam_for_pe": np.array([0, 0]), "central_pe": np.array([1, 0])}
    perfect = weighted_log_loss(y, y, ex, {k: v.astype(float) for k, v in exam_true.items()}, exam_true)
    coin = weighted_log_loss(np.full(6, 0.5), y, ex, {k: np.full(2, 0.5) for k in exam_true}, exam_true)
    assert perfect < 1e-10 and coin == pytest.approx(np.log(2))
    worse = weighted_log_loss(np.where(y == 1, 0.3, 0.7), y, ex, {k: np.full(2, 0.5) for k in exam_true}, exam_true)
    assert worse > coin


def _ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_lidc_contours_rasterise_to_generator_masks(tmp_path):
    rng = np.random.default_rng(0)
    h = w = 64
    sops = [f"1.2.3.{k}" for k in range(6)]
    truth = np.zeros((6, h, w), bool)
    slices = {}
    for k in range(1, 5):
        truth[k] = _ellipse(h, w, rng.uniform(20, 44), rng.uniform(20, 44), rng.uniform(2, 9), rng.uniform(2, 9))
        slices[k] = truth[k]
    xml = tmp_path / "s.xml"
    xml.write_text(lidc_xml("9.9", "8.8", sops, np.arange(6) * 2.0,
                            [{"reader": "r1", "nodules": [{"id": "n1", "texture": 5, "slices": slices}]}]))
    uid, readers = lidc.parse_file(xml)
    assert uid == "9.9" and len(readers) == 1
    ks, masks = lidc.series_masks(readers, sops, list(np.arange(6) * 2.0), h, w)
    assert list(ks) == [1, 2, 3, 4]
    for i, k in enumerate(ks):
        assert _dice(masks[0, i].astype(bool), truth[k]) >= 0.95


@pytest.mark.parametrize("n_readers", [1, 2, 3, 4])
def test_consensus_with_disagreeing_readers(tmp_path, n_readers):
    h = w = 40
    sops = ["a", "b"]
    marks = [np.zeros((h, w), bool) for _ in range(n_readers)]
    for r in range(n_readers):  # reader r outlines a square shifted right by 3r pixels; the last reader may miss it
        if r == 3:
            continue
        marks[r][10:20, 5 + 3 * r:15 + 3 * r] = True
    reads = [{"reader": f"r{r}", "nodules": ([{"id": "n", "texture": 5, "slices": {1: marks[r]}}] if marks[r].any() else [])}
             for r in range(n_readers)]
    xml = tmp_path / "c.xml"
    xml.write_text(lidc_xml("7.7", "6.6", sops, np.array([0.0, 1.0]), reads))
    readers = lidc.parse_reads([xml])["7.7"]
    assert len(readers) == n_readers  # a reader who marked nothing still counts in the denominator
    ks, masks = lidc.series_masks(readers, sops, [0.0, 1.0], h, w)
    votes = np.sum(marks, axis=0)
    for agreement in (0.25, 0.5, 0.75, 1.0):
        need = max(1, int(np.ceil(agreement * n_readers)))
        got = lidc.consensus(masks, n_readers, agreement)[0]
        np.testing.assert_array_equal(got, votes >= need)


def test_ingested_consensus_matches_nodule_truth(cohort):
    src, store, summary = cohort
    key = _key(store)
    truth = json.loads((src / "truth.json").read_text())
    with connect(store_paths(store).db, read_only=True) as con:
        where = {sop: (path, idx) for sop, path, idx in con.execute(
            "SELECT sop_key, mask_path, idx FROM slices JOIN series USING (series_key)").fetchall()}
    sops_by_series = {}
    with open(src / "train.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            sops_by_series.setdefault(row["SeriesInstanceUID"], []).append(row["SOPInstanceUID"])
    inter = total = 0
    dices = []
    for p in truth["patients"]:
        f = src / "nodule_masks" / f"{p['series_uid']}.npz"
        if not f.exists():
            continue
        tmask = np.load(f)["mask"].astype(bool)  # (S, H, W) generator truth at DICOM resolution
        got = np.zeros_like(tmask)
        for k, sop in enumerate(sops_by_series[p["series_uid"]]):
            path, idx = where[key("sop", sop)]
            got[k] = np.load(store / path)[idx] > 0
        inter += np.logical_and(got, tmask).sum()
        total += got.sum() + tmask.sum()
        dices.append(_dice(got, tmask))
    assert summary.nodule_series == 8 and len(dices) >= 3
    # readers jitter contours (~8%) and small nodules are sometimes missed: consensus still tracks the truth
    assert 2 * inter / total >= 0.85 and min(dices) >= 0.75


def test_demographics_csv_overrides_tags_and_reports_mismatches(cohort, tmp_path):
    src, store, _ = cohort
    rows = list(csv.DictReader(open(src / "demographics.csv", newline="")))
    out = tmp_path / "demo.csv"
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["PatientID", "age", "sex", "race", "smoker"])
        for r in rows[1:]:  # first patient left out on purpose
            w.writerow([r["PatientID"], float(r["age"]) + 1, r["sex"], "Override", "yes"])
        w.writerow(["NOT-A-PATIENT", 40, "F", "X", "no"])
    s = ingest(src, store, IngestConfig(size=64, workers=1, demographics=str(out)), progress=False)
    assert s.files_new == 0 and s.demographics_rows == len(rows)
    assert s.demographics_unmatched_lines == [len(rows) + 1] and s.patients_without_demographics == 1
    assert "matched no ingested patient" in s.table() and "NOT-A-PATIENT" not in s.table()
    key = _key(store)
    with connect(store_paths(store).db, read_only=True) as con:
        got = {k: (a, r, json.loads(at)) for k, a, r, at in
               con.execute("SELECT patient_key, age, race, attributes FROM patients").fetchall()}
    for r in rows[1:]:
        age, race, attrs = got[key("patient", r["PatientID"])]
        assert race == "Override" and age == pytest.approx(float(r["age"]) + 1) and attrs["smoker"] == "yes"
    age0, race0, _ = got[key("patient", rows[0]["PatientID"])]
    assert race0 == rows[0]["race"] and race0 != "Override"  # untouched patient keeps the earlier values
    pats = SliceStore.open(store).patients  # extra CSV columns become patient columns for the analyses
    assert {"smoker", "control_group", "site"} <= set(pats.columns)
    assert (pats.set_index("patient_key").loc[key("patient", rows[1]["PatientID"]), "smoker"]) == "yes"


def test_demographics_keyed_by_study_and_bad_csv(cohort, tmp_path):
    src, store, _ = cohort
    truth = json.loads((src / "truth.json").read_text())
    p0 = truth["patients"][0]
    f = tmp_path / "by_study.csv"
    f.write_text(f"StudyInstanceUID,race,site\n{p0['study_uid']},ByStudy,site_z\n")
    ingest(src, store, IngestConfig(size=64, workers=1, demographics=str(f)), progress=False)
    key = _key(store)
    with connect(store_paths(store).db, read_only=True) as con:
        race = con.execute("SELECT race FROM patients WHERE patient_key = ?", [key("patient", p0["patient_id"])]).fetchone()
        site = con.execute("SELECT site FROM series WHERE study_key = ?", [key("study", p0["study_uid"])]).fetchone()
    assert race == ("ByStudy",) and site == ("site_z",)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,age\nx,3\n")
    with pytest.raises(ConfigError, match="PatientID or StudyInstanceUID"):
        read_csv(bad)
    with pytest.raises(ConfigError, match="not found"):
        ingest(src, store, IngestConfig(demographics=str(tmp_path / "missing.csv")), progress=False)


def test_lidc_layout_xml_beside_dicom(tmp_path):
    """Real LIDC-IDRI keeps an arbitrarily named XML inside each case folder; --format lidc finds it."""
    import pydicom
    from dicom_fixtures import phantom, write_series

    case = tmp_path / "LIDC-IDRI-0001" / "study" / "series"
    paths = write_series(case, phantom(5, 32, 32), patient_id="LIDC-0001", pixel_spacing=(1.0, 1.0))
    dss = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    blob = _ellipse(32, 32, 16, 12, 4, 6)
    reads = [{"reader": f"r{r}", "nodules": [{"id": "n1", "texture": 5, "slices": {2: blob}}]} for r in range(2)]
    (case / "069.xml").write_text(lidc_xml(str(dss[0].SeriesInstanceUID), str(dss[0].StudyInstanceUID),
                                           [str(d.SOPInstanceUID) for d in dss],
                                           np.array([float(d.ImagePositionPatient[2]) for d in dss]), reads))
    s = ingest(tmp_path, tmp_path / "store", IngestConfig(size=32, workers=1, format="lidc"), progress=False)
    assert s.dataset == "lidc" and s.nodule_series == 1 and s.errors == 0  # the XML is not a bad DICOM file
    st = SliceStore.open(tmp_path / "store")
    np.testing.assert_array_equal(st.labels("nodule_px"), [0, 0, blob.sum(), 0, 0])
    np.testing.assert_array_equal(st.read_mask([2])[0].astype(bool), blob)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no XML reads"):
        ingest(tmp_path / "empty", tmp_path / "s2", IngestConfig(format="lidc"), progress=False)


def test_rsna_csv_without_key_columns_is_refused(tmp_path):
    from ctssl_core.data.adapters.rsna_pe import load_labels

    (tmp_path / "train.csv").write_text("StudyInstanceUID,SOPInstanceUID\n1.2,1.2.3\n")
    with pytest.raises(ConfigError, match="pe_present_on_image.*--format generic"):
        load_labels(tmp_path / "train.csv")
    ok = tmp_path / "ok.csv"
    ok.write_text("StudyInstanceUID,SeriesInstanceUID,SOPInstanceUID,pe_present_on_image,negative_exam_for_pe\n"
                  "1.2,1.3,1.2.3.1,1,0\n1.2,1.3,1.2.3.2,0,0\n")
    lab = load_labels(ok)
    assert lab.pe_of(["1.2.3.1", "1.2.3.2", "9.9"]) == {"1.2.3.1": True, "1.2.3.2": False}
    assert lab.exams_of(["1.2"]) == {"1.2": {"negative_exam_for_pe": 0}}
    lab.close()


def test_no_uid_or_patient_id_in_store_for_rsna_layout(cohort):
    """RSNA names folders and files after UIDs: none of them may reach the catalog or any stored file."""
    src, store, _ = cohort
    rows = list(csv.DictReader(open(src / "train.csv", newline="")))
    demo = list(csv.DictReader(open(src / "demographics.csv", newline="")))
    needles = {r["SOPInstanceUID"] for r in rows[:20]} | {r["StudyInstanceUID"] for r in rows}
    needles |= {r["SeriesInstanceUID"] for r in rows} | {d["PatientID"] for d in demo}
    with connect(store_paths(store).db, read_only=True) as con:
        dump = "\n".join(str(con.execute(f"SELECT * FROM {t}").fetchall())
                         for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall())
    blobs = [p.read_bytes() for p in store.rglob("*") if p.is_file()]
    for s in needles:
        assert s not in dump and not any(s.encode() in b for b in blobs), s


def _demo_csv(path, n, extra_header, extra_row):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["PatientID", "age", "sex", "race", "site", *extra_header])
        for i in range(n):
            w.writerow([f"P{i:03d}", 40 + i, "F" if i % 2 else "M", "A" if i % 3 else "B", f"s{i % 2}",
                        *extra_row(i)])


def test_identifier_columns_dropped_by_name_and_by_uniqueness(tmp_path):
    f = tmp_path / "d.csv"
    header = ["Patient Name", "DOB", "MRN", "E-mail", "hospital_no", "weight", "smoker"]
    _demo_csv(f, 11, header, lambda i: [f"Doe^Jane{i}", f"1960010{i % 9}", f"M{i:06d}", f"p{i}@x.org",
                                        f"H-{i:04d}", 60.5 + i, "yes" if i % 2 else "no"])
    kind, rows, dropped = read_csv(f)
    assert kind == "patient" and len(rows) == 11
    assert set(dropped) == {"Patient Name", "DOB", "MRN", "E-mail", "hospital_no"}
    assert dropped["DOB"] == "its name contains 'dob'" and dropped["MRN"] == "its name contains 'mrn'"
    assert "11 patients" in dropped["hospital_no"]  # caught by content: unique text per patient
    for _, _, vals in rows:  # attributes kept, numeric unique columns (weight, age) too
        assert set(vals) == {"age", "sex", "race", "site", "weight", "smoker"}
    # at the threshold (10 patients) a unique text column is kept; a shared value keeps it at any size
    _demo_csv(f, 10, ["hospital_no"], lambda i: [f"H-{i:04d}"])
    assert read_csv(f)[2] == {}
    _demo_csv(f, 12, ["ward"], lambda i: [f"W{i}" if i else "W1"])
    assert read_csv(f)[2] == {}


def test_demographics_identifier_columns_never_reach_the_catalog(cohort, tmp_path):
    src, store, _ = cohort
    rows = list(csv.DictReader(open(src / "demographics.csv", newline="")))
    out = tmp_path / "hospital_export.csv"
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["PatientID", "PatientName", "BirthDate", "mrn", "bmi_group"])
        for i, r in enumerate(rows):
            w.writerow([r["PatientID"], f"Secretname^{i}", f"1955-02-{i + 10}", f"MRN-SECRET-{i}", "high"])
    with pytest.warns(IdentifierColumnsDropped) as got:
        s = ingest(src, store, IngestConfig(size=64, workers=1, demographics=str(out)), progress=False)
    msg = str(got[0].message)
    assert all(c in msg for c in ("'PatientName'", "'BirthDate'", "'mrn'")) and "bmi_group" not in msg
    assert "Secretname" not in msg and "MRN-SECRET" not in msg and "1955" not in msg
    assert s.demographics_dropped_columns == ["BirthDate", "PatientName", "mrn"]
    assert "identifier-like columns not stored: BirthDate, PatientName, mrn (rename" in s.table()
    with connect(store_paths(store).db, read_only=True) as con:
        attrs = [json.loads(a) for (a,) in con.execute("SELECT attributes FROM patients").fetchall()]
        every = repr(con.execute("SELECT * FROM patients").fetchall())
    assert len(attrs) == len(rows) and all(a["bmi_group"] == "high" for a in attrs)
    assert not any({"PatientName", "BirthDate", "mrn"} & set(a) for a in attrs)
    assert "Secretname" not in every and "MRN-SECRET" not in every and "1955-02" not in every
