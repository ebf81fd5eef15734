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
