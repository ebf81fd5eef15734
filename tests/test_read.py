"""The dashboard's query layer, downsampling and chart builders, on a small seeded store."""

from __future__ import annotations

import contextvars
import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from ctssl_core import charts
from ctssl_core.config import ConfigError
from ctssl_core.db import StoreError, StoreMissing
from ctssl_core.results import read
from ctssl_core.results.downsample import m4_sql, minmax_downsample, smooth_ema
from ctssl_core.results.seed import SPIKE_VALUE, SeedConfig, seed_old_schema_store, seed_store


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded")
    return seed_store(root, SeedConfig(n_runs=14, n_steps=3000))


@pytest.fixture(scope="module")
def old_store(tmp_path_factory):
    return seed_old_schema_store(tmp_path_factory.mktemp("old"))


def raw(store, sql, params=()):
    con = duckdb.connect(str(store / "ctssl.duckdb"), read_only=True)
    try:
        return con.execute(sql, list(params)).df()
    finally:
        con.close()


# ---------------------------------------------------------------- downsampling
def test_minmax_downsample_keeps_extremes_and_endpoints_within_budget():
    rng = np.random.default_rng(1)
    x = np.arange(200_000, dtype=float)
    y = rng.standard_normal(len(x))
    y[123_457], y[5] = 40.0, -35.0
    xs, ys = minmax_downsample(x, y, 2000)
    assert len(xs) <= 2000
    assert ys.max() == 40.0 and xs[ys.argmax()] == 123_457
    assert ys.min() == -35.0
    assert xs[0] == 0 and xs[-1] == len(x) - 1
    assert np.all(np.diff(xs) > 0)
    # every bucket's extreme is kept: the max of any x-range of one bucket width is present
    nb = 2000 // 4
    edges = np.linspace(0, len(x) - 1, nb + 1)
    b = np.minimum(np.floor(x / (len(x) - 1) * nb), nb - 1).astype(int)
    kept = dict(zip(xs, ys))
    for k in rng.integers(0, nb, 20):
        seg = b == k
        assert y[seg].max() == max(v for xx, v in kept.items() if edges[k] <= xx <= edges[k + 1] and b[int(xx)] == k)


def test_minmax_downsample_short_series_unchanged_and_nan_dropped():
    x = np.array([3.0, 1.0, 2.0, 4.0])
    y = np.array([0.3, 0.1, np.nan, 0.4])
    xs, ys = minmax_downsample(x, y, 100)
    assert xs.tolist() == [1.0, 3.0, 4.0] and ys.tolist() == [0.1, 0.3, 0.4]
    with pytest.raises(ValueError, match="same length"):
        minmax_downsample(np.arange(3), np.arange(4), 10)


def test_m4_sql_matches_numpy_reference():
    rng = np.random.default_rng(2)
    frames, ref = [], {}
    for g, n in [("a", 50_000), ("b", 300), ("c", 9_000)]:
        x = np.sort(rng.random(n) * 1000)
        y = rng.standard_normal(n)
        frames.append(pd.DataFrame({"g": g, "x": x, "y": y}))
        ref[g] = minmax_downsample(x, y, 1000)
    df = pd.concat(frames)
    con = duckdb.connect()
    con.register("df", df)
    out = con.execute(m4_sql("SELECT g, x, y FROM df", ["g"], 1000)).df()
    for g, (xs, ys) in ref.items():
        got = out[out.g == g]
        np.testing.assert_array_equal(got.x.to_numpy(), xs)
        np.testing.assert_allclose(got.y.to_numpy(), ys)
    assert len(out[out.g == "b"]) == 300  # short group passes through whole


