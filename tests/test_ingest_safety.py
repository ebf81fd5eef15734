"""Ingest safety: one slice size per store, synthetic-key stores refuse real data."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_fixtures import phantom, write_series

from ctssl_core.config import ConfigError
from ctssl_core.data.ingest import IngestConfig, ingest
from ctssl_core.db import connect
from ctssl_core.paths import store_paths


def _catalog_counts(store):
    with connect(store_paths(store).db, read_only=True) as con:
        return (con.execute("SELECT count(*) FROM series").fetchone()[0],
                con.execute("SELECT count(*) FROM slices").fetchone()[0],
                con.execute("SELECT count(*) FROM ingested_files").fetchone()[0],
                sorted(con.execute("SELECT DISTINCT height, width FROM series").fetchall()))


@pytest.mark.parametrize("workers", [1, 2])
def test_ingest_of_another_size_is_refused_before_writing(tmp_path, workers):
    write_series(tmp_path / "a" / "s", phantom(3, 32, 32), patient_id="PA")
    write_series(tmp_path / "b" / "s", phantom(4, 32, 32), patient_id="PB")
    store = tmp_path / "store"
    ingest(tmp_path / "a", store, IngestConfig(size=16, workers=1), progress=False)
    before = _catalog_counts(store)
    files_before = sorted(p.name for p in store_paths(store).slices.iterdir())
    with pytest.raises(ConfigError, match=r"holds 16-px slices.*--size 16.*--store"):
        ingest(tmp_path / "b", store, IngestConfig(size=32, workers=workers), progress=False)
    assert _catalog_counts(store) == before == (1, 3, 3, [(16, 16)])
    assert sorted(p.name for p in store_paths(store).slices.iterdir()) == files_before
    # the matching size is accepted and adds the second series
    s = ingest(tmp_path / "b", store, IngestConfig(size=16, workers=workers), progress=False)
    assert s.series == 1 and _catalog_counts(store)[:2] == (2, 7)


def test_cli_ingest_without_size_uses_the_store_size(tmp_path, capsys):
    from ctssl_core.cli import main

    write_series(tmp_path / "a" / "s", phantom(3, 32, 32), patient_id="PA")
    write_series(tmp_path / "b" / "s", phantom(2, 32, 32), patient_id="PB")
    st = str(tmp_path / "st")
    assert main(["ingest", str(tmp_path / "a"), "--store", st, "--size", "16", "--workers", "1", "--quiet"]) == 0
    assert main(["ingest", str(tmp_path / "b"), "--store", st, "--workers", "1", "--quiet"]) == 0  # not 256
    assert _catalog_counts(st)[3] == [(16, 16)] and _catalog_counts(st)[:2] == (2, 5)
    shapes = {np.load(p, mmap_mode="r").shape[1:] for p in store_paths(st).slices.glob("*.npy")}
    assert shapes == {(16, 16)}
    capsys.readouterr()
    assert main(["ingest", str(tmp_path / "b"), "--store", st, "--size", "32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--size 16" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def synth_cohort(tmp_path_factory):
    """A very small cohort written by `ctssl synth`'s own generator."""
    import dataclasses

    from ctssl_core.data.synth import TINY, generate_cohort

    root = tmp_path_factory.mktemp("synth") / "cohort"
    generate_cohort(dataclasses.replace(TINY, n_patients=2, slices_per_exam=4, image_size=32), root, progress=False)
    return root


