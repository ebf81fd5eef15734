#!/usr/bin/env python
"""How close does the real pretraining pipeline come to the bare model, and to a conventional loader?

For one encoder / input size / batch / device it prints, per pretext task:

  (a) ceiling   steps/s of the bare model on ONE fixed TaskBatch already on the device
                (forward, loss, backward, grad clip, optimiser step: the same step fit() runs)
  (b) pipeline  steps/s of the real path: SliceStore over .npy memory maps in a temp dir ->
                SliceBatcher (prefetch thread, int16 copy, windowing on the device) ->
                task.make_batch (on the device) -> train.train_step (fit()'s step)
  (c) baseline  steps/s with a conventional torch DataLoader: per-sample reads, NumPy
                windowing and the task's transform per sample (rot90 / flip / square mask /
                salt-and-pepper / next-slice residual), default collate, then the same step
  All three drive the SAME model and step, in interleaved rounds (median reported), so
  load drift on a shared machine hits them alike;
  and the ratios (b)/(a) (target >= 0.90 on CPU with the quick model, >= 0.95 on a GPU)
  and (b)/(c).

Runs with only torch + numpy (+ pyyaml) installed: slices come from the numpy phantom
(ctssl_core.data.phantom + synth.sample_patient) or, if that cannot be imported, from
smooth random volumes; the output says which.

    python experiments/bench_pretrain.py                         # quick model on this CPU
    python experiments/bench_pretrain.py --encoder resnet50 --size 256 --batch 256 --amp bf16 --channels-last
    python experiments/bench_pretrain.py ... --compile --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ctssl_core.data.loader import SliceBatcher  # noqa: E402
from ctssl_core.ops import PAPER_LEVEL, PAPER_WIDTH  # noqa: E402
from ctssl_core.data.store import SliceStore  # noqa: E402
from ctssl_core.models import build_encoder  # noqa: E402
from ctssl_core.pretext import make_pretext  # noqa: E402
from ctssl_core.tasks import TaskBatch  # noqa: E402
from ctssl_core.train import TaskModel, TrainConfig, make_optimizer, resolve_amp, resolve_device, train_step  # noqa: E402

FIVE = ("masked_region", "next_slice", "rotation", "flip", "denoise")


# ------------------------------------------------------------------ data
def make_volumes(n_series: int, n_slices: int, size: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """int16 HU volumes (S, H, W): phantom chest CT if importable, else smooth random fields."""
    try:
        from ctssl_core.data.phantom import phantom_volume
        from ctssl_core.data.synth import SynthConfig, sample_patient

        cfg = SynthConfig(n_patients=n_series, slices_per_exam=max(n_slices, 4), image_size=size, seed=seed, workers=1)
        vols = [phantom_volume(sample_patient(cfg, i), np.random.default_rng(seed + i))[0][:n_slices] for i in range(n_series)]
        return vols, "phantom (ctssl_core.data.phantom.phantom_volume)"
    except ImportError as e:
        rng = np.random.default_rng(seed)
        fy = np.fft.fftfreq(size)[:, None]
        fx = np.fft.fftfreq(size)[None, :]
        low = np.exp(-(fx**2 + fy**2) / (2 * 0.03**2))  # smooth: keep low spatial frequencies
        vols = []
        for _ in range(n_series):
            noise = rng.standard_normal((n_slices, size, size))
            field = np.fft.ifft2(np.fft.fft2(noise) * low).real
            field = np.cumsum(field, axis=0) / np.sqrt(np.arange(1, n_slices + 1))[:, None, None]  # z-correlated
            hu = 40 + 300 * field / (field.std() + 1e-6)
            vols.append(np.clip(hu, -1024, 3071).astype(np.int16))
        return vols, f"smooth random volumes (phantom import failed: {e})"


def write_store(vols: list[np.ndarray], folder: Path) -> tuple[SliceStore, list[Path]]:
    """Save each volume as .npy and reopen memory-mapped, as an ingested store would be."""
    paths = []
    for i, v in enumerate(vols):
        p = folder / f"series{i:03d}.npy"
        np.save(p, v)
        paths.append(p)
    arrays = [np.load(p, mmap_mode="r") for p in paths]
    return SliceStore.from_arrays(arrays), paths


# ------------------------------------------------------------------ conventional baseline
class ConventionalDataset(torch.utils.data.Dataset):
    """The usual way: one sample per __getitem__, NumPy windowing + the task's transform per sample."""

    def __init__(self, paths: list[Path], task_name: str, task: Any, seed: int = 0):
        self.paths = [str(p) for p in paths]
        self.task_name, self.task, self.seed = task_name, task, seed
        self.gap = int(getattr(task, "gap", 1) or 1)
        self._arrays: list[np.ndarray] | None = None
        lens = [np.load(p, mmap_mode="r").shape[0] for p in self.paths]
        need = self.gap if task_name == "next_slice" else 0
        self.index = [(s, n) for s, L in enumerate(lens) for n in range(L - need)]
        self.calls = 0

    def __len__(self) -> int:
        return len(self.index)

    def _window(self, hu: np.ndarray) -> np.ndarray:
        level, width = PAPER_LEVEL, PAPER_WIDTH
        return np.clip((hu.astype(np.float32) - (level - width / 2)) / width, 0.0, 1.0)

    def __getitem__(self, i: int):
        if self._arrays is None:  # open lazily: once per worker process
            self._arrays = [np.load(p, mmap_mode="r") for p in self.paths]
        s, n = self.index[i]
        self.calls += 1
        rng = np.random.default_rng((self.seed, i, self.calls))
        x = self._window(self._arrays[s][n])  # (H, W)
        t, name = self.task, self.task_name
        mask = np.zeros((1,) + x.shape, np.float32)
        if name == "rotation":
            k = int(rng.integers(4))
            return np.ascontiguousarray(np.rot90(x, k))[None], np.int64(k), mask
        if name == "flip":
            code = int(rng.integers(4))
            y = x[:, ::-1] if code & 1 else x
            y = y[::-1] if code & 2 else y
            return np.ascontiguousarray(y)[None], np.int64(code), mask
        if name == "masked_region":
            H, W = x.shape
            side = max(1, round(float(getattr(t, "frac_side", 0.05)) * min(H, W)))
            top, left = int(rng.integers(H - side + 1)), int(rng.integers(W - side + 1))
            mask[0, top:top + side, left:left + side] = 1.0
            return (x * (1 - mask[0]))[None], x[None], mask
        if name == "denoise":
            amount = float(getattr(t, "amount", 0.05))
            u = rng.random(x.shape)
            y = np.where(u < amount / 2, 0.0, np.where(u < amount, 1.0, x)).astype(np.float32)
            return y[None], x[None], mask
        if name == "next_slice":
            nxt = self._window(self._arrays[s][n + self.gap])
            target = nxt - x if getattr(t, "target", "residual") == "residual" else nxt
            return x[None], target[None], mask
        raise ValueError(f"no NumPy baseline for task {name!r}")