def test_smooth_ema_debiased_and_validated():
    assert np.allclose(smooth_ema(np.full(50, 3.0), 0.9), 3.0)  # no pull towards 0 at the start
    y = np.array([0.0, 1.0, 0.0, 1.0])
    assert np.array_equal(smooth_ema(y, 0.0), y)
    s = smooth_ema(np.r_[np.zeros(20), np.ones(20)], 0.8)
    assert 0 < s[25] < 1 and np.all(np.diff(s[20:]) > 0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        smooth_ema(y, 1.0)


# ---------------------------------------------------------------- overview / compare
def test_headline_table_comes_from_summaries(seeded):
    t = read.headline_table(seeded.root)
    summ = raw(seeded.root, "SELECT task, init, metric, value FROM summaries "
                            "WHERE metric NOT IN ('speed_ratio', 'labels_saved')")
    assert len(t) == len(summ)
    merged = t.merge(summ, on=["task", "init", "metric"], suffixes=("", "_db"))
    assert np.allclose(merged.value, merged.value_db)
    assert set(t.columns) >= {"task", "metric", "init", "value", "ci_low", "ci_high"}


def test_headline_table_falls_back_to_results_at_full_labels(seeded, tmp_path):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(seeded.root, root)
    con = duckdb.connect(str(root / "ctssl.duckdb"))
    con.execute("DELETE FROM summaries")
    con.close()
    t = read.headline_table(root)
    want = raw(root, "SELECT task, metric, init, avg(value) AS v FROM results WHERE split = 'test' "
                     "AND fraction = 1.0 GROUP BY ALL")
    m = t.merge(want, on=["task", "metric", "init"])
    assert len(m) == len(want) and np.allclose(m.value, m.v)
    assert (t.ci_low < t.value).all() and (t.value < t.ci_high).all()


def test_pivot_puts_random_first_and_finds_best_per_column(seeded):
    t = read.headline_table(seeded.root)
    wide, best = read.pivot_headline(t)
    assert wide.index[0] == "random"
    tasks = [c.split(" · ")[0] for c in wide.columns]
    # study order: the paper's tasks first, demographics last; each task's columns together
    assert tasks == sorted(tasks, key=["pe", "nodule", "demographics"].index)
    for col, init in best.items():
        task, metric = col.split(" · ")
        g = t[(t.task == task) & (t.metric == metric)]
        assert init == g.loc[g.value.idxmax(), "init"]
        cell = wide.loc[init, col]
        v = g[g.init == init].value.iloc[0]
        assert cell.startswith(f"{v:.3f} [")


def test_pivot_orders_columns_by_task_then_headline_metric():
    rows = [("demographics", "age_mae"), ("nodule", "dice"), ("pe", "exam_auroc"), ("pe", "slice_auroc"),
            ("demographics", "race_auroc"), ("pe", "zz_custom")]
    t = pd.DataFrame({"task": [r[0] for r in rows], "metric": [r[1] for r in rows], "init": "random",
                      "value": 0.5, "ci_low": 0.4, "ci_high": 0.6})
    wide, _ = read.pivot_headline(t)
    assert list(wide.columns) == ["pe · slice_auroc", "pe · exam_auroc", "pe · zz_custom", "nodule · dice",
                                  "demographics · race_auroc", "demographics · age_mae"]


def test_lower_is_better_metrics_pick_the_minimum():
    t = pd.DataFrame({"task": ["demographics"] * 2, "metric": ["age_mae"] * 2, "init": ["random", "rotation"],
                      "value": [9.0, 8.0], "ci_low": [8.5, 7.5], "ci_high": [9.5, 8.5]})
    _, best = read.pivot_headline(t)
    assert best == {"demographics · age_mae": "rotation"}
    (line,) = read.verdicts(t)
    assert "**rotation** is best" in line and "do not overlap" not in line and "overlap" in line


def test_verdicts_name_the_best_strategy_against_random(seeded):
    t = read.headline_table(seeded.root)
    lines = read.verdicts(t)
    assert len(lines) == t.task.nunique()
    pe = t[(t.task == "pe") & (t.metric == "slice_auroc")]
    best = pe.loc[pe.value.idxmax()]
    ref = pe[pe.init == "random"].value.iloc[0]
    (pe_line,) = [line for line in lines if line.startswith("**pe**")]
    assert f"**{best.init}**" in pe_line and f"{best.value:.3f} vs {ref:.3f}" in pe_line


def test_fraction_curves_average_seeds(seeded):
    c = read.fraction_curves(seeded.root, "pe", "slice_auroc")
    want = raw(seeded.root, "SELECT init, fraction, avg(value) v, count(*) k FROM results "
                            "WHERE task='pe' AND metric='slice_auroc' AND split='test' GROUP BY ALL")
    m = c.merge(want, on=["init", "fraction"])
    assert len(m) == len(want) == len(c)
    assert np.allclose(m.value, m.v) and (m.n_seeds == m.k).all()
    assert (c.ci_low < c.value).all() and (c.value < c.ci_high).all()


def test_pairwise_difference_and_verdict(seeded):
    c = read.fraction_curves(seeded.root, "pe", "slice_auroc").set_index(["init", "fraction"])
    d = read.pairwise(seeded.root, "pe", "slice_auroc", "masked_region", "random")
    for r in d.itertuples():
        expect = c.loc[("masked_region", r.fraction)].value - c.loc[("random", r.fraction)].value
        assert r.diff == pytest.approx(expect)
        assert r.ci_low < r.diff < r.ci_high
        assert r.better == ("masked_region" if r.ci_low > 0 else "unclear")
    flipped = read.pairwise(seeded.root, "pe", "slice_auroc", "random", "masked_region")
    assert np.allclose(flipped["diff"], -d["diff"])
    assert read.pairwise(seeded.root, "pe", "slice_auroc", "random", "no_such_init").empty


def test_derived_speed_ratio(seeded):
    s = read.derived(seeded.root, "speed_ratio")
    want = raw(seeded.root, "SELECT init, value FROM summaries WHERE metric='speed_ratio'")
    assert sorted(s.init) == sorted(want.init) and np.allclose(sorted(s.value), sorted(want.value))


# ---------------------------------------------------------------- learning curves
def test_run_table_flags_running_and_deleted_checkpoint(seeded):
    t = read.run_table(seeded.root)
    assert len(t) == 14
    assert t[t.status == "running"].run_id.tolist() == [seeded.run_ids[-1]]
    assert t.set_index("run_id").loc[seeded.run_ids[1], "checkpoint_ok"] == False  # noqa: E712
    assert t.set_index("run_id").loc[seeded.run_ids[2], "checkpoint_ok"] == True  # noqa: E712


def test_curves_downsampled_in_db_keep_the_spike(seeded):
    runs = seeded.run_ids[:3]
    df = read.curves(seeded.root, runs, ["train/loss", "lr"], "step", max_points=400)
    sizes = df.groupby(["run_id", "name"]).size()
    assert len(sizes) == 6 and sizes.max() <= 400
    spike = df[(df.run_id == seeded.spike_run) & (df.name == "train/loss")]
    assert spike.y.max() == SPIKE_VALUE and spike.loc[spike.y.idxmax(), "x"] == seeded.spike_step
    full = raw(seeded.root, "SELECT step, value FROM metrics WHERE run_id=? AND name='lr' ORDER BY step", [runs[1]])
    xs, ys = minmax_downsample(full.step.to_numpy(), full.value.to_numpy(), 400)
    got = df[(df.run_id == runs[1]) & (df.name == "lr")]
    np.testing.assert_array_equal(got.x.to_numpy(), xs)


def test_curves_x_axes_and_bad_input(seeded):
    for x in ("epoch", "wall_s"):
        df = read.curves(seeded.root, seeded.run_ids[:1], ["lr"], x, max_points=100_000)
        want = raw(seeded.root, f"SELECT {x} FROM metrics WHERE run_id=? AND name='lr' ORDER BY step",
                   [seeded.run_ids[0]])
        assert np.allclose(np.sort(df.x.to_numpy()), np.sort(want[x].to_numpy()))
    with pytest.raises(ConfigError, match="x axis must be one of"):
        read.curves(seeded.root, seeded.run_ids[:1], ["lr"], "time")
    assert read.curves(seeded.root, [], ["lr"]).empty
    assert read.metric_names(seeded.root, seeded.run_ids[:2]) == sorted(SeedConfig().metric_names)


# ---------------------------------------------------------------- embeddings & bias
def test_projection_samples_and_joins_keys(seeded):
    pts, total = read.projection(seeded.root, seeded.emb_ids[1], "umap", max_points=150)
    assert total == SeedConfig().n_embed_points and len(pts) == 150
    assert {"x", "y", "race", "sex", "age", "slice_id"} <= set(pts.columns)
    assert "patient_key" in pts.columns and not {"PatientName", "PatientID"} & set(pts.columns)
    again, _ = read.projection(seeded.root, seeded.emb_ids[1], "umap", max_points=150)
    assert again.row.tolist() == pts.row.tolist()  # seeded sample: stable across reruns
    assert read.reference_for(seeded.root, seeded.emb_ids[1]) == seeded.emb_ids[0]


def test_projection_on_real_smoke_store_carries_patient_attributes(smoke_store):
    """Issue 14: the keys parquet `ctssl embed` writes has no `row` column; points index it by position."""
    emb = read.embeddings(smoke_store)
    assert {"random"} < set(emb.init) and set(emb.level) == {"slice", "exam"}
    for r in emb.itertuples():
        assert r.methods and r.keys_ok
        keys = pd.read_parquet(smoke_store / r.keys_path)
        assert "row" not in keys.columns  # what the production writer really produces
        for method in r.methods:
            pts, total = read.projection(smoke_store, r.emb_id, method)
            assert total == len(pts) == len(pd.read_parquet(smoke_store / f"embeddings/{r.emb_id}.{method}.parquet"))
            want = keys.iloc[pts.row.to_numpy()].reset_index(drop=True)
            for col in ("patient_key", "series_key", "age", "sex", "race", "site"):
                assert pts[col].tolist() == want[col].tolist(), (r.emb_id, method, col)
            assert pts[["patient_key", "sex", "race"]].notna().all().all()


def test_seeded_embedding_files_match_what_the_benchmark_writes(seeded, smoke_store):
    """The seeded store must not drift from the real writers again: same keys and projection file schemas."""
    import pyarrow.parquet as pq

    real, fake = read.embeddings(smoke_store), read.embeddings(seeded.root)
    r, f = real[real.level == "slice"].iloc[0], fake.iloc[0]
    assert pq.read_schema(seeded.root / f.keys_path).remove_metadata() == \
        pq.read_schema(smoke_store / r.keys_path).remove_metadata()
    assert r.methods  # the smoke profile projects with PCA (UMAP is off there to save the numba compile)
    for method in r.methods:
        assert pq.read_schema(seeded.root / f"embeddings/{f.emb_id}.{method}.parquet").remove_metadata() == \
            pq.read_schema(smoke_store / f"embeddings/{r.emb_id}.{method}.parquet").remove_metadata()
    assert list(fake.columns) == list(real.columns)


def test_projection_rows_beyond_keys_are_refused(smoke_store, tmp_path):
    import shutil

    emb = read.embeddings(smoke_store)
    r = emb[emb.level == "slice"].iloc[0]
    root = tmp_path / "s"
    shutil.copytree(smoke_store, root, ignore=shutil.ignore_patterns("runs", "slices", "masks", "*.pt"))
    keys = pd.read_parquet(root / r.keys_path)
    keys.iloc[: len(keys) // 2].to_parquet(root / r.keys_path, index=False)  # keys of some other, smaller run
    with pytest.raises(read.ResultFileMissing, match=r"keys file has only \d+ rows.*ctssl embed"):
        read.projection(root, r.emb_id, "pca")
    view = read.embedding_view(root, r.emb_id)  # the page still renders, with the message
    assert view["methods"] == ["pca"] and view["points"]["pca"] is None
    assert any("ctssl embed" in m for m in view["missing"])


def test_projection_missing_file_or_method_says_what_to_run(seeded, tmp_path):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(seeded.root, root)
    (root / "embeddings" / f"{seeded.emb_ids[1]}.pca.parquet").unlink()
    with pytest.raises(read.ResultFileMissing, match="ctssl embed"):
        read.projection(root, seeded.emb_ids[1], "pca")
    with pytest.raises(read.ResultFileMissing, match="no TSNE projection"):
        read.projection(root, seeded.emb_ids[1], "tsne")


def test_bias_results_filter(seeded):
    probes = read.bias_results(seeded.root, seeded.emb_ids[1], "probe")
    assert set(probes.analysis) == {"probe"} and len(probes) == 4
    race = probes[probes.attribute == "race"].iloc[0]
    assert race.flagged and race.sentence and race.delta == pytest.approx(race.value - 0.73)


# ---------------------------------------------------------------- data
def test_cohort_summary_and_prevalence(seeded):
    s = read.cohort_summary(seeded.root)
    cfg = SeedConfig()
    assert s["patients"] == cfg.n_patients and s["slices"] == cfg.n_patients * cfg.slices_per_series
    assert s["datasets"] == ["synthetic"] and s["ingest_errors"] == 2
    p = read.label_prevalence(seeded.root).set_index("label")
    want = raw(seeded.root, "SELECT count(pe) k, sum(pe::INT) pos FROM slices").iloc[0]
    assert p.loc["PE on slice", "known"] == want.k and p.loc["PE on slice", "positive"] == want.pos
    assert p.loc["PE on slice", "prevalence"] == pytest.approx(want.pos / want.k)


def test_demographics_expand_attributes_and_hold_no_identifiers(seeded):
    d = read.demographics(seeded.root)
    assert {"age", "sex", "race", "site", "control_group"} <= set(d.columns)
    assert "patient_key" not in d.columns and len(d) == SeedConfig().n_patients


def test_load_slice_and_missing_array(seeded, tmp_path):
    import shutil

    series = read.series_list(seeded.root)
    with_mask = series[series.mask_path.notna()].iloc[0]
    v = read.load_slice(seeded.root, with_mask.series_key, 2)
    arr = np.load(seeded.root / with_mask.array_path)
    assert np.array_equal(v.hu, arr[2]) and v.mask is not None and v.mask.shape == arr[2].shape
    assert v.nodule_px == int(v.mask.sum())
    with pytest.raises(read.ResultFileMissing, match="outside series"):
        read.load_slice(seeded.root, with_mask.series_key, 999)
    root = tmp_path / "s"
    shutil.copytree(seeded.root, root)
    (root / with_mask.array_path).unlink()
    with pytest.raises(read.ResultFileMissing, match="ctssl ingest"):
        read.load_slice(root, with_mask.series_key, 0)


# ---------------------------------------------------------------- store states
def test_missing_store_names_the_command(tmp_path):
    with pytest.raises(StoreMissing, match="ctssl"):
        read.run_table(tmp_path / "nowhere")
    assert read.store_version(tmp_path / "nowhere") == 0


def test_old_schema_store_reads_with_nulls(old_store):
    info = read.store_info(old_store)
    assert info.outdated and "embeddings" in info.missing_tables and "ci_low" in info.missing_columns["results"]
    assert "upgrades it" in info.message()
    t = read.headline_table(old_store)
    assert sorted(t.init) == ["random", "rotation"] and t.ci_low.isna().all()
    assert read.embeddings(old_store).empty and read.ingest_errors(old_store).empty
    assert len(read.curves(old_store, ["old-1"], ["train/loss"])) == 50
    with pytest.raises(read.ResultFileMissing, match="plot against step"):
        read.curves(old_store, ["old-1"], ["train/loss"], "epoch")
    assert read.demographics(old_store).race.isna().all()


def test_store_version_changes_on_write(seeded, tmp_path):
    import shutil
    import time

    root = tmp_path / "s"
    shutil.copytree(seeded.root, root)
    v0 = read.store_version(root)
    time.sleep(0.01)
    con = duckdb.connect(str(root / "ctssl.duckdb"))
    con.execute("UPDATE runs SET status='failed' WHERE run_id=?", [seeded.run_ids[0]])
    con.close()
    assert read.store_version(root) != v0


# ---------------------------------------------------------------- charts
def test_window_and_overlay():
    hu = np.array([[-1200, -125], [50, 225]], dtype=np.int16)
    g = charts.apply_window(hu, 50, 350)
    assert g.tolist() == [[0, 0], [128, 255]]
    with pytest.raises(ValueError, match="positive"):
        charts.apply_window(hu, 0, 0)
    rgb = charts.overlay(g, np.array([[0, 0], [1, 0]], np.uint8), color=(255, 0, 0), alpha=1.0)
    assert rgb.shape == (2, 2, 3) and rgb[1, 0].tolist() == [255, 0, 0] and rgb[1, 1].tolist() == [255] * 3


def test_figures_carry_the_data(seeded):
    c = read.fraction_curves(seeded.root, "pe", "slice_auroc")
    fig = charts.fraction_curves_fig(c, "pe", "slice_auroc")
    lines = {t.name: t for t in fig.data if t.mode == "lines+markers"}
    assert set(lines) == set(c.init)
    mr = c[c.init == "masked_region"].sort_values("fraction")
    assert np.allclose(lines["masked_region"].y, mr.value)
    df = read.curves(seeded.root, seeded.run_ids[:2], ["train/loss"], max_points=300)
    f = charts.curves_fig(df, smoothing=0.5)
    assert len(f.data) == 4 and charts.max_points_per_trace(f) <= 300
    pts, _ = read.projection(seeded.root, seeded.emb_ids[1], "pca", max_points=200)
    s = charts.scatter_fig(pts, "race", "t")
    assert sorted(t.name for t in s.data) == sorted(pts.race.unique()) and sum(len(t.x) for t in s.data) == 200
    a = charts.scatter_fig(pts, "age", "t")
    assert len(a.data) == 1 and np.allclose(a.data[0].marker.color, pts.age)


def test_reads_what_the_real_writer_wrote_live_and_merged(tmp_path):
    """Contract check against the real writers: a running run's curve shows every whole line its training
    process wrote, before the store merged any (the training side never writes DuckDB), half of them merged,
    and all merged - always the same points, never one twice; NaN values are skipped."""
    from ctssl_core.results import write
    from ctssl_core.results.runfolder import RunLogger

    rid = "ft-pe-rotation-1"
    write.start_run(tmp_path, rid, "finetune", "pe", "rotation", "tiny", {"lr": 1e-3}, fraction=0.1, seed=0)
    want = [1.0 / (s + 1) for s in range(30) if s != 7]
    log = RunLogger(tmp_path, rid)
    for step in range(15):
        log({"step": step, "epoch": step / 10, "train/loss": 1.0 / (step + 1) if step != 7 else float("nan")})
    assert write.merge_pending(tmp_path, rid) == 14       # the job runner's merge: half the run (one NaN: no row)
    for step in range(15, 30):
        log({"step": step, "epoch": step / 10, "train/loss": 1.0 / (step + 1), "val/dice": 0.5})
    with open(log.path, "a") as f:
        f.write('{"step": 30, "train/lo')                # a line being written is not read
    runs = read.run_table(tmp_path)
    assert runs.run_id.tolist() == [rid] and runs.status.iloc[0] == "running"
    assert read.metric_names(tmp_path, [rid]) == ["train/loss", "val/dice"]   # val/dice only in the folder
    for merged in (False, True):
        df = read.curves(tmp_path, [rid], ["train/loss"], "epoch").sort_values("x")
        assert len(df) == 29 and 0.7 not in df.x.round(6).tolist()  # the NaN at step 7 is not drawn
        assert np.allclose(df.y.to_numpy(), want)
        with read.snapshot(tmp_path) as snap:                 # the same inside a page's batch
            assert len(read.curves(snap, [rid], ["train/loss"], "step")) == 29
        log.close()
        write.finish_run(tmp_path, rid, "succeeded")          # merges the rest
    assert read.curves(tmp_path, [rid], ["val/dice"], "step").y.tolist() == [0.5] * 15


@pytest.fixture
def connects(monkeypatch):
    """The store files ``read`` opens, in order (``read.connect`` wrapped, still connecting for real)."""
    opened: list[str] = []
    real = read.connect

    def counting(db, *a, **kw):
        opened.append(str(db))
        return real(db, *a, **kw)

    monkeypatch.setattr(read, "connect", counting)
    return opened


def _batch(store, emb_id):
    return (read.headline_table(store), read.run_table(store), read.store_info(store).counts,
            read.embedding_view(store, emb_id, 100), read.point_slice(store, emb_id, 0).series_key)


def _same_batch(a, b):
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])
    assert a[2] == b[2] and a[4] == b[4]
    assert a[3]["methods"] == b[3]["methods"] and a[3]["ref_id"] == b[3]["ref_id"]
    for m in a[3]["methods"]:
        pd.testing.assert_frame_equal(a[3]["points"][m], b[3]["points"][m])


