"""Multi-process training through PyTorch's own engine: torchrun + DDP.

Single node, N GPUs::

    torchrun --standalone --nproc_per_node N -m ctssl_core.cli pretrain --task masked_region \
        --profile paper --store /shared/ctssl-store

Several nodes (run on every node; the store folder on shared storage -- NFS,
Lustre, a mounted bucket -- at the same path, because training reads the
memory-mapped ``slices/*.npy`` directly)::

    torchrun --nnodes M --nproc_per_node N --rdzv-backend c10d \
        --rdzv-endpoint HOST0:29500 --rdzv-id ctssl-run -m ctssl_core.cli pretrain ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`init_from_env` reads
them and joins the process group (nccl on GPUs, gloo on CPUs). Without those
variables everything here is a no-op, so the same code path runs
single-process. ``train.batch_size`` is per process: the global batch is
``N * M * batch_size`` (scale ``lr`` accordingly). Tested on the CPU with two
gloo processes (tests/test_ddp.py; `torchrun --nproc_per_node 2 -m
ctssl_core.cli pretrain ...` runs the same way on a CPU).

Data sharding is done by ``SliceBatcher(rank=, world_size=)`` (every rank draws
the same epoch permutation and takes ``perm[rank::world]``); DDP averages the
gradients, so N ranks with batch B follow the same trajectory as one process
with batch N*B for encoders whose per-sample output does not depend on the
batch (BatchNorm does: ``sync_bn`` converts it to SyncBatchNorm on GPUs).
Only rank 0 logs, writes the store and saves checkpoints; NaN and SIGTERM
stops are agreed across ranks at log boundaries so no rank is left waiting in
a collective. ``experiments/bench_pretrain.py`` prints the epoch time of a
15M-slice corpus on N GPUs from its measured single-device rate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (idempotent); single process otherwise."""
    rank, world, local = env_world()
    if world <= 1:
        return DistInfo()
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local, backend=backend)


def current() -> DistInfo:
    """The DistInfo of an already-initialised group (or single process)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return DistInfo(rank=rank, world_size=world, local_rank=env_world()[2], backend=dist.get_backend())
    return DistInfo()


def wrap(model: nn.Module, info: DistInfo, device: torch.device, sync_bn: bool = True) -> nn.Module:
    """DDP-wrap ``model`` when running multi-process (SyncBatchNorm on CUDA if asked)."""
    if not info.enabled:
        return model
    if sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def mean_across(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a scalar tensor over ranks (for logging the global loss)."""
    if not info.enabled:
        return value
    v = value.detach().clone()
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return v / info.world_size


def any_across(flag: torch.Tensor, info: DistInfo) -> bool:
    """True if ``flag`` (a bool/0-1 scalar tensor) is set on any rank. Every rank must call it."""
    if not info.enabled:
        return bool(flag.item())
    v = flag.detach().to(torch.int32).reshape(1).clone()
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return bool(v.item())


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (e.g. the run id)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
