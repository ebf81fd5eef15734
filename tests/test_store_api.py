"""The named store queries that replaced inline SQL in training, benchmark, embedding, bias, export,
tracker and command code (``results/store_api.py``, ``data/catalog.py``): checked against a store the
real smoke benchmark wrote, against each other, and on a missing store (reads as "nothing there")."""

from __future__ import annotations


import duckdb
import pytest

from ctssl_core.data import catalog
from ctssl_core.db import StoreMissing
from ctssl_core.paths import store_paths
from ctssl_core.results import read, store_api


def test_missing_store_reads_as_nothing_there(tmp_path):
    assert store_api.run_task(tmp_path, "r1") is None
    assert store_api.run_origin(tmp_path, "r1") is None
    assert store_api.succeeded_units(tmp_path) == {}
    assert store_api.runs_with_hash(tmp_path, "pretrain", "0" * 16) == []
    assert store_api.pretrain_checkpoints(tmp_path, "rotation") == []
    ck = store_api.checkpoints(tmp_path)
    assert ck.empty and list(ck.columns) == ["run_id", "task", "encoder", "checkpoint", "ended_at"]
    assert catalog.has_slices(tmp_path) is False
    with pytest.raises(StoreMissing, match="ctssl synth"):      # a real read on no store says what to do
        catalog.series_heights(tmp_path)
    assert not store_paths(tmp_path).db.exists()                 # reading never creates a store


def test_run_queries_agree_on_the_smoke_store(smoke_store):
    from ctssl_core.plan import make_plan

    done = store_api.succeeded_units(smoke_store)
    plan = make_plan("smoke")
    pre_ids = []
    for unit in plan.of_kind("pretrain"):              # the benchmark's pretrainings, found by their identity
        rows = store_api.runs_with_hash(smoke_store, "pretrain", unit.unit_hash)
        assert len(rows) == 1, unit.task
        (rid, ckpt), = rows
        pre_ids.append(rid)
        assert store_api.pretrain_checkpoints(smoke_store, unit.task) == [ckpt]
        assert store_api.run_task(smoke_store, rid) == unit.task
        assert store_api.run_origin(smoke_store, rid)[:2] == (rid, unit.task)
        assert done[rid] == (ckpt, unit.unit_hash)
        assert store_api.runs_with_hash(smoke_store, "finetune", unit.unit_hash) == []   # kind is part of it
    for unit in plan.of_kind("finetune"):              # every fine-tune stored the identity the plan gives it
        assert done[unit.run_id][1] == unit.unit_hash
    ck = store_api.checkpoints(smoke_store)
    assert set(ck["run_id"]) == set(pre_ids)                     # every smoke pretraining kept its checkpoint
    assert all((smoke_store / c).is_file() for c in ck["checkpoint"])
    assert store_api.run_task(smoke_store, "no-such-run") is None
    assert store_api.finished_of(smoke_store, []) == [] and store_api.finished_of(smoke_store, ["no-such-run"]) == []
    assert store_api.finished_of(smoke_store, sorted(pre_ids)) == sorted(
        pre_ids, key=lambda r: (store_api.run_record(smoke_store, r)[0]["created_at"], r))
    row, results = store_api.run_record(smoke_store, pre_ids[0])
    assert row["run_id"] == pre_ids[0] and store_api.run_card(smoke_store, pre_ids[0])[0][0] == row["status"]
    assert store_api.run_record(smoke_store, "no-such-run") == (None, [])


def test_embedding_queries_on_the_smoke_store(smoke_store):
    row, known = store_api.embedding_row(smoke_store, "no-such-emb")
    assert row is None and known                                 # the smoke benchmark embeds
    rows = [store_api.embedding_row(smoke_store, e) for e in known]
    assert all(r["emb_id"] == e and none == [] for (r, none), e in zip(rows, known))
    assert all((smoke_store / r["path"]).is_file() for r, _ in rows)
    trained = [r for r, _ in rows if r["init"] != "random"]
    assert trained and len(trained) < len(rows)                  # trained inits and their random reference
    for r in trained:
        assert store_api.projection_path(smoke_store, r["emb_id"], "pca") is not None
        assert store_api.projection_path(smoke_store, r["emb_id"], "no-such-method") is None
        ref, _ = store_api.embedding_row(smoke_store, store_api.random_reference(smoke_store, r["emb_id"]))
        assert read.reference_for(smoke_store, r["emb_id"]) == ref["emb_id"]     # the page shows that one
        assert ref["init"] == "random" and (ref["split"], ref["level"], ref["encoder"]) == (
            r["split"], r["level"], r["encoder"])
    assert store_api.random_reference(smoke_store, "no-such-emb") is None


def test_catalog_queries_on_the_smoke_store(smoke_store):
    assert catalog.has_slices(smoke_store)
    heights = catalog.series_heights(smoke_store)
    patients = catalog.patients_table(smoke_store)
    assert heights and all(h > 0 for h in heights)
    assert list(patients["patient_key"]) == sorted(patients["patient_key"])
    rows = catalog.slice_rows(smoke_store, scheme=-12345)        # a scheme no one made: every split empty
    assert len(rows) > 0 and rows["split"].isna().all() and rows["slice_id"].is_monotonic_increasing
    assert set(rows["patient_key"]) <= set(patients["patient_key"])
    assert catalog.split_size(smoke_store, -12345) == 0


def test_bulk_inserts_batch_and_skip_empty_input():
    con = duckdb.connect(":memory:")
    con.execute("CREATE TABLE t (a INTEGER, b TEXT)")
    catalog.insert_rows(con, "INSERT INTO t VALUES", [])
    catalog.insert_columns(con, "INSERT INTO t", [("INTEGER", []), ("TEXT", [])])
    assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    catalog.insert_rows(con, "INSERT INTO t VALUES", [(i, str(i)) for i in range(901)], batch=400)  # 3 statements
    catalog.insert_columns(con, "INSERT INTO t", [("INTEGER", [1000, 1001]), ("TEXT", ["x", "y"])])
    assert con.execute("SELECT count(*), sum(a), max(b) FROM t").fetchone() == (903, sum(range(901)) + 2001, "y")


def test_finetune_finds_the_newest_pretraining_through_the_store_api(smoke_store, tmp_path):
    from ctssl_core.db import StoreError
    from ctssl_core.finetune import latest_pretrain_checkpoint

    ck = store_api.checkpoints(smoke_store)
    task = ck["task"].iloc[0]
    newest = store_api.pretrain_checkpoints(smoke_store, task)[0]
    assert latest_pretrain_checkpoint(smoke_store, task) == smoke_store / newest
    with pytest.raises(StoreError, match="ctssl pretrain --task no_such_pretext"):
        latest_pretrain_checkpoint(smoke_store, "no_such_pretext")
    with pytest.raises(StoreError, match="ctssl pretrain --task rotation"):   # no store: same advice
        latest_pretrain_checkpoint(tmp_path, "rotation")