def test_snapshot_runs_a_batch_on_one_connection_with_the_same_answers(seeded, connects):
    db = str(seeded.root / "ctssl.duckdb")
    emb_id = read.embeddings(seeded.root).query("init != 'random'").emb_id.iloc[0]
    connects.clear()
    alone = _batch(seeded.root, emb_id)
    assert len(connects) >= 5                           # each query (and embedding_view once) opens its own
    connects.clear()
    with read.snapshot(seeded.root) as s:
        assert os.fspath(s) == str(seeded.root) and Path(s) == seeded.root and str(s) == str(seeded.root)
        shared = _batch(s, emb_id)                      # embedding_view/point_slice batch inside the batch
        with read._read(s) as a, read.snapshot(s) as b:
            assert a is s and b is s
        assert not s.closed                             # a nested snapshot(s) leaves closing to its owner
    assert connects == [db]
    _same_batch(alone, shared)
    with pytest.raises(StoreMissing, match="no ctssl store"):
        with read.snapshot(seeded.root / "nowhere"):
            pass


def test_a_snapshot_used_after_its_block_says_so(seeded, connects):
    with read.snapshot(seeded.root) as s:
        read.run_table(s)
    assert s.closed and "closed" in repr(s)
    for use in (lambda: read.run_table(s), lambda: read.embedding_view(s, "emb-x"), lambda: s.execute("SELECT 1"),
                lambda: read.snapshot(s).__enter__()):
        with pytest.raises(read.SnapshotClosed, match=r"closed when its `with read.snapshot\(...\)` block ended"):
            use()
    assert issubclass(read.SnapshotClosed, StoreError)   # the pages show it as a message, not a traceback
    assert connects == [str(seeded.root / "ctssl.duckdb")]     # nothing reopened behind the caller's back


