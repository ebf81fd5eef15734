"""SliceStore read side: gathers match plain indexing, context pairs, labels, masks, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_fixtures import phantom, write_series

from ctssl_core.config import ConfigError
from ctssl_core.data.ingest import IngestConfig, ingest
from ctssl_core.data.store import SliceStore
from ctssl_core.db import StoreMissing, connect
from ctssl_core.paths import store_paths


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    return [rng.integers(-1024, 2000, (n, 8, 8)).astype(np.int16) for n in (5, 1, 7, 3)]


def test_read_matches_concatenation_any_order(arrays):
    st = SliceStore.from_arrays(arrays)
    allx = np.concatenate(arrays)
    assert st.n_slices == len(allx) == 16 and st.read(np.array([], np.int64)).shape == (0, 8, 8)
    ids = np.array([15, 0, 6, 6, 5, 12, 3])
    out = st.read(ids)
    assert out.dtype == np.int16 and out.shape == (7, 8, 8)
    np.testing.assert_array_equal(out, allx[ids])
    np.testing.assert_array_equal(st.series_of, np.repeat([0, 1, 2, 3], [5, 1, 7, 3]))
    np.testing.assert_array_equal(st.idx_in_series, np.concatenate([np.arange(n) for n in (5, 1, 7, 3)]))


def test_memmapped_arrays_work(arrays, tmp_path):
    mm = []
    for i, a in enumerate(arrays):
        np.save(tmp_path / f"{i}.npy", a)
        mm.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    st = SliceStore.from_arrays(mm)
    np.testing.assert_array_equal(st.read([1, 13]), np.concatenate(arrays)[[1, 13]])


def test_context_pairs_stay_in_series(arrays):
    st = SliceStore.from_arrays(arrays)
    allx = np.concatenate(arrays)
    for gap in (1, 3, -2):
        valid = st.valid_for_gap(gap)
        ids = np.flatnonzero(valid)
        pairs = st.read_context(ids, gap)
        assert pairs.shape == (len(ids), 2, 8, 8)
        np.testing.assert_array_equal(pairs[:, 0], allx[ids])
        np.testing.assert_array_equal(pairs[:, 1], allx[ids + gap])
        assert (st.series_of[ids] == st.series_of[ids + gap]).all()
    assert st.valid_for_gap(1).sum() == 4 + 0 + 6 + 2
    with pytest.raises(ConfigError, match="valid_for_gap"):
        st.read_context([4], 1)  # last slice of the first series has no partner


def test_labels_masks_and_patients(arrays):
    pe = [np.array([0, 1, np.nan, 0, 1]), [1.0], np.zeros(7), [np.nan] * 3]
    masks = [None, np.ones((1, 8, 8), np.uint8), None, np.zeros((3, 8, 8), np.uint8)]
    st = SliceStore.from_arrays(arrays, pe=pe, masks=masks, patient_idx=[0, 0, 1, 2])
    lab = st.labels("pe")
    assert lab.shape == (16,) and lab[1] == 1 and np.isnan(lab[2]) and np.isnan(lab[-1])
    nod = st.labels("nodule_px")
    assert nod[5] == 64 and np.isnan(nod[0]) and nod[-1] == 0
    m = st.read_mask([5, 0, 13])
    assert m.dtype == np.uint8 and m[0].all() and not m[1].any() and not m[2].any()
    np.testing.assert_array_equal(st.patient_idx, np.repeat([0, 0, 1, 2], [5, 1, 7, 3]))
    with pytest.raises(ConfigError, match="unknown label"):
        st.labels("age")


def test_bad_inputs(arrays):
    st = SliceStore.from_arrays(arrays)
    with pytest.raises(IndexError):
        st.read([16])
    with pytest.raises(ConfigError, match="pe has"):
        SliceStore.from_arrays(arrays, pe=np.zeros(3))
    with pytest.raises(ConfigError, match="one entry per series"):
        SliceStore.from_arrays(arrays, patient_idx=[0])
    with pytest.raises(StoreMissing, match="ctssl ingest"):
        SliceStore.from_arrays([])
    with pytest.raises(Exception, match="one H, W"):
        SliceStore.from_arrays([np.zeros((2, 8, 8), np.int16), np.zeros((2, 4, 4), np.int16)])


def test_open_ingested_store(tmp_path):
    vols = [phantom(4, 16, 16, seed=1), phantom(6, 16, 16, seed=2)]
    for k, v in enumerate(vols):
        write_series(tmp_path / "src" / f"s{k}", v, patient_id=f"P{k}")
    store = tmp_path / "store"
    with pytest.raises(StoreMissing, match="ctssl ingest"):
        SliceStore.open(store)
    ingest(tmp_path / "src", store, IngestConfig(size=16, workers=1), progress=False)
    st = SliceStore.open(store)
    assert st.n_slices == 10 and (st.height, st.width) == (16, 16)
    with connect(store_paths(store).db, read_only=True) as con:
        rows = con.execute("SELECT slice_id, array_path, idx FROM slices JOIN series USING (series_key)").fetchall()
    for sid, path, idx in rows:  # every global id reads the row the catalog says
        np.testing.assert_array_equal(st.read([sid])[0], np.load(store / path)[idx])
    assert np.isnan(st.labels("pe")).all()  # no labels for a generic folder
    assert len(st.patients) == 2 and set(st.patient_idx) == {0, 1}
    assert not st.read_mask(np.arange(10)).any()


def test_open_empty_store_says_what_to_do(tmp_path):
    from ctssl_core.schema import ensure_schema

    with connect(store_paths(tmp_path).db) as con:
        ensure_schema(con)
    with pytest.raises(StoreMissing, match="ctssl ingest"):
        SliceStore.open(tmp_path)


def test_a_truncated_series_array_costs_one_series_not_the_store(tmp_path, caplog):
    """Issue 13 item 11: np.load's ValueError on a cut .npy used to make the whole store unusable."""
    from ctssl_core.db import StoreError

    vols = [phantom(4, 16, 16, seed=1), phantom(6, 16, 16, seed=2), phantom(3, 16, 16, seed=3)]
    for k, v in enumerate(vols):
        write_series(tmp_path / "src" / f"s{k}", v, patient_id=f"P{k}")
    store = tmp_path / "store"
    ingest(tmp_path / "src", store, IngestConfig(size=16, workers=1), progress=False)
    with connect(store_paths(store).db, read_only=True) as con:
        rows = con.execute("SELECT series_key, array_path, n_slices FROM series ORDER BY series_key").fetchall()
    bad_key, bad_rel, bad_n = rows[1]
    f = store / bad_rel
    f.write_bytes(f.read_bytes()[:300])  # disk full or an interrupted copy
    st = SliceStore.open(store)
    assert st.n_slices == 13 - bad_n and len(st.arrays) == 2
    assert len(st.unreadable) == 1 and bad_key in st.unreadable[0] and "truncated" in st.unreadable[0]
    assert "1 series of" in caplog.text
    with connect(store_paths(store).db, read_only=True) as con:
        good = con.execute("SELECT slice_id, array_path, idx FROM slices JOIN series USING (series_key) "
                           "WHERE series_key != ?", [bad_key]).fetchall()
        bad_ids = [r[0] for r in con.execute("SELECT slice_id FROM slices WHERE series_key = ?", [bad_key]).fetchall()]
    for sid, path, idx in good:  # the other series still read what the catalog says
        np.testing.assert_array_equal(st.read([sid])[0], np.load(store / path)[idx])
    with pytest.raises(IndexError):
        st.read(bad_ids[:1])
    for _, rel, _ in rows:  # with every array damaged, the store says so instead of a raw ValueError
        (store / rel).write_bytes(b"\x93NUMPY")
    with pytest.raises(StoreError, match="no series .* can be read.*re-ingest"):
        SliceStore.open(store)
