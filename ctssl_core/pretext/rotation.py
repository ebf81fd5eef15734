"""Rotation classification: rotate each slice by 0/90/180/270 degrees and classify which.

Predicts: the rotation class k (4-way cross-entropy) from the pooled embedding.
Why it helps CT: recognising which way is "up" needs a global model of thoracic
anatomy (spine posterior, heart left, table). Reference: Gidaris et al. 2018
(RotNet); Tariq et al. 2024 (rotation strategy). Needs square slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ctssl_core.ops import rot90_batch, slice_at
from ctssl_core.pretext.base import ClassifyTask, raw_x
from ctssl_core.tasks import TaskBatch


@dataclass(frozen=True)
class Rotation(ClassifyTask):
    name: ClassVar[str] = "rotation"

    def make_batch(self, raw: dict[str, Tensor], generator: torch.Generator) -> TaskBatch:
        x = slice_at(raw_x(raw, 1, self.name), 0)                             # (B, C, H, W), C windows
        k = self.draw_labels(x, generator)                                    # (B,) in 0..3
        return TaskBatch(inputs=rot90_batch(x, k), targets=k, mask=None)