def test_a_snapshot_serves_only_its_own_store(seeded, old_store, connects):
    other = old_store
    want = read.run_table(other)
    own = read.run_table(seeded.root)
    assert len(want) and sorted(want.run_id) != sorted(own.run_id)     # two different stores
    connects.clear()
    with read.snapshot(seeded.root) as s:
        mine = read.run_table(s)
        theirs = read.run_table(other)                  # another store inside the block: its own connection
        with read.snapshot(other) as o:
            assert o is not s and Path(o) == Path(other)
            pd.testing.assert_frame_equal(read.run_table(o), want)
    pd.testing.assert_frame_equal(theirs, want)
    pd.testing.assert_frame_equal(mine, own)
    assert connects == [str(seeded.root / "ctssl.duckdb"), str(Path(other) / "ctssl.duckdb"),
                        str(Path(other) / "ctssl.duckdb")]


def test_the_read_module_keeps_no_connection_state():
    """Issue 16: no hidden connection state; the only way to share a connection is a Snapshot argument."""
    assert not hasattr(read, "session")
    assert not [k for k, v in vars(read).items()
                if isinstance(v, (contextvars.ContextVar, read.Snapshot, duckdb.DuckDBPyConnection))]


def test_baseline_rows_go_last_and_are_never_best():
    t = pd.DataFrame({"task": ["pe"] * 3, "metric": ["slice_auroc"] * 3, "init": ["random", "z_position", "flip"],
                      "value": [0.70, 0.75, 0.72], "ci_low": [0.6, 0.68, 0.62], "ci_high": [0.8, 0.84, 0.82]})
    wide, best = read.pivot_headline(t)
    assert list(wide.index) == ["random", "flip", "z_position"]
    assert best == {"pe · slice_auroc": "flip"}
    lines = read.verdicts(t)
    assert any("baseline *z_position*" in line and "0.750" in line for line in lines)
    assert any("**flip** is best" in line for line in lines)


