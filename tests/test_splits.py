"""Patient-level splits: disjoint, proportional, seeded, stratified, stored and stable as the store grows."""

from __future__ import annotations

from collections import Counter

import pytest

from ctssl_core.config import ConfigError
from ctssl_core.data.splits import get_or_create_splits, make_splits
from ctssl_core.db import StoreMissing, connect
from ctssl_core.paths import store_paths
from ctssl_core.schema import ensure_schema

KEYS = [f"p{i:03d}" for i in range(100)]


def test_every_patient_in_exactly_one_split_with_fractions():
    s = make_splits(KEYS, seed=0)
    assert set(s) == set(KEYS)
    assert Counter(s.values()) == {"train": 70, "val": 15, "test": 15}


def test_deterministic_and_seed_dependent():
    assert make_splits(KEYS, 1) == make_splits(list(reversed(KEYS)), 1)
    assert make_splits(KEYS, 1) != make_splits(KEYS, 2)


def test_stratification_keeps_each_group_in_every_split():
    strata = {k: ("F" if i % 2 else "M") + ("/pe" if i % 5 == 0 else "") for i, k in enumerate(KEYS)}
    s = make_splits(KEYS, 3, strata=strata)
    for g in set(strata.values()):
        members = [k for k in KEYS if strata[k] == g]
        c = Counter(s[k] for k in members)
        assert c["train"] >= 0.6 * len(members) and c["test"] >= 1 and c["val"] >= 1, (g, c)
    assert Counter(s.values()) == {"train": 70, "val": 15, "test": 15}


def test_bad_fractions():
    with pytest.raises(ConfigError, match="sum"):
        make_splits(KEYS, 0, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ConfigError):
        make_splits(KEYS, 0, fractions=(0.5, 0.5))


def _add_patients(store, keys, sex="F"):
    with connect(store_paths(store).db) as con:
        ensure_schema(con)
        con.execute("INSERT INTO patients SELECT unnest(?::TEXT[]), 50, ?, NULL, '{}'", [list(keys), sex])


def test_stored_and_stable_when_store_grows(tmp_path):
    with pytest.raises(StoreMissing, match="ctssl ingest"):
        get_or_create_splits(tmp_path, 0)
    _add_patients(tmp_path, KEYS[:40])
    first = get_or_create_splits(tmp_path, 0)
    assert first == get_or_create_splits(tmp_path, 0)
    _add_patients(tmp_path, KEYS[40:], sex="M")
    grown = get_or_create_splits(tmp_path, 0)
    assert {k: grown[k] for k in first} == first  # nobody moves
    assert set(grown) == set(KEYS)
    with connect(store_paths(tmp_path).db, read_only=True) as con:
        n = con.execute("SELECT count(*), count(DISTINCT patient_key) FROM splits WHERE seed = 0").fetchone()
    assert n == (100, 100)
    other = get_or_create_splits(tmp_path, 7)
    assert other != grown and set(other) == set(KEYS)
