"""Composite pretraining: any subset of the five strategies trained together, with weights.

Predicts: whatever each member predicts, each with its own head on the shared
encoder; the total loss is ``sum_i weight_i * loss_i`` and each member's loss is
logged on its own as ``loss/<task>`` (other member metrics as ``<task>/<metric>``).
Why: Swin UNETR (Tang et al. 2022) combined inpainting, rotation and contrastive
objectives; the paper compared strategies one at a time, and whether a mix beats
the best single one is a question users ask. Every member's batch is built from
the same raw batch (single-slice members use slice n when next_slice is included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ctssl_core.config import ConfigError
from ctssl_core.pretext.base import PretextBase
from ctssl_core.tasks import TaskBatch


@dataclass
class CompositeBatch(TaskBatch):
    """A TaskBatch whose ``inputs``/``targets`` are the first member's (for batch size and
    device); ``parts`` holds every member's own batch."""

    parts: dict[str, TaskBatch] = field(default_factory=dict)


@dataclass(frozen=True)
class Composite(PretextBase):
    tasks: tuple[str, ...] = ("masked_region", "rotation")
    weights: tuple[float, ...] = ()               # one per task; empty = all 1.0
    params: dict[str, dict[str, Any]] = field(default_factory=dict)   # {task: {hparam: value}}

    name: ClassVar[str] = "composite"
    default_strategy: ClassVar[bool] = False      # a combination of strategies, opt-in

    def __post_init__(self) -> None:
        from ctssl_core.pretext import PRETEXT, make_pretext  # registry imports this module

        members = [t for t in PRETEXT if t != self.name]
        if not self.tasks:
            raise ConfigError(f"composite.tasks is empty; list some of {members}")
        bad = [t for t in self.tasks if t not in members]
        if bad:
            raise ConfigError(f"composite.tasks has unknown or nested task(s) {bad}; choose from {members}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"composite.tasks lists a task twice: {list(self.tasks)}")
        if self.weights and len(self.weights) != len(self.tasks):
            raise ConfigError(f"composite.weights has {len(self.weights)} entries for {len(self.tasks)} tasks; "
                              f"give one weight per task or none")
        if any(w < 0 for w in self.weights):
            raise ConfigError(f"composite.weights must be >= 0, got {list(self.weights)}")
        extra = sorted(set(self.params) - set(self.tasks))
        if extra:
            raise ConfigError(f"composite.params names task(s) {extra} not in composite.tasks {list(self.tasks)}")
        subs = {t: make_pretext(t, **dict(self.params.get(t, {}))) for t in self.tasks}
        object.__setattr__(self, "_members", subs)

    def __hash__(self) -> int:  # the params dict is not hashable; its repr is
        return hash((self.tasks, self.weights, repr(sorted(self.params.items()))))

    @property
    def members(self) -> dict[str, Any]:
        return self.__dict__["_members"]

    @property
    def context(self) -> int:  # type: ignore[override]
        return max(m.context for m in self.members.values())

    @property
    def whole_slice(self) -> bool:  # type: ignore[override]
        return any(m.whole_slice for m in self.members.values())

    @property
    def gap(self) -> int:  # type: ignore[override]
        return max(getattr(m, "gap", 0) for m in self.members.values())

    @property
    def weight_of(self) -> dict[str, float]:
        w = self.weights or tuple(1.0 for _ in self.tasks)
        return dict(zip(self.tasks, (float(v) for v in w)))

    def make_batch(self, raw: dict[str, Tensor], generator: torch.Generator) -> CompositeBatch:
        # every member reads what it needs from the same raw batch (single-slice members take
        # ops.slice_at(x, 0), slice n); the one generator advances member by member, so it stays deterministic
        parts = {name: task.make_batch(raw, generator) for name, task in self.members.items()}
        first = parts[self.tasks[0]]
        return CompositeBatch(inputs=first.inputs, targets=first.targets, mask=first.mask, parts=parts)

    def build_head(self, encoder: nn.Module) -> nn.Module:
        return nn.ModuleDict({name: task.build_head(encoder) for name, task in self.members.items()})

    def forward(self, encoder: nn.Module, head: nn.Module, batch: TaskBatch) -> dict[str, Tensor]:
        parts = _parts_of(batch)
        heads = getattr(head, "module", head)
        return {name: task.forward(encoder, heads[name], parts[name]) for name, task in self.members.items()}

    def loss(self, pred: dict[str, Tensor], batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        parts = _parts_of(batch)
        total: Tensor | None = None
        logs: dict[str, Tensor] = {}
        for name, task in self.members.items():
            loss_i, logs_i = task.loss(pred[name], parts[name])
            w = self.weight_of[name]
            total = w * loss_i if total is None else total + w * loss_i
            logs[f"loss/{name}"] = loss_i.detach().float()
            logs.update({f"{name}/{k}": v for k, v in logs_i.items()})
        assert total is not None
        return total, logs


def _parts_of(batch: TaskBatch) -> dict[str, TaskBatch]:
    parts = getattr(batch, "parts", None)
    if not parts:
        raise ConfigError("composite.forward/loss needs the CompositeBatch from composite.make_batch")
    return parts
