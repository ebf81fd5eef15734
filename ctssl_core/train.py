"""The one training loop: pretraining, fine-tuning and linear probing.

They differ only in the task (a pretext or a downstream ``Task``), the initial
encoder weights (``init_checkpoint``) and ``freeze_encoder``. The loop:

    raw batch (device) -> task.make_batch(raw, generator) -> task.forward -> task.loss
    -> backward -> clip -> optimizer -> LR schedule -> log / checkpoint

What it guarantees:
- Determinism: python, numpy, torch (CPU/CUDA) and the task's generator are
  seeded from ``cfg.seed``; the loader's order comes from its own seed.
- Exact resume: a checkpoint holds encoder, head, optimiser, scheduler, step,
  every RNG state and the loader position, so ``resume=True`` reproduces the
  next-step loss of an uninterrupted run.
- Safety: checkpoints are written atomically every ``ckpt_every`` steps, at the
  end, and at the first step boundary after SIGTERM; a NaN/inf loss stops the
  run *before* the next save, so ``last.pt`` stays the last good state.
- Speed: no host sync per step on the GPU (losses are accumulated on the
  device and read every ``log_every`` steps); bf16 autocast, channels_last and
  torch.compile are switches.
- It never touches DuckDB: metrics go to ``log(dict)``.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ctssl_core import checkpoint as ckpt_mod
from ctssl_core import distributed as dist_mod
from ctssl_core.config import ConfigError, to_dict
from ctssl_core.tasks import Task, TaskBatch


class TrainingDiverged(ConfigError):
    """The loss became NaN/inf; the message names the last good checkpoint and what to change."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200                     # optimiser steps in total (resume counts from the saved step)
    batch_size: int = 32                 # per process
    lr: float = 1e-3
    optimizer: Literal["adamw", "radam"] = "adamw"
    weight_decay: float = 0.05
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0               # max global grad norm; 0 = off (the norm is still logged)
    amp: Literal["auto", "bf16", "off"] = "auto"  # bf16 autocast on CUDA only; auto = bf16 where supported
    channels_last: bool = False
    compile: bool = False
    ckpt_every: int = 100                # steps; 0 = only at the end
    eval_every: int = 0                  # steps between eval_fn calls; 0 = never
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: int = 0                  # resize slices on the device to this; 0 = keep the store's size
    crop: int = 0                        # random crop x crop square of each training slice (after image_size);
                                         # 0 = whole slice. Pretraining only: downstream tasks crop in the task
    log_every: int = 10
    sync_bn: bool = True                 # SyncBatchNorm under multi-GPU DDP

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "ckpt_every", "eval_every", "image_size", "crop"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("train.grad_clip and train.weight_decay must be >= 0")


@dataclass
class FitResult:
    start_step: int
    step: int                               # last completed step
    first_loss: float | None                # mean loss of the first logged interval of this call
    final_loss: float | None                # mean loss of the last logged interval
    losses: list[tuple[int, float]] = field(default_factory=list)
    wall_s: float = 0.0
    throughput: float = 0.0                 # images/s over this call (all ranks)
    checkpoint: Path | None = None
    stopped: str = "completed"              # 'completed' | 'signal'
    amp: str = "off"
    device: str = "cpu"
    head: nn.Module | None = None