def conventional_loader(paths: list[Path], task_name: str, task: Any, batch: int, workers: int, device: torch.device):
    ds = ConventionalDataset(paths, task_name, task)
    kw: dict[str, Any] = {}
    if workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                     pin_memory=device.type == "cuda", **kw)
    with_mask = task_name == "masked_region"
    while True:
        for inputs, targets, mask in dl:
            inputs = inputs.to(device, non_blocking=True)  # (B, 1, H, W)
            targets = targets.to(device, non_blocking=True)
            m = mask.to(device, non_blocking=True) if with_mask else None
            yield TaskBatch(inputs, targets, m)


# ------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_step(task: Any, encoder: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """fit()'s own step (train.train_step: TaskModel, autocast, loss, backward, clip, optimiser, schedule)."""
    head = task.build_head(encoder)
    model = TaskModel(task, encoder, head).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run_model = torch.compile(model) if cfg.compile else model
    amp = resolve_amp(cfg.amp, device)

    def step(batch: TaskBatch) -> None:
        train_step(run_model, task, batch, opt, sched, params, cfg, amp)

    return step


def time_steps(step, it, n: int, device: torch.device) -> float:
    """steps/s over ``n`` steps drawn from iterator ``it``."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step(next(it))
    _sync(device)
    return n / (time.perf_counter() - t0)


def pipeline_batches(task: Any, batcher: SliceBatcher, device: torch.device):
    """(b)'s feed: SliceBatcher raw batches -> task.make_batch on the device, as in fit()."""
    gen = torch.Generator(device=device).manual_seed(0)
    for raw in batcher:
        yield task.make_batch(raw, gen)


