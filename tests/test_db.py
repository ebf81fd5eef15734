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


def _old_store(db, version: str | None = "1"):
    """A store as an older ctssl left it: tables without their primary keys, stamped with ``version``."""
    with connect(db) as con:
        con.execute("CREATE TABLE meta (key TEXT, value TEXT)")
        con.execute("CREATE TABLE runs (run_id TEXT, kind TEXT, status TEXT)")
        con.execute("CREATE TABLE splits (patient_key TEXT, seed INTEGER, split TEXT)")
        con.execute("INSERT INTO runs VALUES ('r1', 'pretrain', 'succeeded'), ('r2', 'finetune', 'failed')")
        con.execute("INSERT INTO splits VALUES ('p1', 0, 'train'), ('p1', 1, 'test')")
        if version is not None:
            con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [version])


def _keys(con) -> dict[str, list[str]]:
    return {t: list(c) for t, c in con.execute(
        "SELECT table_name, constraint_column_names FROM duckdb_constraints() "
        "WHERE constraint_type = 'PRIMARY KEY'").fetchall()}


@pytest.mark.parametrize("version", ["1", None])
def test_old_store_gets_its_primary_keys_and_start_run_upserts(tmp_path, version):
    """Issue 13 item 8: columns were added but not keys, the store stamped current, and
    start_run's ON CONFLICT then failed with a raw BinderException."""
    from ctssl_core.results.write import start_run
    from ctssl_core.schema import SCHEMA_VERSION, ensure_schema_current

    db = tmp_path / "ctssl.duckdb"
    _old_store(db, version)
    with connect(db) as con:
        ensure_schema_current(con)
        keys = _keys(con)
        assert keys["runs"] == ["run_id"] and keys["meta"] == ["key"] and keys["splits"] == ["patient_key", "seed"]
        assert con.execute("SELECT run_id, kind, status FROM runs ORDER BY run_id").fetchall() == [
            ("r1", "pretrain", "succeeded"), ("r2", "finetune", "failed")]  # rows kept
        assert con.execute("SELECT count(*) FROM splits").fetchone()[0] == 2
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [(str(SCHEMA_VERSION),)]
    start_run(tmp_path, "r2", "finetune", "pe", "random", "resnet18", {"a": 1})  # resume: the upsert works
    with connect(db) as con:
        assert con.execute("SELECT status FROM runs WHERE run_id = 'r2'").fetchone()[0] == "running"
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 2


def test_old_store_with_duplicate_keys_is_refused_unchanged(tmp_path):
    from ctssl_core.db import StoreError
    from ctssl_core.schema import ensure_schema

    db = tmp_path / "ctssl.duckdb"
    _old_store(db)
    with connect(db) as con:
        con.execute("INSERT INTO runs VALUES ('r1', 'pretrain', 'failed')")
        with pytest.raises(StoreError, match=r"runs table .* 1 duplicate .* left unchanged"):
            ensure_schema(con)
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 3
        assert con.execute("SELECT value FROM meta").fetchall() == [("1",)]  # not stamped current


def test_store_from_a_newer_ctssl_is_refused_never_downgraded(tmp_path, capsys):
    from ctssl_core.db import StoreError
    from ctssl_core.schema import SCHEMA_VERSION, ensure_schema, ensure_schema_current

    db = tmp_path / "ctssl.duckdb"
    with connect(db) as con:
        ensure_schema(con)
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
        con.execute("CREATE TABLE future (x INTEGER)")
    for fn in (ensure_schema, ensure_schema_current):
        with connect(db) as con:
            with pytest.raises(StoreError, match="newer ctssl .* Upgrade ctssl"):
                fn(con)
    with connect(db) as con:
        assert con.execute("SELECT value FROM meta").fetchall() == [(str(SCHEMA_VERSION + 1),)]
    # and an ingest into it says so instead of writing
    from ctssl_core.cli import main

    src = tmp_path / "src"
    src.mkdir()
    assert main(["ingest", str(src), "--store", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "newer ctssl" in err and "Traceback" not in err
    with connect(db) as con:
        assert con.execute("SELECT value FROM meta").fetchall() == [(str(SCHEMA_VERSION + 1),)]


def test_is_disk_full_reads_errno_duckdb_messages_and_the_exception_chain():
    import errno

    import duckdb

    from ctssl_core.db import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(duckdb.IOException('IO Error: Could not write file "x.wal": No space left on device'))
    try:  # torch.save into a Python file on a full disk: a RuntimeError whose context is the OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
    except RuntimeError as e:
        assert is_disk_full(e)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(duckdb.IOException("Could not set lock on file"))
    assert not is_disk_full(RuntimeError("unexpected pos 704 vs 598"))
    assert not is_disk_full(None)


class _CommitFailsOnFullDisk:
    """A DuckDB connection whose COMMIT fails as on a full disk: DuckDB ends the transaction
    itself, so a later ROLLBACK raises "no transaction is active"."""

    def __init__(self, con):
        self.con = con

    def execute(self, sql, *a):
        if sql == "COMMIT":
            self.con.execute("ROLLBACK")
            raise duckdb_io_error()
        return self.con.execute(sql, *a)

    def __getattr__(self, name):  # register, unregister, ...: the real connection's
        return getattr(self.con, name)


def duckdb_io_error():
    import duckdb

    return duckdb.TransactionException('TransactionContext Error: Failed to commit: Could not write file '
                                       '"ctssl.duckdb.wal": No space left on device')


def test_a_failed_commit_keeps_its_own_error_not_the_refused_rollback(tmp_path):
    """Before, merging metrics on a full disk raised "cannot rollback - no transaction is active"
    from the except block, and the job runner logged that instead of the full disk."""
    import duckdb

    from ctssl_core.db import is_disk_full
    from ctssl_core.schema import rollback_quietly
    from ctssl_core.results.runfolder import RunLogger
    from ctssl_core.results.write import _apply, _read_folder, merge_pending, start_run

    store = tmp_path / "store"
    start_run(store, "run-a", "finetune", "tick", "random", "none", {})
    log = RunLogger(store, "run-a")
    log({"step": 0, "train/loss": 1.0})
    with connect(store / "ctssl.duckdb") as con:
        with pytest.raises(duckdb.TransactionException) as e:
            _apply(_CommitFailsOnFullDisk(con), [_read_folder(store, "run-a", {}, {})])
        assert is_disk_full(e.value) and "cannot rollback" not in str(e.value)
        rollback_quietly(con)  # no transaction: nothing raised
        assert con.execute("SELECT count(*) FROM metrics WHERE run_id = 'run-a'").fetchone()[0] == 0
    log.close()
    assert merge_pending(store, "run-a") == 1       # the disk has room again: the rows arrive
    with connect(store / "ctssl.duckdb", read_only=True) as con:
        assert con.execute("SELECT count(*) FROM metrics WHERE run_id = 'run-a'").fetchone()[0] == 1
