"""Race dose-response (ctssl_core/dose.py): only the knob changes, the renders are what the store holds,
and detection follows the planted strength."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from ctssl_core.config import ConfigError
from ctssl_core.data.synth import SynthConfig

# fields of PatientParams the race knob may change (synth.sample_patient): fat HU, cancellous bone HU, body AP
# depth, and through the AP depth the nodule centres (placed relative to the lung outline)
RACE_FIELDS = {"body_ap_mm", "fat_hu", "bone_cancellous_hu", "nodules"}


def test_only_the_race_knob_changes_the_render():
    from ctssl_core.data.synth import race_code, sample_demographics, sample_patient
    from ctssl_core.twins import render_stored

    cfg0 = SynthConfig(n_patients=12, slices_per_exam=8, image_size=32, n_sites=2, nodule_fraction=0.9,
                       pe_fraction=0.5, workers=1, race_effect=0.0)
    cfg1 = dataclasses.replace(cfg0, race_effect=0.5)
    kinds = set()
    for i in range(cfg0.n_patients):
        assert sample_demographics(cfg0, i) == sample_demographics(cfg1, i)          # labels never move
        p0, p1 = sample_patient(cfg0, i), sample_patient(cfg1, i)
        c = race_code(cfg0, p0.race) * cfg1.race_effect
        d0, d1 = dataclasses.asdict(p0), dataclasses.asdict(p1)
        changed = {k for k in d0 if d0[k] != d1[k]}
        assert changed <= RACE_FIELDS, changed
        assert p0.pe_defects == p1.pe_defects                                         # PE truth identical
        assert len(p0.nodules) == len(p1.nodules)
        for n0, n1 in zip(p0.nodules, p1.nodules):                                    # same nodules, ...
            assert {k: v for k, v in n0.items() if k != "center_mm"} == {k: v for k, v in n1.items() if k != "center_mm"}
            assert n0["center_mm"][0] == n1["center_mm"][0] and n0["center_mm"][2] == n1["center_mm"][2]
            assert abs(n0["center_mm"][1] - n1["center_mm"][1]) < 3.0                 # ... moved with the AP depth
        h0, pe0 = render_stored(cfg0, i, p0)
        h1, pe1 = render_stored(cfg1, i, p1)
        np.testing.assert_array_equal(pe0, pe1)
        if c == 0:                                                                    # first race label: code 0
            assert not changed
            np.testing.assert_array_equal(h0, h1)                                     # byte-identical
            kinds.add("zero")
            continue
        kinds.add("coded")
        assert p1.fat_hu - p0.fat_hu == pytest.approx(12.0 * c)
        assert p1.bone_cancellous_hu - p0.bone_cancellous_hu == pytest.approx(10.0 * c)
        assert p1.body_ap_mm / p0.body_ap_mm == pytest.approx(1 + 0.04 * c)
        assert (h0 != h1).any()
        # the volume is exactly p0's render with the race fields swapped in: same noise, nothing else moved
        swapped = dataclasses.replace(p0, **{k: getattr(p1, k) for k in RACE_FIELDS})
        np.testing.assert_array_equal(render_stored(cfg0, i, swapped)[0], h1)
        # the HU part alone moves every pixel it touches in the direction of c (identical noise), and only tissue
        hu_only = render_stored(cfg0, i, dataclasses.replace(p0, fat_hu=p1.fat_hu, bone_cancellous_hu=p1.bone_cancellous_hu))[0]
        d = hu_only.astype(np.int32) - h0.astype(np.int32)
        assert not (np.sign(d) * np.sign(c) < 0).any()
        fat = (h0 > -200) & (h0 < -40)
        assert 0.4 * 12 * abs(c) < abs(d[fat].mean()) <= 12 * abs(c)             # blur mixes fat with neighbours
        assert (d != 0).mean() < 0.3
    assert kinds == {"zero", "coded"}


def test_renders_equal_the_smoke_store(smoke_store):
    from ctssl_core.plan import make_plan
    from ctssl_core.data.store import SliceStore
    from ctssl_core.dose import render_at, slice_positions
    from ctssl_core.paths import store_paths
    from ctssl_core.twins import cohort_config, patient_indices

    plan = make_plan("smoke")
    cfg = cohort_config(plan.cohort)
    index = patient_indices(plan.cohort, store_paths(smoke_store).secret)
    store = SliceStore.open(smoke_store)
    pats = store.patients.set_index("patient_key")
    pidx = np.asarray(store.patient_idx)
    order = np.asarray(store.idx_in_series)
    cache: dict = {}
    for j, key in enumerate(store.patients["patient_key"].astype(str)):
        ids = store.slice_ids[pidx == j]
        ids = ids[np.argsort(order[np.searchsorted(store.slice_ids, ids)])]          # (S,) store order
        hu, keys = render_at(cfg, [index[key]], cfg.race_effect, cache=cache)
        np.testing.assert_array_equal(hu, store.read(ids))                         # same HU, size and order
        assert keys["race"].unique().tolist() == [pats.loc[key, "race"]]
        assert keys["idx"].tolist() == list(range(len(ids)))
        # at strength 0 the first race label renders the same bytes, the others differ
        hu0, _ = render_at(cfg, [index[key]], 0.0, cache=cache)
        same = np.array_equal(hu0, hu)
        assert same == (pats.loc[key, "race"] == cfg.race_labels[0])
    # the benchmark's encoders embed the renders exactly as they embedded the store: same vectors, row by row
    from ctssl_core.dose import benchmark_embeddings, plan_inputs
    from ctssl_core.embed import embed_array, load_embeddings

    emb = benchmark_embeddings(plan, smoke_store)
    synth_cfg, indices, encoders, dcfg = plan_inputs(plan, smoke_store, emb)
    assert synth_cfg == cfg and set(encoders) == set(emb)
    hu, keys = render_at(cfg, indices, cfg.race_effect, dcfg.max_per_series)
    for init in ("random", plan.bench.strategies[0]):
        E, stored_keys, _ = load_embeddings(smoke_store, emb[init]["slice"])
        row = {(index[k], int(i)): r for r, (k, i) in enumerate(zip(stored_keys.patient_key, stored_keys.idx))}
        assert sorted(row) == sorted(zip(keys.patient_key.astype(int), keys.idx))  # same patients and slices
        mine = embed_array(encoders[init], lambda ids: hu[ids], np.arange(len(hu)))
        want = E[[row[(int(k), int(i))] for k, i in zip(keys.patient_key, keys.idx)]]
        np.testing.assert_allclose(mine, want, rtol=1e-4, atol=1e-5)
    # the slices the embedder keeps with max_per_series (embed.even_per_series)
    assert slice_positions(8, 3).tolist() == [0, 4, 7]
    assert slice_positions(8, 0).tolist() == list(range(8))


class _Histogram:
    """A transparent stand-in encoder: a soft 8-bin histogram of the windowed pixels (B, 8). The race knob
    moves fat and bone HU, so the histogram carries it in proportion to the strength; a random-init
    network's features on 30 patients are too weak a witness to test the plumbing with."""

    def __init__(self):
        from ctssl_core.ops import resolve_windows

        self.windows = resolve_windows("paper")

    def to(self, device):
        return self

    def eval(self):
        return self

    def embed(self, x):
        import torch

        v = x.flatten(1)                                                           # (B, H*W) in [0, 1]
        c = (torch.arange(8, dtype=v.dtype) + 0.5) / 8                             # (K,) bin centres
        return torch.exp(-((v[:, :, None] - c) * 8) ** 2).mean(1)                  # (B, K)