def test_synthetic_key_is_marked_and_a_random_key_is_not(tmp_path):
    from ctssl_core.data.pseudonym import create_secret, is_synthetic_key, load_or_create_secret, synthetic_marker

    syn = tmp_path / "a" / ".pseudonym_key"
    assert create_secret(syn, b"k" * 32) and syn.read_bytes() == b"k" * 32 and is_synthetic_key(syn)
    assert not create_secret(syn, b"j" * 32) and syn.read_bytes() == b"k" * 32  # never overwritten
    rnd = tmp_path / "b" / ".pseudonym_key"
    key = load_or_create_secret(rnd)
    assert len(key) == 32 and not is_synthetic_key(rnd)
    assert not create_secret(rnd, b"k" * 32) and not synthetic_marker(rnd).exists()  # a random key stays unmarked
    stale = tmp_path / "c" / ".pseudonym_key"  # marker left behind after its key was deleted
    create_secret(stale, b"k" * 32)
    stale.unlink()
    load_or_create_secret(stale)
    assert not is_synthetic_key(stale) and not synthetic_marker(stale).exists()
    with pytest.raises(ValueError, match="16 bytes"):
        create_secret(tmp_path / "d" / ".pseudonym_key", b"short")
    assert not synthetic_marker(tmp_path / "d" / ".pseudonym_key").exists()


def test_real_data_refused_into_a_store_with_the_synthetic_key(tmp_path, synth_cohort):
    from ctssl_core.data.pseudonym import create_secret

    store = tmp_path / "bench_store"
    create_secret(store_paths(store).secret, b"s" * 32)  # what `ctssl benchmark` (ensure_data) does
    real = tmp_path / "real"
    write_series(real / "s", phantom(3, 32, 32), patient_id="REAL-PID")
    with pytest.raises(ConfigError, match=r"synthetic cohort's pseudonym key.*fresh store"):
        ingest(real, store, IngestConfig(size=32, workers=1), progress=False)
    assert not store_paths(store).db.exists()  # refused before anything was written
    s = ingest(synth_cohort, store, IngestConfig(size=32, workers=1), progress=False)  # the cohort is accepted
    assert s.series == 2 and s.dataset == "synthetic"
    before = _catalog_counts(store)
    with pytest.raises(ConfigError, match="--store NEW_FOLDER"):
        ingest(real, store, IngestConfig(size=32, workers=1), progress=False)
    assert _catalog_counts(store) == before
    # a folder that only looks synthetic (a truth.json, no synth marker or manifest) is still real data
    (real / "truth.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a `ctssl synth` cohort"):
        ingest(real, store, IngestConfig(size=32, workers=1), progress=False)
    # the same real folder goes into a fresh store, whose key is random
    fresh = tmp_path / "fresh"
    got = ingest(real, fresh, IngestConfig(size=32, workers=1), progress=False)
    assert got.series == 1 and got.dataset == "generic" and got.mixed_datasets == [] and "mixes" not in got.table()
    assert store_paths(fresh).secret.read_bytes() != b"s" * 32
    # the synthetic cohort may join a real store (its random key stays secret), but the store then says it mixes
    mix = ingest(synth_cohort, fresh, IngestConfig(size=32, workers=1), progress=False)
    assert mix.series == 2 and mix.mixed_datasets == ["generic", "synthetic"]
    assert "this store mixes synthetic and real studies (generic, synthetic)" in mix.table()
    again = ingest(real, fresh, IngestConfig(size=32, workers=1), progress=False)  # nothing new: still said
    assert again.series == 0 and again.mixed_datasets == ["generic", "synthetic"]


