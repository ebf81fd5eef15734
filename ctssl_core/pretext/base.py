"""Shared plumbing of the pretext tasks: reading the raw batch, and the two head shapes
(dense reconstruction with a U-Net / VQ decoder, 4-way classification on the embedding).

Each task module stays a small frozen dataclass of its hyperparameters that says
*what* it predicts; these mixins say *how* a head is attached and run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ctssl_core.config import ConfigError
from ctssl_core.models.heads import ClassifierHead, build_dense_head, dense_forward
from ctssl_core.pretext.losses import attach_aux_loss, classification_loss
from ctssl_core.tasks import TaskBatch


def raw_x(raw: dict[str, Tensor], context: int, task: str) -> Tensor:
    """The windowed slices ``raw["x"]`` (B, S, H, W), or (B, S, C, H, W) with C windows (``ops.model_input``),
    float, checked to hold ``context`` slices; read slice s with ``ops.slice_at``."""
    if not isinstance(raw, dict) or "x" not in raw:
        raise ConfigError(f"{task}: the raw batch must be a dict with key 'x' (B, S, H, W) float in [0, 1]; "
                          f"build it with data/loader.py SliceBatcher")
    x = raw["x"]
    if not isinstance(x, Tensor) or x.dim() not in (4, 5) or not x.is_floating_point():
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"{task}: raw['x'] must be a float (B, S, H, W) tensor, got {desc}; "
                          f"window HU with ctssl_core.ops.window first")
    if x.shape[1] < context:
        raise ConfigError(f"{task}: needs {context} slice(s) per sample in raw['x'] (S), got {x.shape[1]}; "
                          f"the loader must be built with context={context}")
    return x


class PretextBase:
    """Class-level attributes of the Task protocol shared by the pretext tasks."""

    name: ClassVar[str]
    context: ClassVar[int] = 1
    label_keys: ClassVar[tuple[str, ...]] = ()
    wants_hu: ClassVar[bool] = False
    gap: ClassVar[int] = 0                    # next_slice overrides with a field
    whole_slice: ClassVar[bool] = False       # True: random crops would remove the cue the task needs
    default_strategy: ClassVar[bool] = True   # run by a benchmark that names no strategies


class DenseTask(PretextBase):
    """Predict an image: the head is ``build_dense_head(encoder, C)`` (U-Net or VQ-VAE decoder), C = one
    output channel per input window of the encoder (``encoder.windows``), the channels of the target."""

    def build_head(self, encoder: nn.Module) -> nn.Module:
        return build_dense_head(encoder, len(encoder.windows))

    def forward(self, encoder: nn.Module, head: nn.Module, batch: TaskBatch) -> Tensor | tuple[Tensor, Tensor]:
        """``pred`` (B, C, H, W), or ``(pred, vq_loss)`` when the head is the paper's VQ-VAE decoder."""
        feats = encoder.forward_features(batch.inputs)
        pred, aux = dense_forward(head, feats, batch.inputs.shape[-2:])    # (B, C, H, W)
        return attach_aux_loss(pred, aux)


@dataclass(frozen=True)
class ClassifyTask(PretextBase):
    """Classify a transform: a ``ClassifierHead`` on the pooled embedding, cross-entropy loss.

    Whole slices: which way is up, or which side is left, is a global cue (spine, heart, table); a
    64-px crop of a 128-px slice often holds none, so flip accuracy stayed near chance. Pretraining
    resizes the whole slice to the crop side instead of cropping (same compute).
    """

    whole_slice: ClassVar[bool] = True

    hidden: int = 0                  # >0: an MLP head with this many hidden units instead of a linear one
    label_smoothing: float = 0.0

    n_classes: ClassVar[int] = 4

    def __post_init__(self) -> None:
        check_range(self.name, "label_smoothing", self.label_smoothing, 0.0, 1.0)
        check_range(self.name, "hidden", self.hidden, 0, 1 << 20)

    def build_head(self, encoder: nn.Module) -> nn.Module:
        return ClassifierHead(encoder.embed_dim, self.n_classes, hidden=self.hidden)

    def forward(self, encoder: nn.Module, head: nn.Module, batch: TaskBatch) -> Tensor:
        return head(encoder.embed(batch.inputs))                             # (B, n_classes)

    def loss(self, pred: Tensor, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return classification_loss(pred, batch.targets, self.label_smoothing)

    def draw_labels(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.n_classes, (x.shape[0],), generator=generator, device=x.device)


def check_range(task: str, name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        lb = "(" if lo_open else "["
        raise ConfigError(f"{task}.{name} must be in {lb}{lo}, {hi}], got {value}")
