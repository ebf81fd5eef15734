"""The benchmark's plan (``ctssl_core/plan.py``): a profile resolved once into typed units, each carrying its
resolved config, and a unit identity (``unit_hash``) that the store keeps with each run, so a benchmark finds
a finished pretraining by what it computed rather than by comparing JSON, and reruns a unit whose resolved
config changed."""

from __future__ import annotations

import shutil

import duckdb
import pytest

from ctssl_core.config import ConfigError
from ctssl_core.plan import (AnalyseUnit, ControlUnit, EmbedUnit, FinetuneUnit, PretrainUnit, make_plan, needs,
                             provides)

POWER = ["benchmark.pool=0.5", "benchmark.controls=[pe]"]


def test_every_unit_carries_its_resolved_config_and_the_analysis_comes_last():
    from ctssl_core.embed import EmbedConfig
    from ctssl_core.finetune import FinetuneConfig
    from ctssl_core.pretrain import PretrainConfig
    from ctssl_core.train import TrainConfig

    plan = make_plan("smoke", POWER)
    kinds = {PretrainUnit: PretrainConfig, FinetuneUnit: FinetuneConfig, EmbedUnit: EmbedConfig}
    for u in plan.units:
        if type(u) in kinds:
            assert isinstance(u.config, kinds[type(u)]), u.run_id
    assert all(isinstance(u.config.train, TrainConfig) for u in plan.of_kind("pretrain"))
    pc, nc = plan.of_kind("control")
    assert isinstance(pc, ControlUnit) and isinstance(pc.config, FinetuneConfig) and nc.config is None
    assert isinstance(plan.units[-1], AnalyseUnit) and plan.analyse is plan.units[-1]
    assert [u for u in plan.units if isinstance(u, AnalyseUnit)] == [plan.analyse]
    assert plan.runs == plan.units[:-1]
    ids = [u.run_id for u in plan.runs]
    hashes = [u.unit_hash for u in plan.runs]
    assert len(set(ids)) == len(ids) and len(set(hashes)) == len(hashes)   # one identity per unit
    # each fine-tune names its init (the runner swaps in the run id), with the fraction and seed of its unit
    for u in plan.of_kind("finetune"):
        assert (u.config.task, u.config.init, u.config.fraction, u.config.seed) == (u.task, u.init, u.fraction,
                                                                                  u.seed)


def test_a_units_identity_follows_what_it_starts_from_and_ignores_execution_settings():
    base = make_plan("smoke", POWER)
    longer = make_plan("smoke", POWER + ["pretrain.train.steps=9"])
    faster = make_plan("smoke", POWER + ["benchmark.workers=2", "benchmark.threads=1"])
    by = lambda p: {(u.kind, u.task, u.init, u.fraction, u.seed): u for u in p.units}   # noqa: E731
    b, lg, fs = by(base), by(longer), by(faster)
    for key, u in b.items():
        assert fs[key].unit_hash == u.unit_hash and fs[key].run_id == u.run_id   # how fast, never what
        kind, task, init = key[:3]
        from_pretraining = kind == "pretrain" or (kind in ("finetune", "embed") and init in base.bench.strategies)
        assert (lg[key].unit_hash != u.unit_hash) is from_pretraining, key
    ft = next(u for u in base.of_kind("finetune") if u.init == "rotation")
    assert ft.after == base.pretraining("rotation").unit_hash and needs(ft) == provides(base.pretraining("rotation"))
    nc_ft = next(u for u in base.of_kind("finetune") if u.init == "negative_control")
    nc = next(u for u in base.of_kind("control") if u.init == "negative_control")
    assert nc_ft.after == nc.unit_hash and nc.after == base.of_kind("control")[0].unit_hash


def test_a_pretraining_run_by_hand_is_the_benchmarks_unit_when_its_resolved_config_is(store_copy):
    """``ctssl pretrain --profile smoke`` on the smoke benchmark's pool resolves to the same PretrainConfig as the
    benchmark's unit: the benchmark reuses it, found by the stored hash; another config is not reused."""
    from ctssl_core.benchmark import find_pretrain
    from ctssl_core.cli import main
    from ctssl_core.paths import store_paths

    over = ["train.steps=2", "train.batch_size=8"]
    pool = ["split=pool", "pool=0.5"]               # the smoke benchmark pretrains on its unlabelled pool
    assert main(["pretrain", "--store", str(store_copy), "--profile", "smoke", "--no-progress", "--task", "rotation",
                 *[a for o in over + pool for a in ("--set", o)]]) == 0
    with duckdb.connect(str(store_paths(store_copy).db), read_only=True) as con:
        (run_id, stored), = con.execute("SELECT run_id, unit_hash FROM runs WHERE kind = 'pretrain'").fetchall()
    unit = make_plan("smoke", [f"pretrain.{o}" for o in over]).pretraining("rotation")
    assert stored == unit.unit_hash and find_pretrain(unit, store_copy) == run_id
    other = make_plan("smoke", ["pretrain.train.steps=3", "pretrain.train.batch_size=8"]).pretraining("rotation")
    assert find_pretrain(other, store_copy) is None
    no_pool = make_plan("smoke", [f"pretrain.{o}" for o in over] + ["benchmark.pool=0", "benchmark.controls=[]"])
    assert find_pretrain(no_pool.pretraining("rotation"), store_copy) is None    # other patients, other unit
    (store_copy / (store_paths(store_copy).run_dir(run_id) / "checkpoints" / "last.pt")).unlink()
    assert find_pretrain(unit, store_copy) is None                  # a run without its checkpoint is not reused


def test_run_pretrain_takes_a_resolved_config_or_what_to_resolve_not_both(store_copy):
    from ctssl_core.pretrain import run_pretrain

    cfg = make_plan("smoke").pretraining("rotation").config
    with pytest.raises(ConfigError, match="not both"):
        run_pretrain(None, store_copy, profile="smoke", config=cfg)
    with pytest.raises(ConfigError, match="pretrains 'rotation', not 'flip'"):
        run_pretrain("flip", store_copy, config=cfg)


def test_an_older_store_gets_its_pretrainings_identity_on_upgrade(smoke_store, tmp_path):
    """A store from before ``runs.unit_hash`` (schema 4): opening it for writing adds the column and computes
    each pretraining's identity from the config it stored, so the benchmark still reuses them."""
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths
    from ctssl_core.results.store_api import runs_with_hash
    from ctssl_core.schema import SCHEMA_VERSION, ensure_schema

    store = tmp_path / "old"
    shutil.copytree(smoke_store, store)
    db = store_paths(store).db
    with duckdb.connect(str(db)) as con:
        con.execute("ALTER TABLE runs DROP COLUMN unit_hash")
        con.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    plan = make_plan("smoke")
    assert all(runs_with_hash(store, "pretrain", u.unit_hash) == [] for u in plan.of_kind("pretrain"))
    with connect(db) as con:
        ensure_schema(con)
    for u in plan.of_kind("pretrain"):
        assert len(runs_with_hash(store, "pretrain", u.unit_hash)) == 1, u.task
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        assert con.execute("SELECT count(*) FROM runs WHERE kind = 'finetune' AND unit_hash IS NOT NULL"
                           ).fetchone()[0] == 0                    # fine-tunes are found by run id