# ---------------------------------------------------------------- several benchmarks in one store
def test_two_benchmarks_are_not_mixed(two_benchmark_store):
    store = two_benchmark_store
    bench = read.benchmarks(store)
    assert len(bench) == 2 and set(bench.status) == {"succeeded"}
    assert read.latest_finished(bench) == bench.benchmark_id.iloc[0]          # newest first
    assert read.latest_finished(bench.assign(status=["running", "succeeded"])) == bench.benchmark_id.iloc[1]
    assert read.latest_finished(bench.assign(status=["running", "failed"])) == bench.benchmark_id.iloc[0]
    assert read.latest_finished(bench.iloc[:0]) is None
    mixed = read.headline_table(store)
    assert mixed.duplicated(["task", "metric", "init"]).any()                 # why pages must filter
    with pytest.raises(ValueError, match="duplicate"):
        read.pivot_headline(mixed)
    summ = raw(store, "SELECT benchmark_id, task, metric, init, value FROM summaries WHERE value IS NOT NULL")
    for bid in bench.benchmark_id:
        t = read.headline_table(store, bid)
        assert len(t) and not t.duplicated(["task", "metric", "init"]).any()
        values = np.array([read.is_value_row(t, m) for t, m in zip(summ.task, summ.metric)], dtype=bool)
        want = summ[(summ.benchmark_id == bid).to_numpy() & values]
        got = t.merge(want, on=["task", "metric", "init"], suffixes=("", "_db"))
        assert len(got) == len(t) == len(want) and np.allclose(got.value, got.value_db)
        wide, _ = read.pivot_headline(t)
        assert list(wide.index) == read.init_order(t.init)
        assert set(read.task_metrics(store, bid).task) <= set(raw(
            store, "SELECT task FROM results WHERE benchmark_id = ?", [bid]).task)
        assert set(read.derived(store, "speed_ratio", bid).init) <= set(t.init)


# ---------------------------------------------------------------- could the study find a gain? (issue 12 item 7)
def test_headline_table_holds_values_only_and_controls_stay_apart(smoke_store):
    t = read.headline_table(smoke_store)
    assert not t.metric.str.startswith(("delta_", "verdict_", "sensitivity_", "mde_")).any()
    assert "pretext" not in set(t.task) and not t.metric.isin(["labels_needed", "labels_saved", "speed_ratio"]).any()
    assert {"positive_control", "negative_control", "z_position"} <= set(t.init)
    strategies, controls = read.split_controls(t)
    assert set(controls.init) == {"positive_control", "negative_control"}
    assert not strategies.init.isin(["positive_control", "negative_control"]).any()
    assert len(strategies) + len(controls) == len(t)
    wide, best = read.pivot_headline(t)
    order = list(wide.index)
    assert order[0] == "random" and order[-1] == "z_position"
    assert order.index("positive_control") > max(order.index(i) for i in ("masked_region", "rotation"))
    assert not set(best.values()) & {"positive_control", "negative_control", "z_position"}
    assert not any("positive_control" in line for line in read.verdicts(t))


