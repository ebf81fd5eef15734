"""A benchmark with power: the unlabelled pool, counterfactual twins, controls, seeding and the
sensitivity verdict (issue "A benchmark with power")."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ctssl_core.config import ConfigError
from ctssl_core.data.splits import DEFAULT_FRACTIONS, make_splits, split_scheme

KEYS = [f"p{i:03d}" for i in range(200)]


# ------------------------------------------------------------------ pool


def test_pool_is_disjoint_from_the_labelled_cohort_and_sized_as_asked():
    s = make_splits(KEYS, 0, pool=0.6)
    counts = {k: list(s.values()).count(k) for k in ("pool", "train", "val", "test")}
    assert counts["pool"] == 120
    assert counts["train"] + counts["val"] + counts["test"] == 80
    assert counts["test"] == 12 and counts["val"] == 12
    assert len(s) == len(KEYS)                  # every patient in exactly one split


def test_no_pool_is_exactly_the_old_three_way_split_and_schemes_do_not_collide():
    assert make_splits(KEYS, 3, pool=0.0) == make_splits(KEYS, 3)
    assert split_scheme(3) == 3 and split_scheme(3, 0.0, DEFAULT_FRACTIONS) == 3
    ids = {split_scheme(3, 0.5), split_scheme(3, 0.6), split_scheme(4, 0.5)}
    assert len(ids) == 3 and all(i < 0 for i in ids)      # never a plain seed's rows
    with pytest.raises(ConfigError, match="pool fraction"):
        make_splits(KEYS, 0, pool=1.0)


def test_stored_pool_split_keeps_old_assignments_and_pretraining_reads_only_the_pool(store_copy):
    from ctssl_core.data.splits import get_or_create_splits
    from ctssl_core.data.store import SliceStore
    from ctssl_core.pretrain import PretrainConfig, train_positions

    plain = get_or_create_splits(store_copy, 0)
    pooled = get_or_create_splits(store_copy, 0, pool=0.5)
    assert get_or_create_splits(store_copy, 0) == plain          # the pooled scheme did not touch it
    assert "pool" in pooled.values() and "pool" not in plain.values()
    store = SliceStore.open(store_copy)
    ids = train_positions(store, store_copy, PretrainConfig(split="pool", pool=0.5))
    keys = store.patients["patient_key"].to_numpy()
    used = {keys[p] for p in np.asarray(store.patient_idx)[np.searchsorted(store.slice_ids, ids)]}
    assert used and all(pooled[k] == "pool" for k in used)
    with pytest.raises(ConfigError, match="needs a pool"):
        train_positions(store, store_copy, PretrainConfig(split="pool"))


def test_embeddings_and_the_position_baseline_use_the_benchmarks_pooled_split(store_copy):
    """With a pool, the embedded 'test' split is the fine-tunes' test split, and split='all' keys say
    which split each slice is in (the smoke store once wrote an all-null split column)."""
    from ctssl_core.data.splits import get_or_create_splits
    from ctssl_core.embed import EmbedConfig, catalog_keys

    pooled = get_or_create_splits(store_copy, 0, pool=0.5)
    every = catalog_keys(store_copy, split="all", pool=0.5)
    assert every["split"].notna().all()
    assert {k: s for k, s in zip(every.patient_key, every.split)} == \
        {k: pooled[k] for k in every.patient_key}
    test = catalog_keys(store_copy, split="test", pool=0.5)
    assert set(test.patient_key) == {k for k, s in pooled.items() if s == "test"}
    with pytest.raises(ConfigError, match="embed.pool"):
        EmbedConfig(pool=1.0)


# ------------------------------------------------------------------ twins


def test_twins_differ_only_where_the_emboli_are_and_the_with_twin_is_what_the_store_holds(tiny_cohort, tiny_store):
    from ctssl_core.data.store import SliceStore
    from ctssl_core.twins import cohort_config, patient_indices, render_pair

    cfg = cohort_config(tiny_cohort)
    store = SliceStore.open(tiny_store)
    from ctssl_core.paths import store_paths

    index = patient_indices(tiny_cohort, store_paths(tiny_store).secret)
    keys = store.patients["patient_key"].to_numpy().astype(str)
    checked = 0
    for pidx, key in enumerate(keys):
        hu_with, hu_without, pe = render_pair(cfg, index[key])
        ids = store.slice_ids[np.asarray(store.patient_idx) == pidx]
        ids = ids[np.argsort(np.asarray(store.idx_in_series)[np.searchsorted(store.slice_ids, ids)])]
        np.testing.assert_array_equal(store.read(ids), hu_with)        # same render as the stored exam
        diff = hu_with != hu_without                                  # (S, H, W)
        if pe.any():
            assert diff.any(axis=(1, 2))[pe].all()                   # every embolus slice changes
            checked += 1
        # nothing else changes, except the slice-thickness blur carrying an embolus one slice along z
        near = pe | np.r_[pe[1:], False] | np.r_[False, pe[:-1]]
        assert not diff[~near].any()
        assert diff.sum() < 0.02 * diff.size                          # a few vessel pixels, not the anatomy
    assert checked >= 1


def test_twin_metrics_are_paired_concordances():
    from ctssl_core.twins import twin_stat

    # two patients: exam 0/1 (with/without), exam 2/3; slices 0..1 each, embolus on slice 1
    out = {"prob": np.array([0.1, 0.9, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3]),
           "exam": np.array([0, 0, 1, 1, 2, 2, 3, 3]), "order": np.array([0, 1, 0, 1, 0, 1, 0, 1]),
           "target": np.array([0, 1, 0, 0, 0, 1, 0, 0], float)}
    stat, n = twin_stat(out, "max")
    assert n == 2
    got = stat(np.arange(2))
    assert got["twin_exam"] == pytest.approx(0.75)          # patient 0 ranked above its twin, patient 1 a tie
    assert got["twin_slice"] == pytest.approx(0.75)
    assert got["twin_delta"] == pytest.approx((0.7 + 0.0) / 2)
    batch = stat.batch(np.array([[2.0, 0.0], [0.0, 2.0]]))
    assert batch["twin_exam"].tolist() == [1.0, 0.5]


# ------------------------------------------------------------------ controls


def test_shuffled_control_keeps_each_tensors_values_but_not_their_order():
    from ctssl_core.controls import shuffle_within_layers
    from ctssl_core.models import build_encoder

    torch.manual_seed(0)
    enc = build_encoder("tiny")
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    shuffle_within_layers(enc, seed=1)
    moved = 0
    for k, v in enc.state_dict().items():
        a, b = before[k], v
        if a.is_floating_point():
            torch.testing.assert_close(a.flatten().sort().values, b.flatten().sort().values)
            moved += int(a.numel() > 1 and not torch.equal(a, b))
        else:
            assert torch.equal(a, b)
    assert moved >= 5


def test_negative_control_checkpoint_loads_as_an_encoder(tmp_path):
    from ctssl_core import checkpoint as ck
    from ctssl_core.controls import write_negative_control
    from ctssl_core.models import build_encoder

    torch.manual_seed(0)
    enc = build_encoder("tiny")
    src = ck.save_checkpoint(tmp_path / "src.pt", enc, None, None, None, 3, None, {"encoder": "tiny"})
    out = write_negative_control(src, tmp_path / "nc" / "last.pt", seed=0)
    loaded, cfg = ck.load_encoder(out)
    assert cfg["task"] == "negative_control"
    w0 = dict(enc.named_parameters())
    w1 = dict(loaded.named_parameters())
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


# ------------------------------------------------------------------ seeding


def test_a_finetune_unit_gives_the_same_weights_whatever_ran_before_in_the_process(store_copy):
    from ctssl_core import checkpoint as ck
    from ctssl_core.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(task="pe", init="random", train={"steps": 2, "batch_size": 4, "warmup_steps": 0,
                                                          "ckpt_every": 0, "log_every": 1},
                         n_boot=10, val_max_slices=8, eval_batch_size=16)
    finetune(cfg, store_copy, run_id="a")
    torch.rand(1000)                     # anything random in between must not matter
    np.random.rand(10)
    finetune(cfg, store_copy, run_id="b")
    a = ck.read_checkpoint("a", store_copy)
    b = ck.read_checkpoint("b", store_copy)
    for k in a["encoder"]:
        torch.testing.assert_close(a["encoder"][k], b["encoder"][k], rtol=0, atol=0)
    for k in a["head"]:
        torch.testing.assert_close(a["head"][k], b["head"][k], rtol=0, atol=0)


# ------------------------------------------------------------------ verdict


def _plan(tmp_path, over=()):
    from ctssl_core.plan import make_plan

    return make_plan("smoke", ["benchmark.fractions=[0.1,1.0]", "benchmark.small_fraction=0.1",
                               "benchmark.small_fraction_seeds=[0,1,2]", *over])


def _boots(gain_pc: float, gain_strategy: float, seeds=(0, 1, 2), n=400, p=60):
    """Replicates of a metric over bootstrap draws of ``p`` patients for random, the strategies and controls."""
    rng = np.random.default_rng(0)
    draws = rng.integers(0, p, size=(n, p))
    out = {}
    for init, gain in (("random", 0.0), ("masked_region", gain_strategy), ("rotation", 0.0),
                       ("positive_control", gain_pc), ("negative_control", 0.0)):
        for s in seeds:
            per_patient = 0.6 + gain + 0.15 * rng.standard_normal(p)            # (P,)
            out[(init, 0.1, s)] = {"twin_exam": per_patient[draws].mean(1),
                                   "point/twin_exam": np.float64(per_patient.mean())}
    return out


def test_sensitivity_verdict_when_the_positive_control_beats_random(tmp_path):
    from ctssl_core.benchmark import sensitivity_rows

    plan = _plan(tmp_path)
    rows, lines = sensitivity_rows(plan, {"pe": _boots(0.3, 0.3)}, {})
    sens = next(r for r in rows if r["metric"] == "sensitivity_twin_exam")
    assert sens["value"] == 1.0 and sens["ci_low"] > 0
    mde = next(r for r in rows if r["metric"] == "mde_twin_exam")["value"]
    assert 0 < mde < 0.2
    verdict = {r["init"]: r["note"] for r in rows if r["metric"] == "verdict_twin_exam"}
    assert verdict["masked_region"].startswith("gain")
    assert verdict["rotation"].startswith("no detectable gain")
    assert any("SENSITIVE" in line for line in lines)


def test_insensitive_benchmark_says_insensitive_not_no_gain(tmp_path):
    from ctssl_core.benchmark import sensitivity_rows

    plan = _plan(tmp_path)
    rows, lines = sensitivity_rows(plan, {"pe": _boots(0.0, 0.0)}, {})
    sens = next(r for r in rows if r["metric"] == "sensitivity_twin_exam")
    assert sens["value"] == 0.0
    verdict = {r["init"]: r["note"] for r in rows if r["metric"] == "verdict_twin_exam"}
    assert verdict["rotation"].startswith("insensitive")
    assert any("INSENSITIVE" in line for line in lines)


def test_seed_mean_carries_the_spread_between_seeds():
    from ctssl_core.benchmark import seed_mean

    same = {("a", 0.1, s): {"m": np.full(300, 0.5)} for s in range(3)}
    spread = {("a", 0.1, s): {"m": np.full(300, 0.3 + 0.2 * s)} for s in range(3)}
    assert np.ptp(seed_mean(same, "a", 0.1, "m")) == 0
    r = seed_mean(spread, "a", 0.1, "m")
    assert r.mean() == pytest.approx(0.5, abs=0.02) and np.ptp(r) > 0.2


def test_plan_has_controls_after_their_sources_and_bad_control_configs_fail(tmp_path):
    from ctssl_core.plan import BenchmarkConfig, needs, provides

    plan = _plan(tmp_path)
    seen: set = set()
    for u in plan.units:
        if needs(u) and needs(u) in {provides(v) for v in plan.units if provides(v)}:
            assert needs(u) in seen, f"{u.run_id} comes before what it needs"
        if provides(u):
            seen.add(provides(u))
    inits = {u.init for u in plan.units if u.kind == "finetune" and u.task == "pe"}
    assert {"positive_control", "negative_control"} <= inits
    assert not {u.init for u in plan.units if u.task == "demographics"} & {"positive_control"}
    pc = next(u for u in plan.units if u.kind == "control" and u.init == "positive_control")
    assert pc.config.train_split == "pool" and pc.config.pool == 0.5
    with pytest.raises(ConfigError, match="need an unlabelled pool"):
        BenchmarkConfig(controls=("pe",))
    with pytest.raises(ConfigError, match="controls"):
        BenchmarkConfig(controls=("demographics",), pool=0.5)


def test_every_benchmark_scores_its_bias_analysis_against_the_planted_truth(smoke_store):
    """Issue 15 item 1: the smoke benchmark's summaries hold a scorecard row per (encoder, attribute,
    analysis), 1 right / 0 wrong against truth.json, and its summary says where the analysis is wrong."""
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths
    from ctssl_core.results import read

    bid = read.latest_finished(read.benchmarks(smoke_store))
    with connect(store_paths(smoke_store).db, read_only=True) as con:
        card = con.execute("SELECT init, metric, value, note FROM summaries WHERE benchmark_id = ? AND task = 'bias'",
                           [bid]).df()
    assert {"random", "masked_region", "rotation"} <= set(card.init)
    attrs = {m.split("_", 1)[1].rsplit("_", 1)[0] for m in card.metric}
    assert {"age", "sex", "race", "control_group"} <= attrs
    assert set(card.value.dropna()) <= {0.0, 1.0}
    null = card[card.metric.str.startswith("scorecard_control_group_")]
    assert null.note.str.contains("has no imaging correlate").all()
    summary = (store_paths(smoke_store).run_dir(bid) / "summary.md").read_text()
    assert "bias scorecard against the planted truth" in summary


@pytest.mark.parametrize("source_mean, learned", [(0.62, True), (0.5, False)])
def test_ceiling_says_whether_the_task_is_learned_even_with_full_supervision(tmp_path, source_mean, learned):
    """The positive control's source model is scored on the test split; when its CI includes chance the
    summary says the task is not learned at this scale (so no strategy can show a gain), else that it is."""
    from ctssl_core.benchmark import sensitivity_rows
    from ctssl_core.controls import POSITIVE
    from ctssl_core.finetune import BOOT_FILE
    from ctssl_core.paths import store_paths

    plan = _plan(tmp_path)
    unit = next(u for u in plan.units if u.kind == "control" and u.task == "pe" and u.init == POSITIVE)
    run_dir = store_paths(tmp_path).run_dir(unit.run_id)
    run_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    per_patient = source_mean + 0.1 * rng.standard_normal(80)                 # (P,)
    draws = rng.integers(0, 80, size=(400, 80))
    np.savez(run_dir / BOOT_FILE, twin_exam=per_patient[draws].mean(1),       # what finetune writes
             **{"point/twin_exam": np.float64(per_patient.mean())})
    rows, lines = sensitivity_rows(plan, {"pe": _boots(0.0, 0.0)}, {}, tmp_path)
    ceiling = next(r for r in rows if r["metric"] == "ceiling_twin_exam")
    assert ceiling["value"] == pytest.approx(per_patient.mean())
    assert (ceiling["ci_low"] > 0.5) is learned
    line = next(line for line in lines if "Task ceiling" in line)
    assert ("NOT above the learned floor" in line) is (not learned)
    assert ("no pretraining strategy can show a gain" in line) is (not learned)


def test_ceiling_says_unknown_when_the_positive_control_has_no_scores(tmp_path):
    from ctssl_core.benchmark import sensitivity_rows

    rows, lines = sensitivity_rows(_plan(tmp_path), {"pe": _boots(0.0, 0.0)}, {}, tmp_path)
    assert not any(r["metric"].startswith("ceiling_") for r in rows)
    assert any("Task ceiling: unknown" in line and "pc-" in line for line in lines)


def test_frozen_readout_freezes_every_finetune_but_not_the_positive_control_source(tmp_path):
    """With ``downstream.freeze_encoder`` (the frozen-encoder readout), every fine-tune unit keeps its init's
    encoder fixed, but the positive control's source is supervised training: it must train its encoder."""
    plan = _plan(tmp_path, ["downstream.freeze_encoder=true"])
    pc = [u for u in plan.units if u.kind == "control" and u.config is not None]
    ft = [u for u in plan.units if u.kind == "finetune"]
    assert pc and all(u.config.freeze_encoder is False for u in pc)
    assert ft and all(u.config.freeze_encoder is True for u in ft)
    assert all(u.config.freeze_encoder is False for u in _plan(tmp_path / "b").units if u.kind == "finetune")