def test_cli_ingest_refusal_of_real_data_is_a_clear_message(tmp_path, capsys):
    from ctssl_core.cli import main
    from ctssl_core.data.pseudonym import create_secret

    create_secret(store_paths(tmp_path / "st").secret, b"s" * 32)
    write_series(tmp_path / "real" / "s", phantom(2, 16, 16), patient_id="REAL-PID")
    assert main(["ingest", str(tmp_path / "real"), "--store", str(tmp_path / "st"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "fresh store" in err and "Traceback" not in err and "REAL-PID" not in err


def test_benchmark_store_marks_its_key_and_refuses_real_data(tmp_path):
    """End to end: the store `ctssl benchmark` builds (ensure_data) carries the synthetic marker."""
    from ctssl_core.benchmark import ensure_data
    from ctssl_core.plan import make_plan
    from ctssl_core.data.pseudonym import is_synthetic_key

    store = tmp_path / "store"
    over = [f"benchmark.cohort={tmp_path / 'cohort'}", "synth.n_patients=2", "synth.slices_per_exam=4",
            "ingest.size=32"]
    ensure_data(make_plan("smoke", over), store, lambda m: None)
    assert is_synthetic_key(store_paths(store).secret) and _catalog_counts(store)[0] == 2
    write_series(tmp_path / "real" / "s", phantom(2, 32, 32), patient_id="REAL-PID")
    with pytest.raises(ConfigError, match="fresh store"):
        ingest(tmp_path / "real", store, IngestConfig(size=32, workers=1), progress=False)
    assert _catalog_counts(store)[0] == 2


def test_cli_ingest_names_dropped_identifier_columns_never_values(tmp_path, capsys):
    from ctssl_core.cli import main

    write_series(tmp_path / "src" / "a", phantom(2, 16, 16), patient_id="P1")
    (tmp_path / "src" / "demographics.csv").write_text("PatientID,Patient Name,age,smoker\nP1,Doe^John,50,yes\n")
    assert main(["ingest", str(tmp_path / "src"), "--store", str(tmp_path / "st"), "--size", "16",
                 "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr()
    assert "identifier-like columns not stored: Patient Name (rename" in out.out
    assert "Doe^John" not in out.out + out.err and "Traceback" not in out.err
    with connect(store_paths(tmp_path / "st").db, read_only=True) as con:
        assert con.execute("SELECT age, attributes FROM patients").fetchall() == [(50.0, '{"smoker": "yes"}')]


# ---------------------------------------------------------------- transient errors (issue 13 item 7)

def _status_and_reasons(store):
    with connect(store_paths(store).db, read_only=True) as con:
        return (dict(con.execute("SELECT status, count(*) FROM ingested_files GROUP BY status").fetchall()),
                dict(con.execute("SELECT reason, count(*) FROM ingest_errors GROUP BY reason").fetchall()))


def test_disk_full_while_building_is_retried_not_recorded_as_decode_failed(tmp_path, monkeypatch):
    import errno

    vol = phantom(3, 32, 32, seed=3)
    write_series(tmp_path / "src" / "s", vol, patient_id="PA")
    store = tmp_path / "st"
    real_save = np.save

    def full_disk(path, arr):  # writes part of the file, then the disk is full
        with open(path, "wb") as f:
            f.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    s = ingest(tmp_path / "src", store, IngestConfig(size=32, workers=1), progress=False)
    assert s.series == 0 and s.errors_by_reason == {"transient": 3}
    assert _status_and_reasons(store) == ({"retry": 3}, {"transient": 3})
    assert list(store_paths(store).slices.iterdir()) == []  # the failed write left no temp file behind
    with connect(store_paths(store).db, read_only=True) as con:
        detail = con.execute("SELECT any_value(detail) FROM ingest_errors").fetchone()[0]
    assert "No space left" in detail and "retries it" in detail and "re-export" not in detail
    monkeypatch.setattr(np, "save", real_save)  # space freed: the next run takes the files again
    again = ingest(tmp_path / "src", store, IngestConfig(size=32, workers=1), progress=False)
    assert again.files_new == 3 and again.slices == 3 and again.errors == 0
    assert _status_and_reasons(store) == ({"ok": 3}, {})
    np.testing.assert_array_equal(np.load(next(store_paths(store).slices.glob("*.npy"))), vol)


@pytest.mark.parametrize("where", ["scan", "pixels", "both"])
def test_permission_and_io_errors_while_reading_are_retried(tmp_path, monkeypatch, where):
    """EACCES when the header is read, EIO when the pixels are re-read: both are the machine's
    errors, not the file's. The series is not stored with a gap: it waits whole for the next run."""
    import builtins
    import errno

    from ctssl_core.data import dicom as dicom_mod

    vol = phantom(4, 32, 32, seed=4)
    paths = write_series(tmp_path / "src" / "s", vol, patient_id="PA")
    store = tmp_path / "st"
    opened: dict[str, int] = {}
    fail = {str(paths[0]): (1, errno.EACCES, "Permission denied"), str(paths[2]): (2, errno.EIO, "Input/output error")}
    if where != "both":
        fail = {k: v for k, v in fail.items() if v[0] == (1 if where == "scan" else 2)}

    def flaky_open(file, *a, **kw):
        n = opened[str(file)] = opened.get(str(file), 0) + 1
        if str(file) in fail and fail[str(file)][0] == n:
            raise OSError(fail[str(file)][1], fail[str(file)][2])
        return builtins.open(file, *a, **kw)

    monkeypatch.setattr(dicom_mod, "open", flaky_open, raising=False)
    s = ingest(tmp_path / "src", store, IngestConfig(size=32, workers=1), progress=False)
    assert s.series == 0 and s.errors_by_reason == {"transient": 4}  # the whole series waits
    assert _status_and_reasons(store) == ({"retry": 4}, {"transient": 4})
    monkeypatch.undo()
    again = ingest(tmp_path / "src", store, IngestConfig(size=32, workers=1), progress=False)
    assert again.files_new == 4 and again.slices == 4 and _status_and_reasons(store) == ({"ok": 4}, {})
    np.testing.assert_array_equal(np.load(next(store_paths(store).slices.glob("*.npy"))), vol)


# ---------------------------------------------------------------- two ingests, one store (issue 13 item 11)

def test_startup_cleanup_removes_only_stale_temp_files(tmp_path):
    from ctssl_core.data.ingest.arrays import _tmp_name, stale_temp_files

    d = tmp_path / "slices"
    d.mkdir()
    names = {"live": _tmp_name("a", 100, "hostA"), "dead": _tmp_name("b", 200, "hostA"),
             "other_host_dead": _tmp_name("c", 200, "hostB"), "old_style_dead": ".d.200.tmp.npy",
             "old_style_live": ".e.100.tmp.npy", "final": "f.npy"}
    for n in names.values():
        (d / n).write_bytes(b"x")
    stale = stale_temp_files([d, tmp_path / "masks"], host="hostA", alive=lambda pid: pid == 100)
    assert sorted(p.name for p in stale) == sorted([names["dead"], names["old_style_dead"]])


def test_second_ingest_leaves_the_first_ingests_temp_files(tmp_path, monkeypatch):
    from ctssl_core.data.ingest import arrays as arrays_mod

    write_series(tmp_path / "a" / "s", phantom(2, 16, 16), patient_id="PA")
    write_series(tmp_path / "b" / "s", phantom(2, 16, 16), patient_id="PB")
    store = tmp_path / "st"
    ingest(tmp_path / "a", store, IngestConfig(size=16, workers=1), progress=False)
    slices = store_paths(store).slices
    writing = slices / arrays_mod._tmp_name("x", 4242)   # another ingest, alive, mid-write
    crashed = slices / arrays_mod._tmp_name("y", 4343)   # an ingest killed mid-write
    for f in (writing, crashed):
        f.write_bytes(b"partial")
    monkeypatch.setattr(arrays_mod, "_pid_alive", lambda pid: pid == 4242)  # where stale_temp_files looks
    assert ingest(tmp_path / "b", store, IngestConfig(size=16, workers=1), progress=False).series == 1
    assert writing.exists() and not crashed.exists()


def test_a_short_write_on_a_full_disk_is_retried_not_recorded_as_decode_failed(tmp_path, monkeypatch):
    """numpy reports a full disk as a short write with no errno ("16384 requested and 10176
    written", seen in experiments/fault_injection.py disk_full_ingest); it was recorded as
    decode_failed ("re-export the series") for good."""
    import os
    from types import SimpleNamespace

    vol = phantom(3, 32, 32, seed=4)
    write_series(tmp_path / "src" / "s", vol, patient_id="PB")
    store = tmp_path / "st"
    real_save, real_statvfs = np.save, os.statvfs

    def short_write(path, arr):
        with open(path, "wb") as f:
            f.write(b"\x93NUMPY partial")
        raise OSError(f"{arr.nbytes} requested and 10 written")

    monkeypatch.setattr(np, "save", short_write)
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=0, f_frsize=4096))  # the disk is full
    s = ingest(tmp_path / "src", store, IngestConfig(size=32, workers=1), progress=False)
    assert s.series == 0 and s.errors_by_reason == {"transient": 3}
    assert _status_and_reasons(store) == ({"retry": 3}, {"transient": 3})
    assert list(store_paths(store).slices.iterdir()) == []
    with connect(store_paths(store).db, read_only=True) as con:
        detail = con.execute("SELECT any_value(detail) FROM ingest_errors").fetchone()[0]
    assert "No space left on device" in detail and "requested and 10 written" in detail and "retries it" in detail
    monkeypatch.setattr(np, "save", real_save)
    monkeypatch.setattr(os, "statvfs", real_statvfs)
    again = ingest(tmp_path / "src", store, IngestConfig(size=32, workers=1), progress=False)
    assert again.files_new == 3 and again.slices == 3 and _status_and_reasons(store) == ({"ok": 3}, {})


def test_a_short_write_with_room_left_is_an_io_error_still_retried(tmp_path, monkeypatch):
    import os
    from types import SimpleNamespace

    write_series(tmp_path / "src" / "s", phantom(2, 32, 32, seed=5), patient_id="PC")

    def short_write(path, arr):
        raise OSError("8 requested and 0 written")

    monkeypatch.setattr(np, "save", short_write)
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=1 << 30, f_frsize=4096))
    s = ingest(tmp_path / "src", tmp_path / "st", IngestConfig(size=32, workers=1), progress=False)
    assert s.errors_by_reason == {"transient": 2}
    with connect(store_paths(tmp_path / "st").db, read_only=True) as con:
        detail = con.execute("SELECT any_value(detail) FROM ingest_errors").fetchone()[0]
    assert "[Errno 5]" in detail and "8 requested and 0 written" in detail and "No space" not in detail


def test_a_full_disk_under_the_catalog_stops_ingest_with_what_to_do(tmp_path, monkeypatch, capsys):
    """DuckDB reports a full disk only in its message, on COMMIT; ingest stopped with a
    traceback (exit 1). Now: StoreFull (exit 2) saying that nothing stored is lost and to free
    space and run the same command again; that re-run completes."""
    import duckdb

    from ctssl_core import cli
    from ctssl_core.data import ingest as ingest_mod
    from ctssl_core.db import StoreFull

    vol = phantom(3, 32, 32, seed=6)
    write_series(tmp_path / "src" / "s", vol, patient_id="PD")
    store = tmp_path / "st"
    real = ingest_mod._record_errors

    def full(*a, **k):
        raise duckdb.TransactionException('TransactionContext Error: Failed to commit: Could not write file '
                                          '"ctssl.duckdb.wal": No space left on device')

    monkeypatch.setattr(ingest_mod, "_build_and_commit", full)
    with pytest.raises(StoreFull, match="is full .*No space left on device.*Free space on that disk.*"
                                        "run the same `ctssl ingest` again"):
        ingest(tmp_path / "src", store, IngestConfig(size=32, workers=1), progress=False)
    rc = cli.main(["ingest", str(tmp_path / "src"), "--store", str(store), "--size", "32", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "ctssl ingest: error: the disk holding the store" in err and "Traceback" not in err
    monkeypatch.undo()
    assert ingest_mod._record_errors is real
    again = ingest(tmp_path / "src", store, IngestConfig(size=32, workers=1), progress=False)
    assert again.files_new == 3 and again.slices == 3 and again.errors == 0
    np.testing.assert_array_equal(np.load(next(store_paths(store).slices.glob("*.npy"))), vol)


def test_other_catalog_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    import duckdb

    from ctssl_core.data import ingest as ingest_mod

    write_series(tmp_path / "src" / "s", phantom(2, 32, 32, seed=7), patient_id="PE")

    def broken(*a, **k):
        raise duckdb.ConstraintException("Constraint Error: duplicate key")

    monkeypatch.setattr(ingest_mod, "_build_and_commit", broken)
    with pytest.raises(duckdb.ConstraintException, match="duplicate key"):
        ingest(tmp_path / "src", tmp_path / "st", IngestConfig(size=32, workers=1), progress=False)
