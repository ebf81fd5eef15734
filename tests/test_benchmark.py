"""The benchmark runner: plan, and `ctssl benchmark --profile smoke` end to end (the one slow test)."""

from __future__ import annotations

import numpy as np
import pytest

from ctssl_core.plan import BenchmarkConfig, make_plan
from ctssl_core.config import ConfigError

RESULT_TABLES = ("runs", "metrics", "metric_offsets", "results", "summaries", "benchmarks", "splits",
                 "embeddings", "projections", "bias_results")


def test_plan_is_deterministic_and_adds_seeds_at_small_fractions(tmp_path):
    over = ["benchmark.fractions=[0.1,0.5,1.0]", "benchmark.small_fraction=0.1",
            "benchmark.small_fraction_seeds=[0,1,2]", "benchmark.strategies=[rotation]"]
    a = make_plan("smoke", over)
    b = make_plan("smoke", over)
    assert [u.run_id for u in a.units] == [u.run_id for u in b.units]
    assert len({u.run_id for u in a.units}) == len(a.units)
    pe = [(u.init, u.fraction, u.seed) for u in a.units if u.kind == "finetune" and u.task == "pe"]
    assert sorted(s for i, f, s in pe if i == "random" and f == 0.1) == [0, 1, 2]
    assert sorted(s for i, f, s in pe if i == "random" and f == 1.0) == [0]
    assert {i for i, _, _ in pe} == {"random", "rotation", "positive_control", "negative_control"}
    demo = {u.fraction for u in a.units if u.kind == "finetune" and u.task == "demographics"}
    assert demo == {1.0}
    c = make_plan("smoke", over + ["downstream.train.steps=5"])
    assert c.benchmark_id != a.benchmark_id            # a different protocol is a different benchmark


def test_bad_benchmark_configs_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="must include 1.0"):
        BenchmarkConfig(fractions=(0.1, 0.5))
    with pytest.raises(ConfigError, match="unknown"):
        BenchmarkConfig(strategies=("jigsaw",))
    with pytest.raises(ConfigError, match="unknown section"):
        make_plan("smoke", ["finetune.steps=3"])
    with pytest.raises(ConfigError, match="unknown config key"):
        make_plan("smoke", ["downstream.stepz=3"])


