"""Denoising: add noise to the slice and predict the clean slice.

Predicts: the clean windowed slice from a noisy copy, loss on all pixels. Noise:
salt-and-pepper (the paper's choice; ``amount`` = fraction of pixels set to 0 or 1)
or Gaussian (``sigma`` in windowed units, clipped to [0, 1]). Why it helps CT:
separating structure from noise needs a prior over anatomy and texture, the
same prior low-dose CT denoisers learn. Reference: Vincent et al. 2008; Tariq et
al. 2024 (denoising strategy). The amount is our choice: the paper does not say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ctssl_core.ops import gaussian_noise, salt_pepper, slice_at
from ctssl_core.pretext.base import DenseTask, check_range, raw_x
from ctssl_core.pretext.losses import reconstruction_loss
from ctssl_core.tasks import TaskBatch


@dataclass(frozen=True)
class Denoise(DenseTask):
    noise: Literal["salt_pepper", "gaussian"] = "salt_pepper"
    amount: float = 0.05             # salt-and-pepper: fraction of corrupted pixels
    sigma: float = 0.1               # gaussian: noise standard deviation
    loss_type: Literal["mse", "paper"] = "mse"
    vq_weight: float = 0.8

    name: ClassVar[str] = "denoise"

    def __post_init__(self) -> None:
        check_range(self.name, "amount", self.amount, 0.0, 1.0)
        check_range(self.name, "sigma", self.sigma, 0.0, float("inf"))

    def make_batch(self, raw: dict[str, Tensor], generator: torch.Generator) -> TaskBatch:
        x = slice_at(raw_x(raw, 1, self.name), 0)                             # (B, C, H, W), C windows
        if self.noise == "salt_pepper":
            inputs = salt_pepper(x, self.amount, generator)
        else:
            inputs = gaussian_noise(x, self.sigma, generator)
        return TaskBatch(inputs=inputs, targets=x, mask=None)

    def loss(self, pred: Tensor, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return reconstruction_loss(pred, batch.targets, None, kind=self.loss_type, vq_weight=self.vq_weight)