def test_ceiling_falls_back_to_the_tasks_next_metric(tmp_path):
    """A source scored without twins has no twin_exam: the ceiling is read from exam_auroc instead."""
    from ctssl_core.benchmark import sensitivity_rows
    from ctssl_core.controls import POSITIVE
    from ctssl_core.finetune import BOOT_FILE
    from ctssl_core.paths import store_paths

    plan = _plan(tmp_path)
    unit = next(u for u in plan.units if u.kind == "control" and u.task == "pe" and u.init == POSITIVE)
    run_dir = store_paths(tmp_path).run_dir(unit.run_id)
    run_dir.mkdir(parents=True)
    np.savez(run_dir / BOOT_FILE, exam_auroc=np.linspace(0.4, 0.6, 200), **{"point/exam_auroc": np.float64(0.5)})
    rows, lines = sensitivity_rows(plan, {"pe": _boots(0.0, 0.0)}, {}, tmp_path)
    ceiling = next(r for r in rows if r["metric"].startswith("ceiling_"))
    assert ceiling["metric"] == "ceiling_exam_auroc" and ceiling["value"] == pytest.approx(0.5)
    assert any("NOT above the learned floor (0.55)" in line for line in lines)


def test_pretraining_uses_the_benchmarks_split_fractions_without_a_pool(tmp_path):
    """Without a pool, pretraining reads the train split: it must be the train split of the fine-tunes' own
    scheme, or pretraining would see their test patients."""
    plan = _plan(tmp_path, ["benchmark.pool=0", "benchmark.controls=[]", "benchmark.split_fractions=[0.5,0.1,0.4]"])
    cfg = plan.pretraining("rotation").config
    assert tuple(cfg.split_fractions) == (0.5, 0.1, 0.4) and (cfg.split, cfg.pool) == ("train", 0.0)
    pooled = _plan(tmp_path / "d", ["benchmark.pool=0.5"]).pretraining("rotation").config
    assert (pooled.split, pooled.pool) == ("pool", 0.5)


