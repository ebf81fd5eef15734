"""Lung nodule segmentation: the encoder under a U-Net decoder (``build_dense_head``).

Predicts the LIDC consensus (50% agreement) nodule mask per pixel. Why SSL
should help: nodules are small bright blobs whose meaning depends on the
surrounding lung; a decoder on features that already separate vessels,
airways and nodules learns faster (the paper reports ~2x). Loss = soft Dice +
BCE: Dice handles the extreme foreground rarity (nodule pixels << 1%), BCE
keeps gradients sane on slices without a nodule. With ``crop``, training sees
small squares, ``focus`` of them around a nodule: ~16x cheaper per sample than
a whole 128-px slice and far less background, which is what makes the task
learnable on a CPU budget; scoring is still on whole slices. Reference: Tariq et al. 2024;
Milletari et al. 2016 (V-Net Dice loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctssl_core import evaluate as ev
from ctssl_core import ops
from ctssl_core.downstream.pe import random_hflip
from ctssl_core.tasks import TaskBatch


def soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """1 - soft Dice over the whole batch (B, 1, H, W); batch-level so empty slices don't blow up."""
    p = torch.sigmoid(logits.float())
    inter = (p * target).sum()
    return 1.0 - (2.0 * inter + eps) / (p.sum() + target.sum() + eps)


def init_output_bias(head: nn.Module, prior: float) -> None:
    """Start the last 1-channel conv at ``logit(prior)`` (Lin et al. 2017, focal-loss prior).

    With a zero bias every pixel starts at p = 0.5, so the thresholded mask is
    the whole image and Dice is ~0 until BCE has pushed millions of background
    pixels down; starting near the true foreground rate lets the first steps
    learn where nodules are instead. Same for every init, so it favours none.
    """
    if not prior:
        return
    last = [m for m in head.modules() if isinstance(m, nn.Conv2d) and m.out_channels == 1 and m.bias is not None]
    if last:
        with torch.no_grad():
            last[-1].bias.fill_(float(np.log(prior / (1 - prior))))


@dataclass(frozen=True)
class NoduleTask:
    name: ClassVar[str] = "nodule"
    context: ClassVar[int] = 1
    label_keys: ClassVar[tuple[str, ...]] = ("nodule",)
    headline: ClassVar[str] = "dice"

    dice_weight: float = 1.0
    bce_weight: float = 1.0
    hflip: bool = True
    threshold: float = 0.5
    prior: float = 0.01            # initial foreground probability of the output layer (0 = leave it)
    crop: int = 0                  # train on crop x crop squares (0 = whole slices); evaluation always
                                   # sees whole slices (the decoder is fully convolutional)
    focus: float = 0.5             # with crop: share of crops placed around a nodule pixel when the slice has one

    def __post_init__(self) -> None:
        from ctssl_core.config import ConfigError

        if self.crop < 0 or self.crop % 16:
            raise ConfigError(f"nodule.crop must be 0 or a multiple of 16 (the encoder's stride), got {self.crop}")
        if not 0.0 <= self.focus <= 1.0:
            raise ConfigError(f"nodule.focus must be in [0, 1], got {self.focus}")

    def make_batch(self, raw: dict[str, Tensor], generator: torch.Generator) -> TaskBatch:
        x, m = raw["x"][:, :1], raw["nodule"].float()               # (B, 1, H, W) each
        if self.crop and self.crop < min(x.shape[-2:]):
            top, left = ops.crop_offsets(x.shape, self.crop, generator, focus=m, focus_prob=self.focus)
            x, m = ops.crop(x, top, left, self.crop), ops.crop(m, top, left, self.crop)  # (B, 1, c, c)
        if self.hflip:
            x, m = random_hflip(x, generator, m)
        return TaskBatch(x, m)

    def eval_batch(self, raw: dict[str, Tensor]) -> TaskBatch:
        return TaskBatch(raw["x"][:, :1], raw["nodule"].float())

    def build_head(self, encoder: nn.Module) -> nn.Module:
        from ctssl_core.models.heads import build_dense_head

        head = build_dense_head(encoder, 1)
        init_output_bias(head, self.prior)
        return head

    def forward(self, encoder: nn.Module, head: nn.Module, batch: TaskBatch):
        from ctssl_core.models.heads import dense_forward

        pred, aux = dense_forward(head, encoder.forward_features(batch.inputs), batch.inputs.shape[-2:])
        return (pred, aux) if aux is not None else pred               # (B, 1, H, W) logits

    def loss(self, pred, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        aux = None
        if isinstance(pred, tuple):
            pred, aux = pred
        d = soft_dice_loss(pred, batch.targets)
        b = F.binary_cross_entropy_with_logits(pred.float(), batch.targets)
        loss = self.dice_weight * d + self.bce_weight * b
        parts = {"dice_loss": d.detach(), "bce": b.detach()}
        if aux is not None:
            loss = loss + aux.float()
            parts["vq"] = aux.detach()
        return loss, parts

    def predict(self, pred) -> Tensor:
        if isinstance(pred, tuple):
            pred = pred[0]
        return torch.sigmoid(pred.float())[:, 0]                      # (B, H, W)

    # ---------------------------------------------------------------- scoring
    def metric_fns(self) -> dict[str, bool]:
        return {"dice": True, "iou": True, "nodule_dice": True, "nodule_iou": True}

    def per_row(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-slice Dice/IoU and per-nodule Dice/IoU (3D components per series).

        ``dice``/``iou`` average the slices where the truth or the prediction
        has a nodule pixel (false positives count, empty-vs-empty does not);
        ``nodule_dice`` scores each true 3D nodule (``per_nodule_dice``).
        """
        pred = out["prob"] >= self.threshold                          # (N, H, W)
        tgt = out["target"] > 0.5
        d, j = ev.dice_iou_per_slice(pred, tgt)
        nd, nj, npat = [], [], []
        for s in np.unique(out["exam"]):
            rows = np.flatnonzero(out["exam"] == s)
            rows = rows[np.argsort(out["order"][rows], kind="stable")]  # slices in z order
            a, b = ev.per_nodule_dice(pred[rows], tgt[rows])
            nd.extend(a.tolist()); nj.extend(b.tolist())
            npat.extend([out["patient"][rows[0]]] * len(a))
        # slices empty in truth and prediction are trivially right; they would swamp the mean
        active = tgt.reshape(len(tgt), -1).any(1) | pred.reshape(len(pred), -1).any(1)
        return {"slice_dice": d, "slice_iou": j, "active": active,
                "nodule_dice": np.asarray(nd), "nodule_iou": np.asarray(nj), "nodule_patient": np.asarray(npat)}

    def stat_fn(self, out: dict[str, np.ndarray]):
        rows = self.per_row(out)
        patients = np.unique(out["patient"])
        sidx = ev.RowIndex(out["patient"], patients)
        nidx = ev.RowIndex(rows["nodule_patient"], patients) if len(rows["nodule_patient"]) else None

        def mean(a):
            return float(np.mean(a)) if len(a) else float("nan")

        def stat(drawn: np.ndarray) -> dict[str, float]:
            r = sidx.rows(drawn)
            act = rows["active"][r]
            res = {"dice": mean(rows["slice_dice"][r][act]), "iou": mean(rows["slice_iou"][r][act])}
            n = nidx.rows(drawn) if nidx is not None else np.zeros(0, dtype=np.int64)
            res["nodule_dice"] = mean(rows["nodule_dice"][n])
            res["nodule_iou"] = mean(rows["nodule_iou"][n])
            return res

        return stat