def test_pivot_never_calls_a_control_best():
    t = pd.DataFrame({"task": ["pe"] * 3, "metric": ["twin_exam"] * 3,
                      "init": ["random", "positive_control", "rotation"],
                      "value": [0.6, 0.9, 0.7], "ci_low": [0.5, 0.8, 0.6], "ci_high": [0.7, 1.0, 0.8]})
    wide, best = read.pivot_headline(t)
    assert best == {"pe · twin_exam": "rotation"} and list(wide.index) == ["random", "rotation", "positive_control"]
    (line,) = read.verdicts(t)
    assert "**rotation** is best" in line


def test_sensitivity_reads_the_benchmarks_rows(smoke_store):
    s = read.sensitivity(smoke_store).set_index("task")
    rows = raw(smoke_store, "SELECT task, metric, value, ci_low, ci_high FROM summaries "
                            "WHERE metric LIKE 'sensitivity_%' OR metric LIKE 'mde_%'")
    res = raw(smoke_store, "SELECT task, init, fraction, metric, avg(value) AS v FROM results WHERE split = 'test' "
                           "GROUP BY ALL")
    for r in rows[rows.metric.str.startswith("sensitivity_")].itertuples():
        m = r.metric.removeprefix("sensitivity_")
        got = s.loc[r.task]
        f0 = res[(res.task == r.task) & (res.metric == m)].fraction.min()
        at = res[(res.task == r.task) & (res.metric == m) & (res.fraction == f0)].set_index("init").v
        assert got.metric == m and got.fraction == f0 and got.sensitive == (r.value == 1.0)
        assert got.ci_low == pytest.approx(r.ci_low) and got.ci_high == pytest.approx(r.ci_high)
        assert got.delta == pytest.approx(at["positive_control"] - at["random"])
        mde = rows[(rows.task == r.task) & (rows.metric == f"mde_{m}")].value.iloc[0]
        assert got.mde == pytest.approx(mde)
        word = "**sensitive**" if got.sensitive else "**insensitive**"
        assert word in got.sentence and f"smallest detectable gain {mde:.3f}" in got.sentence
        assert read.fmt_ci(got.delta, r.ci_low, r.ci_high) in got.sentence
    # a task that ran without controls: sensitivity unknown, never "no strategy helps"
    assert s.loc["demographics"].sensitive is None and "sensitivity unknown" in s.loc["demographics"].sentence


def _edit(store, tmp_path, *sql):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(store, root)
    con = duckdb.connect(str(root / "ctssl.duckdb"))
    for q in sql:
        con.execute(q)
    con.close()
    return root


def test_sensitivity_says_sensitive_when_the_positive_control_wins(smoke_store, tmp_path):
    root = _edit(smoke_store, tmp_path,
                 "UPDATE summaries SET value = 1.0, ci_low = 0.1, ci_high = 0.3 WHERE metric = 'sensitivity_cpm'",
                 "UPDATE summaries SET value = 0.1 WHERE metric = 'mde_cpm'")
    nod = read.sensitivity(root).set_index("task").loc["nodule"]
    assert nod.sensitive is True
    assert "**sensitive** — the positive control beats random init by" in nod.sentence
    assert "[0.100, 0.300]; smallest detectable gain 0.100." in nod.sentence
    root2 = _edit(smoke_store, tmp_path / "b", "DELETE FROM summaries WHERE metric LIKE 'sensitivity_%'")
    assert read.sensitivity(root2).sensitive.isna().all()


def test_strategy_verdicts_and_competence_match_summaries(smoke_store):
    v = read.strategy_verdicts(smoke_store)
    want = raw(smoke_store, "SELECT task, init, metric, value, ci_low, ci_high, note FROM summaries "
                            "WHERE metric LIKE 'verdict_%' OR metric LIKE 'ncverdict_%'")
    assert len(v) == len(want) and set(v.init) <= {"masked_region", "rotation"}
    want = want.assign(reference=np.where(want.metric.str.startswith("nc"), "negative control", "random init"),
                       metric=want.metric.str.replace(r"^(nc)?verdict_", "", regex=True))
    assert set(want.reference) == {"random init", "negative control"}
    m = v.merge(want, on=["task", "init", "metric", "reference"])
    assert len(m) == len(v) and np.allclose(m.delta, m.value) and (m.verdict == m.note_y.str.split(":").str[0]).all()
    assert list(v.reference) == sorted(v.reference, key=lambda r: r != "random init")   # random init first
    c = read.competence(smoke_store).set_index("init")
    gains = raw(smoke_store, "SELECT init, value, ci_low FROM summaries WHERE task = 'pretext' "
                             "AND metric = 'competence_gain'").set_index("init")
    assert set(c.index) == set(gains.index)
    for init, g in gains.iterrows():
        assert c.loc[init, "gain"] == pytest.approx(g.value)
        assert c.loc[init, "flag"] == (not g.ci_low > 0) and c.loc[init, "beats"] == (g.ci_low > 0)
    assert c.loc["rotation", "baseline"] == "chance"


def test_key_endpoints_keep_twin_and_froc():
    t = pd.DataFrame({"task": ["pe", "pe", "nodule", "nodule", "nodule"],
                      "metric": ["twin_exam", "auprc", "cpm", "lesion_sens_at_1fp", "iou"], "init": "random",
                      "value": 0.5, "ci_low": 0.4, "ci_high": 0.6})
    assert list(read.key_endpoints(t).metric) == ["twin_exam", "cpm", "lesion_sens_at_1fp"]


def test_deltas_highlight_only_after_correction(smoke_store, tmp_path):
    """A full-fraction gain whose plain 95% CI excludes 0 is not 'established' until the interval is
    widened for the strategies compared (Bonferroni, normal approximation)."""
    root = _edit(smoke_store, tmp_path,
                 "UPDATE summaries SET value = 0.2, ci_low = 0.05, ci_high = 0.35 "
                 "WHERE metric = 'delta_slice_auroc' AND init = 'rotation'",
                 "UPDATE summaries SET value = 0.2, ci_low = 0.01, ci_high = 0.39 "
                 "WHERE metric = 'delta_slice_auroc' AND init = 'masked_region'",
                 "UPDATE summaries SET value = 0.3, ci_low = 0.01, ci_high = 0.5 "
                 "WHERE metric = 'delta_slice_auroc' AND init = 'positive_control'")
    f = read.forest(root, "pe", "slice_auroc").set_index("init")
    z = 2.241403 / read.Z95                              # two strategies: z_{1 - 0.05/4} / z_{0.975}
    assert f.loc["rotation", "adj_low"] == pytest.approx(0.2 - 0.15 * z, abs=1e-5)
    assert f.loc["rotation", "established"] == "gain"
    assert f.loc["masked_region", "ci_low"] > 0 and f.loc["masked_region", "established"] == ""
    # controls are not in the strategies' family: judged on their own 95% CI
    assert f.loc["positive_control", "adj_low"] == 0.01 and f.loc["positive_control", "established"] == "gain"
    assert list(f.group) == ["strategy", "strategy", "control", "control"]
    d = read.deltas(root)
    best = {"pe · slice_auroc": "rotation", "pe · twin_exam": "rotation", "nodule · cpm": "masked_region"}
    assert read.confirmed_best(best, d) == {"pe · slice_auroc": "rotation"}
    assert read.established(-0.2, -0.3, -0.1, "age_mae") == "gain" and read.established(0.1, -0.1, 0.3, "x") == ""


