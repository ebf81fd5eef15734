"""Demographics from CT: age (regression), sex (binary), race (multi-class).

Two routes, both compared with a random-init encoder as the paper did:
(a) frozen embeddings + a linear probe: ``probe_encoder`` embeds slices and
    calls ``ctssl_core.probes`` (the one probe implementation in ctssl, also
    used by the bias analysis);
(b) fine-tuning the encoder: :class:`DemographicsTask` below, one head with
    1 (age, standardised) + 1 (sex logit) + K (race logits) outputs.
Why it matters: the paper found SSL weights gained nothing for age and sex
but ~10% for race -- a sign the representation encodes race, which a bias
audit must surface (Gichoya et al. 2022). Scored per patient: slice
predictions are averaged per patient, because these are patient attributes.
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


@dataclass(frozen=True)
class DemographicsTask:
    name: ClassVar[str] = "demographics"
    context: ClassVar[int] = 1
    label_keys: ClassVar[tuple[str, ...]] = ("age", "sex", "race")
    headline: ClassVar[str] = "race_auroc"

    n_race: int = 2                 # race classes (finetune sets it from the store's labels)
    age_mean: float = 50.0          # standardisation of the age target (finetune sets it from train)
    age_std: float = 15.0
    hflip: bool = True

    def make_batch(self, raw: dict[str, Tensor], generator: torch.Generator) -> TaskBatch:
        x = ops.slice_at(raw["x"], 0)                                # (B, C, H, W)
        if self.hflip:
            (x,) = random_hflip(x, generator)
        return self.eval_batch({**raw, "x": x})

    def eval_batch(self, raw: dict[str, Tensor]) -> TaskBatch:
        age = (raw["age"].float() - self.age_mean) / self.age_std
        targets = torch.stack([age, raw["sex"].float(), raw["race"].float()], 1)   # (B, 3), NaN/-1 unknown
        return TaskBatch(ops.slice_at(raw["x"], 0), targets)

    def build_head(self, encoder: nn.Module) -> nn.Module:
        from ctssl_core.models.heads import ClassifierHead

        return ClassifierHead(encoder.embed_dim, 2 + self.n_race)

    def forward(self, encoder: nn.Module, head: nn.Module, batch: TaskBatch) -> Tensor:
        return head(encoder.embed(batch.inputs)).float()            # (B, 2 + K)

    def loss(self, pred: Tensor, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        t = batch.targets
        age_ok = ~torch.isnan(t[:, 0])
        sex_ok = ~torch.isnan(t[:, 1])
        race = torch.nan_to_num(t[:, 2], nan=-1.0).long()
        zero = pred.sum() * 0.0
        l_age = F.smooth_l1_loss(pred[age_ok, 0], t[age_ok, 0]) if age_ok.any() else zero
        l_sex = F.binary_cross_entropy_with_logits(pred[sex_ok, 1], t[sex_ok, 1]) if sex_ok.any() else zero
        l_race = F.cross_entropy(pred[:, 2:], race.clamp_min(0), reduction="none")
        l_race = (l_race * (race >= 0)).sum() / (race >= 0).sum().clamp_min(1)
        return l_age + l_sex + l_race, {"age": l_age.detach(), "sex": l_sex.detach(), "race": l_race.detach()}

    def predict(self, pred: Tensor) -> Tensor:
        """(B, 2 + K): age in years, P(sex = M), race probabilities."""
        age = pred[:, :1] * self.age_std + self.age_mean
        return torch.cat([age, torch.sigmoid(pred[:, 1:2]), torch.softmax(pred[:, 2:], 1)], 1)

    # ---------------------------------------------------------------- scoring
    def metric_fns(self) -> dict[str, bool]:
        return {"age_mae": False, "age_r2": True, "sex_auroc": True, "race_auroc": True}

    def stat_fn(self, out: dict[str, np.ndarray]):
        """Patient-level metrics: slice predictions (``prob`` (N, 2+K)) averaged per patient."""
        patients, inv = np.unique(out["patient"], return_inverse=True)
        cnt = np.bincount(inv, minlength=len(patients)).astype(np.float64)
        pooled = np.stack([np.bincount(inv, weights=out["prob"][:, k], minlength=len(patients)) / cnt
                           for k in range(out["prob"].shape[1])], 1)            # (P, 2 + K)
        first = np.zeros(len(patients), dtype=np.int64)
        first[inv[::-1]] = np.arange(len(inv))[::-1]
        tgt = np.array(out["target"][first], dtype=np.float64)                 # (P, 3) age (z), sex, race
        tgt[:, 0] = tgt[:, 0] * self.age_std + self.age_mean                    # targets are standardised: years

        def stat(d: np.ndarray) -> dict[str, float]:
            p, t = pooled[d], tgt[d]
            a = ~np.isnan(t[:, 0])
            s = ~np.isnan(t[:, 1])
            r = np.nan_to_num(t[:, 2], nan=-1) >= 0
            return {
                "age_mae": ev.mae(t[a, 0], p[a, 0]) if a.any() else float("nan"),
                "age_r2": ev.r2(t[a, 0], p[a, 0]) if a.sum() > 1 else float("nan"),
                "sex_auroc": ev.auroc(t[s, 1], p[s, 1]),
                "race_auroc": ev.macro_ovr_auroc(t[r, 2].astype(int), p[r, 2:]) if r.any() else float("nan"),
            }

        return stat


def probe_encoder(embeddings: np.ndarray, table, n_boot: int = 1000, seed: int = 0,
                  attributes: tuple[str, ...] = ("age", "sex", "race")) -> dict:
    """Route (a): linear probes on frozen slice embeddings via ``ctssl_core.probes`` (patient-pooled).

    ``table`` is a DataFrame aligned with ``embeddings`` rows with
    ``patient_key`` and the attribute columns. Returns ``probes.probe_attributes``'s dict.
    """
    from ctssl_core import probes

    return probes.probe_attributes(embeddings, table, attributes=attributes, n_boot=n_boot, seed=seed)
