"""Task heads: a linear/MLP classifier on the pooled embedding, a U-Net decoder on the
multi-scale features, and the dense-head builder that picks the right decoder per encoder.

All heads use only Conv/BatchNorm/ReLU/Linear/interpolate/cat, which keep the
channels_last memory format, so ``head.to(memory_format=torch.channels_last)``
is safe and fast under bf16 autocast.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctssl_core.config import ConfigError
from ctssl_core.models.base import Encoder
from ctssl_core.models.vqvae import VQDecoderHead, VQVAEEncoder


class ClassifierHead(nn.Module):
    """``(B, embed_dim) -> (B, n_out)`` logits; a linear probe by default, an MLP with ``hidden > 0``."""

    def __init__(self, embed_dim: int, n_out: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        if embed_dim < 1 or n_out < 1:
            raise ConfigError(f"ClassifierHead needs embed_dim >= 1 and n_out >= 1, got {embed_dim}, {n_out}")
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                     nn.Linear(hidden, n_out))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, n_out))
        self.embed_dim, self.n_out = embed_dim, n_out

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNetDecoder(nn.Module):
    """U-Net decoder (Ronneberger et al. 2015) over an encoder's ``forward_features``.

    From the deepest map up: upsample (bilinear) to the next shallower map, concatenate
    it, two 3x3 conv-BN-ReLU. Then upsample by the shallowest stride to input
    resolution, one more conv block and a 1x1 conv to ``out_ch``. No output
    activation: targets may be images in [0, 1] or signed residuals.

    ``forward(features, size=None) -> (B, out_ch, H, W)``; ``size`` forces the output
    size when the input side is not a multiple of the encoder's total stride.
    """

    returns_aux_loss = False

    def __init__(self, feature_channels: Sequence[int], feature_strides: Sequence[int], out_ch: int = 1,
                 decoder_channels: Sequence[int] | None = None, max_channels: int = 256):
        super().__init__()
        fc, fs = list(feature_channels), list(feature_strides)
        if not fc or len(fc) != len(fs):
            raise ConfigError(f"feature_channels {fc} and feature_strides {fs} must be non-empty and equally long")
        if any(b < a for a, b in zip(fs, fs[1:])):
            raise ConfigError(f"feature_strides must be shallow->deep (non-decreasing), got {fs}")
        if decoder_channels is None:
            decoder_channels = [max(16, min(max_channels, c)) for c in fc[:-1]]
        dc = list(decoder_channels)
        if len(dc) != len(fc) - 1:
            raise ConfigError(f"decoder_channels needs {len(fc) - 1} entries (one per skip), got {dc}")
        blocks, cin = [], fc[-1]
        for i in range(len(fc) - 2, -1, -1):
            blocks.append(ConvBlock(cin + fc[i], dc[i]))
            cin = dc[i]
        self.blocks = nn.ModuleList(blocks)
        self.stride0 = fs[0]
        c_last = max(8, cin // 2)
        self.final = ConvBlock(cin, c_last) if fs[0] > 1 else nn.Identity()
        self.out = nn.Conv2d(c_last if fs[0] > 1 else cin, out_ch, 1)
        self.out_ch = out_ch

    def forward(self, features: list[Tensor], size: Sequence[int] | None = None) -> Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip.to(x.dtype)], dim=1))                          # (B, dc_i, H_i, W_i)
        out_size = tuple(size) if size is not None else (x.shape[-2] * self.stride0, x.shape[-1] * self.stride0)
        if tuple(x.shape[-2:]) != out_size:
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return self.out(self.final(x))                             # (B, out_ch, H, W)


def build_dense_head(encoder: Encoder, out_ch: int = 1, **kw) -> nn.Module:
    """The decoder a dense pretext/downstream task puts on ``encoder``.

    ResNet-like encoders get a :class:`UNetDecoder`; the paper's VQ-VAE encoder gets its
    own mirrored decoder with the vector quantizer (:class:`VQDecoderHead`), whose
    forward returns ``(pred, vq_loss)`` (see ``returns_aux_loss``).
    """
    if isinstance(encoder, VQVAEEncoder):
        return VQDecoderHead(out_ch=out_ch, **{**encoder.config, **kw})
    if not hasattr(encoder, "feature_channels") or not hasattr(encoder, "feature_strides"):
        raise ConfigError(f"{type(encoder).__name__} has no feature_channels/feature_strides; "
                          f"build encoders with ctssl_core.models.build_encoder")
    return UNetDecoder(encoder.feature_channels, encoder.feature_strides, out_ch, **kw)


def dense_forward(head: nn.Module, features: list[Tensor], size: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """Run a dense head -> ``(pred (B, C, H, W), aux_loss or None)`` for either head type."""
    out = head(features) if _is_vq(head) else head(features, size=size)
    if isinstance(out, tuple):
        pred, aux = out
    else:
        pred, aux = out, None
    if tuple(pred.shape[-2:]) != tuple(size):
        pred = F.interpolate(pred, size=tuple(size), mode="bilinear", align_corners=False)
    return pred, aux


def _is_vq(head: nn.Module) -> bool:
    inner = getattr(head, "module", head)  # DDP / compile wrappers keep the module here
    inner = getattr(inner, "_orig_mod", inner)
    return bool(getattr(inner, "returns_aux_loss", False))
