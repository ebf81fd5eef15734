"""Masked-region reconstruction: hide square(s) of the slice and reconstruct them.

Predicts: the original windowed slice from a copy with ``n_patches`` squares of side
``frac_side`` zeroed (paper default: one square, 5% of the side; 5/10/20/33% tried).
Why it helps CT: filling a hidden patch from its surroundings forces the encoder to
model anatomy's local continuity; in Tariq et al. 2024 it was the best strategy for
PE detection. Loss: MSE on the hidden pixels (+ ``whole_weight`` x MSE on the whole
image), or ``loss_type="paper"``: 0.2 MSE(image) + 0.2 MSE(masked) + 0.8 VQ - 0.1 SSIM,
the released code's composite (VQ term when the encoder is ``paper``).
Reference: Tariq et al., J. Med. Imaging 11(6):064003 (2024); Pathak et al. 2016.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ctssl_core.ops import slice_at, square_mask
from ctssl_core.pretext.base import DenseTask, check_range, raw_x
from ctssl_core.pretext.losses import reconstruction_loss
from ctssl_core.tasks import TaskBatch


@dataclass(frozen=True)
class MaskedRegion(DenseTask):
    frac_side: float = 0.05          # square side as a fraction of the shorter image side
    n_patches: int = 1               # >1: the multi-patch variant (squares may overlap)
    fill: float = 0.0                # value written into the hidden squares (paper: 0)
    loss_type: Literal["mse", "paper"] = "mse"
    whole_weight: float = 0.0        # weight of the whole-image MSE next to the hidden-pixel MSE
    vq_weight: float = 0.8           # weight of the VQ loss when the head is the paper's VQ-VAE

    name: ClassVar[str] = "masked_region"

    def __post_init__(self) -> None:
        check_range(self.name, "frac_side", self.frac_side, 0.0, 1.0, lo_open=True)
        check_range(self.name, "n_patches", self.n_patches, 1, 10_000)
        check_range(self.name, "whole_weight", self.whole_weight, 0.0, float("inf"))

    def make_batch(self, raw: dict[str, Tensor], generator: torch.Generator) -> TaskBatch:
        x = slice_at(raw_x(raw, 1, self.name), 0)                             # (B, C, H, W), C windows
        mask = square_mask(x.shape, self.frac_side, self.n_patches, generator, x.device)  # (B, 1, H, W)
        inputs = x.masked_fill(mask.bool(), self.fill)                     # hidden squares := fill
        return TaskBatch(inputs=inputs, targets=x, mask=mask)

    def loss(self, pred: Tensor, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return reconstruction_loss(pred, batch.targets, batch.mask, kind=self.loss_type,
                                   whole_weight=self.whole_weight, vq_weight=self.vq_weight)
