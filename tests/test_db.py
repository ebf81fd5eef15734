import multiprocessing as mp
import time

import pytest

from ctssl_core.db import StoreMissing, connect
from ctssl_core.schema import TABLES, ensure_schema


def _hold_write_lock(path, seconds, ready):
    import duckdb

    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE IF NOT EXISTS t (x INT)")
    ready.set()
    time.sleep(seconds)
    con.close()


def test_read_only_on_missing_store_says_what_to_do(tmp_path):
    with pytest.raises(StoreMissing, match="ctssl ingest"):
        with connect(tmp_path / "ctssl.duckdb", read_only=True):
            pass


def test_reader_waits_for_a_writer_in_another_process(tmp_path):
    db = tmp_path / "ctssl.duckdb"
    with connect(db) as con:
        ensure_schema(con)
    ready = mp.get_context("spawn").Event()
    p = mp.get_context("spawn").Process(target=_hold_write_lock, args=(db, 1.0, ready))
    p.start()
    assert ready.wait(30)
    t0 = time.monotonic()
    with connect(db, read_only=True, timeout_s=20) as con:  # must not raise a lock error
        n = con.execute("SELECT count(*) FROM t").fetchone()[0]
    p.join()
    assert n == 0
    assert time.monotonic() - t0 > 0.2  # it really waited for the lock


def test_ensure_schema_creates_all_tables_and_upgrades_old_store(tmp_path):
    db = tmp_path / "ctssl.duckdb"
    with connect(db) as con:
        con.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, kind TEXT)")  # an 'old' store
        con.execute("INSERT INTO runs VALUES ('r1', 'pretrain')")
        ensure_schema(con)
        ensure_schema(con)  # idempotent
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        cols = {r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name='runs'").fetchall()}
        kept = con.execute("SELECT kind FROM runs WHERE run_id='r1'").fetchone()[0]
    assert set(TABLES) <= tables
    assert {"status", "wall_s", "benchmark_id"} <= cols
    assert kept == "pretrain"
