"""A torch ``Dataset`` over a slice store, for notebooks and other pipelines (MONAI, Lightning).

Why: the store is ctssl's one copy of the pseudonymised, HU-calibrated slices with their labels
and splits; a researcher who wants to train their own model on it (or feed a ctssl encoder) should
get the same slices, windows and patient splits the benchmark uses, not re-implement the reading.

    import ctssl_core as ct
    ds = ct.SliceDataset("data/store", split="test", windows="rsna3")
    item = ds[0]        # {"image": (C, H, W) float in [0, 1], "pe": 0./1./nan, "nodule_mask": (H, W), ...}

Items hold pseudonymous keys only (``patient_key``), never an identifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ctssl_core.config import ConfigError

SPLITS = ("pool", "train", "val", "test")


class SliceDataset(Dataset):
    """Every slice of a store (or of one patient split), windowed as a model sees it.

    ``split``: None for every slice, else one of ``SPLITS`` under the split scheme (``split_seed``,
    ``pool``, ``split_fractions``: the benchmark's ``benchmark.*`` keys of the same names give the
    benchmark's own split). ``windows``: an ``ops.WINDOWS`` preset, ``[[level, width], ...]``, or an
    encoder (its ``windows``, so the input matches what it was trained on); default the paper's
    soft-tissue window. Each item is a dict: ``image`` float32 (C, H, W) (C = number of windows),
    ``pe`` float (1 / 0, NaN when unlabelled), ``nodule_mask`` uint8 (H, W) (zeros where the series has
    no mask), ``slice_id`` int, ``patient_key`` str (a pseudonym), ``index`` int (slice index in its series).
    """

    def __init__(self, store: Any, split: str | None = None, windows: Any = None, split_seed: int = 0,
                 pool: float = 0.0, split_fractions=(0.7, 0.15, 0.15)):
        from ctssl_core import ops
        from ctssl_core.data.store import SliceStore

        if split is not None and split not in SPLITS:
            raise ConfigError(f"split must be one of {list(SPLITS)} or None (every slice), got {split!r}")
        if split == "pool" and not pool:
            raise ConfigError("split='pool' needs pool > 0 (the share of patients set apart for pretraining)")
        self.store = store if isinstance(store, SliceStore) else SliceStore.open(Path(store))
        if windows is not None and isinstance(windows, torch.nn.Module):
            windows = getattr(windows, "windows", None)
        self.windows = ops.resolve_windows(ops.DEFAULT_WINDOWS if windows is None else windows)
        ids = np.arange(len(self.store), dtype=np.int64)                       # store positions (what read takes)
        if split is not None:
            from ctssl_core.finetune import split_patient_idx

            pats = split_patient_idx(self.store, self.store.root, split_seed, pool, tuple(split_fractions))[split]
            ids = ids[np.isin(np.asarray(self.store.patient_idx), pats)]
        self.slice_ids = ids                                  # store positions, not slice ids
        self._keys = np.asarray(self.store.patients["patient_key"])

    def __len__(self) -> int:
        return int(self.slice_ids.size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from ctssl_core import ops

        if not -len(self) <= i < len(self):
            raise IndexError(f"slice {i} of a dataset of {len(self)}")
        pos = int(self.slice_ids[i])                         # a store position (labels, patients are by position)
        sid = int(np.asarray(self.store.slice_ids)[pos])     # the global slice id (what read / read_mask take)
        hu = torch.from_numpy(self.store.read([sid]).astype(np.float32))           # (1, H, W)
        x = ops.model_input(hu[:, None], self.windows)                              # (1, 1, H, W) or (1, 1, C, H, W)
        image = x[0, 0] if x.dim() == 5 else x[0]                                   # (C, H, W)
        pidx = int(np.asarray(self.store.patient_idx)[pos])
        return {"image": image, "pe": float(self.store.labels("pe")[pos]),
                "nodule_mask": torch.from_numpy(self.store.read_mask([sid])[0]),
                "slice_id": sid, "patient_key": str(self._keys[pidx]),
                "index": int(np.asarray(self.store.idx_in_series)[pos])}