def test_run_configs_side_by_side_with_diff(smoke_store):
    runs = read.run_table(smoke_store)
    a, b = runs[(runs.kind == "finetune") & (runs.task == "pe")].run_id.tolist()[:2]
    c = read.run_configs(smoke_store, [a, b]).set_index("setting")
    cfg = {r: json.loads(raw(smoke_store, "SELECT config FROM runs WHERE run_id = ?", [r]).config.iloc[0])
           for r in (a, b)}
    assert list(c.columns) == [a, b, "differs"]
    for key in c.index:
        top, *rest = key.split(".")
        v = cfg[a].get(top, "–")
        for part in rest:
            v = v.get(part, "–") if isinstance(v, dict) else "–"
        assert c.loc[key, a] == (json.dumps(v) if isinstance(v, (list, dict)) else str(v))
    assert c.differs.any() and not c.loc[~c.differs, [a, b]].nunique(axis=1).gt(1).any()
    assert "store" not in c.index                                  # where it wrote is not a setting
    assert read.run_configs(smoke_store, []).empty
    assert list(read.run_configs(smoke_store, [a, "no-such-run"]).columns) == ["setting", a, "differs"]


def test_series_labels_and_finding_slices(smoke_store):
    s = read.series_list(smoke_store).set_index("series_key")
    want = raw(smoke_store, "SELECT series_key, count(*) FILTER (WHERE pe) AS n_pe, "
                            "count(*) FILTER (WHERE nodule_px > 0) AS n_nod FROM slices GROUP BY ALL") \
        .set_index("series_key")
    assert (s.n_pe == want.n_pe.reindex(s.index)).all() and (s.n_nodule == want.n_nod.reindex(s.index)).all()
    assert s.label.is_unique and (s.dataset == "synthetic").all()
    key = want[(want.n_pe > 0)].index[0]
    f = read.finding_slices(smoke_store, key)
    rows = raw(smoke_store, "SELECT idx FROM slices WHERE series_key = ? AND (pe OR nodule_px > 0) ORDER BY idx",
               [key])
    assert f.idx.tolist() == rows.idx.tolist() and f.pe.sum() == want.n_pe[key]
    assert f"{int(want.n_pe[key])} PE" in s.label[key]
    assert read.finding_slices(smoke_store, "no-such-series").empty


# ---------------------------------------------------------------- bias scorecard storage (issue 15)
def test_scorecard_outcome_is_stored_by_the_benchmark_and_read_directly(smoke_store):
    """The benchmark stores each scorecard row's outcome; the reader takes it as stored, not from the sentence."""
    bid = read.latest_finished(read.benchmarks(smoke_store))
    stored = raw(smoke_store, "SELECT init, metric, value, outcome FROM summaries WHERE benchmark_id = ? AND "
                              "metric LIKE 'scorecard_%'", [bid])
    assert len(stored) and set(stored.outcome) <= set(read.SCORECARD_OUTCOMES)
    right = stored.outcome.isin(["hit", "correct null"])
    assert (stored.value.isna() == (stored.outcome == "not run")).all()
    assert (stored.value.dropna() == right[stored.value.notna()].astype(float)).all()
    card = read.bias_scorecard(smoke_store, bid)
    got = dict(zip(card.init + "/scorecard_" + card.attribute + "_" + card.analysis, card.outcome))
    assert got == dict(zip(stored.init + "/" + stored.metric, stored.outcome))


def test_scorecard_of_a_store_before_the_outcome_column_is_parsed_from_the_sentence(smoke_store, tmp_path):
    """A schema-2 store (no summaries.outcome) still reads: the outcome comes back from each sentence."""
    import shutil

    from ctssl_core.db import connect

    root = tmp_path / "old"
    root.mkdir()
    shutil.copy(smoke_store / "ctssl.duckdb", root / "ctssl.duckdb")
    with connect(root / "ctssl.duckdb") as con:
        con.execute("ALTER TABLE summaries DROP COLUMN outcome")
        con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    new, old = read.bias_scorecard(smoke_store), read.bias_scorecard(root)
    assert len(old) == len(new) and "" not in set(old.outcome)
    pd.testing.assert_frame_equal(old, new)


def test_scorecard_outcome_prefers_the_stored_value_then_the_sentence():
    sentence = "rotation: race has a planted imaging correlate; the KS tests detects it (smallest corrected p 0.01): right."
    assert read.scorecard_outcome("miss", sentence) == "miss"                    # stored wins
    assert read.scorecard_outcome(None, sentence) == "hit"                       # older store: the sentence
    assert read.scorecard_outcome("nonsense", "x: y; the probe flags it: WRONG, a false positive of the analysis.") \
        == "false positive"
    assert read.scorecard_outcome(None, None) == "" and read.scorecard_outcome(float("nan"), "no verdict here") == ""


# ---------------------------------------------------------------- embeddings: colour by any attribute, point -> slice
def test_attribute_kind_numeric_codes_text_and_empty():
    s = pd.Series
    assert read.attribute_kind(s(["23.4", "19.0", None, "31.25"])) == "numeric"        # CSV text, fractional
    assert read.attribute_kind(s([float(v) for v in range(40)])) == "numeric"           # many whole values
    assert read.attribute_kind(s(["1", "2", "3", "1"])) == "categorical"                # a handful of codes
    assert read.attribute_kind(s([0.0, 1.0, np.nan])) == "categorical"                  # a 0/1 label
    assert read.attribute_kind(s(["A", "B", "7"])) == "categorical"
    assert read.attribute_kind(s([True, False])) == "categorical"
    assert read.attribute_kind(s([61.0, 70.0]), "age") == "numeric"                     # age is always a scale
    assert read.attribute_kind(s([None, "", "  "], dtype=object)) == "empty"
    assert read.attribute_kind(s([], dtype=float)) == "empty"


