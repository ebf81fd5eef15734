"""Next-slice prediction: from slice n, predict slice n + gap of the same series.

Predicts: by default the *residual* ``x[n+gap] - x[n]`` (``target="residual"``), else the
slice itself (``target="slice"``). Why residual: neighbouring CT slices are nearly
identical, so with a plain target a network that copies its input already scores a
low loss and learns little; with the residual target copying the input is the
zero prediction and earns no credit, so any loss below ``copy_mse`` (logged: the
loss of predicting zero residual = of copying the neighbour) is learned anatomy
(how structures continue along z). Gap 1, 3 or 5 as in the paper's code.
Reference: Tariq et al. 2024 (next-slice strategy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ctssl_core.ops import slice_at
from ctssl_core.pretext.base import DenseTask, check_range, raw_x
from ctssl_core.pretext.losses import reconstruction_loss, to_logs
from ctssl_core.tasks import TaskBatch


@dataclass(frozen=True)
class NextSlice(DenseTask):
    gap: int = 1                                  # slices between input and target (paper: 1, 3 or 5)
    target: Literal["residual", "slice"] = "residual"
    loss_type: Literal["mse", "paper"] = "mse"
    vq_weight: float = 0.8

    name: ClassVar[str] = "next_slice"
    context: ClassVar[int] = 2                    # raw["x"][:, 0] = slice n, [:, 1] = slice n + gap

    def __post_init__(self) -> None:
        check_range(self.name, "gap", self.gap, 1, 10_000)

    def make_batch(self, raw: dict[str, Tensor], generator: torch.Generator) -> TaskBatch:
        x = raw_x(raw, 2, self.name)
        inputs, nxt = slice_at(x, 0), slice_at(x, 1)                         # (B, C, H, W) each
        targets = nxt - inputs if self.target == "residual" else nxt
        return TaskBatch(inputs=inputs, targets=targets, mask=None)

    def loss(self, pred: Tensor, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        data_range = 2.0 if self.target == "residual" else 1.0
        loss, logs = reconstruction_loss(pred, batch.targets, None, kind=self.loss_type,
                                         vq_weight=self.vq_weight, data_range=data_range)
        # MSE of copying slice n as the prediction of slice n + gap: the shortcut baseline.
        copy = batch.targets if self.target == "residual" else batch.targets - batch.inputs
        logs.update(to_logs({"copy_mse": copy.float().pow(2).mean()}))
        return loss, logs