def test_embed_section_cannot_override_the_benchmarks_split_scheme(tmp_path):
    from ctssl_core.plan import embed_config
    from ctssl_core.config import ConfigError

    plan = _plan(tmp_path, ["benchmark.split_fractions=[0.5,0.1,0.4]"])
    ecfg = embed_config(plan.config, plan.bench)
    assert tuple(ecfg.split_fractions) == (0.5, 0.1, 0.4) and ecfg.pool == 0.5
    assert all(u.config == ecfg for u in plan.of_kind("embed"))
    with pytest.raises(ConfigError, match="embed.pool cannot be set"):
        _plan(tmp_path / "b", ["embed.pool=0.2"])


def test_ceiling_rows_are_analyses_not_values_of_an_init():
    from ctssl_core.results.read import is_value_row

    assert not is_value_row("pe", "ceiling_twin_exam") and not is_value_row("nodule", "ceiling_cpm")
    assert is_value_row("nodule", "cpm")


def _boots_nc(gain_nc: float, gain_strategy: float, seeds=(0, 1, 2), n=400, p=60):
    """Like ``_boots`` but the negative control (shuffled weights) also gains ``gain_nc`` over random init;
    rotation gains as much as the negative control, masked_region ``gain_strategy``. Patients share one
    noise draw across inits (paired), so the deltas are tight."""
    rng = np.random.default_rng(1)
    draws = rng.integers(0, p, size=(n, p))
    out = {}
    for s in seeds:
        base = 0.5 + 0.15 * rng.standard_normal(p)                                # (P,) shared by every init
        for init, gain in (("random", 0.0), ("masked_region", gain_strategy), ("rotation", gain_nc),
                           ("positive_control", 0.3), ("negative_control", gain_nc)):
            per_patient = base + gain + 0.02 * rng.standard_normal(p)             # (P,)
            out[(init, 0.1, s)] = {"cpm": per_patient[draws].mean(1), "point/cpm": np.float64(per_patient.mean())}
    return out


