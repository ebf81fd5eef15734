"""Flip classification: flip each slice none / left-right / up-down / both and classify which.

Predicts: the flip code (0 none, 1 LR, 2 UD, 3 both; 4-way cross-entropy) from the
pooled embedding. Why it helps CT: the chest is nearly but not exactly symmetric
left-right (heart, aorta, liver), so telling a mirrored slice needs those
asymmetric organs. Reference: Tariq et al. 2024 (flip strategy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ctssl_core.ops import flip_batch, slice_at
from ctssl_core.pretext.base import ClassifyTask, raw_x
from ctssl_core.tasks import TaskBatch


@dataclass(frozen=True)
class Flip(ClassifyTask):
    name: ClassVar[str] = "flip"

    def make_batch(self, raw: dict[str, Tensor], generator: torch.Generator) -> TaskBatch:
        x = slice_at(raw_x(raw, 1, self.name), 0)                             # (B, C, H, W), C windows
        code = self.draw_labels(x, generator)                                 # (B,) in 0..3
        return TaskBatch(inputs=flip_batch(x, code), targets=code, mask=None)
