"""The one task contract shared by pretext (self-supervised) and downstream tasks.

A task is a frozen dataclass of its hyperparameters. The data pipeline hands it
a *raw batch* already on the training device; the task turns it into model
inputs and targets with pure tensor ops (``ops.py``), builds its head on top of
an encoder, and computes its loss. The same snake_case key names the task in
YAML, in DuckDB and in the UI.

Raw batch (dict of tensors on the device), built by ``data/loader.py``:
    "x"        float32 (B, S, H, W) windowed to [0, 1]. S = task.context:
               1 for single-slice tasks; 2 for next_slice ([:, 0] = slice n,
               [:, 1] = slice n + gap).
    "hu"       int16 (B, S, H, W) raw HU (only if task.wants_hu).
    "pe"       float32 (B,) slice PE label (downstream pe).
    "nodule"   float32 (B, 1, H, W) nodule mask (downstream nodule).
    "age", "sex", "race" float32/long (B,) (downstream demographics).
    "slice_id" int64 (B,) global slice ids; "patient_idx" int64 (B,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class TaskBatch:
    inputs: Tensor              # (B, C, H, W) float, what the model sees
    targets: Tensor             # (B,) long for classes | (B, C, H, W) float for dense targets
    mask: Tensor | None = None  # (B, 1, H, W) float weights for dense losses, or None


@runtime_checkable
class Task(Protocol):
    name: str                        # registry key
    context: int                     # slices per sample the task needs (1, or 2 for next_slice)
    label_keys: tuple[str, ...]      # raw-batch label keys it needs (() for pretext tasks)

    def make_batch(self, raw: dict[str, Tensor], generator: torch.Generator) -> TaskBatch: ...

    def build_head(self, encoder: nn.Module) -> nn.Module: ...

    def forward(self, encoder: nn.Module, head: nn.Module, batch: TaskBatch) -> Tensor: ...

    # metric values: floats or detached 0-d tensors (kept on the device: no sync per step; float(v) reads one)
    def loss(self, pred: Tensor, batch: TaskBatch) -> tuple[Tensor, dict[str, float | Tensor]]: ...