def bench_task(name: str, args: argparse.Namespace, store: SliceStore, paths: list[Path], device: torch.device) -> dict:
    """Interleaved rounds of (a), (b), (c) on ONE model, median rate per feed: robust to load drift
    on a shared machine, and the three differ only in where the batches come from."""
    task = make_pretext(name)
    enc_kw = json.loads(args.encoder_kwargs) if args.encoder_kwargs else {}
    cfg = TrainConfig(steps=10**9, batch_size=args.batch, lr=1e-4, warmup_steps=0, amp=args.amp,
                      channels_last=args.channels_last, compile=args.compile, ckpt_every=0, device=str(device.type))
    gap = int(getattr(task, "gap", 1) or 1)
    wants_hu = bool(getattr(task, "wants_hu", False))
    torch.manual_seed(0)
    step = make_step(task, build_encoder(args.encoder, **enc_kw), cfg, device)

    raw = next(iter(SliceBatcher(store, None, args.batch, context=task.context, gap=gap, device=device, seed=0,
                                 prefetch=False, wants_hu=wants_hu)))
    fixed = task.make_batch(raw, torch.Generator(device=device).manual_seed(0))

    def fixed_feed():
        while True:
            yield fixed

    feeds = {"a": fixed_feed(),
             "b": pipeline_batches(task, SliceBatcher(store, None, args.batch, context=task.context, gap=gap,
                                                      device=device, seed=0, wants_hu=wants_hu), device)}
    if not args.no_baseline and name in FIVE:  # composite has no single NumPy transform
        feeds["c"] = conventional_loader(paths, name, task, args.batch, args.workers, device)
    for it in feeds.values():  # warm-up: compile, cudnn autotune, allocator, worker start-up
        for _ in range(args.warm):
            step(next(it))
    rates: dict[str, list[float]] = {k: [] for k in feeds}
    per_round = max(1, args.steps // args.rounds)
    for _ in range(args.rounds):
        for k, it in feeds.items():
            rates[k].append(time_steps(step, it, per_round, device))
    for it in feeds.values():
        it.close()
    out: dict[str, Any] = {"task": name, "rounds": args.rounds, "steps_per_round": per_round}
    for k, r in rates.items():
        out[f"{k}_steps_s"] = float(np.median(r))
        out[f"{k}_img_s"] = out[f"{k}_steps_s"] * args.batch
        out[f"{k}_rounds"] = [round(x, 3) for x in r]
    out["b_over_a"] = out["b_steps_s"] / out["a_steps_s"]
    if "c_steps_s" in out:
        out["b_over_c"] = out["b_steps_s"] / out["c_steps_s"]
    del step, fixed, raw, feeds
    _free(device)
    return out


class _Iter:
    def __init__(self, gen):
        self.gen = gen

    def __iter__(self):
        return self.gen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="tiny", help="ENCODERS key (quick profile: tiny)")
    p.add_argument("--encoder-kwargs", default="", help='JSON, e.g. \'{"width": 0.5}\'')
    p.add_argument("--size", type=int, default=64, help="slice size H = W")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--tasks", default=",".join(FIVE), help="comma-separated pretext keys")
    p.add_argument("--warm", type=int, default=3, help="warm-up steps before timing")
    p.add_argument("--steps", type=int, default=15, help="timed steps per feed (split over --rounds)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the median is reported")
    p.add_argument("--series", type=int, default=6, help="series in the temp store")
    p.add_argument("--slices", type=int, default=48, help="slices per series")
    p.add_argument("--workers", type=int, default=-1, help="DataLoader workers for (c); -1 = cores - 1")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    p.add_argument("--no-baseline", action="store_true", help="skip (c)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--corpus-slices", type=float, default=15e6, help="estimate one epoch over this many slices (paper: ~15M)")
    p.add_argument("--gpus", default="1,8,32", help="device counts for the epoch-time estimate")
    args = p.parse_args(argv)
    if args.workers < 0:
        args.workers = max(0, min(8, (os.cpu_count() or 1) - 1))
    return args


