"""The paper's backbone: a 2D VQ-VAE with BatchNorm (Tariq et al. 2024, released code).

Rebuilt from its description (DESIGN.md): input 3x512^2 (grey slice copied to 3
channels); encoder = two stride-2 4x4 convs (256, 512 ch), a 3x3 conv, 18
residual blocks, a 1x1 conv to 64 ch; codebook 512x64 with commitment beta 0.25;
the decoder mirrors the encoder with transposed convs and a Tanh. At the default
sizes: ~51.7M encoder parameters, ~101M in total (with a 3-channel decoder).

Split for ctssl's contract: ``VQVAEEncoder`` (registry key ``paper``) is the part
that is transferred downstream and embedded; the quantizer and decoder form the
dense head (``VQDecoderHead``) that the reconstruction pretext tasks train.
Every size is a constructor argument so tests can build a small one.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctssl_core.config import ConfigError
from ctssl_core.models.base import Encoder


class ResBlock(nn.Module):
    """x + 1x1(ReLU(BN(3x3(x)))), as in the released code."""

    def __init__(self, c: int):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                               nn.Conv2d(c, c, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x)


class VectorQuantizer(nn.Module):
    """Nearest-codeword quantisation with a straight-through gradient (van den Oord et al. 2017).

    Returns ``(z_q, vq_loss)`` where vq_loss = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2
    (codebook + commitment terms), computed in float32 even under autocast.
    """

    def __init__(self, n_codes: int = 512, dim: int = 64, beta: float = 0.25):
        super().__init__()
        self.codebook = nn.Parameter(torch.empty(n_codes, dim).uniform_(-1.0 / n_codes, 1.0 / n_codes))  # (K, D)
        self.beta = beta

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        # distances in bf16 would pick wrong codewords: quantise in float32 even under autocast
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._quantize(z)

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()                     # (B*H*W, D)
        e = self.codebook.float()                                        # (K, D)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)  # (B*H*W, K)
        idx = dist.argmin(1)
        q = F.embedding(idx, e).view(b, h, w, d).permute(0, 3, 1, 2)              # (B, D, H, W)
        zf = z.float()
        loss = F.mse_loss(q, zf.detach()) + self.beta * F.mse_loss(q.detach(), zf)
        z_q = z + (q.to(z.dtype) - z).detach()                                   # straight-through
        return z_q, loss


class VQVAEEncoder(Encoder):
    """Encoder half of the paper's VQ-VAE.

    ``forward_features`` -> [stride-2 map (dims[0] ch), stride-4 trunk after the residual
    blocks (dims[1] ch), stride-4 pre-quantisation latent z_e (latent_dim ch)].
    ``embed`` pools the latent z_e -> (B, latent_dim), the representation the
    paper's decoder reconstructs from.
    """

    def __init__(self, in_chans: int = 3, dims: Sequence[int] = (256, 512), n_res: int = 18,
                 latent_dim: int = 64, n_codes: int = 512, beta: float = 0.25):
        super().__init__()
        dims = tuple(int(d) for d in dims)
        if len(dims) != 2 or min(dims) < 1:
            raise ConfigError(f"paper encoder dims must be two positive channel counts, got {dims}")
        if n_res < 0 or latent_dim < 1 or n_codes < 2 or in_chans < 1:
            raise ConfigError(f"paper encoder needs n_res >= 0, latent_dim >= 1, n_codes >= 2, in_chans >= 1; "
                              f"got n_res={n_res} latent_dim={latent_dim} n_codes={n_codes} in_chans={in_chans}")
        # kept so the decoder head mirrors this encoder and checkpoints can rebuild it
        self.config = dict(in_chans=in_chans, dims=dims, n_res=n_res, latent_dim=latent_dim, n_codes=n_codes,
                           beta=beta)
        self.in_chans = in_chans
        self.down1 = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, 2, 1), nn.BatchNorm2d(dims[0]), nn.LeakyReLU())
        self.down2 = nn.Sequential(nn.Conv2d(dims[0], dims[1], 4, 2, 1), nn.BatchNorm2d(dims[1]), nn.LeakyReLU())
        self.trunk = nn.Sequential(nn.Conv2d(dims[1], dims[1], 3, 1, 1), *[ResBlock(dims[1]) for _ in range(n_res)],
                                   nn.LeakyReLU())
        self.proj = nn.Sequential(nn.Conv2d(dims[1], latent_dim, 1), nn.BatchNorm2d(latent_dim), nn.LeakyReLU())
        self.feature_channels = [dims[0], dims[1], latent_dim]
        self.feature_strides = [2, 4, 4]
        self.embed_dim = latent_dim

    def forward_features(self, x: Tensor) -> list[Tensor]:
        x = self.adapt_input(x)                                   # (B, in_chans, H, W)
        h1 = self.down1(x)                                        # (B, dims0, H/2, W/2)
        h2 = self.trunk(self.down2(h1))                           # (B, dims1, H/4, W/4)
        z = self.proj(h2)                                         # (B, latent, H/4, W/4)
        return [h1, h2, z]


class VQDecoderHead(nn.Module):
    """Quantizer + mirrored decoder of the paper's VQ-VAE, used as a dense head.

    ``forward(features) -> (pred (B, out_ch, H, W) in [-1, 1], vq_loss scalar)``: it
    reads only the last feature (z_e). The decoder's last layer has ``out_ch``
    channels (1 for our grey targets; the paper reconstructed its 3 copies).
    """

    returns_aux_loss = True

    def __init__(self, out_ch: int = 1, dims: Sequence[int] = (256, 512), n_res: int = 18, latent_dim: int = 64,
                 n_codes: int = 512, beta: float = 0.25, **_ignored):
        super().__init__()
        dims = tuple(int(d) for d in dims)
        self.quantizer = VectorQuantizer(n_codes, latent_dim, beta)
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_dim, dims[1], 3, 1, 1), *[ResBlock(dims[1]) for _ in range(n_res)], nn.LeakyReLU(),
            nn.ConvTranspose2d(dims[1], dims[0], 4, 2, 1), nn.BatchNorm2d(dims[0]), nn.LeakyReLU(),
            nn.ConvTranspose2d(dims[0], out_ch, 4, 2, 1), nn.Tanh())

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        z_q, vq_loss = self.quantizer(features[-1])               # (B, latent, H/4, W/4)
        return self.decoder(z_q), vq_loss                         # (B, out_ch, H, W)


def paper(in_chans: int = 3, **kw) -> VQVAEEncoder:
    return VQVAEEncoder(in_chans=in_chans, **kw)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["VQVAEEncoder", "VQDecoderHead", "VectorQuantizer", "ResBlock", "paper", "count_params"]
