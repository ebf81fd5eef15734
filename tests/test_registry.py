"""Registries are the single source (issue "One store API, one plan ..." item 4): a strategy added at run
time -- one class plus one registry line -- is run by the benchmark, with nothing else edited."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch

from ctssl_core import ops
from ctssl_core.pretext import PRETEXT, strategies
from ctssl_core.pretext.base import DenseTask, raw_x
from ctssl_core.pretext.losses import reconstruction_loss
from ctssl_core.tasks import TaskBatch


@dataclass(frozen=True)
class Upside(DenseTask):
    """Toy strategy: reconstruct the slice from its upside-down copy."""

    name: ClassVar[str] = "upside"

    def make_batch(self, raw: dict, generator: torch.Generator) -> TaskBatch:
        x = ops.slice_at(raw_x(raw, 1, self.name), 0)                       # (B, C, H, W)
        return TaskBatch(inputs=x.flip(-2), targets=x, mask=None)

    def loss(self, pred, batch):
        return reconstruction_loss(pred, batch.targets, None)


def test_default_strategies_come_from_the_registry(monkeypatch):
    from ctssl_core.plan import BenchmarkConfig

    assert strategies() == ("masked_region", "next_slice", "rotation", "flip", "denoise")   # not composite
    monkeypatch.setitem(PRETEXT, "upside", Upside)
    assert strategies()[-1] == "upside" and BenchmarkConfig().strategies[-1] == "upside"


def test_a_strategy_registered_at_run_time_runs_through_the_smoke_benchmark(monkeypatch, tmp_path):
    from ctssl_core.benchmark import run_benchmark
    from ctssl_core.results import read

    monkeypatch.setitem(PRETEXT, "upside", Upside)
    out = run_benchmark("smoke", store_root=tmp_path, progress=False, log=lambda m: None,
                        overrides=["benchmark.strategies=[upside]", "benchmark.controls=[]",
                                   "benchmark.tasks=[pe]", "benchmark.fractions=[1.0]"])
    table: pd.DataFrame = read.headline_table(tmp_path, out["benchmark_id"])
    assert {"random", "upside"} <= set(table.init)
    pe = table[(table.task == "pe") & (table.init == "upside")]
    assert not pe.empty and pe.value.notna().all()
    assert "upside" in out["table"].to_string()               # the printed summary names it
    runs = read.run_table(tmp_path)
    assert (runs[(runs.kind == "pretrain")].task == "upside").any()
