"""README "Run it on your data", followed literally through the `ctssl` command line, on tiny data written by the
project's real writers (`ctssl synth`, i.e. ``data/synth_writers.py``) and laid out as each dataset ships:

* RSNA STR PE (``train/<Study>/<Series>/<SOP>.dcm`` + ``train.csv``) -> `ctssl ingest --format rsna-pe` -> the Data
  page -> `ctssl finetune --task pe` -> `ctssl benchmark` (which must use the user's store, not synthesize one);
* LIDC-IDRI (``LIDC-IDRI-xxxx/<study>/<series>/`` with the XML reads beside the DICOM) -> `ctssl ingest --format
  lidc` -> `ctssl finetune --task nodule`;
* your own DICOM + a demographics CSV with an extra column -> `ctssl ingest --demographics` -> `ctssl embed` ->
  `ctssl bias` on that extra attribute.

Smoke-profile sizes (32 patients x 8 slices, 32 px) and a couple of training steps: what is under test is that each
step the README names works on each layout and records what it says, not the numbers.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from ctssl_core.cli import main
from ctssl_core.db import connect
from ctssl_core.paths import store_paths

SMALL = ["--profile", "smoke", "--quiet"]
STEPS = ["--set", "downstream.train.steps=2"]


def _rows(store: Path, sql: str, params=()) -> list[tuple]:
    with connect(store_paths(store).db, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def _run_line(out: str) -> str:
    return re.search(r"^run (\S+): ", out, flags=re.M).group(1)


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.setenv("CTSSL_DATA", str(tmp_path / "ctssl-data"))  # where a benchmark would put a synthetic cohort
    return tmp_path


def test_rsna_pe_layout_ingest_data_page_finetune_and_benchmark(work, capsys):
    assert main(["synth", *SMALL, "--set", "synth.layout=rsna-pe", "--out", str(work / "cohort")]) == 0
    rsna = work / "rsna-str-pe"  # what RSNA ships: the DICOM tree and train.csv, nothing of the synthetic extras
    rsna.mkdir()
    for name in ("train", "train.csv"):
        shutil.move(str(work / "cohort" / name), rsna / name)
    store = work / "ctssl-store"
    assert main(["ingest", "--format", "rsna-pe", str(rsna), "--store", str(store), "--size", "32", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "256 slices" in out and "dataset=rsna-pe" in out and "pe labels on 256 slices" in out
    (n_exams, n_pe_exams), = _rows(store, "SELECT count(*), count(*) FILTER (WHERE pe_exam) FROM studies "
                                          "WHERE dataset = 'rsna-pe' AND exam_labels IS NOT NULL")
    assert n_exams == 32 and 0 < n_pe_exams < 32  # per-exam labels from train.csv, both classes

    # 3. the Data page on that store
    from streamlit.testing.v1 import AppTest

    from ctssl_core.paths import REPO_ROOT

    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=60)
    at.session_state["ctssl_store"] = str(store)
    at.run()
    at.switch_page("pages/data.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert [m.value for m in at.metric][:4] == ["32", "32", "32", "256"]
    assert "Datasets: rsna-pe" in [c.value for c in at.caption]

    # 4. step by step: one fine-tuning, recorded as trained on rsna-pe
    assert main(["finetune", "--task", "pe", *SMALL, "--store", str(store), *STEPS]) == 0
    rid = _run_line(capsys.readouterr().out)
    assert _rows(store, "SELECT task, status, dataset FROM runs WHERE run_id = ?", [rid]) == \
        [("pe", "succeeded", "rsna-pe")]
    assert ("test", "exam_auroc") in _rows(store, "SELECT split, metric FROM results WHERE run_id = ?", [rid])

    # 4. a benchmark trains at its profile's ingest.size: a store of another size is refused, saying what to do
    #    (README step 2: ingest with the --size of the profile you will train with; smoke's is 32)
    assert main(["benchmark", "--profile", "quick", "--store", str(store), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds 32-px slices but profile 'quick' is set up for 128-px slices" in err and "--set ingest.size=32" in err
    assert _rows(store, "SELECT count(*) FROM benchmarks") == [(0,)]
    # 4. README step 4 says --set benchmark.data=store: a mistyped (empty) store is refused, never filled
    #    with a synthetic cohort
    typo = work / "stroe"
    assert main(["benchmark", *SMALL, "--store", str(typo), "--set", "benchmark.data=store", "--quiet"]) == 2
    assert "holds no slices, and benchmark.data is 'store': ingest your data first" in capsys.readouterr().err
    assert not (work / "ctssl-data").exists() and (not typo.exists() or not (typo / "slices").exists())
    # 4. the benchmark on the user's store: it trains on it and records it, it does not generate a cohort
    assert main(["benchmark", *SMALL, "--store", str(store), "--set", "benchmark.data=store",
                 "--set", "benchmark.strategies=[rotation]",
                 "--set", "benchmark.tasks=[pe]", "--set", "benchmark.controls=[]", "--set", "benchmark.pool=0",
                 "--set", "benchmark.fractions=[1.0]", "--set", "benchmark.probes=false",
                 "--set", "benchmark.bias=false", "--set", "pretrain.train.steps=2", *STEPS]) == 0
    (bid, dataset, status), = _rows(store, "SELECT benchmark_id, dataset, status FROM benchmarks")
    assert (dataset, status) == ("rsna-pe", "succeeded")
    assert sorted(_rows(store, "SELECT kind, init, status FROM runs WHERE benchmark_id = ? AND kind = 'finetune'",
                        [bid])) == [("finetune", "random", "succeeded"), ("finetune", "rotation", "succeeded")]
    assert not (work / "ctssl-data").exists()
    assert _rows(store, "SELECT count(*) FROM studies") == [(32,)]


def _lidc_layout(cohort: Path, out: Path) -> None:
    """LIDC-IDRI as TCIA ships it: one folder per case, the reads' XML inside each series folder beside its DICOM
    (the synthetic cohort writes the same XML to ``lidc_xml/<SeriesUID>.xml``)."""
    for series in sorted((cohort / "dicom").glob("*/*/*")):
        patient, study = series.parent.parent.name, series.parent.name
        dst = out / f"LIDC-IDRI-{patient}" / study / series.name
        shutil.copytree(series, dst)
        shutil.copy(cohort / "lidc_xml" / f"{series.name}.xml", dst / "069.xml")


def test_lidc_layout_ingest_and_nodule_finetune(work, capsys):
    assert main(["synth", *SMALL, "--out", str(work / "cohort")]) == 0
    _lidc_layout(work / "cohort", work / "LIDC-IDRI")
    store = work / "lidc-store"
    assert main(["ingest", "--format", "lidc", str(work / "LIDC-IDRI"), "--store", str(store), "--size", "32",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "dataset=lidc" in out and "nodule masks for 32 series" in out and "reason" not in out  # no XML rejected
    truth = json.loads((work / "cohort" / "truth.json").read_text())
    with_nodules = sum(1 for p in truth["patients"] if p["nodule_slices"])
    (n_series,), = _rows(store, "SELECT count(DISTINCT series_key) FROM slices WHERE nodule_px > 0")
    # the consensus of the reads beside the DICOM marks nodules (a small one most readers missed may drop out)
    assert 0 < n_series <= with_nodules
    assert main(["finetune", "--task", "nodule", *SMALL, "--store", str(store), *STEPS]) == 0
    rid = _run_line(capsys.readouterr().out)
    assert _rows(store, "SELECT task, status, dataset FROM runs WHERE run_id = ?", [rid]) == \
        [("nodule", "succeeded", "lidc")]
    assert ("test", "dice") in _rows(store, "SELECT split, metric FROM results WHERE run_id = ?", [rid])


def test_own_dicom_with_demographics_embed_and_bias_on_an_extra_attribute(work, capsys):
    assert main(["synth", *SMALL, "--out", str(work / "cohort")]) == 0
    mine = work / "my-dicom"
    shutil.copytree(work / "cohort" / "dicom", mine)
    rows = list(csv.DictReader(open(work / "cohort" / "demographics.csv", newline="")))
    csv_path = work / "demographics.csv"  # the user's own table: PatientID, age, sex, race and one more attribute
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["PatientID", "age", "sex", "race", "smoker"])
        for i, r in enumerate(rows):
            w.writerow([r["PatientID"], r["age"], r["sex"], r["race"], "yes" if i % 2 else "no"])
    store = work / "own-store"
    assert main(["ingest", str(mine), "--demographics", str(csv_path), "--store", str(store), "--size", "32",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "dataset=generic" in out and "demographics: 32 rows; 0 matched no ingested patient" in out
    smoker = sorted(json.loads(a)["smoker"] for (a,) in _rows(store, "SELECT attributes FROM patients"))
    assert smoker == ["no"] * 16 + ["yes"] * 16

    assert main(["embed", "--checkpoint", "random", *SMALL, "--store", str(store)]) == 0
    out = capsys.readouterr().out
    emb = re.search(r"^exam embeddings: (\S+)$", out, flags=re.M).group(1)
    assert f"next: ctssl bias --emb {emb} --store {store}" in out
    bias = ["bias", "--emb", emb, "--profile", "smoke", "--store", str(store)]
    assert main([*bias, "--set", "bias.attributes=[age,smoker]"]) == 0
    assert "Smoker is" in capsys.readouterr().out
    analysed = {a for (a,) in _rows(store, "SELECT DISTINCT attribute FROM bias_results WHERE emb_id = ?", [emb])}
    assert {"age", "smoker"} <= analysed
    # an attribute the CSV did not have is refused with the ones that exist
    assert main([*bias, "--set", "bias.attributes=[age,height]"]) == 2
    err = capsys.readouterr().err
    assert "height" in err and "smoker" in err