def test_dose_detects_a_planted_effect_at_every_seed_and_holds_its_level_without_one():
    """Race alone carries an imaging correlate (age and sex knobs off), two equal groups; six cohort seeds, not
    one chosen to pass. At full strength every analysis detects race at every seed (the histogram sees fat and
    bone HU directly: probe AUROC 0.89-1.0 over seeds 0-11). At strength 0 race has no imaging correlate, so a
    detection is a chance hit of tests that hold a family-wise level of 0.05 (exact permutation tests,
    corrected over the three race tests): ~5% of seeds hit (seed 0 does, probe adjusted p 0.0496), so of six
    at most two may (P(3 or more of 6) ~ 0.2% for any six seeds), and the sentence calls exactly those WRONG."""
    from ctssl_core.bias import BiasConfig
    from ctssl_core.dose import DOSE_COLUMNS, DoseConfig, dose_response, dose_sentence

    hits = 0
    for seed in range(6):
        cfg = SynthConfig(n_patients=30, slices_per_exam=8, image_size=32, n_sites=1, race_effect=2.0,
                          age_effect=0.0, sex_effect=0.0, race_labels=("RaceA", "RaceB"), race_weights=(0.5, 0.5),
                          workers=1, seed=seed)
        df = dose_response(range(30), cfg, {"hist": _Histogram()}, DoseConfig(strengths=(2.0, 0.0), max_per_series=4),
                           BiasConfig(n_boot=20, n_splits=3, probe_perm=120, n_perm=120))
        assert list(df.columns) == DOSE_COLUMNS
        assert len(df) == 2 * 3 and sorted(df["strength"].unique()) == [0.0, 2.0]
        assert (df["n"] == 30).all() and df["detected"].notna().all()
        at = {s: d.set_index("analysis") for s, d in df.groupby("strength")}
        assert at[2.0]["detected"].astype(bool).all() and (at[2.0]["p_adjusted"] < 0.05).all(), seed
        for a in ("probe", "ks", "separability"):                                   # detection follows the knob
            assert at[2.0].loc[a, "statistic"] > at[0.0].loc[a, "statistic"] + 0.1, (seed, a)
            assert at[2.0].loc[a, "p_adjusted"] <= at[0.0].loc[a, "p_adjusted"], (seed, a)
            wrong = "WRONG: detected with no planted effect" in dose_sentence(df, "hist", a)
            assert wrong == bool(at[0.0].loc[a, "detected"]), (seed, a)
        assert at[2.0].loc["probe", "statistic"] > 0.8
        assert at[2.0].loc["separability", "statistic"] > at[2.0].loc["separability", "chance"] + 0.15
        sentence = dose_sentence(df, "hist")
        assert "0 / 2" in sentence and ("detected at 0, 2)" if at[0.0].loc["probe", "detected"] else
                                        "detected at 2)") in sentence
        hits += bool(at[0.0]["detected"].astype(bool).any())
    assert hits <= 2


