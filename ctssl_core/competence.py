"""Pretext competence: does a pretraining beat the trivial solution of its own task?

Why: a pretext task that a shortcut solves teaches nothing, and then "no downstream gain" says
nothing about the strategy. Each task is scored on held-out slices (never pretrained on) against
its trivial baseline, with the same inputs and targets:

===============  =========================================  ====================================
task             error                                      trivial baseline
===============  =========================================  ====================================
rotation, flip   1 - accuracy                               chance: 1 - 1/n_classes
next_slice       MSE of the predicted target                copying slice n (zero residual)
masked_region    MSE inside the hidden squares              fill each square with the mean of
                                                            the one-pixel ring around it
denoise          MSE of the restored slice                  3x3 median filter of the noisy input
===============  =========================================  ====================================

``beats`` = the 95% bootstrap CI (over held-out slices) of baseline error minus model error lies
above 0. A strategy that does not clearly beat its baseline is flagged in the summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

BASELINE_NAMES = {"rotation": "chance", "flip": "chance", "next_slice": "copy the neighbour",
                  "masked_region": "neighbourhood fill", "denoise": "3x3 median filter"}


def ring_fill(inputs: Tensor, mask: Tensor) -> Tensor:
    """``inputs`` (B, C, H, W) with the masked pixels set to the mean of the 1-px ring around them."""
    ring = (F.max_pool2d(mask, 3, stride=1, padding=1) - mask).clamp_(0, 1)              # (B, 1, H, W)
    mean = (inputs * ring).sum((2, 3), keepdim=True) / ring.sum((2, 3), keepdim=True).clamp_min(1)  # (B, C, 1, 1)
    return torch.where(mask.bool(), mean.expand_as(inputs), inputs)


def median3(x: Tensor) -> Tensor:
    """3x3 median filter (replicate borders) of (B, C, H, W)."""
    b, c, h, w = x.shape
    patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3)                   # (B, C*9, H*W)
    return patches.view(b, c, 9, h * w).median(dim=2).values.view(b, c, h, w)


def errors(task: Any, pred: Tensor, batch) -> tuple[Tensor, Tensor]:
    """(model error, baseline error), each (B,), for one pretext batch."""
    name = task.name
    if name in ("rotation", "flip"):
        model = (pred.argmax(1) != batch.targets).float()                              # (B,)
        return model, torch.full_like(model, 1.0 - 1.0 / task.n_classes)
    if name == "next_slice":
        base = torch.zeros_like(batch.targets) if task.target == "residual" else batch.inputs
    elif name == "masked_region":
        base = ring_fill(batch.inputs, batch.mask)
        m = batch.mask                                                                 # (B, 1, H, W)
        per = lambda p: ((p - batch.targets) ** 2 * m).sum((1, 2, 3)) / (m.sum((1, 2, 3)) * p.shape[1]).clamp_min(1)
        return per(pred), per(base)
    elif name == "denoise":
        base = median3(batch.inputs)
    else:
        raise KeyError(f"no competence baseline for pretext task {name!r}; known: {sorted(BASELINE_NAMES)}")
    per = lambda p: ((p - batch.targets) ** 2).mean((1, 2, 3))
    return per(pred), per(base)


def paired_ci(model: np.ndarray, base: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Summary of baseline - model error over held-out slices with a 95% bootstrap CI."""
    d = base - model
    rng = np.random.default_rng(seed)
    reps = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(1)                    # (n_boot,)
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return {"model_error": float(model.mean()), "baseline_error": float(base.mean()), "gain": float(d.mean()),
            "ci_low": float(lo), "ci_high": float(hi), "beats": bool(lo > 0), "n": int(d.size)}


def competence(store_root: str | Path, run: str | Path, ids: np.ndarray, store=None, n_batches: int = 8,
               batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Score a finished pretraining (run id or checkpoint) on held-out slice ``ids`` against its baseline."""
    from ctssl_core import checkpoint as ck
    from ctssl_core.data.loader import SliceBatcher
    from ctssl_core.data.store import SliceStore
    from ctssl_core.pretext import make_pretext
    from ctssl_core.pretext.losses import split_aux

    store = store or SliceStore.open(store_root)
    raw_ckpt = ck.read_checkpoint(run, store_root)
    encoder, cfg = ck.load_encoder(run, store_root)
    task = make_pretext(cfg["task"], **dict(cfg.get("task_params") or {}))
    head = task.build_head(encoder)
    head.load_state_dict(raw_ckpt["head"])
    train = (cfg.get("pretrain") or {}).get("train") or {}
    bs = int(min(batch_size, len(ids)))
    from ctssl_core.pretrain import input_geometry

    image_size, crop = input_geometry(task, int(train.get("image_size") or 0), int(train.get("crop") or 0))
    loader = SliceBatcher(store, ids, bs, context=task.context, gap=task.gap or 1,
                          label_keys=tuple(task.label_keys), device="cpu", seed=seed, image_size=image_size,
                          crop=crop, wants_hu=task.wants_hu, prefetch=False, windows=encoder.windows)
    g = torch.Generator().manual_seed(seed)
    encoder.eval()
    head.eval()
    model_err, base_err = [], []
    it = iter(loader)
    with torch.no_grad():
        for _ in range(min(n_batches, len(loader))):
            batch = task.make_batch(next(it), g)
            pred, _ = split_aux(task.forward(encoder, head, batch))
            m, b = errors(task, pred, batch)
            model_err.append(m.numpy())
            base_err.append(b.numpy())
    out = paired_ci(np.concatenate(model_err), np.concatenate(base_err), seed=seed)
    return {"task": task.name, "baseline": BASELINE_NAMES[task.name], **out}
