"""Pretext competence: each trivial baseline on inputs whose answer is known, and a real pretraining
scored against its baseline on held-out slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctssl_core.competence import BASELINE_NAMES, competence, errors, median3, paired_ci, ring_fill
from ctssl_core.pretext import PRETEXT, make_pretext
from ctssl_core.tasks import TaskBatch


def test_neighbourhood_fill_is_exact_on_a_locally_constant_image():
    x = torch.full((2, 1, 16, 16), 0.3)
    x[1] = 0.7
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:7, 5:8] = 1
    inputs = x.masked_fill(mask.bool(), 0.0)
    torch.testing.assert_close(ring_fill(inputs, mask), x)


def test_median_filter_removes_isolated_salt_and_pepper_on_a_smooth_image():
    ramp = torch.linspace(0, 1, 32).repeat(32, 1)[None, None]                    # (1, 1, 32, 32)
    noisy = ramp.clone()
    noisy[0, 0, 5, 9], noisy[0, 0, 20, 20] = 1.0, 0.0
    out = median3(noisy)
    assert (out - ramp)[0, 0, 2:-2, 2:-2].abs().max() < 0.05
    assert (noisy - ramp).abs().max() > 0.5


def test_classification_baseline_is_chance_and_model_error_is_its_misses():
    task = make_pretext("rotation")
    pred = torch.tensor([[9.0, 0, 0, 0], [0, 9.0, 0, 0], [0, 0, 9.0, 0]])
    m, b = errors(task, pred, TaskBatch(inputs=torch.zeros(3, 1, 4, 4), targets=torch.tensor([0, 1, 3])))
    assert m.tolist() == [0.0, 0.0, 1.0] and b.tolist() == [0.75] * 3


def test_next_slice_baseline_is_copying_the_neighbour():
    task = make_pretext("next_slice")                               # residual target
    targets = torch.full((2, 1, 4, 4), 0.1)
    m, b = errors(task, torch.zeros_like(targets), TaskBatch(inputs=torch.rand(2, 1, 4, 4), targets=targets))
    torch.testing.assert_close(m, b)                               # predicting zero residual = copying
    assert b[0].item() == pytest.approx(0.01)


def test_every_benchmark_strategy_has_a_baseline_and_unknown_tasks_are_refused():
    assert {"masked_region", "next_slice", "rotation", "flip", "denoise"} <= set(BASELINE_NAMES)
    assert set(BASELINE_NAMES) <= set(PRETEXT)

    class Other:
        name = "jigsaw"

    with pytest.raises(KeyError, match="no competence baseline"):
        errors(Other(), torch.zeros(1), None)


def test_paired_ci_says_beats_only_when_the_whole_interval_is_above_zero():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 1.0, 400)
    assert paired_ci(base - 0.2, base)["beats"] is True
    assert paired_ci(base + rng.normal(0, 0.05, 400), base)["beats"] is False


def test_competence_of_a_real_pretraining_on_held_out_slices(store_copy):
    from ctssl_core.cli import main
    from ctssl_core.data.store import SliceStore
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    assert main(["pretrain", "--store", str(store_copy), "--profile", "smoke", "--no-progress", "--task", "denoise",
                 "--set", "steps=4", "--set", "batch_size=8", "--set", "image_size=32"]) == 0
    with connect(store_paths(store_copy).db, read_only=True) as con:
        (rid,) = con.execute("SELECT run_id FROM runs WHERE kind = 'pretrain'").fetchone()
    store = SliceStore.open(store_copy)
    got = competence(store_copy, rid, np.asarray(store.slice_ids)[:40], store=store, n_batches=2, batch_size=16)
    assert got["task"] == "denoise" and got["baseline"] == "3x3 median filter"
    assert got["n"] == 32
    assert got["gain"] == pytest.approx(got["baseline_error"] - got["model_error"])
    assert got["ci_low"] <= got["gain"] <= got["ci_high"]
    # 4 steps of training cannot beat a median filter on salt-and-pepper noise
    assert got["beats"] is False
