"""A model's outputs on store slices, and their scores with patient-bootstrap CIs.

Why its own module: a fine-tune scores its test split with these, and ``twins.py`` scores the same
model on counterfactual twins of those patients the same way (same loader, windowing, bootstrap seed);
both build on this, neither on the other.
"""

from __future__ import annotations

import numpy as np

from ctssl_core.config import ConfigError

BOOT_SEED = 12345          # every run draws the same bootstrap patients -> paired comparisons


def collect_outputs(task, encoder, head, store, ids: np.ndarray, batch_size: int, device,
                    image_size: int = 0) -> dict[str, np.ndarray]:
    """Predictions for every id (eval mode, no augmentation) + row keys for scoring."""
    import torch

    from ctssl_core.checkpoint import unwrap
    from ctssl_core.data.loader import SliceBatcher

    ids = np.sort(np.asarray(ids, dtype=np.int64))
    if ids.size == 0:
        raise ConfigError(f"no slices to evaluate {task.name} on; does the store carry its labels?")
    was = (encoder.training, head.training)
    encoder.eval()
    head.eval()
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    bs = min(batch_size, ids.size)
    n_full = (ids.size // bs) * bs
    parts = [(ids[:n_full], bs)] + ([(ids[n_full:], ids.size - n_full)] if n_full < ids.size else [])
    try:
        with torch.no_grad():
            for part, b in parts:
                batcher = SliceBatcher(store, part, b, label_keys=task.label_keys, device=device,
                                       image_size=image_size or None, prefetch=False,
                                       windows=unwrap(encoder).windows)
                it = iter(batcher)
                for _ in range(len(batcher)):
                    raw = next(it)
                    batch = task.eval_batch(raw)
                    prob = task.predict(task.forward(encoder, head, batch))
                    prob_np = prob.cpu().numpy()
                    if prob_np.ndim == 3:                        # dense: float16 probabilities (the FROC ranks
                        prob_np = prob_np.astype(np.float16)     # candidates by them; Dice thresholds them)
                    tgt = batch.targets
                    tgt_np = (tgt[:, 0] > 0.5).cpu().numpy() if tgt.dim() == 4 else tgt.cpu().numpy()
                    chunks.append((raw["slice_id"].cpu().numpy(), prob_np, tgt_np))
    finally:
        encoder.train(was[0])
        head.train(was[1])
    sid = np.concatenate([c[0] for c in chunks])
    order = np.argsort(sid, kind="stable")
    out = {
        "slice_id": sid[order],
        "prob": np.concatenate([c[1] for c in chunks])[order],
        "target": np.concatenate([c[2] for c in chunks])[order],
    }
    return {**out, **row_keys(store, out["slice_id"])}


def row_keys(store, slice_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Scoring keys of each slice: ``patient`` (bootstrap unit), ``exam`` (series), ``order`` (z index)."""
    return {"patient": np.asarray(store.patient_idx)[slice_ids].astype(np.int64),
            "exam": np.asarray(store.series_of)[slice_ids].astype(np.int64),
            "order": np.asarray(store.idx_in_series)[slice_ids].astype(np.int64)}


def score_outputs(task, out: dict[str, np.ndarray], n_boot: int, seed: int = BOOT_SEED):
    """(metric -> CI, metric -> replicates) with patient-bootstrap CIs."""
    from ctssl_core import evaluate as ev

    stat = task.stat_fn(out)
    return ev.bootstrap_multi(stat, len(np.unique(out["patient"])), n_boot=n_boot, seed=seed)


def point_metrics(task, out: dict[str, np.ndarray]) -> dict[str, float]:
    stat = task.stat_fn(out)
    return stat(np.arange(len(np.unique(out["patient"]))))