def test_strategies_are_also_judged_against_the_negative_control(tmp_path):
    """A gain over random init that the shuffled weights match is not a gain from features: rotation
    'gains' over random init by exactly the negative control's gain, masked_region gains beyond it."""
    from ctssl_core.benchmark import sensitivity_rows

    plan = _plan(tmp_path)
    rows, lines = sensitivity_rows(plan, {"nodule": _boots_nc(0.1, 0.25)}, {})
    vs_random = {r["init"]: r for r in rows if r["metric"] == "verdict_cpm"}
    vs_nc = {r["init"]: r for r in rows if r["metric"] == "ncverdict_cpm"}
    assert vs_random["rotation"]["note"].startswith("gain") and vs_random["masked_region"]["note"].startswith("gain")
    assert vs_nc["masked_region"]["note"].startswith("gain beyond weight statistics")
    assert vs_nc["rotation"]["note"].startswith("no detectable gain beyond weight statistics")
    assert vs_nc["masked_region"]["value"] == pytest.approx(0.15, abs=0.01)
    assert vs_nc["rotation"]["ci_low"] < 0 < vs_nc["rotation"]["ci_high"]
    # one family: 2 strategies x (random init on pe and nodule + each one's negative control) -> 1 - 0.05 / 8
    assert tuple(plan.bench.strategies) == ("masked_region", "rotation") and tuple(plan.bench.controls) == ("pe", "nodule")
    assert all("99.38%" in r["note"] for r in [*vs_random.values(), *vs_nc.values()])
    assert any("masked_region gain beyond weight statistics" in line for line in lines)


def test_without_a_negative_control_there_is_no_second_reference(tmp_path):
    from ctssl_core.benchmark import sensitivity_rows

    plan = _plan(tmp_path, ["benchmark.controls=[pe]"])
    rows, _ = sensitivity_rows(plan, {"nodule": _boots_nc(0.1, 0.25)}, {})
    assert not [r for r in rows if r["metric"].startswith("ncverdict_")]
    # family: 2 strategies x (random init on pe and nodule + pe's negative control) -> 1 - 0.05 / 6
    assert all("99.17%" in r["note"] for r in rows if r["metric"] == "verdict_cpm")
