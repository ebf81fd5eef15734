"""Tiny stand-ins shared by the training-loop tests (test_train/test_loader/test_checkpoint/test_ddp).

``make_store`` prefers the real ``SliceStore.from_arrays``; ``ArrayStore`` is a
minimal store with the same read interface for the loop's own tests, so the
loop is tested independently of the store implementation too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctssl_core.tasks import TaskBatch


def make_arrays(n_series: int = 3, n_slices: int = 10, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Series where pixel (0, 0) encodes identity: hu[n, 0, 0] = 100*series + n; a random texture elsewhere."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_series):
        vol = rng.integers(-100, 200, size=(n_slices, size, size)).astype(np.int16)  # (S, H, W)
        vol[:, 0, 0] = 100 * s + np.arange(n_slices)
        out.append(vol)
    return out


class ArrayStore:
    """The read side of SliceStore over in-memory arrays (one per series)."""

    def __init__(self, arrays: list[np.ndarray], pe: list[np.ndarray] | None = None, patient_idx: list[int] | None = None):
        self.arrays = arrays
        self.height, self.width = arrays[0].shape[1:]
        lens = [len(a) for a in arrays]
        self.n_slices = int(sum(lens))
        self.slice_ids = np.arange(self.n_slices, dtype=np.int64)
        self.series_of = np.repeat(np.arange(len(arrays), dtype=np.int32), lens)
        self.idx_in_series = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
        per_series_patient = patient_idx if patient_idx is not None else list(range(len(arrays)))
        self.patient_idx = np.repeat(np.asarray(per_series_patient, dtype=np.int64), lens)
        self._pe = np.concatenate(pe).astype(np.float32) if pe is not None else np.full(self.n_slices, np.nan, np.float32)

    def read(self, ids: np.ndarray) -> np.ndarray:
        return np.stack([self.arrays[self.series_of[i]][self.idx_in_series[i]] for i in ids])

    def read_context(self, ids: np.ndarray, gap: int) -> np.ndarray:
        a = self.read(ids)
        b = self.read(np.asarray(ids) + gap)
        return np.stack([a, b], axis=1)

    def valid_for_gap(self, gap: int) -> np.ndarray:
        lens = np.bincount(self.series_of)
        return self.idx_in_series + gap < lens[self.series_of]

    def labels(self, name: str) -> np.ndarray:
        if name == "pe":
            return self._pe
        raise KeyError(name)

    def read_mask(self, ids: np.ndarray) -> np.ndarray:
        return (self.read(ids) > 150).astype(np.uint8)


def make_store(arrays: list[np.ndarray], **kw):
    """Real SliceStore when it exists, else ArrayStore."""
    try:
        from ctssl_core.data.store import SliceStore

        return SliceStore.from_arrays(arrays, **kw)
    except ImportError:
        return ArrayStore(arrays, **kw)


class TinyEncoder(nn.Module):
    """Two convs, no BatchNorm: per-sample outputs do not depend on the batch (needed for the DDP test)."""

    name = "tiny_fake"

    def __init__(self, width: int = 8):
        super().__init__()
        self.in_chans = 1
        self.conv1 = nn.Conv2d(1, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.feature_channels = [width, 2 * width]
        self.feature_strides = [2, 4]
        self.embed_dim = 2 * width
        self.config = {"width": width}

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = F.relu(self.conv1(x))  # (B, w, H/2, W/2)
        f2 = F.relu(self.conv2(f1))  # (B, 2w, H/4, W/4)
        return [f1, f2]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[-1].mean(dim=(2, 3))  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


@dataclass(frozen=True)
class RotTask:
    """A rotation-classification task: random k per sample from the generator (so resume must restore it)."""

    name: str = "rot_fake"
    context: int = 1
    label_keys: tuple[str, ...] = ()
    scale: float = 1.0   # multiply inputs (a huge value provokes NaN in tests)

    def make_batch(self, raw, generator):
        x = raw["x"][:, :1]  # (B, 1, H, W)
        k = torch.randint(0, 4, (x.shape[0],), generator=generator, device=x.device)
        rots = torch.stack([torch.rot90(x, r, dims=(2, 3)) for r in range(4)], dim=1)  # (B, 4, 1, H, W)
        inputs = rots[torch.arange(x.shape[0], device=x.device), k] * self.scale  # (B, 1, H, W)
        return TaskBatch(inputs=inputs, targets=k)

    def build_head(self, encoder):
        return nn.Linear(encoder.embed_dim, 4)

    def forward(self, encoder, head, batch):
        return head(encoder.embed(batch.inputs))

    def loss(self, pred, batch):
        loss = F.cross_entropy(pred.float(), batch.targets)
        return loss, {"ce": loss.detach()}


class ListBatches:
    """A fixed list of raw batches, cycled, with a resumable position (like SliceBatcher)."""

    def __init__(self, batches):
        self.batches = batches
        self.pos = 0

    def state_dict(self):
        return {"position": self.pos}

    def load_state_dict(self, s):
        self.pos = s["position"]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        while True:
            b = self.batches[self.pos % len(self.batches)]
            self.pos += 1
            yield b
