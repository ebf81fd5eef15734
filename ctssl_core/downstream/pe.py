"""Pulmonary embolism detection: a slice classifier on the encoder's pooled embedding.

Predicts ``pe_present_on_image`` per slice (RSNA STR PE); the exam score is the
mean of the top-3 slice probabilities (``evaluate.aggregate_exam``: PE is focal,
so the mean drowns it and the single max is the noisiest slice). Why SSL
should help: PE is a filling defect in contrast-enhanced vessels, and a
pretext task that forces the encoder to model vessel appearance (masked
region, next slice) gives the classifier that vocabulary before it sees a
label. Reference: Tariq et al., J. Med. Imaging 11(6):064003 (2024).

Class imbalance (~5% positive slices in RSNA): BCE with ``pos_weight`` =
negatives / positives of the *training subset* (``finetune`` sets it from the
labels; ``pos_weight=0`` means "not set" and falls back to 1).

``roi`` keeps the central square of each slice, for training and scoring
alike (slice labels would not survive a *random* crop). The pulmonary
arteries that carry emboli run from the mediastinum to the hila, so a central
square holds them while costing a fraction of the whole slice; the quick
profile uses the central 64 px of a 128-px store (checked in the tests:
every planted defect of the quick cohort lies inside it). We prefer the
weighted loss to balanced sampling because it keeps every negative slice in
each epoch (they carry the anatomy) and leaves the loader untouched.
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
from ctssl_core.tasks import TaskBatch


def random_hflip(x: Tensor, generator: torch.Generator, *others: Tensor) -> tuple[Tensor, ...]:
    """Flip half the batch left-right (same flip for image and its dense targets)."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5   # (B,)
    f = flip.view(-1, *([1] * (x.dim() - 1)))
    out = [torch.where(f, x.flip(-1), x)]
    for t in others:
        out.append(torch.where(f.view(-1, *([1] * (t.dim() - 1))), t.flip(-1), t))
    return tuple(out)


