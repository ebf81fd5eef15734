"""The one training loop: exact resume, NaN stop with last good checkpoint, logging, freezing, SIGTERM."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from _fit_fakes import ArrayStore, RotTask, TinyEncoder, make_arrays
from ctssl_core.checkpoint import read_checkpoint
from ctssl_core.config import ConfigError, build
from ctssl_core.data.loader import SliceBatcher
from ctssl_core.train import TrainConfig, TrainingDiverged, fit, lr_factor

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store():
    return ArrayStore(make_arrays(n_series=4, n_slices=12, size=32, seed=3))


def cfg(**kw):
    base = dict(steps=8, batch_size=8, lr=3e-3, warmup_steps=2, ckpt_every=4, log_every=1, seed=11, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def run(store, c, run_dir=None, resume=False, task=None, **kw):
    torch.manual_seed(0)
    enc = TinyEncoder()
    logs = []
    b = SliceBatcher(store, None, c.batch_size, seed=c.seed)
    res = fit(task or RotTask(), enc, b, c, log=logs.append, run_dir=run_dir, resume=resume, **kw)
    return res, logs, enc


def test_resume_gives_the_same_next_step_losses_as_uninterrupted(store, tmp_path):
    full, full_logs, full_enc = run(store, cfg(steps=8), tmp_path / "a")
    # interrupted by SIGTERM after step 4 (saved at that boundary), then resumed to step 8
    c4 = cfg(steps=8)
    torch.manual_seed(0)
    enc = TinyEncoder()
    b = SliceBatcher(store, None, c4.batch_size, seed=c4.seed)
    logs_b = []

    def stop_at_4(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop saves at this step boundary and returns

    r1 = fit(RotTask(), enc, b, c4, log=logs_b.append, run_dir=tmp_path / "b", progress=stop_at_4)
    assert r1.stopped == "signal" and r1.step == 4
    assert read_checkpoint(tmp_path / "b")["step"] == 4
    torch.manual_seed(123)  # a different global RNG must not matter: resume restores it
    r2, logs_r, enc_r = run(store, c4, tmp_path / "b", resume=True)
    assert r2.start_step == 4 and r2.step == 8
    full_loss = {d["step"]: d["train/loss"] for d in full_logs}
    res_loss = {d["step"]: d["train/loss"] for d in logs_r}
    for s in (5, 6, 7, 8):
        assert res_loss[s] == pytest.approx(full_loss[s], rel=1e-6, abs=1e-7)
    for p, q in zip(full_enc.parameters(), enc_r.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_logs_have_the_documented_keys_and_loss_falls(store):
    res, logs, _ = run(store, cfg(steps=30, lr=1e-2, log_every=5, ckpt_every=0))
    keys = {"step", "epoch", "wall_s", "train/loss", "train/ce", "lr", "grad_norm", "throughput"}
    assert keys <= set(logs[-1])
    assert [d["step"] for d in logs] == [1, 5, 10, 15, 20, 25, 30]
    assert all(np.isfinite(d["train/loss"]) and d["throughput"] > 0 for d in logs)
    assert res.final_loss < res.first_loss
    assert logs[-1]["epoch"] > 1.0  # 48 slices / 8 = 6 batches per epoch


def test_nan_loss_stops_and_keeps_last_good_checkpoint(store, tmp_path):
    c = cfg(steps=12, ckpt_every=4, log_every=1)

    class Explode(RotTask):
        def make_batch(self, raw, generator):
            batch = super().make_batch(raw, generator)
            if int(raw["step_marker"]) >= 6:
                batch.inputs = batch.inputs * float("nan")
            return batch

    step = {"n": 0}

    class Marked(SliceBatcher):
        def __iter__(self):
            for raw in super().__iter__():
                step["n"] += 1
                raw["step_marker"] = torch.tensor(step["n"])
                yield raw

    enc = TinyEncoder()
    b = Marked(store, None, c.batch_size, seed=c.seed)
    with pytest.raises(TrainingDiverged, match=r"NaN/inf by step 6.*last good checkpoint is .*last.pt.*Lower train.lr"):
        fit(Explode(), enc, b, c, run_dir=tmp_path)
    saved = read_checkpoint(tmp_path)
    assert saved["step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["encoder"].values())


def test_freeze_encoder_trains_only_the_head(store):
    torch.manual_seed(0)
    enc = TinyEncoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    b = SliceBatcher(store, None, 8, seed=0)
    res = fit(RotTask(), enc, b, cfg(steps=5, ckpt_every=0), freeze_encoder=True)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert res.head is not None and res.step == 5


def test_init_checkpoint_loads_encoder_and_eval_hook_logs(store, tmp_path):
    res, _, enc = run(store, cfg(steps=4), tmp_path / "pre")
    enc2 = TinyEncoder()
    calls = []

    def probe(encoder, step):
        calls.append(step)
        return {"probe/acc": 0.5}

    logs = []
    b = SliceBatcher(store, None, 8, seed=0)
    c = cfg(steps=4, lr=1e-9, warmup_steps=0, eval_every=2, ckpt_every=0)
    fit(RotTask(), enc2, b, c, log=logs.append, init_checkpoint=tmp_path / "pre", eval_fn=probe)
    for p, q in zip(enc.parameters(), enc2.parameters()):
        assert torch.allclose(p, q, atol=1e-5)  # lr ~0: still the loaded weights
    assert calls == [2, 4]
    assert [d["probe/acc"] for d in logs if "probe/acc" in d] == [0.5, 0.5]


def test_resume_without_checkpoint_is_a_clear_error(store, tmp_path):
    with pytest.raises(ConfigError, match="cannot resume: no checkpoint"):
        run(store, cfg(), tmp_path / "nothing", resume=True)


def test_lr_schedule_warmup_then_cosine_to_zero():
    c = cfg(steps=100, warmup_steps=10)
    assert lr_factor(0, c) == pytest.approx(0.1)
    assert lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(55, c) == pytest.approx(0.5)
    assert lr_factor(100, c) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, cfg(steps=100, warmup_steps=0, schedule="constant")) == 1.0


def test_train_config_is_strict():
    with pytest.raises(ConfigError, match="Did you mean 'steps'"):
        build(TrainConfig, {"stepz": 3})
    with pytest.raises(ConfigError, match="not one of"):
        build(TrainConfig, {"optimizer": "sgd"})
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        build(TrainConfig, {"steps": 0})
    c = build(TrainConfig, {"optimizer": "radam"}, ["lr=1e-4"])
    assert c.optimizer == "radam" and c.lr == 1e-4


def test_radam_and_no_clip_also_train(store):
    res, logs, _ = run(store, cfg(steps=6, optimizer="radam", grad_clip=0.0, ckpt_every=0))
    assert res.step == 6 and all(d["grad_norm"] > 0 for d in logs)