class TaskModel(nn.Module):
    """encoder + head behind one ``forward`` so DDP and torch.compile see a single module."""

    def __init__(self, task: Task, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.encoder = encoder
        self.head = head

    def forward(self, batch: TaskBatch) -> Any:
        # the whole batch object passes through: composite tasks carry per-member batches on it
        return self.task.forward(self.encoder, self.head, batch)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use device=auto or cpu")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> str:
    """'bf16' or 'off'. bf16 autocast only on CUDA (CPU bf16 autocast is slower than fp32 here)."""
    if device.type != "cuda" or amp == "off":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported() else "off"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine to 0 (or constant) over ``cfg.steps``.

    Warmup is capped at half the run, so a short smoke run (``steps=20`` with the
    profile's ``warmup_steps=20``) still trains at the intended rate.
    """
    warm = min(cfg.warmup_steps, cfg.steps // 2)
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.steps - warm, 1)
    t = min(max(step - warm, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "radam":
        return torch.optim.RAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, decoupled_weight_decay=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class _StopFlag:
    """SIGTERM sets a flag; the loop saves and exits at the next step boundary."""

    def __init__(self) -> None:
        self.set = False
        self._prev: Any = None

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


def _scalar(v: Any) -> float:
    return float(v.detach().float().item()) if isinstance(v, Tensor) else float(v)


def train_step(model: nn.Module, task: Task, batch: TaskBatch, optimizer: torch.optim.Optimizer, sched: Any,
               params: list[nn.Parameter], cfg: TrainConfig, amp: str) -> tuple[Tensor, dict[str, Any], Tensor]:
    """One optimiser step on a ready TaskBatch: (loss, loss parts, grad norm). No host sync.

    Shared by ``fit`` and ``experiments/bench_pretrain.py`` so the benchmark's
    ceiling times exactly the step the loop runs.
    """
    if cfg.channels_last and batch.inputs.dim() == 4:
        batch.inputs = batch.inputs.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp == "bf16"):
        # the loss too: autocast runs mse / cross-entropy in float32
        pred = model(batch)
        loss, parts = task.loss(pred, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    optimizer.step()
    if sched is not None:
        sched.step()
    return loss, parts, grad_norm


def fit(
    task: Task,
    encoder: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    cfg: TrainConfig,
    log: Callable[[dict[str, Any]], None] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    init_checkpoint: str | Path | None = None,
    freeze_encoder: bool = False,
    eval_fn: Callable[[nn.Module, int], Mapping[str, float]] | None = None,
    head: nn.Module | None = None,
    run_config: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``task`` on ``encoder`` for ``cfg.steps`` steps from ``batches`` (an endless iterable of raw batches).

    ``batches`` with ``state_dict``/``load_state_dict`` (``SliceBatcher``) have
    their position saved and restored. ``run_config`` (the resolved config of
    the whole run) is stored inside every checkpoint. ``head`` reuses an
    existing head instead of ``task.build_head``. ``progress(step)`` is called
    after every step (e.g. a tqdm update).
    """
    log = log or (lambda _d: None)
    info = dist_mod.current()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None and info.enabled:
        device = torch.device("cuda", info.local_rank)
    amp = resolve_amp(cfg.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)

    ckpt_dir = Path(run_dir) / "checkpoints" if run_dir is not None else None
    last_path = ckpt_dir / ckpt_mod.LAST if ckpt_dir is not None else None
    saved: dict[str, Any] | None = None
    rc_enc = (run_config or {}).get("encoder")
    want = rc_enc if isinstance(rc_enc, str) else None  # registry key of the encoder we were given
    if resume:
        if last_path is None or not last_path.is_file():
            raise ckpt_mod.CheckpointError(
                f"cannot resume: no checkpoint at {last_path}. Start the run without resume, "
                f"or pass the run whose checkpoints/{ckpt_mod.LAST} exists."
            )
        saved = ckpt_mod.read_checkpoint(last_path)
    elif init_checkpoint is not None:
        init = ckpt_mod.read_checkpoint(init_checkpoint)
        ckpt_mod.load_encoder_state(encoder, init, expected_name=want)

    encoder = encoder.to(device)
    if head is None:
        head = task.build_head(encoder)
    head = head.to(device)
    if freeze_encoder:
        encoder.requires_grad_(False)
    model: nn.Module = TaskModel(task, encoder, head)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: the encoder is frozen and the head has no parameters")
    optimizer = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed * 1_000_003 + info.rank)  # per-rank pretext randomness

    start = 0
    if saved is not None:
        ckpt_mod.load_encoder_state(encoder, saved, expected_name=want)
        if saved.get("head") is not None:
            head.load_state_dict(saved["head"], strict=True)
        if saved.get("optimizer") is not None:
            optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scheduler") is not None:
            sched.load_state_dict(saved["scheduler"])
        start = int(saved["step"])
        if saved.get("rng") is not None:
            ckpt_mod.set_rng_state(saved["rng"], {"task": generator})
        if saved.get("loader") is not None and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(saved["loader"])  # type: ignore[attr-defined]
    if start >= cfg.steps:
        return FitResult(start, start, None, None, checkpoint=last_path, amp=amp, device=str(device), head=head)

    train_model = dist_mod.wrap(model, info, device, sync_bn=cfg.sync_bn)
    if cfg.compile:
        train_model = torch.compile(train_model)
    frozen_mods = [encoder] if freeze_encoder else []

    def set_train() -> None:
        model.train()
        for m in frozen_mods:
            m.eval()  # frozen encoder: BatchNorm keeps its statistics (linear probing)

    config_blob = {"train": to_dict(cfg), **dict(run_config or {})}

    def save(step: int) -> Path | None:
        if last_path is None or not info.is_main:
            return None
        return ckpt_mod.save_checkpoint(
            last_path, encoder, head, optimizer, sched, step,
            rng=ckpt_mod.rng_state({"task": generator}),
            config=config_blob,
            loader=batches.state_dict() if hasattr(batches, "state_dict") else None,  # type: ignore[attr-defined]
        )

    def epoch_of(step: int) -> float:
        if hasattr(batches, "epoch_float"):
            return float(batches.epoch_float)  # type: ignore[attr-defined]
        n = len(batches) if hasattr(batches, "__len__") else 0  # type: ignore[arg-type]
        return step / n if n else 0.0

    result = FitResult(start, start, None, None, amp=amp, device=str(device), head=head)
    loss_sum = torch.zeros((), device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    parts_sum: dict[str, Any] = {}
    n_in_interval, imgs_in_interval, imgs_total = 0, 0, 0
    grad_norm = torch.zeros((), device=device)
    t0 = time.perf_counter()
    t_interval = t0
    last_good: Path | None = last_path if (last_path is not None and last_path.is_file()) else None

    def check_finite(step: int) -> None:
        # under DDP every rank must take the same decision at the same step (else one hangs in a collective)
        if bool(dist_mod.any_across(bad, info)):
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved before it"
            raise TrainingDiverged(
                f"loss became NaN/inf by step {step}; stopped ({where}). Lower train.lr, raise "
                f"train.warmup_steps, set train.grad_clip, or try amp=off, then resume or restart."
            )

    set_train()
    it = iter(batches)
    step = start
    try:
        with _StopFlag() as stop:
            while step < cfg.steps:
                raw = next(it)
                batch = task.make_batch(raw, generator)
                inputs = batch.inputs
                loss, parts, grad_norm = train_step(train_model, task, batch, optimizer, sched, params, cfg, amp)
                step += 1
                ld = loss.detach().float()
                bad |= ~torch.isfinite(ld)
                loss_sum += ld
                for k, v in (parts or {}).items():
                    part = v.detach().float() if isinstance(v, Tensor) else float(v)
                    parts_sum[k] = parts_sum.get(k, 0.0) + part  # type: ignore[assignment]
                n_in_interval += 1
                b = int(inputs.shape[0]) * info.world_size
                imgs_in_interval += b
                imgs_total += b
                if progress is not None:
                    progress(step)

                is_last = step == cfg.steps
                if step % cfg.log_every == 0 or is_last or step == start + 1:
                    check_finite(step)
                    now = time.perf_counter()
                    mean_loss = float(dist_mod.mean_across(loss_sum / n_in_interval, info).item())
                    rec: dict[str, Any] = {
                        "step": step,
                        "epoch": epoch_of(step),
                        "wall_s": now - t0,
                        "train/loss": mean_loss,
                        "lr": optimizer.param_groups[0]["lr"],
                        "grad_norm": float(grad_norm.item()),
                        "throughput": imgs_in_interval / max(now - t_interval, 1e-9),
                    }
                    for k, v in parts_sum.items():
                        rec[f"train/{k}"] = _scalar(v) / n_in_interval
                    if info.is_main:
                        log(rec)
                    result.losses.append((step, mean_loss))
                    if result.first_loss is None:
                        result.first_loss = mean_loss
                    result.final_loss = mean_loss
                    loss_sum.zero_()
                    parts_sum.clear()
                    n_in_interval, imgs_in_interval, t_interval = 0, 0, time.perf_counter()

                if eval_fn is not None and cfg.eval_every and (step % cfg.eval_every == 0 or is_last) and info.is_main:
                    metrics = dict(eval_fn(encoder, step))
                    set_train()
                    if metrics:
                        log({"step": step, "epoch": epoch_of(step), "wall_s": time.perf_counter() - t0, **metrics})

                if info.enabled:  # agree across ranks, only at boundaries every rank reaches together
                    at_boundary = step % cfg.log_every == 0 or is_last
                    stop_now = at_boundary and dist_mod.any_across(torch.tensor(stop.set, device=device), info)
                else:
                    stop_now = stop.set
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or is_last or stop_now:
                    check_finite(step)
                    p = save(step)
                    if p is not None:
                        last_good = p
                        result.checkpoint = p
                if stop_now and not is_last:
                    result.stopped = "signal"
                    if info.is_main:
                        log({"step": step, "epoch": epoch_of(step), "wall_s": time.perf_counter() - t0, "stopped_by_signal": 1.0})
                    break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.step = step
    result.wall_s = time.perf_counter() - t0
    result.throughput = imgs_total / max(result.wall_s, 1e-9)
    if result.checkpoint is None:
        result.checkpoint = last_good
    return result
