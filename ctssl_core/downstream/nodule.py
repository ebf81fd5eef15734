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

Scoring is lesion-level first (``headline = "cpm"``): LUNA16's CPM and the
sensitivity at 1 false positive per scan, from 3-D candidate components of the
probability map (``evaluate.froc``), and the per-exam volume Dice. Slice Dice
stays as a secondary number: it can be won by painting the slices that have a
nodule without finding the nodules a reader would count.
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
    headline: ClassVar[str] = "cpm"           # lesion-level (LUNA16 CPM); slice Dice is secondary

    dice_weight: float = 1.0
    bce_weight: float = 1.0
    hflip: bool = True
    threshold: float = 0.5         # probability -> mask, for the Dice metrics
    cand_threshold: float = 0.05   # FROC candidates: 3-D components of prob >= this, scored by their max
    prior: float = 0.01            # initial foreground probability of the output layer (0 = leave it)
    crop: int = 0                  # train on crop x crop squares (0 = whole slices); evaluation always
                                   # sees whole slices (the decoder is fully convolutional)
    focus: float = 0.5             # with crop: share of crops placed around a nodule pixel when the slice has one

    def __post_init__(self) -> None:
        from ctssl_core.config import ConfigError

        if self.crop < 0 or self.crop % 16:
            raise ConfigError(f"nodule.crop must be 0 or a multiple of 16 (the encoder's stride), got {self.crop}")
        if not 0.0 < self.cand_threshold <= 1.0:
            raise ConfigError(f"nodule.cand_threshold must be in (0, 1], got {self.cand_threshold}")
        if not 0.0 <= self.focus <= 1.0:
            raise ConfigError(f"nodule.focus must be in [0, 1], got {self.focus}")

    def make_batch(self, raw: dict[str, Tensor], generator: torch.Generator) -> TaskBatch:
        x, m = ops.slice_at(raw["x"], 0), raw["nodule"].float()     # (B, C, H, W), (B, 1, H, W)
        if self.crop and self.crop < min(x.shape[-2:]):
            top, left = ops.crop_offsets(x.shape, self.crop, generator, focus=m, focus_prob=self.focus)
            x, m = ops.crop(x, top, left, self.crop), ops.crop(m, top, left, self.crop)  # (B, 1, c, c)
        if self.hflip:
            x, m = random_hflip(x, generator, m)
        return TaskBatch(x, m)

    def eval_batch(self, raw: dict[str, Tensor]) -> TaskBatch:
        return TaskBatch(ops.slice_at(raw["x"], 0), raw["nodule"].float())

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
        """metric -> higher is better. Lesion metrics first: slice Dice is a secondary number."""
        return {"cpm": True, "lesion_sens_at_1fp": True, "exam_dice": True,
                "dice": True, "iou": True, "nodule_dice": True, "nodule_iou": True}

    def per_exam(self, out: dict[str, np.ndarray]) -> dict:
        """Everything scoring needs, computed once per exam (3-D components of its z-ordered slices).

        Slice level: ``slice_dice``/``slice_iou`` and ``active`` (slices where
        the truth or the prediction has a nodule pixel: ``dice``/``iou`` average
        those, so false positives count and empty-vs-empty does not). Nodule
        level: ``per_nodule_dice`` of each true 3D nodule. Exam level: the
        exam's detections for the FROC (``evaluate.froc``; candidates from the
        probability map at ``cand_threshold``) and its whole-volume Dice
        (``nan`` for an exam without a nodule: it is left out of ``exam_dice``,
        its false positives count in the FROC instead). ``collect_outputs`` keeps
        probabilities as float16 (steps of ~5e-4 near 1): near-equal candidate
        scores may tie, and tied scores are one operating point of the FROC.
        """
        prob = np.asarray(out["prob"])
        prob = prob.astype(np.float32) if prob.dtype != bool else prob
        pred = prob >= self.threshold                                 # (N, H, W)
        tgt = np.asarray(out["target"]) > 0.5
        d, j = ev.dice_iou_per_slice(pred, tgt)
        patients, slice_pat = np.unique(out["patient"], return_inverse=True)
        nd, nj, npat, dets, edice, epat = [], [], [], [], [], []
        for s in np.unique(out["exam"]):
            rows = np.flatnonzero(out["exam"] == s)
            rows = rows[np.argsort(out["order"][rows], kind="stable")]  # slices in z order
            a, b = ev.per_nodule_dice(pred[rows], tgt[rows])
            nd.extend(a.tolist()); nj.extend(b.tolist())
            npat.extend([slice_pat[rows[0]]] * len(a))
            dets.append(ev.exam_detections(prob[rows], tgt[rows], self.cand_threshold))
            edice.append(ev.exam_dice(pred[rows], tgt[rows]))
            epat.append(slice_pat[rows[0]])
        # slices empty in truth and prediction are trivially right; they would swamp the mean
        active = tgt.reshape(len(tgt), -1).any(1) | pred.reshape(len(pred), -1).any(1)
        return {"patients": patients, "slice_pat": slice_pat, "slice_dice": d, "slice_iou": j, "active": active,
                "nodule_dice": np.asarray(nd, float), "nodule_iou": np.asarray(nj, float),
                "nodule_pat": np.asarray(npat, np.int64), "detections": dets,
                "exam_dice": np.asarray(edice, float), "exam_pat": np.asarray(epat, np.int64)}

    def stat_fn(self, out: dict[str, np.ndarray]):
        """drawn patient positions -> every metric, for ``evaluate.bootstrap_multi``.

        Exams are resampled whole with their patient, so per-exam work (3-D
        components, FROC candidates) is done once here; a replicate only
        reweights slices, nodules and exams (``stat.batch`` does all replicates
        at once: one sort of the candidate scores for the whole bootstrap).
        """
        r = self.per_exam(out)
        act = r["active"].astype(np.float64)
        has = ~np.isnan(r["exam_dice"])
        edice = np.where(has, r["exam_dice"], 0.0)
        i1 = ev.CPM_FP_RATES.index(1.0)

        def wmean(w: np.ndarray, v: np.ndarray, keep: np.ndarray) -> np.ndarray:
            den = w @ keep
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(den > 0, (w @ (v * keep)) / np.where(den > 0, den, 1), np.nan)

        def batch(counts: np.ndarray) -> dict[str, np.ndarray]:
            ws = counts[:, r["slice_pat"]]                          # (R, N) slice weights
            wn = counts[:, r["nodule_pat"]]                         # (R, L) nodule weights
            we = counts[:, r["exam_pat"]]                           # (R, E) exam weights
            sens = ev.froc_batch(r["detections"], we)               # (R, 7) at CPM_FP_RATES
            ones = np.ones(len(r["nodule_pat"]))
            return {"cpm": sens.mean(1), "lesion_sens_at_1fp": sens[:, i1],
                    "exam_dice": wmean(we, edice, has.astype(np.float64)),
                    "dice": wmean(ws, r["slice_dice"], act), "iou": wmean(ws, r["slice_iou"], act),
                    "nodule_dice": wmean(wn, r["nodule_dice"], ones), "nodule_iou": wmean(wn, r["nodule_iou"], ones)}

        def stat(drawn: np.ndarray) -> dict[str, float]:
            counts = np.bincount(drawn, minlength=r["patients"].size)[None].astype(np.float64)
            return {k: float(v[0]) for k, v in batch(counts).items()}

        stat.batch = batch
        return stat
