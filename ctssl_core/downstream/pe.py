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
labels; ``pos_weight=0`` means "not set" and falls back to 1). We prefer the
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

    def make_batch(self, raw: dict[str, Tensor], generator: torch.Generator) -> TaskBatch:
        x = raw["x"][:, :1]                                          # (B, 1, H, W)
        if self.hflip:
            (x,) = random_hflip(x, generator)
        return TaskBatch(x, raw["pe"].float())                       # targets (B,)

    def eval_batch(self, raw: dict[str, Tensor]) -> TaskBatch:
        return TaskBatch(raw["x"][:, :1], raw["pe"].float())

    def build_head(self, encoder: nn.Module) -> nn.Module:
        from ctssl_core.models.heads import ClassifierHead

        return ClassifierHead(encoder.embed_dim, 1, hidden=self.hidden, dropout=self.dropout)

    def forward(self, encoder: nn.Module, head: nn.Module, batch: TaskBatch) -> Tensor:
        return head(encoder.embed(batch.inputs)).squeeze(1).float()  # (B,) logits

    def loss(self, pred: Tensor, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        pw = torch.tensor(self.pos_weight if self.pos_weight > 0 else 1.0, device=pred.device)
        loss = F.binary_cross_entropy_with_logits(pred.float(), batch.targets, pos_weight=pw)
        return loss, {}

    def predict(self, pred: Tensor) -> Tensor:
        return torch.sigmoid(pred.float())                           # (B,) probabilities

    # ---------------------------------------------------------------- scoring
    def metric_fns(self) -> dict[str, bool]:
        """metric -> higher is better."""
        return {"slice_auroc": True, "exam_auroc": True, "auprc": True, "sens_at_90spec": True,
                "rsna_wll": False}

    def stat_fn(self, out: dict[str, np.ndarray]):
        """drawn patient positions -> every metric, for ``evaluate.bootstrap_multi``.

        ``out`` has per-slice ``prob``, ``target``, ``exam`` (series key) and
        ``patient``. Exam label = any positive slice; the RSNA log loss uses the
        image labels plus ``negative_exam_for_pe`` (1 - exam score), the labels
        our slice model predicts.
        """
        patients = np.unique(out["patient"])
        idx = ev.RowIndex(out["patient"], patients)
        prob, y = out["prob"], out["target"]
        exam_code = np.unique(out["exam"], return_inverse=True)[1].astype(np.int64)
        n_exam = int(exam_code.max()) + 1 if exam_code.size else 1

        def stat(drawn: np.ndarray) -> dict[str, float]:
            r = idx.rows(drawn)
            # a patient drawn twice must count as two exams: make exam ids unique per draw copy
            copy = np.repeat(np.arange(drawn.size), idx.counts[drawn])
            ex = copy * n_exam + exam_code[r]
            p, t = prob[r], y[r]
            ids, escore = ev.aggregate_exam(ex, p, self.exam_agg, self.topk)
            _, elabel = ev.aggregate_exam(ex, t, "max")
            res = {
                "slice_auroc": ev.auroc(t, p),
                "exam_auroc": ev.auroc(elabel, escore),
                "auprc": ev.auprc(t, p),
                "sens_at_90spec": ev.sensitivity_at_specificity(t, p, 0.9),
                "rsna_wll": ev.rsna_weighted_log_loss(
                    ex, t, p, {"negative_exam_for_pe": 1.0 - elabel}, {"negative_exam_for_pe": 1.0 - escore}),
            }
            return res

        return stat
