"""DDP with two gloo processes follows the same loss curve as one process with the combined batch.

The encoder is ``TinyEncoder`` (no BatchNorm), so a sample's output does not
depend on the rest of its batch; with BatchNorm the two runs differ by design
unless SyncBatchNorm is used (``TrainConfig.sync_bn``, CUDA only). The task is
deterministic per sample (rotation k = slice_id mod 4) so that the pretext
randomness of the two set-ups cannot differ either.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from _fit_fakes import ArrayStore, RotTask, TinyEncoder, make_arrays
from ctssl_core.tasks import TaskBatch

STEPS, BATCH = 6, 8


@dataclass(frozen=True)
class SliceIdRotTask(RotTask):
    def make_batch(self, raw, generator):
        x = raw["x"][:, :1]  # (B, 1, H, W)
        k = raw["slice_id"] % 4  # (B,) deterministic per sample
        rots = torch.stack([torch.rot90(x, r, dims=(2, 3)) for r in range(4)], dim=1)  # (B, 4, 1, H, W)
        return TaskBatch(inputs=rots[torch.arange(x.shape[0]), k], targets=k)


def train(rank: int, world: int, out: str) -> None:
    from ctssl_core import distributed
    from ctssl_core.data.loader import SliceBatcher
    from ctssl_core.train import TrainConfig, fit

    torch.set_num_threads(1)
    info = distributed.init_from_env(device="cpu")
    assert info.rank == rank and info.world_size == world
    store = ArrayStore(make_arrays(n_series=4, n_slices=12, size=32, seed=1))
    cfg = TrainConfig(steps=STEPS, batch_size=BATCH // world, lr=5e-3, warmup_steps=0, log_every=1,
                      ckpt_every=0, device="cpu", seed=3)
    torch.manual_seed(0)
    enc = TinyEncoder()
    batches = SliceBatcher(store, None, cfg.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    logs: list[dict] = []
    fit(SliceIdRotTask(), enc, batches, cfg, log=logs.append)
    if info.is_main:
        with open(out, "w") as f:
            params = torch.cat([p.detach().flatten() for p in enc.parameters()])
            json.dump({"loss": [d["train/loss"] for d in logs], "params": params.tolist()}, f)
    distributed.cleanup()


def _spawned(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    train(rank, world, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_with_the_combined_batch(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    single = tmp_path / "single.json"
    train(0, 1, str(single))
    double = tmp_path / "ddp.json"
    mp.spawn(_spawned, args=(2, free_port(), str(double)), nprocs=2, join=True)
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert len(one["loss"]) == len(two["loss"]) == STEPS
    assert max(one["loss"]) - min(one["loss"]) > 1e-3  # a real curve, not a constant
    for a, b in zip(one["loss"], two["loss"]):
        assert abs(a - b) < 1e-5 * max(1.0, abs(a))
    # same trajectory: the trained weights agree too (and moved away from the init)
    p1, p2 = torch.tensor(one["params"]), torch.tensor(two["params"])
    torch.manual_seed(0)
    p0 = torch.cat([p.detach().flatten() for p in TinyEncoder().parameters()])
    assert torch.allclose(p1, p2, atol=1e-5) and not torch.allclose(p1, p0, atol=1e-4)
