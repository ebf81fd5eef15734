"""Patient-level train/val/test splits, seeded and stored, identical for every strategy.

Why patient level: slices of one patient are near-duplicates; a patient in both
train and test would inflate every downstream metric. Why stored: every
pretraining strategy and label fraction must be compared on the same test set,
and a store that grows (re-ingest) must not reshuffle patients already assigned.
Stratified by a label (sex / PE exam) when given, so small cohorts keep the
balance in every split.

An optional *pool* (``pool`` > 0) sets a fraction of the patients apart as an unlabelled
pretraining pool, disjoint from the labelled train/val/test cohort, as in the paper (15M
unlabelled slices vs public labelled sets): self-supervision can only help where unlabelled
data outnumber labels. A split with a pool is stored under its own scheme id
(``split_scheme``), so it never disturbs the 3-way assignments of the same seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

SPLITS = ("train", "val", "test")
POOL = "pool"
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def split_scheme(seed: int, pool: float = 0.0, fractions=DEFAULT_FRACTIONS) -> int:
    """The integer stored in ``splits.seed`` for this scheme: ``seed`` itself for the plain 3-way
    split (what every store built so far holds), else a stable negative id derived from
    (seed, pool, fractions), so no scheme's assignments can overwrite another's."""
    import hashlib

    fr = tuple(round(float(f), 9) for f in fractions)
    if not pool and fr == DEFAULT_FRACTIONS:
        return int(seed)
    h = hashlib.sha256(repr((int(seed), round(float(pool), 9), fr)).encode()).hexdigest()
    return -(int(h[:7], 16) + 1)


def make_splits(patient_keys: Iterable[str], seed: int, fractions=DEFAULT_FRACTIONS,
                strata: Mapping[str, object] | None = None, pool: float = 0.0) -> dict[str, str]:
    """Assign each patient to train/val/test (and ``pool`` first, when ``pool`` > 0).

    Deterministic given (keys as a set, seed, strata, pool). ``fractions`` divide the labelled
    (non-pool) patients; with ``pool`` = 0 the result is exactly the plain 3-way split.
    """
    from ctssl_core.config import ConfigError

    fr = np.asarray(fractions, np.float64)
    if fr.shape != (3,) or np.any(fr < 0) or not np.isclose(fr.sum(), 1.0):
        raise ConfigError(f"split fractions {tuple(fractions)} must be three non-negative numbers summing to 1")
    if not 0.0 <= pool < 1.0:
        raise ConfigError(f"the unlabelled pool fraction must be in [0, 1), got {pool}")
    names = SPLITS
    if pool:
        fr = np.concatenate([[pool], (1.0 - pool) * fr])
        names = (POOL, *SPLITS)
    keys = sorted(set(patient_keys))
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(str(strata.get(k)) if strata else "", []).append(k)
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    carry = np.zeros(len(names))  # largest-remainder carried across strata so totals match the fractions
    for g in sorted(groups):
        members = groups[g]
        perm = rng.permutation(len(members))
        want = fr * len(members) + carry
        counts = np.floor(want).astype(int)
        rest = len(members) - counts.sum()
        for i in np.argsort(-(want - counts), kind="stable")[:rest]:
            counts[i] += 1
        carry = want - counts
        bounds = np.cumsum(counts)
        for rank, i in enumerate(perm):
            out[members[i]] = names[int(np.searchsorted(bounds, rank, side="right"))]
    return out


def get_or_create_splits(store_root: str | Path, seed: int, fractions=DEFAULT_FRACTIONS,
                         pool: float = 0.0) -> dict[str, str]:
    """Splits of scheme (``seed``, ``pool``, ``fractions``) from the store's ``splits`` table;
    patients not yet assigned get a split now.

    Existing assignments never change. Stratified by sex, exam-level PE and nodule presence where known.
    """
    scheme = split_scheme(seed, pool, fractions)
    from ctssl_core.db import StoreMissing, connect
    from ctssl_core.paths import store_paths
    from ctssl_core.schema import ensure_schema_current

    paths = store_paths(store_root)
    if not paths.db.exists():
        raise StoreMissing(f"no ctssl store at {paths.root}; run `ctssl ingest DIR --store {paths.root}` first")
    # read-only first: a unit's process (a fine-tune, a pretraining) only reads the store when its driver
    # made the splits beforehand (``benchmark.run_benchmark``), and never waits for the write lock then
    with connect(paths.db, read_only=True) as con:
        rows, have = _patients_and_splits(con, scheme)
    if not rows:
        raise StoreMissing(f"the store at {paths.root} has no patients; run `ctssl ingest DIR --store {paths.root}`")
    if all(k in have for k, _ in rows):
        return have
    with connect(paths.db) as con:
        ensure_schema_current(con)
        rows, have = _patients_and_splits(con, scheme)    # again under the write lock: another may have added
        new = [k for k, _ in rows if k not in have]
        if new:
            strata = {k: s for k, s in rows if k in set(new)}
            assigned = make_splits(new, seed, fractions, strata, pool=pool)
            from ctssl_core.data.catalog import insert_columns

            con.execute("BEGIN")
            insert_columns(con, "INSERT INTO splits", [("TEXT", list(assigned)), ("INTEGER", [scheme] * len(assigned)),
                                                        ("TEXT", list(assigned.values()))])
            con.execute("COMMIT")
            have.update(assigned)
    return have


def _patients_and_splits(con, scheme: int) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(patient_key, stratum) of every patient, and the patients' splits of ``scheme`` made so far. The
    strata: sex / exam PE / any nodule, so small cohorts still put PE and nodule patients in every split (a
    val split without nodules has no Dice to select on)."""
    rows = con.execute(
        "SELECT p.patient_key, coalesce(p.sex, '?') || '/' || coalesce(CAST(bool_or(s.pe_exam) AS TEXT), '?') "
        "  || '/' || coalesce(CAST(bool_or(n.has_nodule) AS TEXT), '?') "
        "FROM patients p LEFT JOIN studies s USING (patient_key) "
        "LEFT JOIN (SELECT se.patient_key, max(sl.nodule_px) > 0 AS has_nodule FROM series se "
        "           JOIN slices sl USING (series_key) GROUP BY se.patient_key) n USING (patient_key) "
        "GROUP BY p.patient_key, p.sex").fetchall()
    have = {}
    if con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'splits'").fetchone()[0]:
        have = dict(con.execute("SELECT patient_key, split FROM splits WHERE seed = ?", [scheme]).fetchall())
    return rows, have