def test_smoke_benchmark_end_to_end_fills_every_table_and_resumes(tmp_path, capsys):
    import duckdb

    from ctssl_core.cli import main
    from ctssl_core.paths import store_paths

    store = tmp_path / "store"
    # two worker processes here; the resume below runs in-process (workers = 1) and must find
    # the same benchmark id: execution settings do not change what a benchmark computes
    args = ["benchmark", "--profile", "smoke", "--store", str(store), "--quiet",
            "--set", f"benchmark.cohort={tmp_path / 'cohort'}", "--set", "benchmark.workers=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| init |" in out and "masked_region" in out
    sp = store_paths(store)
    con = duckdb.connect(str(sp.db), read_only=True)
    try:
        for t in RESULT_TABLES:
            assert con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] > 0, f"table {t} is empty"
        (bid,) = con.execute("SELECT benchmark_id FROM benchmarks WHERE status = 'succeeded'").fetchone()
        # every finetune unit succeeded and wrote one test row per metric with a CI around the value
        res = con.execute("SELECT task, init, fraction, seed, metric, value, ci_low, ci_high, n FROM results "
                          "WHERE split = 'test'").df()
        assert set(res["task"]) == {"pe", "nodule", "demographics"}
        assert set(res["init"]) == {"random", "masked_region", "rotation", "positive_control", "negative_control",
                                    "positive_control-source"}
        assert set(res[res.init.str.endswith("_control")].task) == {"pe", "nodule"}   # controls: pe, nodule only
        pe = res[res.task == "pe"]
        assert set(pe["metric"]) == {"slice_auroc", "slice_auroc_zstrat", "exam_auroc", "auprc", "sens_at_90spec",
                                     "rsna_wll", "twin_exam", "twin_slice", "twin_delta"}
        assert {"cpm", "lesion_sens_at_1fp", "exam_dice", "dice"} <= set(res[res.task == "nodule"]["metric"])
        # the unlabelled pool is disjoint from the labelled cohort
        assert con.execute("SELECT count(*) FROM splits WHERE split = 'pool'").fetchone()[0] > 0
        assert set(pe["fraction"]) == {0.5, 1.0}
        ok = res.dropna(subset=["value", "ci_low", "ci_high"])
        assert len(ok) > 0 and (ok.ci_low <= ok.value + 1e-9).all() and (ok.value <= ok.ci_high + 1e-9).all()
        auc = res[res.metric.str.contains("auroc")].dropna(subset=["value"])
        assert ((auc.value >= 0) & (auc.value <= 1)).all()
        # splits: every patient in exactly one split; test patients are what the results were scored on
        sp_df = con.execute("SELECT patient_key, seed, count(DISTINCT split) AS k FROM splits GROUP BY 1, 2").df()
        assert (sp_df.k == 1).all()
        n_test = con.execute("SELECT count(*) FROM splits WHERE split = 'test'").fetchone()[0]
        assert pe["n"].max() <= n_test
        summ = con.execute("SELECT task, init, metric, value, note FROM summaries WHERE benchmark_id = ?",
                           [bid]).df()
        for init in ("masked_region", "rotation"):
            for task in ("pe", "nodule"):
                got = summ[(summ.task == task) & (summ.init == init)].set_index("metric")
                assert "labels_saved" in got.index and "labels_needed" in got.index
                need, saved = got.loc["labels_needed", "value"], got.loc["labels_saved", "value"]
                if need == need and saved == saved:
                    assert saved == pytest.approx(1 - need)
                else:   # not reached, or random init itself learned nothing in 4 steps (undefined)
                    assert "not reach" in got.loc["labels_saved", "note"] or \
                        got.loc["labels_saved", "note"].startswith("undefined")
            assert "speed_ratio" in set(summ[(summ.task == "nodule") & (summ.init == init)].metric)
            assert "delta_exam_auroc" in set(summ[(summ.task == "pe") & (summ.init == init)].metric)
        assert summ.metric.str.startswith("probe_").any()
        sens = summ[summ.metric.str.startswith("sensitivity_")]
        assert set(sens.task) == {"pe", "nodule"} and set(sens.init) == {"positive_control"}
        assert sens.note.str.contains("SENSITIVE").all()                  # says SENSITIVE or INSENSITIVE
        assert set(summ[summ.metric.str.startswith("verdict_")].init) == {"masked_region", "rotation"}
        base = summ[summ.init == "z_position"].set_index("metric")      # PE from slice position alone
        assert {"slice_auroc", "exam_auroc"} <= set(base.index)
        assert base.loc["exam_auroc", "value"] == pytest.approx(0.5)   # same scores for every exam
        n_metric_rows = con.execute("SELECT count(*) FROM metrics WHERE name = 'val/dice'").fetchone()[0]
        assert n_metric_rows > 0
        # no run-level patient identifiers anywhere in the results
        assert con.execute("SELECT count(*) FROM results WHERE metric ILIKE '%patient%'").fetchone()[0] == 0
        n_runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
    finally:
        con.close()
    run_dir = sp.run_dir(bid)
    assert (run_dir / "summary.csv").read_text().startswith("init,")
    assert "| init |" in (run_dir / "summary.md").read_text()
    assert "PE baseline: slice position alone gives slice AUROC" in (run_dir / "summary.md").read_text()

    # resume: mark one fine-tuning unfinished, and give another the identity of another config (a run made
    # before the code's defaults changed); a re-run redoes only those two. A run from before unit hashes
    # existed (NULL) is found by its run id, as before.
    con = duckdb.connect(str(sp.db))
    try:
        (rid,), (changed,), (legacy,) = con.execute(
            "SELECT run_id FROM runs WHERE kind = 'finetune' AND task = 'pe' ORDER BY run_id LIMIT 3").fetchall()
        want = con.execute("SELECT unit_hash FROM runs WHERE run_id = ?", [changed]).fetchone()[0]
        assert want is not None and len(want) == 16
        con.execute("UPDATE runs SET status = 'failed' WHERE run_id = ?", [rid])
        con.execute("UPDATE runs SET unit_hash = 'another-config' WHERE run_id = ?", [changed])
        con.execute("UPDATE runs SET unit_hash = NULL WHERE run_id = ?", [legacy])
    finally:
        con.close()
    from ctssl_core.benchmark import run_benchmark

    said: list[str] = []
    res2 = run_benchmark("smoke", store, [f"benchmark.cohort={tmp_path / 'cohort'}"], progress=False,
                         log=said.append)
    assert res2["ran"] == 2 and res2["benchmark_id"] == bid
    assert any(changed in m and "resolved config changed" in m for m in said)
    con = duckdb.connect(str(sp.db), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == n_runs
        assert con.execute("SELECT status FROM runs WHERE run_id = ?", [rid]).fetchone()[0] == "succeeded"
        assert con.execute("SELECT unit_hash FROM runs WHERE run_id = ?", [changed]).fetchone()[0] == want
        assert con.execute("SELECT unit_hash FROM runs WHERE run_id = ?", [legacy]).fetchone()[0] is None
        dup = con.execute("SELECT count(*) FROM (SELECT run_id, metric, count(*) c FROM results "
                          "GROUP BY 1, 2, split HAVING c > 1)").fetchone()[0]
        assert dup == 0
    finally:
        con.close()
    assert np.isfinite(res2["wall_s"])

    # `ctssl finetune` on the same store: init by pretext key picks that strategy's finished pretraining
    assert main(["finetune", "--task", "pe", "--init", "rotation", "--fraction", "0.5", "--seed", "1",
                 "--profile", "smoke", "--store", str(store), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pe from rotation" in out and "exam_auroc" in out
    assert main(["finetune", "--task", "pe", "--init", "no_such_run", "--profile", "smoke",
                 "--store", str(store), "--quiet"]) == 2
    assert "no checkpoint found" in capsys.readouterr().err


def test_stores_built_from_one_synthetic_cohort_get_the_same_splits(tmp_path):
    """The benchmark keys synthetic pseudonyms by the cohort config, so any store built from the
    same cohort has the same patient keys and seeded splits (results reproduce across machines)."""
    from ctssl_core.benchmark import ensure_data
    from ctssl_core.data.splits import get_or_create_splits
    from ctssl_core.paths import store_paths

    over = [f"benchmark.cohort={tmp_path / 'cohort'}", "synth.n_patients=10", "synth.slices_per_exam=4"]
    plan = make_plan("smoke", over)
    got = []
    for name in ("a", "b"):
        ensure_data(plan, tmp_path / name, lambda m: None)
        got.append(get_or_create_splits(tmp_path / name, 0))
        assert store_paths(tmp_path / name).secret.stat().st_mode & 0o077 == 0   # owner-only, like a random key
    assert got[0] == got[1] and len(got[0]) == 10
    # a store written for another slice size (e.g. by an older profile) is refused, not trained on
    other = make_plan("smoke", over + ["ingest.size=64"])
    with pytest.raises(ConfigError, match="holds 32-px slices .* set up for 64-px"):
        ensure_data(other, tmp_path / "a", lambda m: None)
    # another synthetic cohort's profile (here: 12 patients instead of 10) refuses the store instead of
    # running its design on these patients; the same profile again reuses it
    bigger = make_plan("smoke", [f"benchmark.cohort={tmp_path / 'cohort12'}", "synth.n_patients=12",
                                 "synth.slices_per_exam=4"])
    with pytest.raises(ConfigError, match=r"holds a synthetic cohort other than the one profile 'smoke' is set up for \(cohort12, 12 patients\).* --store "):
        ensure_data(bigger, tmp_path / "a", lambda m: None)
    said = []
    ensure_data(plan, tmp_path / "a", said.append)
    assert said == []
    # part of the cohort only (an ingest stopped by a full disk or Ctrl-C keeps what it stored): refused, not
    # trained on as if it were the whole cohort
    import shutil

    import duckdb

    shutil.copytree(tmp_path / "a", tmp_path / "partial")
    con = duckdb.connect(str(store_paths(tmp_path / "partial").db))
    con.execute("DELETE FROM patients WHERE patient_key = (SELECT min(patient_key) FROM patients)")
    con.close()
    with pytest.raises(ConfigError, match=r"or only part of it \(an ingest that was stopped\)"):
        ensure_data(plan, tmp_path / "partial", said.append)
    # a cohort made with `ctssl synth` and ingested by hand (the store's own random key) is the plan's too
    from ctssl_core.data.ingest import IngestConfig, ingest

    ingest(tmp_path / "cohort", tmp_path / "by_hand", IngestConfig(size=32), progress=False)
    ensure_data(plan, tmp_path / "by_hand", said.append)
    with pytest.raises(ConfigError, match="holds a synthetic cohort other than"):
        ensure_data(make_plan("smoke", [f"benchmark.cohort={tmp_path / 'cohort'}", "synth.n_patients=9",
                                        "synth.slices_per_exam=4"]), tmp_path / "by_hand", said.append)
    assert said == []
    # a real-data store (secret not made by the benchmark) keeps its own random key
    from ctssl_core.data.pseudonym import create_secret, load_or_create_secret

    own = load_or_create_secret(tmp_path / "c" / "secret")
    assert not create_secret(tmp_path / "c" / "secret", b"x" * 32) and own == load_or_create_secret(tmp_path / "c" / "secret")


def test_pe_runs_save_validation_exam_scores_that_set_the_subgroup_threshold(smoke_store):
    """Issue 15: the TPR/FPR threshold of the subgroup analysis comes from the validation split. A PE
    fine-tune of the real smoke benchmark saves its validation exams' scores (every slice of each exam,
    the same aggregation as the test scores), on the val split's patients only, and the benchmark's bias
    step chooses its threshold from them."""
    import duckdb
    import pandas as pd

    from ctssl_core.data.store import SliceStore
    from ctssl_core.finetune import patient_keys, read_exam_scores, split_patient_idx
    from ctssl_core.paths import store_paths

    plan = make_plan("smoke")
    unit = next(u for u in plan.units if u.kind == "finetune" and u.task == "pe" and u.init == "random"
                and u.fraction == 1.0)
    test, val = read_exam_scores(store_paths(smoke_store).run_dir(unit.run_id))
    assert test is not None and val is not None and len(val)
    store = SliceStore.open(smoke_store)
    splits = split_patient_idx(store, smoke_store, plan.bench.split_seed, plan.bench.pool, plan.bench.split_fractions)
    keys = patient_keys(store)
    assert set(val.patient_key) == {keys[i] for i in splits["val"]}        # every validation patient, no other
    assert not set(val.patient_key) & set(test.patient_key)
    assert val.score.between(0, 1).all() and set(val.label) <= {0, 1}
    # the exam label is the max of its slice labels, over every slice of the exam
    pe = pd.Series(np.asarray(store.labels("pe"), dtype=float)).groupby(np.asarray(store.patient_idx)).max()
    by_key = {keys[i]: int(v) for i, v in pe.items() if i in set(splits["val"])}
    assert [by_key[k] for k in val.patient_key] == list(val.label)
    con = duckdb.connect(str(store_paths(smoke_store).db), read_only=True)
    try:
        sentences = [r[0] for r in con.execute("SELECT sentence FROM bias_results WHERE analysis = 'subgroup' "
                                               "AND metric = 'tpr'").fetchall()]
    finally:
        con.close()
    if val.label.nunique() == 2:
        assert sentences and all("chosen on validation scores" in s for s in sentences)
    else:   # one-class validation exams cannot choose a threshold: said so, never the test scores
        assert sentences and all("no threshold" in s for s in sentences)


def test_benchmark_data_is_synthetic_or_store_and_store_never_generates(tmp_path):
    """Issue 16 item 2: generating synthetic data is an explicit choice (benchmark.data), not a fallback."""
    from ctssl_core.benchmark import ensure_data

    with pytest.raises(ConfigError, match="benchmark.data must be 'synthetic' .* or 'store'"):
        BenchmarkConfig(data="auto")
    plan = make_plan("smoke", [f"benchmark.cohort={tmp_path / 'cohort'}", "benchmark.data=store"])
    with pytest.raises(ConfigError, match=r"holds no slices, and benchmark.data is 'store': ingest your data first "
                                          r"\(ctssl ingest DIR --store .* --size 32\)"):
        ensure_data(plan, tmp_path / "s", lambda m: None)
    assert not (tmp_path / "cohort").exists()
