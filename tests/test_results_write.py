"""results/write.py: runs, exactly-once metric merging, results/summaries, benchmarks."""

from __future__ import annotations

import json
import os

import pytest

from ctssl_core.config import ConfigError
from ctssl_core.db import connect
from ctssl_core.paths import store_paths
from ctssl_core.results import write as W
from ctssl_core.results.runfolder import RunLogger


def _q(root, sql, params=()):
    with connect(store_paths(root).db, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def test_new_run_id_readable_unique_and_safe():
    a = W.new_run_id("finetune", "pe", "masked_region")
    b = W.new_run_id("finetune", "pe", "masked_region")
    assert a != b and a.startswith("finetune-pe-masked_region-")
    assert W.check_run_id(a) == a
    assert W.new_run_id("Pre train", "a/b", "../x").count("/") == 0
    for bad in ["../etc", "a/b", "", "x;rm -rf", ".hidden"]:
        with pytest.raises(ConfigError, match="invalid run id"):
            W.check_run_id(bad)


def test_run_lifecycle_and_metrics_merge(tmp_path):
    rid = W.new_run_id("pretrain", "rotation", "random")
    run_dir = W.start_run(tmp_path, rid, "pretrain", "rotation", "random", "tiny", {"lr": 0.001}, seed=3)
    assert json.loads((run_dir / "config.json").read_text()) == {"lr": 0.001}
    log = RunLogger(tmp_path, rid)
    for s in range(5):
        log({"step": s, "epoch": s / 5, "wall_s": 0.1 * s, "train/loss": 1.0 / (s + 1), "lr": 1e-3,
             "note": "not a number"})
    log.close()
    # the training side wrote its run folder only: every line is on disk, none in the store yet
    assert _q(tmp_path, "SELECT count(*) FROM metrics")[0][0] == 0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 5
    W.finish_run(tmp_path, rid, "succeeded", checkpoint=run_dir / "checkpoints" / "last.pt")   # the store merges
    rows = _q(tmp_path, "SELECT step, name, value FROM metrics WHERE run_id=? ORDER BY step, name", [rid])
    assert len(rows) == 10  # 2 numeric metrics x 5 steps; the string is skipped
    assert rows[0] == (0, "lr", 1e-3) and rows[1] == (0, "train/loss", 1.0)
    assert rows[-1] == (4, "train/loss", pytest.approx(0.2))
    status, ckpt, wall, cv = _q(tmp_path, "SELECT status, checkpoint, wall_s, code_version FROM runs")[0]
    assert status == "succeeded" and ckpt == f"runs/{rid}/checkpoints/last.pt"
    assert wall >= 0 and cv
    # merging again adds nothing: exactly once
    assert W.merge_pending(tmp_path) == 0
    assert _q(tmp_path, "SELECT count(*) FROM metrics")[0][0] == 10
    with pytest.raises(ConfigError, match="status"):
        W.finish_run(tmp_path, rid, "done")
    with pytest.raises(ConfigError, match="no run"):
        W.finish_run(tmp_path, "unknown-run", "failed")


def test_merge_pending_takes_only_whole_lines_and_resumes_after_crash(tmp_path):
    rid = "pretrain-x-random-1"
    W.start_run(tmp_path, rid, "pretrain", "x", "random", "tiny", {})
    path = store_paths(tmp_path).run_dir(rid) / "metrics.jsonl"
    # a "dead" process left 3 whole lines, a corrupt one, and half a line
    lines = [json.dumps({"step": i, "epoch": 0, "wall_s": i, "loss": float(i)}) for i in range(3)]
    path.write_text("\n".join(lines) + "\n" + "{not json}\n" + '{"step": 3, "lo')
    assert W.merge_pending(tmp_path, rid) == 3
    assert W.merge_pending(tmp_path, rid) == 0
    with open(path, "a") as f:  # the writer finishes its line later
        f.write('ss": 3.0}\n')
    assert W.merge_pending(tmp_path) == 1
    vals = _q(tmp_path, "SELECT step, value FROM metrics ORDER BY step")
    assert vals == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    off = _q(tmp_path, "SELECT byte_offset FROM metric_offsets WHERE run_id=?", [rid])[0][0]
    assert off == os.path.getsize(path)


def test_the_run_logger_never_opens_the_store(tmp_path, monkeypatch):
    """The training loop's logger writes the run folder only: with every DuckDB connection refused it logs,
    closes, and its lines reach the store when the store merges them (here finish_run)."""
    import ctssl_core.db as db

    rid = "finetune-pe-random-2"
    W.start_run(tmp_path, rid, "finetune", "pe", "random", "tiny", {}, fraction=0.05)
    real = db.connect

    def refused(*a, **k):
        raise AssertionError("the training side opened DuckDB")

    for mod in (db, W):
        monkeypatch.setattr(mod, "connect", refused)
    log = RunLogger(tmp_path, rid)
    for s in range(3):
        log({"step": s, "epoch": 0.0, "train/loss": 0.5 / (s + 1)})
    log.close()
    log.close()                                         # idempotent
    with pytest.raises(ConfigError, match="closed"):
        log({"step": 3})
    for mod in (db, W):
        monkeypatch.setattr(mod, "connect", real)
    W.finish_run(tmp_path, rid, "succeeded")
    assert _q(tmp_path, "SELECT step, name, value FROM metrics ORDER BY step") == [
        (0, "train/loss", 0.5), (1, "train/loss", 0.25), (2, "train/loss", pytest.approx(0.5 / 3))]
    assert _q(tmp_path, "SELECT min(wall_s) FROM metrics")[0][0] >= 0   # filled when the caller gives none


def test_restart_of_same_run_keeps_created_at_and_metrics(tmp_path):
    rid = "pretrain-r-random-3"
    W.start_run(tmp_path, rid, "pretrain", "r", "random", "tiny", {})
    with RunLogger(tmp_path, rid) as log:
        log({"step": 0, "loss": 1.0})
    W.finish_run(tmp_path, rid, "failed", error="killed")
    created = _q(tmp_path, "SELECT created_at FROM runs")[0][0]
    W.start_run(tmp_path, rid, "pretrain", "r", "random", "tiny", {})
    assert _q(tmp_path, "SELECT status, error, created_at FROM runs") == [("running", None, created)]
    with RunLogger(tmp_path, rid) as log:
        log({"step": 1, "loss": 0.5})
    assert W.merge_pending(tmp_path, rid) == 1                  # only the new line
    assert _q(tmp_path, "SELECT step FROM metrics ORDER BY step") == [(0,), (1,)]


def test_start_run_records_run_id_for_a_job(tmp_path, monkeypatch):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    monkeypatch.setenv(W.JOB_DIR_ENV, str(job_dir))
    W.start_run(tmp_path / "s", "a-1", "finetune", "pe", "random", "tiny", {})
    W.start_run(tmp_path / "s", "a-2", "finetune", "pe", "random", "tiny", {})
    assert (job_dir / "runs.txt").read_text().split() == ["a-1", "a-2"]


def test_results_summaries_benchmarks(tmp_path):
    W.start_benchmark(tmp_path, "bench-1", profile="smoke", dataset="synthetic", config={"a": 1})
    row = {"run_id": "r1", "benchmark_id": "bench-1", "task": "pe", "init": "random", "fraction": 0.05,
           "seed": 0, "split": "test", "metric": "slice_auroc", "value": 0.71, "ci_low": 0.6,
           "ci_high": 0.8, "n": 100}
    assert W.write_results(tmp_path, [row, {**row, "metric": "exam_auroc", "value": 0.8}]) == 2
    W.write_results(tmp_path, [{**row, "value": 0.75}])  # re-run replaces, never duplicates
    assert _q(tmp_path, "SELECT metric, value FROM results ORDER BY metric") == [
        ("exam_auroc", 0.8), ("slice_auroc", 0.75)]
    W.write_summaries(tmp_path, [{"benchmark_id": "bench-1", "task": "pe", "init": "rotation",
                                  "metric": "labels_saved", "value": 0.4, "note": "vs random"}])
    assert _q(tmp_path, "SELECT metric, value, note FROM summaries") == [("labels_saved", 0.4, "vs random")]
    W.finish_benchmark(tmp_path, "bench-1", "succeeded")
    status, wall = _q(tmp_path, "SELECT status, wall_s FROM benchmarks")[0]
    assert status == "succeeded" and wall >= 0
    with pytest.raises(ConfigError, match="unknown columns"):
        W.write_results(tmp_path, [{**row, "auroc": 1}])
    with pytest.raises(ConfigError, match="not a number"):
        W.write_results(tmp_path, [{**row, "value": "high"}])
    with pytest.raises(ConfigError, match="no benchmark"):
        W.finish_benchmark(tmp_path, "nope")
    assert _q(tmp_path, "SELECT count(*) FROM results")[0][0] == 2  # bad rows added nothing


# --------------------------------------------------------------------------- a unit writes its folder, the store merges


def _refuse_duckdb(monkeypatch, read_only_ok: bool = False):
    """Every DuckDB connection (or every read-write one) raises, as a training process must never need."""
    import ctssl_core.db as db

    real = db.connect

    def guarded(path, read_only=False, **k):
        if read_only and read_only_ok:
            return real(path, read_only=True, **k)
        raise AssertionError("a unit's process opened DuckDB to write")

    for mod in (db, W):
        monkeypatch.setattr(mod, "connect", guarded)
    return real


def test_a_unit_writes_only_its_run_folder_and_the_store_merges_it(tmp_path, monkeypatch):
    """record_start / RunLogger / record_results / record_end with every DuckDB connection refused: the run
    is whole in its folder (no store file is even created); one merge brings row, results and metric lines,
    a second merge changes nothing, and a newer record (a resume) is merged again."""
    from ctssl_core.results import runfolder as rf

    rid = "finetune-pe-random-7"
    real = _refuse_duckdb(monkeypatch)
    run_dir = rf.record_start(tmp_path, rid, "finetune", "pe", "random", "tiny", {"lr": 0.1}, fraction=0.5, seed=2,
                              labels={"name": "first", "tags": {"owner": "ana"}, "notes": None}, unit_hash="h1")
    with RunLogger(tmp_path, rid) as log:
        for s in range(3):
            log({"step": s, "train/loss": 1.0 / (s + 1)})
    rf.record_results(tmp_path, rid, [{"run_id": rid, "task": "pe", "init": "random", "fraction": 0.5, "seed": 2,
                                       "split": "test", "metric": "auroc", "value": 0.75, "ci_low": 0.6,
                                       "ci_high": 0.9, "n": 12}])
    rf.record_end(tmp_path, rid, "succeeded", checkpoint=run_dir / "checkpoints" / "last.pt")
    assert not store_paths(tmp_path).db.exists()
    rec = rf.read_record(tmp_path, rid)
    assert rec["status"] == "succeeded" and rec["checkpoint"] == f"runs/{rid}/checkpoints/last.pt"
    assert rec["wall_s"] >= 0 and rec["labels"] == {"name": "first", "tags": {"owner": "ana"}, "notes": None}
    with pytest.raises(ConfigError, match="unknown columns"):      # a bad row stops the unit, not a later merge
        rf.record_results(tmp_path, rid, [{"run_id": rid, "auroc": 0.7}])
    with pytest.raises(ConfigError, match="status"):
        rf.record_end(tmp_path, rid, "done")
    with pytest.raises(ConfigError, match="no run"):
        rf.record_end(tmp_path, "never-started", "failed")

    for mod in (__import__("ctssl_core.db", fromlist=["x"]), W):
        monkeypatch.setattr(mod, "connect", real)
    assert W.merge_pending(tmp_path) == 3
    assert _q(tmp_path, "SELECT status, fraction, seed, checkpoint, unit_hash, name, tags FROM runs") == [
        ("succeeded", 0.5, 2, f"runs/{rid}/checkpoints/last.pt", "h1", "first", '{"owner": "ana"}')]
    assert _q(tmp_path, "SELECT metric, value, n FROM results") == [("auroc", 0.75, 12)]
    assert _q(tmp_path, "SELECT count(*) FROM metrics")[0][0] == 3
    assert W.merge_pending(tmp_path) == 0                                     # nothing new: nothing merged
    stamps = _q(tmp_path, "SELECT file, stamp FROM merged_files ORDER BY file")
    assert [f for f, _ in stamps] == ["metrics_id", "results.json", "run.json"]
    W.merge_pending(tmp_path)
    assert _q(tmp_path, "SELECT file, stamp FROM merged_files ORDER BY file") == stamps

    rf.record_start(tmp_path, rid, "finetune", "pe", "random", "tiny", {"lr": 0.1}, fraction=0.5, seed=2)   # resume
    W.merge_pending(tmp_path, rid)
    created = _q(tmp_path, "SELECT status, ended_at, checkpoint, name, created_at FROM runs")[0]
    assert created[:4] == ("running", None, f"runs/{rid}/checkpoints/last.pt", "first")
    assert str(created[4]).replace(" ", "T").startswith(rec["created_at"][:19])   # the first start's time


def test_labels_changed_in_the_store_survive_later_merges_of_the_record(tmp_path):
    """``ctssl annotate`` changes the record and the row, so the unit's end (a newer record) does not bring
    back a removed tag or an old name."""
    from ctssl_core.results import runfolder as rf

    rid = "pretrain-rotation-random-8"
    rf.record_start(tmp_path, rid, "pretrain", "rotation", "random", "tiny", {},
                    labels={"name": "old", "tags": {"a": "1", "b": "2"}, "notes": None})
    W.merge_pending(tmp_path)
    got = W.annotate_run(tmp_path, rid, name="new", tags={"a": ""}, notes="why")
    assert got == {"name": "new", "tags": {"b": "2"}, "notes": "why"}
    rf.record_end(tmp_path, rid, "succeeded")
    W.merge_pending(tmp_path)
    assert _q(tmp_path, "SELECT status, name, tags, notes FROM runs") == [("succeeded", "new", '{"b": "2"}', "why")]


def test_the_dashboard_shows_a_run_its_driver_has_not_merged(tmp_path):
    """A command run by hand (or a unit) that is still training has only its folder: ``run_table`` lists it
    as its record says, ``store_version`` changes when the record does, and after the merge the row is the
    same run, once."""
    from ctssl_core.results import read
    from ctssl_core.results import runfolder as rf

    W.start_run(tmp_path, "benchmark-1", "benchmark", "benchmark", "-", "tiny", {})   # a driver's own run
    v0 = read.store_version(tmp_path)
    rf.record_start(tmp_path, "pretrain-x-random-9", "pretrain", "x", "random", "tiny", {}, labels={"name": "live"})
    v1 = read.store_version(tmp_path)
    table = read.run_table(tmp_path).set_index("run_id")
    assert v1 != v0 and table.loc["pretrain-x-random-9", ["status", "name"]].tolist() == ["running", "live"]
    assert table.loc["benchmark-1", "status"] == "running"
    rf.record_end(tmp_path, "pretrain-x-random-9", "failed", error="boom")
    assert read.store_version(tmp_path) != v1
    row = read.run_table(tmp_path).set_index("run_id").loc["pretrain-x-random-9"]
    assert (row.status, row.error) == ("failed", "boom")
    W.merge_pending(tmp_path)
    after = read.run_table(tmp_path)
    assert sorted(after.run_id) == ["benchmark-1", "pretrain-x-random-9"]
    assert after.set_index("run_id").loc["pretrain-x-random-9", "status"] == "failed"


# --------------------------------------------------------------------------- found by a review (2026-12-03)


def test_a_resume_keeps_a_stored_runs_labels_and_removes_the_tag_it_removes(tmp_path):
    """A run the store knew before runs had records (made by an older ctssl: a row, no run.json) resumed with
    ``--tag a= --tag new=2`` keeps its name and notes and loses tag a; a tag removed on a later resume of a run
    with a record stays removed (the record holds a label change, applied to the row by the merge)."""
    from ctssl_core.results import runfolder as rf
    from ctssl_core.schema import ensure_schema

    rid = "pretrain-old-random-1"
    with connect(store_paths(tmp_path).db) as con:          # the row an older ctssl wrote, no record
        ensure_schema(con)
        con.execute("INSERT INTO runs (run_id, kind, status, name, tags, notes) VALUES (?, 'pretrain', 'failed', "
                    "'legacy', '{\"a\": \"1\", \"keep\": \"y\"}', 'why')", [rid])
    rf.record_start(tmp_path, rid, "pretrain", "old", "random", "tiny", {},
                    labels=W.check_labels(tags=["a=", "new=2"]))
    W.merge_pending(tmp_path)
    assert _q(tmp_path, "SELECT status, name, tags, notes FROM runs") == [
        ("running", "legacy", '{"keep": "y", "new": "2"}', "why")]
    rf.record_start(tmp_path, rid, "pretrain", "old", "random", "tiny", {}, labels=W.check_labels(tags=["new="]))
    W.merge_pending(tmp_path)
    W.merge_pending(tmp_path)                               # merging again changes nothing
    assert _q(tmp_path, "SELECT name, tags FROM runs") == [("legacy", '{"keep": "y"}')]


def test_a_run_folder_made_again_under_its_id_merges_its_own_metrics(tmp_path):
    """A unit rerun after its folder was deleted (benchmark unit ids are fixed): the new attempt's metric lines
    all reach the store and the deleted attempt's rows go (the store's byte offset was the old file's)."""
    import shutil

    from ctssl_core.results import runfolder as rf

    rid = "ft-abc-pe-random-f1-s0"

    def attempt(steps, loss):
        rf.record_start(tmp_path, rid, "finetune", "pe", "random", "tiny", {})
        with RunLogger(tmp_path, rid) as log:
            for s in range(steps):
                log({"step": s, "train/loss": loss})
        rf.record_end(tmp_path, rid, "succeeded")
        W.merge_pending(tmp_path)

    attempt(10, 1.0)
    shutil.rmtree(store_paths(tmp_path).run_dir(rid))
    attempt(15, 2.0)
    assert _q(tmp_path, "SELECT value, count(*) FROM metrics GROUP BY value") == [(2.0, 15)]
    attempt(15, 2.0)                                        # a resume (same folder): nothing merged twice
    assert _q(tmp_path, "SELECT count(*) FROM metrics")[0][0] == 30


def test_one_damaged_run_folder_is_named_and_skipped_not_blocking_the_others(tmp_path, caplog):
    from ctssl_core.results import runfolder as rf

    for rid in ("finetune-a", "finetune-b"):
        rf.record_start(tmp_path, rid, "finetune", "pe", "random", "tiny", {})
        rf.record_end(tmp_path, rid, "succeeded")
    bad = rf.rows_file(tmp_path, "finetune-a", "results")
    bad.write_text('[{"run_id": "finetune-a", "calibration_bin": 3}]')   # a hand edit, another version's column
    with caplog.at_level("WARNING"):
        W.merge_pending(tmp_path)
    assert _q(tmp_path, "SELECT run_id FROM runs") == [("finetune-b",)]
    assert str(bad) in caplog.text and "calibration_bin" in caplog.text
    with pytest.raises(ConfigError, match="results.json: results row 0 has unknown columns"):
        W.merge_pending(tmp_path, "finetune-a")              # asked for that run: said, with the file


def test_a_copied_store_does_not_replay_an_older_embedding_over_a_newer_one(tmp_path):
    """Two embedding units made one emb_id (its name comes from the init): the newer row stays even when every
    folder is merged again in run-id order (a copy of the store has new inodes, so nothing looks merged)."""
    import datetime as dt
    import shutil

    from ctssl_core.results import runfolder as rf

    def unit(rid, n, when):
        rf.record_start(tmp_path / "store", rid, "embed", "embed", "random", "tiny", {})
        rf.record_rows(tmp_path / "store", rid, "embeddings", [dict(
            emb_id="random-all-slice", run_id=None, init="random", encoder="tiny", split="all", level="slice",
            path="embeddings/e.npy", keys_path="embeddings/e.parquet", n=n, dim=8, created_at=when)])
        rf.record_rows(tmp_path / "store", rid, "projections", [dict(
            emb_id="random-all-slice", method="pca", params="{}", seconds=0.1, n_points=n, sampled=False,
            path=f"embeddings/p{n}.parquet")])
        W.merge_pending(tmp_path / "store")

    t0 = dt.datetime(2026, 12, 1, 10, 0, 0)
    unit("embed-zzzz-random", 100, t0)
    unit("embed-aaaa-random", 256, t0 + dt.timedelta(hours=1))
    shutil.copytree(tmp_path / "store", tmp_path / "copy")
    W.merge_pending(tmp_path / "copy")
    for root in (tmp_path / "store", tmp_path / "copy"):
        assert _q(root, "SELECT n FROM embeddings") == [(256,)]
        assert _q(root, "SELECT n_points FROM projections") == [(256,)]


def test_close_runs_leaves_the_job_unfinished_while_the_store_is_busy(tmp_path, monkeypatch):
    """The runner ends the job only once its runs are merged: a busy store is raised to its retry loop."""
    from ctssl_core.db import StoreBusy
    from ctssl_core.jobs import queue
    from ctssl_core.results import runfolder as rf

    store = tmp_path / "s"
    job_dir = queue.job_dir(store, "job-1")
    job_dir.mkdir(parents=True)
    monkeypatch.setenv(W.JOB_DIR_ENV, str(job_dir))
    rf.record_start(store, "tick-1", "finetune", "tick", "random", "none", {})
    monkeypatch.delenv(W.JOB_DIR_ENV)

    def busy(*a, **k):
        raise StoreBusy("held by another writer")

    monkeypatch.setattr(queue, "merge_pending", busy)
    with pytest.raises(StoreBusy):
        queue.close_runs(store, "job-1", "failed", "killed")
    assert rf.read_record(store, "tick-1")["status"] == "failed"      # its record is ended meanwhile
    monkeypatch.undo()
    queue.close_runs(store, "job-1", "failed", "killed")
    assert _q(store, "SELECT status, error FROM runs") == [("failed", "killed")]


def test_a_resumed_run_from_before_records_keeps_its_start_time(tmp_path):
    import datetime as dt

    from ctssl_core.results import runfolder as rf
    from ctssl_core.schema import ensure_schema

    with connect(store_paths(tmp_path).db) as con:          # the row an older ctssl wrote, no record
        ensure_schema(con)
        con.execute("INSERT INTO runs (run_id, kind, status, created_at) VALUES ('old-1', 'pretrain', 'failed', ?)",
                    [dt.datetime(2026, 11, 1, 8, 0)])
    rf.record_start(tmp_path, "old-1", "pretrain", "x", "random", "tiny", {})
    W.merge_pending(tmp_path)
    assert _q(tmp_path, "SELECT status, created_at FROM runs") == [("running", dt.datetime(2026, 11, 1, 8, 0))]