@dataclass(frozen=True)
class PETask:
    name: ClassVar[str] = "pe"
    context: ClassVar[int] = 1
    label_keys: ClassVar[tuple[str, ...]] = ("pe",)
    headline: ClassVar[str] = "exam_auroc"

    pos_weight: float = 0.0        # negatives/positives of the training subset; 0 = not set (1.0)
    hflip: bool = True             # left-right flip augmentation (chest is near-symmetric)
    exam_agg: str = "topk"         # 'topk' | 'max' | 'mean'
    topk: int = 3
    hidden: int = 0                # 0 = linear head on the embedding
    dropout: float = 0.0
    roi: int = 0                   # central roi x roi square, in training and scoring (0 = whole slice)
    pool: str = "avg"              # pooling of the deepest feature map: 'avg' (the encoder's embed) | 'max' | 'avgmax'

    def __post_init__(self) -> None:
        from ctssl_core.config import ConfigError

        if self.roi < 0:
            raise ConfigError(f"pe.roi must be >= 0 (0 = whole slice), got {self.roi}")
        if self.pool not in ops.POOLS:
            raise ConfigError(f"pe.pool must be one of {list(ops.POOLS)}, got {self.pool!r}")

    def make_batch(self, raw: dict[str, Tensor], generator: torch.Generator) -> TaskBatch:
        x = ops.center_crop(ops.slice_at(raw["x"], 0), self.roi)    # (B, C, roi, roi)
        if self.hflip:
            (x,) = random_hflip(x, generator)
        return TaskBatch(x, raw["pe"].float())                       # targets (B,)

    def eval_batch(self, raw: dict[str, Tensor]) -> TaskBatch:
        return TaskBatch(ops.center_crop(ops.slice_at(raw["x"], 0), self.roi), raw["pe"].float())

    def build_head(self, encoder: nn.Module) -> nn.Module:
        from ctssl_core.models.heads import ClassifierHead

        dim = encoder.embed_dim * (2 if self.pool == "avgmax" else 1)
        return ClassifierHead(dim, 1, hidden=self.hidden, dropout=self.dropout)

    def forward(self, encoder: nn.Module, head: nn.Module, batch: TaskBatch) -> Tensor:
        if self.pool == "avg":
            z = encoder.embed(batch.inputs)                          # (B, C)
        else:
            z = ops.global_pool(encoder.forward_features(batch.inputs)[-1], self.pool)  # (B, C) or (B, 2C)
        return head(z).squeeze(1).float()                            # (B,) logits

    def loss(self, pred: Tensor, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        pw = torch.tensor(self.pos_weight if self.pos_weight > 0 else 1.0, device=pred.device)
        loss = F.binary_cross_entropy_with_logits(pred.float(), batch.targets, pos_weight=pw)
        return loss, {}

    def predict(self, pred: Tensor) -> Tensor:
        return torch.sigmoid(pred.float())                           # (B,) probabilities

    # ---------------------------------------------------------------- scoring
    def metric_fns(self) -> dict[str, bool]:
        """metric -> higher is better."""
        return {"slice_auroc": True, "slice_auroc_zstrat": True, "exam_auroc": True, "auprc": True,
                "sens_at_90spec": True, "rsna_wll": False}

    def stat_fn(self, out: dict[str, np.ndarray]):
        """drawn patient positions -> every metric, for ``evaluate.bootstrap_multi``.

        ``out`` has per-slice ``prob``, ``target``, ``exam`` (series key) and
        ``patient`` and ``order`` (the slice's z index in its series, ``scoring.row_keys``).
        ``slice_auroc_zstrat`` compares a positive and a negative slice only when
        they lie in the same decile of relative z-position within their exams
        (``evaluate.stratified_auroc``): emboli sit at the level of the
        pulmonary arteries, so plain slice AUROC rewards knowing the level; a
        score that only knows the level gets 0.5 here. Exam label = any positive slice; the RSNA log loss uses the
        image labels plus ``negative_exam_for_pe`` (1 - exam score), the labels
        our slice model predicts. Exams are resampled whole with their patient,
        so each exam's score and log-loss terms are computed once; a replicate
        only reweights them (``stat.batch`` does all replicates at once).
        """
        if "order" not in out:
            raise ValueError("PE scoring needs each slice's z index in its series (out['order'], from "
                             "scoring.row_keys) for the position-stratified slice AUROC")
        patients, slice_pat = np.unique(out["patient"], return_inverse=True)
        zbin = ev.position_strata(out["exam"], out["order"])          # (N,) z-decile within the exam
        prob, y = np.asarray(out["prob"], np.float64), np.asarray(out["target"], np.float64)
        exams, escore = ev.aggregate_exam(out["exam"], prob, self.exam_agg, self.topk)
        _, elabel = ev.aggregate_exam(out["exam"], y, "max")
        exam_pos = {e: i for i, e in enumerate(exams)}
        slice_exam = np.array([exam_pos[e] for e in out["exam"]], dtype=np.int64)
        exam_pat = np.zeros(exams.size, dtype=np.int64)
        exam_pat[slice_exam] = slice_pat
        # RSNA weighted log loss, split into per-exam numerator/denominator terms (see rsna_weighted_log_loss)
        n_img = np.bincount(slice_exam, minlength=exams.size).astype(np.float64)
        n_pos = np.bincount(slice_exam, weights=(y > 0.5).astype(np.float64), minlength=exams.size)
        q = n_pos / n_img
        bce_img = np.bincount(slice_exam, weights=ev.metrics._bce(y, prob), minlength=exams.size)
        we = ev.RSNA_EXAM_WEIGHTS["negative_exam_for_pe"]
        num = ev.RSNA_IMAGE_WEIGHT * q * bce_img + we * ev.metrics._bce(1.0 - elabel, 1.0 - escore)
        den = ev.RSNA_IMAGE_WEIGHT * q * n_img + we

        def batch(counts: np.ndarray) -> dict[str, np.ndarray]:
            ws = counts[:, slice_pat]                               # (R, N) slice weights
            we_ = counts[:, exam_pat]                               # (R, E) exam weights
            sl = ev.weighted_ranking_metrics(y, prob, ws, 0.9)
            ex = ev.weighted_ranking_metrics(elabel, escore, we_, 0.9)
            with np.errstate(invalid="ignore", divide="ignore"):
                wll = (we_ @ num) / (we_ @ den)
            return {"slice_auroc": sl["auroc"], "slice_auroc_zstrat": ev.stratified_auroc(y, prob, zbin, ws),
                    "exam_auroc": ex["auroc"], "auprc": sl["auprc"],
                    "sens_at_90spec": sl["sens_at_spec"], "rsna_wll": wll}

        def stat(drawn: np.ndarray) -> dict[str, float]:
            counts = np.bincount(drawn, minlength=patients.size)[None].astype(np.float64)
            return {k: float(v[0]) for k, v in batch(counts).items()}

        stat.batch = batch
        return stat
