"""The encoder contract every backbone in ``ENCODERS`` honours (timm style).

An encoder maps ``(B, C, H, W)`` slices to a list of feature maps, shallow to
deep, so that dense heads (U-Net, the VQ-VAE decoder) can use the multi-scale
features and global heads, probes and UMAP can use one pooled vector.
"""

from __future__ import annotations

from torch import Tensor, nn

from ctssl_core.config import ConfigError


class Encoder(nn.Module):
    """Base class: subclasses set the attributes below and implement ``forward_features``.

    Attributes:
        in_chans: channels the first conv expects. A 1-channel (grey) input is
            replicated to ``in_chans`` so every task can hand over plain slices
            (the paper copied the grey slice into 3 channels).
        feature_channels / feature_strides: one entry per map of ``forward_features``.
        embed_dim: length of the ``embed`` vector (channels of the deepest map).
        windows: the HU windows (level, width) of the model input, one input channel each
            (``ops.WINDOWS``). Part of the encoder's identity: a checkpoint carries the windows it
            was trained on, so fine-tuning and embedding feed it the same view of the data.
    """

    in_chans: int
    windows: tuple[tuple[float, float], ...] = ((50.0, 350.0),)   # ops.DEFAULT_WINDOWS (paper)
    feature_channels: list[int]
    feature_strides: list[int]
    embed_dim: int

    def adapt_input(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ConfigError(f"encoder input must be (B, C, H, W), got shape {tuple(x.shape)}")
        c = x.shape[1]
        if c == self.in_chans:
            return x
        if c == 1:
            return x.expand(-1, self.in_chans, -1, -1)           # (B, in_chans, H, W) grey copies
        raise ConfigError(f"encoder expects {self.in_chans} input channel(s) (or 1, replicated), got {c}; "
                          f"build it with in_chans={c}")

    def forward_features(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def embed(self, x: Tensor) -> Tensor:
        """Global average pool of the deepest feature map -> (B, embed_dim) float32."""
        return self.forward_features(x)[-1].float().mean(dim=(-2, -1))

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)