def test_dose_bad_inputs_say_what_to_do():
    from ctssl_core.dose import DoseConfig, dose_response, render_at, strengths_for

    with pytest.raises(ConfigError, match=">= 0"):
        DoseConfig(strengths=(-0.5,))
    with pytest.raises(ConfigError, match="race_effect = 0"):
        strengths_for(SynthConfig(race_effect=0.0))
    assert strengths_for(SynthConfig(race_effect=0.5)) == (0.0, 0.25, 0.5)
    assert strengths_for(SynthConfig(), [0.5, 0, 0.5]) == (0.0, 0.5)
    tiny = SynthConfig(n_patients=4, slices_per_exam=4, image_size=32, workers=1)
    with pytest.raises(ConfigError, match="outside the cohort"):
        render_at(tiny, [4], 0.5)
    with pytest.raises(ConfigError, match="at least one encoder"):
        dose_response([0], tiny, {})


def test_dose_rows_of_the_smoke_benchmark_reach_the_embeddings_page(smoke_store, tmp_path):
    """dose_rows on the smoke benchmark (off unless the profile asks; every encoder x strength x test when on;
    a line, not an error, without the cohort), and its rows read back by read.bias_dose and shown on the
    Embeddings page."""
    import shutil

    from test_pages import open_page, texts

    from ctssl_core.plan import make_plan
    from ctssl_core.config import merge
    from ctssl_core.dose import benchmark_embeddings, dose_rows
    from ctssl_core.results import read
    from ctssl_core.results.write import write_summaries

    root = tmp_path / "store"
    shutil.copytree(smoke_store, root)
    plan = make_plan("smoke")
    emb = benchmark_embeddings(plan, root)
    assert set(emb) == {"random", *plan.bench.strategies}
    assert dose_rows(plan, root, emb)[:2] == ([], [])                             # off unless the profile asks
    plan = dataclasses.replace(plan, config=merge(plan.config, {"bias": {"dose_response": True}}))
    gone = dataclasses.replace(plan, cohort=root / "no-cohort")
    rows, lines, df = dose_rows(gone, root, emb)
    assert rows == [] and df.empty and "not computed" in lines[0]
    strat = plan.bench.strategies[0]                       # an embedding that names no encoder run: refused, not
    fake = {**emb, strat: dict(emb[strat], slice="no-such-embedding")}   # replaced by a random encoder
    rows, lines, _ = dose_rows(plan, root, fake)
    assert rows == [] and "not computed (EmbedError" in lines[0]
    rows, lines, df = dose_rows(plan, root, emb)
    assert {r["task"] for r in rows} == {"bias_dose"} and len(rows) == len(df) == len(emb) * 3 * 3
    assert {r["metric"] for r in rows} >= {"race_probe@0", "race_probe@0.25", "race_probe@0.5"}
    assert sorted(df["encoder"].unique()) == sorted(emb) and df["n"].max() == 32
    assert "race dose-response" in lines[0] and len(lines) == 1 + 2 * len(emb)
    # ci_low / ci_high are a CI's bounds to every reader of summaries: these statistics have none, so null
    # (the chance level is not a lower bound; it travels in the note)
    assert all(r["ci_low"] is None and r["ci_high"] is None for r in rows)
    write_summaries(root, rows)
    got = read.bias_dose(root, plan.benchmark_id)
    assert len(got) == len(df)
    want = df.rename(columns={"encoder": "init"}).set_index(["init", "analysis", "strength"])
    for r in got.itertuples():
        w = want.loc[(r.init, r.analysis, r.strength)]
        assert r.statistic == pytest.approx(w.statistic) and r.detected == w.detected and r.metric == w.metric
        assert r.p_adjusted == pytest.approx(w.p_adjusted, rel=1e-2)
        assert (np.isnan(r.chance) and np.isnan(w.chance)) or r.chance == pytest.approx(w.chance, rel=1e-5)
    assert got[got.analysis == "ks"].chance.isna().all() and (got[got.analysis == "probe"].chance == 0.5).all()
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    with connect(store_paths(root).db, read_only=True) as con:
        stored = con.execute("SELECT count(*), count(ci_low), count(ci_high) FROM summaries WHERE task = 'bias_dose' "
                             "AND benchmark_id = ?", [plan.benchmark_id]).fetchone()
    assert stored == (len(rows), 0, 0)
    assert not read.headline_table(root, plan.benchmark_id).task.eq("bias_dose").any()   # an analysis, not a metric
    at = open_page(root, "embeddings")
    assert "dose-response" in texts(at)
    grid = next(d.value for d in at.dataframe if "race_effect 0" in d.value.columns)
    assert list(grid.columns) == ["race_effect 0", "race_effect 0.25", "race_effect 0.5"]
    probe = got[got.analysis == "probe"]
    for r in probe.itertuples():
        assert grid.loc[r.init, f"race_effect {r.strength:g}"].startswith(f"{r.statistic:.2f}")
    assert read.bias_dose(smoke_store).empty                                   # the smoke profile leaves it off
    # a store written before the chance level moved into the note held it in ci_low: still read as chance
    old = dict(rows[0], benchmark_id="bench-old", ci_low=0.5, note=rows[0]["note"].replace(
        rows[0]["note"].split(";")[1] + ";", ""))
    write_summaries(root, [old])
    assert "chance" not in old["note"] and read.bias_dose(root, "bench-old").chance.tolist() == [0.5]