def test_embedding_view_colours_by_every_stored_attribute(attributes_store):
    """Issue 14 item 6: extra demographics columns reach the points; kinds decide the colour scale."""
    emb = read.embeddings(attributes_store)
    eid = emb[(emb.init != "random") & (emb.level == "slice")].emb_id.iloc[0]
    view = read.embedding_view(attributes_store, eid)
    assert view["methods"] == ["pca"] and view["ref_id"] is not None     # the smoke profile skips UMAP
    pts, ref = view["points"]["pca"], view["ref_points"]["pca"]
    kinds = dict(zip(view["attributes"].attribute, view["attributes"].kind))
    assert list(kinds)[:5] == ["race", "sex", "age", "site", "control_group"]
    assert kinds["age"] == "numeric" and kinds["bmi"] == "numeric" and kinds["scanner_code"] == "categorical"
    assert kinds["race"] == "categorical" and kinds["sex"] == "empty"          # the CSV said "not recorded"
    assert not {"row", "x", "y", "patient_key", "series_key", "slice_id", "idx"} & set(kinds)
    pats = read.patient_attributes(attributes_store).set_index("patient_key")
    for p in (pts, ref):                                                 # joined by patient, order kept
        assert p.bmi.tolist() == pats.bmi.reindex(p.patient_key).tolist()
    keys = pd.read_parquet(attributes_store / emb.set_index("emb_id").keys_path[eid])
    assert pts.series_key.tolist() == keys.series_key.iloc[pts.row].tolist()
    n_known = dict(zip(view["attributes"].attribute, view["attributes"].n_known))
    assert n_known["bmi"] == len(pts) and n_known["sex"] == 0 and pts.sex.isna().all()
    assert keys.sex.notna().all()                  # the keys file's snapshot had sex: the catalog, now, wins
    assert "patient_key" not in read.demographics(attributes_store).columns
    assert "bmi" in read.demographics(attributes_store).columns


def test_point_slice_is_the_slice_the_point_came_from(smoke_store):
    emb = read.embeddings(smoke_store).set_index("emb_id")
    eid = emb[(emb.init != "random") & (emb.level == "slice")].index[0]
    keys = pd.read_parquet(smoke_store / emb.keys_path[eid])
    row = len(keys) // 2
    ps = read.point_slice(smoke_store, eid, row)
    series = read.series_list(smoke_store).set_index("series_key")
    assert (ps.row, ps.level, ps.series_key, ps.idx) == (row, "slice", keys.series_key[row], int(keys.idx[row]))
    assert ps.series_label == series.label[ps.series_key] and ps.n_slices == int(series.n_slices[ps.series_key])
    arr = np.load(smoke_store / series.array_path[ps.series_key])               # (S, H, W) int16
    assert np.array_equal(ps.view.hu, arr[ps.idx])
    assert ps.attributes["race"] == keys.race[row] and "patient_key" not in ps.attributes
    exam = emb[(emb.init == emb.init[eid]) & (emb.level == "exam")].index[0]
    ek = pd.read_parquet(smoke_store / emb.keys_path[exam])
    ep = read.point_slice(smoke_store, exam, 0)                                  # an exam: its middle slice
    assert ep.level == "exam" and ep.series_key == ek.series_key[0] and ep.idx == ep.n_slices // 2
    with pytest.raises(read.ResultFileMissing, match=rf"point {len(keys)} is not in embedding .*0\.\.{len(keys) - 1}"):
        read.point_slice(smoke_store, eid, len(keys))
    with pytest.raises(read.ResultFileMissing, match="not in this store"):
        read.point_slice(smoke_store, "emb-gone", 0)


def test_a_plotly_selection_maps_back_to_its_points():
    pts = pd.DataFrame({"x": np.arange(6.0), "y": np.zeros(6), "race": ["B", "A", "B", None, "A", "B"],
                        "bmi": [20.5, 21.0, 22.5, 23.0, 24.5, 25.0]})
    fig = charts.scatter_fig(pts, "race", "t", kind="categorical")
    assert [t.name for t in fig.data] == ["A", "B", "unknown"]
    # curve 1 (B) point 2 is the third B: position 5; curve 2 point 0 is the unknown one; bad entries are ignored
    sel = [{"curve_number": 1, "point_index": 2}, {"curve_number": 2, "point_index": 0},
           {"curve_number": 7, "point_index": 0}, {"curve_number": 0, "point_index": 9}, {}]
    assert charts.selected_positions(pts, "race", "categorical", sel) == [5, 3]
    for k, t in enumerate(fig.data):                                             # the same partition as the figure
        assert list(t.x) == pts.x.iloc[charts.scatter_groups(pts, "race", "categorical")[k][1]].tolist()
    num = charts.scatter_fig(pts, "bmi", "t", kind="numeric")
    assert len(num.data) == 1 and np.allclose(num.data[0].marker.color, pts.bmi)
    assert charts.selected_positions(pts, "bmi", "numeric", [{"curve_number": 0, "point_index": 4}]) == [4]
    one = charts.scatter_fig(pts.assign(e=None), "e", "t", kind="empty")        # empty: one colour, one trace
    assert len(one.data) == 1 and one.data[0].marker.color is None and len(one.data[0].x) == 6


def test_summaries_with_alternative_metrics_stay_in_their_benchmark(tmp_path):
    """A where clause with OR (delta_ OR verdict_, sensitivity_ OR mde_) must not let another benchmark's rows in:
    it is parenthesised before the benchmark filter is ANDed on."""
    from ctssl_core.results.write import write_summaries

    rows = [dict(benchmark_id=b, task="pe", init="rotation", metric=m, value=v, ci_low=v - 0.1, ci_high=v + 0.1)
            for b, v in (("bench-a", 0.1), ("bench-b", 0.3)) for m in ("delta_slice_auroc", "verdict_slice_auroc")]
    write_summaries(tmp_path, rows)
    for bid, v in (("bench-a", 0.1), ("bench-b", 0.3)):
        d = read.deltas(tmp_path, bid)
        assert len(d) == 2 and (d.value == v).all(), (bid, d)
    assert len(read.deltas(tmp_path)) == 4