def run(args: argparse.Namespace, echo=print) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = resolve_amp(args.amp, device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads)", "torch": torch.__version__, "encoder": args.encoder,
            "encoder_kwargs": args.encoder_kwargs, "size": args.size, "batch": args.batch, "amp": amp,
            "channels_last": args.channels_last, "compile": args.compile, "workers_c": args.workers,
            "warm": args.warm, "steps": args.steps}
    need = args.batch + 8
    slices = max(args.slices, math.ceil(need / args.series) + 6)
    t0 = time.perf_counter()
    vols, source = make_volumes(args.series, slices, args.size)
    info["data"] = f"{source}: {args.series} series x {slices} slices at {args.size}^2"
    echo(f"# bench_pretrain  {json.dumps(info)}")
    echo(f"# data made in {time.perf_counter() - t0:.1f}s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctssl-bench-") as tmp:
        store, paths = write_store(vols, Path(tmp))
        echo(f"{'task':<14}{'(a) ceiling':>14}{'(b) pipeline':>14}{'(c) DataLoader':>16}{'b/a':>8}{'b/c':>8}   img/s (b)")
        for name in [t for t in args.tasks.split(",") if t]:
            t1 = time.perf_counter()
            try:
                r = bench_task(name, args, store, paths, device)
            except Exception as e:  # noqa: BLE001 - one broken task must not hide the others
                r = {"task": name, "error": f"{type(e).__name__}: {e}"}
                echo(f"{name:<14}ERROR {r['error']}")
                rows.append(r)
                continue
            r["wall_s"] = time.perf_counter() - t1
            rows.append(r)
            c = f"{r['c_steps_s']:>12.2f}/s" if "c_steps_s" in r else f"{'-':>14}"
            bc = f"{r['b_over_c']:>8.2f}" if "b_over_c" in r else f"{'-':>8}"
            echo(f"{name:<14}{r['a_steps_s']:>12.2f}/s{r['b_steps_s']:>12.2f}/s  {c}{r['b_over_a']:>8.2f}{bc}   "
                 f"{r['b_img_s']:.0f}")
    ok = [r for r in rows if "b_over_a" in r]
    summary = {"min_b_over_a": min((r["b_over_a"] for r in ok), default=None),
               "mean_b_over_a": float(np.mean([r["b_over_a"] for r in ok])) if ok else None,
               "mean_b_over_c": float(np.mean([r["b_over_c"] for r in ok if "b_over_c" in r])) if any("b_over_c" in r for r in ok) else None}
    echo(f"# (b)/(a): min {summary['min_b_over_a']}, mean {summary['mean_b_over_a']}; (b)/(c) mean {summary['mean_b_over_c']}")
    # wall time of one epoch over the corpus on N devices from (b), assuming linear DDP scaling
    # (an upper bound on speed: real scaling on one node is typically 0.9-0.95 per doubling)
    gpus = [int(g) for g in str(args.gpus).split(",") if g]
    est = {r["task"]: {n: args.corpus_slices / (r["b_img_s"] * n) / 3600 for n in gpus} for r in ok}
    if est:
        echo(f"# one epoch over {args.corpus_slices:.3g} slices (hours, linear scaling from (b)): "
             + "; ".join(f"{t}: " + ", ".join(f"{n}x {h:.1f}h" for n, h in e.items()) for t, e in est.items()))
    summary["epoch_hours"] = est
    result = {"info": info, "rows": rows, "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
