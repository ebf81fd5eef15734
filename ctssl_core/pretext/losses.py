"""Losses shared by the pretext tasks: reconstruction (plain MSE or the paper's composite)
and classification, plus the seam that carries a VQ-VAE head's auxiliary loss
(``attach_aux_loss`` / ``split_aux``).

Metric values are detached 0-d tensors (see ``to_logs``): no device sync per step.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from ctssl_core.config import ConfigError
from ctssl_core.ops import ssim

# The paper's reconstruction loss: 0.2*MSE(image) + 0.2*MSE(masked square) + 0.8*VQ - 0.1*SSIM.
PAPER_WEIGHTS = {"mse": 0.2, "mse_masked": 0.2, "vq": 0.8, "ssim": 0.1}

LossKind = Literal["mse", "paper"]


def attach_aux_loss(pred: Tensor, aux: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
    """What a dense task's ``forward`` returns: ``pred``, or ``(pred, aux)`` with a head's
    auxiliary loss (the VQ-VAE codebook + commitment loss).

    ``Task.loss`` sees only the prediction and the batch, so the VQ loss travels with
    the prediction. A tuple (not a tensor attribute) survives DDP's output wrapping
    and torch.compile; the downstream nodule task uses the same convention.
    """
    return (pred, aux) if aux is not None else pred


def split_aux(pred: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`attach_aux_loss` -> ``(pred, aux or None)``."""
    if isinstance(pred, (tuple, list)):
        if len(pred) != 2:
            raise ConfigError(f"a dense prediction is a tensor or (pred, aux_loss), got a sequence of {len(pred)}")
        return pred[0], pred[1]
    return pred, None


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the pixels where ``mask`` (B, 1, H, W) is 1, in float32."""
    w = mask.float().expand_as(target)                           # (B, C, H, W)
    err = (pred.float() - target.float()).pow(2) * w
    return err.sum() / w.sum().clamp_min(1.0)


def to_logs(items: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached float32 0-d tensors for the metrics dict.

    The total loss itself is not repeated here: the training loop logs it as ``train/loss``.
    Kept on the device on purpose: ``train.fit`` accumulates them there and reads them
    back only every ``log_every`` steps, so a step never waits on a device sync
    (a ``.item()`` per step would stall the GPU queue). ``float(v)`` reads one.
    """
    return {k: v.detach().float().reshape(()) for k, v in items.items()}


def reconstruction_loss(pred: Tensor | tuple[Tensor, Tensor], target: Tensor, mask: Tensor | None = None, kind: str = "mse",
                        masked_weight: float = 1.0, whole_weight: float = 1.0, vq_weight: float = 0.8,
                        data_range: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Reconstruction loss for the dense pretext tasks.

    kind="mse": ``masked_weight * MSE(hidden pixels) + whole_weight * MSE(image)`` (the masked
    term only when ``mask`` is given) ``+ vq_weight * VQ`` when the head is a VQ-VAE.
    kind="paper": ``0.2*MSE(image) + 0.2*MSE(masked) + 0.8*VQ - 0.1*SSIM`` (the released code).
    """
    pred, vq = split_aux(pred)
    if pred.shape != target.shape:
        raise ConfigError(f"prediction shape {tuple(pred.shape)} does not match target {tuple(target.shape)}; "
                          f"build the head with build_dense_head(encoder, out_ch={target.shape[1]})")
    p, t = pred.float(), target.float()
    mse = F.mse_loss(p, t)
    items: dict[str, Tensor] = {"mse": mse}
    if mask is not None:
        items["mse_masked"] = masked_mse(p, t, mask)
    if vq is not None:
        items["vq"] = vq.float()
    if kind == "mse":
        loss = whole_weight * mse
        if mask is not None:
            loss = loss + masked_weight * items["mse_masked"]
        if vq is not None:
            loss = loss + vq_weight * items["vq"]
    elif kind == "paper":
        s = ssim(p, t, data_range=data_range)
        items["ssim"] = s
        loss = PAPER_WEIGHTS["mse"] * mse - PAPER_WEIGHTS["ssim"] * s
        if mask is not None:
            loss = loss + PAPER_WEIGHTS["mse_masked"] * items["mse_masked"]
        if vq is not None:
            loss = loss + PAPER_WEIGHTS["vq"] * items["vq"]
    else:
        raise ConfigError(f"unknown reconstruction loss {kind!r}; choose 'mse' or 'paper'")
    return loss, to_logs(items)


def classification_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy with accuracy logged alongside."""
    if logits.dim() != 2 or targets.shape != (logits.shape[0],):
        raise ConfigError(f"classification needs logits (B, K) and integer targets (B,), "
                          f"got {tuple(logits.shape)} and {tuple(targets.shape)}")
    loss = F.cross_entropy(logits.float(), targets.long(), label_smoothing=label_smoothing)
    acc = (logits.argmax(1) == targets).float().mean()
    return loss, to_logs({"acc": acc})
